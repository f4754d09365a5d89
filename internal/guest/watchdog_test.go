package guest

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestWatchdogSpecValidate(t *testing.T) {
	lv := &LibvirtTarget{Socket: "/s", URI: "qemu:///system", Domain: "d", UUID: "a0827e4c-55bf-4bfd-bb66-938a83e1f202"}
	tests := []struct {
		name string
		spec WatchdogSpec
		want string // "" for valid
	}{
		{"agent socket", WatchdogSpec{AgentSocket: "/a", Thaw: true}, ""},
		{"libvirt thaw and resume", WatchdogSpec{Libvirt: lv, Thaw: true, Resume: true}, ""},
		{"no guest", WatchdogSpec{Thaw: true}, "names no guest"},
		{"two guests", WatchdogSpec{Libvirt: lv, AgentSocket: "/a", Thaw: true}, "names two guests"},
		{"nothing to do", WatchdogSpec{AgentSocket: "/a"}, "nothing to guard"},
		{"resume needs libvirt or qmp", WatchdogSpec{AgentSocket: "/a", Resume: true}, "Resume needs a libvirt guest or a QMP socket"},
		{"qmp resume", WatchdogSpec{QMPSocket: "/q", Resume: true}, ""},
		{"qmp resume and agent thaw", WatchdogSpec{QMPSocket: "/q", AgentSocket: "/a", Resume: true, Thaw: true}, ""},
		{"thaw needs an agent", WatchdogSpec{QMPSocket: "/q", Thaw: true}, "Thaw needs a libvirt guest or an agent socket"},
		{"libvirt and qmp", WatchdogSpec{Libvirt: lv, QMPSocket: "/q", Resume: true}, "names two guests"},
		{"libvirt without uuid", WatchdogSpec{Libvirt: &LibvirtTarget{Socket: "/s", URI: "u"}, Thaw: true}, "needs Socket, URI and UUID"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.spec.validate()
			if (err == nil) != (tt.want == "") || (err != nil && !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("validate = %v; want %q", err, tt.want)
			}
		})
	}
}

func TestUUIDRoundTrip(t *testing.T) {
	const s = "a0827e4c-55bf-4bfd-bb66-938a83e1f202"
	u, err := parseUUID(s)
	if err != nil || FormatUUID(u) != s {
		t.Fatalf("parseUUID(%s) = %v, %v -> %s", s, u, err, FormatUUID(u))
	}
	if _, err := parseUUID("nonsense"); err == nil {
		t.Fatal("parseUUID accepted nonsense")
	}
}

// freezeUnder starts a watchdog for a and freezes a through the socket.
func freezeUnder(t *testing.T, a *fakeAgent, spec WatchdogSpec) (*Watchdog, Freezer) {
	t.Helper()
	ctx := context.Background()
	spec.AgentSocket, spec.Thaw = a.path, true
	if spec.RetryFor == 0 {
		spec.RetryFor = 10 * time.Second
	}
	wd, err := StartWatchdog(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wd.Fire(ctx) })
	f := NewSocket(a.path, Timeouts{Freeze: 300 * time.Millisecond, Thaw: 300 * time.Millisecond})
	if _, err := f.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	return wd, f
}

func waitThawed(t *testing.T, a *fakeAgent, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for a.isFrozen() {
		if time.Since(start) > within {
			t.Fatalf("guest still frozen %s later", within)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func TestWatchdogDisarmAfterThaw(t *testing.T) {
	ctx := context.Background()
	a := newFakeAgent(t)
	wd, f := freezeUnder(t, a, WatchdogSpec{})
	if _, err := f.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
	before := len(a.commands())
	if err := wd.Disarm(ctx); err != nil {
		t.Fatalf("Disarm: %v", err)
	}
	if cmds := a.commands()[before:]; len(cmds) != 0 {
		t.Errorf("a disarmed watchdog talked to the agent: %v", cmds)
	}
}

func TestWatchdogFireThaws(t *testing.T) {
	a := newFakeAgent(t)
	wd, _ := freezeUnder(t, a, WatchdogSpec{})
	if err := wd.Fire(context.Background()); err != nil {
		t.Fatalf("Fire: %v", err)
	}
	if a.isFrozen() {
		t.Fatal("guest still frozen after Fire returned")
	}
}

func TestWatchdogDeadline(t *testing.T) {
	a := newFakeAgent(t)
	wd, _ := freezeUnder(t, a, WatchdogSpec{Deadline: 500 * time.Millisecond})
	d := waitThawed(t, a, 5*time.Second)
	t.Logf("thawed %s after the freeze (deadline 500ms)", d.Round(time.Millisecond))
	if err := wd.Disarm(context.Background()); !errors.Is(err, ErrWatchdogFired) {
		t.Fatalf("Disarm after the deadline: %v; want ErrWatchdogFired", err)
	}
}

// A freeze that hangs in the agent and takes effect only later (the agent
// was stuck) is undone: the watchdog keeps thawing until the agent, which
// runs commands in order, reports "thawed".
func TestWatchdogFireAfterLateFreeze(t *testing.T) {
	ctx := context.Background()
	a := newFakeAgent(t)
	release := a.hangOn(cmdFreeze)
	defer release()
	wd, err := StartWatchdog(ctx, WatchdogSpec{AgentSocket: a.path, Thaw: true, RetryFor: 10 * time.Second,
		Timeouts: Timeouts{Thaw: 300 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	f := NewSocket(a.path, Timeouts{Freeze: 300 * time.Millisecond, Thaw: 300 * time.Millisecond})
	if _, err := f.Freeze(ctx); !errors.Is(err, ErrTimeout) {
		t.Fatalf("Freeze of a stuck agent: %v; want ErrTimeout", err)
	}
	if _, err := f.Thaw(ctx); err == nil {
		t.Fatal("Thaw of a stuck agent succeeded")
	}
	time.AfterFunc(time.Second, release) // the agent comes back and freezes
	start := time.Now()
	if err := wd.Fire(ctx); err != nil {
		t.Fatalf("Fire: %v", err)
	}
	if a.isFrozen() {
		t.Fatal("guest frozen after the watchdog reported it thawed")
	}
	t.Logf("watchdog confirmed the thaw %s after firing (agent stuck for 1s)", time.Since(start).Round(time.Millisecond))
}

// The point of the watchdog: Kura killed with SIGKILL (its whole process
// group) while the guest is frozen, and the guest is thawed at once.
func TestWatchdogThawsAfterSIGKILL(t *testing.T) {
	a := newFakeAgent(t)
	child, wdPID := freezingChild(t, childSpec{AgentSocket: a.path})
	if !a.isFrozen() {
		t.Fatal("child says frozen, agent is not")
	}
	killed := killGroup(t, child)
	d := waitThawed(t, a, 3*time.Second)
	t.Logf("guest thawed %s after SIGKILL of kura's process group", d.Round(time.Microsecond))
	_ = killed
	waitProcessGone(t, wdPID, 5*time.Second)
}

func TestStartWatchdogProgramWithoutWatchdogMain(t *testing.T) {
	a := newFakeAgent(t)
	start := time.Now()
	_, err := StartWatchdog(context.Background(), WatchdogSpec{AgentSocket: a.path, Thaw: true, Executable: "/bin/true"})
	if err == nil || !strings.Contains(err.Error(), "WatchdogMain") {
		t.Fatalf("StartWatchdog with /bin/true: %v; want an error naming WatchdogMain", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %s to notice", d)
	}
}

func TestStartWatchdogUnreachableGuest(t *testing.T) {
	_, err := StartWatchdog(context.Background(), WatchdogSpec{AgentSocket: "/nonexistent/qga.sock", Thaw: true})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/qga.sock") {
		t.Fatalf("StartWatchdog: %v; want an error naming the socket", err)
	}
}
