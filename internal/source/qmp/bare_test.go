package qmp

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/source"
)

// bareQEMU is a QEMU process that never runs guest code (-S): its disks
// are written through the devices with HMP qemu-io, so every change is
// known to the byte. It starts in a fraction of a second.
type bareQEMU struct {
	cmd    *exec.Cmd
	socket string
	exited chan struct{}
}

func startBare(t *testing.T, dir, qcow2, raw string) *bareQEMU {
	t.Helper()
	q := &bareQEMU{socket: filepath.Join(dir, "qmp.sock"), exited: make(chan struct{})}
	os.Remove(q.socket)
	q.cmd = exec.Command("qemu-system-x86_64",
		"-name", "bare", "-machine", "pc", "-accel", "tcg", "-S",
		"-nodefaults", "-no-user-config", "-display", "none",
		"-qmp", "unix:"+q.socket+",server=on,wait=off",
		"-blockdev", "driver=file,filename="+qcow2+",node-name=vdb-file",
		"-blockdev", "driver=qcow2,file=vdb-file,node-name=vdb",
		"-device", "virtio-blk-pci,drive=vdb,id=vdb",
		"-drive", "file="+raw+",format=raw,if=none,id=rawdrive",
		"-device", "virtio-blk-pci,drive=rawdrive,id=vdc",
	)
	var stderr bytes.Buffer
	q.cmd.Stderr = &stderr
	q.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := q.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { q.cmd.Wait(); close(q.exited) }()
	t.Cleanup(func() { q.kill() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		// The socket file exists from bind(), before QEMU listens.
		dctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := Dial(dctx, q.socket)
		cancel()
		if err == nil {
			c.Close()
			return q
		}
		select {
		case <-q.exited:
			t.Fatalf("qemu-system-x86_64 exited: %s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-system-x86_64 did not create its QMP socket")
		}
	}
}

func (q *bareQEMU) kill() {
	q.cmd.Process.Kill()
	<-q.exited
}

// quit stops QEMU cleanly, which stores persistent bitmaps in the image.
func (q *bareQEMU) quit(t *testing.T, ctx context.Context) {
	t.Helper()
	c, err := Dial(ctx, q.socket)
	if err != nil {
		t.Fatal(err)
	}
	c.Execute(ctx, "quit", nil, nil)
	c.Close()
	select {
	case <-q.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("QEMU did not quit")
	}
}

// qemuIO writes pattern at [off, off+n) through the device vdb, as the
// guest would (through the fleecing filter when a capture runs).
func qemuIO(t *testing.T, ctx context.Context, c *Client, pattern byte, off, n int64) {
	t.Helper()
	var out string
	cmd := fmt.Sprintf(`qemu-io -d /machine/peripheral/vdb/virtio-backend "write -P 0x%02x %d %d"`, pattern, off, n)
	if err := c.Execute(ctx, "human-monitor-command", map[string]any{"command-line": cmd}, &out); err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("%s: %v %q", cmd, err, out)
	}
}

// TestCaptureBareQEMU checks the exact semantics on a QEMU that runs no
// guest: point-in-time reads while the disk changes, the exact dirty
// ranges, bitmaps that persist across a clean restart, and bitmaps that
// are inconsistent after QEMU was killed.
func TestCaptureBareQEMU(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	qcow2 := filepath.Join(dir, "vdb.qcow2")
	raw := filepath.Join(dir, "raw.img")
	const size = 64 << 20
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", qcow2, fmt.Sprint(size)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v %s", err, out)
	}
	if err := os.WriteFile(raw, bytes.Repeat([]byte{0x5a}, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size) // what the disk holds, as the test writes it
	set := func(p byte, off, n int64) {
		for i := off; i < off+n; i++ {
			want[i] = p
		}
	}

	q := startBare(t, dir, qcow2, raw)
	v, err := OpenWith(ctx, q.socket, "", Options{ScratchDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if v.Name() != "bare" {
		t.Errorf("name %q, want bare", v.Name())
	}
	// Captures that cannot be made leave nothing behind.
	bad, err := OpenWith(ctx, q.socket, "", Options{ScratchDir: filepath.Join(dir, "missing")})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		vm   source.VM
		mode string
		want string
	}{
		{bad, source.ModeCrash, "scratch directory"},
		{v, source.ModeApp, "app mode: the VM is prelaunch"},
	} {
		_, err := tt.vm.Capture(ctx, source.CaptureOptions{Mode: tt.mode})
		if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "undoing") {
			t.Errorf("Capture(%s): %v, want an error about %q", tt.mode, err, tt.want)
		}
	}
	checkClean(t, ctx, q.socket)

	c, err := Dial(ctx, q.socket)
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, ctx, c, 0xa1, 0, 1<<20)
	set(0xa1, 0, 1<<20)
	qemuIO(t, ctx, c, 0xa2, 8<<20, 1<<20)
	set(0xa2, 8<<20, 1<<20)
	c.Close()

	// c1: full. A write during the capture does not show in it.
	c1, err := v.Capture(ctx, source.CaptureOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c1.Mode() != source.ModeCrash {
		t.Errorf("a VM without agent: mode %q, want crash", c1.Mode())
	}
	qemuIO(t, ctx, c1.(*capture).c, 0xb1, 0, 64<<10)
	vdb := diskNamed(t, c1, "vdb")
	if vdb.Info().Name != "vdb" || vdb.Info().Format != "qcow2" || vdb.Info().Size != size || vdb.Info().Path != qcow2 {
		t.Errorf("disk info %+v", vdb.Info())
	}
	got := make([]byte, size)
	if err := vdb.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("c1: the capture does not hold the disk as it was at the instant")
	}
	es, err := vdb.Extents(ctx, 0, size)
	if err != nil {
		t.Fatal(err)
	}
	wantExtents := []source.Extent{
		{Offset: 0, Length: 1 << 20},
		{Offset: 1 << 20, Length: 7 << 20, Zero: true},
		{Offset: 8 << 20, Length: 1 << 20},
		{Offset: 9 << 20, Length: size - 9<<20, Zero: true},
	}
	if fmt.Sprint(es) != fmt.Sprint(wantExtents) {
		t.Errorf("c1 extents %v, want %v", es, wantExtents)
	}
	rawData := make([]byte, 4<<20)
	if err := diskNamed(t, c1, "vdc").ReadAt(ctx, rawData, 0); err != nil || !bytes.Equal(rawData, bytes.Repeat([]byte{0x5a}, 4<<20)) {
		t.Errorf("raw disk: %v or wrong bytes", err)
	}
	if err := vdb.ReadAt(ctx, got[:1], size); err == nil {
		t.Error("reading past the end succeeded")
	}
	endCapture(t, ctx, c1, true)
	set(0xb1, 0, 64<<10)

	// c2: exactly the ranges written since c1, at the bitmap's 64 KiB
	// granularity, including the write made while c1 was open.
	c, err = Dial(ctx, q.socket)
	if err != nil {
		t.Fatal(err)
	}
	qemuIO(t, ctx, c, 0xc1, 20<<20, 128<<10)
	set(0xc1, 20<<20, 128<<10)
	qemuIO(t, ctx, c, 0xc2, 40<<20+4096, 4096)
	set(0xc2, 40<<20+4096, 4096)
	c.Close()
	c2 := captureOK(t, ctx, v, c1.Checkpoint(), "changed")
	wantChanged(t, ctx, c2, [][2]int64{{0, 64 << 10}, {20 << 20, 128 << 10}, {40 << 20, 64 << 10}})
	if err := diskNamed(t, c2, "vdb").ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Errorf("c2: wrong bytes (%v)", err)
	}
	endCapture(t, ctx, c2, true)

	// A clean restart keeps the bitmap: c3 from c2 reads nothing.
	q.quit(t, ctx)
	q = startBare(t, dir, qcow2, raw)
	c3 := captureOK(t, ctx, v, c2.Checkpoint(), "changed")
	wantChanged(t, ctx, c3, nil)
	endCapture(t, ctx, c3, true)

	// QEMU killed during a capture: End is quick and says so.
	q.quit(t, ctx)
	q = startBare(t, dir, qcow2, raw)
	c4 := captureOK(t, ctx, v, c3.Checkpoint(), "changed")
	q.kill()
	start := time.Now()
	if err := c4.End(ctx, false); err == nil || !strings.Contains(err.Error(), "QEMU is gone") {
		t.Errorf("End after QEMU was killed: %v", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("End after QEMU was killed took %s", took)
	}

	// The bitmap QEMU had loaded is now inconsistent: full read, noted,
	// and removed once the backup succeeds.
	q = startBare(t, dir, qcow2, raw)
	c5, err := v.Capture(ctx, source.CaptureOptions{Mode: source.ModeSuspend, Since: c3.Checkpoint()})
	if err != nil {
		t.Fatal(err)
	}
	if n := noteFor(c5, "vdb"); n.Read != "full" || !strings.Contains(n.Reason, "inconsistent") {
		t.Errorf("note after QEMU was killed: %+v, want full read of an inconsistent bitmap", n)
	}
	if c5.Pause() != 0 {
		t.Errorf("suspend of a VM that is not running: pause %s, want 0", c5.Pause())
	}
	if err := diskNamed(t, c5, "vdb").ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Errorf("c5: wrong bytes (%v)", err)
	}
	endCapture(t, ctx, c5, true)
	st := checkClean(t, ctx, q.socket)
	wantBitmaps(t, st, map[string][]string{"vdb": {"kura-" + c5.Checkpoint()}})
	if entries, _ := filepath.Glob(filepath.Join(dir, dirPrefix+"*")); len(entries) != 0 {
		t.Errorf("scratch left behind: %v", entries)
	}
}

func captureOK(t *testing.T, ctx context.Context, v source.VM, since, read string) source.Capture {
	t.Helper()
	c, err := v.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: since})
	if err != nil {
		t.Fatal(err)
	}
	if n := noteFor(c, "vdb"); n.Read != read {
		t.Fatalf("note %+v, want %s", n, read)
	}
	if n := noteFor(c, "vdc"); n.Read != "full" {
		t.Fatalf("note %+v for the raw disk, want full", n)
	}
	return c
}

// wantChanged checks that vdb's changed ranges are exactly want.
func wantChanged(t *testing.T, ctx context.Context, c source.Capture, want [][2]int64) {
	t.Helper()
	d := diskNamed(t, c, "vdb")
	ct, ok := d.(source.ChangeTracker)
	if !ok {
		t.Fatal("vdb does not implement ChangeTracker")
	}
	es, err := ct.Changed(ctx, 0, d.Info().Size)
	if err != nil {
		t.Fatal(err)
	}
	var got [][2]int64
	for _, e := range es {
		if !e.Zero {
			got = append(got, [2]int64{e.Offset, e.Length})
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("changed ranges %v, want %v", got, want)
	}
	// A range in the middle is described exactly too.
	es, err = ct.Changed(ctx, 20<<20+4096, 8192)
	if err != nil || len(es) != 1 || es[0].Offset != 20<<20+4096 || es[0].Length != 8192 {
		t.Errorf("Changed of a sub-range: %v %v", es, err)
	}
	if _, err := ct.Changed(ctx, d.Info().Size-4096, 8192); err == nil {
		t.Error("Changed past the end succeeded")
	}
}

func diskNamed(t *testing.T, c source.Capture, name string) source.Disk {
	t.Helper()
	for _, d := range c.Disks() {
		if d.Info().Name == name {
			return d
		}
	}
	t.Fatalf("capture has no disk %s", name)
	return nil
}

func noteFor(c source.Capture, name string) source.DiskNote {
	for _, n := range c.Notes() {
		if n.Disk == name {
			return n
		}
	}
	return source.DiskNote{}
}
