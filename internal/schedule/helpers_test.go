package schedule

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"
)

// t0 is a Monday noon, UTC.
var t0 = time.Date(2025, 3, 10, 12, 0, 0, 0, time.UTC)

// fakeClock is a virtual clock that tests move forward by hand.
type fakeClock struct{ now time.Time }

func (c *fakeClock) Now() time.Time { return c.now }

// set moves the clock to t, which must not be before the current time.
func (c *fakeClock) set(t *testing.T, to time.Time) {
	t.Helper()
	if to.Before(c.now) {
		t.Fatalf("clock would go back from %s to %s", c.now, to)
	}
	c.now = to
}

// at returns t0's day plus days, at hh:mm.
func at(days, hh, mm int) time.Time {
	return time.Date(t0.Year(), t0.Month(), t0.Day()+days, hh, mm, 0, 0, time.UTC)
}

func newScheduler(t *testing.T, jobs []Job, limits Limits, clock Clock) *Scheduler {
	t.Helper()
	s, err := New(jobs, limits, clock)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

// vms returns VMs named by names, each on the datastore named by its first
// letter.
func vms(names ...string) []VM {
	var out []VM
	for _, n := range names {
		out = append(out, VM{Name: n, Datastore: n[:1]})
	}
	return out
}

// ids returns "job/vm" for each task.
func ids(tasks []Task) []string {
	var out []string
	for _, t := range tasks {
		out = append(out, t.Job+"/"+t.VM)
	}
	return out
}

func done(t *testing.T, s *Scheduler, task Task, err error, notFound bool) {
	t.Helper()
	if e := s.Done(task, err, notFound); e != nil {
		t.Fatalf("Done(%s/%s): %v", task.Job, task.VM, e)
	}
}

// doneAll ends every task successfully.
func doneAll(t *testing.T, s *Scheduler, tasks []Task) {
	t.Helper()
	for _, task := range tasks {
		done(t, s, task, nil, false)
	}
}

// find returns the task for vm.
func find(t *testing.T, tasks []Task, vm string) Task {
	t.Helper()
	for _, task := range tasks {
		if task.VM == vm {
			return task
		}
	}
	t.Fatalf("no task for %s among %v", vm, ids(tasks))
	return Task{}
}

// oneReport returns the only report, failing if there is not exactly one.
func oneReport(t *testing.T, s *Scheduler) RunReport {
	t.Helper()
	reps := s.Reports()
	if len(reps) != 1 {
		t.Fatalf("got %d reports, want 1: %+v", len(reps), reps)
	}
	return reps[0]
}

// summary renders a report's results as "vm outcome attempts reason".
func summary(r RunReport) []string {
	var out []string
	for _, v := range r.VMs {
		out = append(out, fmt.Sprintf("%s %s %d %s", v.VM, v.Outcome, v.Attempts, v.Reason))
	}
	return out
}

func equal(t *testing.T, what string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Fatalf("%s:\n got  %q\n want %q", what, got, want)
	}
}

var errBoom = errors.New("boom")
