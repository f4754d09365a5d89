package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backend/s3"
	"github.com/kura-backup/kura/internal/repo"
)

// TestExitCodes runs the real binary into each cause of failure and
// checks the exit status that docs/EXIT-CODES.md gives for it.
func TestExitCodes(t *testing.T) {
	e := newEnv(t)
	e.ok("init")
	img := filepath.Join(e.dir, "vm1.raw")
	makeImage(t, img, 8<<20, 21, 6)
	e.ok("backup", "image", img, "--name", "vm1")
	snap := e.snapshots()[0].ID

	empty := t.TempDir()
	wrongPw := *e
	wrongPw.pw = "not the password"

	cases := []struct {
		name string
		env  *env
		args []string
		code int
	}{
		{"success", e, []string{"snapshots"}, exitOK},
		{"no such restore point", e, []string{"restore", "deadbeef", "--to", filepath.Join(e.dir, "r1")}, exitError},
		{"unknown command", e, []string{"bogus"}, exitUsage},
		{"unknown flag", e, []string{"snapshots", "--bogus"}, exitUsage},
		{"missing argument", e, []string{"restore"}, exitUsage},
		{"flag out of range", e, []string{"restore", snap, "--workers", "0"}, exitUsage},
		{"empty directory as repository", e, []string{"--repo", empty, "snapshots"}, exitNoRepo},
		{"missing directory as repository", e, []string{"--repo", filepath.Join(empty, "none"), "snapshots"}, exitNoRepo},
		{"wrong password", &wrongPw, []string{"snapshots"}, exitBadPassword},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := c.env.run(c.args...)
			if r.code != c.code {
				t.Fatalf("kura %v: exit %d, want %d\n%s%s", c.args, r.code, c.code, r.stdout, r.stderr)
			}
		})
	}

	t.Run("locked", func(t *testing.T) {
		// This process holds a prune lock; it is alive, so kura's prune
		// must not take it for a dead one.
		ctx := context.Background()
		be, err := local.Open(e.repo)
		if err != nil {
			t.Fatal(err)
		}
		r, err := repo.Open(ctx, be, []byte(e.pw))
		if err != nil {
			t.Fatal(err)
		}
		l, err := r.Lock(ctx, repo.LockPrune)
		if err != nil {
			t.Fatal(err)
		}
		res := e.fails("another prune", "prune")
		if res.code != exitLocked {
			t.Fatalf("prune under a held lock: exit %d, want %d\n%s", res.code, exitLocked, res.stderr)
		}
		if err := l.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("restored with damage", func(t *testing.T) {
		damage(t, e.objects("data")[0], "damaged", 200)
		r := e.run("restore", snap, "--to", filepath.Join(e.dir, "r2"), "--ignore-damage")
		if r.code != exitPartial {
			t.Fatalf("restore --ignore-damage: exit %d, want %d\n%s%s", r.code, exitPartial, r.stdout, r.stderr)
		}
		// Without --ignore-damage the same restore fails: a plain error.
		r = e.run("restore", snap, "--to", filepath.Join(e.dir, "r3"))
		if r.code != exitError {
			t.Fatalf("restore of damaged data: exit %d, want %d\n%s%s", r.code, exitError, r.stdout, r.stderr)
		}
	})
}

// TestExitInterrupted stops a backup slowed by --limit-upload with
// SIGINT, and with SIGTERM: both exit 130.
func TestExitInterrupted(t *testing.T) {
	e := newEnv(t)
	e.ok("init")
	img := filepath.Join(e.dir, "big.raw")
	makeImage(t, img, 32<<20, 22, 16)
	for _, sig := range []os.Signal{os.Interrupt, syscall.SIGTERM} {
		c := e.cmd("backup", "image", img, "--name", "big", "--limit-upload", "64KiB")
		var se bytes.Buffer
		c.Stderr = &se
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second) // past the setup of the signal handlers
		if err := c.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		_ = c.Wait()
		if code := c.ProcessState.ExitCode(); code != exitInterrupted {
			t.Fatalf("backup stopped by %v: exit %d, want %d\n%s", sig, code, exitInterrupted, se.String())
		}
	}
}

// TestExitCodeMapping covers the causes the end-to-end test cannot
// produce cheaply (a missing S3 bucket), and the order of the causes.
func TestExitCodeMapping(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	bg := context.Background()
	for _, c := range []struct {
		ctx  context.Context
		err  error
		code int
	}{
		{bg, nil, exitOK},
		{bg, errors.New("flag needs an argument"), exitUsage},
		{bg, runError{errors.New("anything")}, exitError},
		{canceled, runError{fmt.Errorf("reading: %w", context.Canceled)}, exitInterrupted},
		{canceled, runError{restoredWithDamage{}}, exitInterrupted},
		{bg, runError{fmt.Errorf("open: %w", s3.ErrNoBucket)}, exitNoRepo},
		{bg, runError{fmt.Errorf("x: %w", repo.ErrLocked)}, exitLocked},
		{bg, runError{fmt.Errorf("x: %w", repo.ErrWrongPassword)}, exitBadPassword},
		{bg, runError{damageFound{2}}, exitPartial},
		{bg, runError{fmt.Errorf("restore point 1: %w", errBootFailed)}, exitPartial},
	} {
		if got := exitCode(c.ctx, c.err); got != c.code {
			t.Errorf("exitCode(%v): %d, want %d", c.err, got, c.code)
		}
	}
}
