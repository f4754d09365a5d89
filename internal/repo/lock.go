package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// Lock kinds. Any number of backup and read locks coexist with each other
// and with one prune; a prune never deletes what a backup or read that was
// running when the prune marked its garbage may use (see gc.go).
const (
	LockBackup = "backup"
	LockRead   = "read"
	LockPrune  = "prune"
)

// Lock timing: a lock is refreshed every lockRefresh and considered stale
// (its process died) when not refreshed for lockStale, or at once when its
// process is gone from this host.
const (
	lockRefresh = time.Minute
	lockStale   = 10 * time.Minute
)

type lockInfo struct {
	Kind      string    `json:"kind"`
	Hostname  string    `json:"hostname"`
	PID       int       `json:"pid"`
	Created   time.Time `json:"created"`
	Refreshed time.Time `json:"refreshed"`
}

// unlockTimeout bounds Unlock's removal of the lock file, retries
// included; a lock left behind is stale after lockStale (or at once, on
// this host, when its process is gone).
const unlockTimeout = 10 * time.Second

// Lock is a held lock; Unlock releases it.
type Lock struct {
	r      *Repo
	name   string
	info   lockInfo
	stop   chan struct{}
	done   sync.WaitGroup
	unlock sync.Once
}

// Name returns the lock's object name.
func (l *Lock) Name() string { return l.name }

func (r *Repo) saveLock(ctx context.Context, name string, li lockInfo) error {
	data, _ := json.Marshal(li)
	sealed, err := r.sealObject(data)
	if err != nil {
		return err
	}
	return r.be.Save(ctx, name, sealed)
}

// Lock takes a lock of the given kind. Taking a prune lock fails with
// ErrLocked while another prune runs.
func (r *Repo) Lock(ctx context.Context, kind string) (*Lock, error) {
	host, _ := os.Hostname()
	now := time.Now().UTC()
	l := &Lock{r: r, name: "locks/" + crypt.RandomID().String(), info: lockInfo{Kind: kind, Hostname: host, PID: os.Getpid(), Created: now, Refreshed: now}, stop: make(chan struct{})}
	if err := r.saveLock(ctx, l.name, l.info); err != nil {
		if kind == LockRead && errors.Is(err, backend.ErrReadOnly) {
			// A read-only view (an s3 location's as-of) cannot hold a
			// lock, and needs none: nothing deletes its past versions
			// while their object lock lasts.
			l.name = ""
			return l, nil
		}
		return nil, fmt.Errorf("taking %s lock: %w", kind, err)
	}
	// Locks of processes of this host that died go now, not at the next
	// `kura unlock`: their lock files pile up otherwise, and a dead
	// backup's lock holds back prune's deletions.
	r.removeDeadLocalLocks(ctx, host)
	if kind == LockPrune {
		live, err := r.liveLocks(ctx)
		if err != nil {
			_ = r.be.Remove(ctx, l.name)
			return nil, err
		}
		for name, li := range live {
			if name != l.name && li.Kind == LockPrune {
				_ = r.be.Remove(ctx, l.name)
				return nil, fmt.Errorf("another prune (pid %d on %s, since %s) is running: %w; wait for it, or remove %s if that process is gone", li.PID, li.Hostname, li.Created.Local().Format(time.DateTime), ErrLocked, name)
			}
		}
	}
	l.done.Add(1)
	go l.refresh()
	return l, nil
}

func (l *Lock) refresh() {
	defer l.done.Done()
	t := time.NewTicker(lockRefresh)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			l.info.Refreshed = time.Now().UTC()
			ctx, cancel := context.WithTimeout(context.Background(), lockRefresh)
			_ = l.r.saveLock(ctx, l.name, l.info)
			cancel()
		}
	}
}

// Unlock releases the lock.
func (l *Lock) Unlock(ctx context.Context) error {
	var err error
	l.unlock.Do(func() {
		close(l.stop)
		l.done.Wait()
		if l.name == "" {
			return
		}
		// A short deadline of its own: a command that failed because the
		// storage is unreachable should not wait out the retry budget a
		// second time for its lock file, which goes stale by itself.
		ctx, cancel := context.WithTimeout(ctx, unlockTimeout)
		defer cancel()
		err = l.r.be.Remove(ctx, l.name)
		if errors.Is(err, backend.ErrNotFound) {
			err = nil
		}
	})
	return err
}

func (li lockInfo) stale(now time.Time) bool {
	if now.Sub(li.Refreshed) > lockStale {
		return true
	}
	if host, _ := os.Hostname(); host == li.Hostname && li.PID > 0 {
		if err := syscall.Kill(li.PID, 0); errors.Is(err, syscall.ESRCH) {
			return true
		}
	}
	return false
}

// liveLocks returns the locks whose holders are alive, by object name.
// Unreadable lock files are treated as live (safe for prune).
func (r *Repo) liveLocks(ctx context.Context) (map[string]lockInfo, error) {
	out := map[string]lockInfo{}
	now := time.Now()
	err := r.be.List(ctx, "locks/", func(oi backend.ObjectInfo) error {
		plain, err := r.loadObject(ctx, oi.Name)
		if errors.Is(err, backend.ErrNotFound) {
			return nil
		}
		var li lockInfo
		if err != nil || json.Unmarshal(plain, &li) != nil {
			li = lockInfo{Kind: "unreadable", Refreshed: oi.ModTime}
		}
		if !li.stale(now) {
			out[oi.Name] = li
		}
		return nil
	})
	return out, err
}

// removeDeadLocalLocks deletes the lock files of processes of this host
// (hostname host) that no longer run. It never removes a lock of another
// host, whose processes it cannot see, nor one it cannot read; those wait
// for their refresh to lapse (lockStale) or for `kura unlock`. It is best
// effort: a lock it fails to remove stays, as before.
func (r *Repo) removeDeadLocalLocks(ctx context.Context, host string) int {
	if host == "" {
		return 0
	}
	var dead []string
	_ = r.be.List(ctx, "locks/", func(oi backend.ObjectInfo) error {
		plain, err := r.loadObject(ctx, oi.Name)
		if err != nil {
			return nil
		}
		var li lockInfo
		if json.Unmarshal(plain, &li) != nil || li.Hostname != host || li.PID <= 0 || li.PID == os.Getpid() {
			return nil
		}
		if errors.Is(syscall.Kill(li.PID, 0), syscall.ESRCH) {
			dead = append(dead, oi.Name)
		}
		return nil
	})
	n := 0
	for _, name := range dead {
		if r.be.Remove(ctx, name) == nil {
			n++
		}
	}
	return n
}

// RemoveStaleLocks deletes lock files whose holders are gone and returns
// their names.
func (r *Repo) RemoveStaleLocks(ctx context.Context) ([]string, error) {
	live, err := r.liveLocks(ctx)
	if err != nil {
		return nil, err
	}
	var removed []string
	err = r.be.List(ctx, "locks/", func(oi backend.ObjectInfo) error {
		if _, ok := live[oi.Name]; !ok && strings.HasPrefix(oi.Name, "locks/") {
			if err := r.be.Remove(ctx, oi.Name); err == nil {
				removed = append(removed, oi.Name)
			}
		}
		return nil
	})
	return removed, err
}
