package catalog

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func open(t *testing.T) (*SQLite, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "catalog.db")
	s, err := Open(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, p
}

func TestRunsAndResults(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	t0 := time.Date(2026, 11, 25, 22, 0, 0, 0, time.UTC)
	id, err := s.StartRun(ctx, Run{Job: "nightly", Due: t0, Started: t0.Add(time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range []VMResult{
		{RunID: id, VM: "web01", Datastore: "vda", Outcome: "succeeded", Attempts: 1, Snapshot: "abcd", Started: t0.Add(2 * time.Second), Ended: t0.Add(time.Minute), BytesRead: 100, BytesStored: 10, FreezeMs: 12.5},
		{RunID: id, VM: "db01", Datastore: "vda", Outcome: "failed", Attempts: 3, Reason: "retries exhausted: agent hung", Started: t0.Add(3 * time.Second)},
	} {
		if err := s.AddVMResult(ctx, v); err != nil {
			t.Fatalf("result %d: %v", i, err)
		}
	}
	if err := s.FinishRun(ctx, id, t0.Add(2*time.Minute), StatusPartial, "1 of 2 VMs backed up"); err != nil {
		t.Fatal(err)
	}
	if err := s.FinishRun(ctx, 999, t0, StatusFailed, ""); err == nil {
		t.Error("finishing an unknown run succeeded")
	}
	id2, _ := s.StartRun(ctx, Run{Job: "hourly", Manual: true, Due: t0.Add(time.Hour), Started: t0.Add(time.Hour)})
	s.AddVMResult(ctx, VMResult{RunID: id2, VM: "web01", Outcome: "succeeded", Started: t0.Add(time.Hour)})

	runs, err := s.Runs(ctx, RunFilter{})
	if err != nil || len(runs) != 2 || runs[0].ID != id2 || !runs[0].Manual || runs[0].Status != StatusRunning || !runs[0].Ended.IsZero() {
		t.Fatalf("runs: %+v %v", runs, err)
	}
	if r := runs[1]; r.Job != "nightly" || r.Status != StatusPartial || !r.Due.Equal(t0) || !r.Ended.Equal(t0.Add(2*time.Minute)) || r.Summary != "1 of 2 VMs backed up" {
		t.Fatalf("run 1: %+v", r)
	}
	if runs, _ := s.Runs(ctx, RunFilter{Job: "nightly"}); len(runs) != 1 {
		t.Fatalf("filter by job: %d runs", len(runs))
	}
	if runs, _ := s.Runs(ctx, RunFilter{Since: t0.Add(30 * time.Minute)}); len(runs) != 1 || runs[0].ID != id2 {
		t.Fatalf("filter by time: %+v", runs)
	}
	res, err := s.VMResults(ctx, id)
	if err != nil || len(res) != 2 || res[0].VM != "db01" || res[1].FreezeMs != 12.5 || res[1].Snapshot != "abcd" || res[0].Reason == "" {
		t.Fatalf("results: %+v %v", res, err)
	}
	last, err := s.LastSuccess(ctx)
	if err != nil || !last["web01"].Equal(t0.Add(time.Hour)) || !last["db01"].IsZero() {
		t.Fatalf("last success: %v %v", last, err)
	}
	// The daemon died during run id2: on restart it is marked interrupted.
	n, err := s.MarkInterrupted(ctx, t0.Add(3*time.Hour))
	if err != nil || n != 1 {
		t.Fatalf("MarkInterrupted: %d %v", n, err)
	}
	runs, _ = s.Runs(ctx, RunFilter{Job: "hourly"})
	if runs[0].Status != StatusInterrupted || runs[0].Summary == "" || runs[0].Ended.IsZero() {
		t.Fatalf("interrupted run: %+v", runs[0])
	}
}

func TestThrottleAndSnapshots(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	t0 := time.Date(2026, 11, 25, 22, 0, 0, 0, time.UTC)
	for i, a := range []string{"decrease+pause", "increase", "resume"} {
		if err := s.AddThrottleEvent(ctx, ThrottleEvent{Time: t0.Add(time.Duration(i) * time.Second), Datastore: "vda", Action: a, SignalMs: 30 - float64(i)*10}); err != nil {
			t.Fatal(err)
		}
	}
	ev, err := s.ThrottleEvents(ctx, t0.Add(time.Second))
	if err != nil || len(ev) != 2 || ev[0].Action != "increase" || ev[1].SignalMs != 10 {
		t.Fatalf("events: %+v %v", ev, err)
	}
	ss := []SnapshotInfo{{ID: "a", Name: "web01", Time: t0, Kind: "full", Mode: "app", Bytes: 5}, {ID: "b", Name: "web01", Time: t0.Add(time.Hour)}}
	if err := s.ReplaceSnapshots(ctx, "main", ss); err != nil {
		t.Fatal(err)
	}
	if err := s.ReplaceSnapshots(ctx, "main", ss[1:]); err != nil {
		t.Fatal(err)
	}
	got, err := s.Snapshots(ctx, "main")
	if err != nil || len(got) != 1 || got[0].ID != "b" || got[0].Repository != "main" {
		t.Fatalf("snapshots: %+v %v", got, err)
	}
}

// Reopening keeps the data and does not migrate again; a catalog from a
// newer kura or a damaged file gives an error that says what to do.
func TestSchemaAndDamage(t *testing.T) {
	ctx := context.Background()
	s, p := open(t)
	s.StartRun(ctx, Run{Job: "j", Started: time.Now()})
	s.Close()
	s2, err := Open(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if runs, _ := s2.Runs(ctx, RunFilter{}); len(runs) != 1 {
		t.Fatalf("after reopening: %d runs", len(runs))
	}
	s2.db.Exec("PRAGMA user_version = 99")
	s2.Close()
	if _, err := Open(ctx, p); !errors.Is(err, ErrNewerSchema) || !strings.Contains(err.Error(), "upgrade kura") {
		t.Fatalf("newer schema: %v", err)
	}

	bad := filepath.Join(t.TempDir(), "bad.db")
	os.WriteFile(bad, []byte(strings.Repeat("this is not a database ", 400)), 0o600)
	if _, err := Open(ctx, bad); !IsDamaged(err) || !strings.Contains(err.Error(), "move it away") {
		t.Fatalf("damaged file: %v", err)
	}
}

// Copy jobs' runs have their kind; Run finds one run by id.
func TestRunKinds(t *testing.T) {
	ctx := context.Background()
	s, _ := open(t)
	t0 := time.Date(2026, 11, 25, 22, 0, 0, 0, time.UTC)
	b, _ := s.StartRun(ctx, Run{Job: "nightly", Due: t0, Started: t0})
	c, err := s.StartRun(ctx, Run{Job: "offsite", Kind: KindCopy, Manual: true, Due: t0.Add(time.Hour), Started: t0.Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	s.AddVMResult(ctx, VMResult{RunID: c, VM: "web01", Outcome: OutcomeCopied, Snapshot: "abcd", BytesStored: 42})
	s.FinishRun(ctx, c, t0.Add(2*time.Hour), StatusSucceeded, "1 restore point copied")
	runs, err := s.Runs(ctx, RunFilter{})
	if err != nil || len(runs) != 2 || runs[0].Kind != KindCopy || runs[1].Kind != KindBackup {
		t.Fatalf("runs: %+v %v", runs, err)
	}
	r, err := s.Run(ctx, c)
	if err != nil || r.ID != c || r.Job != "offsite" || r.Kind != KindCopy || !r.Manual || r.Status != StatusSucceeded || !r.Ended.Equal(t0.Add(2*time.Hour)) {
		t.Fatalf("run %d: %+v %v", c, r, err)
	}
	if r, err := s.Run(ctx, b); err != nil || r.Kind != KindBackup || r.Status != StatusRunning {
		t.Fatalf("run %d: %+v %v", b, r, err)
	}
	if _, err := s.Run(ctx, 999); !errors.Is(err, ErrNoRun) {
		t.Fatalf("an unknown run: %v", err)
	}
	// A copy's restore point is not a VM's successful backup.
	if last, _ := s.LastSuccess(ctx); len(last) != 0 {
		t.Fatalf("last successes %v", last)
	}
}

// A catalog of the first schema version gets the kind column; its runs
// are backup runs.
func TestMigrateKind(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "catalog.db")
	db, err := sql.Open("sqlite", "file:"+p)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{migrations[0], "PRAGMA user_version = 1", "INSERT INTO runs (job, due, started, status) VALUES ('nightly', 1, 1, 'succeeded')"} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	s, err := Open(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	runs, err := s.Runs(ctx, RunFilter{})
	if err != nil || len(runs) != 1 || runs[0].Kind != KindBackup || runs[0].Job != "nightly" {
		t.Fatalf("runs after the migration: %+v %v", runs, err)
	}
}
