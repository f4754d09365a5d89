package throttle

import (
	"context"
	"math"
	"sync"
	"time"
)

// Window limits how many backup reads are in flight on one datastore at
// once, for all the backups reading from it, and adapts that limit from
// the reads' own latency.
//
// Why: a datastore serves a few requests at once and queues the rest, in
// arrival order. While fewer requests than it can serve are in flight, a
// guest's request is served at once; once backup reads fill every slot, it
// waits behind them, and a backup's read is large. A rate limit cannot
// prevent that: reads paced at any rate still arrive in bunches. The
// Window keeps backup reads to one fewer than the datastore serves at
// once, so a slot stays free for the guests.
//
// How, the control law of Done: reads are timed per byte in rounds (as
// many reads as the limit), and a round's mean is compared with the lowest
// round mean seen recently (the datastore's unloaded service time). With
// L reads in flight on a datastore that serves C at once, each read takes
// max(1, L/C) times that (Little's law), so while the mean stays within
// Tolerance of the floor nothing queued and the limit grows by one. When
// it does not in two rounds in a row, the reads queued: L is more than C,
// C is about L divided by the ratio of the round's mean to the floor, and
// the Window drops to C-1 and holds there for Hold before probing upwards
// again. Reads smaller than MinBytes time mostly fixed costs and are not
// counted. The guests' own requests queue with the reads too: SetOthers
// tells the Window how many are in flight, and once its own reads queue,
// the estimate of C counts them with L.
type Window struct {
	cfg   WindowConfig
	asked WindowConfig // as given to NewWindow

	mu       sync.Mutex
	cond     *sync.Cond
	limit    int
	inflight int
	// The floor of a round's mean latency per byte: the minimum over the
	// current epoch and the previous one, so that it can rise when the
	// datastore becomes slower for good.
	floor, prevFloor float64
	epochStart       time.Time
	roundSum         float64
	roundN           int
	holdUntil        time.Time
	serves           int // reads the datastore serves at once, as last estimated; 0: not yet
	inflated         int // consecutive rounds that queued
	changes          uint64
	others           float64 // other requests in flight on average (SetOthers)
}

// WindowConfig tunes a [Window]; zero fields take the defaults in brackets.
type WindowConfig struct {
	Max       int           // the limit never exceeds this [16]
	Fixed     bool          // the limit is Max and does not adapt
	Tolerance float64       // a round within (1+Tolerance)×floor did not queue [0.2]
	Hold      time.Duration // how long to stay below a knee before probing [20s]
	Epoch     time.Duration // how long a floor is remembered [30s]
	MinBytes  int           // smaller reads are not timed [128 KiB]
	Clock     Clock         // [RealClock]
}

// NewWindow returns a Window starting at one read in flight (at Max,
// for good, when Fixed).
func NewWindow(cfg WindowConfig) *Window {
	asked := cfg
	if cfg.Max <= 0 {
		cfg.Max = 16
	}
	if cfg.Tolerance <= 0 {
		cfg.Tolerance = 0.2
	}
	if cfg.Hold <= 0 {
		cfg.Hold = 20 * time.Second
	}
	if cfg.Epoch <= 0 {
		cfg.Epoch = 30 * time.Second
	}
	if cfg.MinBytes <= 0 {
		cfg.MinBytes = 128 << 10
	}
	if cfg.Clock == nil {
		cfg.Clock = RealClock
	}
	w := &Window{cfg: cfg, asked: asked, limit: 1}
	if cfg.Fixed {
		w.limit = cfg.Max
	}
	w.cond = sync.NewCond(&w.mu)
	return w
}

// Acquire waits for a slot; the caller must call Done once its read ends.
func (w *Window) Acquire(ctx context.Context) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.inflight < w.limit {
		w.inflight++
		return nil
	}
	stop := context.AfterFunc(ctx, func() {
		w.mu.Lock()
		w.cond.Broadcast()
		w.mu.Unlock()
	})
	defer stop()
	for w.inflight >= w.limit {
		if err := ctx.Err(); err != nil {
			return err
		}
		w.cond.Wait()
	}
	w.inflight++
	return nil
}

// Done releases the slot of a read of n bytes that took took (zero or a
// failed read: not timed) and adapts the limit.
func (w *Window) Done(n int, took time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.inflight--
	w.cond.Broadcast()
	if n < w.cfg.MinBytes || took <= 0 || w.cfg.Fixed {
		return
	}
	now := w.cfg.Clock.Now()
	if now.Sub(w.epochStart) > w.cfg.Epoch {
		w.prevFloor, w.floor, w.epochStart = w.floor, 0, now
	}
	w.roundSum += float64(took) / float64(n)
	w.roundN++
	if w.roundN < w.limit {
		return
	}
	mean := w.roundSum / float64(w.roundN)
	w.roundSum, w.roundN = 0, 0
	if w.floor == 0 || mean < w.floor {
		w.floor = mean
	}
	floor := w.floor
	if w.prevFloor > 0 && w.prevFloor < floor {
		floor = w.prevFloor
	}
	// Queueing shows as a mean over the floor that Little's law explains:
	// fewer reads served at once than are in flight. A lone read slowed
	// by the guests' own requests, or one noisy round, is not that.
	//
	queued := mean > floor*(1+w.cfg.Tolerance) && max(1, int(math.Round(float64(w.limit)*floor/mean))) < w.limit
	// Once reads queue, the other requests in flight count in the
	// estimate too: reads wait behind them as behind each other. Without
	// them a datastore busy with its guests looked like one that serves a
	// single request at once.
	serves := max(1, int(math.Round((float64(w.limit)+w.others)*floor/mean)))
	if queued {
		w.inflated++
	} else {
		w.inflated = 0
	}
	switch {
	case w.inflated >= 2:
		w.inflated = 0
		w.serves = serves
		w.set(max(1, min(serves-1, w.limit-1)))
		w.holdUntil = now.Add(w.cfg.Hold)
	case queued:
		// Wait for the next round to confirm it.
	case now.Before(w.holdUntil):
		// Below the knee: stay.
	default:
		w.set(min(w.cfg.Max, w.limit+1))
	}
}

func (w *Window) set(limit int) {
	if limit != w.limit {
		w.limit = limit
		w.changes++
		w.cond.Broadcast()
	}
}

// WindowState is a Window's state, for metrics and logs.
type WindowState struct {
	Limit, InFlight int
	Serves          int // the reads the datastore serves at once, as last estimated (0: not yet)
	Changes         uint64
}

// State returns the Window's state.
func (w *Window) State() WindowState {
	w.mu.Lock()
	defer w.mu.Unlock()
	return WindowState{Limit: w.limit, InFlight: w.inflight, Serves: w.serves, Changes: w.changes}
}

// SetOthers tells the Window how many other requests (the guests' own,
// and the fleecing's copy-before-write reads) are in flight on the
// datastore on average: the sum of their latencies over an interval
// divided by its length (Little's law), which the daemon takes from QEMU's
// block statistics.
func (w *Window) SetOthers(n float64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.others = max(0, n)
}

// Config returns the configuration NewWindow was given, without its
// Clock.
func (w *Window) Config() WindowConfig {
	c := w.asked
	c.Clock = nil
	return c
}
