// Package retry owns retrying a backend's calls: a backend.Backend
// decorator that repeats a call which failed with a transient error (a
// server's 500/503 or SlowDown, a reset connection, a timeout), after an
// exponential backoff with full jitter, a bounded number of times, with a
// log line per retry.
//
// It never repeats a call that failed for good: ErrNotFound, ErrTruncated,
// ErrExists, ErrNoSpace, a refused credential, or a cancelled context.
// Repeating is safe for every method: Save stores the same bytes under
// the same name (the contract of backend.Backend makes that a no-op), and
// the others only read or delete.
package retry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"syscall"
	"time"

	"github.com/kura-backup/kura/internal/backend"
)

// Policy says how often and how long to retry.
type Policy struct {
	// Attempts is the number of calls made at most, the first included
	// (default 10).
	Attempts int
	// Base is the backoff before the second call; each further one doubles
	// it (default 250ms). The wait is random between 0 and that (full
	// jitter), so that many clients do not retry in step.
	Base time.Duration
	// Max caps the backoff (default 8s).
	Max time.Duration
}

// DefaultPolicy is what the registry (internal/backend/location) uses: ten
// calls over up to about 40 seconds of waiting (0.25 + 0.5 + 1 + 2 + 4 +
// 8 × 4 s of ceilings; with full jitter about 20 s on average, and less
// than 8 s once in 200), enough to ride out a server's restart or a
// throttling burst. It was six calls with a 20 s cap, which waits at most
// 7.75 s in all (0.25 + … + 4: the cap was never reached) and half of
// that on average: a server down for three seconds failed a call more
// than one time in four (TestS3ServerRestart saw backups fail that way).
var DefaultPolicy = Policy{Attempts: 10, Base: 250 * time.Millisecond, Max: 8 * time.Second}

func (p Policy) withDefaults() Policy {
	if p.Attempts <= 0 {
		p.Attempts = DefaultPolicy.Attempts
	}
	if p.Base <= 0 {
		p.Base = DefaultPolicy.Base
	}
	if p.Max <= 0 {
		p.Max = DefaultPolicy.Max
	}
	return p
}

// backoff returns the wait before call n+1 (n ≥ 1 calls made so far).
func (p Policy) backoff(n int, rnd func(int64) int64) time.Duration {
	ceil := p.Base
	for i := 1; i < n && ceil < p.Max; i++ {
		ceil *= 2
	}
	ceil = min(ceil, p.Max)
	return time.Duration(rnd(int64(ceil) + 1))
}

// Backend retries the calls of the backend it wraps. It implements
// backend.LoaderInto (through the wrapped backend's LoadInto, or Load and
// a copy) and backend.TempCleaner when the wrapped backend does.
type Backend struct {
	be     backend.Backend
	policy Policy
	log    *slog.Logger
	sleep  func(context.Context, time.Duration) error
	rnd    func(int64) int64
}

// New wraps be. A nil log discards the retry lines.
func New(be backend.Backend, p Policy, log *slog.Logger) *Backend {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Backend{be: be, policy: p.withDefaults(), log: log, sleep: sleepCtx, rnd: rand.Int64N}
}

// Unwrap returns the wrapped backend.
func (b *Backend) Unwrap() backend.Backend { return b.be }

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Retryable reports whether a call that failed with err may succeed when
// made again: errors marked backend.Transient, and network errors that
// say so (a reset or refused connection, a timeout, a body cut short).
// Errors a repeated call would meet again never are.
func Retryable(err error) bool {
	switch {
	case err == nil,
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded),
		errors.Is(err, backend.ErrNotFound), errors.Is(err, backend.ErrTruncated),
		errors.Is(err, backend.ErrExists), errors.Is(err, backend.ErrNoSpace):
		return false
	case backend.IsTransient(err):
		return true
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNABORTED), errors.Is(err, syscall.EPIPE),
		errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, io.ErrUnexpectedEOF):
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// do calls f until it succeeds, fails for good, or the attempts are used.
func (b *Backend) do(ctx context.Context, op, name string, f func() error) error {
	for n := 1; ; n++ {
		err := f()
		if err == nil || !Retryable(err) || ctx.Err() != nil {
			return err
		}
		if n >= b.policy.Attempts {
			return fmt.Errorf("%w (gave up after %d attempts)", err, n)
		}
		wait := b.policy.backoff(n, b.rnd)
		b.log.Warn("retrying a failed repository call", "op", op, "object", name, "location", b.be.Location(), "attempt", n+1, "of", b.policy.Attempts, "wait", wait.Round(time.Millisecond), "err", err)
		if serr := b.sleep(ctx, wait); serr != nil {
			return err
		}
	}
}

// Save implements backend.Backend.
func (b *Backend) Save(ctx context.Context, name string, data []byte) error {
	return b.do(ctx, "save", name, func() error { return b.be.Save(ctx, name, data) })
}

// Load implements backend.Backend.
func (b *Backend) Load(ctx context.Context, name string, offset, length int64) ([]byte, error) {
	var out []byte
	err := b.do(ctx, "load", name, func() (err error) {
		out, err = b.be.Load(ctx, name, offset, length)
		return err
	})
	return out, err
}

// LoadInto implements backend.LoaderInto.
func (b *Backend) LoadInto(ctx context.Context, name string, offset, length int64, buf []byte) ([]byte, error) {
	li, ok := b.be.(backend.LoaderInto)
	var out []byte
	err := b.do(ctx, "load", name, func() (err error) {
		if ok {
			out, err = li.LoadInto(ctx, name, offset, length, buf)
			return err
		}
		var data []byte
		data, err = b.be.Load(ctx, name, offset, length)
		if err == nil {
			out = append(buf[:0], data...)
		}
		return err
	})
	return out, err
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	var out backend.ObjectInfo
	err := b.do(ctx, "stat", name, func() (err error) {
		out, err = b.be.Stat(ctx, name)
		return err
	})
	return out, err
}

// List implements backend.Backend. A listing that fails part way is
// started again; objects already passed to fn are not passed again. An
// error from fn is returned at once.
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	seen := map[string]bool{}
	var fnErr error
	err := b.do(ctx, "list", prefix, func() error {
		return b.be.List(ctx, prefix, func(oi backend.ObjectInfo) error {
			if seen[oi.Name] {
				return nil
			}
			seen[oi.Name] = true
			if err := fn(oi); err != nil {
				fnErr = err
				return err
			}
			return nil
		})
	})
	if fnErr != nil {
		return fnErr
	}
	return err
}

// Remove implements backend.Backend.
func (b *Backend) Remove(ctx context.Context, name string) error {
	return b.do(ctx, "remove", name, func() error { return b.be.Remove(ctx, name) })
}

// Location implements backend.Backend.
func (b *Backend) Location() string { return b.be.Location() }

// RemoveStaleTemp implements backend.TempCleaner when the wrapped backend
// does; otherwise it removes nothing.
func (b *Backend) RemoveStaleTemp(ctx context.Context) (n int, bytes int64, err error) {
	tc, ok := b.be.(backend.TempCleaner)
	if !ok {
		return 0, 0, nil
	}
	err = b.do(ctx, "remove stale temporary objects", "", func() (err error) {
		var m int
		var by int64
		m, by, err = tc.RemoveStaleTemp(ctx)
		n += m
		bytes += by
		return err
	})
	return n, bytes, err
}

// locker returns the wrapped backend's backend.Locker.
func (b *Backend) locker() (backend.Locker, error) {
	l, ok := backend.Find[backend.Locker](b.be)
	if !ok {
		return nil, fmt.Errorf("%s: this storage cannot lock objects (object lock needs an S3 bucket with object lock)", b.be.Location())
	}
	return l, nil
}

// ProbeLock implements backend.Locker, once: a probe that failed part way
// is not one to repeat blindly.
func (b *Backend) ProbeLock(ctx context.Context, mode string) error {
	l, err := b.locker()
	if err != nil {
		return err
	}
	return l.ProbeLock(ctx, mode)
}

// SetRetention implements backend.Locker.
func (b *Backend) SetRetention(mode string, period time.Duration) {
	if l, err := b.locker(); err == nil {
		l.SetRetention(mode, period)
	}
}

// ExtendRetention implements backend.Locker.
func (b *Backend) ExtendRetention(ctx context.Context, name string, until time.Time) error {
	l, err := b.locker()
	if err != nil {
		return err
	}
	return b.do(ctx, "extend retention", name, func() error { return l.ExtendRetention(ctx, name, until) })
}

// Purge implements backend.Locker; a purge that failed part way starts
// again (what it deleted stays deleted).
func (b *Backend) Purge(ctx context.Context, keep func(string) bool) (backend.PurgeResult, error) {
	l, err := b.locker()
	if err != nil {
		return backend.PurgeResult{}, err
	}
	var res backend.PurgeResult
	err = b.do(ctx, "purge", "", func() (err error) {
		var r backend.PurgeResult
		r, err = l.Purge(ctx, keep)
		res.Deleted += r.Deleted
		res.DeletedBytes += r.DeletedBytes
		res.Locked, res.LockedBytes, res.LockedUntil = r.Locked, r.LockedBytes, r.LockedUntil
		res.Overwritten, res.Hidden = r.Overwritten, r.Hidden
		return err
	})
	return res, err
}

var (
	_ backend.LoaderInto  = (*Backend)(nil)
	_ backend.TempCleaner = (*Backend)(nil)
)
