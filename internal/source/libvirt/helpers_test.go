package libvirt

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/testvm"
)

// TestMain lets the test binary act as the thaw watchdog, which captures in
// app and suspend mode start by running os.Executable().
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == guest.WatchdogArg {
		os.Exit(guest.WatchdogMain(os.Args[2:]))
	}
	if name := os.Getenv(childEnv); name != "" {
		os.Exit(captureChild(name))
	}
	os.Exit(m.Run())
}

// childEnv makes the test binary a Kura that captures the named VM and then
// waits to be killed.
const childEnv = "KURA_LIBVIRT_TEST_CHILD"

// childMethodEnv is the capture method of that Kura.
const childMethodEnv = "KURA_LIBVIRT_TEST_METHOD"

func captureChild(name string) int {
	ctx := context.Background()
	conn, err := Connect(ctx, DefaultURI)
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	vm, err := conn.VM(ctx, name)
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Method: os.Getenv(childMethodEnv)})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("captured", c.Checkpoint())
	time.Sleep(time.Hour)
	return 0
}

// bootGuest boots a libvirt test guest, waits for its agent and returns
// it with a connection to libvirtd and the driver's VM for it; all go
// when the test ends.
func bootGuest(t *testing.T, ctx context.Context, opts testvm.Options) (*testvm.Guest, *Conn, *VM) {
	t.Helper()
	g, err := testvm.StartLibvirt(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Destroy(context.Background()) })
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	conn, vm := connectVM(t, ctx, g.Name)
	return g, conn, vm
}

// needLibvirt skips a test that boots a libvirt guest where that cannot work.
func needLibvirt(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a libvirt guest (minutes under TCG); runs without -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("boots a libvirt guest: needs root")
	}
	for _, bin := range []string{"qemu-system-x86_64", "libvirtd", "virsh", "nbdcopy", "fsck.ext4", "debugfs", "xfs_repair"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (apt-get install qemu-system-x86 libvirt-daemon-system libnbd-bin e2fsprogs xfsprogs)", bin)
		}
	}
}

// guestSh runs a shell script in the guest and fails the test if it fails.
func guestSh(t *testing.T, ctx context.Context, g *testvm.Guest, script string) string {
	t.Helper()
	r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", script)
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("in the guest: %s: exit %d, %v: %s%s", script, r.ExitCode, err, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// run runs a host command and returns its combined output.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// copyDisk reads the whole disk through the source interface, as the backup
// pipeline would (extents, then only the data ranges), into a sparse file
// at path ("" for none). It returns the SHA-256 of the whole disk and how
// many bytes it read.
func copyDisk(t *testing.T, ctx context.Context, d source.Disk, path string) (sum string, read int64) {
	t.Helper()
	size := d.Info().Size
	var f *os.File
	if path != "" {
		var err error
		if f, err = os.Create(path); err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
	}
	h := sha256.New()
	zeros := make([]byte, 1<<20)
	buf := make([]byte, 4<<20)
	exts, err := d.Extents(ctx, 0, size)
	if err != nil {
		t.Fatalf("Extents of %s: %v", d.Info().Name, err)
	}
	var pos int64
	for _, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extents of %s do not tile the disk: %+v at %d", d.Info().Name, e, pos)
		}
		for off := e.Offset; off < e.Offset+e.Length; {
			if e.Zero {
				n := min(int64(len(zeros)), e.Offset+e.Length-off)
				h.Write(zeros[:n])
				off += n
				continue
			}
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			if err := d.ReadAt(ctx, buf[:n], off); err != nil {
				t.Fatalf("ReadAt: %v", err)
			}
			h.Write(buf[:n])
			if f != nil {
				if _, err := f.WriteAt(buf[:n], off); err != nil {
					t.Fatal(err)
				}
			}
			read += n
			off += n
		}
		pos = e.Offset + e.Length
	}
	if pos != size {
		t.Fatalf("extents of %s end at %d, disk size %d", d.Info().Name, pos, size)
	}
	return hex.EncodeToString(h.Sum(nil)), read
}

// exportHash is the SHA-256 of an NBD export as nbdcopy (libnbd) reads it.
func exportHash(t *testing.T, socket, export string) string {
	t.Helper()
	cmd := exec.Command("nbdcopy", fmt.Sprintf("nbd+unix:///%s?socket=%s", export, socket), "-")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, out); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("nbdcopy %s: %v: %s", export, err, stderr.String())
	}
	return hex.EncodeToString(h.Sum(nil))
}

func fileHash(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// applyChanges writes the changed ranges of d into the image at path (the
// disk as of the previous capture), as an incremental restore would, and
// returns how many bytes changed.
func applyChanges(t *testing.T, ctx context.Context, d source.Disk, path string) int64 {
	t.Helper()
	ct, ok := d.(source.ChangeTracker)
	if !ok {
		t.Fatalf("disk %s does not track changes", d.Info().Name)
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size := d.Info().Size
	exts, err := ct.Changed(ctx, 0, size)
	if err != nil {
		t.Fatalf("Changed: %v", err)
	}
	var changed, pos int64
	buf := make([]byte, 4<<20)
	for _, e := range exts {
		if e.Offset != pos {
			t.Fatalf("changed extents do not tile the disk: %+v at %d", e, pos)
		}
		pos += e.Length
		if e.Zero {
			continue
		}
		changed += e.Length
		for off := e.Offset; off < e.Offset+e.Length; {
			n := min(int64(len(buf)), e.Offset+e.Length-off)
			if err := d.ReadAt(ctx, buf[:n], off); err != nil {
				t.Fatalf("ReadAt: %v", err)
			}
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
			off += n
		}
	}
	if pos != size {
		t.Fatalf("changed extents end at %d, disk size %d", pos, size)
	}
	return changed
}

// verifyExt4 checks an ext4 image the way a user would trust it: fsck finds
// nothing to fix, and every file kura-workload wrote has the checksum it
// recorded. It returns the number of files checked.
func verifyExt4(t *testing.T, img string) int {
	t.Helper()
	if out, err := exec.Command("fsck.ext4", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("fsck.ext4 -fn %s: %v\n%s", img, err, out)
	}
	manifest := run(t, "debugfs", "-R", "cat /MANIFEST.sha256", img)
	dir := t.TempDir()
	n := 0
	sc := bufio.NewScanner(strings.NewReader(manifest))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		want, name := f[0], strings.TrimPrefix(f[1], "*")
		dst := filepath.Join(dir, name)
		run(t, "debugfs", "-R", fmt.Sprintf("dump /%s %s", name, dst), img)
		if got := fileHash(t, dst); got != want {
			t.Errorf("%s in the captured image: sha256 %s, the guest wrote %s", name, got, want)
		}
		n++
	}
	if n == 0 {
		t.Fatalf("no files in the manifest of %s: %q", img, manifest)
	}
	return n
}

// verifyXFS checks an xfs image: mounted through a loop device (which
// replays its log, as a frozen xfs keeps metadata there) every file
// kura-workload wrote has its checksum, and after unmounting xfs_repair
// finds nothing to fix. It returns the number of files checked, or 0 when
// the host cannot mount it.
func verifyXFS(t *testing.T, img string) int {
	t.Helper()
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop", "-t", "xfs", img, mnt).CombinedOutput(); err != nil {
		t.Logf("cannot mount the xfs image (%v: %s): only xfs_repair -n, which ignores the log", err, strings.TrimSpace(string(out)))
		return 0
	}
	mounted := true
	defer func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	}()
	out, err := exec.Command("sh", "-c", "cd "+mnt+" && sha256sum --quiet -c MANIFEST.sha256 && wc -l <MANIFEST.sha256").CombinedOutput()
	if err != nil {
		t.Errorf("files in the captured xfs image: %v\n%s", err, out)
	}
	var n int
	fmt.Sscan(string(out), &n)
	run(t, "umount", mnt)
	mounted = false
	if out, err := exec.Command("xfs_repair", "-n", "-f", img).CombinedOutput(); err != nil {
		t.Errorf("xfs_repair -n %s after log replay: %v\n%s", img, err, out)
	}
	return n
}

func diskByName(t *testing.T, c source.Capture, name string) source.Disk {
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

// capSocket is the NBD socket of a live capture.
func capSocket(c source.Capture) string {
	return filepath.Join(c.(*capture).dir, "nbd.sock")
}

func guestTimeouts(freeze time.Duration) guest.Timeouts {
	return guest.Timeouts{Freeze: freeze}
}

func isNotFound(err error) bool { return errors.Is(err, source.ErrNotFound) }

// connectVM connects to libvirtd (closed when t ends) and looks up VM name.
func connectVM(t *testing.T, ctx context.Context, name string) (*Conn, *VM) {
	t.Helper()
	conn, err := Connect(ctx, DefaultURI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	sv, err := conn.VM(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return conn, sv.(*VM)
}
