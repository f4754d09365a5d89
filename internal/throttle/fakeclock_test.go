package throttle

import (
	"context"
	"sync"
	"testing"
	"time"
)

// fakeClock is a Clock for tests whose time only moves when the test says
// so. It also runs simulations: goroutines started with Go take part, and
// Run advances time to the next sleeper's deadline whenever every one of
// them is asleep, until all have returned. Time then passes in a test
// exactly as the Limiter asks for it, without real sleeping.
type fakeClock struct {
	mu       sync.Mutex
	cond     *sync.Cond
	now      time.Time
	sleepers map[*fakeSleeper]struct{}
	running  int // goroutines started by Go that have not returned
}

type fakeSleeper struct {
	until time.Time
	ctx   context.Context
	wake  chan struct{}
}

var epoch = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func newFakeClock() *fakeClock {
	c := &fakeClock{now: epoch, sleepers: make(map[*fakeSleeper]struct{})}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Since returns the fake time elapsed since the clock was made.
func (c *fakeClock) Since() time.Duration { return c.Now().Sub(epoch) }

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	c.mu.Lock()
	s := &fakeSleeper{until: c.now.Add(d), ctx: ctx, wake: make(chan struct{})}
	c.sleepers[s] = struct{}{}
	c.cond.Broadcast()
	c.mu.Unlock()
	select {
	case <-s.wake:
		return nil
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.sleepers, s)
		c.cond.Broadcast()
		c.mu.Unlock()
		return ctx.Err()
	}
}

// asleep counts sleepers whose context is still live (one whose context
// was cancelled is about to wake up and must not be counted).
func (c *fakeClock) asleep() int {
	n := 0
	for s := range c.sleepers {
		if s.ctx.Err() == nil {
			n++
		}
	}
	return n
}

// advanceLocked moves time to t and wakes the sleepers due.
func (c *fakeClock) advanceLocked(t time.Time) {
	if t.After(c.now) {
		c.now = t
	}
	for s := range c.sleepers {
		if !s.until.After(c.now) {
			delete(c.sleepers, s)
			close(s.wake)
		}
	}
	c.cond.Broadcast()
}

// Advance moves time forward by d.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.advanceLocked(c.now.Add(d))
}

// Go starts f as a participant of the simulation.
func (c *fakeClock) Go(f func()) {
	c.mu.Lock()
	c.running++
	c.mu.Unlock()
	go func() {
		defer func() {
			c.mu.Lock()
			c.running--
			c.cond.Broadcast()
			c.mu.Unlock()
		}()
		f()
	}()
}

// RunUntil runs the simulation until all participants have returned or the
// fake time reaches stop, whichever is first. It fails the test if the
// participants neither sleep nor return within a real second.
func (c *fakeClock) RunUntil(t *testing.T, stop time.Time) {
	t.Helper()
	timedOut := false
	timer := time.AfterFunc(time.Second, func() {
		c.mu.Lock()
		timedOut = true
		c.cond.Broadcast()
		c.mu.Unlock()
	})
	defer timer.Stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.running > 0 {
		for c.running > 0 && c.asleep() < c.running && !timedOut {
			c.cond.Wait()
		}
		if timedOut {
			t.Fatalf("simulation stuck at %v: %d running, %d asleep", c.now.Sub(epoch), c.running, c.asleep())
		}
		if c.running == 0 {
			break
		}
		next := stop
		for s := range c.sleepers {
			if s.ctx.Err() == nil && s.until.Before(next) {
				next = s.until
			}
		}
		c.advanceLocked(next)
		if !c.now.Before(stop) {
			return
		}
		timer.Reset(time.Second)
	}
}

// Run runs the simulation until all participants have returned.
func (c *fakeClock) Run(t *testing.T) {
	t.Helper()
	c.RunUntil(t, epoch.Add(1000*time.Hour))
}
