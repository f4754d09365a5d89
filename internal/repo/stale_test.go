package repo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/crypt"
)

// exitedPID returns the pid of a process that has exited.
func exitedPID(t *testing.T) int {
	t.Helper()
	c := exec.Command("true")
	if err := c.Run(); err != nil {
		t.Fatal(err)
	}
	return c.Process.Pid
}

// Taking a lock clears the locks of this host's processes that died, and
// only those (issue 23: they piled up until `kura unlock`).
func TestLockClearsDeadLocalLocks(t *testing.T) {
	r, dir := newRepo(t)
	ctx := context.Background()
	host, _ := os.Hostname()
	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	now := time.Now().UTC()
	dead := exitedPID(t)
	locks := []struct {
		host string
		pid  int
		gone bool
	}{
		{host, dead, true},                 // this host, process gone
		{host, sleeper.Process.Pid, false}, // this host, alive
		{"another-host", dead, false},      // another host: its processes cannot be seen
		{host + ".example", dead, false},   // not quite this host
		{host, os.Getpid(), false},         // this very process
	}
	names := make([]string, len(locks))
	for i, l := range locks {
		names[i] = "locks/" + crypt.RandomID().String()
		if err := r.saveLock(ctx, names[i], lockInfo{Kind: LockBackup, Hostname: l.host, PID: l.pid, Created: now, Refreshed: now}); err != nil {
			t.Fatal(err)
		}
	}
	unreadable := filepath.Join(dir, "locks", "garbage")
	os.WriteFile(unreadable, []byte("not a lock"), 0o600)

	lock, err := r.Lock(ctx, LockRead) // as verify takes it
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Unlock(ctx)
	for i, l := range locks {
		_, err := os.Stat(filepath.Join(dir, filepath.FromSlash(names[i])))
		if gone := errors.Is(err, fs.ErrNotExist); gone != l.gone {
			t.Errorf("lock of pid %d on %s: removed %v, want %v", l.pid, l.host, gone, l.gone)
		}
	}
	if _, err := os.Stat(unreadable); err != nil {
		t.Errorf("an unreadable lock was removed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, filepath.FromSlash(lock.Name()))); err != nil {
		t.Errorf("the new lock is missing: %v", err)
	}
}

// Prune removes the temporary files that a killed writer of this host
// left, and says so; it leaves a live writer's alone.
func TestPruneRemovesDeadWritersTempFiles(t *testing.T) {
	r, dir := newRepo(t)
	ctx := context.Background()
	storeChunks(t, r, "vm", randomChunks(1, 4, MinChunkSize))
	host, _ := os.Hostname()
	h := sha256.Sum256([]byte(host))
	tag := hex.EncodeToString(h[:4])
	if err := os.MkdirAll(filepath.Join(dir, "data", "00"), 0o700); err != nil {
		t.Fatal(err)
	}
	deadTmp := filepath.Join(dir, "data", "00", fmt.Sprintf(".tmp-%s-%d-0123abcd", tag, exitedPID(t)))
	liveTmp := filepath.Join(dir, "data", "00", fmt.Sprintf(".tmp-%s-%d-4567abcd", tag, os.Getpid()))
	os.WriteFile(deadTmp, make([]byte, 25<<10), 0o600)
	os.WriteFile(liveTmp, make([]byte, 13<<10), 0o600)

	dry, err := reopen(t, dir).Prune(ctx, PruneOptions{DryRun: true})
	if err != nil || dry.TempRemoved != 0 {
		t.Fatalf("dry run: %+v %v; want nothing removed", dry, err)
	}
	res, err := reopen(t, dir).Prune(ctx, PruneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.TempRemoved != 1 || res.TempBytes != 25<<10 {
		t.Errorf("prune: removed %d temporary files, %d bytes; want 1, %d", res.TempRemoved, res.TempBytes, 25<<10)
	}
	if _, err := os.Stat(deadTmp); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the dead writer's temporary file is still there: %v", err)
	}
	if _, err := os.Stat(liveTmp); err != nil {
		t.Errorf("the live writer's temporary file was removed: %v", err)
	}
	if res, err := reopen(t, dir).Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() {
		t.Fatalf("check after prune: %+v %v", res, err)
	}
}
