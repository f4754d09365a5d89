package throttle

import (
	"context"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// MiB is 1 MiB, for writing rates in bytes per second.
const MiB = 1 << 20

// Burst sizing of a [Limiter]: the bucket holds the larger of MinBurst bytes
// and BurstTime worth of the rate. The burst is what a throttled backup may
// read at once, and a datastore shares its throughput in short slices (the
// kernel's blkio throttle in 100 ms ones): a burst of seconds' worth of a
// slow rate makes every guest I/O behind it wait for the next slice, which
// bench/sched.sh measured as a p99 of ~100 ms at any backup rate. So the
// burst is kept to about one chunk read or 50 ms of the rate; a request
// larger than the burst is still allowed (it waits until it is paid).
const (
	MinBurst  = 256 << 10
	BurstTime = 50 * time.Millisecond
)

// Limiter paces one backup's reads to a rate in bytes per second with a
// token bucket. It is safe for concurrent use: concurrent Wait callers share
// the rate and are served in the order they called Wait.
//
// A Limiter starts with a full bucket. A rate of zero or less means
// unlimited: Wait returns at once. Bytes passed through Wait are counted
// ([Limiter.Bytes]) whatever the rate, so a [Controller] can see how fast the
// backup actually reads.
type Limiter struct {
	clock Clock
	bytes atomic.Uint64

	mu    sync.Mutex
	rate  float64 // bytes/s; <= 0 unlimited
	burst float64
	// avail is the bucket level: tokens supplied minus tokens reserved. It
	// is at most burst and negative while reservations wait to be paid.
	avail float64
	last  time.Time // when avail was last refilled
	// taken counts bytes reserved since the Limiter was made; a waiter
	// holding the reservation ending at E may go once avail >= taken-E.
	taken int64
	// sleepers are the cancel functions of waiters asleep on the clock,
	// called by SetRate so that they recompute their wait at the new rate.
	sleepers map[*context.CancelFunc]struct{}
}

// NewLimiter returns a Limiter at the given rate (<= 0: unlimited) that
// takes its time from clock, or from [RealClock] if clock is nil.
func NewLimiter(bytesPerSec float64, clock Clock) *Limiter {
	if clock == nil {
		clock = RealClock
	}
	l := &Limiter{clock: clock, sleepers: make(map[*context.CancelFunc]struct{})}
	l.setRateLocked(bytesPerSec, clock.Now())
	return l
}

func burstFor(rate float64) float64 {
	return math.Max(MinBurst, rate*BurstTime.Seconds())
}

// Rate returns the current rate in bytes per second; zero means unlimited.
func (l *Limiter) Rate() float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.rate
}

// Bytes returns the number of bytes let through by Wait so far (calls that
// returned an error do not count).
func (l *Limiter) Bytes() uint64 { return l.bytes.Load() }

// SetRate changes the rate (<= 0: unlimited). It takes effect at once, also
// for callers already blocked in Wait: the part of their reservation not yet
// paid is paid at the new rate, and an unlimited rate releases them.
func (l *Limiter) SetRate(bytesPerSec float64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.setRateLocked(bytesPerSec, l.clock.Now())
	l.wakeLocked()
}

// wakeLocked makes the waiters asleep on the clock recompute their wait.
func (l *Limiter) wakeLocked() {
	for cancel := range l.sleepers {
		(*cancel)()
	}
}

func (l *Limiter) setRateLocked(rate float64, now time.Time) {
	if math.IsNaN(rate) || rate <= 0 {
		// Unlimited: every reservation counts as paid.
		l.rate, l.burst, l.avail, l.last = 0, 0, 0, now
		return
	}
	wasUnlimited := l.rate <= 0
	l.refill(now)
	l.rate = rate
	l.burst = burstFor(rate)
	if wasUnlimited {
		l.avail = l.burst
	} else {
		l.avail = math.Min(l.avail, l.burst)
	}
}

// refill adds the tokens earned since the last refill at the current rate.
func (l *Limiter) refill(now time.Time) {
	if l.rate > 0 && now.After(l.last) {
		l.avail = math.Min(l.burst, l.avail+l.rate*now.Sub(l.last).Seconds())
	}
	if now.After(l.last) {
		l.last = now
	}
}

// Wait blocks until n more bytes may be read at the limiter's rate, or ctx
// is done. It returns ctx.Err() if ctx ended the wait (the unpaid part of the
// reservation is then given back), nil otherwise. A request larger than the
// burst is allowed; it waits until the debt is paid. n <= 0 returns at once.
func (l *Limiter) Wait(ctx context.Context, n int) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if n <= 0 {
		return nil
	}
	l.bytes.Add(uint64(n))
	l.mu.Lock()
	if l.rate <= 0 {
		l.mu.Unlock()
		return nil
	}
	l.refill(l.clock.Now())
	l.taken += int64(n)
	l.avail -= float64(n)
	end := l.taken
	for {
		// Unpaid part of this reservation: the bucket must rise to the
		// bytes reserved after it.
		need := float64(end-l.taken) - l.avail
		if l.rate <= 0 || need <= 0 {
			l.mu.Unlock()
			return nil
		}
		d := durationFor(need, l.rate)
		sctx, cancel := context.WithCancel(ctx)
		key := &cancel
		l.sleepers[key] = struct{}{}
		l.mu.Unlock()
		_ = l.clock.Sleep(sctx, d) // the outcome is decided below, under the lock
		cancel()
		l.mu.Lock()
		delete(l.sleepers, key)
		l.refill(l.clock.Now())
		if err := ctx.Err(); err != nil {
			// Give back what was not paid yet, so that the waiters
			// behind are not delayed by bytes never read.
			if need := float64(end-l.taken) - l.avail; l.rate > 0 && need > 0 {
				l.avail += math.Min(need, float64(n))
				l.wakeLocked()
			}
			l.mu.Unlock()
			l.bytes.Add(^uint64(n - 1)) // not read after all
			return err
		}
	}
}

// durationFor returns how long it takes to earn need tokens at rate,
// rounded up to the nanosecond.
func durationFor(need, rate float64) time.Duration {
	s := need / rate
	if s >= float64(math.MaxInt64/int64(time.Second)) {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(math.Ceil(s * float64(time.Second)))
}
