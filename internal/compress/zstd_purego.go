//go:build !cgo || purego

package compress

import (
	"fmt"

	"github.com/klauspost/compress/zstd"
)

// Impl names the codec binding in use.
const Impl = "klauspost/compress (pure Go)"

// Encoder compresses with zstd at the fastest setting. One per goroutine.
type Encoder struct{ enc *zstd.Encoder }

// NewEncoder returns an encoder.
func NewEncoder() *Encoder {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
	if err != nil {
		panic(err)
	}
	return &Encoder{enc: enc}
}

// Compress returns the zstd frame of src, written into dst's storage.
func (e *Encoder) Compress(dst, src []byte) ([]byte, error) {
	return e.enc.EncodeAll(src, dst[:0]), nil
}

var decoder, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0))

// Decompress decodes src, whose decoded size is rawLen, into dst's storage.
func Decompress(dst, src []byte, rawLen int) ([]byte, error) {
	out, err := decoder.DecodeAll(src, dst[:0])
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if len(out) != rawLen {
		return nil, fmt.Errorf("%w: decoded %d bytes, want %d", ErrCorrupt, len(out), rawLen)
	}
	return out, nil
}
