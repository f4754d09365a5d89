package libvirt

import (
	"context"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// jobEvents wakes whoever waits for a block job of one domain (a commit
// to end, an active commit to be ready to pivot) when libvirt reports a
// change of one, instead of asking every 100 ms: libvirt answers each
// virDomainGetBlockJobInfo of a running job with a query-jobs in the
// guest's QEMU, in the main loop that serves the guest's I/O. (On the
// scheduler benchmark it took libvirtd's CPU during the merges from 6.9%
// to 5.9% of a core; the guests' tail did not change beyond the runs'
// spread.)
//
// Without a subscription (libvirtd refused it) waits fall back to short
// polls. A nil *jobEvents polls too.
type jobEvents struct {
	wake   chan struct{} // one pending wake-up at most
	cancel context.CancelFunc
	done   chan struct{} // closed when the event stream is drained
	fast   int           // short polls left after a wake-up
	woken  int           // waits an event ended (for tests)
}

const (
	// jobPoll is the interval between polls without events.
	jobPoll = 100 * time.Millisecond
	// jobRecheck is the interval with events: only a safety net, in
	// case an event is lost.
	jobRecheck = 2 * time.Second
	// jobSettle is how many short polls follow each event, while
	// libvirt finishes its own handling of the job's end.
	jobSettle = 10
)

// watchBlockJobs subscribes to libvirt's block job events of v's domain
// until stop is called.
func (v *VM) watchBlockJobs(ctx context.Context) *jobEvents {
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	ch, err := rpc(ctx, v.c, func() (<-chan any, error) {
		return v.c.l.SubscribeEvents(ctx, golibvirt.DomainEventIDBlockJob, golibvirt.OptDomain{})
	})
	if err != nil {
		cancel() // a subscription made after all ends with ctx
		return nil
	}
	e := &jobEvents{wake: make(chan struct{}, 1), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(e.done)
		for ev := range ch { // until cancel: go-libvirt then closes ch
			m, ok := ev.(*golibvirt.DomainEventCallbackBlockJobMsg)
			if !ok || m.Msg.Dom.UUID != v.dom.UUID {
				continue
			}
			select {
			case e.wake <- struct{}{}:
			default:
			}
		}
	}()
	return e
}

// stop ends the subscription and returns how many waits an event ended.
func (e *jobEvents) stop() int {
	if e == nil {
		return 0
	}
	e.cancel()
	<-e.done
	return e.woken
}

// wait returns after the next block job event of the domain, after a
// safety interval, or when ctx ends (with its error).
func (e *jobEvents) wait(ctx context.Context) error {
	d := jobPoll
	var wake chan struct{}
	if e != nil {
		wake = e.wake
		if e.fast > 0 {
			e.fast--
		} else {
			d = jobRecheck
		}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-wake:
		e.fast = jobSettle
		e.woken++
	case <-t.C:
	}
	return nil
}
