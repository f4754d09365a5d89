package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Sentinel errors of the QMP client, for errors.Is.
var (
	// ErrClosed is returned by commands on a client whose connection is
	// gone: closed by Close, or by QEMU (the VM exited or another QMP
	// client took over).
	ErrClosed = errors.New("qmp: connection closed")
	// ErrBusy is returned by Dial when QEMU accepted the connection but
	// sent no greeting in time: its QMP socket serves one client at a
	// time, and another one (libvirt, a second kura) holds it.
	ErrBusy = errors.New("qmp: no greeting from QEMU: the QMP socket is held by another client")
)

// DefaultCommandTimeout bounds a command whose context has no deadline.
const DefaultCommandTimeout = 30 * time.Second

// maxLine bounds one QMP message (query-named-block-nodes of a VM with
// long backing chains is the largest seen: a few hundred KiB).
const maxLine = 64 << 20

// Error is an error QEMU returned for one command.
type Error struct {
	Command string // "blockdev-add", ...
	Class   string // "GenericError", "CommandNotFound", "DeviceNotFound", ...
	Desc    string // QEMU's message
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Event is an asynchronous QMP event ("JOB_STATUS_CHANGE", "SHUTDOWN", ...).
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
	Time time.Time       `json:"-"`
}

// Greeting is what QEMU says when a client connects.
type Greeting struct {
	Version struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
		Package string `json:"package"`
	} `json:"version"`
	Capabilities []string `json:"capabilities"`
}

// VersionString is "major.minor.micro".
func (g Greeting) VersionString() string {
	v := g.Version.QEMU
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
}

// Client is a QMP connection to one QEMU process.
//
// A Client is safe for concurrent use: commands from several goroutines
// are sent one after another and each caller gets the reply with its id.
// Every command ends within its context's deadline, or
// DefaultCommandTimeout when the context has none; a reply that comes
// later is dropped. Events are kept in a bounded buffer (the oldest are
// dropped) and read with Events.
type Client struct {
	conn     net.Conn
	greeting Greeting
	path     string
	peerPID  int // QEMU's pid from SO_PEERCRED, 0 if unknown
	peerUID  int
	peerGID  int

	wmu sync.Mutex // serializes writes

	mu      sync.Mutex
	pending map[string]chan reply
	nextID  uint64
	err     error // why the connection is unusable; nil while healthy
	events  []Event
	notify  chan struct{} // gets a value when events arrive

	done chan struct{} // closed when the reader goroutine exits
}

// maxEvents bounds the event buffer.
const maxEvents = 256

type reply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	ID    *string         `json:"id"`
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
	TS    *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	QMP *Greeting `json:"QMP"`
}

// Dial connects to the QMP unix socket at path, reads QEMU's greeting and
// leaves capabilities negotiation mode (qmp_capabilities). ctx bounds the
// connection and the handshake only.
func Dial(ctx context.Context, path string) (*Client, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connecting to the QMP socket %s (is the VM running with -qmp unix:%s,server=on?): %w", path, path, err)
	}
	c := &Client{conn: conn, path: path, pending: map[string]chan reply{}, notify: make(chan struct{}, 1), done: make(chan struct{})}
	c.peerPID, c.peerUID, c.peerGID = peerCred(conn)

	r := bufio.NewReaderSize(conn, 64<<10)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	line, err := readLine(r)
	stop()
	conn.SetReadDeadline(time.Time{})
	if err != nil {
		conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("QMP socket %s: %w (%w)", path, ErrBusy, ctx.Err())
		}
		return nil, fmt.Errorf("reading the QMP greeting on %s: %w", path, err)
	}
	var g reply
	if err := json.Unmarshal(line, &g); err != nil || g.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("%s is not a QMP socket: greeting %q", path, truncate(line, 100))
	}
	c.greeting = *g.QMP
	go c.readLoop(r)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("QMP socket %s: %w", path, err)
	}
	return c, nil
}

// peerCred returns the pid, uid and gid of the process at the other end of
// a unix socket, or zeros.
func peerCred(conn net.Conn) (pid, uid, gid int) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return 0, 0, 0
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, 0, 0
	}
	var cred *syscall.Ucred
	raw.Control(func(fd uintptr) {
		cred, _ = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if cred == nil {
		return 0, 0, 0
	}
	return int(cred.Pid), int(cred.Uid), int(cred.Gid)
}

// Greeting is the greeting QEMU sent on connection.
func (c *Client) Greeting() Greeting { return c.greeting }

// PeerPID is the pid of the QEMU process (SO_PEERCRED), 0 if unknown.
func (c *Client) PeerPID() int { return c.peerPID }

// Close closes the connection; commands in flight fail with ErrClosed.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// Done is closed when the connection is gone (Close, or QEMU went away).
func (c *Client) Done() <-chan struct{} { return c.done }

// Err says why the connection is unusable, nil while it is healthy.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Events returns and forgets the events received so far.
func (c *Client) Events() []Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	ev := c.events
	c.events = nil
	return ev
}

// Notify returns a channel that receives a value when events have arrived
// since the last Events call (several arrivals may give one value).
func (c *Client) Notify() <-chan struct{} { return c.notify }

// Execute runs command with args (nil, or a value that marshals to a JSON
// object) and decodes its "return" value into result (nil to ignore it).
// An error QEMU returns is an *Error; a lost connection wraps ErrClosed.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCommandTimeout)
		defer cancel()
	}
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	c.nextID++
	id := "kura-" + strconv.FormatUint(c.nextID, 10)
	ch := make(chan reply, 1)
	c.pending[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}()
	req["id"] = id
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("qmp %s: encoding arguments: %w", command, err)
	}
	if err := c.write(ctx, append(b, '\n')); err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	select {
	case r := <-ch:
		if r.Error != nil {
			return &Error{Command: command, Class: r.Error.Class, Desc: r.Error.Desc}
		}
		if result != nil {
			if err := json.Unmarshal(r.Return, result); err != nil {
				return fmt.Errorf("qmp %s: decoding the reply: %w", command, err)
			}
		}
		return nil
	case <-c.done:
		return fmt.Errorf("qmp %s: %w", command, c.Err())
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("qmp %s: QEMU did not answer in time: %w", command, ctx.Err())
		}
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	}
}

func (c *Client) write(ctx context.Context, b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	stop := context.AfterFunc(ctx, func() { c.conn.SetWriteDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.conn.Write(b); err != nil {
		if ctx.Err() != nil {
			// A partial write leaves the stream unusable.
			c.fail(fmt.Errorf("%w: a command was cut off by its timeout", ErrClosed))
			c.conn.Close()
			return ctx.Err()
		}
		c.fail(fmt.Errorf("%w: %w", ErrClosed, err))
		return c.Err()
	}
	return nil
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

func (c *Client) readLoop(r *bufio.Reader) {
	defer close(c.done)
	for {
		line, err := readLine(r)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				c.fail(ErrClosed)
			} else {
				c.fail(fmt.Errorf("%w by QEMU (did the VM exit?): %w", ErrClosed, err))
			}
			c.conn.Close()
			return
		}
		var m reply
		if err := json.Unmarshal(line, &m); err != nil {
			c.fail(fmt.Errorf("%w: bad message from QEMU %q: %w", ErrClosed, truncate(line, 100), err))
			c.conn.Close()
			return
		}
		c.mu.Lock()
		switch {
		case m.Event != "":
			ev := Event{Name: m.Event, Data: m.Data}
			if m.TS != nil {
				ev.Time = time.Unix(m.TS.Seconds, m.TS.Microseconds*1000)
			}
			if len(c.events) >= maxEvents {
				c.events = append(c.events[:0], c.events[1:]...)
			}
			c.events = append(c.events, ev)
			select {
			case c.notify <- struct{}{}:
			default:
			}
		case m.ID != nil:
			if ch, ok := c.pending[*m.ID]; ok {
				ch <- m
				delete(c.pending, *m.ID)
			}
		}
		c.mu.Unlock()
	}
}

// readLine reads one newline-terminated message, at most maxLine bytes.
func readLine(r *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		buf = append(buf, chunk...)
		if err == nil {
			return buf, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
		if len(buf) > maxLine {
			return nil, fmt.Errorf("QMP message longer than %d bytes", maxLine)
		}
	}
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "…"
	}
	return string(b)
}
