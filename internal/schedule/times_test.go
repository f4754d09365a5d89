package schedule

import (
	"testing"
	"time"
)

func TestDueTimes(t *testing.T) {
	tests := []struct {
		name  string
		spec  string
		start time.Time
		want  []time.Time
	}{
		{"daily at 22:00", "0 22 * * *", t0, []time.Time{at(0, 22, 0), at(1, 22, 0), at(2, 22, 0)}},
		{"@hourly across midnight", "@hourly", at(0, 23, 30), []time.Time{at(1, 0, 0), at(1, 1, 0)}},
		{"@daily at month end", "@daily", time.Date(2025, 3, 31, 23, 59, 0, 0, time.UTC),
			[]time.Time{time.Date(2025, 4, 1, 0, 0, 0, 0, time.UTC), time.Date(2025, 4, 2, 0, 0, 0, 0, time.UTC)}},
		{"@every 30m across midnight", "@every 30m", at(0, 23, 10), []time.Time{at(0, 23, 40), at(1, 0, 10), at(1, 0, 40)}},
		{"@every 90m", "@every 1h30m", t0, []time.Time{at(0, 13, 30), at(0, 15, 0)}},
		{"steps over two hours", "*/20 23,0 * * *", at(0, 23, 30),
			[]time.Time{at(0, 23, 40), at(1, 0, 0), at(1, 0, 20), at(1, 0, 40), at(1, 23, 0)}},
		{"monthly across new year", "0 0 1 * *", time.Date(2025, 12, 15, 0, 0, 0, 0, time.UTC),
			[]time.Time{time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)}},
		{"weekdays from a Friday", "30 2 * * 1-5", at(4, 3, 0), []time.Time{at(7, 2, 30), at(8, 2, 30)}},
		{"due exactly now is next time", "0 12 * * *", t0, []time.Time{at(1, 12, 0)}},
		{"7 is Sunday", "0 3 * * 7", t0, []time.Time{at(6, 3, 0), at(13, 3, 0)}},
		{"Friday to Sunday", "0 3 * * 5-7", t0, []time.Time{at(4, 3, 0), at(5, 3, 0), at(6, 3, 0), at(11, 3, 0)}},
		{"@every in days", "@every 1d12h", t0, []time.Time{at(1, 24, 0), at(3, 12, 0)}},
		{"time zone prefix", "TZ=Europe/Berlin 0 22 * * *", t0, []time.Time{at(0, 21, 0), at(1, 21, 0)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := &fakeClock{now: tt.start}
			s := newScheduler(t, []Job{{Name: "j", Repository: "r", Schedule: tt.spec, VMs: vms("a1")}}, Limits{}, clock)
			for _, want := range tt.want {
				if got := s.Next(); !got.Equal(want) {
					t.Fatalf("Next() = %s, want %s", got, want)
				}
				clock.set(t, want.Add(-time.Second))
				if tasks := s.Ready(); len(tasks) != 0 {
					t.Fatalf("a second early: Ready() = %v", ids(tasks))
				}
				clock.set(t, want)
				tasks := s.Ready()
				if len(tasks) != 1 || !tasks[0].Due.Equal(want) || !tasks[0].Started.Equal(want) {
					t.Fatalf("at %s: Ready() = %+v, want one task due then", want, tasks)
				}
				doneAll(t, s, tasks)
			}
		})
	}
}

func TestMissedOccurrencesAreCaughtUpOnce(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{
		{Name: "hourly", Repository: "r", Schedule: "@hourly", VMs: vms("a1")},
		{Name: "every", Repository: "r", Schedule: "@every 7m", VMs: vms("b1")},
		{Name: "nightly", Repository: "r", Schedule: "0 22 * * *", Window: &Window{Start: 22 * time.Hour, Duration: 2 * time.Hour}, VMs: vms("c1")},
	}, Limits{}, clock)

	// Asleep for three days: each job gets one run, due at its latest
	// occurrence; the nightly one's window has passed already.
	clock.set(t, at(3, 12, 30))
	tasks := s.Ready()
	equal(t, "started", ids(tasks), []string{"hourly/a1", "every/b1"})
	elapsed := at(3, 12, 30).Sub(t0)
	everyDue := t0.Add(elapsed / (7 * time.Minute) * 7 * time.Minute)
	for vm, want := range map[string]time.Time{"a1": at(3, 12, 0), "b1": everyDue} {
		if got := find(t, tasks, vm).Due; !got.Equal(want) {
			t.Errorf("%s due %s, want %s", vm, got, want)
		}
	}
	rep := oneReport(t, s)
	if rep.Job != "nightly" || !rep.Due.Equal(at(2, 22, 0)) {
		t.Errorf("report of %s due %s, want nightly due %s", rep.Job, rep.Due, at(2, 22, 0))
	}
	equal(t, "nightly", summary(rep), []string{"c1 not done 0 window closed"})
	if got, want := s.Next(), everyDue.Add(7*time.Minute); !got.Equal(want) {
		t.Errorf("Next() = %s, want %s", got, want)
	}
}

func TestOccurrenceWhileRunOpenIsSkipped(t *testing.T) {
	clock := &fakeClock{now: t0}
	s := newScheduler(t, []Job{{Name: "j", Repository: "r", Schedule: "@every 30m", VMs: vms("a1")}}, Limits{}, clock)
	clock.set(t, at(0, 12, 30))
	tasks := s.Ready()
	clock.set(t, at(0, 13, 0)) // next occurrence, the backup still runs
	if got := s.Ready(); len(got) != 0 {
		t.Fatalf("Ready() while the VM runs = %v", ids(got))
	}
	clock.set(t, at(0, 13, 15))
	doneAll(t, s, tasks)
	rep := oneReport(t, s)
	if rep.Skipped != 1 || !rep.Finished.Equal(at(0, 13, 15)) {
		t.Errorf("report: skipped %d finished %s, want 1 and 13:15", rep.Skipped, rep.Finished)
	}
	if got := s.Next(); !got.Equal(at(0, 13, 30)) {
		t.Errorf("Next() = %s, want 13:30", got)
	}
}

func TestWindowInstance(t *testing.T) {
	night := Window{Start: 22 * time.Hour, Duration: 8 * time.Hour}
	tests := []struct {
		name       string
		w          Window
		t          time.Time
		start, end time.Time
	}{
		{"before it opens", night, at(0, 21, 0), at(0, 22, 0), at(1, 6, 0)},
		{"as it opens", night, at(0, 22, 0), at(0, 22, 0), at(1, 6, 0)},
		{"inside before midnight", night, at(0, 23, 30), at(0, 22, 0), at(1, 6, 0)},
		{"inside after midnight", night, at(1, 3, 0), at(0, 22, 0), at(1, 6, 0)},
		{"as it closes", night, at(1, 6, 0), at(1, 22, 0), at(2, 6, 0)},
		{"all day", Window{Duration: 24 * time.Hour}, at(0, 0, 0), at(0, 0, 0), at(1, 0, 0)},
		{"all day, midday", Window{Duration: 24 * time.Hour}, t0, at(0, 0, 0), at(1, 0, 0)},
		{"short, after it", Window{Start: time.Hour, Duration: time.Hour}, at(0, 2, 0), at(1, 1, 0), at(1, 2, 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start, end := windowAt(tt.w, tt.t)
			if !start.Equal(tt.start) || !end.Equal(tt.end) {
				t.Errorf("windowAt(%s, %s) = %s..%s, want %s..%s", tt.w, tt.t, start, end, tt.start, tt.end)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	tests := []struct {
		name string
		p    RetryPolicy
		want []time.Duration
	}{
		{"defaults", RetryPolicy{}, []time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute,
			16 * time.Minute, 32 * time.Minute, time.Hour, time.Hour}},
		{"capped early", RetryPolicy{InitialDelay: 10 * time.Second, MaxDelay: 30 * time.Second},
			[]time.Duration{10 * time.Second, 20 * time.Second, 30 * time.Second, 30 * time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for i, want := range tt.want {
				if got := tt.p.Backoff(i + 1); got != want {
					t.Errorf("Backoff(%d) = %s, want %s", i+1, got, want)
				}
			}
			if got := tt.p.Backoff(1000); got != tt.p.withDefaults().MaxDelay {
				t.Errorf("Backoff(1000) = %s", got)
			}
		})
	}
}

func TestParseTimeOfDay(t *testing.T) {
	if d, err := ParseTimeOfDay("22:30"); err != nil || d != 22*time.Hour+30*time.Minute {
		t.Errorf("ParseTimeOfDay(22:30) = %s, %v", d, err)
	}
	if _, err := ParseTimeOfDay("25:00"); err == nil {
		t.Error("ParseTimeOfDay(25:00) succeeded")
	}
}

func TestSundayAsZero(t *testing.T) {
	for in, want := range map[string]string{
		"7": "0", "0": "0", "*": "*", "1-5": "1-5", "5-7": "5-6,0", "1-7/2": "1-6/2,0",
		"2-7/2": "2-6/2", "7-7": "0", "MON-FRI": "MON-FRI", "1,7": "1,0", "*/2": "*/2",
	} {
		if got := sundayAsZero(in); got != want {
			t.Errorf("sundayAsZero(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestNextAfter(t *testing.T) {
	at := time.Date(2026, 11, 25, 22, 30, 0, 0, time.UTC)
	for _, tc := range []struct {
		spec string
		want time.Time
	}{
		{"0 6 * * *", time.Date(2026, 11, 26, 6, 0, 0, 0, time.UTC)},
		{"@every 1h", at.Add(time.Hour)},
		{"@every 1d", at.Add(24 * time.Hour)},
		{"0 6 * * 7", time.Date(2026, 11, 29, 6, 0, 0, 0, time.UTC)},
	} {
		got, err := NextAfter(tc.spec, at)
		if err != nil || !got.Equal(tc.want) {
			t.Errorf("NextAfter(%q) = %s, %v; want %s", tc.spec, got, err, tc.want)
		}
	}
	if _, err := NextAfter("0 6 * *", at); err == nil {
		t.Error("a bad schedule gave no error")
	}
}
