package catalog

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	_ "modernc.org/sqlite" // the pure-Go SQLite driver, registered as "sqlite"
)

// migrations are the schema's versions, in order: migrations[i] takes a
// catalog from version i to i+1. Never edit one that has shipped; add.
var migrations = []string{
	`CREATE TABLE runs (
		id       INTEGER PRIMARY KEY AUTOINCREMENT,
		job      TEXT NOT NULL,
		manual   INTEGER NOT NULL DEFAULT 0,
		due      INTEGER NOT NULL,
		started  INTEGER NOT NULL,
		ended    INTEGER NOT NULL DEFAULT 0,
		status   TEXT NOT NULL,
		summary  TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX runs_job ON runs (job, started);
	CREATE TABLE vm_results (
		run_id       INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
		vm           TEXT NOT NULL,
		datastore    TEXT NOT NULL DEFAULT '',
		outcome      TEXT NOT NULL,
		attempts     INTEGER NOT NULL DEFAULT 0,
		reason       TEXT NOT NULL DEFAULT '',
		snapshot     TEXT NOT NULL DEFAULT '',
		started      INTEGER NOT NULL DEFAULT 0,
		ended        INTEGER NOT NULL DEFAULT 0,
		bytes_read   INTEGER NOT NULL DEFAULT 0,
		bytes_stored INTEGER NOT NULL DEFAULT 0,
		freeze_ms    REAL NOT NULL DEFAULT 0
	);
	CREATE INDEX vm_results_run ON vm_results (run_id);
	CREATE INDEX vm_results_vm ON vm_results (vm, outcome, started);
	CREATE TABLE throttle_events (
		time      INTEGER NOT NULL,
		datastore TEXT NOT NULL,
		action    TEXT NOT NULL,
		signal_ms REAL NOT NULL,
		detail    TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX throttle_time ON throttle_events (time);
	CREATE TABLE snapshots (
		repository TEXT NOT NULL,
		id         TEXT NOT NULL,
		name       TEXT NOT NULL,
		time       INTEGER NOT NULL,
		kind       TEXT NOT NULL DEFAULT '',
		mode       TEXT NOT NULL DEFAULT '',
		bytes      INTEGER NOT NULL DEFAULT 0,
		PRIMARY KEY (repository, id)
	);`,
	// 2: runs of copy jobs beside those of backup jobs.
	`ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'backup';`,
}

// SQLite is the catalog in an SQLite file.
type SQLite struct {
	db   *sql.DB
	path string
}

// Open opens (creating it if needed) the catalog at path and brings its
// schema up to date.
func Open(ctx context.Context, path string) (*SQLite, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("catalog: %w", err)
	}
	dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("catalog %s: %w", path, err)
	}
	s := &SQLite{db: db, path: path}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

func (s *SQLite) migrate(ctx context.Context) error {
	var version int
	if err := s.db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return s.fail("reading the schema version", err)
	}
	if version > len(migrations) {
		return fmt.Errorf("catalog %s has schema version %d, this kura knows %d: %w; upgrade kura or move the file away (only history is lost)",
			s.path, version, len(migrations), ErrNewerSchema)
	}
	for v := version; v < len(migrations); v++ {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return s.fail("migrating", err)
		}
		if _, err := tx.ExecContext(ctx, migrations[v]); err != nil {
			tx.Rollback()
			return s.fail(fmt.Sprintf("migrating to schema version %d", v+1), err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", v+1)); err != nil {
			tx.Rollback()
			return s.fail("migrating", err)
		}
		if err := tx.Commit(); err != nil {
			return s.fail("migrating", err)
		}
	}
	return nil
}

// fail wraps a database error with what was being done and what to do.
func (s *SQLite) fail(doing string, err error) error {
	msg := err.Error()
	if strings.Contains(msg, "file is not a database") || strings.Contains(msg, "malformed") {
		return fmt.Errorf("catalog %s: %s: %w (the file is damaged: move it away; kura makes a new one and only history is lost)", s.path, doing, err)
	}
	return fmt.Errorf("catalog %s: %s: %w", s.path, doing, err)
}

func unix(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnix(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// StartRun implements Store.
func (s *SQLite) StartRun(ctx context.Context, r Run) (int64, error) {
	if r.Status == "" {
		r.Status = StatusRunning
	}
	if r.Kind == "" {
		r.Kind = KindBackup
	}
	res, err := s.db.ExecContext(ctx, "INSERT INTO runs (job, kind, manual, due, started, status, summary) VALUES (?, ?, ?, ?, ?, ?, ?)",
		r.Job, r.Kind, r.Manual, unix(r.Due), unix(r.Started), r.Status, r.Summary)
	if err != nil {
		return 0, s.fail("recording a run", err)
	}
	return res.LastInsertId()
}

// FinishRun implements Store.
func (s *SQLite) FinishRun(ctx context.Context, id int64, ended time.Time, status, summary string) error {
	res, err := s.db.ExecContext(ctx, "UPDATE runs SET ended = ?, status = ?, summary = ? WHERE id = ?", unix(ended), status, summary, id)
	if err != nil {
		return s.fail("finishing a run", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("catalog: no run %d", id)
	}
	return nil
}

// AddVMResult implements Store.
func (s *SQLite) AddVMResult(ctx context.Context, v VMResult) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO vm_results (run_id, vm, datastore, outcome, attempts, reason, snapshot, started, ended, bytes_read, bytes_stored, freeze_ms)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		v.RunID, v.VM, v.Datastore, v.Outcome, v.Attempts, v.Reason, v.Snapshot, unix(v.Started), unix(v.Ended), v.BytesRead, v.BytesStored, v.FreezeMs)
	if err != nil {
		return s.fail("recording a VM's result", err)
	}
	return nil
}

// MarkInterrupted implements Store.
func (s *SQLite) MarkInterrupted(ctx context.Context, now time.Time) (int, error) {
	res, err := s.db.ExecContext(ctx, "UPDATE runs SET status = ?, ended = ?, summary = CASE WHEN summary = '' THEN 'the daemon stopped during the run' ELSE summary END WHERE status = ?",
		StatusInterrupted, unix(now), StatusRunning)
	if err != nil {
		return 0, s.fail("marking interrupted runs", err)
	}
	n, _ := res.RowsAffected()
	return int(n), nil
}

// Runs implements Store.
func (s *SQLite) Runs(ctx context.Context, f RunFilter) ([]Run, error) {
	if f.Limit <= 0 {
		f.Limit = 100
	}
	q := "SELECT " + runColumns + " FROM runs WHERE started >= ?"
	args := []any{unix(f.Since)}
	if f.Job != "" {
		q += " AND job = ?"
		args = append(args, f.Job)
	}
	q += " ORDER BY started DESC, id DESC LIMIT ?"
	args = append(args, f.Limit)
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, s.fail("listing runs", err)
	}
	defer rows.Close()
	var out []Run
	for rows.Next() {
		r, err := scanRun(rows)
		if err != nil {
			return nil, s.fail("listing runs", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

const runColumns = "id, job, kind, manual, due, started, ended, status, summary"

// scanRun reads the runColumns of one row.
func scanRun(row interface{ Scan(...any) error }) (Run, error) {
	var r Run
	var due, started, ended int64
	if err := row.Scan(&r.ID, &r.Job, &r.Kind, &r.Manual, &due, &started, &ended, &r.Status, &r.Summary); err != nil {
		return Run{}, err
	}
	r.Due, r.Started, r.Ended = fromUnix(due), fromUnix(started), fromUnix(ended)
	return r, nil
}

// Run implements Store.
func (s *SQLite) Run(ctx context.Context, id int64) (Run, error) {
	r, err := scanRun(s.db.QueryRowContext(ctx, "SELECT "+runColumns+" FROM runs WHERE id = ?", id))
	if errors.Is(err, sql.ErrNoRows) {
		return Run{}, fmt.Errorf("catalog: run %d: %w", id, ErrNoRun)
	}
	if err != nil {
		return Run{}, s.fail("reading a run", err)
	}
	return r, nil
}

// VMResults implements Store.
func (s *SQLite) VMResults(ctx context.Context, id int64) ([]VMResult, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT run_id, vm, datastore, outcome, attempts, reason, snapshot, started, ended, bytes_read, bytes_stored, freeze_ms
		FROM vm_results WHERE run_id = ? ORDER BY vm`, id)
	if err != nil {
		return nil, s.fail("listing VM results", err)
	}
	defer rows.Close()
	var out []VMResult
	for rows.Next() {
		var v VMResult
		var started, ended int64
		if err := rows.Scan(&v.RunID, &v.VM, &v.Datastore, &v.Outcome, &v.Attempts, &v.Reason, &v.Snapshot, &started, &ended, &v.BytesRead, &v.BytesStored, &v.FreezeMs); err != nil {
			return nil, s.fail("listing VM results", err)
		}
		v.Started, v.Ended = fromUnix(started), fromUnix(ended)
		out = append(out, v)
	}
	return out, rows.Err()
}

// LastSuccess implements Store.
func (s *SQLite) LastSuccess(ctx context.Context) (map[string]time.Time, error) {
	rows, err := s.db.QueryContext(ctx, "SELECT vm, MAX(started) FROM vm_results WHERE outcome = 'succeeded' GROUP BY vm")
	if err != nil {
		return nil, s.fail("reading last successes", err)
	}
	defer rows.Close()
	out := map[string]time.Time{}
	for rows.Next() {
		var vm string
		var t int64
		if err := rows.Scan(&vm, &t); err != nil {
			return nil, s.fail("reading last successes", err)
		}
		out[vm] = fromUnix(t)
	}
	return out, rows.Err()
}

// AddThrottleEvent implements Store.
func (s *SQLite) AddThrottleEvent(ctx context.Context, e ThrottleEvent) error {
	_, err := s.db.ExecContext(ctx, "INSERT INTO throttle_events (time, datastore, action, signal_ms, detail) VALUES (?, ?, ?, ?, ?)",
		unix(e.Time), e.Datastore, e.Action, e.SignalMs, e.Detail)
	if err != nil {
		return s.fail("recording a throttle event", err)
	}
	return nil
}

// ThrottleEvents implements Store.
func (s *SQLite) ThrottleEvents(ctx context.Context, since time.Time) ([]ThrottleEvent, error) {
	rows, err := s.db.QueryContext(ctx, "SELECT time, datastore, action, signal_ms, detail FROM throttle_events WHERE time >= ? ORDER BY time", unix(since))
	if err != nil {
		return nil, s.fail("listing throttle events", err)
	}
	defer rows.Close()
	var out []ThrottleEvent
	for rows.Next() {
		var e ThrottleEvent
		var t int64
		if err := rows.Scan(&t, &e.Datastore, &e.Action, &e.SignalMs, &e.Detail); err != nil {
			return nil, s.fail("listing throttle events", err)
		}
		e.Time = fromUnix(t)
		out = append(out, e)
	}
	return out, rows.Err()
}

// ReplaceSnapshots implements Store.
func (s *SQLite) ReplaceSnapshots(ctx context.Context, repository string, ss []SnapshotInfo) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return s.fail("caching snapshots", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "DELETE FROM snapshots WHERE repository = ?", repository); err != nil {
		return s.fail("caching snapshots", err)
	}
	for _, x := range ss {
		if _, err := tx.ExecContext(ctx, "INSERT INTO snapshots (repository, id, name, time, kind, mode, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
			repository, x.ID, x.Name, unix(x.Time), x.Kind, x.Mode, x.Bytes); err != nil {
			return s.fail("caching snapshots", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return s.fail("caching snapshots", err)
	}
	return nil
}

// Snapshots implements Store.
func (s *SQLite) Snapshots(ctx context.Context, repository string) ([]SnapshotInfo, error) {
	rows, err := s.db.QueryContext(ctx, "SELECT repository, id, name, time, kind, mode, bytes FROM snapshots WHERE repository = ? ORDER BY time", repository)
	if err != nil {
		return nil, s.fail("reading cached snapshots", err)
	}
	defer rows.Close()
	var out []SnapshotInfo
	for rows.Next() {
		var x SnapshotInfo
		var t int64
		if err := rows.Scan(&x.Repository, &x.ID, &x.Name, &t, &x.Kind, &x.Mode, &x.Bytes); err != nil {
			return nil, s.fail("reading cached snapshots", err)
		}
		x.Time = fromUnix(t)
		out = append(out, x)
	}
	return out, rows.Err()
}

// Close implements Store.
func (s *SQLite) Close() error { return s.db.Close() }

var _ Store = (*SQLite)(nil)

// IsDamaged reports whether err says the catalog file is damaged.
func IsDamaged(err error) bool {
	return err != nil && strings.Contains(err.Error(), "the file is damaged")
}
