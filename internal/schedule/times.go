package schedule

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
)

// parseSchedule parses a job's cron expression: what cron.ParseStandard
// takes, plus 7 for Sunday in the day-of-week field and days ("7d", "1d12h")
// in @every.
func parseSchedule(spec string) (cron.Schedule, error) {
	s := strings.TrimSpace(spec)
	if rest, ok := strings.CutPrefix(s, "@every "); ok {
		d, err := parseEvery(strings.TrimSpace(rest))
		if err != nil {
			return nil, err
		}
		return cron.Every(d), nil
	}
	var tz string
	if strings.HasPrefix(s, "TZ=") || strings.HasPrefix(s, "CRON_TZ=") {
		tz, s, _ = strings.Cut(s, " ")
		tz += " "
	}
	if f := strings.Fields(s); len(f) == 5 {
		f[4] = sundayAsZero(f[4])
		s = strings.Join(f, " ")
	}
	return cron.ParseStandard(tz + s)
}

// parseEvery parses the duration of @every, which may start with days.
func parseEvery(s string) (time.Duration, error) {
	var days time.Duration
	if n, rest, ok := strings.Cut(s, "d"); ok {
		v, err := strconv.Atoi(n)
		if err != nil || v < 0 {
			return 0, fmt.Errorf("@every %q: bad number of days", s)
		}
		days, s = time.Duration(v)*24*time.Hour, rest
	}
	d := time.Duration(0)
	if s != "" {
		var err error
		if d, err = time.ParseDuration(s); err != nil {
			return 0, fmt.Errorf("@every: %v", err)
		}
	}
	if d += days; d < time.Second {
		return 0, fmt.Errorf("@every %s: shorter than a second", d)
	}
	return d, nil
}

// sundayAsZero rewrites a day-of-week field so that 7, which many crons take
// for Sunday, reads as 0.
func sundayAsZero(field string) string {
	parts := strings.Split(field, ",")
	for i, part := range parts {
		rng, step, hasStep := strings.Cut(part, "/")
		lo, hi, isRange := strings.Cut(rng, "-")
		switch {
		case !isRange && lo == "7" && !hasStep:
			parts[i] = "0"
		case isRange && hi == "7":
			a, err := strconv.Atoi(lo)
			n := 1
			if hasStep {
				n, _ = strconv.Atoi(step)
			}
			if err != nil || n <= 0 || a > 7 {
				continue // leave it to the parser to complain
			}
			var out []string
			if a <= 6 {
				out = append(out, lo+"-6"+strings.TrimPrefix(part, rng))
			}
			if (7-a)%n == 0 {
				out = append(out, "0")
			}
			parts[i] = strings.Join(out, ",")
		}
	}
	return strings.Join(parts, ",")
}

// latestDue returns the latest occurrence of sched that is not after now,
// given that first is an occurrence and not after now. It does not walk every
// occurrence in between, so a clock that jumps far ahead costs little.
func latestDue(sched cron.Schedule, first, now time.Time) time.Time {
	if c, ok := sched.(cron.ConstantDelaySchedule); ok {
		// @every: occurrences are first + k·Delay.
		return first.Add(now.Sub(first) / c.Delay * c.Delay)
	}
	last := first
	gap := now.Sub(first)
	// Find an occurrence close before now by looking back ever further.
	for d := time.Minute; d < gap; d *= 2 {
		if n := sched.Next(now.Add(-d)); !n.IsZero() && !n.After(now) {
			if n.After(last) {
				last = n
			}
			break
		}
	}
	for {
		n := sched.Next(last)
		if n.IsZero() || n.After(now) {
			return last
		}
		last = n
	}
}

// windowAt returns the instance of w that contains t, or if none does, the
// next one after t. Times of day are taken in t's location.
func windowAt(w Window, t time.Time) (start, end time.Time) {
	y, m, d := t.Date()
	midnight := time.Date(y, m, d, 0, 0, 0, 0, t.Location())
	for day := -1; ; day++ {
		start = midnight.AddDate(0, 0, day).Add(w.Start)
		end = start.Add(w.Duration)
		if end.After(t) {
			return start, end
		}
	}
}

// CheckSchedule reports whether spec is a schedule a Job accepts (a
// 5-field cron expression, a descriptor such as @daily, or @every
// DURATION), for validating configuration before a Scheduler exists.
func CheckSchedule(spec string) error {
	_, err := parseSchedule(spec)
	return err
}

// NextAfter returns the first occurrence of schedule spec (as a Job's
// Schedule reads it) after t, or the zero time if there is none; @every
// counts from t. It is for callers that keep their own occurrences, such
// as the daemon's copy jobs, which are not VM backups.
func NextAfter(spec string, t time.Time) (time.Time, error) {
	s, err := parseSchedule(spec)
	if err != nil {
		return time.Time{}, err
	}
	return s.Next(t), nil
}
