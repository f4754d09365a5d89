package backup

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sort"
	"sync/atomic"
	"testing"

	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
)

// sparseDisk is a huge disk with a few pieces of data, tracking changes
// like QEMU's dirty bitmap: it never holds its virtual size in memory.
type sparseDisk struct {
	size   int64
	pieces map[int64][]byte // offset -> data, not overlapping
	dirty  []source.Extent  // changed since the last backup, increasing
	reads  atomic.Int64
}

func (d *sparseDisk) Info() source.DiskInfo {
	return source.DiskInfo{Name: "vda", Size: d.size, Format: "raw"}
}

func (d *sparseDisk) sorted() []int64 {
	offs := make([]int64, 0, len(d.pieces))
	for o := range d.pieces {
		offs = append(offs, o)
	}
	sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
	return offs
}

// cover describes [off, off+length) as the given ranges and holes around them.
func cover(off, length int64, ranges []source.Extent) []source.Extent {
	var out []source.Extent
	pos, end := off, off+length
	for _, r := range ranges {
		a, b := max(r.Offset, pos), min(r.Offset+r.Length, end)
		if a >= b {
			continue
		}
		if a > pos {
			out = append(out, source.Extent{Offset: pos, Length: a - pos, Zero: true})
		}
		out = append(out, source.Extent{Offset: a, Length: b - a})
		pos = b
	}
	if pos < end {
		out = append(out, source.Extent{Offset: pos, Length: end - pos, Zero: true})
	}
	return out
}

func (d *sparseDisk) Extents(ctx context.Context, off, length int64) ([]source.Extent, error) {
	var data []source.Extent
	for _, o := range d.sorted() {
		data = append(data, source.Extent{Offset: o, Length: int64(len(d.pieces[o]))})
	}
	return cover(off, length, data), nil
}

func (d *sparseDisk) Changed(ctx context.Context, off, length int64) ([]source.Extent, error) {
	return cover(off, length, d.dirty), nil
}

func (d *sparseDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	d.reads.Add(int64(len(p)))
	clear(p)
	for o, b := range d.pieces {
		a, e := max(o, off), min(o+int64(len(b)), off+int64(len(p)))
		if a < e {
			copy(p[a-off:e-off], b[a-o:e-o])
		}
	}
	return nil
}

func (d *sparseDisk) Close() error { return nil }

// write puts b at off and marks it changed.
func (d *sparseDisk) write(off int64, b []byte) {
	d.pieces[off] = b
	d.dirty = append(d.dirty, source.Extent{Offset: off, Length: int64(len(b))})
	sort.Slice(d.dirty, func(i, j int) bool { return d.dirty[i].Offset < d.dirty[j].Offset })
}

// checkSparse compares a restore point's disk with d chunk by chunk at
// every position d has data in, and checks that no other position has.
func checkSparse(t *testing.T, r *repo.Repo, rd repo.Disk, d *sparseDisk) {
	t.Helper()
	ctx := context.Background()
	m, err := r.LoadMap(ctx, rd)
	if err != nil {
		t.Fatal(err)
	}
	cs := int64(rd.ChunkSize)
	want := map[int64]bool{}
	for o, b := range d.pieces {
		for pos := o / cs; pos*cs < o+int64(len(b)); pos++ {
			want[pos] = true
		}
	}
	if m.DataChunks() != int64(len(want)) || rd.DataChunks != int64(len(want)) {
		t.Fatalf("map holds %d data chunks (manifest %d), the disk %d", m.DataChunks(), rd.DataChunks, len(want))
	}
	chunk := make([]byte, cs)
	for pos := range want {
		c := chunk[:min(cs, rd.Size-pos*cs)]
		_ = d.ReadAt(ctx, c, pos*cs)
		id := m.Get(pos)
		if id.IsZero() {
			t.Fatalf("position %d holds data but the map says zeros", pos)
		}
		got, err := r.LoadBlob(ctx, id, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, c) {
			t.Fatalf("position %d differs", pos)
		}
	}
}

// An incremental backup of a 1 TiB disk with a few MiB of data takes the
// unchanged chunks from its parent, reads only what changed, drops
// trimmed chunks, and keeps its maps as small as its data.
func TestSparseIncremental(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	rng := rand.New(rand.NewPCG(8, 9))
	d := &sparseDisk{size: 1<<40 + 777, pieces: map[int64][]byte{}}
	piece := func(n int) []byte {
		b := make([]byte, n)
		fill(rng, b)
		return b
	}
	for i := 0; i < 30; i++ {
		off := int64(i)<<35 + rng.Int64N(1<<30) // 32 GiB apart
		d.pieces[off] = piece(1 + rng.IntN(300<<10))
	}
	d.pieces[d.size-500] = piece(500) // the short last chunk
	full, err := Run(ctx, r, []source.Disk{d}, Options{Name: "vm", Source: "libvirt", Checkpoint: "cp1"})
	if err != nil {
		t.Fatal(err)
	}
	checkSparse(t, r, full.Disks[0], d)
	if n := len(full.Disks[0].Maps); n != 1 {
		t.Fatalf("%d map blobs for %d data chunks", n, full.Disks[0].DataChunks)
	}

	// Rewrite one piece, add one, trim one.
	offs := d.sorted()
	d.dirty = nil
	d.reads.Store(0)
	d.write(offs[3], piece(len(d.pieces[offs[3]])))
	d.write(5<<30+123, piece(70<<10))
	trimmed := source.Extent{Offset: offs[10], Length: int64(len(d.pieces[offs[10]]))}
	delete(d.pieces, offs[10])
	d.dirty = append(d.dirty, trimmed)
	sort.Slice(d.dirty, func(i, j int) bool { return d.dirty[i].Offset < d.dirty[j].Offset })

	inc, err := Run(ctx, r, []source.Disk{d}, Options{Name: "vm", Source: "libvirt", Parent: full, Checkpoint: "cp2"})
	if err != nil {
		t.Fatal(err)
	}
	if inc.Kind != "incremental" || inc.Disks[0].Read != "changed" {
		t.Fatalf("kind %q read %q", inc.Kind, inc.Disks[0].Read)
	}
	if max := int64(len(d.pieces[offs[3]]) + 70<<10 + 4*64<<10); d.reads.Load() > max {
		t.Fatalf("incremental read %d bytes, changes are at most %d", d.reads.Load(), max)
	}
	checkSparse(t, r, inc.Disks[0], d)
	// The parent is unchanged.
	if pm, err := r.LoadMap(ctx, full.Disks[0]); err != nil || pm.DataChunks() != full.Disks[0].DataChunks {
		t.Fatalf("parent map: %v", err)
	}
}

func TestEachSkipsHoles(t *testing.T) {
	const cs = 100
	for _, tc := range []struct {
		name string
		read []posRange
		data []source.Extent
		want []int64
	}{
		{"nothing to read", nil, []source.Extent{{Offset: 0, Length: 1000}}, nil},
		{"no data", []posRange{{0, 10}}, nil, nil},
		{"data in part of a range", []posRange{{0, 1 << 30}}, []source.Extent{{Offset: 250, Length: 100}, {Offset: 1 << 41, Length: 1}}, []int64{2, 3}},
		{"range without data between", []posRange{{0, 2}, {5, 7}, {9, 12}}, []source.Extent{{Offset: 150, Length: 800}}, []int64{1, 5, 6, 9}},
		{"data beyond the ranges", []posRange{{4, 5}}, []source.Extent{{Offset: 0, Length: 100}, {Offset: 900, Length: 50}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &diskPlan{read: tc.read, data: tc.data}
			var got []int64
			p.each(cs, 1<<50, func(pos int64, ranges []source.Extent) bool {
				if len(ranges) == 0 {
					t.Fatalf("position %d without data", pos)
				}
				got = append(got, pos)
				return true
			})
			if len(got) != len(tc.want) {
				t.Fatalf("positions %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("positions %v, want %v", got, tc.want)
				}
			}
		})
	}
}
