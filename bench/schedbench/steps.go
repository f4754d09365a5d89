package main

import (
	"sort"
	"strconv"
	"strings"
	"time"
)

// A Step is one timed part of a VM's backup that the server logged at
// debug level (the benchmark runs it with -v): the overlay method's merges.
type Step struct {
	VM   string    `json:"vm"`
	Kind string    `json:"kind"`
	From time.Time `json:"from"`
	To   time.Time `json:"to"`
}

// The kinds of Step, in the order they happen.
const (
	stepSnapshot = "new overlay (snapshot)"
	stepCommit   = "commit of the overlay below"
	stepActive   = "active commit and pivot"
)

var stepKinds = []string{stepSnapshot, stepCommit, stepActive}

// StepStats is the guests' latency and the device's load while steps of
// one kind ran (the union of their windows).
type StepStats struct {
	Kind    string  `json:"kind"`
	Count   int     `json:"count"`
	Seconds float64 `json:"seconds"` // the union of the windows
	// Own: each guest's I/Os during its own VM's steps; All: every
	// guest's I/Os during any VM's step.
	Own    Dist          `json:"own_ms"`
	All    Dist          `json:"all_ms"`
	Device *DeviceWindow `json:"device,omitempty"`
}

// parseSteps reads the merge steps from a server log in slog's text
// format; a step's window ends at its line's time.
func parseSteps(path string) []Step {
	var out []Step
	scanLog(path, func(line string) {
		kv := logFields(line)
		at, err := time.Parse(time.RFC3339Nano, kv["time"])
		if err != nil || kv["vm"] == "" {
			return
		}
		dur := func(k string) time.Duration {
			d, _ := time.ParseDuration(kv[k])
			return d
		}
		switch kv["msg"] {
		case "overlay merge round":
			commits := dur("commits")
			out = append(out,
				Step{VM: kv["vm"], Kind: stepSnapshot, From: at.Add(-commits - dur("snapshot")), To: at.Add(-commits)},
				Step{VM: kv["vm"], Kind: stepCommit, From: at.Add(-commits), To: at})
		case "overlay merge: active commit and pivot":
			out = append(out, Step{VM: kv["vm"], Kind: stepActive, From: at.Add(-dur("took")), To: at})
		}
	})
	return out
}

// logFields splits a line of slog's text format into its keys and values.
func logFields(line string) map[string]string {
	kv := map[string]string{}
	for line != "" {
		line = strings.TrimLeft(line, " ")
		eq := strings.IndexByte(line, '=')
		if eq < 0 {
			break
		}
		k, rest := line[:eq], line[eq+1:]
		var v string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				break
			}
			v, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else if sp := strings.IndexByte(rest, ' '); sp >= 0 {
			v, rest = rest[:sp], rest[sp:]
		} else {
			v, rest = rest, ""
		}
		kv[k] = v
		line = rest
	}
	return kv
}

// stepStats sums up the guests' I/Os and the device's requests per kind
// of step.
func stepStats(steps []Step, guests []GuestPhase, ds store) []StepStats {
	var out []StepStats
	for _, kind := range stepKinds {
		var ws []Step
		for _, s := range steps {
			if s.Kind == kind && s.To.After(s.From) {
				ws = append(ws, s)
			}
		}
		if len(ws) == 0 {
			continue
		}
		st := StepStats{Kind: kind, Count: len(ws)}
		union := unionOf(ws)
		for _, u := range union {
			st.Seconds += u.To.Sub(u.From).Seconds()
		}
		var own, all []float64
		for _, g := range guests {
			for _, x := range g.series {
				ms := x.lat.Seconds() * 1000
				if in(union, x.at) {
					all = append(all, ms)
				}
				for _, s := range ws {
					if s.VM == g.Guest && !x.at.Before(s.From) && !x.at.After(s.To) {
						own = append(own, ms)
						break
					}
				}
			}
		}
		st.Own, st.All = dist(own), dist(all)
		st.Device = deviceWindows(ds, union)
		out = append(out, st)
	}
	return out
}

// unionOf merges overlapping windows, sorted by start.
func unionOf(ws []Step) []Step {
	s := append([]Step(nil), ws...)
	sort.Slice(s, func(i, j int) bool { return s[i].From.Before(s[j].From) })
	var out []Step
	for _, w := range s {
		if n := len(out); n > 0 && !w.From.After(out[n-1].To) {
			if w.To.After(out[n-1].To) {
				out[n-1].To = w.To
			}
			continue
		}
		out = append(out, Step{From: w.From, To: w.To})
	}
	return out
}

func in(ws []Step, t time.Time) bool {
	for _, w := range ws {
		if !t.Before(w.From) && !t.After(w.To) {
			return true
		}
	}
	return false
}
