package daemon

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// threadNices reads the nice value of every thread of this process.
func threadNices() (map[string]int, error) {
	out := map[string]int{}
	stats, err := filepath.Glob("/proc/self/task/*/stat")
	if err != nil {
		return nil, err
	}
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread ended
		}
		// After the command name in parentheses: state is field 3,
		// nice field 19.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 17 {
			return nil, fmt.Errorf("%s: %q", p, b)
		}
		n, err := strconv.Atoi(f[16])
		if err != nil {
			return nil, fmt.Errorf("%s: nice %q", p, f[16])
		}
		out[filepath.Base(filepath.Dir(p))] = n
	}
	return out, nil
}

// blockThreads parks n goroutines each on its own OS thread, so the
// process has at least n threads until release is closed.
func blockThreads(n int, release chan struct{}) *sync.WaitGroup {
	var started, wg sync.WaitGroup
	for range n {
		started.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			started.Done()
			<-release
		}()
	}
	started.Wait()
	return &wg
}

// TestSetNice runs in a child process (it changes the process's
// priority for good): every thread there before setNice, and every one
// started after, runs at the new nice value.
func TestSetNice(t *testing.T) {
	if os.Getenv("KURA_TEST_SETNICE_CHILD") == "1" {
		release := make(chan struct{})
		before := blockThreads(6, release)
		if err := setNice(7); err != nil {
			fmt.Println("setNice:", err)
			os.Exit(2)
		}
		after := blockThreads(6, release) // new threads, made by niced ones
		nices, err := threadNices()
		close(release)
		before.Wait()
		after.Wait()
		if err != nil {
			fmt.Println(err)
			os.Exit(2)
		}
		for tid, n := range nices {
			fmt.Printf("%s %d\n", tid, n)
		}
		os.Exit(0)
	}
	if os.Getenv("KURA_TEST_SETNICE_CHILD") == "denied" {
		// Read a configuration that asks for nice 0, lower the priority,
		// give up the right to raise it again, and start the daemon.
		d, err := New(Options{ConfigPath: os.Getenv("KURA_TEST_CONFIG")})
		if err != nil {
			fmt.Println("New:", err)
			os.Exit(2)
		}
		if err := setNice(10); err != nil {
			fmt.Println("setNice(10):", err)
			os.Exit(2)
		}
		if os.Geteuid() == 0 {
			if err := syscall.Setresuid(65534, 65534, 65534); err != nil {
				fmt.Println("setresuid:", err)
				os.Exit(2)
			}
		}
		fmt.Println(d.Run(context.Background()))
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSetNice$")
	cmd.Env = append(os.Environ(), "KURA_TEST_SETNICE_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	lines := strings.Fields(string(out))
	if len(lines) < 2*12 {
		t.Fatalf("child reported %d threads, want at least 12:\n%s", len(lines)/2, out)
	}
	for i := 0; i+1 < len(lines); i += 2 {
		if lines[i+1] != "7" {
			t.Errorf("thread %s runs at nice %s, want 7", lines[i], lines[i+1])
		}
	}
}

// A daemon that may not raise its priority to limits.nice does not start,
// and says what to do.
func TestSetNiceDenied(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "kura.yaml")
	if err := os.WriteFile(cfg, []byte("repositories:\n  main: {path: /nonexistent/repo, password_file: /nonexistent/pw}\n"+
		"limits: {nice: 0}\njobs:\n  - {name: j, repository: main, all: true, schedule: \"@daily\"}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSetNice$")
	cmd.Env = append(os.Environ(), "KURA_TEST_SETNICE_CHILD=denied", "KURA_TEST_CONFIG="+cfg)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	msg := strings.TrimSpace(string(out))
	for _, want := range []string{"setting the CPU priority (limits.nice 0)", "permission denied", "run kura server as root or raise limits.nice"} {
		if !strings.Contains(msg, want) {
			t.Errorf("daemon start: %q does not say %q", msg, want)
		}
	}
	if strings.Contains(msg, "\n") {
		t.Errorf("the error is not one line: %q", msg)
	}
}
