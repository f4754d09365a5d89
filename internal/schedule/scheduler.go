package schedule

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/robfig/cron/v3"
)

// Scheduler decides which backups start when. Its methods are safe for
// concurrent use; each reads the clock once and first brings the scheduler
// up to that time (opens the runs that fell due, closes those whose window
// ended).
type Scheduler struct {
	mu      sync.Mutex
	clock   Clock
	limits  Limits
	jobs    map[string]*jobState
	names   []string            // sorted keys of jobs, for determinism
	running map[string]*running // by VM name
	paused  map[string]bool     // by datastore
	reports []RunReport
	lastID  uint64
	// stagger caps the tasks one Ready call starts per datastore (0: no
	// cap); see SetStagger.
	stagger int
}

// jobState is a job's configuration and what the scheduler keeps about it.
type jobState struct {
	job         Job // Retry has the defaults applied
	sched       cron.Schedule
	next        time.Time // next occurrence; zero if there is none
	open        *run
	lastSuccess map[string]time.Time // by VM name
}

// run is one run of a job.
type run struct {
	job     *jobState
	due     time.Time
	manual  bool
	start   time.Time // nothing starts before
	end     time.Time // window end; zero without a window
	closed  bool      // no new task starts; pending VMs were settled
	skipped int
	vms     []*vmRun // sorted by name
	done    bool     // reported
}

// vmRun is one VM's state in a run.
type vmRun struct {
	vm        VM // LastSuccess unused: see jobState.lastSuccess
	attempts  int
	running   bool
	notBefore time.Time // backoff: no new attempt before
	lastErr   error
	leave     string // if set, the VM is not started again: the reason
	result    *VMResult
}

// pending reports whether v waits for an attempt.
func (v *vmRun) pending() bool { return v.result == nil && !v.running }

// running is a task handed out by Ready and not yet done.
type running struct {
	task Task
	run  *run
	vm   *vmRun
	// stored: the task's restore point is written (Stored); it holds no
	// slot of the limits any more, only its VM.
	stored bool
}

// New returns a scheduler for jobs within limits, reading time from clock.
// It validates every job (a bad cron expression, a missing repository or
// datastore, a window or retry policy out of range, a duplicate name) and
// returns a [*ConfigError] naming the job and field. The first occurrence of
// each schedule is the first one after clock.Now().
func New(jobs []Job, limits Limits, clock Clock) (*Scheduler, error) {
	for _, f := range []struct {
		name string
		v    int
	}{{"PerHost", limits.PerHost}, {"PerDatastore", limits.PerDatastore}, {"PerRepository", limits.PerRepository}} {
		if f.v < 0 {
			return nil, &ConfigError{Field: f.name, Err: fmt.Errorf("negative limit %d", f.v)}
		}
	}
	s := &Scheduler{
		clock:   clock,
		limits:  limits,
		jobs:    make(map[string]*jobState),
		running: make(map[string]*running),
		paused:  make(map[string]bool),
	}
	if err := s.Update(jobs); err != nil {
		return nil, err
	}
	return s, nil
}

// compile validates a job and parses its schedule.
func compile(j Job) (*jobState, error) {
	bad := func(field string, format string, args ...any) error {
		return &ConfigError{Job: j.Name, Field: field, Err: fmt.Errorf(format, args...)}
	}
	if j.Name == "" {
		return nil, bad("name", "empty")
	}
	if j.Repository == "" {
		return nil, bad("repository", "empty")
	}
	sched, err := parseSchedule(j.Schedule)
	if err != nil {
		return nil, bad("schedule", "%q: %v", j.Schedule, err)
	}
	if w := j.Window; w != nil {
		if w.Start < 0 || w.Start >= 24*time.Hour {
			return nil, bad("window", "start %s not in [0, 24h)", w.Start)
		}
		if w.Duration <= 0 || w.Duration > 24*time.Hour {
			return nil, bad("window", "duration %s not in (0, 24h]", w.Duration)
		}
	}
	if j.RPO < 0 {
		return nil, bad("rpo", "negative: %s", j.RPO)
	}
	r := j.Retry
	if r.MaxAttempts < 0 || r.InitialDelay < 0 || r.MaxDelay < 0 {
		return nil, bad("retry", "negative value in %+v", r)
	}
	r = r.withDefaults()
	if r.MaxDelay < r.InitialDelay {
		return nil, bad("retry", "max delay %s below initial delay %s", r.MaxDelay, r.InitialDelay)
	}
	j.Retry = r
	seen := make(map[string]bool, len(j.VMs))
	last := make(map[string]time.Time, len(j.VMs))
	for i, vm := range j.VMs {
		switch {
		case vm.Name == "":
			return nil, bad(fmt.Sprintf("vms[%d].name", i), "empty")
		case seen[vm.Name]:
			return nil, bad(fmt.Sprintf("vms[%d].name", i), "VM %q listed twice", vm.Name)
		case vm.Datastore == "":
			return nil, bad(fmt.Sprintf("vms[%d].datastore", i), "empty for VM %q", vm.Name)
		}
		seen[vm.Name] = true
		last[vm.Name] = vm.LastSuccess
	}
	j.VMs = slices.Clone(j.VMs)
	return &jobState{job: j, sched: sched, lastSuccess: last}, nil
}

// Update replaces the jobs, as on a configuration reload. It validates all
// of them first and changes nothing if one is invalid.
//
// Running tasks are never interrupted. A job that is no longer listed is
// removed: its pending VMs are left with [ReasonJobRemoved], its running
// tasks finish (without retries) and then its run is reported. A job that
// stays (same name) keeps its open run and its next occurrence unless its
// schedule changed; the run keeps its window as it was when the run opened,
// VMs removed from the job leave it with [ReasonVMRemoved], and VMs added join
// from the next run. Repository, mode, RPO, retry policy and datastores take
// effect for every task started from now on. A VM's LastSuccess never moves
// back: the newer of the scheduler's and the given one is kept.
func (s *Scheduler) Update(jobs []Job) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	states := make(map[string]*jobState, len(jobs))
	for _, j := range jobs {
		st, err := compile(j)
		if err != nil {
			return err
		}
		if states[j.Name] != nil {
			return &ConfigError{Job: j.Name, Field: "name", Err: errors.New("two jobs have this name")}
		}
		if st.sched.Next(now).IsZero() {
			return &ConfigError{Job: j.Name, Field: "schedule", Err: fmt.Errorf("%q never falls due", j.Schedule)}
		}
		states[j.Name] = st
	}

	s.advance(now)
	for _, name := range s.names {
		if states[name] == nil {
			if r := s.jobs[name].open; r != nil {
				s.closeRun(r, now, ReasonJobRemoved)
			}
			delete(s.jobs, name)
		}
	}
	for name, st := range states {
		old := s.jobs[name]
		if old == nil {
			st.next = st.sched.Next(now)
			s.jobs[name] = st
			continue
		}
		for vm, t := range st.lastSuccess {
			if o := old.lastSuccess[vm]; o.After(t) {
				st.lastSuccess[vm] = o
			}
		}
		old.lastSuccess = st.lastSuccess
		if old.job.Schedule != st.job.Schedule {
			old.sched = st.sched
			old.next = st.sched.Next(now)
		}
		old.job = st.job
		if r := old.open; r != nil {
			s.reconcile(r, now)
		}
	}
	s.names = s.names[:0]
	for name := range s.jobs {
		s.names = append(s.names, name)
	}
	slices.Sort(s.names)
	return nil
}

// reconcile brings an open run in line with its job's new configuration.
func (s *Scheduler) reconcile(r *run, now time.Time) {
	byName := make(map[string]VM, len(r.job.job.VMs))
	for _, vm := range r.job.job.VMs {
		byName[vm.Name] = vm
	}
	for _, v := range r.vms {
		if vm, ok := byName[v.vm.Name]; ok {
			v.vm.Datastore = vm.Datastore
			continue
		}
		switch {
		case v.running:
			v.leave = ReasonVMRemoved
		case v.result == nil:
			v.settle(NotDone, ReasonVMRemoved, now)
		}
	}
	s.finishIfDone(r)
}

// settle makes v's result final.
func (v *vmRun) settle(o Outcome, reason string, at time.Time) {
	v.result = &VMResult{
		VM:        v.vm.Name,
		Datastore: v.vm.Datastore,
		Outcome:   o,
		Attempts:  v.attempts,
		Reason:    reason,
		Err:       v.lastErr,
		Finished:  at,
	}
}

// advance brings the scheduler to now: it opens the runs that fell due and
// closes those whose window ended.
func (s *Scheduler) advance(now time.Time) {
	for _, name := range s.names {
		j := s.jobs[name]
		if j.next.IsZero() || j.next.After(now) {
			continue
		}
		due := latestDue(j.sched, j.next, now)
		if r := j.open; r != nil && !r.end.IsZero() && !r.end.After(due) {
			s.closeRun(r, r.end, "")
		}
		if r := j.open; r != nil {
			r.skipped++
		} else {
			s.openRun(j, due, false)
		}
		j.next = j.sched.Next(due)
	}
	var ending []*run
	for _, name := range s.names {
		if r := s.jobs[name].open; r != nil && !r.end.IsZero() && !r.end.After(now) {
			ending = append(ending, r)
		}
	}
	slices.SortStableFunc(ending, func(a, b *run) int { return a.end.Compare(b.end) })
	for _, r := range ending {
		s.closeRun(r, r.end, "")
	}
}

// openRun opens a run of j due at due.
func (s *Scheduler) openRun(j *jobState, due time.Time, manual bool) {
	r := &run{job: j, due: due, manual: manual, start: due}
	if w := j.job.Window; w != nil && !manual {
		r.start, r.end = windowAt(*w, due)
		if r.start.Before(due) {
			r.start = due
		}
	}
	for _, vm := range j.job.VMs {
		r.vms = append(r.vms, &vmRun{vm: VM{Name: vm.Name, Datastore: vm.Datastore}})
	}
	slices.SortFunc(r.vms, func(a, b *vmRun) int { return cmp.Compare(a.vm.Name, b.vm.Name) })
	j.open = r
	s.finishIfDone(r)
}

// closeRun closes r at time at: no new task of it starts, and its pending VMs
// are left behind with reason, or if reason is empty with what held each one
// back just before at. Running tasks go on, without retries.
func (s *Scheduler) closeRun(r *run, at time.Time, reason string) {
	var why map[*vmRun]string
	if reason == "" {
		_, why = s.plan(at.Add(-time.Nanosecond))
	}
	for _, v := range r.vms {
		switch {
		case v.running:
			v.leave = cmp.Or(reason, ReasonWindowClosed)
		case v.result == nil:
			v.settle(NotDone, cmp.Or(reason, why[v], ReasonWindowClosed), at)
		}
	}
	r.closed = true
	if r.job.open == r {
		r.job.open = nil
	}
	s.finishIfDone(r)
}

// finishIfDone reports r if every VM of it has a final result.
func (s *Scheduler) finishIfDone(r *run) {
	if r.done {
		return
	}
	for _, v := range r.vms {
		if v.result == nil {
			return
		}
	}
	r.done = true
	if r.job.open == r {
		r.job.open = nil
	}
	rep := RunReport{
		Job:       r.job.job.Name,
		Due:       r.due,
		Manual:    r.manual,
		WindowEnd: r.end,
		Skipped:   r.skipped,
		Finished:  r.due,
	}
	for _, v := range r.vms {
		rep.VMs = append(rep.VMs, *v.result)
		if v.result.Finished.After(rep.Finished) {
			rep.Finished = v.result.Finished
		}
	}
	s.reports = append(s.reports, rep)
}

// candidate is a pending VM that may start now but for the limits.
type candidate struct {
	job  *jobState
	run  *run
	vm   *vmRun
	last time.Time // newest restore point; zero if none
	// class orders by RPO risk first: 0 no restore point, 1 RPO set (then
	// by left, the time until the restore point is older than the RPO),
	// 2 no RPO.
	class int
	left  time.Duration
}

func compareCandidates(a, b candidate) int {
	return cmp.Or(
		cmp.Compare(a.class, b.class),
		cmp.Compare(a.left, b.left),
		a.last.Compare(b.last),
		cmp.Compare(a.vm.vm.Name, b.vm.vm.Name),
		cmp.Compare(a.job.job.Name, b.job.job.Name),
	)
}

// plan returns the pending VMs that would start at now, in priority order,
// and for those held back, the reason.
func (s *Scheduler) plan(now time.Time) ([]candidate, map[*vmRun]string) {
	var cands []candidate
	for _, name := range s.names {
		j := s.jobs[name]
		r := j.open
		if r == nil || r.start.After(now) || (!r.end.IsZero() && !now.Before(r.end)) {
			continue
		}
		for _, v := range r.vms {
			if !v.pending() || v.notBefore.After(now) {
				continue
			}
			c := candidate{job: j, run: r, vm: v, last: j.lastSuccess[v.vm.Name], class: 2}
			switch {
			case c.last.IsZero():
				c.class = 0
			case j.job.RPO > 0:
				c.class = 1
				c.left = c.last.Add(j.job.RPO).Sub(now)
			}
			cands = append(cands, c)
		}
	}
	slices.SortFunc(cands, compareCandidates)

	host := 0
	perDS := make(map[string]int)
	perRepo := make(map[string]int)
	busy := make(map[string]string) // VM name → job name
	for _, rt := range s.running {
		busy[rt.task.VM] = rt.task.Job
		if rt.stored {
			continue // holds its VM, no slot
		}
		host++
		perDS[rt.task.Datastore]++
		perRepo[rt.task.Repository]++
	}
	var start []candidate
	why := make(map[*vmRun]string)
	newDS := make(map[string]int)
	for _, c := range cands {
		ds, repo := c.vm.vm.Datastore, c.job.job.Repository
		var reason string
		switch {
		case busy[c.vm.vm.Name] != "":
			reason = "VM busy in job " + busy[c.vm.vm.Name]
		case s.paused[ds]:
			reason = "datastore " + ds + " paused"
		case s.limits.PerHost > 0 && host >= s.limits.PerHost:
			reason = "limit host"
		case s.limits.PerDatastore > 0 && perDS[ds] >= s.limits.PerDatastore:
			reason = "limit datastore " + ds
		case s.limits.PerRepository > 0 && perRepo[repo] >= s.limits.PerRepository:
			reason = "limit repository " + repo
		case s.stagger > 0 && newDS[ds] >= s.stagger:
			reason = "datastore " + ds + " ramping up"
		}
		if reason != "" {
			why[c.vm] = reason
			continue
		}
		host++
		newDS[ds]++
		perDS[ds]++
		perRepo[repo]++
		busy[c.vm.vm.Name] = c.job.job.Name
		start = append(start, c)
	}
	return start, why
}

// Ready returns the tasks to start now and marks them running. It starts as
// many pending VMs as the limits allow, none on a paused datastore, none
// outside its run's window or before its retry delay, and none whose VM is
// already running (in any job). When more are due than may start, VMs whose
// RPO is most at risk go first: a VM with no restore point at all, then by
// the least time left before its newest restore point gets older than its
// job's RPO (VMs of jobs without an RPO after all others), then the oldest
// restore point, then by VM name and job name.
//
// Call it when Next's time has come, and after Done, PauseDatastore, RunNow
// and Update, which may let more tasks start.
func (s *Scheduler) Ready() []Task {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	s.advance(now)
	start, _ := s.plan(now)
	tasks := make([]Task, 0, len(start))
	for _, c := range start {
		s.lastID++
		c.vm.attempts++
		c.vm.running = true
		t := Task{
			Job:        c.job.job.Name,
			VM:         c.vm.vm.Name,
			Datastore:  c.vm.vm.Datastore,
			Repository: c.job.job.Repository,
			Mode:       c.job.job.Mode,
			Attempt:    c.vm.attempts,
			Due:        c.run.due,
			Manual:     c.run.manual,
			Started:    now,
			id:         s.lastID,
		}
		s.running[t.VM] = &running{task: t, run: c.run, vm: c.vm}
		tasks = append(tasks, t)
	}
	return tasks
}

// Stored records that a running task's restore point is written and only
// the release of its capture is left (the overlay method's merge of the
// guest's writes, which touches neither the repository nor the other
// VMs): the task no longer counts against the limits, so that another VM
// may start, but its VM starts in no job until Done. Stored returns an
// error wrapping [ErrUnknownTask] if t is not running.
func (s *Scheduler) Stored(t Task) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	rt := s.running[t.VM]
	if rt == nil || rt.task.id != t.id {
		return fmt.Errorf("stored: VM %s of job %s attempt %d: %w", t.VM, t.Job, t.Attempt, ErrUnknownTask)
	}
	rt.stored = true
	return nil
}

// Done records the end of a task that Ready handed out. A nil err and false
// notFound mean success: the VM's LastSuccess becomes the task's Started
// time. notFound means the VM no longer exists: it is recorded and not
// retried in this run. Any other failure is retried after the job's backoff,
// unless the attempts are used up, the run's window has closed, or the job or
// VM was removed. Done returns an error wrapping [ErrUnknownTask] if t is not
// running.
func (s *Scheduler) Done(t Task, err error, notFound bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	s.advance(now)
	rt := s.running[t.VM]
	if rt == nil || rt.task.id != t.id {
		return fmt.Errorf("done: VM %s of job %s attempt %d: %w", t.VM, t.Job, t.Attempt, ErrUnknownTask)
	}
	delete(s.running, t.VM)
	v, r := rt.vm, rt.run
	v.running = false
	switch {
	case notFound:
		v.lastErr = err
		reason := "not found"
		if err != nil {
			reason += ": " + err.Error()
		}
		v.settle(NotFound, reason, now)
	case err == nil:
		if t.Started.After(r.job.lastSuccess[t.VM]) {
			r.job.lastSuccess[t.VM] = t.Started
		}
		v.lastErr = nil
		v.settle(Succeeded, "", now)
	default:
		v.lastErr = err
		switch {
		case v.attempts >= r.job.job.Retry.MaxAttempts:
			v.settle(Failed, "retries exhausted: "+err.Error(), now)
		case v.leave != "":
			v.settle(NotDone, v.leave, now)
		default:
			v.notBefore = now.Add(r.job.job.Retry.Backoff(v.attempts))
		}
	}
	s.finishIfDone(r)
	return nil
}

// Next returns when Ready may next have something to start that it has not
// now, or a run may end: the earliest of the next scheduled occurrence, a
// window opening or closing, and a retry delay running out. It returns the
// current time if Ready would start something now, and the zero time if
// nothing is scheduled at all. A task ending, a datastore unpaused, RunNow and
// Update can also let tasks start; Next does not foresee those, so call Ready
// after them.
func (s *Scheduler) Next() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	s.advance(now)
	if start, _ := s.plan(now); len(start) > 0 {
		return now
	}
	var next time.Time
	earliest := func(t time.Time) {
		if !t.IsZero() && t.After(now) && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	for _, name := range s.names {
		j := s.jobs[name]
		earliest(j.next)
		r := j.open
		if r == nil {
			continue
		}
		earliest(r.start)
		earliest(r.end)
		for _, v := range r.vms {
			if v.pending() {
				earliest(v.notBefore)
			}
		}
	}
	return next
}

// PauseDatastore stops (paused true) or resumes (false) starting backups of
// VMs on the named datastore. Backups running on it go on. Call Ready after
// resuming.
func (s *Scheduler) PauseDatastore(name string, paused bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advance(s.clock.Now())
	if paused {
		s.paused[name] = true
	} else {
		delete(s.paused, name)
	}
}

// RunNow opens a run of the named job now, as `kura run-now` does. The run
// ignores the job's window (it ends when every VM has a result) but keeps to
// the limits and to paused datastores. It returns an error wrapping
// [ErrUnknownJob] if there is no such job, and [ErrRunOpen] if a run of the
// job is still open. Call Ready after it.
func (s *Scheduler) RunNow(job string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	s.advance(now)
	j := s.jobs[job]
	switch {
	case j == nil:
		return fmt.Errorf("run-now %q: %w", job, ErrUnknownJob)
	case j.open != nil:
		return fmt.Errorf("run-now %q: run due %s: %w", job, j.open.due.Format(time.RFC3339), ErrRunOpen)
	}
	s.openRun(j, now, true)
	return nil
}

// Reports returns the runs that finished since the previous call, in the
// order they finished, and forgets them.
func (s *Scheduler) Reports() []RunReport {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advance(s.clock.Now())
	out := s.reports
	s.reports = nil
	return out
}

// Waiting returns how many VMs of open runs wait for an attempt (due, not
// running, not settled): the queue length.
func (s *Scheduler) Waiting() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advance(s.clock.Now())
	n := 0
	for _, j := range s.jobs {
		if r := j.open; r != nil && !r.closed {
			for _, v := range r.vms {
				if v.pending() && v.leave == "" {
					n++
				}
			}
		}
	}
	return n
}

// SetStagger caps how many tasks one Ready call starts on each datastore
// (0: no cap). With latency control the caller starts backups on a
// datastore one at a time and pauses it until it has seen what the last
// one did to the guests' latency.
func (s *Scheduler) SetStagger(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stagger = max(n, 0)
}
