package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
)

// Device is what a Server exports: a read-only block device.
type Device interface {
	// Size is the device's size in bytes.
	Size() int64
	// ReadAt fills p from offset off. It is called concurrently.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// Extents describes [off, off+length) in order with base:allocation
	// flags (StateHole|StateZero for ranges that read as zeros and are not
	// stored, 0 for data). It may cover less than asked, but not nothing.
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
}

// ServerExport is one export a Server offers.
type ServerExport struct {
	Name        string
	Description string
	Device      Device
}

// Server serves read-only exports over the fixed newstyle NBD protocol:
// NBD_OPT_GO/INFO/LIST/EXPORT_NAME, structured replies (reads answer zero
// ranges with hole chunks), the "base:allocation" meta context for block
// status, and many concurrent connections, each with pipelined requests.
// Writes are refused with EPERM.
type Server struct {
	// Exports are served by name; a client asking for "" gets the first
	// when no export is named "".
	Exports []ServerExport
	// Logger receives connection and error logs; nil logs nothing.
	Logger *slog.Logger
	// MaxInFlight bounds the requests served at once per connection
	// (0 means 16).
	MaxInFlight int

	// readBufs recycles the buffers of reads up to readBufSize: a guest
	// streaming its disk would otherwise have every reply fault in fresh
	// memory.
	readBufs sync.Pool // of *[]byte
}

const (
	serverMaxRequest  = 32 << 20 // largest read served
	serverMaxOption   = 64 << 10 // larger option payloads end the connection
	optListMetaCtx    = 9
	metaContextBaseID = 1
	errnoPerm         = uint32(syscall.EPERM)
	errnoIO           = uint32(syscall.EIO)
	errnoInval        = uint32(syscall.EINVAL)
	errnoNotSup       = uint32(syscall.ENOTSUP)
	cmdCache          = 5
	maxErrorMessage   = 4096
)

// Serve accepts connections on l until ctx ends or l fails, serving each
// in its own goroutine. When ctx ends it closes l and every connection and
// returns after they are done, with nil.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	stop := context.AfterFunc(ctx, func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	for {
		c, err := l.Accept()
		if err != nil {
			cancel()
			wg.Wait()
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("nbd server: accepting connections: %w", err)
		}
		mu.Lock()
		conns[c] = true
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.ServeConn(ctx, c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		}()
	}
}

// ServeConn runs one client connection to its end and closes it.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	sc := &serverConn{s: s, conn: c, r: bufio.NewReaderSize(c, 64<<10), w: bufio.NewWriterSize(c, 64<<10)}
	exp, err := sc.negotiate()
	if err != nil {
		if !errors.Is(err, errClientDone) {
			s.log().Debug("nbd handshake ended", "err", err)
		}
		return
	}
	s.log().Debug("nbd client attached", "export", exp.Name, "structured", sc.structured)
	if err := sc.transmit(ctx, exp); err != nil && ctx.Err() == nil {
		s.log().Debug("nbd connection ended", "export", exp.Name, "err", err)
	}
}

func (s *Server) log() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

func (s *Server) find(name string) *ServerExport {
	for i := range s.Exports {
		if s.Exports[i].Name == name {
			return &s.Exports[i]
		}
	}
	if name == "" && len(s.Exports) > 0 {
		return &s.Exports[0]
	}
	return nil
}

var errClientDone = errors.New("client ended the handshake")

type serverConn struct {
	s          *Server
	conn       net.Conn
	r          *bufio.Reader
	wmu        sync.Mutex
	w          *bufio.Writer
	noZeroes   bool
	structured bool
	metaFor    string // export the meta context was selected for
	metaBase   bool   // base:allocation selected
}

func (sc *serverConn) optReply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	sc.w.Write(h[:])
	sc.w.Write(data)
	return sc.w.Flush()
}

func (sc *serverConn) optError(opt, typ uint32, msg string) error {
	return sc.optReply(opt, typ, []byte(msg))
}

// negotiate runs the handshake until the client picks an export.
func (sc *serverConn) negotiate() (*ServerExport, error) {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := sc.conn.Write(hello[:]); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(sc.r, cf[:]); err != nil {
		return nil, err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^uint32(flagFixedNewstyle|flagNoZeroes) != 0 || flags&flagFixedNewstyle == 0 {
		return nil, fmt.Errorf("client flags %#x not supported", flags)
	}
	sc.noZeroes = flags&flagNoZeroes != 0
	for {
		var h [16]byte
		if _, err := io.ReadFull(sc.r, h[:]); err != nil {
			return nil, err
		}
		if binary.BigEndian.Uint64(h[0:]) != optMagic {
			return nil, fmt.Errorf("bad option magic")
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > serverMaxOption {
			return nil, fmt.Errorf("option %s of %d bytes is too large", optName(opt), n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(sc.r, data); err != nil {
			return nil, err
		}
		exp, err := sc.option(opt, data)
		if err != nil || exp != nil {
			return exp, err
		}
	}
}

// option answers one option; it returns the export when the client has
// chosen one and the transmission phase begins.
func (sc *serverConn) option(opt uint32, data []byte) (*ServerExport, error) {
	switch opt {
	case optExportName:
		exp := sc.s.find(string(data))
		if exp == nil {
			return nil, fmt.Errorf("unknown export %q", data)
		}
		b := binary.BigEndian.AppendUint64(nil, uint64(exp.Device.Size()))
		b = binary.BigEndian.AppendUint16(b, uint16(sc.transmissionFlags()))
		if !sc.noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		sc.w.Write(b)
		return exp, sc.w.Flush()
	case optAbort:
		sc.optReply(opt, repAck, nil)
		return nil, errClientDone
	case optList:
		if len(data) != 0 {
			return nil, sc.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, e := range sc.s.Exports {
			b := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
			b = append(b, e.Name...)
			b = append(b, e.Description...)
			if err := sc.optReply(opt, repServer, b); err != nil {
				return nil, err
			}
		}
		return nil, sc.optReply(opt, repAck, nil)
	case optStructuredReply:
		if len(data) != 0 {
			return nil, sc.optError(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		sc.structured = true
		return nil, sc.optReply(opt, repAck, nil)
	case optListMetaCtx, optSetMetaContext:
		return nil, sc.metaContext(opt, data)
	case optInfo, optGo:
		return sc.infoGo(opt, data)
	}
	return nil, sc.optError(opt, repErrUnsup, fmt.Sprintf("%s is not supported", optName(opt)))
}

func (sc *serverConn) transmissionFlags() TransmissionFlags {
	return FlagHasFlags | FlagReadOnly | FlagSendFlush | FlagSendDF | FlagCanMultiConn | FlagSendCache
}

// parseName reads a 32-bit length and a string from b.
func parseName(b []byte) (string, []byte, bool) {
	if len(b) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(b)
	if uint64(n) > uint64(len(b)-4) {
		return "", nil, false
	}
	return string(b[4 : 4+n]), b[4+n:], true
}

func (sc *serverConn) infoGo(opt uint32, data []byte) (*ServerExport, error) {
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 2 || len(rest) != 2+2*int(binary.BigEndian.Uint16(rest)) {
		return nil, sc.optError(opt, repErrInvalid, "malformed "+optName(opt))
	}
	exp := sc.s.find(name)
	if exp == nil {
		return nil, sc.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	wantName, wantDesc := false, false
	for i := 2; i < len(rest); i += 2 {
		switch binary.BigEndian.Uint16(rest[i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, uint64(exp.Device.Size()))
	info = binary.BigEndian.AppendUint16(info, uint16(sc.transmissionFlags()))
	if err := sc.optReply(opt, repInfo, info); err != nil {
		return nil, err
	}
	if wantName {
		b := append(binary.BigEndian.AppendUint16(nil, infoName), exp.Name...)
		if err := sc.optReply(opt, repInfo, b); err != nil {
			return nil, err
		}
	}
	if wantDesc && exp.Description != "" {
		b := append(binary.BigEndian.AppendUint16(nil, infoDescription), exp.Description...)
		if err := sc.optReply(opt, repInfo, b); err != nil {
			return nil, err
		}
	}
	bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, 1)
	bs = binary.BigEndian.AppendUint32(bs, 4096)
	bs = binary.BigEndian.AppendUint32(bs, serverMaxRequest)
	if err := sc.optReply(opt, repInfo, bs); err != nil {
		return nil, err
	}
	if err := sc.optReply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optInfo {
		return nil, nil
	}
	if sc.metaFor != exp.Name {
		sc.metaBase = false // contexts chosen for another export do not apply
	}
	return exp, nil
}

func (sc *serverConn) metaContext(opt uint32, data []byte) error {
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 4 {
		return sc.optError(opt, repErrInvalid, "malformed "+optName(opt))
	}
	if opt == optSetMetaContext && !sc.structured {
		return sc.optError(opt, repErrInvalid, "negotiate structured replies first")
	}
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for i := uint32(0); i < nq; i++ {
		q, r, ok := parseName(rest)
		if !ok || len(q) > maxMetaContextLength {
			return sc.optError(opt, repErrInvalid, "malformed meta context query")
		}
		queries = append(queries, q)
		rest = r
	}
	if len(rest) != 0 {
		return sc.optError(opt, repErrInvalid, "trailing bytes after meta context queries")
	}
	exp := sc.s.find(name)
	if exp == nil {
		return sc.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	base := false
	for _, q := range queries {
		if q == MetaBaseAllocation || (opt == optListMetaCtx && q == "base:") {
			base = true
		}
	}
	if opt == optListMetaCtx && len(queries) == 0 {
		base = true
	}
	if opt == optSetMetaContext {
		sc.metaFor, sc.metaBase = exp.Name, base
	}
	if base {
		id := uint32(metaContextBaseID)
		if opt == optListMetaCtx {
			id = 0
		}
		b := append(binary.BigEndian.AppendUint32(nil, id), MetaBaseAllocation...)
		if err := sc.optReply(opt, repMetaContext, b); err != nil {
			return err
		}
	}
	return sc.optReply(opt, repAck, nil)
}

// request is one transmission-phase command.
type request struct {
	flags  CmdFlags
	typ    uint16
	cookie uint64
	off    int64
	length uint32
}

func (sc *serverConn) transmit(ctx context.Context, exp *ServerExport) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	inflight := sc.s.MaxInFlight
	if inflight <= 0 {
		inflight = 16
	}
	sem := make(chan struct{}, inflight)
	var wg sync.WaitGroup
	defer wg.Wait()
	dev := exp.Device
	for {
		var h [28]byte
		if _, err := io.ReadFull(sc.r, h[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if binary.BigEndian.Uint32(h[0:]) != requestMagic {
			return fmt.Errorf("bad request magic")
		}
		rq := request{
			flags:  CmdFlags(binary.BigEndian.Uint16(h[4:])),
			typ:    binary.BigEndian.Uint16(h[6:]),
			cookie: binary.BigEndian.Uint64(h[8:]),
			off:    int64(binary.BigEndian.Uint64(h[16:])),
			length: binary.BigEndian.Uint32(h[24:]),
		}
		switch rq.typ {
		case cmdDisc:
			return nil
		case cmdWrite:
			// The payload must be consumed to stay in step.
			if _, err := io.CopyN(io.Discard, sc.r, int64(rq.length)); err != nil {
				return err
			}
			if err := sc.replyError(rq, errnoPerm, "the export is read-only"); err != nil {
				return err
			}
			continue
		case cmdTrim, cmdWriteZeroes:
			if err := sc.replyError(rq, errnoPerm, "the export is read-only"); err != nil {
				return err
			}
			continue
		case cmdFlush:
			if err := sc.replyOK(rq); err != nil {
				return err
			}
			continue
		}
		if rq.off < 0 || rq.off > dev.Size() || int64(rq.length) > dev.Size()-rq.off {
			if err := sc.replyError(rq, errnoInval, "request beyond the end of the export"); err != nil {
				return err
			}
			continue
		}
		switch rq.typ {
		case cmdRead, cmdCache:
			if rq.length > serverMaxRequest {
				if err := sc.replyError(rq, errnoInval, "read larger than the maximum block size"); err != nil {
					return err
				}
				continue
			}
		case cmdBlockStatus:
			if !sc.structured || !sc.metaBase || rq.length == 0 {
				if err := sc.replyError(rq, errnoInval, "block status needs structured replies, the base:allocation context and a length"); err != nil {
					return err
				}
				continue
			}
		default:
			if err := sc.replyError(rq, errnoInval, cmdName(rq.typ)+" is not supported"); err != nil {
				return err
			}
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			var err error
			switch rq.typ {
			case cmdRead:
				err = sc.serveRead(ctx, dev, rq, exp.Name)
			case cmdCache:
				err = sc.serveCache(ctx, dev, rq)
			case cmdBlockStatus:
				err = sc.serveBlockStatus(ctx, dev, rq)
			}
			if err != nil {
				cancel()
				sc.conn.Close()
			}
		}()
	}
}

const readBufSize = 1 << 20

func (sc *serverConn) serveRead(ctx context.Context, dev Device, rq request, export string) error {
	var buf []byte
	if rq.length <= readBufSize {
		bp, _ := sc.s.readBufs.Get().(*[]byte)
		if bp == nil {
			b := make([]byte, readBufSize)
			bp = &b
		}
		defer sc.s.readBufs.Put(bp)
		buf = (*bp)[:rq.length]
	} else {
		buf = make([]byte, rq.length)
	}
	if err := dev.ReadAt(ctx, buf, rq.off); err != nil {
		sc.s.log().Debug("read failed; the client gets an I/O error for the range", "export", export,
			"offset", rq.off, "length", rq.length, "err", err)
		return sc.replyError(rq, errnoIO, err.Error())
	}
	if !sc.structured {
		return sc.reply(rq.cookie, 0, buf)
	}
	if rq.flags&CmdFlagDF != 0 || rq.length == 0 {
		return sc.chunk(rq.cookie, replyFlagDone, chunkOffsetData, binary.BigEndian.AppendUint64(nil, uint64(rq.off)), buf)
	}
	// Zero runs of 64 KiB and more go out as holes.
	const holeMin = 64 << 10
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	start := 0 // start of pending data
	for i := 0; i < len(buf); {
		z := zeroRun(buf[i:])
		if z < holeMin {
			i += max(z, 4096)
			continue
		}
		if i > start {
			sc.chunkLocked(rq.cookie, 0, chunkOffsetData, binary.BigEndian.AppendUint64(nil, uint64(rq.off)+uint64(start)), buf[start:i])
		}
		h := binary.BigEndian.AppendUint64(nil, uint64(rq.off)+uint64(i))
		h = binary.BigEndian.AppendUint32(h, uint32(z))
		sc.chunkLocked(rq.cookie, 0, chunkOffsetHole, h, nil)
		i += z
		start = i
	}
	if start < len(buf) {
		sc.chunkLocked(rq.cookie, 0, chunkOffsetData, binary.BigEndian.AppendUint64(nil, uint64(rq.off)+uint64(start)), buf[start:])
	}
	sc.chunkLocked(rq.cookie, replyFlagDone, chunkNone, nil, nil)
	return sc.w.Flush()
}

// zeroRun is the length of b's leading run of zero bytes, in whole 4 KiB
// blocks (or all of b when b is all zeros).
func zeroRun(b []byte) int {
	n := 0
	for n < len(b) {
		end := min(n+4096, len(b))
		for _, c := range b[n:end] {
			if c != 0 {
				return n
			}
		}
		n = end
	}
	return n
}

func (sc *serverConn) serveCache(ctx context.Context, dev Device, rq request) error {
	if c, ok := dev.(interface {
		Prefetch(ctx context.Context, off, length int64)
	}); ok {
		c.Prefetch(ctx, rq.off, int64(rq.length))
	}
	return sc.replyOK(rq)
}

func (sc *serverConn) serveBlockStatus(ctx context.Context, dev Device, rq request) error {
	exts, err := dev.Extents(ctx, rq.off, int64(rq.length))
	if err != nil || len(exts) == 0 {
		if err == nil {
			err = errors.New("no extents")
		}
		return sc.replyError(rq, errnoIO, err.Error())
	}
	b := binary.BigEndian.AppendUint32(nil, metaContextBaseID)
	for i, e := range exts {
		b = binary.BigEndian.AppendUint32(b, uint32(e.Length))
		b = binary.BigEndian.AppendUint32(b, e.Flags)
		if rq.flags&CmdFlagReqOne != 0 || i == 1<<16 {
			break
		}
	}
	return sc.chunk(rq.cookie, replyFlagDone, chunkBlockStatus, b, nil)
}

func (sc *serverConn) replyOK(rq request) error {
	if sc.structured {
		return sc.chunk(rq.cookie, replyFlagDone, chunkNone, nil, nil)
	}
	return sc.reply(rq.cookie, 0, nil)
}

func (sc *serverConn) replyError(rq request, errno uint32, msg string) error {
	if !sc.structured {
		return sc.reply(rq.cookie, errno, nil)
	}
	if len(msg) > maxErrorMessage {
		msg = msg[:maxErrorMessage]
	}
	b := binary.BigEndian.AppendUint32(nil, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	typ := uint16(chunkError)
	if rq.typ == cmdRead {
		typ = chunkErrorOffset
		b = binary.BigEndian.AppendUint64(b, uint64(rq.off))
	}
	return sc.chunk(rq.cookie, replyFlagDone, typ, b, nil)
}

func (sc *serverConn) reply(cookie uint64, errno uint32, data []byte) error {
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], simpleMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], cookie)
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	sc.w.Write(h[:])
	sc.w.Write(data)
	return sc.w.Flush()
}

func (sc *serverConn) chunk(cookie uint64, flags, typ uint16, head, data []byte) error {
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	sc.chunkLocked(cookie, flags, typ, head, data)
	return sc.w.Flush()
}

func (sc *serverConn) chunkLocked(cookie uint64, flags, typ uint16, head, data []byte) {
	var h [20]byte
	binary.BigEndian.PutUint32(h[0:], structMagic)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint32(h[16:], uint32(len(head)+len(data)))
	sc.w.Write(h[:])
	sc.w.Write(head)
	sc.w.Write(data)
}
