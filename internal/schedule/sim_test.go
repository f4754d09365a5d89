package schedule

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestSimulationKeepsInvariants drives the scheduler through three virtual
// days of many jobs sharing VMs, datastores and repositories, with random
// backup durations, failures, vanished VMs, datastore pauses, run-nows and a
// reload, and checks at every step that:
//
//   - no limit is exceeded and no VM runs twice at once;
//   - nothing starts on a paused datastore, outside its run's window, before
//     its retry delay, or beyond the job's attempts;
//   - Next never asks to be woken in the past (no busy loop);
//
// and at the end, once every job is removed, that every run that started a
// task was reported, every report accounts for each VM of its job exactly
// once with a reason for each VM left, and its results match what the
// tasks did.
func TestSimulationKeepsInvariants(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) { simulate(t, seed) })
	}
}

// simTask is a task the simulation is running.
type simTask struct {
	task     Task
	end      time.Time
	err      error
	notFound bool
}

// runKey names one run of a job.
type runKey struct {
	job string
	due time.Time
}

// attemptKey names one VM in one run.
type attemptKey struct {
	runKey
	vm string
}

func simulate(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 42))
	pick := func(n int) int { return rng.IntN(n) }
	minutes := func(lo, hi int) time.Duration { return time.Duration(lo+pick(hi-lo+1)) * time.Minute }

	datastores := []string{"ds0", "ds1", "ds2", "ds3", "ds4"}
	var all []VM
	for i := range 40 {
		all = append(all, VM{Name: fmt.Sprintf("vm%02d", i), Datastore: datastores[pick(len(datastores))]})
	}
	schedules := []string{"@hourly", "@every 45m", "*/30 * * * *", "0 */3 * * *", "15 22 * * *", "0 1 * * *", "@every 2h", "0 9-17 * * 1-5"}
	makeJobs := func(n int) []Job {
		var jobs []Job
		for i := range n {
			j := Job{
				Name:       fmt.Sprintf("job%d", i),
				Repository: fmt.Sprintf("repo%d", pick(3)),
				Mode:       "consistent",
				Schedule:   schedules[pick(len(schedules))],
				RPO:        []time.Duration{0, 6 * time.Hour, 24 * time.Hour}[pick(3)],
				Retry:      RetryPolicy{MaxAttempts: 1 + pick(4), InitialDelay: minutes(1, 10), MaxDelay: 30 * time.Minute},
			}
			if pick(2) == 0 {
				j.Window = &Window{Start: time.Duration(pick(24)) * time.Hour, Duration: time.Duration(2+pick(11)) * time.Hour}
			}
			for _, k := range rng.Perm(len(all))[:3+pick(6)] {
				vm := all[k]
				vm.LastSuccess = t0.Add(-minutes(0, 48*60))
				if pick(5) == 0 {
					vm.LastSuccess = time.Time{}
				}
				j.VMs = append(j.VMs, vm)
			}
			jobs = append(jobs, j)
		}
		return jobs
	}
	limits := Limits{PerHost: 8, PerDatastore: 3, PerRepository: 4}

	clock := &fakeClock{now: t0}
	jobs := makeJobs(10)
	s := newScheduler(t, jobs, limits, clock)
	byName := func(jobs []Job) map[string]Job {
		m := make(map[string]Job)
		for _, j := range jobs {
			m[j.Name] = j
		}
		return m
	}
	reloadAt := t0.Add(36 * time.Hour)
	reloaded := false
	before := byName(jobs) // configuration up to the reload
	after := map[string]Job{}
	config := before // the current one
	// configAt returns job's configuration in force at time at (the reload
	// happens after the tasks ending at reloadAt are done and run-now is
	// asked).
	configAt := func(job string, at time.Time) Job {
		if at.After(reloadAt) {
			return after[job]
		}
		return before[job]
	}

	active := make(map[string]*simTask) // by VM
	paused := make(map[string]bool)
	manual := make(map[runKey]bool)
	attempts := make(map[attemptKey]int)
	lastEnd := make(map[attemptKey]time.Time)
	outcome := make(map[attemptKey]Outcome) // of the last attempt that ended
	started := make(map[runKey]bool)        // runs that started a task
	var reports []RunReport

	end := t0.Add(72 * time.Hour)
	nextToggle := t0.Add(minutes(10, 120))

	finish := func(st *simTask) {
		t.Helper()
		if err := s.Done(st.task, st.err, st.notFound); err != nil {
			t.Fatalf("Done: %v", err)
		}
		k := attemptKey{runKey{st.task.Job, st.task.Due}, st.task.VM}
		lastEnd[k] = clock.now
		switch {
		case st.notFound:
			outcome[k] = NotFound
		case st.err != nil:
			outcome[k] = Failed
		default:
			outcome[k] = Succeeded
		}
		delete(active, st.task.VM)
	}

	checkStart := func(task Task) {
		t.Helper()
		k := attemptKey{runKey{task.Job, task.Due}, task.VM}
		job := config[task.Job]
		if active[task.VM] != nil {
			t.Fatalf("%s: %s started while running in %s", clock.now, task.VM, active[task.VM].task.Job)
		}
		if paused[task.Datastore] {
			t.Fatalf("%s: %s/%s started on paused datastore %s", clock.now, task.Job, task.VM, task.Datastore)
		}
		if !task.Started.Equal(clock.now) || task.Due.After(clock.now) {
			t.Fatalf("%s: task %+v started %s, due %s", clock.now, task, task.Started, task.Due)
		}
		if task.Repository != job.Repository || task.Mode != job.Mode {
			t.Fatalf("task %+v does not carry job %s's repository and mode", task, job.Name)
		}
		if w := configAt(task.Job, task.Due).Window; w != nil && !manual[k.runKey] {
			ws, we := windowAt(*w, task.Due)
			if clock.now.Before(ws) || !clock.now.Before(we) {
				t.Fatalf("%s: %s/%s due %s started outside its window %s..%s", clock.now, task.Job, task.VM, task.Due, ws, we)
			}
		}
		attempts[k]++
		if task.Attempt != attempts[k] {
			t.Fatalf("%s/%s: attempt %d, want %d", task.Job, task.VM, task.Attempt, attempts[k])
		}
		if task.Attempt > 1 {
			retry := configAt(task.Job, lastEnd[k]).Retry
			if outcome[k] != Failed || task.Attempt > retry.withDefaults().MaxAttempts {
				t.Fatalf("%s/%s: attempt %d after a %s, policy %+v", task.Job, task.VM, task.Attempt, outcome[k], retry)
			}
			if earliest := lastEnd[k].Add(retry.Backoff(task.Attempt - 1)); clock.now.Before(earliest) {
				t.Fatalf("%s/%s: attempt %d at %s, before its backoff ends at %s", task.Job, task.VM, task.Attempt, clock.now, earliest)
			}
		}
		started[k.runKey] = true
	}

	checkLimits := func() {
		t.Helper()
		perDS := make(map[string]int)
		perRepo := make(map[string]int)
		for _, st := range active {
			perDS[st.task.Datastore]++
			perRepo[st.task.Repository]++
		}
		if len(active) > limits.PerHost {
			t.Fatalf("%s: %d running, host limit %d", clock.now, len(active), limits.PerHost)
		}
		for ds, n := range perDS {
			if n > limits.PerDatastore {
				t.Fatalf("%s: %d running on %s, limit %d", clock.now, n, ds, limits.PerDatastore)
			}
		}
		for repo, n := range perRepo {
			if n > limits.PerRepository {
				t.Fatalf("%s: %d running into %s, limit %d", clock.now, n, repo, limits.PerRepository)
			}
		}
	}

	startReady := func() {
		t.Helper()
		for _, task := range s.Ready() {
			checkStart(task)
			st := &simTask{task: task, end: clock.now.Add(minutes(5, 75))}
			switch r := pick(100); {
			case r < 3:
				st.notFound = true
			case r < 25:
				st.err = errors.New("backup failed")
			}
			active[task.VM] = st
			checkLimits()
		}
		if next := s.Next(); !next.IsZero() && !next.After(clock.now) {
			t.Fatalf("%s: Next() = %s right after Ready()", clock.now, next)
		}
	}

	steps := 0
	for clock.now.Before(end) {
		if steps++; steps > 20000 {
			t.Fatal("simulation does not settle")
		}
		next := end
		earliest := func(t time.Time) {
			if !t.IsZero() && t.Before(next) {
				next = t
			}
		}
		earliest(nextToggle)
		earliest(s.Next())
		for _, st := range active {
			earliest(st.end)
		}
		if !reloaded {
			earliest(reloadAt)
		}
		clock.set(t, next)

		var ending []*simTask
		for _, st := range active {
			if !st.end.After(clock.now) {
				ending = append(ending, st)
			}
		}
		slices.SortFunc(ending, func(a, b *simTask) int { return a.end.Compare(b.end) })
		for _, st := range ending {
			finish(st)
			startReady()
		}
		if !nextToggle.After(clock.now) {
			// The latency controller pauses at most one datastore at a time.
			for ds := range paused {
				s.PauseDatastore(ds, false)
				delete(paused, ds)
			}
			if pick(2) == 0 {
				ds := datastores[pick(len(datastores))]
				s.PauseDatastore(ds, true)
				paused[ds] = true
			}
			nextToggle = clock.now.Add(minutes(10, 90))
		}
		if pick(20) == 0 {
			job := jobs[pick(len(jobs))].Name
			if err := s.RunNow(job); err == nil {
				manual[runKey{job, clock.now}] = true
			} else if !errors.Is(err, ErrRunOpen) && !errors.Is(err, ErrUnknownJob) {
				t.Fatalf("RunNow(%s): %v", job, err)
			}
		}
		if !reloaded && clock.now.Equal(reloadAt) {
			// Reload: half the jobs stay (with new settings), others go,
			// new ones come.
			fresh := makeJobs(14)
			var kept []Job
			for i, j := range fresh {
				if i%2 == 1 || i >= 10 {
					if i < 10 {
						j.Name = fmt.Sprintf("job%d", i)
					} else {
						j.Name = fmt.Sprintf("new%d", i)
					}
					kept = append(kept, j)
				}
			}
			if err := s.Update(kept); err != nil {
				t.Fatalf("Update: %v", err)
			}
			jobs = kept
			after = byName(kept)
			config = after
			reloaded = true
		}
		startReady()
		reports = append(reports, s.Reports()...)
	}

	// Wind down: remove every job and let the running tasks end.
	if err := s.Update(nil); err != nil {
		t.Fatal(err)
	}
	for len(active) > 0 {
		var first *simTask
		for _, st := range active {
			if first == nil || st.end.Before(first.end) || (st.end.Equal(first.end) && st.task.VM < first.task.VM) {
				first = st
			}
		}
		clock.set(t, first.end)
		finish(first)
		if tasks := s.Ready(); len(tasks) != 0 {
			t.Fatalf("Ready() after all jobs were removed = %v", ids(tasks))
		}
	}
	reports = append(reports, s.Reports()...)
	if !s.Next().IsZero() {
		t.Errorf("Next() = %s with no jobs left", s.Next())
	}

	reported := make(map[runKey]bool)
	for _, rep := range reports {
		k := runKey{rep.Job, rep.Due}
		if reported[k] {
			t.Fatalf("run %s due %s reported twice", rep.Job, rep.Due)
		}
		reported[k] = true
		seen := make(map[string]bool)
		for _, v := range rep.VMs {
			if seen[v.VM] {
				t.Fatalf("run %s due %s reports %s twice", rep.Job, rep.Due, v.VM)
			}
			seen[v.VM] = true
			ak := attemptKey{k, v.VM}
			if v.Attempts != attempts[ak] {
				t.Errorf("run %s due %s: %s reported %d attempts, made %d", rep.Job, rep.Due, v.VM, v.Attempts, attempts[ak])
			}
			last, ended := outcome[ak]
			if ok := ended && last == Succeeded; ok != (v.Outcome == Succeeded) {
				t.Errorf("run %s due %s: %s reported %s, its last attempt %s (ended: %v)", rep.Job, rep.Due, v.VM, v.Outcome, last, ended)
			}
			if v.Outcome == NotFound && last != NotFound {
				t.Errorf("run %s due %s: %s reported not found, its last attempt %s", rep.Job, rep.Due, v.VM, last)
			}
			if v.Outcome != Succeeded && v.Reason == "" {
				t.Errorf("run %s due %s: %s left without a reason", rep.Job, rep.Due, v.VM)
			}
		}
		// The run has the VMs its job had when it opened (less any a reload
		// removed, which are reported too).
		var want []string
		for _, vm := range configAt(rep.Job, rep.Due).VMs {
			want = append(want, vm.Name)
		}
		slices.Sort(want)
		var got []string
		for vm := range seen {
			got = append(got, vm)
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("run %s due %s accounts for %v, want %v", rep.Job, rep.Due, got, want)
		}
	}
	for k := range started {
		if !reported[k] {
			t.Errorf("run %s due %s started tasks but was never reported", k.job, k.due)
		}
	}
	if len(reports) < 50 {
		t.Errorf("only %d runs reported: the simulation exercises too little", len(reports))
	}
	var tasks, left int
	reasons := make(map[string]int)
	for _, n := range attempts {
		tasks += n
	}
	for _, rep := range reports {
		for _, v := range rep.Left() {
			left++
			reason := v.Reason
			if i := strings.IndexAny(reason, ":"); i > 0 {
				reason = reason[:i]
			}
			reasons[strings.TrimRight(reason, "0123456789")]++
		}
	}
	t.Logf("%d steps, %d runs reported, %d tasks, %d VMs left: %v", steps, len(reports), tasks, left, reasons)
}
