package throttle

import (
	"context"
	"time"
)

// Clock is the time source of a [Limiter].
//
// Now must not go backwards between calls. Sleep blocks until d has passed on
// the clock or ctx is done, whichever comes first; it returns nil after a
// full sleep and ctx.Err() when ctx ended it. Sleep with d <= 0 returns at
// once (ctx.Err() if ctx is already done). Both must be safe for concurrent
// use.
type Clock interface {
	Now() time.Time
	Sleep(ctx context.Context, d time.Duration) error
}

// RealClock is the wall clock: time.Now and a timer.
var RealClock Clock = realClock{}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
