// Package nbd is a client for the Network Block Device protocol, written
// from the protocol specification without cgo.
//
// It speaks the fixed newstyle handshake (NBD_OPT_GO, NBD_OPT_LIST,
// structured replies, meta contexts such as "base:allocation" and QEMU's
// "qemu:dirty-bitmap:NAME") over unix sockets or TCP, and the transmission
// phase commands read, write, write-zeroes, trim, flush and block status.
//
// A Client is safe for concurrent use: requests from many goroutines are
// pipelined on one connection, and one reader goroutine hands each reply to
// the caller waiting for it. The package knows nothing about disks, images
// or backups; it only moves bytes and extents.
package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Extent is a run of an export with the status flags one meta context gave
// it. For MetaBaseAllocation the flags are StateHole and StateZero; for a
// QEMU dirty bitmap, StateDirty.
type Extent struct {
	Offset int64
	Length int64
	Flags  uint32
}

const (
	// maxStatusLen bounds the range of one NBD_CMD_BLOCK_STATUS request
	// (the wire length is 32 bits); BlockStatus loops over larger ranges.
	maxStatusLen = 1 << 30
	// maxZeroLen bounds one write-zeroes or trim request.
	maxZeroLen = 1 << 30
	// maxExtentsPerReply bounds the memory one block status reply can make
	// the client allocate; further extents are ignored and asked again.
	maxExtentsPerReply = 1 << 18
)

// Client is a connection to one NBD export. Its methods are safe for
// concurrent use by many goroutines; their requests are pipelined on the
// one connection. A server error fails only the command it answers; a
// broken connection or a protocol violation fails every pending and later
// call.
type Client struct {
	conn       net.Conn
	addr       string
	export     string
	size       int64
	flags      TransmissionFlags
	blockSize  BlockSize
	structured bool
	contexts   []MetaContext
	maxReq     int

	// wsem serializes writes to conn; a channel so waiting can be cancelled.
	wsem chan struct{}

	mu      sync.Mutex
	pending map[uint64]*call // by cookie; completed only by the reader
	cookie  uint64
	err     error // once set, the connection takes no new requests

	closeOnce sync.Once
	done      chan struct{} // closed when the reader goroutine has exited
}

// call is one request in flight.
type call struct {
	typ    uint16
	off    int64
	length int64
	ctxID  uint32 // block status: the context the caller wants

	// fill is held by the reader while it writes into buf, and by a caller
	// giving up on the call, which sets buf to nil.
	fill sync.Mutex
	buf  []byte

	// Owned by the reader goroutine until done is closed.
	covered   int64  // bytes of a read the server answered for
	spans     []span // those bytes as sorted, disjoint ranges
	extents   []Extent
	extentEnd int64
	sawStatus bool
	err       error
	done      chan struct{}
}

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

// Flags are the export's transmission flags (read-only, can flush, ...).
func (c *Client) Flags() TransmissionFlags { return c.flags }

// BlockSize is the server's block size constraints. When the server sent
// none it is the zero value.
func (c *Client) BlockSize() BlockSize { return c.blockSize }

// StructuredReplies reports whether the server agreed to structured replies.
func (c *Client) StructuredReplies() bool { return c.structured }

// MetaContexts lists the meta contexts the server granted.
func (c *Client) MetaContexts() []MetaContext {
	return append([]MetaContext(nil), c.contexts...)
}

// ExportName is the name of the attached export.
func (c *Client) ExportName() string { return c.export }

// MaxRequest is the largest payload the client sends or asks for in one
// request; larger reads and writes are split.
func (c *Client) MaxRequest() int { return c.maxReq }

// ReadAt fills p with the export's bytes at off. It fails rather than
// return short. Reads larger than MaxRequest are split into pipelined
// requests; offsets and lengths should be multiples of BlockSize().Min.
//
// When ctx is done first, ReadAt returns ctx.Err() at once (unless the
// reader goroutine is in the middle of copying a chunk into p, which it
// finishes first); p's contents are then unspecified, but the client
// never touches p after ReadAt returns.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := c.checkRange("read", off, int64(len(p))); err != nil {
		return err
	}
	calls := make([]*call, 0, (len(p)+c.maxReq-1)/c.maxReq)
	for done := 0; done < len(p); {
		n := min(len(p)-done, c.maxReq)
		cl := &call{typ: cmdRead, off: off + int64(done), length: int64(n), buf: p[done : done+n]}
		if err := c.start(ctx, cl, 0, nil); err != nil {
			abandon(calls)
			return err
		}
		calls = append(calls, cl)
		done += n
	}
	return wait(ctx, calls)
}

// WriteAt writes p to the export at off. The data is durable only after
// Flush. Writes larger than MaxRequest are split into pipelined requests.
func (c *Client) WriteAt(ctx context.Context, p []byte, off int64) error {
	if c.flags.ReadOnly() {
		return fmt.Errorf("writing %d bytes at offset %d: %w", len(p), off, ErrReadOnly)
	}
	if err := c.checkRange("write", off, int64(len(p))); err != nil {
		return err
	}
	var calls []*call
	for done := 0; done < len(p); {
		n := min(len(p)-done, c.maxReq)
		cl := &call{typ: cmdWrite, off: off + int64(done), length: int64(n)}
		if err := c.start(ctx, cl, 0, p[done:done+n]); err != nil {
			abandon(calls)
			return err
		}
		calls = append(calls, cl)
		done += n
	}
	return wait(ctx, calls)
}

// WriteZeroes makes [off, off+length) read as zeros. Without CmdFlagNoHole
// the server may punch holes (deallocate); flags may also carry CmdFlagFUA
// and CmdFlagFastZero.
func (c *Client) WriteZeroes(ctx context.Context, off, length int64, flags CmdFlags) error {
	if !c.flags.CanWriteZeroes() {
		return fmt.Errorf("write-zeroes at offset %d: server does not support it: %w", off, ErrUnsupported)
	}
	return c.rangeCommand(ctx, cmdWriteZeroes, off, length, flags)
}

// Trim tells the server that [off, off+length) is no longer needed; it may
// then read as anything.
func (c *Client) Trim(ctx context.Context, off, length int64) error {
	if !c.flags.CanTrim() {
		return fmt.Errorf("trim at offset %d: server does not support it: %w", off, ErrUnsupported)
	}
	return c.rangeCommand(ctx, cmdTrim, off, length, 0)
}

func (c *Client) rangeCommand(ctx context.Context, typ uint16, off, length int64, flags CmdFlags) error {
	if c.flags.ReadOnly() {
		return fmt.Errorf("%s at offset %d: %w", cmdName(typ), off, ErrReadOnly)
	}
	if err := c.checkRange(cmdName(typ), off, length); err != nil {
		return err
	}
	step := int64(maxZeroLen)
	if m := int64(c.blockSize.Min); m > 1 {
		step -= step % m
	}
	var calls []*call
	for done := int64(0); done < length; {
		n := min(length-done, step)
		cl := &call{typ: typ, off: off + done, length: n}
		if err := c.start(ctx, cl, flags, nil); err != nil {
			abandon(calls)
			return err
		}
		calls = append(calls, cl)
		done += n
	}
	return wait(ctx, calls)
}

// Flush asks the server to make all completed writes durable.
func (c *Client) Flush(ctx context.Context) error {
	if !c.flags.CanFlush() {
		return fmt.Errorf("flush: server does not support it: %w", ErrUnsupported)
	}
	cl := &call{typ: cmdFlush}
	if err := c.start(ctx, cl, 0, nil); err != nil {
		return err
	}
	return wait(ctx, []*call{cl})
}

// BlockStatus describes [off, off+length) in the named meta context, which
// must be one the server granted (see MetaContexts). It asks as often as
// needed, since servers may answer for only a prefix of the range, and
// returns ordered extents that cover the range exactly; adjacent extents
// with equal flags are merged.
func (c *Client) BlockStatus(ctx context.Context, metaContext string, off, length int64) ([]Extent, error) {
	id, ok := c.contextID(metaContext)
	if !ok {
		names := make([]string, len(c.contexts))
		for i, mc := range c.contexts {
			names[i] = mc.Name
		}
		return nil, fmt.Errorf("block status of %q (granted: %s): %w", metaContext, strings.Join(names, ", "), ErrNoMetaContext)
	}
	if err := c.checkRange("block-status", off, length); err != nil {
		return nil, err
	}
	var out []Extent
	end := off + length
	for pos := off; pos < end; {
		cl := &call{typ: cmdBlockStatus, off: pos, length: min(end-pos, maxStatusLen), ctxID: id}
		if err := c.start(ctx, cl, 0, nil); err != nil {
			return nil, err
		}
		if err := wait(ctx, []*call{cl}); err != nil {
			return nil, err
		}
		start := pos
		for _, e := range cl.extents {
			if pos >= end {
				break
			}
			e.Length = min(e.Length, end-pos)
			if n := len(out); n > 0 && out[n-1].Flags == e.Flags {
				out[n-1].Length += e.Length
			} else {
				out = append(out, e)
			}
			pos += e.Length
		}
		if pos == start {
			return nil, fmt.Errorf("nbd: block status at offset %d: server described no bytes: %w", start, ErrProtocol)
		}
	}
	return out, nil
}

func (c *Client) contextID(name string) (uint32, bool) {
	for _, mc := range c.contexts {
		if mc.Name == name {
			return mc.ID, true
		}
	}
	return 0, false
}

func (c *Client) checkRange(op string, off, length int64) error {
	if off < 0 || length < 0 || off > c.size || length > c.size-off {
		return fmt.Errorf("%s of %d bytes at offset %d (export size %d): %w", op, length, off, c.size, ErrOutOfRange)
	}
	return nil
}

// Close ends the session with NBD_CMD_DISC and closes the connection.
// Calls still in flight fail with ErrClosed.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		healthy := c.err == nil
		if healthy {
			c.err = ErrClosed
		}
		c.mu.Unlock()
		if healthy {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			// Best effort: the server learns we are leaving on purpose.
			if c.acquireWrite(ctx) == nil {
				c.conn.SetWriteDeadline(time.Now().Add(time.Second))
				c.conn.Write(requestHeader(cmdDisc, 0, 0, 0, 0))
				c.releaseWrite()
			}
			cancel()
		}
		c.conn.Close()
	})
	<-c.done
	return nil
}

func requestHeader(typ uint16, flags CmdFlags, cookie uint64, off int64, length uint32) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint32(b[0:], requestMagic)
	binary.BigEndian.PutUint16(b[4:], uint16(flags))
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], uint64(off))
	binary.BigEndian.PutUint32(b[24:], length)
	return b
}

func (c *Client) acquireWrite(ctx context.Context) error {
	select {
	case c.wsem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *Client) releaseWrite() { <-c.wsem }

// start registers cl and sends its request. On success the reader
// goroutine will complete cl.
func (c *Client) start(ctx context.Context, cl *call, flags CmdFlags, payload []byte) error {
	if err := c.acquireWrite(ctx); err != nil {
		return err
	}
	defer c.releaseWrite()
	if err := ctx.Err(); err != nil {
		return err
	}

	cl.done = make(chan struct{})
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return c.callError(cl, err)
	}
	c.cookie++
	cookie := c.cookie
	c.pending[cookie] = cl
	c.mu.Unlock()

	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.conn.SetWriteDeadline(aLongTimeAgo)
		close(fired)
	})
	bufs := net.Buffers{requestHeader(cl.typ, flags, cookie, cl.off, uint32(cl.length))}
	if cl.typ == cmdWrite {
		bufs = append(bufs, payload)
	}
	n, err := bufs.WriteTo(c.conn)
	if !stop() {
		<-fired
		c.conn.SetWriteDeadline(time.Time{})
	}
	if err == nil {
		return nil
	}
	if n == 0 && ctx.Err() != nil {
		// Nothing went out: the stream is intact, forget the call.
		c.mu.Lock()
		delete(c.pending, cookie)
		c.mu.Unlock()
		return ctx.Err()
	}
	// A partial request leaves the stream unusable.
	err = fmt.Errorf("nbd: sending %s to %s: %w", cmdName(cl.typ), c.addr, err)
	c.fail(err)
	return c.callError(cl, err)
}

func (c *Client) callError(cl *call, err error) error {
	if cl.typ == cmdFlush {
		return fmt.Errorf("nbd: flush: %w", err)
	}
	return fmt.Errorf("nbd: %s of %d bytes at offset %d: %w", cmdName(cl.typ), cl.length, cl.off, err)
}

// fail marks the connection broken and closes it; the reader goroutine
// then fails every pending call.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.conn.Close()
}

// wait waits for calls in order and returns the first error. When ctx is
// done first it gives up on the calls that are not finished.
func wait(ctx context.Context, calls []*call) error {
	for i, cl := range calls {
		select {
		case <-cl.done:
			if cl.err != nil {
				abandon(calls[i+1:])
				return cl.err
			}
		case <-ctx.Done():
			abandon(calls[i:])
			return ctx.Err()
		}
	}
	return nil
}

// abandon detaches the callers' buffers from calls so that the reader
// discards their data instead of writing into memory the caller got back.
func abandon(calls []*call) {
	for _, cl := range calls {
		cl.fill.Lock()
		cl.buf = nil
		cl.fill.Unlock()
	}
}

// readLoop is the reader goroutine: it reads replies until the connection
// fails, then fails all pending calls.
func (c *Client) readLoop(r *bufio.Reader) {
	defer close(c.done)
	var err error
	for err == nil {
		err = c.readReply(r)
	}
	c.mu.Lock()
	if c.err == nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
			err = fmt.Errorf("nbd: server %s closed the connection: %w", c.addr, err)
		}
		c.err = err
	}
	err = c.err
	pending := c.pending
	c.pending = nil
	c.mu.Unlock()
	c.conn.Close()
	for _, cl := range pending {
		cl.err = c.callError(cl, err)
		close(cl.done)
	}
}

func (c *Client) lookup(cookie uint64) *call {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending[cookie]
}

func (c *Client) complete(cookie uint64, cl *call) {
	c.mu.Lock()
	delete(c.pending, cookie)
	c.mu.Unlock()
	close(cl.done)
}

// readReply reads one simple reply or one structured reply chunk and
// applies it to the call it answers. An error means the connection can no
// longer be trusted.
func (c *Client) readReply(r *bufio.Reader) error {
	var h [32]byte
	if _, err := io.ReadFull(r, h[:4]); err != nil {
		return err
	}
	switch magic := binary.BigEndian.Uint32(h[:]); magic {
	case simpleMagic:
		if _, err := io.ReadFull(r, h[4:16]); err != nil {
			return err
		}
		errno := binary.BigEndian.Uint32(h[4:])
		cookie := binary.BigEndian.Uint64(h[8:])
		cl := c.lookup(cookie)
		if cl == nil {
			return protocolErrorf("simple reply for unknown cookie %d", cookie)
		}
		if errno != 0 {
			cl.err = c.serverError(cl, errno, "", -1)
		} else if cl.typ == cmdRead {
			if err := cl.fillData(r, 0, cl.length); err != nil {
				return err
			}
		} else if cl.typ == cmdBlockStatus {
			return protocolErrorf("simple reply to block status")
		}
		c.complete(cookie, cl)
		return nil

	case structMagic:
		if _, err := io.ReadFull(r, h[4:20]); err != nil {
			return err
		}
		flags := binary.BigEndian.Uint16(h[4:])
		typ := binary.BigEndian.Uint16(h[6:])
		cookie := binary.BigEndian.Uint64(h[8:])
		length := binary.BigEndian.Uint32(h[16:])
		cl := c.lookup(cookie)
		if cl == nil {
			return protocolErrorf("structured reply for unknown cookie %d", cookie)
		}
		if err := c.readChunk(r, cl, typ, length); err != nil {
			return err
		}
		if flags&replyFlagDone == 0 {
			if typ == chunkNone {
				return protocolErrorf("NBD_REPLY_TYPE_NONE without the done flag")
			}
			return nil
		}
		if cl.err == nil {
			switch cl.typ {
			case cmdRead:
				if cl.covered != cl.length {
					cl.err = fmt.Errorf("nbd: read of %d bytes at offset %d: server sent %d bytes: %w", cl.length, cl.off, cl.covered, ErrProtocol)
				}
			case cmdBlockStatus:
				if !cl.sawStatus {
					cl.err = fmt.Errorf("nbd: block status at offset %d: server sent no extents for the context: %w", cl.off, ErrProtocol)
				}
			}
		}
		c.complete(cookie, cl)
		return nil

	default:
		return protocolErrorf("bad reply magic %#x", magic)
	}
}

func (c *Client) serverError(cl *call, errno uint32, msg string, errOff int64) error {
	err := c.serverError1(cl, errno, msg, errOff)
	if errnoFromWire(errno) == syscall.ESHUTDOWN {
		// The server is going away (we or its owner closed the session).
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return err
}

func (c *Client) serverError1(cl *call, errno uint32, msg string, errOff int64) error {
	op := cmdName(cl.typ)
	if cl.typ == cmdFlush {
		return &Error{Op: op, ErrOffset: errOff, Errno: errnoFromWire(errno), Message: msg}
	}
	return &Error{Op: op, Offset: cl.off, Length: cl.length, ErrOffset: errOff, Errno: errnoFromWire(errno), Message: msg}
}

func (c *Client) readChunk(r *bufio.Reader, cl *call, typ uint16, length uint32) error {
	var b [16]byte
	switch typ {
	case chunkNone:
		if length != 0 {
			return protocolErrorf("NBD_REPLY_TYPE_NONE with %d bytes of payload", length)
		}
		return nil

	case chunkOffsetData, chunkOffsetHole:
		if cl.typ != cmdRead {
			return protocolErrorf("data chunk in reply to %s", cmdName(cl.typ))
		}
		if length < 8 {
			return protocolErrorf("data chunk of %d bytes", length)
		}
		if _, err := io.ReadFull(r, b[:8]); err != nil {
			return err
		}
		off := int64(binary.BigEndian.Uint64(b[:]))
		n := int64(length) - 8
		if typ == chunkOffsetHole {
			if length != 12 {
				return protocolErrorf("hole chunk of %d bytes", length)
			}
			if _, err := io.ReadFull(r, b[8:12]); err != nil {
				return err
			}
			n = int64(binary.BigEndian.Uint32(b[8:]))
		}
		if n == 0 || off < cl.off || off-cl.off > cl.length || n > cl.length-(off-cl.off) {
			return protocolErrorf("chunk [%d, +%d) outside read [%d, +%d)", off, n, cl.off, cl.length)
		}
		if typ == chunkOffsetHole {
			cl.zeroData(off-cl.off, n)
			return nil
		}
		return cl.fillData(r, off-cl.off, n)

	case chunkBlockStatus, chunkBlockStatusExt:
		if cl.typ != cmdBlockStatus {
			return protocolErrorf("block status chunk in reply to %s", cmdName(cl.typ))
		}
		return cl.readExtents(r, typ == chunkBlockStatusExt, length)

	case chunkError, chunkErrorOffset:
		if length < 6 {
			return protocolErrorf("error chunk of %d bytes", length)
		}
		if _, err := io.ReadFull(r, b[:6]); err != nil {
			return err
		}
		errno := binary.BigEndian.Uint32(b[:])
		msgLen := uint32(binary.BigEndian.Uint16(b[4:]))
		rest := length - 6
		if msgLen > rest || (typ == chunkErrorOffset && rest-msgLen != 8) {
			return protocolErrorf("malformed error chunk")
		}
		msg := make([]byte, msgLen)
		if _, err := io.ReadFull(r, msg); err != nil {
			return err
		}
		errOff := int64(-1)
		if typ == chunkErrorOffset {
			if _, err := io.ReadFull(r, b[:8]); err != nil {
				return err
			}
			errOff = int64(binary.BigEndian.Uint64(b[:]))
		} else if _, err := r.Discard(int(rest - msgLen)); err != nil {
			return err
		}
		if errno == 0 {
			errno = uint32(syscall.EIO) // a zero error is a server bug; still an error
		}
		if cl.err == nil {
			cl.err = c.serverError(cl, errno, strings.ToValidUTF8(string(msg), "?"), errOff)
		}
		return nil

	default:
		if typ&chunkErrorFlag != 0 && length >= 4 {
			// An error type we do not know: the spec says it starts with
			// the error value; skip the rest.
			if _, err := io.ReadFull(r, b[:4]); err != nil {
				return err
			}
			if _, err := r.Discard(int(length - 4)); err != nil {
				return err
			}
			if cl.err == nil {
				cl.err = c.serverError(cl, binary.BigEndian.Uint32(b[:]), fmt.Sprintf("unknown error chunk type %d", typ), -1)
			}
			return nil
		}
		return protocolErrorf("unknown reply chunk type %d", typ)
	}
}

// span is a range [start, end) of a read that a chunk answered.
type span struct{ start, end int64 }

// claim records that a chunk answers [pos, pos+n) of the read. It reports
// false if a previous chunk already answered part of it, which the
// protocol forbids: the read then fails rather than hand back bytes whose
// origin is unclear.
func (cl *call) claim(pos, n int64) bool {
	end := pos + n
	i := len(cl.spans)
	if i > 0 && cl.spans[i-1].end > pos { // not the usual in-order case
		i = sort.Search(len(cl.spans), func(k int) bool { return cl.spans[k].start >= pos })
		if i < len(cl.spans) && cl.spans[i].start < end {
			return false
		}
		if i > 0 && cl.spans[i-1].end > pos {
			return false
		}
	}
	cl.spans = slices.Insert(cl.spans, i, span{pos, end})
	cl.covered += n
	return true
}

func (cl *call) overlapError(pos, n int64) {
	if cl.err == nil {
		cl.err = fmt.Errorf("nbd: read of %d bytes at offset %d: server answered [%d, +%d) twice: %w", cl.length, cl.off, cl.off+pos, n, ErrProtocol)
	}
}

// fillData reads n bytes of read data into cl.buf at pos, or discards them
// if the caller gave up.
func (cl *call) fillData(r *bufio.Reader, pos, n int64) error {
	cl.fill.Lock()
	defer cl.fill.Unlock()
	if !cl.claim(pos, n) {
		cl.overlapError(pos, n)
		cl.buf = nil // its contents can no longer be trusted
	}
	if cl.buf == nil {
		_, err := r.Discard(int(n))
		return err
	}
	_, err := io.ReadFull(r, cl.buf[pos:pos+n])
	return err
}

func (cl *call) zeroData(pos, n int64) {
	cl.fill.Lock()
	defer cl.fill.Unlock()
	if !cl.claim(pos, n) {
		cl.overlapError(pos, n)
		cl.buf = nil
	}
	if cl.buf != nil {
		clear(cl.buf[pos : pos+n])
	}
}

// readExtents reads a block status chunk: a context id, then descriptors
// of 32-bit length and flags (NBD_REPLY_TYPE_BLOCK_STATUS), or a context
// id, a count and descriptors of 64-bit length and flags
// (NBD_REPLY_TYPE_BLOCK_STATUS_EXT, sent by servers using extended
// headers). Extents for other contexts are skipped.
func (cl *call) readExtents(r *bufio.Reader, ext bool, length uint32) error {
	head, desc := uint32(4), uint32(8)
	if ext {
		head, desc = 8, 16
	}
	if length < head+desc || (length-head)%desc != 0 {
		return protocolErrorf("block status chunk of %d bytes", length)
	}
	var b [16]byte
	if _, err := io.ReadFull(r, b[:head]); err != nil {
		return err
	}
	id := binary.BigEndian.Uint32(b[:])
	count := (length - head) / desc
	if ext && binary.BigEndian.Uint32(b[4:]) != count {
		return protocolErrorf("block status chunk announces %d extents but holds %d", binary.BigEndian.Uint32(b[4:]), count)
	}
	want := id == cl.ctxID && !cl.sawStatus
	if want {
		cl.sawStatus = true
		cl.extentEnd = cl.off
	}
	for range count {
		if _, err := io.ReadFull(r, b[:desc]); err != nil {
			return err
		}
		if !want || len(cl.extents) >= maxExtentsPerReply || cl.extentEnd-cl.off >= cl.length {
			continue
		}
		var n uint64
		var flags uint32
		if ext {
			n = binary.BigEndian.Uint64(b[:])
			flags = uint32(binary.BigEndian.Uint64(b[8:]))
		} else {
			n = uint64(binary.BigEndian.Uint32(b[:]))
			flags = binary.BigEndian.Uint32(b[4:])
		}
		if n == 0 {
			continue
		}
		n = min(n, uint64(cl.off+cl.length-cl.extentEnd))
		cl.extents = append(cl.extents, Extent{Offset: cl.extentEnd, Length: int64(n), Flags: flags})
		cl.extentEnd += int64(n)
	}
	return nil
}
