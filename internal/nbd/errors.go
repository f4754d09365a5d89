package nbd

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors callers can test with errors.Is.
var (
	// ErrClosed is returned by calls on a client that was closed, and by
	// calls that were in flight when it was.
	ErrClosed = errors.New("nbd: client closed")
	// ErrReadOnly is returned by writes to an export the server announced
	// as read-only.
	ErrReadOnly = errors.New("nbd: export is read-only")
	// ErrUnsupported is returned for a command the server did not announce
	// (trim, write-zeroes, flush) or an option it refused as unsupported.
	ErrUnsupported = fmt.Errorf("nbd: %w", errors.ErrUnsupported)
	// ErrExportNotFound is returned by Dial when the server has no export
	// of the requested name.
	ErrExportNotFound = errors.New("nbd: export not found")
	// ErrNoMetaContext is returned by BlockStatus for a meta context the
	// server did not grant during the handshake.
	ErrNoMetaContext = errors.New("nbd: meta context not negotiated")
	// ErrOutOfRange is returned for a request that reaches beyond the end of
	// the export.
	ErrOutOfRange = errors.New("nbd: request beyond the end of the export")
	// ErrProtocol is returned (wrapped) when the server violates the NBD
	// protocol; the connection is unusable afterwards.
	ErrProtocol = errors.New("nbd: protocol error")
)

// Error is a failure the server reported for one command.
type Error struct {
	// Op is the command: "read", "write", "flush", "trim",
	// "write-zeroes" or "block-status".
	Op string
	// Offset and Length describe the request that failed.
	Offset, Length int64
	// ErrOffset is the offset the server named as failing (an
	// NBD_REPLY_TYPE_ERROR_OFFSET chunk), or -1.
	ErrOffset int64
	// Errno is the server's error code translated to the local errno.
	Errno syscall.Errno
	// Message is the server's human-readable message, if it sent one.
	Message string
}

func (e *Error) Error() string {
	s := fmt.Sprintf("nbd: %s of %d bytes at offset %d failed: %v", e.Op, e.Length, e.Offset, e.Errno)
	if e.ErrOffset >= 0 {
		s += fmt.Sprintf(" (at offset %d)", e.ErrOffset)
	}
	if e.Message != "" {
		s += ": server says: " + e.Message
	}
	return s
}

// Unwrap returns the errno, so errors.Is(err, syscall.EIO) works.
func (e *Error) Unwrap() error { return e.Errno }

// errnoFromWire maps an NBD error value to the local errno. NBD reuses the
// Linux numbers for the few values it defines; anything else is EIO.
func errnoFromWire(v uint32) syscall.Errno {
	switch v {
	case 1:
		return syscall.EPERM
	case 5:
		return syscall.EIO
	case 12:
		return syscall.ENOMEM
	case 22:
		return syscall.EINVAL
	case 28:
		return syscall.ENOSPC
	case 75:
		return syscall.EOVERFLOW
	case 95:
		return syscall.ENOTSUP
	case 108:
		return syscall.ESHUTDOWN
	}
	return syscall.EIO
}

// OptionError is a handshake option the server refused.
type OptionError struct {
	Option  uint32 // the NBD_OPT_* code
	Reply   uint32 // the NBD_REP_ERR_* code
	Message string // the server's message, if any
}

func (e *OptionError) Error() string {
	s := fmt.Sprintf("nbd: server refused %s: %s", optName(e.Option), repErrName(e.Reply))
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap maps the reply to the sentinel a caller would test for.
func (e *OptionError) Unwrap() error {
	switch e.Reply {
	case repErrUnknown:
		return ErrExportNotFound
	case repErrUnsup:
		return ErrUnsupported
	}
	return nil
}

func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}
