package testvm

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"
)

// ErrAgent is returned (wrapped) when the guest agent answers a command with
// an error, or does not answer in time.
var ErrAgent = errors.New("guest agent")

// agentTransport sends one guest agent command and returns its "return"
// value. libvirt guests go through virsh, plain QEMU guests through the
// agent's unix socket.
type agentTransport interface {
	command(ctx context.Context, cmd []byte) (json.RawMessage, error)
	close() error
}

// agentReply is a guest agent response.
type agentReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

func (r agentReply) result() (json.RawMessage, error) {
	if r.Error != nil {
		return nil, fmt.Errorf("%w: %s: %s", ErrAgent, r.Error.Class, r.Error.Desc)
	}
	if r.Return == nil {
		return nil, fmt.Errorf("%w: reply has neither return nor error", ErrAgent)
	}
	return r.Return, nil
}

// Agent sends a command (such as "guest-fsfreeze-freeze") with args (nil, or
// a value that marshals to a JSON object) to the guest agent and decodes its
// return value into result (nil to ignore it). Commands that never answer
// (guest-shutdown) end with ctx.
func (g *Guest) Agent(ctx context.Context, command string, args, result any) error {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding %s: %w", command, err)
	}
	ret, err := g.agent.command(ctx, b)
	if err != nil {
		return fmt.Errorf("guest %s: %s: %w", g.Name, command, err)
	}
	if result != nil {
		if err := json.Unmarshal(ret, result); err != nil {
			return fmt.Errorf("guest %s: decoding the reply to %s: %w", g.Name, command, err)
		}
	}
	return nil
}

// ExecResult is the outcome of a command run in the guest.
type ExecResult struct {
	Stdout   string
	Stderr   string
	ExitCode int // -1 when killed by a signal
	Signal   int // the signal that killed it, 0 if none
}

// Exec runs path with args in the guest (guest-exec, then guest-exec-status
// until it exits) and returns its standard output and exit status. err is set
// only when the command could not be run or waited for; a command that ran and
// failed has a non-zero exitcode, and its standard error is in ExecFull's
// result.
func (g *Guest) Exec(ctx context.Context, path string, args ...string) (stdout string, exitcode int, err error) {
	r, err := g.ExecFull(ctx, nil, path, args...)
	return r.Stdout, r.ExitCode, err
}

// ExecFull is Exec with standard input and the whole result.
func (g *Guest) ExecFull(ctx context.Context, stdin []byte, path string, args ...string) (ExecResult, error) {
	req := map[string]any{"path": path, "arg": args, "capture-output": true}
	if args == nil {
		req["arg"] = []string{}
	}
	if stdin != nil {
		req["input-data"] = base64.StdEncoding.EncodeToString(stdin)
	}
	var started struct {
		PID int `json:"pid"`
	}
	if err := g.Agent(ctx, "guest-exec", req, &started); err != nil {
		return ExecResult{ExitCode: -1}, err
	}
	delay := 20 * time.Millisecond
	for {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode *int   `json:"exitcode"`
			Signal   *int   `json:"signal"`
			OutData  string `json:"out-data"`
			ErrData  string `json:"err-data"`
			OutTrunc bool   `json:"out-truncated"`
			ErrTrunc bool   `json:"err-truncated"`
		}
		if err := g.Agent(ctx, "guest-exec-status", map[string]any{"pid": started.PID}, &st); err != nil {
			return ExecResult{ExitCode: -1}, fmt.Errorf("waiting for %s: %w", path, err)
		}
		if st.Exited {
			out, err1 := base64.StdEncoding.DecodeString(st.OutData)
			errOut, err2 := base64.StdEncoding.DecodeString(st.ErrData)
			r := ExecResult{Stdout: string(out), Stderr: string(errOut), ExitCode: -1}
			if err := errors.Join(err1, err2); err != nil {
				return r, fmt.Errorf("guest %s: decoding the output of %s: %w", g.Name, path, err)
			}
			if st.OutTrunc || st.ErrTrunc {
				return r, fmt.Errorf("guest %s: the output of %s was truncated by the guest agent (16 MiB at most): redirect it to a file", g.Name, path)
			}
			switch {
			case st.Signal != nil:
				r.Signal = *st.Signal
				return r, fmt.Errorf("guest %s: %s killed by signal %d", g.Name, path, r.Signal)
			case st.ExitCode != nil:
				r.ExitCode = *st.ExitCode
			}
			return r, nil
		}
		select {
		case <-ctx.Done():
			return ExecResult{ExitCode: -1}, fmt.Errorf("guest %s: waiting for %s (guest pid %d): %w", g.Name, path, started.PID, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 500*time.Millisecond)
	}
}

// socketAgent talks to the guest agent over the unix socket of a QEMU
// chardev (newline-delimited JSON). Before each command it resynchronises
// with guest-sync-delimited, so that replies to earlier commands that timed
// out, or requests QEMU queued while the agent was not yet running, are
// skipped.
type socketAgent struct {
	path string

	mu   sync.Mutex
	conn net.Conn
	rd   *bufio.Reader
	id   uint64
}

// syncTimeout bounds one resynchronisation; an agent that is not up yet gets
// another try.
const syncTimeout = 3 * time.Second

func (a *socketAgent) command(ctx context.Context, cmd []byte) (json.RawMessage, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	ret, err := a.commandLocked(ctx, cmd)
	if err != nil && a.conn != nil {
		// The stream's state is unknown: start afresh next time.
		a.conn.Close()
		a.conn, a.rd = nil, nil
	}
	return ret, err
}

func (a *socketAgent) commandLocked(ctx context.Context, cmd []byte) (json.RawMessage, error) {
	if a.conn == nil {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", a.path)
		if err != nil {
			return nil, fmt.Errorf("%w: connecting to %s: %w", ErrAgent, a.path, err)
		}
		a.conn, a.rd = c, bufio.NewReader(c)
	}
	conn := a.conn
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	deadline := time.Now().Add(syncTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	a.conn.SetDeadline(deadline)
	a.id++
	id := a.id<<16 | uint64(time.Now().UnixNano()&0xffff)
	// 0xFF resets the agent's JSON parser after a partial request.
	sync := fmt.Sprintf("\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":%d}}\n", id)
	if _, err := a.conn.Write([]byte(sync)); err != nil {
		return nil, a.ioError(ctx, "sending guest-sync-delimited", err)
	}
	for {
		// The agent writes 0xFF before its reply to guest-sync-delimited;
		// everything before it is stale.
		if _, err := a.rd.ReadBytes(0xff); err != nil {
			return nil, a.ioError(ctx, "waiting for guest-sync-delimited", err)
		}
		line, err := a.rd.ReadBytes('\n')
		if err != nil {
			return nil, a.ioError(ctx, "reading guest-sync-delimited", err)
		}
		var r struct {
			Return uint64 `json:"return"`
		}
		if json.Unmarshal(line, &r) == nil && r.Return == id {
			break
		}
	}

	a.conn.SetDeadline(time.Time{})
	if d, ok := ctx.Deadline(); ok {
		a.conn.SetDeadline(d)
	}
	if err := ctx.Err(); err != nil { // cancelled while the deadline was reset
		return nil, fmt.Errorf("%w: %w", ErrAgent, err)
	}
	if _, err := a.conn.Write(append(cmd, '\n')); err != nil {
		return nil, a.ioError(ctx, "sending command", err)
	}
	for {
		line, err := a.rd.ReadBytes('\n')
		if err != nil {
			return nil, a.ioError(ctx, "reading reply", err)
		}
		if strings.TrimSpace(string(line)) == "" {
			continue
		}
		var r agentReply
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, fmt.Errorf("%w: bad reply %q: %w", ErrAgent, line, err)
		}
		return r.result()
	}
}

func (a *socketAgent) ioError(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w: %s on %s: %w", ErrAgent, what, a.path, ctx.Err())
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w: %s on %s: no answer (is the agent running in the guest?): %w", ErrAgent, what, a.path, err)
	}
	return fmt.Errorf("%w: %s on %s: %w", ErrAgent, what, a.path, err)
}

func (a *socketAgent) close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.conn == nil {
		return nil
	}
	err := a.conn.Close()
	a.conn, a.rd = nil, nil
	return err
}

// virshAgent talks to the guest agent of a libvirt domain through
// virsh qemu-agent-command; libvirt itself owns the agent's channel.
type virshAgent struct {
	domain string
}

func (a *virshAgent) command(ctx context.Context, cmd []byte) (json.RawMessage, error) {
	timeout := 10 * time.Second
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d))
	}
	secs := max(1, int(timeout.Round(time.Second)/time.Second))
	out, err := virsh(ctx, "qemu-agent-command", "--timeout", fmt.Sprint(secs), a.domain, string(cmd))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrAgent, err)
	}
	var r agentReply
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("%w: bad reply %q from virsh: %w", ErrAgent, out, err)
	}
	return r.result()
}

func (a *virshAgent) close() error { return nil }

// HangFreezeHook is an fsfreeze hook (see InstallFreezeHook) that stalls a
// freeze for as many seconds as /run/kura-hang-freeze says, so a test can
// make the agent hang in the middle of guest-fsfreeze-freeze while it still
// answers pings.
const HangFreezeHook = `#!/bin/sh
if [ "$1" = freeze ] && [ -f /run/kura-hang-freeze ]; then sleep "$(cat /run/kura-hang-freeze)"; fi
exit 0
`

// InstallFreezeHook makes the guest agent run hook, a script, as its
// fsfreeze hook (qemu-ga -F: run with "freeze" before the filesystems are
// frozen and "thaw" after they are thawed). It restarts the agent and waits
// until the agent runs with the hook.
func (g *Guest) InstallFreezeHook(ctx context.Context, hook string) error {
	const path = "/usr/local/bin/kura-test-hook"
	r, err := g.ExecFull(ctx, []byte(hook), "/bin/sh", "-c", `set -e
cat >`+path+` && chmod 755 `+path+`
cat >/etc/systemd/system/qemu-guest-agent.service.d/zz-kura-test.conf <<'EOF'
[Service]
ExecStart=
ExecStart=/usr/sbin/qemu-ga --method=virtio-serial --path=/dev/virtio-ports/org.qemu.guest_agent.0 -F`+path+`
EOF
systemctl daemon-reload`)
	if err == nil && r.ExitCode != 0 {
		err = fmt.Errorf("exit status %d: %s", r.ExitCode, strings.TrimSpace(r.Stderr))
	}
	if err != nil {
		return fmt.Errorf("guest %s: installing the fsfreeze hook: %w", g.Name, err)
	}
	// The restart kills the agent that runs this command: no answer expected.
	g.ExecFull(ctx, nil, "/usr/bin/systemd-run", "--no-block", "/bin/systemctl", "restart", "qemu-guest-agent")
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(time.Second) {
		r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", "cat /proc/$(pidof qemu-ga)/cmdline")
		if err == nil && strings.Contains(r.Stdout, path) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("guest %s: qemu-ga did not restart with the fsfreeze hook: %q, %v\n%s", g.Name, r.Stdout, err, consoleTail(g.ConsoleLog))
		}
	}
}
