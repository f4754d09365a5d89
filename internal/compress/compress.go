// Package compress compresses chunks with zstd.
//
// The default build uses libzstd through cgo (github.com/DataDog/zstd), which
// measured about twice as fast as the pure-Go encoder at level 1 on real disk
// data (docs/BENCHMARKS.md). Build with -tags purego, or CGO_ENABLED=0, to
// get the pure-Go github.com/klauspost/compress encoder instead; the two
// produce interchangeable zstd frames.
package compress

import "errors"

// ErrCorrupt is returned when a compressed chunk cannot be decoded.
var ErrCorrupt = errors.New("compressed data is corrupt")

// Worthwhile reports whether a compressed form of n bytes is worth storing
// instead of raw bytes of length raw: it must save at least 1/32.
func Worthwhile(n, raw int) bool { return n < raw-raw/32 }
