package nbd

import (
	"bufio"
	"bytes"
	"testing"
)

// FuzzReply feeds arbitrary bytes to the reply parser as if a server sent
// them, with a few calls of each kind pending. The parser must never panic,
// never write outside a caller's buffer, and leave completed calls in a
// consistent state. The seed corpus in testdata/fuzz/FuzzReply holds
// well-formed replies of every kind (simple, OFFSET_DATA, OFFSET_HOLE,
// BLOCK_STATUS, BLOCK_STATUS_EXT, ERROR, ERROR_OFFSET, NONE).
func FuzzReply(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		c := &Client{pending: make(map[uint64]*call)}
		const guard = 64
		calls := map[uint64]*call{
			1: {typ: cmdRead, off: 0, length: 4096},
			2: {typ: cmdBlockStatus, off: 0, length: 1 << 20, ctxID: 1},
			3: {typ: cmdWrite, off: 0, length: 512},
			4: {typ: cmdRead, off: 1000, length: 100},
			5: {typ: cmdFlush},
			6: {typ: cmdBlockStatus, off: 4096, length: 8192, ctxID: 7},
		}
		backing := map[uint64][]byte{}
		for cookie, cl := range calls {
			cl.done = make(chan struct{})
			if cl.typ == cmdRead {
				// The buffer sits between guard bytes that must stay 0xee.
				b := bytes.Repeat([]byte{0xee}, int(cl.length)+2*guard)
				backing[cookie] = b
				cl.buf = b[guard : guard+cl.length]
			}
			c.pending[cookie] = cl
		}
		r := bufio.NewReader(bytes.NewReader(data))
		for c.readReply(r) == nil {
		}
		for cookie, cl := range calls {
			if b := backing[cookie]; b != nil {
				for i := range guard {
					if b[i] != 0xee || b[len(b)-1-i] != 0xee {
						t.Fatalf("reply to cookie %d wrote outside the caller's buffer", cookie)
					}
				}
			}
			select {
			case <-cl.done:
			default:
				continue
			}
			if cl.covered > cl.length && cl.typ == cmdRead {
				t.Fatalf("cookie %d: covered %d of %d bytes", cookie, cl.covered, cl.length)
			}
			pos := cl.off
			for _, e := range cl.extents {
				if e.Offset != pos || e.Length <= 0 {
					t.Fatalf("cookie %d: extents do not tile: %+v", cookie, cl.extents)
				}
				pos += e.Length
			}
			if pos > cl.off+cl.length {
				t.Fatalf("cookie %d: extents reach %d, beyond the request's end %d", cookie, pos, cl.off+cl.length)
			}
			if cl.err == nil && cl.typ == cmdRead && cl.covered != cl.length {
				t.Fatalf("cookie %d: read succeeded with %d of %d bytes", cookie, cl.covered, cl.length)
			}
		}
	})
}
