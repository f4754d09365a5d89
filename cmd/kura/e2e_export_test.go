package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// startExport runs `kura export` until the test ends and returns the NBD
// URI of the first disk it prints and the server's stderr.
func (e *env) startExport(args ...string) (uri string, stderr *syncBuffer, stop func() int) {
	e.t.Helper()
	c := e.cmd(append([]string{"export"}, args...)...)
	out, err := c.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	stderr = &syncBuffer{}
	c.Stderr = stderr
	if err := c.Start(); err != nil {
		e.t.Fatal(err)
	}
	done := make(chan int, 1)
	stop = func() int {
		c.Process.Signal(syscall.SIGINT)
		select {
		case code := <-done:
			done <- code
			return code
		case <-time.After(10 * time.Second):
			c.Process.Kill()
			e.t.Fatal("kura export did not stop on SIGINT within 10 s")
			return -1
		}
	}
	e.t.Cleanup(func() { stop() })
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		c.Wait()
		done <- c.ProcessState.ExitCode()
	}()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				e.t.Fatalf("kura export ended before serving: %s", stderr.String())
			}
			if f := strings.Fields(l); uri == "" && len(f) > 0 && strings.HasPrefix(f[0], "nbd+unix://") {
				uri = f[0]
			}
			if strings.HasPrefix(l, "press Ctrl-C") {
				go func() {
					for range lines {
					}
				}()
				return uri, stderr, stop
			}
		case <-deadline:
			e.t.Fatalf("kura export did not start within 30 s: %s", stderr.String())
		}
	}
}

// TestExport serves a restore point and reads it with other people's NBD
// clients: qemu-img (QEMU's block layer), qemu-io, nbdcopy and nbdinfo.
func TestExport(t *testing.T) {
	needQemu(t)
	for _, tool := range []string{"nbdcopy", "nbdinfo", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install libnbd-bin qemu-utils)", tool)
		}
	}
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 64<<20, 5, 40)
	e.ok("init")
	e.ok("backup", "image", img, "--name", "vm1")
	sock := filepath.Join(e.dir, "nbd.sock")
	uri, _, stop := e.startExport("vm1@latest", "--socket", sock)
	if want := "nbd+unix:///disk?socket="; !strings.HasPrefix(uri, want) {
		t.Fatalf("export URI %q, want %s...", uri, want)
	}

	t.Run("qemu-img", func(t *testing.T) {
		out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "identical") {
			t.Fatalf("qemu-img compare: %v\n%s", err, out)
		}
	})
	t.Run("qemu-io", func(t *testing.T) {
		data, _ := os.ReadFile(img)
		// A pattern read at an offset with data proves QEMU reads it right.
		off := bytes.IndexFunc(data, func(r rune) bool { return r != 0 }) &^ 511
		out, err := exec.Command("qemu-io", "-r", "-f", "raw", "-c", "read -v "+itoa(off)+" 16", uri).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "read 16/16 bytes") {
			t.Fatalf("qemu-io: %v\n%s", err, out)
		}
	})
	t.Run("nbdcopy", func(t *testing.T) {
		got := filepath.Join(t.TempDir(), "copy.raw")
		if out, err := exec.Command("nbdcopy", "--connections=4", uri, got).CombinedOutput(); err != nil {
			t.Fatalf("nbdcopy: %v\n%s", err, out)
		}
		sameFile(t, img, got)
		// Holes were announced, so the copy is sparse.
		if b, want := statBlocks(t, got), int64(40*2<<20); b > want {
			t.Errorf("copy allocates %d bytes, the data is at most %d: holes were not skipped", b, want)
		}
	})
	t.Run("nbdinfo", func(t *testing.T) {
		out, err := exec.Command("nbdinfo", "--map", uri).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "hole,zero") {
			t.Fatalf("nbdinfo --map: %v\n%s", err, out)
		}
	})
	if code := stop(); code != 0 {
		t.Fatalf("kura export exited %d on SIGINT", code)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind after stop: %v", err)
	}

	t.Run("bad input", func(t *testing.T) {
		e.fails("no snapshot", "export", "nosuch@latest", "--socket", sock)
		e.fails(`has no disk "vdz"`, "export", "latest", "--disk", "vdz", "--socket", sock)
		notSock := filepath.Join(e.dir, "file")
		os.WriteFile(notSock, nil, 0o600)
		e.fails("is not a socket", "export", "latest", "--socket", notSock)
		_, _, stop := e.startExport("latest", "--socket", sock)
		defer stop()
		e.fails("in use by another server", "export", "latest", "--socket", sock)
	})

	t.Run("damaged chunk", func(t *testing.T) {
		// A chunk that fails authentication gives the client an I/O error
		// for its range, is logged with chunk and snapshot, and the server
		// keeps serving.
		corruptFirst(t, filepath.Join(e.repo, "data"), func(b []byte) []byte { b[len(b)/3] ^= 1; return b })
		sock := filepath.Join(e.dir, "bad.sock")
		uri, stderr, stop := e.startExport("latest", "--socket", sock)
		out, err := exec.Command("nbdcopy", uri, "null:").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "Input/output error") {
			t.Fatalf("nbdcopy of a damaged restore point: %v\n%s", err, out)
		}
		logged := func() bool {
			log := stderr.String()
			return strings.Contains(log, "chunk=") && strings.Contains(log, "snapshot=")
		}
		for end := time.Now().Add(5 * time.Second); !logged() && time.Now().Before(end); {
			time.Sleep(50 * time.Millisecond)
		}
		if !logged() {
			t.Errorf("server log does not name the chunk and snapshot:\n%s", stderr.String())
		}
		if out, err := exec.Command("nbdinfo", "--size", uri).CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != itoa(64<<20) {
			t.Fatalf("server not serving after the damaged read: %v\n%s", err, out)
		}
		if code := stop(); code != 0 {
			t.Errorf("kura export exited %d", code)
		}
	})
}

// syncBuffer is a bytes.Buffer safe to write from a process's output
// copier while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func itoa[T ~int | ~int64](v T) string { return strconv.FormatInt(int64(v), 10) }
