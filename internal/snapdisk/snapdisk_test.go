package snapdisk

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backup"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/source/image"
)

// backedUp backs up a 6 MiB raw image with data, zero runs and a repeated
// chunk into a fresh repository (64 KiB chunks) and returns both.
func backedUp(t *testing.T) (*repo.Repo, *repo.Snapshot, []byte, string) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	data := make([]byte, 6<<20+4321)
	rng := rand.New(rand.NewPCG(3, 4))
	for b := 0; b < len(data); b += 64 << 10 {
		if rng.IntN(4) == 0 {
			continue // a zero chunk
		}
		for i := b; i < min(b+64<<10, len(data)); i++ {
			data[i] = byte(rng.Uint32())
		}
	}
	copy(data[5<<20:], data[1<<20:1<<20+64<<10]) // a deduplicated chunk
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	be, err := local.Open(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(ctx, be, []byte("pw"), repo.InitOptions{ChunkSize: repo.MinChunkSize, PackSize: 256 << 10,
		KDF: &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("0123456789abcdef")}})
	if err != nil {
		t.Fatal(err)
	}
	d, err := image.Open(ctx, img, image.Options{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	snap, err := backup.Run(ctx, r, []source.Disk{d}, backup.Options{Name: "t"})
	if err != nil {
		t.Fatal(err)
	}
	return r, snap, data, filepath.Join(dir, "repo")
}

func TestReadAt(t *testing.T) {
	r, snap, data, _ := backedUp(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		opts  Options
		reads int
	}{
		{"defaults", Options{}, 400},
		{"tiny cache, no read-ahead", Options{CacheBytes: 1, ReadAhead: -1}, 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := Open(ctx, r, snap.ID, snap.Disks[0], tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if k.Size() != int64(len(data)) {
				t.Fatalf("size %d, want %d", k.Size(), len(data))
			}
			// Random reads from 8 goroutines, plus sequential streams.
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for g := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(g), 9))
					for i := 0; i < tc.reads/8; i++ {
						n := rng.IntN(300 << 10)
						off := rng.Int64N(int64(len(data) - n))
						if g%2 == 0 { // sequential
							off = int64(i*n) % int64(len(data)-n)
						}
						p := make([]byte, n)
						if err := k.ReadAt(ctx, p, off); err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(p, data[off:off+int64(n)]) {
							errs <- errors.New("read differs from the image")
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if err := k.ReadAt(ctx, make([]byte, 2), k.Size()-1); !errors.Is(err, ErrRange) {
				t.Errorf("read past the end: %v", err)
			}
			if tc.opts.CacheBytes == 1 && k.lru.Len() > 1 {
				t.Errorf("cache of 1 byte holds %d chunks", k.lru.Len())
			}
			// The io.ReaderAt adapter reads to the end with io.EOF.
			all, err := io.ReadAll(io.NewSectionReader(k.ReaderAt(ctx), 0, k.Size()+100))
			if err != nil || !bytes.Equal(all, data) {
				t.Fatalf("ReaderAt: %v (read %d bytes)", err, len(all))
			}
		})
	}
}

func TestExtents(t *testing.T) {
	r, snap, data, _ := backedUp(t)
	ctx := context.Background()
	k, err := Open(ctx, r, snap.ID, snap.Disks[0], Options{})
	if err != nil {
		t.Fatal(err)
	}
	exts, err := k.Extents(ctx, 1000, k.Size()-1000)
	if err != nil {
		t.Fatal(err)
	}
	pos := int64(1000)
	for i, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extent %d %+v does not continue at %d", i, e, pos)
		}
		if i > 0 && exts[i-1].Flags == e.Flags {
			t.Errorf("extents %d and %d have the same flags: not merged", i-1, i)
		}
		zero := bytes.Count(data[e.Offset:e.Offset+e.Length], []byte{0}) == int(e.Length)
		if hole := e.Flags == nbd.StateHole|nbd.StateZero; hole && !zero {
			t.Errorf("extent %+v is a hole but holds data", e)
		}
		pos += e.Length
	}
	if pos != k.Size() {
		t.Fatalf("extents end at %d, want %d", pos, k.Size())
	}
}

func TestDamagedChunk(t *testing.T) {
	r, snap, data, repoDir := backedUp(t)
	ctx := context.Background()
	// Damage every pack in its middle: the chunks there fail
	// authentication; zero chunks still read.
	packs, _ := filepath.Glob(filepath.Join(repoDir, "data", "*", "*"))
	for _, p := range packs {
		b, _ := os.ReadFile(p)
		b[len(b)/2] ^= 0xff
		os.WriteFile(p, b, 0o600)
	}
	k, err := Open(ctx, r, snap.ID, snap.Disks[0], Options{ReadAhead: -1})
	if err != nil {
		t.Fatal(err)
	}
	cs := int64(snap.Disks[0].ChunkSize)
	var bad, good int
	for off := int64(0); off < k.Size(); off += cs {
		p := make([]byte, min(cs, k.Size()-off))
		err := k.ReadAt(ctx, p, off)
		switch {
		case err == nil && bytes.Equal(p, data[off:off+int64(len(p))]):
			good++
		case errors.Is(err, repo.ErrDamaged):
			bad++
		default:
			t.Fatalf("chunk at %d: %v (data equal: %v)", off, err, bytes.Equal(p, data[off:off+int64(len(p))]))
		}
	}
	if bad == 0 || good == 0 {
		t.Fatalf("%d damaged and %d good chunks: the damage should hit some chunks and not others", bad, good)
	}
}

// A 1 TiB disk with three pieces of data: its holes are described in
// extents of at most 2 GiB (an NBD reply's length is 32 bits) without
// walking every chunk, and its data reads back.
func TestSparseDiskExtents(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 1 << 40
	img := filepath.Join(dir, "disk.raw")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Skipf("no sparse 1 TiB file here: %v", err)
	}
	pieces := map[int64][]byte{100 << 30: bytes.Repeat([]byte("a"), 70<<10), 600<<30 + 5: []byte("kura"), size - 3: []byte("end")}
	for off, b := range pieces {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	be, _ := local.Open(filepath.Join(dir, "repo"))
	r, err := repo.Init(ctx, be, []byte("pw"), repo.InitOptions{ChunkSize: repo.MinChunkSize,
		KDF: &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("0123456789abcdef")}})
	if err != nil {
		t.Fatal(err)
	}
	d, err := image.Open(ctx, img, image.Options{Format: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	snap, err := backup.Run(ctx, r, []source.Disk{d}, backup.Options{Name: "t"})
	if err != nil {
		t.Fatal(err)
	}
	k, err := Open(ctx, r, snap.ID, snap.Disks[0], Options{})
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	calls := 0
	for pos := int64(0); pos < size; calls++ {
		exts, err := k.Extents(ctx, pos, size-pos)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range exts {
			if e.Offset != pos || e.Length <= 0 || e.Length > 1<<31+repo.MinChunkSize {
				t.Fatalf("extent %+v at %d", e, pos)
			}
			if e.Flags == 0 {
				data += e.Length
			}
			pos += e.Length
		}
	}
	// 70 KiB over two chunks, and two chunks of 4 and 3 bytes.
	if data != 4*repo.MinChunkSize || calls > size>>31+4 {
		t.Fatalf("%d bytes of data extents in %d calls", data, calls)
	}
	for off, b := range pieces {
		got := make([]byte, len(b)+2)
		if err := k.ReadAt(ctx, got, min(off-1, size-int64(len(got)))); err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(got, b) {
			t.Fatalf("data at %d reads %q", off, got)
		}
	}
}
