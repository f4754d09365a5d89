package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// qemuNone starts a real QEMU without a guest (-machine none) with a QMP
// socket, for the suspend-mode watchdog; it returns the socket's path.
func qemuNone(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("starts QEMU")
	}
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed")
	}
	dir, err := os.MkdirTemp("", "kura-qmp-") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	cmd := exec.Command(bin, "-machine", "none", "-nodefaults", "-display", "none",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatal("QEMU did not create its QMP socket")
		}
	}
}

// qmpDo runs commands on a fresh QMP connection and returns the last
// command's "return", then closes the connection (QEMU serves one client).
func qmpDo(t *testing.T, sock string, cmds ...string) json.RawMessage {
	t.Helper()
	conn, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	dec := json.NewDecoder(conn)
	var msg map[string]json.RawMessage
	if err := dec.Decode(&msg); err != nil {
		t.Fatal(err)
	}
	var last json.RawMessage
	for _, c := range append([]string{"qmp_capabilities"}, cmds...) {
		fmt.Fprintf(conn, "{\"execute\":%q}\n", c)
		for {
			msg = nil
			if err := dec.Decode(&msg); err != nil {
				t.Fatalf("QMP %s: %v", c, err)
			}
			if e, ok := msg["error"]; ok {
				t.Fatalf("QMP %s: %s", c, e)
			}
			if r, ok := msg["return"]; ok {
				last = r
				break
			}
		}
	}
	return last
}

func qmpStatus(t *testing.T, sock string) string {
	t.Helper()
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(qmpDo(t, sock, "query-status"), &st); err != nil {
		t.Fatal(err)
	}
	return st.Status
}

// The suspend-mode watchdog of a plain QEMU VM resumes it with QMP cont
// when kura goes away (here: when it is told to fire, which takes the same
// path) and leaves a running VM alone.
func TestWatchdogResumesPausedQEMU(t *testing.T) {
	sock := qemuNone(t)
	ctx := context.Background()
	spec := WatchdogSpec{QMPSocket: sock, Resume: true, RetryFor: 20 * time.Second}

	qmpDo(t, sock, "stop")
	if st := qmpStatus(t, sock); st != "paused" {
		t.Fatalf("status %q after stop", st)
	}
	wd, err := StartWatchdog(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := wd.Fire(ctx); err != nil {
		t.Fatalf("Fire: %v", err)
	}
	t.Logf("resumed in %s", time.Since(start).Round(time.Millisecond))
	if st := qmpStatus(t, sock); st != "running" {
		t.Fatalf("status %q after the watchdog fired; want running", st)
	}

	// Disarmed: nothing happens; fired on a running VM: still running.
	wd, err = StartWatchdog(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := wd.Disarm(ctx); err != nil {
		t.Fatalf("Disarm: %v", err)
	}
	wd, err = StartWatchdog(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := wd.Fire(ctx); err != nil {
		t.Fatalf("Fire on a running VM: %v", err)
	}
	if st := qmpStatus(t, sock); st != "running" {
		t.Fatalf("status %q", st)
	}
}

// While kura holds QEMU's only QMP connection the watchdog cannot get
// through; once kura's connection closes (kura killed), it resumes the VM.
func TestWatchdogResumesQEMUWhenKuraDies(t *testing.T) {
	sock := qemuNone(t)
	ctx := context.Background()
	qmpDo(t, sock, "stop")
	wd, err := StartWatchdog(ctx, WatchdogSpec{QMPSocket: sock, Resume: true, RetryFor: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// Kura's connection, held while the watchdog is told kura is gone.
	held, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(held)
	var greeting map[string]any
	if err := dec.Decode(&greeting); err != nil {
		t.Fatal(err)
	}
	wd.stdin.Close() // what SIGKILL of kura does to the pipe
	time.Sleep(500 * time.Millisecond)
	held.Close()
	code, err := wd.result(ctx)
	if err != nil || code != exitThawedLost {
		t.Fatalf("watchdog exit %d, %v; want %d", code, err, exitThawedLost)
	}
	if st := qmpStatus(t, sock); st != "running" {
		t.Fatalf("status %q after kura went away; want running", st)
	}
}

func TestResumeQMPErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err := resumeQMP(ctx, filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || !strings.Contains(err.Error(), "none.sock") || !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("resumeQMP on a missing socket: %v", err)
	}
}
