package guest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// childEnv switches the test binary into a child that freezes a guest
// under a watchdog and then waits to be killed (see freezingChild).
const childEnv = "KURA_GUEST_TEST_CHILD"

// TestMain lets the test binary act as the watchdog (StartWatchdog runs
// os.Executable(), which is the test binary here) and as the child process
// of the SIGKILL tests.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == WatchdogArg {
		os.Exit(WatchdogMain(os.Args[2:]))
	}
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(childMain(spec))
	}
	os.Exit(m.Run())
}

// childSpec tells the child which guest to freeze.
type childSpec struct {
	AgentSocket string         `json:"agent_socket,omitempty"`
	Libvirt     *LibvirtTarget `json:"libvirt,omitempty"`
}

// childMain starts a watchdog, freezes the guest, says "frozen <pid of the
// watchdog>" and sleeps until it is killed.
func childMain(specJSON string) int {
	var cs childSpec
	if err := json.Unmarshal([]byte(specJSON), &cs); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	ctx := context.Background()
	var f Freezer
	if cs.Libvirt != nil {
		l, err := dialLibvirt(ctx, cs.Libvirt.Socket, cs.Libvirt.URI)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		uuid, _ := parseUUID(cs.Libvirt.UUID)
		dom, err := l.DomainLookupByUUID(uuid)
		if err != nil {
			fmt.Println("error:", err)
			return 1
		}
		f = NewLibvirt(l, dom, Timeouts{})
	} else {
		f = NewSocket(cs.AgentSocket, Timeouts{})
	}
	wd, err := StartWatchdog(ctx, WatchdogSpec{Libvirt: cs.Libvirt, AgentSocket: cs.AgentSocket, Thaw: true, RetryFor: 20 * time.Second})
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	if _, err := f.Freeze(ctx); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Printf("frozen %d\n", wd.PID())
	time.Sleep(time.Hour)
	return 0
}

// freezingChild runs the child in its own process group, waits until it
// has frozen the guest and returns it with the watchdog's pid.
func freezingChild(t *testing.T, cs childSpec) (*exec.Cmd, int) {
	t.Helper()
	b, _ := json.Marshal(cs)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(b))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	})
	lines := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		lines <- strings.TrimSpace(l)
	}()
	select {
	case l := <-lines:
		var pid int
		if _, err := fmt.Sscanf(l, "frozen %d", &pid); err != nil {
			t.Fatalf("child: %q", l)
		}
		return cmd, pid
	case <-time.After(60 * time.Second):
		t.Fatal("child did not freeze the guest within 60 s")
	}
	return nil, 0
}

// killGroup kills the child and everything in its process group with
// SIGKILL, as a user's `kill -9 -PGID` or an OOM kill of the job would.
func killGroup(t *testing.T, cmd *exec.Cmd) time.Time {
	t.Helper()
	killed := time.Now()
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	return killed
}

func processAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

// waitProcessGone waits until pid has exited (it is not our child, so it
// cannot be reaped here; a zombie counts as gone).
func waitProcessGone(t *testing.T, pid int, within time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return
		}
		if f := strings.Fields(string(b)); len(f) > 2 && f[2] == "Z" {
			return
		}
	}
	t.Errorf("watchdog pid %d still runs %s later", pid, within)
}
