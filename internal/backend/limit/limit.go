// Package limit owns a repository's bandwidth limits: a backend.Backend
// decorator that holds the bytes saved (uploads) and the bytes loaded
// (downloads) to a rate each, shared by every goroutine that uses it.
//
// It paces whole calls, not packets: a Save of 16 MiB at 4 MiB/s waits
// until the limit has room for those bytes (about 4 s) and then lets the
// backend send them at full speed. Over any stretch longer than one
// object the rate holds; on the wire a single object still goes out in a
// burst.
package limit

import (
	"context"
	"fmt"

	"golang.org/x/time/rate"

	"github.com/kura-backup/kura/internal/backend"
)

// Backend limits the bandwidth of the backend it wraps. It implements
// backend.LoaderInto (through the wrapped backend's LoadInto, or Load and
// a copy) and backend.TempCleaner when the wrapped backend does.
type Backend struct {
	be       backend.Backend
	up, down *rate.Limiter // nil: no limit
}

// New wraps be; upload and download are in bytes per second, 0 for no
// limit.
func New(be backend.Backend, upload, download float64) *Backend {
	return &Backend{be: be, up: limiter(upload), down: limiter(download)}
}

// limiter returns a limiter of bytesPerSec whose burst is an eighth of a
// second's worth (16 KiB to 4 MiB), nil for no limit.
func limiter(bytesPerSec float64) *rate.Limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	burst := min(max(int(bytesPerSec/8), 16<<10), 4<<20)
	return rate.NewLimiter(rate.Limit(bytesPerSec), burst)
}

// wait takes n bytes from l, a burst at a time.
func wait(ctx context.Context, l *rate.Limiter, n int64) error {
	if l == nil {
		return nil
	}
	for n > 0 {
		step := min(n, int64(l.Burst()))
		if err := l.WaitN(ctx, int(step)); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("bandwidth limit: %w", err)
		}
		n -= step
	}
	return nil
}

// Unwrap returns the wrapped backend.
func (b *Backend) Unwrap() backend.Backend { return b.be }

// Save implements backend.Backend: it waits until the upload limit has
// room for data, then saves.
func (b *Backend) Save(ctx context.Context, name string, data []byte) error {
	if err := wait(ctx, b.up, int64(len(data))); err != nil {
		return err
	}
	return b.be.Save(ctx, name, data)
}

// Load implements backend.Backend: a range of known length waits before
// it is loaded, a load to the end of the object after.
func (b *Backend) Load(ctx context.Context, name string, offset, length int64) ([]byte, error) {
	if err := wait(ctx, b.down, length); err != nil {
		return nil, err
	}
	data, err := b.be.Load(ctx, name, offset, length)
	if err == nil && length == 0 {
		err = wait(ctx, b.down, int64(len(data)))
	}
	return data, err
}

// LoadInto implements backend.LoaderInto.
func (b *Backend) LoadInto(ctx context.Context, name string, offset, length int64, buf []byte) ([]byte, error) {
	li, ok := b.be.(backend.LoaderInto)
	if !ok {
		data, err := b.Load(ctx, name, offset, length)
		if err != nil {
			return nil, err
		}
		return append(buf[:0], data...), nil
	}
	if err := wait(ctx, b.down, length); err != nil {
		return nil, err
	}
	return li.LoadInto(ctx, name, offset, length, buf)
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	return b.be.Stat(ctx, name)
}

// List implements backend.Backend.
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	return b.be.List(ctx, prefix, fn)
}

// Remove implements backend.Backend.
func (b *Backend) Remove(ctx context.Context, name string) error {
	return b.be.Remove(ctx, name)
}

// Location implements backend.Backend.
func (b *Backend) Location() string { return b.be.Location() }

// RemoveStaleTemp implements backend.TempCleaner when the wrapped backend
// does; otherwise it removes nothing.
func (b *Backend) RemoveStaleTemp(ctx context.Context) (int, int64, error) {
	if tc, ok := b.be.(backend.TempCleaner); ok {
		return tc.RemoveStaleTemp(ctx)
	}
	return 0, 0, nil
}

var (
	_ backend.LoaderInto  = (*Backend)(nil)
	_ backend.TempCleaner = (*Backend)(nil)
)
