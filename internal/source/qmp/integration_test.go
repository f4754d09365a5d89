package qmp

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/testvm"
	"golang.org/x/sys/unix"
)

// TestMain lets the test binary serve as the thaw watchdog of app mode,
// which guest.StartWatchdog runs as os.Executable().
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == guest.WatchdogArg {
		os.Exit(guest.WatchdogMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}

func needQEMU(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a guest (tens of seconds); runs without -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("boots a guest: needs root")
	}
	for _, p := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("boots a guest: %s not installed (apt-get install qemu-system-x86 qemu-utils)", p)
		}
	}
}

// TestCaptureChain boots one guest (root qcow2, an ext4 data disk in qcow2
// and a raw disk) and takes captures in every mode along one checkpoint
// chain, checking each against what QEMU exports and against the previous
// capture plus the changes the bitmap reports.
func TestCaptureChain(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	tmp := t.TempDir()

	rawPath := filepath.Join(tmp, "raw.img")
	rawData := make([]byte, 8<<20)
	rand.Read(rawData[:1<<20])
	copy(rawData[5<<20:], rawData[:1<<20])
	if err := os.WriteFile(rawPath, rawData, 0o644); err != nil {
		t.Fatal(err)
	}

	if err := os.MkdirAll(filepath.Join(tmp, "guest"), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	g, err := testvm.StartQEMU(ctx, testvm.Options{
		Dir:       filepath.Join(tmp, "guest"),
		MemoryMiB: 768,
		Disks: []testvm.DiskSpec{
			{FS: "ext4", Mount: "/data", SizeMiB: 256},
			{Source: rawPath, Format: "raw"},
		},
	})
	if err != nil {
		t.Fatalf("StartQEMU: %v", err)
	}
	defer func() {
		if err := g.Destroy(context.Background()); err != nil {
			t.Error(err)
		}
	}()
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest %s (%s) answers after %s", g.Name, g.Accel, time.Since(start).Round(time.Millisecond))
	workload(t, ctx, g, "/data/a", 8, 1)

	v, err := Open(ctx, g.QMPSocket, "")
	if err != nil {
		t.Fatal(err)
	}
	if v.Name() != g.Name {
		t.Errorf("VM name %q, want %q (from -name)", v.Name(), g.Name)
	}
	typ, cfg, err := v.Config(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if typ != ConfigType || !strings.Contains(cfg, `"cmdline"`) || !strings.Contains(cfg, "qemu-system-x86_64") || !strings.Contains(cfg, `"query-named-block-nodes"`) {
		t.Errorf("Config: type %q, document lacks the command line or block nodes:\n%.600s", typ, cfg)
	}

	size := map[string]int64{}

	// 1. Crash-consistent full capture: the bytes equal what QEMU's export
	// gives a standard client (nbdcopy) at the same instant.
	step := time.Now()
	c1 := capture1(t, ctx, v, source.CaptureOptions{Mode: source.ModeCrash}, source.ModeCrash)
	wantNotes(t, c1, map[string]string{"vda": "full:no checkpoint", "vdb": "full:no checkpoint", "vdc": "full:raw image: no persistent dirty bitmap"})
	img1 := map[string]string{}
	for _, d := range c1.Disks() {
		name := d.Info().Name
		size[name] = d.Info().Size
		img1[name] = filepath.Join(tmp, "c1-"+name+".raw")
		readDisk(t, ctx, d, img1[name])
		ref := filepath.Join(tmp, "c1-"+name+".nbdcopy")
		nbdcopy(t, ctx, c1.(*capture).nbdSocket, name, ref)
		sameFile(t, img1[name], ref)
		os.Remove(ref)
		if _, ok := d.(source.ChangeTracker); ok {
			t.Errorf("disk %s of a full capture implements ChangeTracker", name)
		}
	}
	if got, _ := os.ReadFile(img1["vdc"]); !bytes.Equal(got, rawData) {
		t.Error("raw disk vdc: the capture differs from the file")
	}
	endCapture(t, ctx, c1, true)
	st := checkClean(t, ctx, g.QMPSocket)
	wantBitmaps(t, st, map[string][]string{"vda": {"kura-" + c1.Checkpoint()}, "vdb": {"kura-" + c1.Checkpoint()}})
	t.Logf("crash full capture: %s", time.Since(step).Round(time.Millisecond))

	// 2. App-consistent incremental: the guest's filesystems are frozen
	// around the instant, the data disk's copy is clean and holds the
	// files just written; the previous capture plus the changed ranges is
	// the new capture.
	workload(t, ctx, g, "/data/b", 16, 2)
	releaseAgent(g)
	step = time.Now()
	c2 := capture1(t, ctx, v, source.CaptureOptions{Since: c1.Checkpoint()}, source.ModeApp)
	if c2.FreezeWindow() <= 0 {
		t.Errorf("app capture: freeze window %s", c2.FreezeWindow())
	}
	wantNotes(t, c2, map[string]string{"vda": "changed:", "vdb": "changed:", "vdc": "full:raw image: no persistent dirty bitmap"})
	img2 := map[string]string{}
	for _, d := range c2.Disks() {
		name := d.Info().Name
		img2[name] = filepath.Join(tmp, "c2-"+name+".raw")
		readDisk(t, ctx, d, img2[name])
		if name == "vdc" {
			continue
		}
		ref := filepath.Join(tmp, "c2-"+name+".nbdcopy")
		nbdcopy(t, ctx, c2.(*capture).nbdSocket, name, ref)
		sameFile(t, img2[name], ref)
		os.Remove(ref)
		changed := applyChanges(t, ctx, d, img1[name], filepath.Join(tmp, "c2-"+name+".incr"))
		t.Logf("app incremental: %s changed %d KiB of %d MiB", name, changed>>10, size[name]>>20)
		if name == "vdb" && changed < 16<<20 {
			t.Errorf("vdb: %d bytes changed, but the guest wrote 16 MiB of files", changed)
		}
		if changed > size[name]/4 {
			t.Errorf("%s: %d of %d bytes reported changed", name, changed, size[name])
		}
	}
	fsckClean(t, ctx, img2["vdb"])
	verifyFiles(t, ctx, img2["vdb"], "/b", tmp)
	endCapture(t, ctx, c2, true)
	st = checkClean(t, ctx, g.QMPSocket)
	wantBitmaps(t, st, map[string][]string{"vda": {"kura-" + c2.Checkpoint()}, "vdb": {"kura-" + c2.Checkpoint()}})
	t.Logf("app incremental capture: %s (freeze window %s)", time.Since(step).Round(time.Millisecond), c2.FreezeWindow())

	// 3. Suspend mode, incremental on c2, and the backup fails: the base
	// bitmap must again record everything since c2.
	workload(t, ctx, g, "/data/c", 4, 3)
	step = time.Now()
	c3 := capture1(t, ctx, v, source.CaptureOptions{Mode: source.ModeSuspend, Since: c2.Checkpoint()}, source.ModeSuspend)
	if c3.Pause() <= 0 || c3.Pause() > 10*time.Second {
		t.Errorf("suspend capture: pause %s", c3.Pause())
	}
	for _, d := range c3.Disks() {
		if name := d.Info().Name; name == "vdb" {
			img3 := filepath.Join(tmp, "c3-vdb.raw")
			readDisk(t, ctx, d, img3)
			applyChanges(t, ctx, d, img2[name], filepath.Join(tmp, "c3-vdb.incr"))
		}
	}
	endCapture(t, ctx, c3, false)
	st = checkClean(t, ctx, g.QMPSocket)
	wantBitmaps(t, st, map[string][]string{"vda": {"kura-" + c2.Checkpoint()}, "vdb": {"kura-" + c2.Checkpoint()}})
	for _, bm := range st.bitmaps["vdb"] {
		if !bm.Recording || bm.Count < 4<<20 {
			t.Errorf("after a failed backup, bitmap %s: recording %v, %d bytes dirty; want recording and the 4 MiB written before the capture", bm.Name, bm.Recording, bm.Count)
		}
	}
	t.Logf("suspend incremental capture, ended as failed: %s (pause %s)", time.Since(step).Round(time.Millisecond), c3.Pause())

	// 4. The next capture from c2 sees the changes of both intervals.
	workload(t, ctx, g, "/data/d", 4, 4)
	step = time.Now()
	c4 := capture1(t, ctx, v, source.CaptureOptions{Mode: source.ModeCrash, Since: c2.Checkpoint()}, source.ModeCrash)
	for _, d := range c4.Disks() {
		name := d.Info().Name
		if name == "vdc" {
			continue
		}
		img4 := filepath.Join(tmp, "c4-"+name+".raw")
		readDisk(t, ctx, d, img4)
		changed := applyChanges(t, ctx, d, img2[name], filepath.Join(tmp, "c4-"+name+".incr"))
		if name == "vdb" && changed < 8<<20 {
			t.Errorf("vdb: %d bytes changed since c2, but the guest wrote 8 MiB of files since", changed)
		}
		os.Remove(img4)
	}
	endCapture(t, ctx, c4, true)
	st = checkClean(t, ctx, g.QMPSocket)
	wantBitmaps(t, st, map[string][]string{"vda": {"kura-" + c4.Checkpoint()}, "vdb": {"kura-" + c4.Checkpoint()}})
	t.Logf("crash incremental capture after a failed one: %s", time.Since(step).Round(time.Millisecond))

	// 5. A checkpoint QEMU does not have: full read, with a note.
	c5 := capture1(t, ctx, v, source.CaptureOptions{Mode: source.ModeCrash, Since: "20000101T000000Z-000000"}, source.ModeCrash)
	for _, n := range c5.Notes() {
		if n.Read != "full" || (n.Disk != "vdc" && !strings.Contains(n.Reason, "missing")) {
			t.Errorf("note for a missing checkpoint: %+v", n)
		}
	}
	for _, d := range c5.Disks() {
		if _, ok := d.(source.ChangeTracker); ok {
			t.Errorf("disk %s implements ChangeTracker though its checkpoint is missing", d.Info().Name)
		}
	}
	endCapture(t, ctx, c5, false)
	st = checkClean(t, ctx, g.QMPSocket)
	wantBitmaps(t, st, map[string][]string{"vda": {"kura-" + c4.Checkpoint()}, "vdb": {"kura-" + c4.Checkpoint()}})

	// 6. Shutdown mode is libvirt's.
	if _, err := v.Capture(ctx, source.CaptureOptions{Mode: source.ModeShutdown}); !errors.Is(err, ErrShutdownMode) {
		t.Errorf("shutdown mode: %v, want ErrShutdownMode", err)
	}

	// 7. A capture that kura abandons (it died): the next one cleans up.
	c6, err := v.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: c4.Checkpoint()})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range c6.Disks() {
		d.Close()
	}
	c6.(*capture).c.Close() // kura is gone; QEMU keeps the jobs, nodes and exports
	os.RemoveAll(c6.(*capture).dir)
	c7 := capture1(t, ctx, v, source.CaptureOptions{Mode: source.ModeCrash, Since: c4.Checkpoint()}, source.ModeCrash)
	wantNotes(t, c7, map[string]string{"vda": "changed:", "vdb": "changed:", "vdc": "full:raw image: no persistent dirty bitmap"})
	endCapture(t, ctx, c7, true)
	st = checkClean(t, ctx, g.QMPSocket)
	wantBitmaps(t, st, map[string][]string{"vda": {"kura-" + c7.Checkpoint()}, "vdb": {"kura-" + c7.Checkpoint()}})

	// 8. The scratch directory fills up while the guest overwrites data:
	// QEMU pauses the VM, the capture ends early and resumes it, and its
	// reads and End say why.
	tiny := filepath.Join(tmp, "tiny")
	os.MkdirAll(tiny, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", tiny).CombinedOutput(); err != nil {
		t.Logf("cannot mount a small tmpfs, not testing a full scratch directory: %v: %s", err, out)
	} else {
		defer exec.Command("umount", tiny).Run()
		vt, err := OpenWith(ctx, g.QMPSocket, "", Options{ScratchDir: tiny})
		if err != nil {
			t.Fatal(err)
		}
		cf := capture1(t, ctx, vt, source.CaptureOptions{Mode: source.ModeCrash, Since: c7.Checkpoint()}, source.ModeCrash)
		step = time.Now()
		r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", "for f in /data/a/w1-*.bin; do dd if=/dev/urandom of=$f bs=1M count=1 conv=notrunc oflag=direct 2>&1 || exit 1; done")
		if err != nil || r.ExitCode != 0 {
			t.Errorf("guest writes while the scratch directory was full: %v, exit %d: %s", err, r.ExitCode, r.Stdout)
		}
		t.Logf("8 MiB overwritten in the guest with 3 MiB of scratch space in %s", time.Since(step).Round(time.Millisecond))
		buf := make([]byte, 64<<10)
		if err := diskNamed(t, cf, "vdb").ReadAt(ctx, buf, 0); !errors.Is(err, ErrScratchFull) {
			t.Errorf("read after the scratch directory filled up: %v, want ErrScratchFull", err)
		}
		err = cf.End(ctx, false)
		if !errors.Is(err, ErrScratchFull) {
			t.Errorf("End after the scratch directory filled up: %v, want ErrScratchFull", err)
		}
		t.Logf("End: %v", err)
		st = checkClean(t, ctx, g.QMPSocket)
		wantBitmaps(t, st, map[string][]string{"vda": {"kura-" + c7.Checkpoint()}, "vdb": {"kura-" + c7.Checkpoint()}})
		if out, code, err := g.Exec(ctx, "/usr/local/bin/kura-workload", "verify", "/data/b"); err != nil || code != 0 {
			t.Errorf("guest after the scratch directory filled up: %v, exit %d: %s", err, code, out)
		}
	}

	// 9. The VM exits in the middle of a backup: reads fail saying so and
	// End returns promptly.
	c8 := capture1(t, ctx, v, source.CaptureOptions{Mode: source.ModeCrash, Since: c7.Checkpoint()}, source.ModeCrash)
	if err := syscall.Kill(g.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d := c8.Disks()[1]
	buf := make([]byte, 1<<20)
	var rerr error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if rerr = d.ReadAt(ctx, buf, 0); rerr != nil {
			break
		}
	}
	if rerr == nil {
		t.Error("reading from a VM that was killed succeeded")
	} else {
		t.Logf("read after the VM was killed: %v", rerr)
	}
	endStart := time.Now()
	err = c8.End(ctx, false)
	if err == nil || !strings.Contains(err.Error(), "QEMU is gone") {
		t.Errorf("End after the VM exited: %v, want an error saying QEMU is gone", err)
	}
	if took := time.Since(endStart); took > 5*time.Second {
		t.Errorf("End after the VM exited took %s", took)
	}
	if _, err := os.Stat(c8.(*capture).dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("scratch directory %s left behind: %v", c8.(*capture).dir, err)
	}
}

// capture1 captures and checks the mode, and that every data disk is there.
func capture1(t *testing.T, ctx context.Context, v source.VM, o source.CaptureOptions, mode string) source.Capture {
	t.Helper()
	c, err := v.Capture(ctx, o)
	if err != nil {
		t.Fatalf("Capture(%+v): %v", o, err)
	}
	if c.Mode() != mode {
		t.Errorf("Capture(%+v): mode %q, want %q", o, c.Mode(), mode)
	}
	if c.Checkpoint() == "" || c.Checkpoint() == o.Since {
		t.Errorf("Capture(%+v): checkpoint %q", o, c.Checkpoint())
	}
	var names []string
	for _, d := range c.Disks() {
		names = append(names, d.Info().Name)
	}
	if strings.Join(names, ",") != "vda,vdb,vdc" {
		t.Errorf("disks %v, want vda, vdb, vdc", names)
	}
	return c
}

func endCapture(t *testing.T, ctx context.Context, c source.Capture, ok bool) {
	t.Helper()
	if err := c.End(ctx, ok); err != nil {
		t.Fatalf("End(%v): %v", ok, err)
	}
	if err := c.End(ctx, ok); err != nil {
		t.Errorf("second End: %v", err)
	}
}

func wantNotes(t *testing.T, c source.Capture, want map[string]string) {
	t.Helper()
	got := map[string]string{}
	for _, n := range c.Notes() {
		got[n.Disk] = n.Read + ":" + n.Reason
	}
	for disk, w := range want {
		if got[disk] != w {
			t.Errorf("note for %s: %q, want %q", disk, got[disk], w)
		}
	}
}

// workload writes n files of 1 MiB into dir in the guest.
func workload(t *testing.T, ctx context.Context, g *testvm.Guest, dir string, n, seed int) {
	t.Helper()
	out, code, err := g.Exec(ctx, "/usr/local/bin/kura-workload", "write", dir, fmt.Sprint(n), fmt.Sprint(seed))
	if err != nil || code != 0 {
		t.Fatalf("kura-workload write %s: exit %d, %v: %s", dir, code, err, out)
	}
}

// releaseAgent makes testvm drop its connection to the agent socket, which
// QEMU serves to one client at a time, so that the capture's freezer can
// connect. testvm reconnects by itself on its next command.
func releaseAgent(g *testvm.Guest) {
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	g.Agent(ctx, "guest-ping", nil, nil)
}

// readDisk copies the disk into a sparse raw file the way a backup reads
// it: data extents only.
func readDisk(t *testing.T, ctx context.Context, d source.Disk, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size := d.Info().Size
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	es, err := d.Extents(ctx, 0, size)
	if err != nil {
		t.Fatalf("Extents of %s: %v", d.Info().Name, err)
	}
	var pos int64
	buf := make([]byte, 4<<20)
	for _, e := range es {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extents of %s do not cover the disk: %+v at %d", d.Info().Name, e, pos)
		}
		pos += e.Length
		if e.Zero {
			continue
		}
		for off := e.Offset; off < e.Offset+e.Length; {
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			if err := d.ReadAt(ctx, buf[:n], off); err != nil {
				t.Fatalf("ReadAt %s: %v", d.Info().Name, err)
			}
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
			off += n
		}
	}
	if pos != size {
		t.Fatalf("extents of %s end at %d, disk is %d bytes", d.Info().Name, pos, size)
	}
}

// applyChanges writes base plus the ranges Changed reports, read from the
// capture, to out, checks that out equals the full copy of the capture
// (out's name with .raw for .incr) and returns how many bytes changed.
func applyChanges(t *testing.T, ctx context.Context, d source.Disk, base, out string) int64 {
	t.Helper()
	ct, ok := d.(source.ChangeTracker)
	if !ok {
		t.Fatalf("disk %s of an incremental capture does not implement ChangeTracker", d.Info().Name)
	}
	cmd := exec.CommandContext(ctx, "cp", "--sparse=always", base, out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, b)
	}
	f, err := os.OpenFile(out, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	es, err := ct.Changed(ctx, 0, d.Info().Size)
	if err != nil {
		t.Fatalf("Changed of %s: %v", d.Info().Name, err)
	}
	var changed, pos int64
	buf := make([]byte, 4<<20)
	for _, e := range es {
		if e.Offset != pos {
			t.Fatalf("changes of %s do not cover the disk: %+v at %d", d.Info().Name, e, pos)
		}
		pos += e.Length
		if e.Zero {
			continue
		}
		changed += e.Length
		for off := e.Offset; off < e.Offset+e.Length; {
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			if err := d.ReadAt(ctx, buf[:n], off); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
			off += n
		}
	}
	if pos != d.Info().Size {
		t.Fatalf("changes of %s end at %d of %d", d.Info().Name, pos, d.Info().Size)
	}
	full := strings.TrimSuffix(out, ".incr") + ".raw"
	sameFile(t, out, full)
	os.Remove(out)
	return changed
}

func nbdcopy(t *testing.T, ctx context.Context, socket, export, out string) {
	t.Helper()
	if _, err := exec.LookPath("nbdcopy"); err != nil {
		t.Log("nbdcopy not installed (apt-get install libnbd-bin): not comparing with it")
		return
	}
	uri := fmt.Sprintf("nbd+unix:///%s?socket=%s", export, socket)
	if b, err := exec.CommandContext(ctx, "nbdcopy", uri, out).CombinedOutput(); err != nil {
		t.Fatalf("nbdcopy %s: %v: %s", uri, err, b)
	}
}

// sameFile fails unless files a and b have the same size and bytes. Ranges
// that are holes in both are equal without reading them.
func sameFile(t *testing.T, a, b string) {
	t.Helper()
	if _, err := os.Stat(b); errors.Is(err, os.ErrNotExist) {
		return // reference not made (tool missing)
	}
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	sa, _ := fa.Stat()
	sb, _ := fb.Stat()
	if sa.Size() != sb.Size() {
		t.Fatalf("%s is %d bytes, %s %d", a, sa.Size(), b, sb.Size())
	}
	ranges := append(dataRanges(t, fa, sa.Size()), dataRanges(t, fb, sb.Size())...)
	sort.Slice(ranges, func(i, j int) bool { return ranges[i][0] < ranges[j][0] })
	ba, bb := make([]byte, 4<<20), make([]byte, 4<<20)
	var done int64 // compared up to here
	for _, r := range ranges {
		for off := max(r[0], done); off < r[1]; {
			n := min(int64(len(ba)), r[1]-off)
			if _, err := fa.ReadAt(ba[:n], off); err != nil {
				t.Fatal(err)
			}
			if _, err := fb.ReadAt(bb[:n], off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ba[:n], bb[:n]) {
				for i := range n {
					if ba[i] != bb[i] {
						t.Fatalf("%s and %s differ at byte %d", a, b, off+i)
					}
				}
			}
			off += n
		}
		done = max(done, r[1])
	}
}

// dataRanges lists the data regions of f (SEEK_DATA and SEEK_HOLE).
func dataRanges(t *testing.T, f *os.File, size int64) [][2]int64 {
	t.Helper()
	var out [][2]int64
	for pos := int64(0); pos < size; {
		start, err := f.Seek(pos, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break
			}
			t.Fatal(err)
		}
		end, err := f.Seek(start, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, [2]int64{start, end})
		pos = end
	}
	return out
}

func fsckClean(t *testing.T, ctx context.Context, img string) {
	t.Helper()
	out, err := exec.CommandContext(ctx, "fsck.ext4", "-fn", img).CombinedOutput()
	if err != nil {
		t.Errorf("fsck.ext4 -fn of the captured data disk: %v\n%s", err, out)
	}
}

// verifyFiles extracts dir from the ext4 image with debugfs and checks the
// files against the manifest kura-workload wrote.
func verifyFiles(t *testing.T, ctx context.Context, img, dir, tmp string) {
	t.Helper()
	if _, err := exec.LookPath("debugfs"); err != nil {
		return
	}
	out := filepath.Join(tmp, "rdump")
	os.RemoveAll(out)
	os.MkdirAll(out, 0o755)
	defer os.RemoveAll(out)
	if b, err := exec.CommandContext(ctx, "debugfs", "-R", "rdump "+dir+" "+out, img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs rdump: %v: %s", err, b)
	}
	cmd := exec.CommandContext(ctx, "sha256sum", "--quiet", "-c", "MANIFEST.sha256")
	cmd.Dir = filepath.Join(out, filepath.Base(dir))
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("files in the captured data disk do not match their manifest: %v\n%s", err, b)
	}
}

// qemuState is what a capture could leave behind in QEMU.
type qemuState struct {
	bitmaps map[string][]dirtyBitmapInfo // kura bitmaps by node
}

// checkClean fails unless QEMU has no block jobs, no exports and no kura
// nodes, and returns the kura bitmaps.
func checkClean(t *testing.T, ctx context.Context, socket string) qemuState {
	t.Helper()
	c, err := Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var jobs []any
	if err := c.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil || len(jobs) != 0 {
		t.Errorf("block jobs left: %v %v", jobs, err)
	}
	js, err := queryJobs(ctx, c)
	if err != nil || len(js) != 0 {
		t.Errorf("jobs left: %+v %v", js, err)
	}
	es, err := queryExports(ctx, c)
	if err != nil || len(es) != 0 {
		t.Errorf("exports left: %+v %v", es, err)
	}
	ns, err := queryNodes(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	st := qemuState{bitmaps: map[string][]dirtyBitmapInfo{}}
	for _, n := range ns {
		if strings.HasPrefix(n.NodeName, "kura") || n.Drv == "copy-before-write" {
			t.Errorf("node left: %s (%s)", n.NodeName, n.Drv)
		}
		for _, bm := range n.DirtyBitmaps {
			if strings.HasPrefix(bm.Name, bitmapPrefix) {
				st.bitmaps[n.NodeName] = append(st.bitmaps[n.NodeName], bm)
			}
		}
	}
	if err := c.Execute(ctx, "nbd-server-stop", nil, nil); err == nil {
		t.Error("an NBD server was still running")
	}
	if s, err := queryStatus(ctx, c); err != nil || s.Status == "io-error" {
		t.Errorf("VM status %q, %v", s.Status, err)
	}
	return st
}

func wantBitmaps(t *testing.T, st qemuState, want map[string][]string) {
	t.Helper()
	for node, names := range want {
		var got []string
		for _, bm := range st.bitmaps[node] {
			got = append(got, bm.Name)
			if !bm.Persistent {
				t.Errorf("bitmap %s on %s is not persistent", bm.Name, node)
			}
		}
		if strings.Join(got, ",") != strings.Join(names, ",") {
			t.Errorf("kura bitmaps on %s: %v, want %v", node, got, names)
		}
	}
	for node := range st.bitmaps {
		if _, ok := want[node]; !ok {
			t.Errorf("kura bitmaps on node %s: %+v", node, st.bitmaps[node])
		}
	}
}
