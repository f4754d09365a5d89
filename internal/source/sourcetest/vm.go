package sourcetest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/source"
)

// KnownDisk is a disk of the harness's VM whose whole content the suite
// knows: the guest has no filesystem on it mounted, and only the suite
// writes to it, through Harness.Write.
type KnownDisk struct {
	// Name and Format are what the disk's Info says in a capture.
	Name   string
	Format string
	// Content is what the disk holds before the suite's first write; its
	// length is the disk's size, at least 8 MiB.
	Content []byte
	// Tracked says the driver can track the disk's changes (a qcow2 disk):
	// an incremental capture must then make it a source.ChangeTracker.
	Tracked bool
	// Idle disks are written only before the first capture: a tracked one
	// must then report no change in incremental captures.
	Idle bool
}

// Harness is a VM driver under test, with a running guest.
type Harness struct {
	VM source.VM
	// Known are the disks whose content the suite controls. Others (the
	// guest's root disk) are checked only for self-consistency.
	Known []KnownDisk
	// Write makes the guest do ws in order, through its own block devices,
	// and returns once the data is on the virtual disks (flushed).
	// GuestWriter makes one for a testvm guest.
	Write func(ctx context.Context, ws []Write) error
	// ScratchDirs are where the driver keeps a capture's temporary files;
	// after End they must hold no more than they did before Capture.
	ScratchDirs []string
	// Method is the capture method of every capture (CaptureOptions.Method).
	Method string
}

// A Write asks the guest to write Pattern(Seed, N) at byte Off of the disk
// called Disk (its DiskInfo.Name). The suite's seeds are small (below
// 100000): the write's number in the run.
type Write struct {
	Disk   string
	Off, N int64
	Seed   int64
}

// Pattern is what a Write writes: the numbers Seed*1e9, Seed*1e9+1, ...
// as lines of 15 zero-padded digits (16 bytes a line), cut to n bytes. It
// differs at every line and has no zero byte, and a guest makes it with
// `seq -f %015.0f FIRST LAST`, with no data to send in.
func Pattern(seed, n int64) []byte {
	p := make([]byte, 0, n+16)
	for i := seed * 1e9; int64(len(p)) < n; i++ {
		p = fmt.Appendf(p, "%015d\n", i)
	}
	return p[:n]
}

// MissingCheckpoint is the Since of the capture that must fall back to a
// full read.
const MissingCheckpoint = "sourcetest-no-such-checkpoint"

// TestVM runs the conformance suite of a VM driver. Five captures, along
// one checkpoint chain, while the guest writes known bytes to the known
// disks (before each capture, and right after it while the capture is
// still open, which must not show in it):
//
//  1. crash mode, no Since: every disk read in full, FreezeWindow and Pause
//     zero, a checkpoint when a disk is tracked; every disk passes TestDisk
//     against the known content at the instant (the root disk against
//     itself); End(true) leaves the scratch directories as they were.
//  2. default mode, Since the first: app or crash with a freeze window to
//     match; tracked disks are ChangeTrackers whose changes cover every
//     range written since the first instant, not much more, and nothing on
//     idle disks; notes say "changed" exactly for them; TestDisk again.
//  3. Full with Since the second: all full; the content right; End(false).
//  4. Since the second again (the failed backup must not have broken it):
//     the changes cover what was written since the second instant,
//     including after the third.
//  5. Since a checkpoint that does not exist: full, the notes say why.
func TestVM(t *testing.T, h Harness) {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Minute)
	defer cancel()
	s := &vmSuite{h: h, known: map[string]*knownState{}}
	for _, k := range h.Known {
		if len(k.Content) < 8<<20 {
			t.Fatalf("known disk %s: %d bytes; the suite needs at least 8 MiB", k.Name, len(k.Content))
		}
		s.known[k.Name] = &knownState{KnownDisk: k, data: bytes.Clone(k.Content)}
	}
	if len(s.known) == 0 || h.Write == nil {
		t.Fatal("the harness needs known disks and a Write function")
	}

	t.Run("name and config", func(t *testing.T) {
		if h.VM.Name() == "" {
			t.Error("Name() is empty")
		}
		typ, data, err := h.VM.Config(ctx)
		if err != nil || typ == "" || data == "" {
			t.Errorf("Config() = %q, %d bytes, %v; want a type and a document", typ, len(data), err)
		}
	})

	s.writeRound(t, ctx, 0)
	var c1, c2 *taken
	if !t.Run("full crash capture", func(t *testing.T) {
		c1 = s.capture(t, ctx, source.CaptureOptions{Mode: source.ModeCrash})
		s.wantRead(t, c1, "full")
		s.writeRound(t, ctx, 1) // after the instant: not in c1
		s.testDisks(t, c1)
		s.end(t, ctx, c1, true)
	}) {
		t.FailNow()
	}
	if !t.Run("incremental capture", func(t *testing.T) {
		c2 = s.capture(t, ctx, source.CaptureOptions{Since: c1.c.Checkpoint()})
		if c2.c.Checkpoint() == c1.c.Checkpoint() && c1.c.Checkpoint() != "" {
			t.Errorf("the second capture reuses checkpoint %q", c1.c.Checkpoint())
		}
		s.wantIncremental(t, ctx, c2, c1)
		s.writeRound(t, ctx, 2)
		s.testDisks(t, c2)
		s.end(t, ctx, c2, true)
	}) {
		t.FailNow()
	}
	t.Run("full capture requested, backup failed", func(t *testing.T) {
		c3 := s.capture(t, ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: c2.c.Checkpoint(), Full: true})
		s.wantRead(t, c3, "full")
		s.writeRound(t, ctx, 3)
		s.sameContent(t, ctx, c3)
		s.end(t, ctx, c3, false)
	})
	t.Run("incremental capture after a failed backup", func(t *testing.T) {
		c4 := s.capture(t, ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: c2.c.Checkpoint()})
		s.wantIncremental(t, ctx, c4, c2)
		s.sameContent(t, ctx, c4)
		s.end(t, ctx, c4, true)
	})
	t.Run("unknown checkpoint", func(t *testing.T) {
		c5 := s.capture(t, ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: MissingCheckpoint})
		s.wantRead(t, c5, "full")
		for _, n := range c5.c.Notes() {
			if k := s.known[n.Disk]; k != nil && k.Tracked && !strings.Contains(n.Reason, MissingCheckpoint) {
				t.Errorf("disk %s: reason %q does not name the missing checkpoint %s", n.Disk, n.Reason, MissingCheckpoint)
			}
		}
		s.sameContent(t, ctx, c5)
		s.end(t, ctx, c5, true)
	})
}

type vmSuite struct {
	h     Harness
	known map[string]*knownState
	seq   int // writes so far
}

type knownState struct {
	KnownDisk
	data   []byte // what the disk holds now
	writes []written
}

// written is a range the suite had the guest write, the seq-th write.
type written struct {
	seq    int
	off, n int64
}

// taken is a capture and what the known disks held at its instant.
type taken struct {
	c       source.Capture
	seq     int               // the writes up to seq are in it
	truth   map[string][]byte // per known disk
	scratch map[string][]string
}

// writeRound makes the guest write round's ranges to the known disks (only
// round 0 to idle disks).
func (s *vmSuite) writeRound(t *testing.T, ctx context.Context, round int) {
	t.Helper()
	var ws []Write
	var total int64
	for _, k := range s.h.Known {
		st := s.known[k.Name]
		if k.Idle && round > 0 {
			continue
		}
		size := int64(len(st.data))
		var spans []span
		switch round {
		case 0:
			spans = []span{{0, 64 << 10}, {1<<20 + 100, 5000}, {size/2 - 4096, 8192}, {size - 3000, 3000}}
		case 1:
			spans = []span{{32 << 10, 64 << 10}, {3<<20 + 7, 100000}}
		case 2:
			spans = []span{{1<<20 + 3000, 10000}, {size - 512, 512}}
		default:
			spans = []span{{2 << 20, 4096}, {size / 2, 70000}}
		}
		for _, sp := range spans {
			s.seq++
			ws = append(ws, Write{Disk: k.Name, Off: sp.off, N: sp.n, Seed: int64(s.seq)})
			copy(st.data[sp.off:], Pattern(int64(s.seq), sp.n))
			st.writes = append(st.writes, written{seq: s.seq, off: sp.off, n: sp.n})
			total += sp.n
		}
	}
	start := time.Now()
	if err := s.h.Write(ctx, ws); err != nil {
		t.Fatalf("the guest writing %d ranges: %v", len(ws), err)
	}
	t.Logf("the guest wrote %d bytes in %d ranges in %s", total, len(ws), time.Since(start).Round(time.Millisecond))
}

// capture takes a capture and checks its shape: disks, notes, checkpoint
// and mode. A capture the test leaves without End is ended (not ok) when
// the test ends.
func (s *vmSuite) capture(t *testing.T, ctx context.Context, opts source.CaptureOptions) *taken {
	t.Helper()
	tk := &taken{seq: s.seq, truth: map[string][]byte{}, scratch: s.listScratch(t)}
	start := time.Now()
	opts.Method = s.h.Method
	c, err := s.h.VM.Capture(ctx, opts)
	if err != nil {
		t.Fatalf("Capture(%+v): %v", opts, err)
	}
	tk.c = c
	t.Cleanup(func() { c.End(context.WithoutCancel(ctx), false) })
	for name, k := range s.known {
		tk.truth[name] = bytes.Clone(k.data)
	}
	t.Logf("Capture(%+v) took %s: mode %s, freeze window %s, pause %s, checkpoint %q",
		opts, time.Since(start).Round(time.Millisecond), c.Mode(), c.FreezeWindow(), c.Pause(), c.Checkpoint())

	names := map[string]bool{}
	for _, d := range c.Disks() {
		info := d.Info()
		if info.Name == "" || names[info.Name] {
			t.Errorf("disk name %q empty or repeated", info.Name)
		}
		names[info.Name] = true
		if k := s.known[info.Name]; k != nil && (info.Format != k.Format || info.Size != int64(len(k.data))) {
			t.Errorf("disk %s: format %q, size %d; want %q, %d", info.Name, info.Format, info.Size, k.Format, len(k.data))
		}
	}
	for name := range s.known {
		if !names[name] {
			t.Errorf("the capture has no disk %s", name)
		}
	}
	notes := map[string]source.DiskNote{}
	for _, n := range c.Notes() {
		if !names[n.Disk] || notes[n.Disk] != (source.DiskNote{}) {
			t.Errorf("note %+v: not one note per disk of the capture", n)
		}
		notes[n.Disk] = n
	}
	for _, d := range c.Disks() {
		name := d.Info().Name
		n, ok := notes[name]
		_, tracks := d.(source.ChangeTracker)
		switch {
		case !ok:
			t.Errorf("disk %s has no note", name)
		case n.Read != "changed" && n.Read != "full":
			t.Errorf("disk %s: note says Read %q; want changed or full", name, n.Read)
		case (n.Read == "changed") != tracks:
			t.Errorf("disk %s: note says Read %q (%s), but implementing ChangeTracker is %v", name, n.Read, n.Reason, tracks)
		case n.Read == "full" && n.Reason == "":
			t.Errorf("disk %s is read in full without a reason", name)
		}
	}
	if c.Checkpoint() == "" && slices.ContainsFunc(s.h.Known, func(k KnownDisk) bool { return k.Tracked }) {
		t.Errorf("no checkpoint, though disks can track changes")
	}

	switch want := opts.Mode; {
	case want != "" && c.Mode() != want:
		t.Errorf("Mode() = %q, want %q", c.Mode(), want)
	case want == "" && c.Mode() != source.ModeApp && c.Mode() != source.ModeCrash:
		t.Errorf("Mode() = %q for the default mode of a running guest; want app or crash", c.Mode())
	}
	switch c.Mode() {
	case source.ModeCrash:
		if c.FreezeWindow() != 0 || c.Pause() != 0 {
			t.Errorf("crash mode: FreezeWindow %s, Pause %s; want zero", c.FreezeWindow(), c.Pause())
		}
	case source.ModeApp:
		if c.FreezeWindow() <= 0 || c.Pause() != 0 {
			t.Errorf("app mode: FreezeWindow %s, Pause %s; want a freeze window and no pause", c.FreezeWindow(), c.Pause())
		}
	}
	return tk
}

// wantRead checks that every disk is read as read says ("full": none is a
// ChangeTracker).
func (s *vmSuite) wantRead(t *testing.T, tk *taken, read string) {
	t.Helper()
	for _, n := range tk.c.Notes() {
		if n.Read != read {
			t.Errorf("disk %s: Read %q (%s), want %s", n.Disk, n.Read, n.Reason, read)
		}
	}
}

// wantIncremental checks the change tracking of tk against base, the
// capture whose checkpoint it is based on.
func (s *vmSuite) wantIncremental(t *testing.T, ctx context.Context, tk, base *taken) {
	t.Helper()
	for _, d := range tk.c.Disks() {
		name := d.Info().Name
		size := d.Info().Size
		k := s.known[name]
		ct, tracks := d.(source.ChangeTracker)
		if k != nil && k.Tracked && !tracks {
			t.Errorf("disk %s can track changes but is read in full: %+v", name, noteOf(tk.c, name))
			continue
		}
		if !tracks {
			continue
		}
		exts, err := ct.Changed(ctx, 0, size)
		if err != nil {
			t.Errorf("disk %s: Changed: %v", name, err)
			continue
		}
		if err := tiling(exts, 0, size); err != nil {
			t.Errorf("disk %s: Changed: %v", name, err)
			continue
		}
		changed := dataBytes(exts)
		if k == nil {
			t.Logf("disk %s: %d of %d bytes changed", name, changed, size)
			if changed > size/2 {
				t.Errorf("disk %s: %d of %d bytes changed", name, changed, size)
			}
			continue
		}
		var since []written
		for _, w := range k.writes {
			if w.seq > base.seq && w.seq <= tk.seq {
				since = append(since, w)
			}
		}
		for _, w := range since {
			if gap, ok := uncovered(exts, w.off, w.n); ok {
				t.Errorf("disk %s: the guest wrote [%d, %d), but Changed calls byte %d unchanged: %v", name, w.off, w.off+w.n, gap, short(exts))
			}
		}
		allowed := expandedSize(since, 1<<20)
		t.Logf("disk %s: %d bytes changed, %d written in %d ranges (allowed %d)", name, changed, writtenSize(since), len(since), allowed)
		if changed > allowed {
			t.Errorf("disk %s: Changed reports %d bytes, but the guest wrote only %d bytes in %d ranges (at most %d when rounded out to 1 MiB)", name, changed, writtenSize(since), len(since), allowed)
		}
		// Unaligned sub-ranges tile too and still show every write.
		for _, w := range since {
			for _, r := range []span{{w.off + 1, w.n - 1}, {w.off - 777, w.n + 1554}, {w.off + w.n/2, 1}} {
				r.off = max(r.off, 0)
				r.n = min(r.n, size-r.off)
				if r.n <= 0 {
					continue
				}
				sub, err := ct.Changed(ctx, r.off, r.n)
				if err != nil {
					t.Errorf("disk %s: Changed(%d, %d): %v", name, r.off, r.n, err)
					continue
				}
				if err := tiling(sub, r.off, r.n); err != nil {
					t.Errorf("disk %s: Changed(%d, %d): %v", name, r.off, r.n, err)
					continue
				}
				lo, hi := max(r.off, w.off), min(r.off+r.n, w.off+w.n)
				if gap, ok := uncovered(sub, lo, hi-lo); hi > lo && ok {
					t.Errorf("disk %s: Changed(%d, %d) calls byte %d unchanged, which the guest wrote", name, r.off, r.n, gap)
				}
			}
		}
		for _, r := range []span{{-1, 10}, {size - 10, 11}, {size + 1, 0}} {
			if _, err := ct.Changed(ctx, r.off, r.n); err == nil {
				t.Errorf("disk %s: Changed(%d, %d) of a %d-byte disk succeeded", name, r.off, r.n, size)
			}
		}
	}
}

func noteOf(c source.Capture, disk string) source.DiskNote {
	for _, n := range c.Notes() {
		if n.Disk == disk {
			return n
		}
	}
	return source.DiskNote{}
}

func dataBytes(exts []source.Extent) int64 {
	var n int64
	for _, e := range exts {
		if !e.Zero {
			n += e.Length
		}
	}
	return n
}

// uncovered returns a byte of [off, off+n) that no non-zero extent covers.
func uncovered(exts []source.Extent, off, n int64) (int64, bool) {
	if n <= 0 {
		return 0, false
	}
	pos := off
	for _, e := range exts {
		if e.Offset+e.Length <= pos {
			continue
		}
		if e.Offset > pos || e.Zero {
			return pos, true
		}
		pos = e.Offset + e.Length
		if pos >= off+n {
			return 0, false
		}
	}
	return pos, pos < off+n
}

func writtenSize(ws []written) int64 {
	var n int64
	for _, w := range ws {
		n += w.n
	}
	return n
}

// expandedSize is the size of the union of ws rounded out to multiples of
// unit.
func expandedSize(ws []written, unit int64) int64 {
	var rs []span
	for _, w := range ws {
		lo := w.off / unit * unit
		hi := (w.off + w.n + unit - 1) / unit * unit
		rs = append(rs, span{lo, hi - lo})
	}
	slices.SortFunc(rs, func(a, b span) int { return int(a.off - b.off) })
	var total, end int64
	for _, r := range rs {
		lo := max(r.off, end)
		if hi := r.off + r.n; hi > lo {
			total += hi - lo
			end = hi
		}
	}
	return total
}

// testDisks runs TestDisk on every disk of tk, known disks against their
// content at the instant. It closes them.
func (s *vmSuite) testDisks(t *testing.T, tk *taken) {
	t.Helper()
	for _, d := range tk.c.Disks() {
		info := d.Info()
		ref := Reference{Size: info.Size}
		if k := s.known[info.Name]; k != nil {
			ref = BytesReference(k.Name, k.Format, tk.truth[k.Name])
		}
		t.Run("disk "+info.Name, func(t *testing.T) { TestDisk(t, d, ref) })
	}
}

// sameContent checks that the known disks of tk hold what they held at its
// instant.
func (s *vmSuite) sameContent(t *testing.T, ctx context.Context, tk *taken) {
	t.Helper()
	for _, d := range tk.c.Disks() {
		want, ok := tk.truth[d.Info().Name]
		if !ok {
			continue
		}
		buf := make([]byte, 4<<20)
		for off := int64(0); off < int64(len(want)); off += int64(len(buf)) {
			p := buf[:min(int64(len(buf)), int64(len(want))-off)]
			if err := d.ReadAt(ctx, p, off); err != nil {
				t.Errorf("disk %s: ReadAt(%d bytes at %d): %v", d.Info().Name, len(p), off, err)
				break
			}
			if i := firstDiff(p, want[off:off+int64(len(p))]); i >= 0 {
				t.Errorf("disk %s: byte %d is %#02x, the guest had written %#02x by the instant", d.Info().Name, off+int64(i), p[i], want[off+int64(i)])
				break
			}
		}
	}
}

// end ends tk and checks that End succeeds, a second End is harmless, the
// disks fail afterwards and the scratch directories hold nothing new.
func (s *vmSuite) end(t *testing.T, ctx context.Context, tk *taken, ok bool) {
	t.Helper()
	start := time.Now()
	err := tk.c.End(ctx, ok)
	if err != nil {
		t.Errorf("End(%v): %v", ok, err)
	}
	t.Logf("End(%v) took %s", ok, time.Since(start).Round(time.Millisecond))
	if err2 := tk.c.End(ctx, ok); err2 != nil && (err == nil || err2.Error() != err.Error()) {
		t.Errorf("second End = %v; want nil or the first call's error (%v)", err2, err)
	}
	for _, d := range tk.c.Disks() {
		if err := d.ReadAt(ctx, make([]byte, 512), 0); err == nil {
			t.Errorf("disk %s: ReadAt after End succeeded", d.Info().Name)
		}
	}
	tk.truth = nil // only the checks above need it
	after := s.listScratch(t)
	for dir, names := range after {
		for _, n := range names {
			if !slices.Contains(tk.scratch[dir], n) {
				t.Errorf("%s still in the scratch directory %s after End", n, dir)
			}
		}
	}
}

func (s *vmSuite) listScratch(t *testing.T) map[string][]string {
	t.Helper()
	m := map[string][]string{}
	for _, dir := range s.h.ScratchDirs {
		es, err := os.ReadDir(dir)
		if err != nil {
			t.Fatalf("listing the scratch directory: %v", err)
		}
		for _, e := range es {
			m[dir] = append(m[dir], e.Name())
		}
	}
	return m
}
