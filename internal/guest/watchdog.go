package guest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/kura-backup/kura/internal/childenv"
)

// WatchdogArg is the first argument with which StartWatchdog runs the
// program again; its main must then call WatchdogMain:
//
//	if len(os.Args) > 1 && os.Args[1] == guest.WatchdogArg {
//		os.Exit(guest.WatchdogMain(os.Args[2:]))
//	}
const WatchdogArg = "__thaw-watchdog"

// WatchdogSpec says how the watchdog reaches the guest, what it undoes and
// when it gives up on Kura. The guest is a libvirt domain (Libvirt) or a
// plain QEMU process (AgentSocket to thaw it, QMPSocket to resume it); at
// least one of Thaw and Resume is set.
type WatchdogSpec struct {
	Libvirt     *LibvirtTarget `json:"libvirt,omitempty"`
	AgentSocket string         `json:"agent_socket,omitempty"`
	// QMPSocket is the QMP socket of a plain QEMU process, for Resume.
	// QEMU serves one QMP client at a time: the watchdog reaches it once
	// Kura's connection is closed (Kura gone, or Kura firing it after
	// closing its own).
	QMPSocket string `json:"qmp_socket,omitempty"`
	// Thaw thaws the guest's filesystems through its agent when the
	// watchdog fires, and checks guest-fsfreeze-status until it says
	// "thawed" (a capture in app mode).
	Thaw bool `json:"thaw,omitempty"`
	// Resume resumes the domain if it is paused when the watchdog fires (a
	// capture in suspend mode): through libvirt, or with QMP cont.
	Resume bool `json:"resume,omitempty"`
	// Deadline is how long after it started the watchdog thaws the guest
	// even though Kura still holds the pipe (Kura hangs). Zero means 30 s.
	Deadline time.Duration `json:"deadline,omitempty"`
	// RetryFor is how long the watchdog keeps trying to thaw once it fires
	// (an agent busy with a late freeze answers only after it). Zero means
	// 2 minutes.
	RetryFor time.Duration `json:"retry_for,omitempty"`
	Timeouts Timeouts      `json:"timeouts,omitempty"`
	// Executable is the program to run as the watchdog; "" means
	// os.Executable(). It must call WatchdogMain (see WatchdogArg).
	Executable string `json:"-"`
}

// LibvirtTarget names a libvirt domain for the watchdog.
type LibvirtTarget struct {
	Socket string `json:"socket"` // libvirtd's unix socket
	URI    string `json:"uri"`    // the driver URI to open, "qemu:///system"
	Domain string `json:"domain"` // the domain's name, for messages
	UUID   string `json:"uuid"`   // the domain's UUID, how it is looked up
}

// Defaults of WatchdogSpec.
const (
	DefaultWatchdogDeadline = 30 * time.Second
	DefaultWatchdogRetryFor = 2 * time.Minute
)

// Exit codes of the watchdog process, which tell Kura what it did.
const (
	exitDisarmed     = 0  // Kura said "done": nothing to do
	exitUsage        = 2  // bad arguments, or the guest cannot be reached
	exitThawedLost   = 10 // Kura went away; the watchdog thawed the guest
	exitThawedExpiry = 11 // the deadline passed; the watchdog thawed the guest
	exitThawFailed   = 12 // the watchdog tried to thaw and could not confirm it
)

// Errors of Watchdog.Disarm.
var (
	// ErrWatchdogFired is returned by Disarm when the deadline passed
	// before Kura disarmed the watchdog: the watchdog thawed the guest,
	// perhaps while Kura still relied on it being frozen.
	ErrWatchdogFired = errors.New("thaw watchdog fired: the deadline passed while the guest was frozen")
	// ErrThawFailed is returned when the watchdog could not confirm that the
	// guest is thawed: it may still be frozen; thaw it by hand
	// (virsh domfsthaw DOMAIN).
	ErrThawFailed = errors.New("thaw watchdog could not thaw the guest")
)

func (s WatchdogSpec) withDefaults() WatchdogSpec {
	if s.Deadline <= 0 {
		s.Deadline = DefaultWatchdogDeadline
	}
	if s.RetryFor <= 0 {
		s.RetryFor = DefaultWatchdogRetryFor
	}
	s.Timeouts = s.Timeouts.withDefaults()
	return s
}

func (s WatchdogSpec) validate() error {
	switch {
	case s.Libvirt == nil && s.AgentSocket == "" && s.QMPSocket == "":
		return errors.New("watchdog spec names no guest: set Libvirt, AgentSocket or QMPSocket")
	case s.Libvirt != nil && (s.AgentSocket != "" || s.QMPSocket != ""):
		return errors.New("watchdog spec names two guests: set Libvirt or the sockets of a plain QEMU, not both")
	case s.Libvirt != nil && (s.Libvirt.Socket == "" || s.Libvirt.URI == "" || s.Libvirt.UUID == ""):
		return errors.New("watchdog spec: a libvirt guest needs Socket, URI and UUID")
	case !s.Thaw && !s.Resume:
		return errors.New("watchdog spec: nothing to guard: set Thaw or Resume")
	case s.Resume && s.Libvirt == nil && s.QMPSocket == "":
		return errors.New("watchdog spec: Resume needs a libvirt guest or a QMP socket")
	case s.Thaw && s.Libvirt == nil && s.AgentSocket == "":
		return errors.New("watchdog spec: Thaw needs a libvirt guest or an agent socket")
	}
	return nil
}

func (s WatchdogSpec) guestName() string {
	if s.Libvirt != nil {
		return "VM " + s.Libvirt.Domain
	}
	if s.AgentSocket != "" {
		return "the guest of agent socket " + s.AgentSocket
	}
	return "the VM of QMP socket " + s.QMPSocket
}

// Watchdog is a running watchdog process guarding one freeze (or pause).
type Watchdog struct {
	spec  WatchdogSpec
	cmd   *exec.Cmd
	stdin io.WriteCloser
	// exited is closed when the process has been reaped; code is its exit
	// status then.
	exited chan struct{}
	code   int
	done   bool
}

// startTimeout bounds the wait for the watchdog to say it is ready.
const startTimeout = 15 * time.Second

// StartWatchdog starts the watchdog process for one freeze and returns
// once it has reached the guest (libvirt) and is ready to thaw it. Call it
// before freezing; after thawing, call Disarm. If Kura exits without
// Disarm, even by SIGKILL, or hangs past spec.Deadline, the watchdog thaws
// the guest.
//
// The watchdog runs the program again (spec.Executable, else
// os.Executable()) with WatchdogArg and the spec, in a session of its own
// so that signals to Kura's process group do not reach it, and with a pipe
// on its standard input whose closing tells it Kura is gone.
func StartWatchdog(ctx context.Context, spec WatchdogSpec) (*Watchdog, error) {
	spec = spec.withDefaults()
	if err := spec.validate(); err != nil {
		return nil, err
	}
	exe := spec.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("starting the thaw watchdog: finding this program: %w", err)
		}
	}
	arg, err := json.Marshal(spec)
	if err != nil {
		return nil, fmt.Errorf("starting the thaw watchdog: %w", err)
	}
	cmd := childenv.Command(exe, WatchdogArg, string(arg))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Stderr = os.Stderr // what it did when Kura is gone reaches the user
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("starting the thaw watchdog: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("starting the thaw watchdog: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the thaw watchdog %s: %w", exe, err)
	}
	w := &Watchdog{spec: spec, cmd: cmd, stdin: stdin, exited: make(chan struct{})}

	// Read the one status line before Wait, which closes stdout.
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- strings.TrimSpace(l)
	}()
	var ready string
	timer := time.NewTimer(startTimeout)
	defer timer.Stop()
	select {
	case ready = <-line:
	case <-ctx.Done():
	case <-timer.C:
	}
	go w.wait()
	switch {
	case ready == "ready":
		return w, nil
	case strings.HasPrefix(ready, "error: "):
		w.kill()
		return nil, fmt.Errorf("starting the thaw watchdog for %s: %s", spec.guestName(), strings.TrimPrefix(ready, "error: "))
	case ctx.Err() != nil:
		w.kill()
		return nil, fmt.Errorf("starting the thaw watchdog for %s: %w", spec.guestName(), ctx.Err())
	}
	w.kill()
	return nil, fmt.Errorf("starting the thaw watchdog for %s: %s did not report ready within %s (got %q): its main must call guest.WatchdogMain when os.Args[1] is %q",
		spec.guestName(), exe, startTimeout, ready, WatchdogArg)
}

func (w *Watchdog) wait() {
	err := w.cmd.Wait()
	w.code = w.cmd.ProcessState.ExitCode()
	if err != nil && w.code == 0 {
		w.code = -1
	}
	close(w.exited)
}

// kill ends a watchdog that never became ready (it has thawed nothing).
func (w *Watchdog) kill() {
	w.cmd.Process.Kill()
	w.stdin.Close()
	<-w.exited
}

// PID is the watchdog's process id.
func (w *Watchdog) PID() int { return w.cmd.Process.Pid }

// Disarm tells the watchdog that Kura thawed the guest itself, and waits
// for it to exit. It returns ErrWatchdogFired if the deadline had passed
// and the watchdog thawed the guest (then the guest was not frozen for the
// whole time Kura needed), ErrThawFailed if the watchdog failed at that.
func (w *Watchdog) Disarm(ctx context.Context) error {
	if w.done {
		return nil
	}
	w.done = true
	_, werr := io.WriteString(w.stdin, "done\n")
	w.stdin.Close()
	code, err := w.result(ctx)
	if err != nil {
		return err
	}
	switch code {
	case exitDisarmed:
		return nil
	case exitThawedExpiry, exitThawedLost:
		return fmt.Errorf("%s: %w after %s", w.spec.guestName(), ErrWatchdogFired, w.spec.Deadline)
	case exitThawFailed:
		return fmt.Errorf("%s: %w: it may still be frozen", w.spec.guestName(), ErrThawFailed)
	}
	if werr != nil {
		return fmt.Errorf("disarming the thaw watchdog of %s: %w (exit status %d)", w.spec.guestName(), werr, code)
	}
	return fmt.Errorf("thaw watchdog of %s exited with status %d", w.spec.guestName(), code)
}

// Fire makes the watchdog thaw the guest now, as it would if Kura died,
// and waits until it has confirmed the guest is thawed (or given up, after
// spec.RetryFor, or when ctx ends). Use it when Kura's own thaw failed.
func (w *Watchdog) Fire(ctx context.Context) error {
	if w.done {
		return nil
	}
	w.done = true
	io.WriteString(w.stdin, "fire\n")
	w.stdin.Close()
	code, err := w.result(ctx)
	if err != nil {
		return err
	}
	switch code {
	case exitThawedLost, exitThawedExpiry:
		return nil
	case exitThawFailed:
		return fmt.Errorf("%s: %w: it may still be frozen", w.spec.guestName(), ErrThawFailed)
	}
	return fmt.Errorf("thaw watchdog of %s exited with status %d", w.spec.guestName(), code)
}

func (w *Watchdog) result(ctx context.Context) (int, error) {
	select {
	case <-w.exited:
		return w.code, nil
	case <-ctx.Done():
		return 0, fmt.Errorf("waiting for the thaw watchdog of %s (pid %d): %w; it keeps running and thaws the guest", w.spec.guestName(), w.PID(), ctx.Err())
	}
}

// WatchdogMain is the watchdog process: args are what follows WatchdogArg
// on its command line. It returns the process's exit status.
func WatchdogMain(args []string) int {
	// Kura's terminal or pipes may be gone when the watchdog has something
	// to say; it must not die of that, nor of a Ctrl-C meant for Kura, nor
	// of the SIGTERM systemd sends to every process of a stopping service
	// (it then outlives Kura, thaws, and exits well before the SIGKILL).
	signal.Ignore(syscall.SIGPIPE, syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM)
	started := time.Now()
	say := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "kura thaw watchdog (pid %d): "+format+"\n", append([]any{os.Getpid()}, a...)...)
	}
	ready := func(msg string) {
		fmt.Fprintln(os.Stdout, msg)
		os.Stdout.Close()
	}
	if len(args) != 1 {
		ready("error: usage: " + WatchdogArg + " SPEC-JSON")
		return exitUsage
	}
	var spec WatchdogSpec
	if err := json.Unmarshal([]byte(args[0]), &spec); err != nil {
		ready("error: bad spec: " + err.Error())
		return exitUsage
	}
	spec = spec.withDefaults()
	if err := spec.validate(); err != nil {
		ready("error: " + err.Error())
		return exitUsage
	}
	ctx := context.Background()
	target, err := newWatchdogTarget(ctx, spec)
	if err != nil {
		ready("error: " + err.Error())
		return exitUsage
	}
	defer target.close()

	// Kura writes "done" (it thawed) or "fire" (thaw now) and closes the
	// pipe; a pipe closed without either is Kura gone.
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(os.Stdin).ReadString('\n')
		line <- strings.TrimSpace(l)
	}()
	ready("ready")

	deadline := time.NewTimer(spec.Deadline - time.Since(started))
	defer deadline.Stop()
	var why string
	code := exitThawedLost
	select {
	case l := <-line:
		switch l {
		case "done":
			return exitDisarmed
		case "fire":
			why = "kura could not undo the freeze or pause itself"
		default:
			why = "kura went away while it was frozen or paused"
		}
	case <-deadline.C:
		why = fmt.Sprintf("kura did not undo the freeze or pause within %s", spec.Deadline)
		code = exitThawedExpiry
	}
	fired := time.Now()
	if err := target.thaw(ctx, spec.RetryFor); err != nil {
		say("%s: %s; undoing it failed for %s: %v; thaw or resume it by hand", spec.guestName(), why, spec.RetryFor, err)
		return exitThawFailed
	}
	say("%s: %s; the watchdog thawed or resumed it in %s", spec.guestName(), why, time.Since(fired).Round(time.Millisecond))
	return code
}

// watchdogTarget is the guest as the watchdog reaches it.
type watchdogTarget struct {
	spec WatchdogSpec
	l    *golibvirt.Libvirt // libvirt only; redialled after a failure
	dom  golibvirt.Domain
}

func newWatchdogTarget(ctx context.Context, spec WatchdogSpec) (*watchdogTarget, error) {
	t := &watchdogTarget{spec: spec}
	if spec.Libvirt == nil {
		// QEMU's chardevs take one client at a time and Kura may be it:
		// connect only when firing.
		for _, s := range []string{spec.AgentSocket, spec.QMPSocket} {
			if _, err := os.Stat(s); s != "" && err != nil {
				return nil, fmt.Errorf("socket of the guest: %w", err)
			}
		}
		return t, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := t.connect(ctx); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *watchdogTarget) connect(ctx context.Context) error {
	lt := t.spec.Libvirt
	uuid, err := parseUUID(lt.UUID)
	if err != nil {
		return err
	}
	l, err := dialLibvirt(ctx, lt.Socket, lt.URI)
	if err != nil {
		return err
	}
	dom, err := Call(ctx, func() (golibvirt.Domain, error) { return l.DomainLookupByUUID(uuid) })
	if err != nil {
		go l.Disconnect()
		return fmt.Errorf("looking up VM %s (%s): %w", lt.Domain, lt.UUID, err)
	}
	t.l, t.dom = l, dom
	return nil
}

func (t *watchdogTarget) close() {
	if t.l != nil {
		done := make(chan struct{})
		go func() { t.l.Disconnect(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
		}
		t.l = nil
	}
}

func (t *watchdogTarget) freezer() Freezer {
	if t.l != nil {
		return NewLibvirt(t.l, t.dom, t.spec.Timeouts)
	}
	return NewSocket(t.spec.AgentSocket, t.spec.Timeouts)
}

// thaw thaws the guest (and resumes it, if asked) until the agent says it
// is thawed, retrying for up to retryFor.
func (t *watchdogTarget) thaw(ctx context.Context, retryFor time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, retryFor)
	defer cancel()
	var last error
	resumed := !t.spec.Resume
	for attempt := 0; ; attempt++ {
		if t.spec.Libvirt != nil && t.l == nil {
			cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
			last = t.connect(cctx)
			ccancel()
		}
		if t.spec.Libvirt == nil || t.l != nil {
			if !resumed {
				if last = t.resume(ctx); last == nil {
					resumed = true
				}
			}
			if resumed && !t.spec.Thaw {
				return nil
			}
			if resumed {
				last = t.thawOnce(ctx)
				if last == nil || errors.Is(last, ErrNotRunning) {
					return nil
				}
			}
			if t.l != nil && !t.l.IsConnected() {
				t.close()
			}
		}
		select {
		case <-ctx.Done():
			if last == nil {
				last = ctx.Err()
			}
			return last
		case <-time.After(min(250*time.Millisecond<<min(attempt, 3), 2*time.Second)):
		}
	}
}

// thawOnce thaws and then checks guest-fsfreeze-status.
func (t *watchdogTarget) thawOnce(ctx context.Context) error {
	f := t.freezer()
	if _, err := f.Thaw(ctx); err != nil && !errors.Is(err, ErrNotRunning) {
		// Check the status anyway: a thaw error can mean "not frozen".
		if st, serr := f.Status(ctx); serr != nil || st != StatusThawed {
			return err
		}
		return nil
	} else if err != nil {
		return err
	}
	st, err := f.Status(ctx)
	if err != nil {
		return err
	}
	if st != StatusThawed {
		return fmt.Errorf("guest-fsfreeze-status says %q after thawing", st)
	}
	return nil
}

// resume resumes a paused domain (suspend mode).
func (t *watchdogTarget) resume(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if t.spec.Libvirt == nil {
		return resumeQMP(ctx, t.spec.QMPSocket)
	}
	st, err := Call(ctx, func() (int32, error) {
		s, _, err := t.l.DomainGetState(t.dom, 0)
		return s, err
	})
	if err != nil {
		if golibvirt.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("reading the state of VM %s: %w", t.dom.Name, err)
	}
	if golibvirt.DomainState(st) != golibvirt.DomainPaused {
		return nil
	}
	_, err = Call(ctx, func() (struct{}, error) { return struct{}{}, t.l.DomainResume(t.dom) })
	if err != nil {
		return fmt.Errorf("resuming VM %s: %w", t.dom.Name, err)
	}
	return nil
}

// parseUUID parses a UUID in its usual text form.
func parseUUID(s string) (golibvirt.UUID, error) {
	var u golibvirt.UUID
	h := strings.ReplaceAll(s, "-", "")
	if len(h) != 2*len(u) {
		return u, fmt.Errorf("bad UUID %q", s)
	}
	for i := range u {
		var b byte
		if _, err := fmt.Sscanf(h[2*i:2*i+2], "%02x", &b); err != nil {
			return u, fmt.Errorf("bad UUID %q", s)
		}
		u[i] = b
	}
	return u, nil
}

// FormatUUID is the usual text form of a libvirt UUID.
func FormatUUID(u golibvirt.UUID) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// resumeQMP runs QMP cont on the QEMU process of socket path if it is
// paused. It speaks just enough QMP for that: the greeting, capabilities
// negotiation, query-status and cont; events in between are skipped.
func resumeQMP(ctx context.Context, path string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return fmt.Errorf("QMP socket %s: %w", path, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	dec := json.NewDecoder(conn)
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if err := dec.Decode(&greeting); err != nil || greeting.QMP == nil {
		return fmt.Errorf("QMP socket %s: no greeting (another client may hold it): %v", path, err)
	}
	call := func(cmd string, result any) error {
		if _, err := fmt.Fprintf(conn, "{\"execute\":%q}\n", cmd); err != nil {
			return fmt.Errorf("QMP %s: %w", cmd, err)
		}
		for {
			var reply struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Desc string `json:"desc"`
				} `json:"error"`
			}
			if err := dec.Decode(&reply); err != nil {
				return fmt.Errorf("QMP %s: %w", cmd, err)
			}
			switch {
			case reply.Error != nil:
				return fmt.Errorf("QMP %s: %s", cmd, reply.Error.Desc)
			case reply.Return != nil:
				if result == nil {
					return nil
				}
				return json.Unmarshal(reply.Return, result)
			}
			// An event: read on.
		}
	}
	if err := call("qmp_capabilities", nil); err != nil {
		return err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := call("query-status", &st); err != nil {
		return err
	}
	if st.Status != "paused" {
		return nil
	}
	return call("cont", nil)
}
