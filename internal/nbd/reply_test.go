package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
)

// wire builds server bytes for parser tests.
type wire []byte

func (w wire) u16(v uint16) wire  { return binary.BigEndian.AppendUint16(w, v) }
func (w wire) u32(v uint32) wire  { return binary.BigEndian.AppendUint32(w, v) }
func (w wire) u64(v uint64) wire  { return binary.BigEndian.AppendUint64(w, v) }
func (w wire) raw(p ...byte) wire { return append(w, p...) }

func (w wire) simple(errno uint32, cookie uint64, data ...byte) wire {
	return w.u32(simpleMagic).u32(errno).u64(cookie).raw(data...)
}

func (w wire) chunk(flags, typ uint16, cookie uint64, payload wire) wire {
	return w.u32(structMagic).u16(flags).u16(typ).u64(cookie).u32(uint32(len(payload))).raw(payload...)
}

// TestReplyParsing checks the outcome of each kind of reply, including
// chunk types QEMU 7.2 never sends (64-bit extents, errors with offsets).
func TestReplyParsing(t *testing.T) {
	pattern := func(n int, v byte) []byte { return bytes.Repeat([]byte{v}, n) }
	tests := []struct {
		name    string
		call    *call
		reply   wire
		wantBuf []byte   // for reads
		wantExt []Extent // for block status
		wantErr string   // substring; "" means success
		errno   syscall.Errno
		fatal   bool // the connection must be dropped
	}{
		{
			name:    "simple read",
			call:    &call{typ: cmdRead, off: 512, length: 8},
			reply:   wire{}.simple(0, 1, pattern(8, 7)...),
			wantBuf: pattern(8, 7),
		},
		{
			name: "structured data, hole, data",
			call: &call{typ: cmdRead, off: 4096, length: 12},
			reply: wire{}.
				chunk(0, chunkOffsetData, 1, wire{}.u64(4096).raw(1, 2, 3, 4)).
				chunk(0, chunkOffsetHole, 1, wire{}.u64(4100).u32(4)).
				chunk(replyFlagDone, chunkOffsetData, 1, wire{}.u64(4104).raw(5, 6, 7, 8)),
			wantBuf: []byte{1, 2, 3, 4, 0, 0, 0, 0, 5, 6, 7, 8},
		},
		{
			name: "chunks out of order then NONE",
			call: &call{typ: cmdRead, off: 0, length: 4},
			reply: wire{}.
				chunk(0, chunkOffsetData, 1, wire{}.u64(2).raw(3, 4)).
				chunk(0, chunkOffsetData, 1, wire{}.u64(0).raw(1, 2)).
				chunk(replyFlagDone, chunkNone, 1, nil),
			wantBuf: []byte{1, 2, 3, 4},
		},
		{
			name:    "short structured read",
			call:    &call{typ: cmdRead, off: 0, length: 4},
			reply:   wire{}.chunk(replyFlagDone, chunkOffsetData, 1, wire{}.u64(0).raw(1, 2)),
			wantErr: "server sent 2 bytes",
		},
		{
			name: "overlapping chunks",
			call: &call{typ: cmdRead, off: 0, length: 4},
			reply: wire{}.
				chunk(0, chunkOffsetData, 1, wire{}.u64(0).raw(1, 2)).
				chunk(0, chunkOffsetHole, 1, wire{}.u64(1).u32(1)).
				chunk(replyFlagDone, chunkOffsetData, 1, wire{}.u64(2).raw(3, 4)),
			wantErr: "server answered [1, +1) twice",
		},
		{
			name:    "data outside the request",
			call:    &call{typ: cmdRead, off: 0, length: 4},
			reply:   wire{}.chunk(replyFlagDone, chunkOffsetData, 1, wire{}.u64(2).raw(1, 2, 3)),
			wantErr: "outside read",
			fatal:   true,
		},
		{
			name: "error chunk",
			call: &call{typ: cmdRead, off: 8192, length: 512},
			reply: wire{}.chunk(replyFlagDone, chunkError, 1,
				wire{}.u32(5).u16(9).raw([]byte("disk gone")...)),
			wantErr: "read of 512 bytes at offset 8192 failed: input/output error: server says: disk gone",
			errno:   syscall.EIO,
		},
		{
			name: "error offset chunk",
			call: &call{typ: cmdWrite, off: 0, length: 1 << 20},
			reply: wire{}.
				chunk(0, chunkErrorOffset, 1, wire{}.u32(28).u16(4).raw([]byte("full")...).u64(65536)).
				chunk(replyFlagDone, chunkNone, 1, nil),
			wantErr: "(at offset 65536)",
			errno:   syscall.ENOSPC,
		},
		{
			name:    "simple error",
			call:    &call{typ: cmdFlush},
			reply:   wire{}.simple(1, 1),
			wantErr: "flush of 0 bytes at offset 0 failed: operation not permitted",
			errno:   syscall.EPERM,
		},
		{
			name: "block status, other context skipped, clipped",
			call: &call{typ: cmdBlockStatus, off: 1 << 20, length: 3 << 16, ctxID: 2},
			reply: wire{}.
				chunk(0, chunkBlockStatus, 1, wire{}.u32(1).u32(1<<30).u32(0)).
				chunk(replyFlagDone, chunkBlockStatus, 1, wire{}.u32(2).
					u32(1<<16).u32(3).u32(1<<16).u32(0).u32(1<<20).u32(1)),
			wantExt: []Extent{{1 << 20, 1 << 16, 3}, {1<<20 + 1<<16, 1 << 16, 0}, {1<<20 + 2<<16, 1 << 16, 1}},
		},
		{
			name: "block status ext, partial answer",
			call: &call{typ: cmdBlockStatus, off: 0, length: 1 << 40, ctxID: 4},
			reply: wire{}.chunk(replyFlagDone, chunkBlockStatusExt, 1, wire{}.u32(4).u32(2).
				u64(1<<33).u64(2).u64(1<<34).u64(1)),
			wantExt: []Extent{{0, 1 << 33, 2}, {1 << 33, 1 << 34, 1}},
		},
		{
			name:    "block status without our context",
			call:    &call{typ: cmdBlockStatus, off: 0, length: 4096, ctxID: 4},
			reply:   wire{}.chunk(replyFlagDone, chunkBlockStatus, 1, wire{}.u32(5).u32(4096).u32(0)),
			wantErr: "no extents for the context",
		},
		{
			name:    "unknown cookie",
			call:    &call{typ: cmdFlush},
			reply:   wire{}.simple(0, 99),
			wantErr: "unknown cookie 99",
			fatal:   true,
		},
		{
			name:    "bad magic",
			call:    &call{typ: cmdFlush},
			reply:   wire{}.u32(0xdeadbeef).u64(0).u64(0),
			wantErr: "bad reply magic",
			fatal:   true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &Client{pending: make(map[uint64]*call)}
			cl := tt.call
			cl.done = make(chan struct{})
			if cl.typ == cmdRead {
				cl.buf = bytes.Repeat([]byte{0xee}, int(cl.length))
			}
			c.pending[1] = cl
			r := bufio.NewReader(bytes.NewReader(tt.reply))
			var err error
			for err == nil && len(c.pending) > 0 {
				err = c.readReply(r)
			}
			if tt.fatal {
				if err == nil || !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("readReply = %v, want a protocol error mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("readReply: %v", err)
			}
			select {
			case <-cl.done:
			default:
				t.Fatal("call not completed")
			}
			if tt.wantErr != "" {
				if cl.err == nil || !strings.Contains(cl.err.Error(), tt.wantErr) {
					t.Fatalf("call error = %v, want %q", cl.err, tt.wantErr)
				}
				if tt.errno != 0 && !errors.Is(cl.err, tt.errno) {
					t.Errorf("call error %v does not wrap %v", cl.err, tt.errno)
				}
				return
			}
			if cl.err != nil {
				t.Fatalf("call error: %v", cl.err)
			}
			if tt.wantBuf != nil && !bytes.Equal(cl.buf, tt.wantBuf) {
				t.Errorf("buffer = %v, want %v", cl.buf, tt.wantBuf)
			}
			if tt.wantExt != nil && fmt.Sprint(cl.extents) != fmt.Sprint(tt.wantExt) {
				t.Errorf("extents = %v, want %v", cl.extents, tt.wantExt)
			}
		})
	}
}
