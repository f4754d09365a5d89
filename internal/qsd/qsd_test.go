package qsd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/nbd"
)

func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed (apt-get install qemu-utils): %v", name, err)
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	requireTool(t, name)
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// rawImage writes a 16 MiB sparse raw image with data at 1 MiB and at the
// last 4 KiB, and returns its path and contents.
func rawImage(t *testing.T) (string, []byte) {
	t.Helper()
	data := make([]byte, 16<<20)
	for i := range 256 << 10 {
		data[1<<20+i] = byte(i%251 + 1)
	}
	copy(data[len(data)-4096:], bytes.Repeat([]byte("kura"), 1024))
	path := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(data))); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int{{1 << 20, 256 << 10}, {len(data) - 4096, 4096}} {
		if _, err := f.WriteAt(data[r[0]:r[0]+r[1]], int64(r[0])); err != nil {
			t.Fatal(err)
		}
	}
	return path, data
}

func qcow2Image(t *testing.T) (string, []byte) {
	t.Helper()
	raw, data := rawImage(t)
	path := filepath.Join(t.TempDir(), "disk.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
	return path, data
}

func start(t *testing.T, opts Options) *Daemon {
	t.Helper()
	requireTool(t, Binary)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	d, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func dial(t *testing.T, d *Daemon, metaContexts ...string) *nbd.Client {
	t.Helper()
	c, err := nbd.Dial(context.Background(), "unix", d.Socket(), nbd.Options{ExportName: d.ExportName(), MetaContexts: metaContexts})
	if err != nil {
		t.Fatalf("nbd.Dial: %v (daemon said: %s)", err, d.Stderr())
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestStartReadsQcow2(t *testing.T) {
	path, want := qcow2Image(t)
	d := start(t, Options{Path: path})
	if d.Format() != "qcow2" {
		t.Errorf("Format = %q, want probed qcow2", d.Format())
	}
	if d.ExportName() != "disk" {
		t.Errorf("ExportName = %q, want the default", d.ExportName())
	}
	st, err := os.Stat(filepath.Dir(d.Socket()))
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o700 {
		t.Errorf("socket directory mode = %v, want 0700", perm)
	}
	c := dial(t, d)
	if c.Size() != int64(len(want)) || !c.Flags().ReadOnly() {
		t.Fatalf("export size %d read-only %v, want %d and read-only", c.Size(), c.Flags().ReadOnly(), len(want))
	}
	got := make([]byte, len(want))
	if err := c.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("exported bytes differ from the image")
	}
}

func TestWritable(t *testing.T) {
	path, want := qcow2Image(t)
	d := start(t, Options{Path: path, Format: "qcow2", Writable: true, ExportName: "vda"})
	c := dial(t, d)
	if c.Flags().ReadOnly() {
		t.Fatal("writable export is flagged read-only")
	}
	ctx := context.Background()
	p := bytes.Repeat([]byte("written by kura "), 4096)
	if err := c.WriteAt(ctx, p, 3<<20+5); err != nil {
		t.Fatalf("WriteAt: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	c.Close()
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	copy(want[3<<20+5:], p)
	ref := filepath.Join(t.TempDir(), "want.raw")
	if err := os.WriteFile(ref, want, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, ref)
}

func TestReadOnlyLeavesImageAlone(t *testing.T) {
	path, _ := qcow2Image(t)
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	d := start(t, Options{Path: path, Format: "qcow2"})
	c := dial(t, d)
	if err := c.WriteAt(context.Background(), []byte("x"), 0); !errors.Is(err, nbd.ErrReadOnly) {
		t.Fatalf("WriteAt on read-only export = %v, want ErrReadOnly", err)
	}
	c.Close()
	d.Close()
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Fatal("a read-only export changed the image file")
	}
}

func TestStartErrors(t *testing.T) {
	requireTool(t, Binary)
	raw, _ := rawImage(t)
	dir := t.TempDir()
	tests := []struct {
		name     string
		opts     Options
		is       error
		contains []string
	}{
		{"missing file", Options{Path: filepath.Join(dir, "nope.qcow2")}, fs.ErrNotExist, []string{"nope.qcow2", "no such file"}},
		{"directory", Options{Path: dir}, nil, []string{dir, "is a directory"}},
		{"wrong format", Options{Path: raw, Format: "qcow2"}, nil, []string{"qemu-storage-daemon failed to export", "not in qcow2 format"}},
		{"unknown format", Options{Path: raw, Format: "floppy"}, nil, []string{"floppy"}},
		{"force share on writable", Options{Path: raw, Writable: true, ForceShare: true}, nil, []string{"read-only"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Start(context.Background(), tt.opts)
			if err == nil {
				d.Close()
				t.Fatal("Start succeeded")
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

func TestNotInstalled(t *testing.T) {
	raw, _ := rawImage(t)
	t.Setenv("PATH", t.TempDir())
	_, err := Start(context.Background(), Options{Path: raw})
	if !errors.Is(err, ErrNotInstalled) || err.Error() != "qemu-storage-daemon not found: install qemu-utils (apt-get install qemu-utils)" {
		t.Fatalf("Start without the binary = %v", err)
	}
}

func TestCancelledStart(t *testing.T) {
	requireTool(t, Binary)
	raw, _ := rawImage(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	before := tempDirs(t)
	if _, err := Start(ctx, Options{Path: raw, Format: "raw"}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Start with a cancelled context = %v, want context.Canceled", err)
	}
	if after := tempDirs(t); after > before {
		t.Errorf("a cancelled Start left a socket directory behind")
	}
}

func tempDirs(t *testing.T) int {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(os.TempDir(), "kura-qsd-*"))
	if err != nil {
		t.Fatal(err)
	}
	return len(m)
}

func TestCloseLeavesNothing(t *testing.T) {
	raw, _ := rawImage(t)
	d := start(t, Options{Path: raw, Format: "raw"})
	pid := d.cmd.Process.Pid
	dir := filepath.Dir(d.Socket())
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("daemon pid %d still exists after Close (kill -0: %v)", pid, err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("socket directory %s still exists after Close: %v", dir, err)
	}
	select {
	case <-d.Exited():
	default:
		t.Error("Exited not closed after Close")
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestImageInUse holds the image open for writing in qemu-nbd, as a running
// VM would: a plain read-only export must fail with advice, ForceShare
// must succeed.
func TestImageInUse(t *testing.T) {
	requireTool(t, "qemu-nbd")
	path, want := qcow2Image(t)
	sock := filepath.Join(t.TempDir(), "s")
	holder := exec.Command("qemu-nbd", "--socket="+sock, "--format=qcow2", "--persistent", path)
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 500 {
			t.Fatal("qemu-nbd did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}

	_, err := Start(context.Background(), Options{Path: path, Format: "qcow2"})
	if err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("Start on an image in use = %v, want an error saying it is in use", err)
	}
	t.Logf("error: %v", err)
	d := start(t, Options{Path: path, Format: "qcow2", ForceShare: true})
	c := dial(t, d)
	got := make([]byte, 4096)
	if err := c.ReadAt(context.Background(), got, 1<<20); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(got, want[1<<20:1<<20+4096]) {
		t.Fatal("force-shared export reads wrong bytes")
	}
}

func TestBitmaps(t *testing.T) {
	requireTool(t, "qemu-io")
	path, _ := qcow2Image(t)
	run(t, "qemu-img", "bitmap", "--add", path, "b0")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x55 8M 64K", path)
	d := start(t, Options{Path: path, Format: "qcow2", Bitmaps: []string{"b0"}})
	ctxName := nbd.MetaDirtyBitmapPrefix + "b0"
	c := dial(t, d, ctxName)
	exts, err := c.BlockStatus(context.Background(), ctxName, 0, c.Size())
	if err != nil {
		t.Fatalf("BlockStatus: %v", err)
	}
	var dirty []nbd.Extent
	for _, e := range exts {
		if e.Flags&nbd.StateDirty != 0 {
			dirty = append(dirty, e)
		}
	}
	if len(dirty) != 1 || dirty[0].Offset != 8<<20 || dirty[0].Length != 64<<10 {
		t.Fatalf("dirty extents = %+v, want [8M, +64K)", dirty)
	}
}

func TestProbeFormat(t *testing.T) {
	requireTool(t, "qemu-img")
	raw, _ := rawImage(t)
	dir := t.TempDir()
	tests := []struct {
		format  string
		options []string // qemu-img convert -o
		want    string
	}{
		{"qcow2", nil, "qcow2"},
		{"vmdk", nil, "vmdk"},
		{"vmdk", []string{"-o", "subformat=streamOptimized"}, "vmdk"},
		{"vmdk", []string{"-o", "subformat=monolithicFlat"}, "vmdk"}, // a text descriptor
		{"vhdx", nil, "vhdx"},
		{"vdi", nil, "vdi"},
		{"vpc", nil, "vpc"},
		{"qed", nil, "qed"},
	}
	for i, tt := range tests {
		t.Run(tt.format+strings.Join(tt.options, ""), func(t *testing.T) {
			out := filepath.Join(dir, "img"+string(rune('a'+i))+"."+tt.format)
			args := append([]string{"convert", "-f", "raw", "-O", tt.format}, tt.options...)
			run(t, "qemu-img", append(args, raw, out)...)
			got, err := ProbeFormat(out)
			if err != nil || got != tt.want {
				t.Fatalf("ProbeFormat = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
	for _, tt := range []struct{ name, path, want string }{
		{"raw sparse", raw, "raw"},
		{"empty file", mkfile(t, nil), "raw"},
		{"short file", mkfile(t, []byte("QF")), "raw"},
		{"qcow version 1", mkfile(t, []byte("QFI\xfb\x00\x00\x00\x01")), "qcow"},
		{"character device", "/dev/null", "raw"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ProbeFormat(tt.path)
			if err != nil || got != tt.want {
				t.Fatalf("ProbeFormat(%s) = %q, %v; want %q", tt.path, got, err, tt.want)
			}
		})
	}
	if _, err := ProbeFormat(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ProbeFormat(missing) = %v, want ErrNotExist", err)
	}
}

func mkfile(t *testing.T, b []byte) string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "probe")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// The daemon does not inherit the repository password (issue 23): its
// environment, as the kernel shows it, has no KURA_PASSWORD.
func TestDaemonHasNoSecrets(t *testing.T) {
	t.Setenv("KURA_PASSWORD", "qsd-must-not-see-this")
	t.Setenv("KURA_NEW_PASSWORD", "nor-this")
	raw, _ := rawImage(t)
	d := start(t, Options{Path: raw, Format: "raw"})
	defer d.Close()
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", d.cmd.Process.Pid))
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	if len(environ) == 0 {
		t.Fatal("empty environment read from /proc: the test cannot tell")
	}
	for _, s := range []string{"KURA_PASSWORD", "KURA_NEW_PASSWORD", "must-not-see", "nor-this"} {
		if bytes.Contains(environ, []byte(s)) {
			t.Errorf("qemu-storage-daemon's environment holds %s", s)
		}
	}
}
