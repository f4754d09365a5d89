package schedule

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestNewRejectsInvalidConfig(t *testing.T) {
	good := func() Job { return Job{Name: "nightly", Repository: "r", Schedule: "@daily", VMs: vms("a1")} }
	tests := []struct {
		name      string
		edit      func(*Job)
		limits    Limits
		wantJob   string
		wantField string
	}{
		{"bad cron field", func(j *Job) { j.Schedule = "61 * * * *" }, Limits{}, "nightly", "schedule"},
		{"four cron fields", func(j *Job) { j.Schedule = "* * * *" }, Limits{}, "nightly", "schedule"},
		{"bad @every", func(j *Job) { j.Schedule = "@every soon" }, Limits{}, "nightly", "schedule"},
		{"empty schedule", func(j *Job) { j.Schedule = "" }, Limits{}, "nightly", "schedule"},
		{"@every too short", func(j *Job) { j.Schedule = "@every 0s" }, Limits{}, "nightly", "schedule"},
		{"day of week 8", func(j *Job) { j.Schedule = "0 3 * * 8" }, Limits{}, "nightly", "schedule"},
		{"never due", func(j *Job) { j.Schedule = "0 0 30 2 *" }, Limits{}, "nightly", "schedule"},
		{"no name", func(j *Job) { j.Name = "" }, Limits{}, "", "name"},
		{"no repository", func(j *Job) { j.Repository = "" }, Limits{}, "nightly", "repository"},
		{"window start past midnight", func(j *Job) { j.Window = &Window{Start: 24 * time.Hour, Duration: time.Hour} }, Limits{}, "nightly", "window"},
		{"empty window", func(j *Job) { j.Window = &Window{Start: time.Hour} }, Limits{}, "nightly", "window"},
		{"window over a day", func(j *Job) { j.Window = &Window{Duration: 25 * time.Hour} }, Limits{}, "nightly", "window"},
		{"negative RPO", func(j *Job) { j.RPO = -time.Hour }, Limits{}, "nightly", "rpo"},
		{"negative attempts", func(j *Job) { j.Retry.MaxAttempts = -1 }, Limits{}, "nightly", "retry"},
		{"max delay below initial", func(j *Job) { j.Retry = RetryPolicy{InitialDelay: 2 * time.Hour} }, Limits{}, "nightly", "retry"},
		{"VM twice", func(j *Job) { j.VMs = vms("a1", "b1", "a1") }, Limits{}, "nightly", "vms[2].name"},
		{"VM without name", func(j *Job) { j.VMs = []VM{{Datastore: "a"}} }, Limits{}, "nightly", "vms[0].name"},
		{"VM without datastore", func(j *Job) { j.VMs = []VM{{Name: "web"}} }, Limits{}, "nightly", "vms[0].datastore"},
		{"negative limit", func(*Job) {}, Limits{PerDatastore: -1}, "", "PerDatastore"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j := good()
			tt.edit(&j)
			_, err := New([]Job{j}, tt.limits, &fakeClock{now: t0})
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("New: %v, want a *ConfigError", err)
			}
			if ce.Job != tt.wantJob || ce.Field != tt.wantField {
				t.Errorf("error names job %q field %q, want %q %q (%v)", ce.Job, ce.Field, tt.wantJob, tt.wantField, err)
			}
			if !strings.Contains(err.Error(), tt.wantField) || !strings.Contains(err.Error(), tt.wantJob) {
				t.Errorf("message %q does not name job %q and field %q", err, tt.wantJob, tt.wantField)
			}
		})
	}

	t.Run("duplicate job", func(t *testing.T) {
		_, err := New([]Job{good(), good()}, Limits{}, &fakeClock{now: t0})
		if err == nil || !strings.Contains(err.Error(), `job "nightly": name`) {
			t.Errorf("New with two jobs of one name: %v", err)
		}
	})
}

func TestLimitsAreNeverExceeded(t *testing.T) {
	// All jobs fall due at 13:00; VMs are on the datastore named by their
	// first letter, and none has a restore point, so they go by name.
	tests := []struct {
		name   string
		limits Limits
		jobs   map[string][]string // repository → VMs, one job per repository
		want   []string            // started at 13:00
		then   []string            // started after the first task ends
	}{
		{"no limits", Limits{}, map[string][]string{"r": {"a1", "a2", "b1"}},
			[]string{"r/a1", "r/a2", "r/b1"}, nil},
		{"per host", Limits{PerHost: 2}, map[string][]string{"r": {"a1", "b1", "c1", "d1"}},
			[]string{"r/a1", "r/b1"}, []string{"r/c1"}},
		{"per datastore", Limits{PerDatastore: 1}, map[string][]string{"r": {"a1", "a2", "a3", "b1", "b2"}},
			[]string{"r/a1", "r/b1"}, []string{"r/a2"}},
		{"per repository", Limits{PerRepository: 1}, map[string][]string{"r1": {"a1", "b1"}, "r2": {"c1", "d1"}},
			[]string{"r1/a1", "r2/c1"}, []string{"r1/b1"}},
		{"all three", Limits{PerHost: 3, PerDatastore: 1, PerRepository: 2},
			map[string][]string{"r1": {"a1", "a2", "b1"}, "r2": {"a3", "c1", "d1"}},
			[]string{"r1/a1", "r1/b1", "r2/c1"}, []string{"r1/a2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var jobs []Job
			for repo, names := range tt.jobs {
				jobs = append(jobs, Job{Name: repo, Repository: repo, Schedule: "0 13 * * *", VMs: vms(names...)})
			}
			clock := &fakeClock{now: t0}
			s := newScheduler(t, jobs, tt.limits, clock)
			clock.set(t, at(0, 13, 0))
			first := s.Ready()
			equal(t, "started at 13:00", ids(first), tt.want)
			if again := s.Ready(); len(again) != 0 {
				t.Fatalf("second Ready() = %v, want nothing", ids(again))
			}
			if got := s.Next(); !got.Equal(at(1, 13, 0)) {
				t.Errorf("Next() with only limits holding VMs back = %s, want tomorrow 13:00", got)
			}
			clock.set(t, at(0, 13, 30))
			done(t, s, first[0], nil, false)
			equal(t, "started after the first ended", ids(s.Ready()), tt.then)
		})
	}
}

func TestOrderByRPORiskThenAge(t *testing.T) {
	due := at(0, 13, 0)
	ago := func(d time.Duration) time.Time { return due.Add(-d) }
	jobs := []Job{
		{Name: "day", Repository: "r", Schedule: "0 13 * * *", RPO: 24 * time.Hour, VMs: []VM{
			{Name: "fresh", Datastore: "x", LastSuccess: ago(time.Hour)},         // 23h left
			{Name: "old", Datastore: "x", LastSuccess: ago(23 * time.Hour)},      // 1h left
			{Name: "tie-b", Datastore: "x", LastSuccess: ago(12 * time.Hour)},    // 12h left
			{Name: "tie-a", Datastore: "x", LastSuccess: ago(12 * time.Hour)},    // 12h left
			{Name: "older-4h", Datastore: "x", LastSuccess: ago(20 * time.Hour)}, // 4h left
			{Name: "zz-new", Datastore: "x"},                                     // no restore point
			{Name: "overdue", Datastore: "x", LastSuccess: ago(30 * time.Hour)},  // 6h late
		}},
		{Name: "tight", Repository: "r", Schedule: "0 13 * * *", RPO: 2 * time.Hour, VMs: []VM{
			{Name: "half-hour", Datastore: "x", LastSuccess: ago(90 * time.Minute)}, // 30m left
			{Name: "newer-4h", Datastore: "x", LastSuccess: ago(-2 * time.Hour)},    // 4h left, newer
		}},
		{Name: "lax", Repository: "r", Schedule: "0 13 * * *", VMs: []VM{
			{Name: "ancient", Datastore: "x", LastSuccess: ago(1000 * time.Hour)}, // no RPO
			{Name: "aa-new", Datastore: "x"},                                      // no restore point
		}},
	}
	clock := &fakeClock{now: t0}
	s := newScheduler(t, jobs, Limits{PerHost: 1}, clock)
	clock.set(t, due)
	var order []string
	for {
		tasks := s.Ready()
		if len(tasks) == 0 {
			break
		}
		if len(tasks) > 1 {
			t.Fatalf("Ready() = %v with PerHost 1", ids(tasks))
		}
		order = append(order, tasks[0].VM)
		doneAll(t, s, tasks)
	}
	equal(t, "order", order, []string{
		"aa-new", "zz-new", // no restore point: most at risk, then by name
		"overdue", "half-hour", "old",
		"older-4h", "newer-4h", // same time left: older restore point first
		"tie-a", "tie-b", // same restore point: by name
		"fresh",
		"ancient", // no RPO
	})
}

func TestVMNeverRunsTwiceAtOnce(t *testing.T) {
	shared := VM{Name: "db", Datastore: "a"}
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{
		{Name: "local", Repository: "r1", Schedule: "0 13 * * *", VMs: []VM{shared}},
		{Name: "offsite", Repository: "r2", Schedule: "0 13 * * *", VMs: []VM{shared}},
	}, Limits{}, clock)
	clock.set(t, at(0, 13, 0))
	first := s.Ready()
	equal(t, "first", ids(first), []string{"local/db"})
	clock.set(t, at(0, 14, 0))
	doneAll(t, s, first)
	equal(t, "after local ended", ids(s.Ready()), []string{"offsite/db"})
}

func TestRetryBackoffAndMaxAttempts(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{
		Name: "j", Repository: "r", Schedule: "0 13 * * *",
		Retry: RetryPolicy{MaxAttempts: 4, InitialDelay: time.Minute, MaxDelay: 3 * time.Minute},
		VMs:   vms("a1"),
	}}, Limits{}, clock)

	start := at(0, 13, 0)
	for i, delay := range []time.Duration{0, time.Minute, 2 * time.Minute, 3 * time.Minute} {
		attempt := i + 1
		start = start.Add(delay)
		if got := s.Next(); !got.Equal(start) {
			t.Fatalf("attempt %d: Next() = %s, want %s", attempt, got, start)
		}
		clock.set(t, start.Add(-time.Second))
		if tasks := s.Ready(); len(tasks) != 0 {
			t.Fatalf("attempt %d: Ready() a second early = %v", attempt, ids(tasks))
		}
		clock.set(t, start)
		tasks := s.Ready()
		if len(tasks) != 1 || tasks[0].Attempt != attempt {
			t.Fatalf("attempt %d: Ready() = %+v", attempt, tasks)
		}
		if reps := s.Reports(); len(reps) != 0 {
			t.Fatalf("attempt %d: run reported early: %+v", attempt, reps)
		}
		done(t, s, tasks[0], errors.New("boom "+string(rune('0'+attempt))), false)
	}
	rep := oneReport(t, s)
	equal(t, "report", summary(rep), []string{"a1 failed 4 retries exhausted: boom 4"})
	if rep.VMs[0].Err == nil || rep.VMs[0].Err.Error() != "boom 4" {
		t.Errorf("last error = %v", rep.VMs[0].Err)
	}
	if got := s.Next(); !got.Equal(at(1, 13, 0)) {
		t.Errorf("Next() after the run = %s, want tomorrow 13:00", got)
	}
}

func TestSuccessUpdatesLastSuccess(t *testing.T) {
	// Two VMs, one slot: a1's success at 13:00 makes it the freshest, so at
	// the next run b1 (backed up two days ago) goes first.
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{Name: "j", Repository: "r", Schedule: "0 13 * * *", RPO: 72 * time.Hour, VMs: []VM{
		{Name: "a1", Datastore: "a", LastSuccess: at(-3, 13, 0)},
		{Name: "b1", Datastore: "a", LastSuccess: at(-2, 13, 0)},
	}}}, Limits{PerHost: 1}, clock)
	clock.set(t, at(0, 13, 0))
	var order []string
	for range 2 {
		tasks := s.Ready()
		order = append(order, ids(tasks)...)
		doneAll(t, s, tasks)
	}
	clock.set(t, at(1, 13, 0))
	for range 2 {
		tasks := s.Ready()
		order = append(order, ids(tasks)...)
		doneAll(t, s, tasks)
	}
	equal(t, "order over two days", order, []string{"j/a1", "j/b1", "j/a1", "j/b1"})
}

func TestNotFoundIsNotRetried(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{Name: "j", Repository: "r", Schedule: "0 13 * * *", VMs: vms("a1", "b1")}}, Limits{}, clock)
	clock.set(t, at(0, 13, 0))
	tasks := s.Ready()
	done(t, s, find(t, tasks, "a1"), errors.New(`domain "a1" not found`), true)
	if got := s.Next(); !got.Equal(at(1, 13, 0)) {
		t.Errorf("Next() = %s, want no retry before tomorrow's run", got)
	}
	clock.set(t, at(0, 14, 0))
	if again := s.Ready(); len(again) != 0 {
		t.Fatalf("Ready() = %v, want no retry", ids(again))
	}
	done(t, s, find(t, tasks, "b1"), nil, false)
	rep := oneReport(t, s)
	equal(t, "report", summary(rep), []string{`a1 not found 1 not found: domain "a1" not found`, "b1 succeeded 1 "})
	equal(t, "left", []string{rep.Left()[0].VM}, []string{"a1"})
	// Tomorrow the VM is tried again: it may be back.
	clock.set(t, at(1, 13, 0))
	equal(t, "tomorrow", ids(s.Ready()), []string{"j/a1", "j/b1"})
}

func TestWindowClosingLeavesVMsWithReasons(t *testing.T) {
	night := &Window{Start: 22 * time.Hour, Duration: 8 * time.Hour}
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{
		Name: "nightly", Repository: "r", Schedule: "0 21 * * *", Window: night,
		Retry: RetryPolicy{MaxAttempts: 2, InitialDelay: 2 * time.Hour, MaxDelay: 2 * time.Hour},
		VMs:   vms("a1", "a2", "a3", "b1", "c1", "d1", "e1"),
	}}, Limits{PerDatastore: 1}, clock)
	s.PauseDatastore("d", true) // the latency controller holds d back all night

	clock.set(t, at(0, 21, 0))
	if tasks := s.Ready(); len(tasks) != 0 {
		t.Fatalf("Ready() before the window = %v", ids(tasks))
	}
	if got := s.Next(); !got.Equal(at(0, 22, 0)) {
		t.Fatalf("Next() = %s, want the window opening at 22:00", got)
	}
	clock.set(t, at(0, 22, 0))
	tasks := s.Ready()
	equal(t, "started at 22:00", ids(tasks), []string{"nightly/a1", "nightly/b1", "nightly/c1", "nightly/e1"})
	for _, task := range tasks {
		if !task.Due.Equal(at(0, 21, 0)) {
			t.Errorf("%s due %s, want 21:00", task.VM, task.Due)
		}
	}

	// b1 fails twice: retries exhausted.
	clock.set(t, at(0, 23, 0))
	done(t, s, find(t, tasks, "b1"), errors.New("disk read error"), false)
	clock.set(t, at(1, 1, 0))
	retry := s.Ready()
	equal(t, "retry at 01:00", ids(retry), []string{"nightly/b1"})
	done(t, s, retry[0], errors.New("disk read error again"), false)

	// c1 fails at 05:00: its retry would be at 07:00, after the window.
	clock.set(t, at(1, 5, 0))
	done(t, s, find(t, tasks, "c1"), errors.New("guest agent timeout"), false)

	// 06:00: the window closes. a1 and e1 still run; a2 and a3 wait behind
	// a1 on datastore a; d1 waits for its datastore.
	clock.set(t, at(1, 6, 0))
	if got := s.Ready(); len(got) != 0 {
		t.Fatalf("Ready() at the window's end = %v", ids(got))
	}
	if reps := s.Reports(); len(reps) != 0 {
		t.Fatalf("reported while a1 and e1 still run: %+v", reps)
	}
	if got := s.Next(); !got.Equal(at(1, 21, 0)) {
		t.Errorf("Next() after the window = %s, want 21:00", got)
	}
	s.PauseDatastore("d", false)
	if got := s.Ready(); len(got) != 0 {
		t.Fatalf("Ready() after the window, d unpaused = %v", ids(got))
	}

	// e1 fails after the window: not retried. a1 succeeds.
	clock.set(t, at(1, 6, 30))
	done(t, s, find(t, tasks, "e1"), errBoom, false)
	clock.set(t, at(1, 7, 0))
	done(t, s, find(t, tasks, "a1"), nil, false)

	rep := oneReport(t, s)
	equal(t, "report", summary(rep), []string{
		"a1 succeeded 1 ",
		"a2 not done 0 limit datastore a",
		"a3 not done 0 limit datastore a",
		"b1 failed 2 retries exhausted: disk read error again",
		"c1 not done 1 window closed",
		"d1 not done 0 datastore d paused",
		"e1 not done 1 window closed",
	})
	if !rep.WindowEnd.Equal(at(1, 6, 0)) || !rep.Finished.Equal(at(1, 7, 0)) {
		t.Errorf("window end %s, finished %s; want 06:00 and 07:00", rep.WindowEnd, rep.Finished)
	}
	if c1 := rep.VMs[4]; c1.Err == nil || c1.Err.Error() != "guest agent timeout" {
		t.Errorf("c1's last error = %v", c1.Err)
	}
	if got := len(rep.Left()); got != 6 {
		t.Errorf("%d VMs left, want 6", got)
	}
}

func TestRunDueInsideWindowStartsAtOnce(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{
		Name: "j", Repository: "r", Schedule: "0 3 * * *",
		Window: &Window{Start: 22 * time.Hour, Duration: 8 * time.Hour}, VMs: vms("a1"),
	}}, Limits{}, clock)
	clock.set(t, at(1, 3, 0))
	tasks := s.Ready()
	equal(t, "at 03:00", ids(tasks), []string{"j/a1"})
	done(t, s, tasks[0], errBoom, false)
	// The retry at 03:01 is still inside the window that opened at 22:00.
	clock.set(t, at(1, 3, 1))
	equal(t, "retry", ids(s.Ready()), []string{"j/a1"})
}

func TestPauseDatastore(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{Name: "j", Repository: "r", Schedule: "0 13 * * *", VMs: vms("a1", "a2", "b1")}},
		Limits{PerDatastore: 1}, clock)
	s.PauseDatastore("a", true)
	clock.set(t, at(0, 13, 0))
	equal(t, "a paused", ids(s.Ready()), []string{"j/b1"})
	if got := s.Next(); !got.Equal(at(1, 13, 0)) {
		t.Errorf("Next() while a is paused = %s, want tomorrow", got)
	}

	s.PauseDatastore("a", false)
	running := s.Ready()
	equal(t, "a resumed", ids(running), []string{"j/a1"})

	// Pausing does not stop a1, but a2 does not start after it.
	s.PauseDatastore("a", true)
	clock.set(t, at(0, 14, 0))
	done(t, s, running[0], nil, false)
	if got := s.Ready(); len(got) != 0 {
		t.Fatalf("Ready() with a paused again = %v", ids(got))
	}
	s.PauseDatastore("a", false)
	equal(t, "a resumed again", ids(s.Ready()), []string{"j/a2"})
}

func TestRunNow(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{
		Name: "nightly", Repository: "r", Schedule: "0 22 * * *",
		Window: &Window{Start: 22 * time.Hour, Duration: 2 * time.Hour}, VMs: vms("a1", "b1"),
	}}, Limits{}, clock)

	if err := s.RunNow("weekly"); !errors.Is(err, ErrUnknownJob) {
		t.Errorf("RunNow(weekly) = %v, want ErrUnknownJob", err)
	}
	clock.set(t, at(0, 14, 0))
	if err := s.RunNow("nightly"); err != nil {
		t.Fatalf("RunNow: %v", err)
	}
	if err := s.RunNow("nightly"); !errors.Is(err, ErrRunOpen) {
		t.Errorf("second RunNow = %v, want ErrRunOpen", err)
	}
	tasks := s.Ready() // outside the window: a manual run ignores it
	equal(t, "run now", ids(tasks), []string{"nightly/a1", "nightly/b1"})
	if !tasks[0].Due.Equal(at(0, 14, 0)) {
		t.Errorf("due %s, want 14:00", tasks[0].Due)
	}
	done(t, s, tasks[0], errBoom, false)
	clock.set(t, at(0, 14, 1))
	retry := s.Ready()
	equal(t, "retry", ids(retry), []string{"nightly/a1"})
	doneAll(t, s, append(retry, tasks[1]))
	rep := oneReport(t, s)
	if !rep.Manual || len(rep.Left()) != 0 {
		t.Errorf("report %+v, want a manual run with nothing left", rep)
	}
	if got := s.Next(); !got.Equal(at(0, 22, 0)) {
		t.Errorf("Next() = %s, want the scheduled run at 22:00", got)
	}
}

func TestUpdateWhileTasksRun(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{
		{Name: "keep", Repository: "r1", Schedule: "0 13 * * *", VMs: vms("k1", "k2", "k3")},
		{Name: "drop", Repository: "r1", Schedule: "0 13 * * *", VMs: vms("d1", "d2")},
	}, Limits{PerHost: 3}, clock)
	clock.set(t, at(0, 13, 0))
	first := s.Ready()
	equal(t, "started", ids(first), []string{"drop/d1", "drop/d2", "keep/k1"})

	bad := []Job{{Name: "keep", Repository: "r1", Schedule: "not cron"}}
	if err := s.Update(bad); err == nil {
		t.Fatal("Update with a bad schedule succeeded")
	}

	clock.set(t, at(0, 13, 10))
	err := s.Update([]Job{
		{Name: "keep", Repository: "r2", Mode: "crash", Schedule: "0 15 * * *", VMs: []VM{
			{Name: "k1", Datastore: "k"}, {Name: "k2", Datastore: "z"}, {Name: "k4", Datastore: "k"},
		}},
		{Name: "new", Repository: "r3", Schedule: "@every 1h", VMs: vms("n1")},
	})
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	if reps := s.Reports(); len(reps) != 0 {
		t.Fatalf("reported while tasks of both runs still run: %+v", reps)
	}
	if got := s.Next(); !got.Equal(at(0, 14, 10)) {
		t.Errorf("Next() = %s, want the new job at 14:10", got)
	}

	// The three running tasks hold the host limit; when drop's d1 ends
	// (failed, not retried: its job is gone) k2 starts with the new
	// settings. k3 left the job; k4 joins from the next run.
	clock.set(t, at(0, 13, 20))
	done(t, s, find(t, first, "d1"), errBoom, false)
	next := s.Ready()
	equal(t, "after d1", ids(next), []string{"keep/k2"})
	if k2 := next[0]; k2.Repository != "r2" || k2.Datastore != "z" || k2.Mode != "crash" {
		t.Errorf("k2 task = %+v, want repository r2, datastore z, mode crash", k2)
	}
	done(t, s, find(t, first, "d2"), nil, false)
	rep := oneReport(t, s)
	equal(t, "drop", summary(rep), []string{"d1 not done 1 job removed", "d2 succeeded 1 "})

	clock.set(t, at(0, 13, 30))
	doneAll(t, s, []Task{find(t, first, "k1"), next[0]})
	rep = oneReport(t, s)
	equal(t, "keep", summary(rep), []string{"k1 succeeded 1 ", "k2 succeeded 1 ", "k3 not done 0 VM removed from job"})

	clock.set(t, at(0, 15, 0))
	// k4 has no restore point yet: it goes first; the new job's run (due
	// 14:10) is still open.
	equal(t, "keep's new schedule", ids(s.Ready()), []string{"keep/k4", "new/n1", "keep/k1"})
}

func TestUpdateKeepsNewerLastSuccess(t *testing.T) {
	clock := &fakeClock{now: t0}
	job := Job{Name: "j", Repository: "r", Schedule: "0 13 * * *", RPO: 24 * time.Hour, VMs: []VM{
		{Name: "a1", Datastore: "a"}, {Name: "b1", Datastore: "a", LastSuccess: at(-1, 12, 0)},
	}}
	s := newScheduler(t, []Job{job}, Limits{PerHost: 1}, clock)
	clock.set(t, at(0, 13, 0))
	tasks := s.Ready()
	equal(t, "first", ids(tasks), []string{"j/a1"})
	doneAll(t, s, tasks)
	// The reload still carries the old (zero) LastSuccess of a1: the
	// scheduler's newer one wins, so tomorrow b1 goes first.
	if err := s.Update([]Job{job}); err != nil {
		t.Fatal(err)
	}
	b1 := s.Ready()
	equal(t, "second", ids(b1), []string{"j/b1"})
	done(t, s, b1[0], errBoom, true)
	clock.set(t, at(1, 13, 0))
	equal(t, "tomorrow", ids(s.Ready()), []string{"j/b1"})
}

func TestDoneRejectsUnknownTask(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{Name: "j", Repository: "r", Schedule: "0 13 * * *", VMs: vms("a1")}}, Limits{}, clock)
	if err := s.Done(Task{Job: "j", VM: "a1"}, nil, false); !errors.Is(err, ErrUnknownTask) {
		t.Errorf("Done of a task never started = %v", err)
	}
	clock.set(t, at(0, 13, 0))
	tasks := s.Ready()
	done(t, s, tasks[0], errBoom, false)
	if err := s.Done(tasks[0], nil, false); !errors.Is(err, ErrUnknownTask) {
		t.Errorf("second Done = %v, want ErrUnknownTask", err)
	}
	clock.set(t, at(0, 13, 1))
	retry := s.Ready()
	if err := s.Done(tasks[0], nil, false); !errors.Is(err, ErrUnknownTask) {
		t.Errorf("Done of the first attempt while the second runs = %v, want ErrUnknownTask", err)
	}
	done(t, s, retry[0], nil, false)
}

func TestNoJobs(t *testing.T) {
	s := newScheduler(t, nil, Limits{}, &fakeClock{now: t0})
	if got := s.Next(); !got.IsZero() {
		t.Errorf("Next() = %s, want zero", got)
	}
	if got := s.Ready(); len(got) != 0 {
		t.Errorf("Ready() = %v", got)
	}
}

func TestConcurrentDone(t *testing.T) {
	var names []string
	for i := range 20 {
		names = append(names, fmt.Sprintf("a%02d", i))
	}
	s := newScheduler(t, []Job{{Name: "j", Repository: "r", Schedule: "@hourly", VMs: vms(names...)}}, Limits{}, SystemClock{})
	if err := s.RunNow("j"); err != nil {
		t.Fatal(err)
	}
	tasks := s.Ready()
	var wg sync.WaitGroup
	for _, task := range tasks {
		wg.Go(func() {
			if err := s.Done(task, nil, false); err != nil {
				t.Error(err)
			}
			s.Next()
		})
	}
	wg.Wait()
	if rep := oneReport(t, s); len(rep.Left()) != 0 || len(rep.VMs) != 20 {
		t.Errorf("report %+v", rep)
	}
}

// With a stagger of 1, each Ready call starts at most one backup per
// datastore; the limits still cap the total.
func TestStagger(t *testing.T) {
	clock := &fakeClock{now: t0}
	job := Job{Name: "j", Repository: "r", Schedule: "0 13 * * *", VMs: vms("a1", "a2", "a3", "b1")}
	s := newScheduler(t, []Job{job}, Limits{PerDatastore: 2}, clock)
	s.SetStagger(1)
	if err := s.RunNow("j"); err != nil {
		t.Fatal(err)
	}
	equal(t, "first call", ids(s.Ready()), []string{"j/a1", "j/b1"})
	equal(t, "second call", ids(s.Ready()), []string{"j/a2"})
	equal(t, "third call (limit 2 on a)", ids(s.Ready()), nil)
	if n := s.Waiting(); n != 1 {
		t.Errorf("Waiting = %d, want 1 (a3)", n)
	}
}

// A task whose restore point is stored frees its slots (host, datastore,
// repository) for the next VM, while its VM stays busy until Done.
func TestStoredFreesLimitsNotTheVM(t *testing.T) {
	tests := []struct {
		name   string
		limits Limits
	}{
		{"per host", Limits{PerHost: 1}},
		{"per datastore", Limits{PerDatastore: 1}},
		{"per repository", Limits{PerRepository: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			shared := VM{Name: "a1", Datastore: "a"}
			clock := &fakeClock{now: t0}
			s := newScheduler(t, []Job{
				{Name: "j", Repository: "r", Schedule: "0 13 * * *", VMs: []VM{shared, {Name: "a2", Datastore: "a"}}},
				{Name: "k", Repository: "r", Schedule: "0 13 * * *", VMs: []VM{shared}},
			}, tt.limits, clock)
			clock.set(t, at(0, 13, 0))
			first := s.Ready()
			equal(t, "first", ids(first), []string{"j/a1"})
			if got := s.Ready(); len(got) != 0 {
				t.Fatalf("Ready() at the limit = %v", ids(got))
			}
			if err := s.Stored(first[0]); err != nil {
				t.Fatal(err)
			}
			second := s.Ready()
			equal(t, "after a1 stored", ids(second), []string{"j/a2"})
			// a1 merges on: job k may not back it up yet, and a2 holds the slot.
			doneAll(t, s, second)
			if got := s.Ready(); len(got) != 0 {
				t.Fatalf("Ready() while a1 is still releasing its capture = %v", ids(got))
			}
			doneAll(t, s, first)
			equal(t, "after a1 done", ids(s.Ready()), []string{"k/a1"})
		})
	}
}

func TestStoredRejectsUnknownTask(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{Name: "j", Repository: "r", Schedule: "0 13 * * *", VMs: vms("a1")}}, Limits{}, clock)
	if err := s.Stored(Task{Job: "j", VM: "a1"}); !errors.Is(err, ErrUnknownTask) {
		t.Errorf("Stored of a task never started = %v, want ErrUnknownTask", err)
	}
	clock.set(t, at(0, 13, 0))
	tasks := s.Ready()
	done(t, s, tasks[0], nil, false)
	if err := s.Stored(tasks[0]); !errors.Is(err, ErrUnknownTask) {
		t.Errorf("Stored after Done = %v, want ErrUnknownTask", err)
	}
}
