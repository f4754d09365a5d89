package restore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backup"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/source/image"
)

// testRepo creates a repository (64 KiB chunks) and returns it and its
// directory.
func testRepo(t *testing.T) (*repo.Repo, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "repo")
	be, err := local.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(context.Background(), be, []byte("pw"), repo.InitOptions{ChunkSize: repo.MinChunkSize, PackSize: 1 << 20,
		KDF: &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("0123456789abcdef")}})
	if err != nil {
		t.Fatal(err)
	}
	return r, dir
}

// sparseImage creates a sparse raw image of size bytes holding pieces of
// random data (some not chunk-aligned, one repeated, one at the very end)
// and returns its path.
func sparseImage(t *testing.T, dir string, size int64, pieces int) string {
	t.Helper()
	path := filepath.Join(dir, "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Skipf("no sparse file of %d bytes here: %v", size, err)
	}
	rng := rand.New(rand.NewPCG(uint64(size), 3))
	var first []byte
	for i := 0; i < pieces; i++ {
		b := make([]byte, 1000+rng.IntN(200<<10))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		off := rng.Int64N(size - int64(len(b)))
		switch i {
		case 0:
			first = b
		case 1:
			b = first // the same data elsewhere: stored once
		case 2:
			off = size - int64(len(b)) // the disk's last bytes
		}
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// dataExtents lists the data ranges of a sparse file (SEEK_DATA/HOLE).
func dataExtents(t *testing.T, path string) []source.Extent {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	var out []source.Extent
	for pos := int64(0); pos < st.Size(); {
		data, err := unix.Seek(int(f.Fd()), pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, source.Extent{Offset: data, Length: hole - data})
		pos = hole
	}
	return out
}

// sameSparseFiles compares two sparse files byte for byte: every range
// that holds data in either is read from both; the rest is holes in both.
func sameSparseFiles(t *testing.T, a, b string) {
	t.Helper()
	sa, _ := os.Stat(a)
	sb, _ := os.Stat(b)
	if sa.Size() != sb.Size() {
		t.Fatalf("sizes %d and %d", sa.Size(), sb.Size())
	}
	exts := append(dataExtents(t, a), dataExtents(t, b)...)
	sort.Slice(exts, func(i, j int) bool { return exts[i].Offset < exts[j].Offset })
	fa, _ := os.Open(a)
	defer fa.Close()
	fb, _ := os.Open(b)
	defer fb.Close()
	for _, e := range exts {
		ba, bb := make([]byte, e.Length), make([]byte, e.Length)
		if _, err := fa.ReadAt(ba, e.Offset); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if _, err := fb.ReadAt(bb, e.Offset); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if !bytes.Equal(ba, bb) {
			t.Fatalf("files differ in %d bytes at %d", e.Length, e.Offset)
		}
	}
}

// A 1 TiB sparse image with a few MiB of data backs up into a restore
// point whose maps are as small as its data, and restores byte for byte
// into a file as sparse as the image.
func TestSparseImageRoundTrip(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 1<<40 + 12345 // a short last chunk
	img := sparseImage(t, dir, size, 40)
	r, repoDir := testRepo(t)
	d, err := image.Open(ctx, img, image.Options{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	snap, err := backup.Run(ctx, r, []source.Disk{d}, backup.Options{Name: "sparse", Source: "image"})
	if err != nil {
		t.Fatal(err)
	}
	disk := snap.Disks[0]
	// 40 pieces of at most 200 KiB touch at most 40 × 5 chunks of 64 KiB;
	// a dense map would be 2048 map blobs of 256 KiB.
	if disk.DataChunks == 0 || disk.DataChunks > 200 || len(disk.Maps) != 1 {
		t.Fatalf("%d data chunks in %d map blobs", disk.DataChunks, len(disk.Maps))
	}
	if snap.Stats.BytesRead > 10<<20 {
		t.Fatalf("backup read %d bytes of a disk with a few MiB of data", snap.Stats.BytesRead)
	}
	names, _ := filepath.Glob(filepath.Join(repoDir, "snapshots", "*"))
	if len(names) != 1 {
		t.Fatalf("%d snapshot objects", len(names))
	}
	for _, n := range names {
		if st, _ := os.Stat(n); st.Size() > 4096 {
			t.Fatalf("snapshot manifest of %d bytes", st.Size())
		}
	}

	out := filepath.Join(dir, "restored.raw")
	tg, err := NewRawFile(out, disk.Size, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := Disk(ctx, r, disk, tg, Options{Workers: 3}); err != nil {
		t.Fatal(err)
	}
	sameSparseFiles(t, img, out)
	var st unix.Stat_t
	if err := unix.Stat(out, &st); err != nil {
		t.Fatal(err)
	}
	if alloc := st.Blocks * 512; alloc > 2*disk.DataBytes+1<<20 {
		t.Fatalf("restored file allocates %d bytes for %d of data: not sparse", alloc, disk.DataBytes)
	}
}

// deviceTarget is an in-memory block device: it needs zero chunks
// written, and records every write.
type deviceTarget struct {
	mu     sync.Mutex
	data   []byte
	writes map[int64]int // offset -> times written
}

func (d *deviceTarget) WriteAt(ctx context.Context, p []byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	copy(d.data[off:], p)
	d.writes[off]++
	return nil
}
func (d *deviceTarget) NeedsZeroes() bool                { return true }
func (d *deviceTarget) Commit(ctx context.Context) error { return nil }
func (d *deviceTarget) Abort()                           {}

// memDisk is an in-memory source disk; zero 64 KiB granules are holes.
type memDisk struct{ data []byte }

func (m *memDisk) Info() source.DiskInfo {
	return source.DiskInfo{Name: "vda", Size: int64(len(m.data)), Format: "raw"}
}
func (m *memDisk) Extents(ctx context.Context, off, length int64) ([]source.Extent, error) {
	const g = 64 << 10
	var out []source.Extent
	for p := off; p < off+length; p += g {
		n := min(g, off+length-p)
		out = append(out, source.Extent{Offset: p, Length: n, Zero: bytes.Count(m.data[p:p+n], []byte{0}) == int(n)})
	}
	return out, nil
}
func (m *memDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	copy(p, m.data[off:])
	return nil
}
func (m *memDisk) Close() error { return nil }

// A target that needs zeroes gets every position written exactly once:
// data chunks with their data, the runs between them with zeros.
func TestDeviceGetsZeroRanges(t *testing.T) {
	ctx := context.Background()
	cs := int64(repo.MinChunkSize)
	for _, tc := range []struct {
		name string
		data []int64 // chunk positions holding data
		n    int64
	}{
		{"zeros only", nil, 300},
		{"data at both ends", []int64{0, 299}, 300},
		{"scattered", []int64{3, 4, 5, 100, 101, 250}, 300},
		{"all data", []int64{0, 1, 2, 3, 4, 5, 6, 7}, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := testRepo(t)
			src := &memDisk{data: make([]byte, tc.n*cs-100)}
			for _, p := range tc.data {
				for i := p * cs; i < min((p+1)*cs, int64(len(src.data))); i += 7 {
					src.data[i] = byte(p + 1)
				}
			}
			snap, err := backup.Run(ctx, r, []source.Disk{src}, backup.Options{Name: "dev"})
			if err != nil {
				t.Fatal(err)
			}
			if len(tc.data) == 0 && len(snap.Disks[0].Maps) != 0 {
				t.Fatalf("a disk of zeros has %d map blobs", len(snap.Disks[0].Maps))
			}
			dev := &deviceTarget{data: bytes.Repeat([]byte{0xff}, len(src.data)), writes: map[int64]int{}}
			if err := Disk(ctx, r, snap.Disks[0], dev, Options{Workers: 2}); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(dev.data, src.data) {
				t.Fatal("device differs from the disk")
			}
			for p := int64(0); p < tc.n; p++ {
				if dev.writes[p*cs] != 1 {
					t.Fatalf("position %d written %d times", p, dev.writes[p*cs])
				}
			}
		})
	}
}
