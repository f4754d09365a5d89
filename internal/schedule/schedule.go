// Package schedule decides which VM backups start when: it owns jobs, their
// cron schedules, backup windows, RPOs, retries and the limits on how many
// backups run at once per host, per datastore and per repository.
//
// It is pure logic. It does no I/O, starts no goroutines and reads time only
// from a [Clock], so every decision can be tested on a virtual clock. It knows
// nothing of libvirt, of the repository format or of how a backup is taken:
// the caller resolves VM names and datastores, runs the [Task]s that
// [Scheduler.Ready] hands out, and reports each one's end with
// [Scheduler.Done]. A daemon drives it in a loop:
//
//	for {
//		for _, t := range s.Ready() {
//			go run(t) // calls s.Done(t, err, notFound) when it ends
//		}
//		sleep until s.Next(), or until a task ends, a datastore is
//		paused or unpaused, or the configuration is reloaded
//	}
//
// # Runs
//
// Each time a job's schedule falls due, the job opens a run: every VM of the
// job becomes pending in it. Pending VMs start, within the limits, in order of
// RPO risk (see [Scheduler.Ready]). A failed VM is retried after an
// exponential backoff until its [RetryPolicy] is used up; a VM the caller
// reports as not found is not retried in that run. A run of a job with a
// [Window] starts nothing outside its window: when the window closes, the VMs
// still pending are left behind with the reason. A run ends when none of its
// VMs is pending or running any more, and then yields a [RunReport].
//
// A job has at most one open run. An occurrence of its schedule that falls due
// while the previous run is still open is skipped (counted in
// [RunReport.Skipped]), and occurrences missed while nobody asked (the clock
// jumped, the daemon was stopped) are caught up as one run, due at the latest
// of them.
//
// A VM is never backed up twice at once, even when it belongs to several
// jobs: VMs are identified by name across all jobs.
package schedule

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Clock tells the time. The scheduler reads time only through it.
//
// Now must not go backwards between calls, and must be safe to call from any
// goroutine that calls the Scheduler. Times of day (backup windows, cron
// fields) are taken in the location of the times it returns.
type Clock interface {
	Now() time.Time
}

// SystemClock is the [Clock] of the machine.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// VM is one virtual machine that a job backs up.
type VM struct {
	// Name identifies the VM, across all jobs.
	Name string
	// Datastore names the storage the VM's disks are on; backups on one
	// datastore count against Limits.PerDatastore and stop starting while
	// the datastore is paused. Required.
	Datastore string
	// LastSuccess is when the newest restore point of this VM in the job's
	// repository was taken; the zero time means there is none. The scheduler
	// keeps it up to date from then on: a successful task sets it to the
	// task's start, and a later Update never moves it back.
	LastSuccess time.Time
}

// Window is the part of each day in which a job's backups may start. Backups
// that are running when it closes go on; no new one starts outside it.
type Window struct {
	// Start is the time of day the window opens, as the offset from
	// midnight: 22*time.Hour for 22:00. It must be in [0, 24h).
	Start time.Duration
	// Duration is how long the window stays open, in (0, 24h]. A window may
	// span midnight (22:00 for 8h closes at 06:00 the next day).
	Duration time.Duration
}

// String returns the window as "22:00+8h0m0s".
func (w Window) String() string {
	return fmt.Sprintf("%02d:%02d+%s", int(w.Start/time.Hour), int(w.Start%time.Hour/time.Minute), w.Duration)
}

// ParseTimeOfDay parses "HH:MM" (24-hour clock) as the offset from midnight,
// for [Window.Start].
func ParseTimeOfDay(s string) (time.Duration, error) {
	t, err := time.Parse("15:04", strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("time of day %q: want HH:MM", s)
	}
	return time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute, nil
}

// Default retry settings, used where a [RetryPolicy] field is zero.
const (
	DefaultMaxAttempts  = 3
	DefaultInitialDelay = time.Minute
	DefaultMaxDelay     = time.Hour
)

// RetryPolicy says how often a VM whose backup failed is tried again within
// one run. The delay before attempt n+1 is InitialDelay·2^(n-1), capped at
// MaxDelay: 1m, 2m, 4m, … 1h with the defaults. Zero fields take the
// defaults.
type RetryPolicy struct {
	// MaxAttempts is the number of attempts per VM and run, the first one
	// included; 1 means no retry. Zero means DefaultMaxAttempts.
	MaxAttempts int
	// InitialDelay is the delay after the first failure. Zero means
	// DefaultInitialDelay.
	InitialDelay time.Duration
	// MaxDelay caps the delay. Zero means DefaultMaxDelay.
	MaxDelay time.Duration
}

// withDefaults fills zero fields with the defaults.
func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.MaxAttempts == 0 {
		p.MaxAttempts = DefaultMaxAttempts
	}
	if p.InitialDelay == 0 {
		p.InitialDelay = DefaultInitialDelay
	}
	if p.MaxDelay == 0 {
		p.MaxDelay = DefaultMaxDelay
	}
	return p
}

// Backoff returns the delay after the failed attempt number attempt (1 for
// the first), with the defaults applied.
func (p RetryPolicy) Backoff(attempt int) time.Duration {
	p = p.withDefaults()
	d := p.InitialDelay
	for i := 1; i < attempt && d < p.MaxDelay; i++ {
		d *= 2
	}
	return min(d, p.MaxDelay)
}

// Job is a backup job: which VMs, when, where to, and how.
type Job struct {
	// Name identifies the job. Required and unique.
	Name string
	// Repository names the repository the job writes to; backups to one
	// repository count against Limits.PerRepository. Required.
	Repository string
	// Mode is the consistency mode; the scheduler passes it through in
	// each Task.
	Mode string
	// Schedule is a cron expression: five fields (minute hour day-of-month
	// month day-of-week, where Sunday is 0 or 7), or @hourly, @daily,
	// @weekly, @monthly, @yearly or @every <duration> (such as @every 30m or
	// @every 1d12h; occurrences then count from when the job was added). A
	// "TZ=Area/City " prefix sets the time zone the fields are read in.
	Schedule string
	// Window, if not nil, limits when the job's backups may start.
	Window *Window
	// RPO is the maximum age the newest restore point of each VM should
	// have; it orders backups when more are due than may run. Zero means
	// the job has no RPO: its VMs come after those of jobs that have one,
	// except VMs that have no restore point at all.
	RPO time.Duration
	// Retry says how failed backups are retried.
	Retry RetryPolicy
	// VMs are the VMs the job backs up, each at most once.
	VMs []VM
}

// Limits caps how many backups run at once. Zero means no limit.
type Limits struct {
	// PerHost caps all backups together.
	PerHost int
	// PerDatastore caps backups of VMs on one datastore.
	PerDatastore int
	// PerRepository caps backups into one repository.
	PerRepository int
}

// Task is one backup attempt of one VM that the caller is to run now.
type Task struct {
	Job        string
	VM         string
	Datastore  string
	Repository string
	Mode       string
	// Attempt counts the attempts for this VM in this run, from 1.
	Attempt int
	// Due is when the run became due: the scheduled time, or the time of
	// RunNow.
	Due time.Time
	// Manual is true for a task of a run started by RunNow.
	Manual bool
	// Started is when Ready handed out the task. On success it becomes the
	// VM's LastSuccess.
	Started time.Time

	id uint64
}

// Outcome is what a run did for one VM.
type Outcome int

const (
	// Succeeded: a backup of the VM succeeded in the run.
	Succeeded Outcome = iota
	// Failed: every attempt failed; the reason gives the last error.
	Failed
	// NotFound: the caller reported the VM as not found; it was not retried.
	NotFound
	// NotDone: the VM was left before it could succeed or use up its
	// attempts: the window closed, the job was removed, or the VM was.
	NotDone
)

// String returns the outcome in lower case.
func (o Outcome) String() string {
	switch o {
	case Succeeded:
		return "succeeded"
	case Failed:
		return "failed"
	case NotFound:
		return "not found"
	case NotDone:
		return "not done"
	}
	return fmt.Sprintf("Outcome(%d)", int(o))
}

// Reasons a VM was left behind, as found in [VMResult.Reason]. Others are
// built from a limit or a datastore:
//
//	"limit host"                  the per-host limit was reached
//	"limit datastore NAME"        the per-datastore limit was reached on NAME
//	"limit repository NAME"       the per-repository limit was reached on NAME
//	"datastore NAME paused"       the datastore was paused
//	"VM busy in job NAME"         the VM was being backed up by another job
//	"retries exhausted: ERROR"    all attempts failed, the last with ERROR
//	"not found: ERROR"            the caller reported the VM as not found
const (
	// ReasonWindowClosed: the window closed before the VM could start (or
	// start again after a failure), with no limit holding it back.
	ReasonWindowClosed = "window closed"
	// ReasonJobRemoved: a configuration reload removed the job.
	ReasonJobRemoved = "job removed"
	// ReasonVMRemoved: a configuration reload removed the VM from the job.
	ReasonVMRemoved = "VM removed from job"
)

// VMResult is what a run did for one of its VMs.
type VMResult struct {
	VM        string
	Datastore string
	Outcome   Outcome
	// Attempts is how many times the VM was started in the run.
	Attempts int
	// Reason says why the VM was left behind; empty when it succeeded.
	Reason string
	// Err is the error of the last attempt, if it failed.
	Err error
	// Finished is when the VM's result became final.
	Finished time.Time
}

// RunReport is the account of one finished run of a job.
type RunReport struct {
	Job string
	// Due is when the run became due.
	Due time.Time
	// Manual is true for a run started by RunNow.
	Manual bool
	// WindowEnd is when the run's window closed; zero without a window.
	WindowEnd time.Time
	// Skipped counts occurrences of the schedule that fell due while this
	// run was open and were not started (a catch-up of several missed
	// occurrences counts once).
	Skipped int
	// Finished is when the last VM's result became final.
	Finished time.Time
	// VMs holds one result for each VM of the run, sorted by name.
	VMs []VMResult
}

// Left returns the results of the VMs that the run did not back up, each
// with its reason.
func (r RunReport) Left() []VMResult {
	var left []VMResult
	for _, v := range r.VMs {
		if v.Outcome != Succeeded {
			left = append(left, v)
		}
	}
	return left
}

// Errors that callers branch on. They are returned wrapped with the job or
// task involved.
var (
	// ErrUnknownJob: no job has that name.
	ErrUnknownJob = errors.New("no such job")
	// ErrRunOpen: RunNow was asked for a job whose run is still open.
	ErrRunOpen = errors.New("a run of the job is still open")
	// ErrUnknownTask: Done was called for a task that is not running
	// (never handed out by Ready, or already done).
	ErrUnknownTask = errors.New("task is not running")
)

// ConfigError reports an invalid job or invalid limits, naming the job and
// the field.
type ConfigError struct {
	// Job names the job; empty for an error in the Limits.
	Job string
	// Field names the field in error, such as "schedule" or "vms[2].datastore".
	Field string
	Err   error
}

func (e *ConfigError) Error() string {
	if e.Job == "" {
		return fmt.Sprintf("limits: %s: %v", e.Field, e.Err)
	}
	return fmt.Sprintf("job %q: %s: %v", e.Job, e.Field, e.Err)
}

func (e *ConfigError) Unwrap() error { return e.Err }
