package backup

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
)

// memDisk is an in-memory disk whose zero regions are reported as zero
// extents in 64 KiB granules, like a sparse file.
type memDisk struct {
	name string
	data []byte
}

func (m *memDisk) Info() source.DiskInfo {
	return source.DiskInfo{Name: m.name, Size: int64(len(m.data)), Format: "raw"}
}

func (m *memDisk) Extents(ctx context.Context, off, length int64) ([]source.Extent, error) {
	const g = 64 << 10
	var out []source.Extent
	for p := off; p < off+length; p += g {
		n := min(g, off+length-p)
		z := isZero(m.data[p : p+n])
		if k := len(out) - 1; k >= 0 && out[k].Zero == z {
			out[k].Length += n
			continue
		}
		out = append(out, source.Extent{Offset: p, Length: n, Zero: z})
	}
	return out, nil
}

func (m *memDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	copy(p, m.data[off:])
	return nil
}

func (m *memDisk) Close() error { return nil }

func testRepo(t testing.TB) *repo.Repo {
	be, _ := local.Open(filepath.Join(t.TempDir(), "repo"))
	r, err := repo.Init(context.Background(), be, []byte("pw"), repo.InitOptions{ChunkSize: 64 << 10, PackSize: 1 << 20,
		KDF: &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("saltsalt")}})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func fill(rng *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(rng.IntN(8))
	}
}

func restoreMem(t *testing.T, r *repo.Repo, d repo.Disk) []byte {
	t.Helper()
	ids, err := r.LoadMap(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, d.Size)
	for i, id := range ids.All() {
		b, err := r.LoadBlob(context.Background(), id, nil)
		if err != nil {
			t.Fatal(err)
		}
		copy(out[i*int64(d.ChunkSize):], b)
	}
	return out
}

func TestBackupRoundTrip(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	rng := rand.New(rand.NewPCG(1, 2))
	// 5 MiB + an odd tail, with holes, a duplicate region and a partial chunk.
	a := &memDisk{name: "a", data: make([]byte, 5<<20+12345)}
	fill(rng, a.data[100<<10:900<<10])
	fill(rng, a.data[3<<20:4<<20])
	copy(a.data[4<<20:], a.data[3<<20:4<<20-1000])
	fill(rng, a.data[len(a.data)-5000:])
	b := &memDisk{name: "b", data: make([]byte, 1<<20)}
	fill(rng, b.data[:300])

	snap, err := Run(ctx, r, []source.Disk{a, b}, Options{Name: "vm", Source: "image", Workers: 3})
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range []*memDisk{a, b} {
		if got := restoreMem(t, r, snap.Disks[i]); !bytes.Equal(got, d.data) {
			t.Fatalf("disk %s differs after restore", d.name)
		}
	}
	if snap.Stats.ChunksReused == 0 {
		t.Error("duplicate region was not deduplicated")
	}
	// Change one chunk; the second backup stores only it (plus maps).
	a.data[2<<20+5] ^= 0xff
	snap2, err := Run(ctx, r, []source.Disk{a, b}, Options{Name: "vm", Source: "image"})
	if err != nil {
		t.Fatal(err)
	}
	if snap2.Stats.BytesNew > 64<<10+2*256<<10 {
		t.Errorf("second backup stored %d new bytes after one changed byte", snap2.Stats.BytesNew)
	}
	if got := restoreMem(t, r, snap2.Disks[0]); !bytes.Equal(got, a.data) {
		t.Fatal("changed disk differs after restore")
	}
}

type failingDisk struct{ memDisk }

func (f *failingDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off > 1<<20 {
		return os.ErrClosed
	}
	return f.memDisk.ReadAt(ctx, p, off)
}

func TestReadErrorLeavesNoSnapshot(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	d := &failingDisk{memDisk{name: "x", data: bytes.Repeat([]byte{1}, 4<<20)}}
	if _, err := Run(ctx, r, []source.Disk{d}, Options{Name: "vm"}); err == nil {
		t.Fatal("backup succeeded on a failing disk")
	}
	ids, _ := r.SnapshotIDs(ctx)
	if len(ids) != 0 {
		t.Fatalf("%d snapshots written by a failed backup", len(ids))
	}
}

func BenchmarkBackup(b *testing.B) {
	// 256 MiB of compressible data in 1 MiB chunks.
	rng := rand.New(rand.NewPCG(3, 4))
	d := &memDisk{name: "d", data: make([]byte, 256<<20)}
	words := []byte("the quick brown fox jumps over the lazy dog 0123456789 ")
	for i := range d.data {
		d.data[i] = words[rng.IntN(len(words))]
	}
	b.SetBytes(int64(len(d.data)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		be, _ := local.Open(filepath.Join(b.TempDir(), "repo"))
		r, err := repo.Init(context.Background(), be, []byte("pw"), repo.InitOptions{KDF: &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("saltsalt")}})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := Run(context.Background(), r, []source.Disk{d}, Options{Name: "vm"}); err != nil {
			b.Fatal(err)
		}
	}
}

// trackedDisk is a memDisk that knows which 64 KiB granules changed.
type trackedDisk struct {
	memDisk
	dirty map[int64]bool // granule index
	reads atomic.Int64   // ReadAt runs in several workers
}

func (d *trackedDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	d.reads.Add(int64(len(p)))
	return d.memDisk.ReadAt(ctx, p, off)
}

func (d *trackedDisk) Changed(ctx context.Context, off, length int64) ([]source.Extent, error) {
	const g = 64 << 10
	var out []source.Extent
	for p := off; p < off+length; p += g {
		n := min(g, off+length-p)
		out = append(out, source.Extent{Offset: p, Length: n, Zero: !d.dirty[p/g]})
	}
	return out, nil
}

func TestIncrementalReadsOnlyChanges(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	rng := rand.New(rand.NewPCG(5, 6))
	d := &trackedDisk{memDisk: memDisk{name: "vda", data: make([]byte, 8<<20)}}
	fill(rng, d.data[:6<<20])
	full, err := Run(ctx, r, []source.Disk{d}, Options{Name: "vm", Source: "libvirt", Checkpoint: "cp1"})
	if err != nil {
		t.Fatal(err)
	}
	if full.Kind != "full" || full.Checkpoint != "cp1" {
		t.Fatalf("first backup: kind %q checkpoint %q", full.Kind, full.Checkpoint)
	}
	// Change two granules (one of them zeroed) and back up incrementally.
	d.reads.Store(0)
	fill(rng, d.data[1<<20:1<<20+100])
	clear(d.data[5<<20 : 5<<20+64<<10])
	d.dirty = map[int64]bool{(1 << 20) / (64 << 10): true, (5 << 20) / (64 << 10): true}
	inc, err := Run(ctx, r, []source.Disk{d}, Options{Name: "vm", Source: "libvirt", Parent: full, Checkpoint: "cp2"})
	if err != nil {
		t.Fatal(err)
	}
	if inc.Kind != "incremental" || inc.Parent != full.ID || inc.Disks[0].Read != "changed" {
		t.Fatalf("incremental: kind %q parent %q read %q", inc.Kind, inc.Parent, inc.Disks[0].Read)
	}
	if d.reads.Load() > 2*64<<10 {
		t.Fatalf("incremental read %d bytes for two changed chunks", d.reads.Load())
	}
	if got := restoreMem(t, r, inc.Disks[0]); !bytes.Equal(got, d.data) {
		t.Fatal("incremental restore point differs from the disk")
	}
	// The parent is still intact.
	if full.Disks[0].DataBytes != 6<<20 {
		t.Fatalf("full data bytes %d", full.Disks[0].DataBytes)
	}
	// A parent without this disk means a full read, and says so.
	d.reads.Store(0)
	other, err := Run(ctx, r, []source.Disk{&trackedDisk{memDisk: memDisk{name: "vdb", data: d.data}}}, Options{Name: "vm2", Parent: inc})
	if err != nil {
		t.Fatal(err)
	}
	if other.Kind != "full" || other.Disks[0].Read == "changed" {
		t.Fatalf("disk missing from parent: kind %q read %q", other.Kind, other.Disks[0].Read)
	}
}

// ReadGate is asked before every read, for exactly the bytes read, told
// when each read ends, and its error stops the backup without a snapshot.
func TestReadGate(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	rng := rand.New(rand.NewPCG(5, 6))
	a := &memDisk{name: "a", data: make([]byte, 3<<20)}
	fill(rng, a.data[:1<<20])
	fill(rng, a.data[2<<20:])
	var asked, ended atomic.Int64
	gate := func(ctx context.Context, n int) (func(bool), error) {
		asked.Add(int64(n))
		return func(ok bool) {
			if ok {
				ended.Add(int64(n))
			}
		}, nil
	}
	snap, err := Run(ctx, r, []source.Disk{a}, Options{Name: "vm", Source: "image", ReadGate: gate})
	if err != nil {
		t.Fatal(err)
	}
	if asked.Load() != snap.Stats.BytesRead || asked.Load() != 2<<20 || ended.Load() != asked.Load() {
		t.Fatalf("gate asked for %d bytes, told of %d, backup read %d (data is %d)", asked.Load(), ended.Load(), snap.Stats.BytesRead, 2<<20)
	}
	stop := errors.New("throttled away")
	_, err = Run(ctx, r, []source.Disk{a}, Options{Name: "vm2", Source: "image", ReadGate: func(context.Context, int) (func(bool), error) { return nil, stop }})
	if !errors.Is(err, stop) {
		t.Fatalf("a failing limit: %v", err)
	}
	if ss, _ := r.Snapshots(ctx); len(ss) != 1 {
		t.Fatalf("%d snapshots after a stopped backup, want 1", len(ss))
	}
}

// An incremental backup heals: a chunk the repository knows is damaged is
// read again although the VM did not change it, and the parent restores
// again once it is stored.
func TestIncrementalRereadsDamagedChunks(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	rng := rand.New(rand.NewPCG(9, 9))
	d := &trackedDisk{memDisk: memDisk{name: "vda", data: make([]byte, 4<<20)}}
	fill(rng, d.data[:3<<20])
	full, err := Run(ctx, r, []source.Disk{d}, Options{Name: "vm", Source: "libvirt"})
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.LoadMap(ctx, full.Disks[0])
	if err != nil {
		t.Fatal(err)
	}
	pos, id, _ := m.Next(10)
	l, _ := r.Locate(id)
	if err := r.ReportDamage(ctx, id, l.Pack, repo.ErrDamaged); err != nil {
		t.Fatal(err)
	}
	d.reads.Store(0)
	d.dirty = nil // nothing changed in the VM
	inc, err := Run(ctx, r, []source.Disk{d}, Options{Name: "vm", Source: "libvirt", Parent: full})
	if err != nil {
		t.Fatal(err)
	}
	if got := d.reads.Load(); got != 64<<10 || inc.Stats.ChunksNew != 1 {
		t.Fatalf("incremental read %d bytes and stored %d chunks; want the damaged chunk (position %d) read and stored again", got, inc.Stats.ChunksNew, pos)
	}
	if nl, _ := r.Locate(id); nl.Pack == l.Pack || !r.Index().Has(id) {
		t.Fatalf("readers still use the damaged copy in pack %s", l.Pack.Short())
	}
}
