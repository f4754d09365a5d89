package nbd

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// requireTool returns the path of a program the test needs, or skips.
func requireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (apt-get install qemu-utils nbdkit libnbd-bin): %v", name, err)
	}
	return p
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(requireTool(t, name), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// socketPath returns a unix socket path in a fresh directory, short enough
// for sun_path (108 bytes).
func socketPath(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if len(dir) > 90 {
		var err error
		dir, err = os.MkdirTemp("", "nbd")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	return filepath.Join(dir, "s")
}

// startServer runs an NBD server program until the test ends and waits
// until addr accepts connections. The server must keep running after a
// client disconnects (qemu-nbd --persistent). It returns the process.
func startServer(t testing.TB, network, addr string, name string, args ...string) *os.Process {
	t.Helper()
	cmd := exec.Command(requireTool(t, name), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-exited:
			t.Fatalf("%s exited before accepting connections: %s", name, stderr.String())
		default:
		}
		c, err := net.DialTimeout(network, addr, time.Second)
		if err == nil {
			c.Close()
			return cmd.Process
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not accept connections on %s: %v", name, addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// qemuNBD exports image with qemu-nbd on a fresh unix socket and returns
// the socket path.
func qemuNBD(t testing.TB, format, image string, extra ...string) string {
	t.Helper()
	sock := socketPath(t)
	args := append([]string{"--socket=" + sock, "--format=" + format, "--persistent", "--shared=0"}, extra...)
	startServer(t, "unix", sock, "qemu-nbd", append(args, image)...)
	return sock
}

// testImage is a 64 MiB disk with known data at known offsets; everything
// else is zero.
type testImage struct {
	raw  string // path of the raw reference image (sparse)
	data []byte // its full contents
}

const testImageSize = 64 << 20

// dataRuns are the non-zero regions of the test image.
var dataRuns = []struct{ off, n int64 }{
	{0, 64 << 10},
	{1<<20 + 100, 5000},        // unaligned
	{5 << 20, 3 << 20},         // spans several 1 MiB requests
	{40<<20 - 4096, 8192},      // straddles a cluster boundary
	{testImageSize - 512, 512}, // last sector
}

func newTestImage(t testing.TB) testImage {
	t.Helper()
	dir := t.TempDir()
	data := make([]byte, testImageSize)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, r := range dataRuns {
		for i := r.off; i < r.off+r.n; i++ {
			data[i] = byte(rng.IntN(255) + 1)
		}
	}
	path := filepath.Join(dir, "ref.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(testImageSize); err != nil {
		t.Fatal(err)
	}
	for _, r := range dataRuns {
		if _, err := f.WriteAt(data[r.off:r.off+r.n], r.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return testImage{raw: path, data: data}
}

// convert writes the image in format fmt next to the raw reference.
func (img testImage) convert(t testing.TB, format string) string {
	t.Helper()
	if format == "raw" {
		return img.raw
	}
	out := filepath.Join(filepath.Dir(img.raw), "img."+format)
	run(t, "qemu-img", "convert", "-f", "raw", "-O", format, img.raw, out)
	return out
}

func dialT(t testing.TB, network, addr string, opts Options) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, network, addr, opts)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// firstDiff describes where two byte slices first differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
