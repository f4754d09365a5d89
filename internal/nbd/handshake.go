package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"
)

// Options select the export and the features to negotiate.
type Options struct {
	// ExportName is the export to attach to; "" is the server's default.
	ExportName string
	// MetaContexts are queries for NBD_OPT_SET_META_CONTEXT, for example
	// MetaBaseAllocation or MetaDirtyBitmapPrefix+"b0". The server grants a
	// subset; Client.MetaContexts tells which.
	MetaContexts []string
	// MaxRequest caps the payload of one read or write request in bytes.
	// Zero means 32 MiB. The server's maximum block size caps it further.
	MaxRequest int
}

// Export is one entry of a server's export list.
type Export struct {
	Name        string
	Description string
}

// MetaContext is a meta context the server granted, with the id it uses
// for the context in block status replies.
type MetaContext struct {
	Name string
	ID   uint32
}

// BlockSize holds the server's block size constraints (NBD_INFO_BLOCK_SIZE).
// Requests should be aligned to Min; Max bounds one request's payload.
type BlockSize struct {
	Min, Preferred, Max uint32
}

const (
	defaultMaxRequest = 32 << 20
	oldstyleMagic     = 0x00420281861253
)

// aLongTimeAgo is a deadline in the past, used to unblock I/O.
var aLongTimeAgo = time.Unix(1, 0)

// Dial connects to the NBD server at addr ("unix" socket path or "tcp"
// host:port), performs the fixed newstyle handshake and attaches to
// opts.ExportName with NBD_OPT_GO. Structured replies are always requested;
// meta contexts only when opts.MetaContexts is set.
//
// ctx bounds the connection and the handshake only; the returned client
// lives until Close.
func Dial(ctx context.Context, network, addr string, opts Options) (*Client, error) {
	conn, err := dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	c := &Client{
		conn:    conn,
		addr:    network + ":" + addr,
		export:  opts.ExportName,
		pending: make(map[uint64]*call),
		wsem:    make(chan struct{}, 1),
		done:    make(chan struct{}),
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	err = withDeadline(ctx, conn, func() error { return c.handshake(r, opts) })
	if err != nil {
		conn.Close()
		return nil, err
	}
	c.maxReq = defaultMaxRequest
	if opts.MaxRequest > 0 && opts.MaxRequest < c.maxReq {
		c.maxReq = opts.MaxRequest
	}
	if c.blockSize.Max > 0 && int(c.blockSize.Max) < c.maxReq {
		c.maxReq = int(c.blockSize.Max)
	}
	if m := int(c.blockSize.Min); m > 1 && c.maxReq > m {
		c.maxReq -= c.maxReq % m
	}
	go c.readLoop(r)
	return c, nil
}

// ListExports connects to the server and returns the exports it lists
// (NBD_OPT_LIST), then ends the session with NBD_OPT_ABORT.
func ListExports(ctx context.Context, network, addr string) ([]Export, error) {
	conn, err := dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	var exports []Export
	err = withDeadline(ctx, conn, func() error {
		r := bufio.NewReader(conn)
		if _, err := greet(r, conn); err != nil {
			return err
		}
		if err := writeOption(conn, optList, nil); err != nil {
			return err
		}
		for {
			typ, data, err := readOptionReply(r, optList)
			if err != nil {
				return err
			}
			switch typ {
			case repAck:
				abort(r, conn)
				return nil
			case repServer:
				if len(data) < 4 || uint64(binary.BigEndian.Uint32(data)) > uint64(len(data)-4) {
					return protocolErrorf("malformed NBD_REP_SERVER reply")
				}
				n := binary.BigEndian.Uint32(data)
				exports = append(exports, Export{Name: string(data[4 : 4+n]), Description: string(data[4+n:])})
			default:
				return optionFailure(optList, typ, data)
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("listing exports of %s:%s: %w", network, addr, err)
	}
	return exports, nil
}

func dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err == nil {
		return conn, nil
	}
	hint := ""
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		hint = ": is the NBD server running and listening there?"
	case errors.Is(err, syscall.ENOENT):
		hint = ": no such socket; is the NBD server running?"
	}
	return nil, fmt.Errorf("nbd: connecting to %s %s: %w%s", network, addr, err, hint)
}

// withDeadline runs f with conn's deadline tied to ctx, then clears it.
func withDeadline(ctx context.Context, conn net.Conn, f func() error) error {
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		conn.SetDeadline(aLongTimeAgo)
		close(fired)
	})
	err := f()
	if !stop() {
		<-fired
		if err == nil {
			err = ctx.Err()
		} else {
			err = fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
	}
	conn.SetDeadline(time.Time{})
	return err
}

// greet reads the server's greeting and answers with the client flags. It
// returns the server's handshake flags.
func greet(r io.Reader, w io.Writer) (uint16, error) {
	var b [18]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return 0, fmt.Errorf("nbd: reading server greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[0:]) != nbdMagic {
		return 0, protocolErrorf("not an NBD server (bad greeting magic)")
	}
	if m := binary.BigEndian.Uint64(b[8:]); m != optMagic {
		if m == oldstyleMagic {
			return 0, protocolErrorf("server uses oldstyle negotiation, which is not supported")
		}
		return 0, protocolErrorf("bad newstyle magic %#x", m)
	}
	flags := binary.BigEndian.Uint16(b[16:])
	if flags&flagFixedNewstyle == 0 {
		return 0, protocolErrorf("server does not support fixed newstyle negotiation")
	}
	clientFlags := uint32(flagFixedNewstyle)
	if flags&flagNoZeroes != 0 {
		clientFlags |= flagNoZeroes
	}
	var cf [4]byte
	binary.BigEndian.PutUint32(cf[:], clientFlags)
	if _, err := w.Write(cf[:]); err != nil {
		return 0, fmt.Errorf("nbd: sending client flags: %w", err)
	}
	return flags, nil
}

func writeOption(w io.Writer, opt uint32, data []byte) error {
	b := make([]byte, 16+len(data))
	binary.BigEndian.PutUint64(b[0:], optMagic)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	copy(b[16:], data)
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("nbd: sending %s: %w", optName(opt), err)
	}
	return nil
}

// readOptionReply reads one option reply to opt and returns its type and data.
func readOptionReply(r io.Reader, opt uint32) (uint32, []byte, error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: reading reply to %s: %w", optName(opt), err)
	}
	if binary.BigEndian.Uint64(h[0:]) != optReplyMagic {
		return 0, nil, protocolErrorf("bad option reply magic in reply to %s", optName(opt))
	}
	if got := binary.BigEndian.Uint32(h[8:]); got != opt {
		return 0, nil, protocolErrorf("reply to %s names %s", optName(opt), optName(got))
	}
	typ := binary.BigEndian.Uint32(h[12:])
	n := binary.BigEndian.Uint32(h[16:])
	if n > maxOptionReply {
		return 0, nil, protocolErrorf("reply to %s is %d bytes long", optName(opt), n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return 0, nil, fmt.Errorf("nbd: reading reply to %s: %w", optName(opt), err)
	}
	return typ, data, nil
}

// optionFailure turns an unexpected or error reply into an error.
func optionFailure(opt, typ uint32, data []byte) error {
	if typ&repFlagError != 0 {
		return &OptionError{Option: opt, Reply: typ, Message: string(data)}
	}
	return protocolErrorf("unexpected reply type %d to %s", typ, optName(opt))
}

// abort ends the handshake politely; errors do not matter any more.
func abort(r io.Reader, w io.Writer) {
	if writeOption(w, optAbort, nil) == nil {
		readOptionReply(r, optAbort)
	}
}

func (c *Client) handshake(r *bufio.Reader, opts Options) error {
	if _, err := greet(r, c.conn); err != nil {
		return err
	}

	// Structured replies: needed for holes in reads and for block status.
	if err := writeOption(c.conn, optStructuredReply, nil); err != nil {
		return err
	}
	typ, data, err := readOptionReply(r, optStructuredReply)
	if err != nil {
		return err
	}
	switch {
	case typ == repAck:
		c.structured = true
	case typ&repFlagError == 0:
		return optionFailure(optStructuredReply, typ, data)
	}

	if c.structured && len(opts.MetaContexts) > 0 {
		if err := c.setMetaContexts(r, opts); err != nil {
			return err
		}
	}

	// NBD_OPT_GO, asking for block size constraints.
	name := []byte(opts.ExportName)
	req := make([]byte, 0, 4+len(name)+4)
	req = binary.BigEndian.AppendUint32(req, uint32(len(name)))
	req = append(req, name...)
	req = binary.BigEndian.AppendUint16(req, 1)
	req = binary.BigEndian.AppendUint16(req, infoBlockSize)
	if err := writeOption(c.conn, optGo, req); err != nil {
		return err
	}
	haveExport := false
	for {
		typ, data, err := readOptionReply(r, optGo)
		if err != nil {
			return err
		}
		switch typ {
		case repAck:
			if !haveExport {
				return protocolErrorf("server acknowledged NBD_OPT_GO without describing the export")
			}
			return nil
		case repInfo:
			if len(data) < 2 {
				return protocolErrorf("short NBD_REP_INFO reply")
			}
			switch binary.BigEndian.Uint16(data) {
			case infoExport:
				if len(data) != 12 {
					return protocolErrorf("NBD_INFO_EXPORT is %d bytes, want 12", len(data))
				}
				size := binary.BigEndian.Uint64(data[2:])
				if size > 1<<63-1 {
					return protocolErrorf("export size %d is too large", size)
				}
				c.size = int64(size)
				c.flags = TransmissionFlags(binary.BigEndian.Uint16(data[10:]))
				haveExport = true
			case infoBlockSize:
				if len(data) != 14 {
					return protocolErrorf("NBD_INFO_BLOCK_SIZE is %d bytes, want 14", len(data))
				}
				bs := BlockSize{
					Min:       binary.BigEndian.Uint32(data[2:]),
					Preferred: binary.BigEndian.Uint32(data[6:]),
					Max:       binary.BigEndian.Uint32(data[10:]),
				}
				if validBlockSize(bs) {
					c.blockSize = bs
				}
			}
		default:
			err := optionFailure(optGo, typ, data)
			if typ == repErrUnknown {
				return fmt.Errorf("nbd: export %q not found on %s: %w", opts.ExportName, c.addr, err)
			}
			return err
		}
	}
}

func validBlockSize(bs BlockSize) bool {
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	return pow2(bs.Min) && bs.Min <= 64<<10 && pow2(bs.Preferred) && bs.Preferred >= bs.Min &&
		bs.Max >= bs.Min && bs.Max%bs.Min == 0
}

func (c *Client) setMetaContexts(r io.Reader, opts Options) error {
	req := binary.BigEndian.AppendUint32(nil, uint32(len(opts.ExportName)))
	req = append(req, opts.ExportName...)
	req = binary.BigEndian.AppendUint32(req, uint32(len(opts.MetaContexts)))
	for _, q := range opts.MetaContexts {
		if len(q) > maxMetaContextLength {
			return fmt.Errorf("nbd: meta context query %.40q... is longer than %d bytes", q, maxMetaContextLength)
		}
		req = binary.BigEndian.AppendUint32(req, uint32(len(q)))
		req = append(req, q...)
	}
	if err := writeOption(c.conn, optSetMetaContext, req); err != nil {
		return err
	}
	for {
		typ, data, err := readOptionReply(r, optSetMetaContext)
		if err != nil {
			return err
		}
		switch {
		case typ == repAck:
			return nil
		case typ == repMetaContext:
			if len(data) < 4 {
				return protocolErrorf("short NBD_REP_META_CONTEXT reply")
			}
			c.contexts = append(c.contexts, MetaContext{
				Name: string(data[4:]),
				ID:   binary.BigEndian.Uint32(data),
			})
		case typ == repErrUnsup:
			// The server has no meta contexts: BlockStatus will say so.
			return nil
		default:
			return optionFailure(optSetMetaContext, typ, data)
		}
	}
}
