package repo

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/local"
)

// lockingDir is a local directory that plays a Locker: it records what
// the repository asks of the lock. It stands in for an S3 bucket with
// object lock in the tests of the repository's side of locking (which
// objects get extended, what Purge may delete); the S3 side is proven on
// real servers in internal/backend/s3 and cmd/kura.
type lockingDir struct {
	backend.Backend
	mu       sync.Mutex
	probed   []string
	mode     string
	period   time.Duration
	extended map[string]time.Time
	keep     func(string) bool
}

func (l *lockingDir) ProbeLock(_ context.Context, mode string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.probed = append(l.probed, mode)
	return nil
}

func (l *lockingDir) SetRetention(mode string, period time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.mode, l.period = mode, period
}

func (l *lockingDir) ExtendRetention(_ context.Context, name string, until time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.extended[name] = until
	return nil
}

func (l *lockingDir) Purge(_ context.Context, keep func(string) bool) (backend.PurgeResult, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.keep = keep
	return backend.PurgeResult{}, nil
}

func TestLockConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		lc   LockConfig
		want string // "" = valid
	}{
		{LockConfig{Mode: "compliance", Days: 30, MaintenanceDays: 7}, ""},
		{LockConfig{Mode: "GOVERNANCE", Days: 2, MaintenanceDays: 1}, ""},
		{LockConfig{Mode: "forever", Days: 30, MaintenanceDays: 7}, "want compliance or governance"},
		{LockConfig{Mode: "compliance", Days: 7, MaintenanceDays: 7}, "less than a day of margin: lock for at least 8 days"},
		{LockConfig{Mode: "compliance", Days: 1, MaintenanceDays: 0}, "want at least 1"},
		{LockConfig{Mode: "compliance", Days: 99999, MaintenanceDays: 1}, "at most"},
	} {
		err := tc.lc.Validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v, want %q", tc.lc, err, tc.want)
		}
	}
}

// TestPruneMaintainsLocks: on a locked repository prune moves forward the
// lock of exactly what kept restore points need and is older than the
// maintenance interval, and lets Purge delete only what they do not need.
func TestPruneMaintainsLocks(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	lb, err := local.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Init(ctx, lb, testPassword, InitOptions{ChunkSize: MinChunkSize, KDF: fastKDF(), Lock: &LockConfig{Mode: "compliance", Days: 3, MaintenanceDays: 1}}); err == nil || !strings.Contains(err.Error(), "cannot lock") {
		t.Fatalf("init with a lock on a plain directory: %v", err)
	}
	be := &lockingDir{Backend: lb, extended: map[string]time.Time{}}
	r, err := Init(ctx, be, testPassword, InitOptions{ChunkSize: MinChunkSize, PackSize: 256 << 10, KDF: fastKDF(), Lock: &LockConfig{Mode: "compliance", Days: 3, MaintenanceDays: 1}})
	if err != nil {
		t.Fatal(err)
	}
	if len(be.probed) != 1 || be.mode != "COMPLIANCE" || be.period != 72*time.Hour {
		t.Fatalf("init: probed %v, retention %s for %v", be.probed, be.mode, be.period)
	}
	open := func() *Repo {
		be.SetRetention("", 0)
		r, err := Open(ctx, be, testPassword)
		if err != nil {
			t.Fatal(err)
		}
		if be.period != 72*time.Hour || r.ObjectLock() == nil {
			t.Fatalf("open did not set the retention: %v", be.period)
		}
		return r
	}
	sa := storeChunks(t, r, "vm", randomChunks(30, 12, MinChunkSize))
	sb := storeChunks(t, open(), "vm", randomChunks(31, 12, MinChunkSize))

	// Everything so far was written two days ago.
	old := time.Now().Add(-48 * time.Hour)
	if err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			err = os.Chtimes(p, old, old)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	r2 := open()
	if err := r2.RemoveSnapshot(ctx, sa.ID); err != nil {
		t.Fatal(err)
	}
	// A restore point written now needs no extension yet.
	sc := storeChunks(t, r2, "vm", randomChunks(32, 4, MinChunkSize))
	res, err := r2.Prune(ctx, PruneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Lock == nil || res.Lock.Extended != len(be.extended) || res.Lock.Extended == 0 {
		t.Fatalf("prune of a locked repository: %+v / %d extended", res.Lock, len(be.extended))
	}
	for _, n := range []string{"config", "snapshots/" + sb.ID} {
		if _, ok := be.extended[n]; !ok {
			t.Errorf("%s: lock not extended", n)
		}
	}
	for n, until := range be.extended {
		if d := time.Until(until); d < 71*time.Hour || d > 73*time.Hour {
			t.Errorf("%s extended to %v from now, want the lock period", n, d)
		}
		if n == "snapshots/"+sa.ID || n == "snapshots/"+sc.ID {
			t.Errorf("%s extended", n)
		}
	}
	// Purge may delete the forgotten restore point and the packs only it
	// used, never what the others need.
	if be.keep == nil {
		t.Fatal("prune did not purge")
	}
	if be.keep("snapshots/"+sa.ID) || !be.keep("snapshots/"+sb.ID) || !be.keep("snapshots/"+sc.ID) || !be.keep("config") {
		t.Error("purge's keep is wrong about snapshots or the config")
	}
	r3 := open()
	if err := r3.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Snapshot{sb, sc} {
		m, err := r3.LoadMap(ctx, s.Disks[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range m.IDs() {
			l, ok := r3.Locate(id)
			if !ok {
				t.Fatalf("chunk %s lost", id.Short())
			}
			if !be.keep(packName(l.Pack)) {
				t.Errorf("purge may delete pack %s that restore point %s needs", l.Pack.Short(), s.ID[:8])
			}
		}
	}
	if res, err := r3.Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() {
		t.Fatalf("check after prune: %+v %v", res, err)
	}
}
