package sourcetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/kura-backup/kura/internal/source"
)

// memDisk is a source.Disk in memory: data extents of 64 KiB granularity
// where any byte is non-zero, the rest zero.
type memDisk struct {
	data   []byte
	closed atomic.Bool
}

func (d *memDisk) Info() source.DiskInfo {
	return source.DiskInfo{Name: "mem", Size: int64(len(d.data)), Format: "raw"}
}

func (d *memDisk) check(off, n int64) error {
	if d.closed.Load() {
		return errors.New("closed")
	}
	if off < 0 || n < 0 || off > int64(len(d.data)) || n > int64(len(d.data))-off {
		return fmt.Errorf("range [%d, +%d) outside the disk", off, n)
	}
	return nil
}

func (d *memDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	copy(p, d.data[off:])
	return nil
}

func (d *memDisk) Extents(ctx context.Context, off, n int64) ([]source.Extent, error) {
	if err := d.check(off, n); err != nil {
		return nil, err
	}
	var exts []source.Extent
	for pos := off; pos < off+n; {
		end := min((pos/65536+1)*65536, off+n)
		zero := !bytes.ContainsFunc(d.data[pos/65536*65536:min((pos/65536+1)*65536, int64(len(d.data)))], func(r rune) bool { return r != 0 })
		if k := len(exts); k > 0 && exts[k-1].Zero == zero {
			exts[k-1].Length += end - pos
		} else {
			exts = append(exts, source.Extent{Offset: pos, Length: end - pos, Zero: zero})
		}
		pos = end
	}
	return exts, nil
}

func (d *memDisk) Close() error {
	d.closed.Store(true)
	return nil
}

func memData() []byte {
	data := make([]byte, 30<<20+1234)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, r := range []span{{0, 100}, {5 << 20, 3 << 20}, {int64(len(data)) - 10, 10}} {
		for i := r.off; i < r.off+r.n; i++ {
			data[i] = byte(1 + rng.IntN(255))
		}
	}
	return data
}

// The suite passes a correct disk, with its content known or not.
func TestDiskSuite(t *testing.T) {
	data := memData()
	t.Run("known content", func(t *testing.T) {
		TestDisk(t, &memDisk{data: data}, BytesReference("mem", "raw", data))
	})
	t.Run("unknown content", func(t *testing.T) {
		TestDisk(t, &memDisk{data: data}, Reference{Size: int64(len(data))})
	})
}

func TestUncovered(t *testing.T) {
	exts := []source.Extent{{Offset: 0, Length: 100, Zero: true}, {Offset: 100, Length: 50}, {Offset: 150, Length: 50, Zero: true}, {Offset: 200, Length: 100}}
	for _, tc := range []struct {
		off, n int64
		gap    int64
		ok     bool
	}{
		{100, 50, 0, false},
		{120, 10, 0, false},
		{99, 10, 99, true},
		{140, 20, 150, true},
		{200, 100, 0, false},
		{250, 100, 300, true},
		{0, 0, 0, false},
	} {
		gap, ok := uncovered(exts, tc.off, tc.n)
		if ok != tc.ok || ok && gap != tc.gap {
			t.Errorf("uncovered(%d, %d) = %d, %v; want %d, %v", tc.off, tc.n, gap, ok, tc.gap, tc.ok)
		}
	}
}

func TestExpandedSize(t *testing.T) {
	ws := []written{{off: 100, n: 10}, {off: 1<<20 - 1, n: 2}, {off: 5 << 20, n: 1}}
	if got, want := expandedSize(ws, 1<<20), int64(3<<20); got != want {
		t.Errorf("expandedSize = %d, want %d", got, want)
	}
}

func TestPattern(t *testing.T) {
	p := Pattern(3, 40)
	if want := "000003000000000\n000003000000001\n00000300"; string(p) != want {
		t.Errorf("Pattern(3, 40) = %q, want %q", p, want)
	}
}
