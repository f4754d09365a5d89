package libvirt

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestJobEventsWait(t *testing.T) {
	t.Run("no subscription polls", func(t *testing.T) {
		var e *jobEvents // libvirtd refused the subscription
		start := time.Now()
		if err := e.wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d < jobPoll || d > jobRecheck {
			t.Errorf("wait without events took %s, want a poll of %s", d, jobPoll)
		}
	})
	t.Run("an event wakes at once, then short polls follow", func(t *testing.T) {
		e := &jobEvents{wake: make(chan struct{}, 1)}
		e.wake <- struct{}{}
		start := time.Now()
		if err := e.wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d >= jobPoll {
			t.Errorf("wait with an event pending took %s", d)
		}
		if e.woken != 1 || e.fast != jobSettle {
			t.Fatalf("after an event: woken %d, fast %d; want 1, %d", e.woken, e.fast, jobSettle)
		}
		start = time.Now()
		if err := e.wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d >= jobRecheck || e.fast != jobSettle-1 {
			t.Errorf("the poll after an event took %s (fast %d), want %s", d, e.fast, jobPoll)
		}
	})
	t.Run("the caller's end ends the wait", func(t *testing.T) {
		e := &jobEvents{wake: make(chan struct{}, 1)}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := e.wait(ctx); !errors.Is(err, context.Canceled) {
			t.Errorf("wait after cancel = %v, want context.Canceled", err)
		}
	})
}
