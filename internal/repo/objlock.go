package repo

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// Object lock: a repository created with a LockConfig lives on storage
// that locks objects (backend.Locker, S3 object lock). Every object the
// repository writes once is locked for LockConfig.Days from its writing;
// prune keeps every object a kept restore point needs locked at least
// Days − MaintenanceDays ahead (extendLocks), and frees what it removed
// only once its lock has ended (backend.Locker.Purge). Someone holding
// the repository's credentials, or its password, can hide objects
// (delete markers) and add versions, but not remove a locked version:
// the repository as it was before (an s3 location's as-of) stays
// readable for as long as the locks last.

// LockConfig is a repository's object lock, recorded in its config.
type LockConfig struct {
	// Mode is backend.LockCompliance or backend.LockGovernance.
	Mode string `json:"mode"`
	// Days is how long every object is locked from its writing, and how
	// far ahead prune moves the lock of what kept restore points need.
	Days int `json:"days"`
	// MaintenanceDays is the longest time between two prunes that the
	// repository's owner promises (the daemon's prune schedule): locks
	// end no earlier than a day after the next prune should have run.
	MaintenanceDays int `json:"maintenance_days"`
}

// DefaultMaintenanceDays is LockConfig.MaintenanceDays when not given.
const DefaultMaintenanceDays = 7

// Period is how long an object is locked from its writing.
func (c *LockConfig) Period() time.Duration { return time.Duration(c.Days) * 24 * time.Hour }

// Validate checks the lock's figures: a lock must outlast the time
// between two prunes by a day at least, or an object a restore point
// needs could be unlocked before a prune moves its lock forward.
func (c *LockConfig) Validate() error {
	switch strings.ToUpper(c.Mode) {
	case backend.LockCompliance, backend.LockGovernance:
		c.Mode = strings.ToUpper(c.Mode)
	default:
		return fmt.Errorf("object lock mode %q: want compliance or governance", c.Mode)
	}
	if c.MaintenanceDays <= 0 {
		return fmt.Errorf("object lock: a maintenance interval of %d days: want at least 1 (the longest time between two prunes)", c.MaintenanceDays)
	}
	if c.Days-c.MaintenanceDays < 1 {
		return fmt.Errorf("object lock of %d days with prune every %d days leaves less than a day of margin: lock for at least %d days, or prune more often", c.Days, c.MaintenanceDays, c.MaintenanceDays+1)
	}
	if c.Days > 36500 {
		return fmt.Errorf("object lock of %d days: at most 36500", c.Days)
	}
	return nil
}

// ObjectLock returns the repository's object lock, or nil.
func (r *Repo) ObjectLock() *LockConfig { return r.cfg.Lock }

// applyLock makes be lock what the repository writes from now on, as
// cfg says. It reports false when cfg asks for a lock that be cannot
// give (a locked repository's objects copied to a directory): reading
// works, and SetLogger warns that what is written is not locked.
func applyLock(be backend.Backend, cfg Config) bool {
	if cfg.Lock == nil {
		return true
	}
	l, ok := backend.Find[backend.Locker](be)
	if !ok {
		return false
	}
	l.SetRetention(cfg.Lock.Mode, cfg.Lock.Period())
	return true
}

// LockResult says what a prune did for a locked repository.
type LockResult struct {
	// Extended objects had their lock moved forward to ExtendedUntil.
	Extended      int       `json:"extended"`
	ExtendedUntil time.Time `json:"extended_until,omitempty"`
	// Purged versions of removed objects, and their bytes, now deleted.
	Purged      int   `json:"purged"`
	PurgedBytes int64 `json:"purged_bytes"`
	// Waiting versions of removed objects stay locked until WaitingUntil;
	// a later prune deletes them.
	Waiting      int       `json:"waiting"`
	WaitingBytes int64     `json:"waiting_bytes"`
	WaitingUntil time.Time `json:"waiting_until,omitempty"`
	// Hidden objects the repository needs and Overwritten ones: signs that
	// someone deleted or replaced objects (see docs/S3.md, recovery).
	Hidden      []string `json:"hidden,omitempty"`
	Overwritten []string `json:"overwritten,omitempty"`
}

// extendConcurrency is how many retention updates are in flight.
const extendConcurrency = 16

// maintainLocks is prune's last step on a locked repository: it moves
// the lock of every object the repository needs forward, then purges the
// locked versions of removed objects whose lock has ended.
func (r *Repo) maintainLocks(ctx context.Context) (*LockResult, error) {
	lc := r.cfg.Lock
	l, ok := backend.Find[backend.Locker](r.be)
	if lc == nil || !ok {
		return nil, nil
	}
	needed, err := r.neededObjects(ctx)
	if err != nil {
		return nil, err
	}
	res := &LockResult{}
	now := time.Now()
	until := now.Add(lc.Period()).UTC().Truncate(time.Second)
	// An object whose lock (as written: the storage does not list when a
	// lock was moved) ends before the threshold moves to until. The
	// threshold keeps every needed object locked past the next prune by
	// a day at least, and for Days − MaintenanceDays ahead when the lock
	// is long: between prunes, at least max(1 day, Days − 2 ×
	// MaintenanceDays) remain, the time to notice an attack.
	day := 24 * time.Hour
	maint := time.Duration(lc.MaintenanceDays) * day
	threshold := now.Add(max(maint+day, lc.Period()-maint))
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(extendConcurrency)
	for name, mod := range needed {
		if mod.IsZero() || mod.Add(lc.Period()).After(threshold) {
			continue // hidden (Purge reports it), or locked long enough
		}
		g.Go(func() error {
			if err := l.ExtendRetention(gctx, name, until); err != nil {
				if errors.Is(err, backend.ErrNotFound) {
					return nil // removed meanwhile (a finished pending deletion)
				}
				return fmt.Errorf("moving the object lock of %s forward: %w", name, err)
			}
			mu.Lock()
			res.Extended++
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	if res.Extended > 0 {
		res.ExtendedUntil = until
	}
	pr, err := l.Purge(ctx, func(name string) bool { _, ok := needed[name]; return ok })
	res.Purged, res.PurgedBytes = pr.Deleted, pr.DeletedBytes
	res.Waiting, res.WaitingBytes, res.WaitingUntil = pr.Locked, pr.LockedBytes, pr.LockedUntil
	res.Hidden, res.Overwritten = pr.Hidden, pr.Overwritten
	if err != nil {
		return res, fmt.Errorf("deleting removed objects whose lock has ended: %w", err)
	}
	for _, n := range res.Hidden {
		r.log.Warn("an object the repository needs is hidden by a delete marker: someone deleted it; its locked version is still there (docs/S3.md, recovery)", "object", n)
	}
	for _, n := range res.Overwritten {
		r.log.Warn("an object was overwritten, which kura never does: its earlier, locked version is kept (docs/S3.md, recovery)", "object", n)
	}
	return res, nil
}

// neededObjects lists, with their modification times, the objects kept
// restore points need: the config, the key files, the snapshots, the
// index files and every pack an index file lists (after the sweep, the
// packs that hold live data or wait for a pending deletion's end).
func (r *Repo) neededObjects(ctx context.Context) (map[string]time.Time, error) {
	needed := map[string]time.Time{}
	for _, prefix := range []string{"config", "keys/", "snapshots/", "index/", "data/"} {
		if err := r.be.List(ctx, prefix, func(oi backend.ObjectInfo) error {
			if prefix == "config" && oi.Name != "config" {
				return nil
			}
			needed[oi.Name] = oi.ModTime
			return nil
		}); err != nil {
			return nil, err
		}
	}
	if err := r.reloadIndex(ctx); err != nil {
		return nil, err
	}
	indexed := map[string]bool{}
	r.idx.EachCopy(func(_ crypt.ID, l Loc, _ bool) {
		indexed[packName(l.Pack)] = true
	})
	for name := range needed {
		if strings.HasPrefix(name, "data/") && !indexed[name] {
			delete(needed, name) // a leftover no index lists: not needed
		}
	}
	// Indexed packs that no listing shows are hidden (or lost): they are
	// needed, so that Purge reports them instead of deleting them.
	for name := range indexed {
		if _, ok := needed[name]; !ok {
			needed[name] = time.Time{}
		}
	}
	return needed, nil
}
