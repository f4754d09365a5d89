//go:build cgo && !purego

package compress

import (
	"fmt"

	"github.com/DataDog/zstd"
)

// Impl names the codec binding in use.
const Impl = "libzstd (cgo)"

// Encoder compresses with zstd level 1. One per goroutine.
type Encoder struct{ ctx zstd.Ctx }

// NewEncoder returns an encoder.
func NewEncoder() *Encoder { return &Encoder{ctx: zstd.NewCtx()} }

// Compress returns the zstd frame of src, written into dst's storage.
func (e *Encoder) Compress(dst, src []byte) ([]byte, error) {
	return e.ctx.CompressLevel(dst[:cap(dst)], src, 1)
}

// Decompress decodes src, whose decoded size is rawLen, into dst's storage.
func Decompress(dst, src []byte, rawLen int) ([]byte, error) {
	if cap(dst) < rawLen {
		dst = make([]byte, rawLen)
	}
	out, err := zstd.Decompress(dst[:rawLen], src)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if len(out) != rawLen {
		return nil, fmt.Errorf("%w: decoded %d bytes, want %d", ErrCorrupt, len(out), rawLen)
	}
	return out, nil
}
