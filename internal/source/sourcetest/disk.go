// Package sourcetest is the conformance suite of the source interfaces:
// TestDisk checks any source.Disk against what it must contain, and TestVM
// checks a source.VM driver (captures, checkpoints, change tracking, notes,
// modes, clean-up) against a running guest that writes known bytes at known
// places. Every source driver (image, libvirt, qmp) runs it from its tests;
// a new driver is done when it passes.
//
// The package is imported only by tests. It uses the testing package and
// fails the test it is given; it knows nothing of the repository.
package sourcetest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/source"
)

// Reference is what a disk must hold.
type Reference struct {
	// Name and Format are what Info must say; "" only asks for a non-empty
	// value.
	Name   string
	Format string
	// Size is the disk's size in bytes.
	Size int64
	// Content reads as the disk must (Size bytes). nil means the content is
	// not known (the root disk of a running guest): then the suite checks
	// only that the disk agrees with itself, reading the same bytes
	// whichever way it is read, and that its zero extents read as zeros.
	Content io.ReaderAt
}

// BytesReference is a Reference whose content is b.
func BytesReference(name, format string, b []byte) Reference {
	return Reference{Name: name, Format: format, Size: int64(len(b)), Content: bytes.NewReader(b)}
}

// TestDisk checks that d honours the source.Disk contract and holds want:
// Info; Extents over the whole disk and over unaligned sub-ranges tile the
// range in order, and zero extents read as zeros; ReadAt at aligned and
// unaligned offsets and lengths, up to the last byte, reads want; reads
// and extents from several goroutines at once agree; ranges outside the
// disk fail; Close succeeds, a second Close is harmless and reads after it
// fail. It closes d.
func TestDisk(t *testing.T, d source.Disk, want Reference) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	t.Cleanup(func() { d.Close() }) // the checks below may stop early

	info := d.Info()
	if info.Size != want.Size || want.Size <= 0 {
		t.Fatalf("Info().Size = %d, want %d", info.Size, want.Size)
	}
	dc := &diskCheck{d: d, size: info.Size, ref: want.Content}
	if dc.ref == nil {
		dc.ref = &chunkReader{d: d, size: info.Size, chunks: map[int64][]byte{}}
		dc.unknown = true
	}

	t.Run("info", func(t *testing.T) {
		if info.Name == "" || want.Name != "" && info.Name != want.Name {
			t.Errorf("Info().Name = %q, want %q", info.Name, or(want.Name, "a name"))
		}
		if info.Format == "" || want.Format != "" && info.Format != want.Format {
			t.Errorf("Info().Format = %q, want %q", info.Format, or(want.Format, "a format"))
		}
	})
	var whole []source.Extent
	t.Run("extents of the whole disk", func(t *testing.T) {
		exts, err := d.Extents(ctx, 0, dc.size)
		if err != nil {
			t.Fatalf("Extents(0, %d): %v", dc.size, err)
		}
		dc.checkTiling(t, "Extents", exts, 0, dc.size)
		zero := dc.checkZeros(t, ctx, exts)
		t.Logf("%d extents, %d of %d bytes zero", len(exts), zero, dc.size)
		whole = exts
	})
	t.Run("extents of sub-ranges", func(t *testing.T) {
		for _, r := range dc.subRanges(whole) {
			exts, err := d.Extents(ctx, r.off, r.n)
			if err != nil {
				t.Fatalf("Extents(%d, %d): %v", r.off, r.n, err)
			}
			dc.checkTiling(t, "Extents", exts, r.off, r.n)
			dc.checkZeros(t, ctx, exts)
		}
	})
	t.Run("reads", func(t *testing.T) {
		rs := dc.readRanges(whole)
		rng := rand.New(rand.NewPCG(uint64(dc.size), 1))
		for range 40 {
			off, n := dc.randomRange(rng, 256<<10)
			rs = append(rs, span{off, n})
		}
		failed := 0
		for _, r := range rs {
			if !dc.checkRead(t, ctx, r.off, r.n) {
				if failed++; failed == 3 {
					t.Fatalf("giving up after %d failed reads", failed)
				}
			}
		}
	})
	if !dc.unknown {
		t.Run("whole disk", func(t *testing.T) {
			// Odd-sized reads, so that most start and end mid-sector.
			const step = 1<<20 - 333
			for off := int64(0); off < dc.size; off += step {
				if !dc.checkRead(t, ctx, off, min(step, dc.size-off)) {
					return
				}
			}
		})
	}
	t.Run("concurrent reads and extents", func(t *testing.T) {
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(dc.size), uint64(w)+100))
				for i := range 25 {
					off, n := dc.randomRange(rng, 512<<10)
					if i%3 == 2 {
						exts, err := d.Extents(ctx, off, n)
						if err != nil {
							t.Errorf("concurrent Extents(%d, %d): %v", off, n, err)
							return
						}
						if err := tiling(exts, off, n); err != nil {
							t.Errorf("concurrent Extents(%d, %d): %v", off, n, err)
						}
						continue
					}
					if !dc.checkRead(t, ctx, off, n) {
						return
					}
				}
			})
		}
		wg.Wait()
	})
	t.Run("out of range", func(t *testing.T) {
		size := dc.size
		for _, r := range []span{{-1, 10}, {size - 10, 11}, {size, 1}, {size + 4096, 1}, {-4096, 1}} {
			if err := d.ReadAt(ctx, make([]byte, r.n), r.off); err == nil {
				t.Errorf("ReadAt(%d bytes at %d) of a %d-byte disk succeeded", r.n, r.off, size)
			}
		}
		for _, r := range []span{{-1, 10}, {size - 10, 11}, {size + 1, 0}, {0, -1}, {0, size + 1}} {
			if _, err := d.Extents(ctx, r.off, r.n); err == nil {
				t.Errorf("Extents(%d, %d) of a %d-byte disk succeeded", r.off, r.n, size)
			}
		}
		for _, off := range []int64{0, size} {
			if err := d.ReadAt(ctx, nil, off); err != nil {
				t.Errorf("ReadAt of 0 bytes at %d: %v", off, err)
			}
			if exts, err := d.Extents(ctx, off, 0); err != nil || len(exts) != 0 {
				t.Errorf("Extents(%d, 0) = %v, %v; want no extents", off, exts, err)
			}
		}
	})
	t.Run("close", func(t *testing.T) {
		err := d.Close()
		if err != nil {
			t.Errorf("Close: %v", err)
		}
		if err2 := d.Close(); err2 != nil && (err == nil || err2.Error() != err.Error()) {
			t.Errorf("second Close = %v; want nil or the first call's error (%v)", err2, err)
		}
		if err := d.ReadAt(ctx, make([]byte, 512), 0); err == nil {
			t.Errorf("ReadAt after Close succeeded")
		}
		if _, err := d.Extents(ctx, 0, min(dc.size, 1<<20)); err == nil {
			t.Errorf("Extents after Close succeeded")
		}
	})
}

func or(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}

// span is a byte range [off, off+n).
type span struct{ off, n int64 }

type diskCheck struct {
	d       source.Disk
	size    int64
	ref     io.ReaderAt // the truth, or the disk read in aligned chunks
	unknown bool        // ref is the disk itself
}

// tiling reports how exts fail to cover [off, off+n) exactly and in order.
func tiling(exts []source.Extent, off, n int64) error {
	pos := off
	for i, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			return fmt.Errorf("extent %d is %+v, want one starting at %d with a positive length (all: %v)", i, e, pos, short(exts))
		}
		pos += e.Length
	}
	if pos != off+n {
		return fmt.Errorf("extents end at %d, want %d (all: %v)", pos, off+n, short(exts))
	}
	return nil
}

// short formats at most a few extents.
func short(exts []source.Extent) string {
	if len(exts) <= 8 {
		return fmt.Sprintf("%+v", exts)
	}
	return fmt.Sprintf("%+v ... %+v (%d extents)", exts[:4], exts[len(exts)-2:], len(exts))
}

func (dc *diskCheck) checkTiling(t *testing.T, what string, exts []source.Extent, off, n int64) {
	t.Helper()
	if err := tiling(exts, off, n); err != nil {
		t.Errorf("%s(%d, %d): %v", what, off, n, err)
	}
}

// checkZeros checks that the zero extents among exts read as zeros: in the
// reference when it is known, else in samples read from the disk. It
// returns how many bytes are zero extents.
func (dc *diskCheck) checkZeros(t *testing.T, ctx context.Context, exts []source.Extent) int64 {
	t.Helper()
	var zero int64
	sampled := 0
	for _, e := range exts {
		if !e.Zero || e.Offset < 0 || e.Length <= 0 || e.Offset+e.Length > dc.size {
			continue
		}
		zero += e.Length
		var parts []span
		if dc.unknown {
			// Start, middle and end of the first 64 zero extents.
			if sampled >= 64 {
				continue
			}
			sampled++
			n := min(e.Length, 64<<10)
			parts = []span{{e.Offset, n}, {e.Offset + (e.Length-n)/2, n}, {e.Offset + e.Length - n, n}}
		} else {
			for off := e.Offset; off < e.Offset+e.Length; off += 4 << 20 {
				parts = append(parts, span{off, min(4<<20, e.Offset+e.Length-off)})
			}
		}
		for _, p := range parts {
			buf := make([]byte, p.n)
			var err error
			if dc.unknown {
				err = dc.d.ReadAt(ctx, buf, p.off)
			} else {
				_, err = dc.ref.ReadAt(buf, p.off)
			}
			if err != nil {
				t.Errorf("reading zero extent %+v at %d: %v", e, p.off, err)
				break
			}
			if i := firstNonZero(buf); i >= 0 {
				t.Errorf("zero extent %+v: byte %d is not zero", e, p.off+int64(i))
				break
			}
		}
	}
	return zero
}

// checkRead reads [off, off+n) from the disk and compares it with the
// reference. It reports whether they agree.
func (dc *diskCheck) checkRead(t *testing.T, ctx context.Context, off, n int64) bool {
	t.Helper()
	got := make([]byte, n)
	if err := dc.d.ReadAt(ctx, got, off); err != nil {
		t.Errorf("ReadAt(%d bytes at %d): %v", n, off, err)
		return false
	}
	want := make([]byte, n)
	if _, err := dc.ref.ReadAt(want, off); err != nil && !(err == io.EOF && off+n == dc.size) {
		t.Errorf("reading the reference (%d bytes at %d): %v", n, off, err)
		return false
	}
	if i := firstDiff(got, want); i >= 0 {
		what := "the reference says"
		if dc.unknown {
			what = "aligned 1 MiB reads of the same disk say"
		}
		t.Errorf("ReadAt(%d bytes at %d): byte %d is %#02x, %s %#02x", n, off, off+int64(i), got[i], what, want[i])
		return false
	}
	return true
}

var zeros = make([]byte, 64<<10)

// firstNonZero is the index of the first non-zero byte of b, or -1.
func firstNonZero(b []byte) int {
	for off := 0; off < len(b); off += len(zeros) {
		part := b[off:min(len(b), off+len(zeros))]
		if bytes.Equal(part, zeros[:len(part)]) {
			continue
		}
		for i, c := range part {
			if c != 0 {
				return off + i
			}
		}
	}
	return -1
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// clip keeps the part of r within the disk, reporting whether any is left.
func (dc *diskCheck) clip(r span) (span, bool) {
	end := min(r.off+r.n, dc.size)
	r.off = max(r.off, 0)
	if r.off >= end {
		return r, false
	}
	return span{r.off, end - r.off}, true
}

// boundaries are up to eight offsets where one extent of whole ends and the
// next begins.
func boundaries(whole []source.Extent) []int64 {
	var b []int64
	for i := 1; i < len(whole) && len(b) < 8; i++ {
		b = append(b, whole[i].Offset)
	}
	return b
}

// subRanges are unaligned ranges for Extents: tiny ones, ones across extent
// boundaries and at the very end.
func (dc *diskCheck) subRanges(whole []source.Extent) []span {
	s := dc.size
	rs := []span{{0, 1}, {1, 1}, {511, 2}, {4095, 8193}, {s/3 + 123, 1<<20 + 77}, {s - 1, 1}, {s - 777, 777}, {s - 1<<20 - 5, 1<<20 + 5}, {0, s - 1}, {1, s - 1}}
	for _, b := range boundaries(whole) {
		rs = append(rs, span{b - 1000, 2001}, span{b - 1, 1}, span{b, 1})
	}
	return dc.clipAll(rs)
}

// readRanges are ranges for ReadAt: aligned and not, single bytes, the last
// partial block, across extent boundaries.
func (dc *diskCheck) readRanges(whole []source.Extent) []span {
	s := dc.size
	rs := []span{
		{0, 4096}, {0, 512}, {0, 1}, {1, 1}, {513, 1000}, {4095, 2}, {4096, 65536},
		{1<<20 - 3, 7}, {1 << 20, 1 << 20}, {s/2 - 12345, 300000},
		{s - 1, 1}, {s - 1000, 1000}, {s - 4096, 4096}, {s - 5000, 5000}, {s - 65536 - 3, 65536 + 3},
		{0, min(s, 8<<20)}, {s - min(s, 3<<20+17), min(s, 3<<20+17)},
	}
	for _, b := range boundaries(whole) {
		rs = append(rs, span{b - 100, 200}, span{b - 4096, 8192}, span{b - 1, 1})
	}
	return dc.clipAll(rs)
}

func (dc *diskCheck) clipAll(rs []span) []span {
	out := rs[:0]
	for _, r := range rs {
		if c, ok := dc.clip(r); ok {
			out = append(out, c)
		}
	}
	return out
}

// randomRange picks a range of at most maxLen bytes. When the content is not
// known it stays within three 8 MiB windows (start, middle, end), so that
// the chunks read as the reference stay few.
func (dc *diskCheck) randomRange(rng *rand.Rand, maxLen int64) (int64, int64) {
	lo, hi := int64(0), dc.size
	if dc.unknown && dc.size > 24<<20 {
		switch rng.IntN(3) {
		case 0:
			hi = 8 << 20
		case 1:
			lo, hi = dc.size/2-4<<20, dc.size/2+4<<20
		default:
			lo = dc.size - 8<<20
		}
	}
	n := 1 + rng.Int64N(min(maxLen, hi-lo))
	off := lo + rng.Int64N(hi-lo-n+1)
	return off, n
}

// chunkReader is the reference of a disk whose content is not known: the
// disk itself, read in aligned 1 MiB chunks (the last one shorter) and kept.
type chunkReader struct {
	d    source.Disk
	size int64

	mu     sync.Mutex
	chunks map[int64][]byte
}

const chunkSize = 1 << 20

func (c *chunkReader) chunk(i int64) ([]byte, error) {
	c.mu.Lock()
	b, ok := c.chunks[i]
	c.mu.Unlock()
	if ok {
		return b, nil
	}
	b = make([]byte, min(chunkSize, c.size-i*chunkSize))
	if err := c.d.ReadAt(context.Background(), b, i*chunkSize); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.chunks[i] = b
	c.mu.Unlock()
	return b, nil
}

func (c *chunkReader) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		if pos >= c.size {
			return n, io.EOF
		}
		b, err := c.chunk(pos / chunkSize)
		if err != nil {
			return n, err
		}
		n += copy(p[n:], b[pos%chunkSize:])
	}
	return n, nil
}
