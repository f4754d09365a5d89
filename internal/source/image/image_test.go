package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/kura-backup/kura/internal/source"
)

const diskSize = 32 << 20

// dataRuns are the non-zero regions of the reference disk.
var dataRuns = []struct{ off, n int64 }{
	{0, 64 << 10},
	{1<<20 + 100, 5000},   // unaligned
	{4 << 20, 3 << 20},    // several MiB
	{20<<20 - 4096, 8192}, // straddles a 1 MiB block boundary
	{diskSize - 512, 512}, // last sector
}

// reference writes the raw sparse reference disk and returns its path and
// contents. [10 MiB, 11 MiB) is written with explicit zeros: allocated in
// the raw file, yet zero.
func reference(t *testing.T) (string, []byte) {
	t.Helper()
	data := make([]byte, diskSize)
	rng := rand.New(rand.NewPCG(3, 4))
	for _, r := range dataRuns {
		for i := r.off; i < r.off+r.n; i++ {
			data[i] = byte(rng.IntN(255) + 1)
		}
	}
	path := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(diskSize); err != nil {
		t.Fatal(err)
	}
	for _, r := range dataRuns {
		if _, err := f.WriteAt(data[r.off:r.off+r.n], r.off); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.WriteAt(make([]byte, 1<<20), 10<<20); err != nil {
		t.Fatal(err)
	}
	return path, data
}

func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed (apt-get install qemu-utils): %v", name, err)
	}
}

func convert(t *testing.T, raw, format string, opts ...string) string {
	t.Helper()
	requireTool(t, "qemu-img")
	out := filepath.Join(t.TempDir(), "disk."+format)
	args := append(append([]string{"convert", "-f", "raw", "-O", format}, opts...), raw, out)
	if b, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	return out
}

func open(t *testing.T, path string, opts Options) source.Disk {
	t.Helper()
	d, err := Open(context.Background(), path, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// checkExtents verifies that exts tile [off, off+length) in order and that
// every zero extent reads as zeros in want, so every non-zero byte lies in
// a data extent. It returns how many bytes were reported zero.
func checkExtents(t *testing.T, exts []source.Extent, off, length int64, want []byte) int64 {
	t.Helper()
	pos, zero := off, int64(0)
	for _, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extents do not tile [%d, %d) in order: %+v", off, off+length, exts)
		}
		if e.Zero {
			zero += e.Length
			if i := bytes.IndexFunc(want[e.Offset:e.Offset+e.Length], func(r rune) bool { return r != 0 }); i >= 0 {
				t.Fatalf("zero extent %+v holds a non-zero byte at %d", e, e.Offset+int64(i))
			}
		}
		pos += e.Length
	}
	if pos != off+length {
		t.Fatalf("extents end at %d, want %d: %+v", pos, off+length, exts)
	}
	return zero
}

func TestFormats(t *testing.T) {
	raw, want := reference(t)
	tests := []struct {
		format  string
		opts    []string
		minZero int64 // bytes that must be reported zero: holes are found
	}{
		{"raw", nil, 20 << 20},
		{"qcow2", nil, 20 << 20},
		{"vmdk", nil, 20 << 20},
		{"vmdk", []string{"-o", "subformat=streamOptimized"}, 20 << 20},
		// QEMU's vhdx driver reports no block status: all data.
		{"vhdx", []string{"-o", "block_size=1M"}, 0},
		{"vdi", nil, 20 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.format+strings.Join(tt.opts, ""), func(t *testing.T) {
			path := raw
			if tt.format != "raw" {
				path = convert(t, raw, tt.format, tt.opts...)
			}
			d := open(t, path, Options{})
			info := d.Info()
			if info.Name != "disk" || info.Size != diskSize || info.Format != tt.format || info.Path != path {
				t.Errorf("Info = %+v, want disk, %d bytes, %s, %s", info, diskSize, tt.format, path)
			}
			ctx := context.Background()
			got := make([]byte, diskSize)
			if err := d.ReadAt(ctx, got, 0); err != nil {
				t.Fatalf("ReadAt: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("contents differ from the raw reference")
			}
			exts, err := d.Extents(ctx, 0, diskSize)
			if err != nil {
				t.Fatalf("Extents: %v", err)
			}
			if zero := checkExtents(t, exts, 0, diskSize, want); zero < tt.minZero {
				t.Errorf("only %d bytes reported zero, want at least %d: %+v", zero, tt.minZero, exts)
			}
			// Unaligned sub-ranges are covered exactly.
			for _, r := range [][2]int64{{1<<20 + 99, 3<<20 + 7}, {diskSize - 1000, 1000}, {12345, 1}, {5 << 20, 0}} {
				sub, err := d.Extents(ctx, r[0], r[1])
				if err != nil {
					t.Fatalf("Extents(%d, %d): %v", r[0], r[1], err)
				}
				checkExtents(t, sub, r[0], r[1], want)
			}
		})
	}
}

func TestConcurrentReads(t *testing.T) {
	raw, want := reference(t)
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			path := raw
			if format != "raw" {
				path = convert(t, raw, format)
			}
			d := open(t, path, Options{Format: format})
			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for g := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(g), 9))
					for range 30 {
						n := rng.Int64N(1<<20) + 1
						off := rng.Int64N(diskSize - n)
						p := make([]byte, n)
						if err := d.ReadAt(context.Background(), p, off); err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(p, want[off:off+n]) {
							errs <- fmt.Errorf("ReadAt(%d, %d) returned wrong bytes", off, n)
							return
						}
						if _, err := d.Extents(context.Background(), off, n); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

func TestRangeErrors(t *testing.T) {
	raw, _ := reference(t)
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			path := raw
			if format != "raw" {
				path = convert(t, raw, format)
			}
			d := open(t, path, Options{})
			ctx := context.Background()
			if err := d.ReadAt(ctx, make([]byte, 2), diskSize-1); !errors.Is(err, io.EOF) {
				t.Errorf("ReadAt past the end = %v, want an error wrapping io.EOF", err)
			}
			if err := d.ReadAt(ctx, make([]byte, 1), diskSize); err == nil {
				t.Error("ReadAt at the end succeeded")
			}
			if _, err := d.Extents(ctx, diskSize-10, 11); err == nil || !strings.Contains(err.Error(), path) {
				t.Errorf("Extents past the end = %v, want an error naming the image", err)
			}
			if _, err := d.Extents(ctx, -1, 10); err == nil {
				t.Error("Extents at a negative offset succeeded")
			}
		})
	}
}

func TestOpenErrors(t *testing.T) {
	raw, _ := reference(t)
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		path     string
		opts     Options
		is       error
		contains []string
	}{
		{"missing", filepath.Join(dir, "missing.qcow2"), Options{}, source.ErrNotFound, []string{"missing.qcow2", "no such file"}},
		{"directory", dir, Options{}, nil, []string{dir, "is a directory"}},
		{"fifo", fifo, Options{}, nil, []string{fifo, "not a regular file or block device"}},
		{"wrong format", raw, Options{Format: "qcow2"}, nil, []string{raw, "Image is not in qcow2 format"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.opts.Format != "" {
				requireTool(t, "qemu-storage-daemon")
			}
			d, err := Open(context.Background(), tt.path, tt.opts)
			if err == nil {
				d.Close()
				t.Fatal("Open succeeded")
			}
			t.Logf("error: %v", err)
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("error %q does not wrap %v", err, tt.is)
			}
			for _, s := range tt.contains {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
		})
	}
}

// TestPermissionDenied opens an image the user may not read. Root reads
// everything, so as root the test runs itself again as nobody.
func TestPermissionDenied(t *testing.T) {
	const envPath = "KURA_IMAGE_TEST_UNREADABLE"
	if path := os.Getenv(envPath); path != "" {
		_, err := Open(context.Background(), path, Options{})
		fmt.Printf("OPEN-ERROR: %v\n", err)
		return
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "secret.qcow2")
	if err := os.WriteFile(path, []byte("QFI\xfb"), 0o600); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() != 0 {
		if err := os.Chmod(path, 0); err != nil {
			t.Fatal(err)
		}
		_, err := Open(context.Background(), path, Options{})
		checkPermissionError(t, path, fmt.Sprint(err))
		return
	}
	// Let nobody reach the file (but not read it) and run the test binary.
	for _, p := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Skipf("cannot find the test binary: %v", err)
	}
	bin := filepath.Join(dir, "image.test")
	if b, err := os.ReadFile(self); err != nil || os.WriteFile(bin, b, 0o755) != nil {
		t.Skipf("cannot copy the test binary: %v", err)
	}
	cmd := exec.Command(bin, "-test.run=^TestPermissionDenied$")
	cmd.Env = append(os.Environ(), envPath+"="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Skipf("cannot run the test as nobody: %v\n%s", err, out)
	}
	_, msg, ok := strings.Cut(string(out), "OPEN-ERROR: ")
	if !ok {
		t.Fatalf("child printed no error:\n%s", out)
	}
	msg, _, _ = strings.Cut(msg, "\n")
	checkPermissionError(t, path, msg)
}

func checkPermissionError(t *testing.T, path, msg string) {
	t.Helper()
	t.Logf("error: %s", msg)
	for _, s := range []string{path, "permission denied: run kura as a user who can read it"} {
		if !strings.Contains(msg, s) {
			t.Errorf("error %q does not mention %q", msg, s)
		}
	}
}

// TestBlockDevice attaches the reference image to a read-only loop device.
func TestBlockDevice(t *testing.T) {
	raw, want := reference(t)
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", raw).CombinedOutput()
	if err != nil {
		t.Skipf("cannot attach a loop device (needs root and /dev/loop*): %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "--detach", dev).Run() })

	d := open(t, dev, Options{})
	info := d.Info()
	if info.Format != "raw" || info.Size != diskSize || info.Name != filepath.Base(dev) {
		t.Errorf("Info = %+v, want raw, %d bytes, named %s", info, diskSize, filepath.Base(dev))
	}
	exts, err := d.Extents(context.Background(), 100, diskSize-200)
	if err != nil {
		t.Fatalf("Extents: %v", err)
	}
	if len(exts) != 1 || exts[0] != (source.Extent{Offset: 100, Length: diskSize - 200}) {
		t.Errorf("block device extents = %+v, want one data extent", exts)
	}
	got := make([]byte, diskSize)
	if err := d.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("block device contents differ from the image")
	}
}

func TestCloseStopsDaemon(t *testing.T) {
	raw, _ := reference(t)
	path := convert(t, raw, "qcow2")
	d, err := Open(context.Background(), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	qd := d.(*qemuDisk)
	sock := qd.daemon.Socket()
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case <-qd.daemon.Exited():
	default:
		t.Error("qemu-storage-daemon still running after Close")
	}
	if _, err := os.Stat(filepath.Dir(sock)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket directory left behind: %v", err)
	}
}

func TestDiskName(t *testing.T) {
	for _, tt := range []struct{ path, want string }{
		{"/var/lib/libvirt/images/web.qcow2", "web"},
		{"/images/db.img.raw", "db.img"},
		{"/dev/sda", "sda"},
		{"/images/.hidden", ".hidden"},
	} {
		if got := diskName(tt.path); got != tt.want {
			t.Errorf("diskName(%q) = %q, want %q", tt.path, got, tt.want)
		}
	}
}
