package throttle

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// seconds converts a byte count at a rate into a duration.
func seconds(bytes, rate float64) time.Duration {
	return time.Duration(bytes / rate * float64(time.Second))
}

func within(t *testing.T, what string, got, want, tol time.Duration) {
	t.Helper()
	if d := got - want; d < -tol || d > tol {
		t.Errorf("%s = %v, want %v ± %v", what, got, want, tol)
	}
}

func TestLimiterTakesBytesOverRate(t *testing.T) {
	cases := []struct {
		rate         float64
		total, chunk int
	}{
		{8 * MiB, 64 * MiB, 64 << 10},
		{8 * MiB, 64 * MiB, 16 * MiB}, // requests larger than the burst
		{100 * MiB, 400 * MiB, MiB},
		{1 << 30, 2 << 30, 4 * MiB}, // burst is 1/4 s of the rate
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%.0fMiBps/chunk%d", tc.rate/MiB, tc.chunk), func(t *testing.T) {
			clk := newFakeClock()
			l := NewLimiter(tc.rate, clk)
			clk.Go(func() {
				for done := 0; done < tc.total; done += tc.chunk {
					if err := l.Wait(context.Background(), tc.chunk); err != nil {
						t.Error(err)
						return
					}
				}
			})
			clk.Run(t)
			// The bucket starts full, so the first burst is free.
			want := seconds(float64(tc.total)-burstFor(tc.rate), tc.rate)
			within(t, "elapsed", clk.Since(), want, time.Millisecond)
			if got := l.Bytes(); got != uint64(tc.total) {
				t.Errorf("Bytes() = %d, want %d", got, tc.total)
			}
		})
	}
}

func TestLimiterConcurrentWaitersShareRate(t *testing.T) {
	const (
		rate    = 32 * MiB
		readers = 4
		each    = 64 * MiB
		chunk   = MiB
	)
	clk := newFakeClock()
	l := NewLimiter(rate, clk)
	finished := make([]time.Duration, readers)
	for i := range readers {
		clk.Go(func() {
			for done := 0; done < each; done += chunk {
				if err := l.Wait(context.Background(), chunk); err != nil {
					t.Error(err)
					return
				}
			}
			finished[i] = clk.Since()
		})
	}
	clk.Run(t)
	want := seconds(readers*each-burstFor(rate), rate)
	within(t, "elapsed", clk.Since(), want, time.Millisecond)
	// Served in turn: no reader got more than its share of the rate, give
	// or take the initial burst (which one reader may take alone) and the
	// request in flight.
	for i, f := range finished {
		if share := burstFor(rate) + chunk + f.Seconds()*rate/readers; each > share {
			t.Errorf("reader %d read %d MiB by %v, more than its share %.1f MiB", i, each/MiB, f, share/MiB)
		}
	}
}

func TestLimiterSetRateReachesWaiters(t *testing.T) {
	cases := []struct {
		name      string
		from, to  float64
		want      time.Duration
		waitBytes int
	}{
		// 64 MiB at 8 MiB/s: the burst + 8 MiB paid by 1 s, the rest at 64 MiB/s.
		{"faster", 8 * MiB, 64 * MiB, time.Second + seconds(64*MiB-burstFor(8*MiB)-8*MiB, 64*MiB), 64 * MiB},
		// 64 MiB at 32 MiB/s: the burst + 32 MiB by 1 s, the rest at 8 MiB/s.
		{"slower", 32 * MiB, 8 * MiB, time.Second + seconds(64*MiB-burstFor(32*MiB)-32*MiB, 8*MiB), 64 * MiB},
		{"unlimited releases", 8 * MiB, 0, time.Second, 64 * MiB},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			l := NewLimiter(tc.from, clk)
			var done time.Duration
			clk.Go(func() {
				if err := l.Wait(context.Background(), tc.waitBytes); err != nil {
					t.Error(err)
				}
				done = clk.Since()
			})
			clk.RunUntil(t, epoch.Add(time.Second))
			l.SetRate(tc.to)
			clk.Run(t)
			within(t, "finished", done, tc.want, time.Millisecond)
			if got := l.Rate(); got != tc.to {
				t.Errorf("Rate() = %v, want %v", got, tc.to)
			}
		})
	}
}

func TestLimiterCancelGivesBackUnpaidBytes(t *testing.T) {
	const rate = 8 * MiB // burst 4 MiB
	clk := newFakeClock()
	l := NewLimiter(rate, clk)
	ctx, cancel := context.WithCancel(context.Background())
	var errA error
	clk.Go(func() { errA = l.Wait(ctx, 84*MiB) }) // 10 s at the rate
	clk.RunUntil(t, epoch.Add(time.Second))
	cancel()
	var doneB time.Duration
	clk.Go(func() {
		if err := l.Wait(context.Background(), 8*MiB); err != nil {
			t.Error(err)
		}
		doneB = clk.Since()
	})
	clk.Run(t)
	if !errors.Is(errA, context.Canceled) {
		t.Errorf("cancelled Wait returned %v, want context.Canceled", errA)
	}
	// A's unpaid 72 MiB went back: B waits for its own 8 MiB only.
	within(t, "second waiter finished", doneB, 2*time.Second, time.Millisecond)
	if got := l.Bytes(); got != 8*MiB {
		t.Errorf("Bytes() = %d, want only the second waiter's %d", got, 8*MiB)
	}
}

func TestLimiterUnlimited(t *testing.T) {
	for _, rate := range []float64{0, -1} {
		clk := newFakeClock()
		l := NewLimiter(rate, clk)
		for range 100 {
			if err := l.Wait(context.Background(), 64*MiB); err != nil {
				t.Fatal(err)
			}
		}
		if clk.Since() != 0 || l.Rate() != 0 || l.Bytes() != 100*64*MiB {
			t.Errorf("rate %v: slept %v, Rate() %v, Bytes() %d; want no sleep, 0, %d",
				rate, clk.Since(), l.Rate(), l.Bytes(), 100*64*MiB)
		}
	}
}

func TestLimiterDoneContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	l := NewLimiter(0, nil)
	if err := l.Wait(ctx, 1); !errors.Is(err, context.Canceled) {
		t.Errorf("Wait on a done context = %v, want context.Canceled", err)
	}
}

func TestLimiterRealClock(t *testing.T) {
	// 1 MiB beyond the burst at 64 MiB/s: about 16 ms of real time.
	l := NewLimiter(64*MiB, nil)
	start := time.Now()
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			if err := l.Wait(context.Background(), int(burstFor(64*MiB))/2+MiB/2); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if el := time.Since(start); el < 15*time.Millisecond || el > time.Second {
		t.Errorf("waited %v in real time, want about 16ms", el)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := l.Wait(ctx, 64*MiB); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait past the deadline = %v, want context.DeadlineExceeded", err)
	}
}
