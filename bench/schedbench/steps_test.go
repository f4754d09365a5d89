package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestLogFields(t *testing.T) {
	tests := []struct {
		line string
		want map[string]string
	}{
		{`time=2026-11-27T00:25:01.312Z level=DEBUG msg="overlay merge round" vm=g1 round=1`,
			map[string]string{"time": "2026-11-27T00:25:01.312Z", "level": "DEBUG", "msg": "overlay merge round", "vm": "g1", "round": "1"}},
		{`msg="a \"quoted\" = b" err=<nil>`, map[string]string{"msg": `a "quoted" = b`, "err": "<nil>"}},
		{`no fields here`, map[string]string{}},
		{``, map[string]string{}},
	}
	for _, tt := range tests {
		got := logFields(tt.line)
		if len(got) != len(tt.want) {
			t.Errorf("logFields(%q) = %v, want %v", tt.line, got, tt.want)
			continue
		}
		for k, v := range tt.want {
			if got[k] != v {
				t.Errorf("logFields(%q)[%q] = %q, want %q", tt.line, k, got[k], v)
			}
		}
	}
}

func TestParseSteps(t *testing.T) {
	log := `time=2026-11-27T00:25:01.000Z level=INFO msg="backup done" snapshot=1
time=2026-11-27T00:25:05.000Z level=DEBUG msg="overlay merge round" vm=g1 round=1 snapshot=500ms commits=3s committed=1 disks=1
time=2026-11-27T00:25:06.000Z level=DEBUG msg="overlay merge: active commit and pivot" vm=g1 disk=vdb took=250ms err=<nil>
`
	path := filepath.Join(t.TempDir(), "server.log")
	if err := os.WriteFile(path, []byte(log), 0o600); err != nil {
		t.Fatal(err)
	}
	at := func(s string) time.Time {
		x, err := time.Parse(time.RFC3339Nano, "2026-11-27T00:25:"+s+"Z")
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	want := []Step{
		{VM: "g1", Kind: stepSnapshot, From: at("01.5"), To: at("02")},
		{VM: "g1", Kind: stepCommit, From: at("02"), To: at("05")},
		{VM: "g1", Kind: stepActive, From: at("05.75"), To: at("06")},
	}
	got := parseSteps(path)
	if len(got) != len(want) {
		t.Fatalf("parseSteps = %v, want %v", got, want)
	}
	for i := range want {
		if got[i].VM != want[i].VM || got[i].Kind != want[i].Kind || !got[i].From.Equal(want[i].From) || !got[i].To.Equal(want[i].To) {
			t.Errorf("step %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	u := unionOf([]Step{{From: at("03"), To: at("04")}, {From: at("01"), To: at("03.5")}, {From: at("05"), To: at("06")}})
	if len(u) != 2 || !u[0].From.Equal(at("01")) || !u[0].To.Equal(at("04")) || !u[1].From.Equal(at("05")) {
		t.Errorf("unionOf = %+v, want [01–04, 05–06]", u)
	}
}

func TestStepStats(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC)
	sec := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	sample := func(s, ms float64) latSample {
		return latSample{at: sec(s), lat: time.Duration(ms * float64(time.Millisecond))}
	}
	guests := []GuestPhase{
		{Guest: "g1", series: []latSample{sample(0.5, 1), sample(1.5, 50), sample(2.5, 2), sample(4.5, 3)}},
		{Guest: "g2", series: []latSample{sample(1.2, 7), sample(3.5, 9), sample(4.2, 70)}},
	}
	steps := []Step{
		{VM: "g1", Kind: stepCommit, From: sec(1), To: sec(2)},
		{VM: "g2", Kind: stepCommit, From: sec(3), To: sec(4)},
		{VM: "g2", Kind: stepActive, From: sec(4), To: sec(5)},
	}
	got := stepStats(steps, guests, nil)
	if len(got) != 2 || got[0].Kind != stepCommit || got[1].Kind != stepActive {
		t.Fatalf("stepStats kinds = %+v, want the commit, then the active commit", got)
	}
	commit, active := got[0], got[1]
	// Commits: g1 during its own (50 ms at 1.5 s), g2 during its own (9 ms
	// at 3.5 s); every guest in either window: those and g2's 7 ms at 1.2 s.
	if commit.Count != 2 || commit.Seconds != 2 || commit.Own.N != 2 || commit.Own.Max != 50 || commit.All.N != 3 {
		t.Errorf("commits: %+v, want 2 steps of 2 s, own n=2 max 50, all n=3", commit)
	}
	// The active commit is g2's: g2's 70 ms is its own, g1's 3 ms is not.
	if active.Own.N != 1 || active.Own.Max != 70 || active.All.N != 2 || active.Device != nil {
		t.Errorf("active commit: %+v, want own n=1 max 70, all n=2, no device figures", active)
	}
}
