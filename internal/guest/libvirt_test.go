package guest

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/kura-backup/kura/internal/testvm"
)

const libvirtSocket = "/var/run/libvirt/libvirt-sock"

// installHangHook restarts the guest agent with testvm.HangFreezeHook.
func installHangHook(t *testing.T, ctx context.Context, g *testvm.Guest) {
	t.Helper()
	if err := g.InstallFreezeHook(ctx, testvm.HangFreezeHook); err != nil {
		t.Fatal(err)
	}
}

// needLibvirt skips a test that boots a libvirt guest where that cannot work.
func needLibvirt(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a libvirt guest (about a minute under TCG); runs without -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("boots a libvirt guest: needs root")
	}
	for _, bin := range []string{"qemu-system-x86_64", "libvirtd", "virsh"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("boots a libvirt guest: %s not installed (apt-get install qemu-system-x86 libvirt-daemon-system)", bin)
		}
	}
}

// TestLibvirtGuest freezes and thaws a real guest through libvirt, and
// checks that a guest is never left frozen: not when Kura is killed, not
// when the agent is gone, not when it hangs in the middle of a freeze.
func TestLibvirtGuest(t *testing.T) {
	needLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	g, err := testvm.StartLibvirt(ctx, testvm.Options{Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Destroy(context.Background()) })
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest %s booted in %s (%s)", g.Name, g.BootTime.Round(time.Second), g.Accel)

	l, err := dialLibvirt(ctx, libvirtSocket, "qemu:///system")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Disconnect() })
	dom, err := l.DomainLookupByName(g.Name)
	if err != nil {
		t.Fatal(err)
	}
	f := NewLibvirt(l, dom, Timeouts{})
	target := &LibvirtTarget{Socket: libvirtSocket, URI: "qemu:///system", Domain: g.Name, UUID: FormatUUID(dom.UUID)}

	// agentStatus asks the agent through testvm (virsh), independently of
	// the code under test.
	agentStatus := func(t *testing.T) string {
		t.Helper()
		var st string
		if err := g.Agent(ctx, cmdStatus, nil, &st); err != nil {
			t.Fatalf("guest-fsfreeze-status through virsh: %v", err)
		}
		return st
	}
	waitAgentBack := func(t *testing.T) {
		t.Helper()
		for deadline := time.Now().Add(60 * time.Second); f.Ping(ctx) != nil; time.Sleep(500 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the guest agent did not come back within 60 s")
			}
		}
	}

	t.Run("freeze and thaw", func(t *testing.T) {
		if err := f.Ping(ctx); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		n, err := f.Freeze(ctx)
		frozeIn := time.Since(start)
		if err != nil || n < 2 {
			t.Fatalf("Freeze = %d, %v; want at least 2 filesystems (/ and /data)", n, err)
		}
		if st := agentStatus(t); st != StatusFrozen {
			t.Errorf("after Freeze the agent says %q", st)
		}
		start = time.Now()
		if m, err := f.Thaw(ctx); err != nil || m != n {
			t.Fatalf("Thaw = %d, %v; want %d", m, err, n)
		}
		thawedIn := time.Since(start)
		if st := agentStatus(t); st != StatusThawed {
			t.Errorf("after Thaw the agent says %q", st)
		}
		t.Logf("froze %d filesystems in %s, thawed in %s", n, frozeIn.Round(time.Millisecond), thawedIn.Round(time.Millisecond))
	})

	t.Run("SIGKILL while frozen", func(t *testing.T) {
		child, wdPID := freezingChild(t, childSpec{Libvirt: target})
		if st := agentStatus(t); st != StatusFrozen {
			t.Fatalf("child says frozen, agent says %q", st)
		}
		killed := killGroup(t, child)
		for {
			st, err := f.Status(ctx)
			if err == nil && st == StatusThawed {
				break
			}
			if time.Since(killed) > 5*time.Second {
				t.Fatalf("guest still %q (%v) 5 s after kura was killed", st, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
		d := time.Since(killed)
		t.Logf("guest thawed %s after SIGKILL of kura's process group (status polled every 10ms)", d.Round(time.Millisecond))
		if d > 2*time.Second {
			t.Errorf("thaw took %s, want at most 2 s", d)
		}
		waitProcessGone(t, wdPID, 5*time.Second)
	})

	t.Run("agent stopped", func(t *testing.T) {
		// systemd, not the agent, stops it and starts it again 8 s later;
		// the stop waits 2 s so that the agent first reports systemd-run's
		// exit status to g.Exec.
		script := "sleep 2; systemctl stop qemu-guest-agent; sleep 8; systemctl start qemu-guest-agent"
		if out, code, err := g.Exec(ctx, "/usr/bin/systemd-run", "/bin/sh", "-c", script); err != nil || code != 0 {
			t.Fatalf("systemd-run: %d %v %s", code, err, out)
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			start := time.Now()
			err := f.Ping(ctx)
			if errors.Is(err, ErrUnresponsive) {
				t.Logf("Ping failed in %s: %v", time.Since(start).Round(time.Millisecond), err)
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("Ping with the agent stopped: %v; want ErrUnresponsive", err)
			}
		}
		start := time.Now()
		n, ferr := f.Freeze(ctx)
		if ferr == nil {
			f.Thaw(ctx)
			t.Fatalf("Freeze with the agent stopped froze %d filesystems", n)
		}
		if !errors.Is(ferr, ErrUnresponsive) {
			t.Fatalf("Freeze with the agent stopped: %v; want ErrUnresponsive", ferr)
		}
		t.Logf("with the agent stopped, Freeze failed in %s: %v", time.Since(start).Round(time.Millisecond), ferr)
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %s", d)
		}
		waitAgentBack(t)
		if st := agentStatus(t); st != StatusThawed {
			t.Errorf("agent says %q", st)
		}
	})

	t.Run("agent hangs during freeze", func(t *testing.T) {
		// An fsfreeze hook stalls the freeze for 8 s while the agent still
		// answers pings: libvirt's freeze times out, but the agent freezes
		// once the hook returns. Kura's thaw fails too (the agent is busy);
		// the watchdog keeps thawing until the agent says "thawed".
		waitAgentBack(t) // whatever the subtest before left
		installHangHook(t, ctx, g)
		if out, code, err := g.Exec(ctx, "/bin/sh", "-c", "echo 8 >/run/kura-hang-freeze"); err != nil || code != 0 {
			t.Fatalf("%d %v %s", code, err, out)
		}
		defer g.Exec(ctx, "/bin/rm", "-f", "/run/kura-hang-freeze")
		short := Timeouts{Freeze: 3 * time.Second, Thaw: 2 * time.Second}
		wd, err := StartWatchdog(ctx, WatchdogSpec{Libvirt: target, Thaw: true, RetryFor: 60 * time.Second, Timeouts: short})
		if err != nil {
			t.Fatal(err)
		}
		hf := NewLibvirt(l, dom, short)
		start := time.Now()
		n, ferr := hf.Freeze(ctx)
		failedIn := time.Since(start)
		if ferr == nil {
			hf.Thaw(ctx)
			wd.Disarm(ctx)
			t.Fatalf("Freeze with a hook that hangs froze %d filesystems", n)
		}
		if !errors.Is(ferr, ErrTimeout) && !errors.Is(ferr, ErrUnresponsive) {
			t.Errorf("Freeze: %v; want ErrTimeout or ErrUnresponsive", ferr)
		}
		if failedIn > short.Freeze+rpcSlack {
			t.Errorf("Freeze failed after %s, timeout %s", failedIn, short.Freeze)
		}
		t.Logf("freeze of a hung agent failed after %s: %v", failedIn.Round(time.Millisecond), ferr)
		hf.Thaw(ctx)
		if err := wd.Fire(ctx); err != nil {
			t.Fatalf("watchdog: %v", err)
		}
		t.Logf("watchdog confirmed the guest thawed %s after the freeze call", time.Since(start).Round(time.Millisecond))
		if st := agentStatus(t); st != StatusThawed {
			t.Fatalf("after the watchdog the agent says %q", st)
		}
	})

	t.Run("VM gone", func(t *testing.T) {
		gone := golibvirt.Domain{Name: "kura-no-such-vm", UUID: golibvirt.UUID{1, 2, 3}}
		_, err := NewLibvirt(l, gone, Timeouts{}).Freeze(ctx)
		if !errors.Is(err, ErrNotRunning) {
			t.Fatalf("Freeze of a missing VM: %v; want ErrNotRunning", err)
		}
	})
}
