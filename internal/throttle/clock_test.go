package throttle

import (
	"context"
	"errors"
	"testing"
	"time"
)

// testClock is the conformance suite of the Clock contract. advance moves a
// fake clock's time along (nil for a real clock).
func testClock(t *testing.T, clk Clock, advance func(time.Duration)) {
	t.Helper()
	t.Run("zero sleep returns at once", func(t *testing.T) {
		if err := clk.Sleep(context.Background(), 0); err != nil {
			t.Errorf("Sleep(0) = %v", err)
		}
		if err := clk.Sleep(context.Background(), -time.Second); err != nil {
			t.Errorf("Sleep(-1s) = %v", err)
		}
	})
	t.Run("cancel ends a sleep", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- clk.Sleep(ctx, time.Hour) }()
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("cancelled Sleep = %v, want context.Canceled", err)
			}
		case <-time.After(time.Second):
			t.Fatal("Sleep did not return after cancel")
		}
	})
	t.Run("full sleep", func(t *testing.T) {
		start := clk.Now()
		done := make(chan error)
		go func() { done <- clk.Sleep(context.Background(), 5*time.Millisecond) }()
		var err error
	wait:
		for {
			select {
			case err = <-done:
				break wait
			case <-time.After(time.Millisecond):
				if advance != nil {
					advance(time.Millisecond)
				}
			}
		}
		if err != nil {
			t.Errorf("Sleep = %v", err)
		}
		if el := clk.Now().Sub(start); el < 5*time.Millisecond {
			t.Errorf("Sleep(5ms) returned after %v on the clock", el)
		}
	})
}

func TestRealClock(t *testing.T) { testClock(t, RealClock, nil) }

func TestFakeClock(t *testing.T) {
	clk := newFakeClock()
	testClock(t, clk, clk.Advance)
}
