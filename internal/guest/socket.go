package guest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"
)

// socketFreezer talks to the guest agent over the unix socket of a QEMU
// chardev (newline-delimited JSON, the QGA protocol).
//
// It connects for each call and disconnects after it: QEMU's chardev
// accepts one client at a time, and the thaw watchdog must be able to get
// in while Kura is between calls (or dead).
type socketFreezer struct {
	path string
	t    Timeouts
	mu   sync.Mutex // one command at a time, like the agent
}

// NewSocket returns a Freezer for the guest agent listening on the unix
// socket at path (QEMU -chardev socket,server=on,path=PATH bound to the
// org.qemu.guest_agent.0 virtio port).
func NewSocket(path string, t Timeouts) Freezer {
	return &socketFreezer{path: path, t: t.withDefaults()}
}

func (f *socketFreezer) Freeze(ctx context.Context) (int, error) {
	var n int
	err := f.command(ctx, cmdFreeze, &n)
	return n, err
}

func (f *socketFreezer) Thaw(ctx context.Context) (int, error) {
	var n int
	err := f.command(ctx, cmdThaw, &n)
	return n, err
}

func (f *socketFreezer) Ping(ctx context.Context) error {
	return f.command(ctx, cmdPing, nil)
}

func (f *socketFreezer) Status(ctx context.Context) (string, error) {
	var s string
	err := f.command(ctx, cmdStatus, &s)
	return s, err
}

// command runs one agent command: connect, resynchronise with
// guest-sync-delimited, send, read the reply, disconnect.
func (f *socketFreezer) command(ctx context.Context, cmd string, result any) error {
	timeout := f.t.timeoutFor(cmd)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	f.mu.Lock()
	defer f.mu.Unlock()
	err := f.commandLocked(ctx, cmd, result)
	if err != nil {
		return fmt.Errorf("%s on agent socket %s: %w", cmd, f.path, err)
	}
	return nil
}

func (f *socketFreezer) commandLocked(ctx context.Context, cmd string, result any) (err error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", f.path)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%w: connecting: %w", ErrUnresponsive, err)
		}
		return fmt.Errorf("%w: connecting: %w (is the VM running with its agent socket there?)", ErrUnresponsive, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	rd := bufio.NewReader(conn)

	// Resynchronise: 0xFF resets the agent's parser after a partial request
	// an earlier client left behind, and the agent writes 0xFF before its
	// reply to guest-sync-delimited, so that replies to commands earlier
	// clients gave up on can be skipped.
	var idb [6]byte
	rand.Read(idb[:])
	id := binary.BigEndian.Uint64(append([]byte{0, 0}, idb[:]...))
	sync := fmt.Sprintf("\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":%d}}\n", id)
	if _, err := conn.Write([]byte(sync)); err != nil {
		return ioError(ctx, "sending guest-sync-delimited", err, true)
	}
	for {
		if _, err := rd.ReadBytes(0xff); err != nil {
			return ioError(ctx, "waiting for the reply to guest-sync-delimited", err, true)
		}
		line, err := rd.ReadBytes('\n')
		if err != nil {
			return ioError(ctx, "reading the reply to guest-sync-delimited", err, true)
		}
		var r struct {
			Return uint64 `json:"return"`
		}
		if json.Unmarshal(line, &r) == nil && r.Return == id {
			break
		}
	}

	req, _ := json.Marshal(map[string]string{"execute": cmd})
	if _, err := conn.Write(append(req, '\n')); err != nil {
		return ioError(ctx, "sending the command", err, false)
	}
	for {
		line, err := rd.ReadBytes('\n')
		if err != nil {
			return ioError(ctx, "reading the reply", err, false)
		}
		if strings.TrimSpace(strings.Trim(string(line), "\xff")) == "" {
			continue
		}
		return decodeReply(cmd, line, result)
	}
}

// ioError says what failed; sync says whether the agent had not yet
// confirmed it is listening (then it counts as unresponsive, else as a
// command that timed out).
func ioError(ctx context.Context, what string, err error, sync bool) error {
	var ne net.Error
	timedOut := ctx.Err() != nil || (errors.As(err, &ne) && ne.Timeout())
	switch {
	case timedOut && sync:
		return fmt.Errorf("%w: %s: no answer (is qemu-ga running in the guest?)", ErrUnresponsive, what)
	case timedOut:
		return fmt.Errorf("%w: %s", ErrTimeout, what)
	case sync:
		return fmt.Errorf("%w: %s: %w", ErrUnresponsive, what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// agentReply is one reply of the guest agent.
type agentReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// decodeReply turns an agent reply into result or an *AgentError.
func decodeReply(cmd string, line []byte, result any) error {
	var r agentReply
	if err := json.Unmarshal(line, &r); err != nil {
		return fmt.Errorf("bad reply from the guest agent %q: %w", strings.TrimSpace(string(line)), err)
	}
	if r.Error != nil {
		return &AgentError{Command: cmd, Class: r.Error.Class, Desc: r.Error.Desc}
	}
	if r.Return == nil {
		return fmt.Errorf("bad reply from the guest agent %q: neither return nor error", strings.TrimSpace(string(line)))
	}
	if result != nil {
		if err := json.Unmarshal(r.Return, result); err != nil {
			return fmt.Errorf("bad reply from the guest agent %q: %w", strings.TrimSpace(string(line)), err)
		}
	}
	return nil
}
