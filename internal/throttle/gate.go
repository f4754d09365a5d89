package throttle

import (
	"context"
	"time"
)

// ReadGate paces one backup's reads with its rate limiter, then holds each
// read to the datastore's window (nil: none) and times it for the window: a
// backup.Options.ReadGate.
func ReadGate(lim *Limiter, win *Window) func(context.Context, int) (func(bool), error) {
	return func(ctx context.Context, n int) (func(bool), error) {
		if err := lim.Wait(ctx, n); err != nil {
			return nil, err
		}
		if win == nil {
			return func(bool) {}, nil
		}
		if err := win.Acquire(ctx); err != nil {
			return nil, err
		}
		start := time.Now()
		return func(ok bool) {
			took := time.Since(start)
			if !ok {
				took = 0 // a failed read says nothing of the datastore
			}
			win.Done(n, took)
		}, nil
	}
}
