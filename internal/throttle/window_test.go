package throttle

import (
	"context"
	"errors"
	"testing"
	"time"
)

// round runs one round of the window's limit worth of reads on a simulated
// datastore that serves c reads at once: each takes service×max(1, L/c)
// with L reads in flight (Little's law for a closed loop).
func round(t *testing.T, w *Window, c int, service time.Duration) int {
	t.Helper()
	l := w.State().Limit
	for range l {
		if err := w.Acquire(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	took := service
	if l > c {
		took = service * time.Duration(l) / time.Duration(c)
	}
	for range l {
		w.Done(256<<10, took)
	}
	return l
}

func TestWindowStaysOneBelowTheKnee(t *testing.T) {
	for _, c := range []int{2, 4, 8} {
		clk := newFakeClock()
		w := NewWindow(WindowConfig{Clock: clk, Hold: 10 * time.Second})
		var seen []int
		for range 40 {
			seen = append(seen, round(t, w, c, 25*time.Millisecond))
			clk.Advance(100 * time.Millisecond)
		}
		// It grew one by one until reads queued, found c, and held at c-1.
		if got := w.State(); got.Limit != c-1 || got.Serves != c {
			t.Fatalf("c=%d: state %+v after limits %v; want limit %d, serves %d", c, got, seen, c-1, c)
		}
		// After the hold it probes again and comes back.
		clk.Advance(10 * time.Second)
		var probe []int
		for range 10 {
			probe = append(probe, round(t, w, c, 25*time.Millisecond))
		}
		if max := maxOf(probe); max <= c || w.State().Limit != c-1 {
			t.Fatalf("c=%d: probe limits %v, limit %d after; want above %d and back to %d", c, probe, w.State().Limit, c, c-1)
		}
	}
}

// Reads slowed for other reasons than queueing among themselves (the
// guests' requests ahead of them, noise) do not shrink the window: a lone
// read cannot have queued behind backup reads, and one round is not
// enough.
func TestWindowIgnoresNoise(t *testing.T) {
	w := NewWindow(WindowConfig{Max: 8, Clock: newFakeClock()})
	for i := range 60 {
		l := w.State().Limit
		for range l {
			w.Acquire(context.Background())
		}
		took := 20 * time.Millisecond
		if i%3 == 0 {
			took = 40 * time.Millisecond // every third round twice as slow
		}
		for range l {
			w.Done(256<<10, took)
		}
	}
	if got := w.State(); got.Limit != 8 {
		t.Fatalf("state %+v: noisy rounds shrank the window", got)
	}
}

func TestWindowGrowsWithoutQueueing(t *testing.T) {
	w := NewWindow(WindowConfig{Max: 6, Clock: newFakeClock()})
	for range 20 {
		round(t, w, 100, 10*time.Millisecond)
	}
	if got := w.State().Limit; got != 6 {
		t.Fatalf("limit %d on a datastore that never queues; want the maximum, 6", got)
	}
	// Small reads and failed reads (took 0) do not move it.
	w2 := NewWindow(WindowConfig{Clock: newFakeClock()})
	for range 10 {
		w2.Acquire(context.Background())
		w2.Done(4096, time.Second)
		w2.Acquire(context.Background())
		w2.Done(1<<20, 0)
	}
	if got := w2.State(); got.Limit != 1 || got.InFlight != 0 {
		t.Fatalf("state %+v after untimed reads; want limit 1, none in flight", got)
	}
}

func TestWindowAcquireWaits(t *testing.T) {
	w := NewWindow(WindowConfig{})
	if err := w.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := w.Acquire(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second Acquire at limit 1: %v, want the context's deadline", err)
	}
	got := make(chan error)
	go func() { got <- w.Acquire(context.Background()) }()
	time.Sleep(10 * time.Millisecond)
	w.Done(0, 0)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if s := w.State(); s.InFlight != 1 {
		t.Fatalf("in flight %d, want 1", s.InFlight)
	}
}

func maxOf(v []int) int {
	m := v[0]
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

// A fixed Window holds Max reads in flight whatever their latency, and
// a capped one never grows past Max.
func TestWindowFixedAndCapped(t *testing.T) {
	tests := []struct {
		name      string
		cfg       WindowConfig
		serves    int // the simulated datastore
		wantLimit int
	}{
		{"fixed, datastore queues", WindowConfig{Max: 3, Fixed: true}, 1, 3},
		{"fixed, datastore never queues", WindowConfig{Max: 2, Fixed: true}, 100, 2},
		{"capped, datastore never queues", WindowConfig{Max: 3}, 100, 3},
		{"capped above the knee", WindowConfig{Max: 8}, 4, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := newFakeClock()
			tt.cfg.Clock = clk
			tt.cfg.Hold = time.Hour
			w := NewWindow(tt.cfg)
			var seen []int
			for range 40 {
				seen = append(seen, round(t, w, tt.serves, 25*time.Millisecond))
				clk.Advance(100 * time.Millisecond)
			}
			if got := w.State().Limit; got != tt.wantLimit || maxOf(seen) > tt.cfg.Max {
				t.Fatalf("limit %d after rounds %v; want %d, never above %d", got, seen, tt.wantLimit, tt.cfg.Max)
			}
			if c := w.Config(); c.Max != tt.cfg.Max || c.Fixed != tt.cfg.Fixed || c.Clock != nil {
				t.Fatalf("Config() = %+v, want what NewWindow was given without the clock", c)
			}
		})
	}
}
