// Package catalog keeps the kura daemon's history: the runs of each job
// (backup jobs and copy jobs), the result of each VM's backup or of each
// restore point's copy, throttle decisions, and a cache of the
// repositories' snapshot lists. The repositories stay the source of truth:
// deleting the catalog loses history, never a restore point.
//
// Store is the interface the daemon and the CLI use; Open gives the
// embedded SQLite implementation (pure Go, no cgo). Its schema is
// versioned: Open applies the migrations a file has not seen yet, in
// order, each in a transaction. Another implementation (PostgreSQL, for
// several kura servers) can stand behind the same interface.
package catalog

import (
	"context"
	"errors"
	"time"
)

// Run statuses.
const (
	StatusRunning     = "running"
	StatusSucceeded   = "succeeded"   // every VM backed up
	StatusPartial     = "partial"     // some VMs failed or were left
	StatusFailed      = "failed"      // no VM backed up
	StatusInterrupted = "interrupted" // the daemon stopped while it ran
)

// Run kinds.
const (
	KindBackup = "backup" // a backup job's run: VM backups
	KindCopy   = "copy"   // a copy job's run: restore points copied to another repository
)

// Run is one run of a job.
type Run struct {
	ID      int64
	Job     string
	Kind    string // KindBackup (the default) or KindCopy
	Manual  bool   // started with run-now
	Due     time.Time
	Started time.Time
	Ended   time.Time // zero while running
	Status  string
	Summary string // e.g. "3 of 4 VMs backed up; db01: retries exhausted: …"
}

// Outcomes of a copy run's restore points (VMResult.Outcome).
const (
	OutcomeCopied    = "copied"    // copied to the target
	OutcomeNotCopied = "failed"    // not copied: Reason says why
	OutcomeForgotten = "forgotten" // forgotten in the target by the copy job's retention
)

// VMResult is one VM's outcome in a run. In a copy run it is one restore
// point's: VM is its name, Outcome one of the Outcome* constants above,
// Snapshot its id in the target (in the source when not copied),
// BytesRead what was read from the source for it and BytesStored what
// was sent to the target.
type VMResult struct {
	RunID       int64
	VM          string
	Datastore   string
	Outcome     string // succeeded, failed, not-found, not-done
	Attempts    int
	Reason      string
	Snapshot    string // id of the restore point made
	Started     time.Time
	Ended       time.Time
	BytesRead   int64
	BytesStored int64
	FreezeMs    float64
}

// ThrottleEvent is one decision of latency control.
type ThrottleEvent struct {
	Time      time.Time
	Datastore string
	Action    string  // decrease, increase, pause, resume (joined with +)
	SignalMs  float64 // the latency that decided it
	Detail    string  // the new rates
}

// SnapshotInfo is the cached summary of one restore point.
type SnapshotInfo struct {
	Repository string
	ID         string
	Name       string
	Time       time.Time
	Kind, Mode string
	Bytes      int64
}

// RunFilter selects runs; zero fields select all.
type RunFilter struct {
	Job   string
	Since time.Time
	Limit int // newest first; 0 = 100
}

// Store is the catalog.
type Store interface {
	// StartRun records a run that begins and returns its id.
	StartRun(ctx context.Context, r Run) (int64, error)
	// FinishRun records how run id ended.
	FinishRun(ctx context.Context, id int64, ended time.Time, status, summary string) error
	// AddVMResult records one VM's outcome in a run.
	AddVMResult(ctx context.Context, v VMResult) error
	// MarkInterrupted ends every run still "running" (left by a daemon
	// that died) as interrupted, and returns how many.
	MarkInterrupted(ctx context.Context, now time.Time) (int, error)
	// Runs lists runs, newest first.
	Runs(ctx context.Context, f RunFilter) ([]Run, error)
	// Run returns run id; an error wrapping ErrNoRun if there is none.
	Run(ctx context.Context, id int64) (Run, error)
	// VMResults lists the outcomes of run id.
	VMResults(ctx context.Context, id int64) ([]VMResult, error)
	// LastSuccess returns, per VM, when its latest successful backup
	// started (the scheduler's restore point age).
	LastSuccess(ctx context.Context) (map[string]time.Time, error)
	// AddThrottleEvent records a latency control decision.
	AddThrottleEvent(ctx context.Context, e ThrottleEvent) error
	// ThrottleEvents lists decisions since a time, oldest first.
	ThrottleEvents(ctx context.Context, since time.Time) ([]ThrottleEvent, error)
	// ReplaceSnapshots replaces the cached snapshot list of a repository.
	ReplaceSnapshots(ctx context.Context, repository string, ss []SnapshotInfo) error
	// Snapshots returns the cached snapshot list of a repository.
	Snapshots(ctx context.Context, repository string) ([]SnapshotInfo, error)
	Close() error
}

// ErrNoRun is returned for a run the catalog does not have.
var ErrNoRun = errors.New("no such run")

// ErrNewerSchema is returned when the catalog was written by a newer kura.
var ErrNewerSchema = errors.New("the catalog was written by a newer kura")
