package main

import (
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	if out, err := exec.Command("cp", "--sparse=always", from, to).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
}

// killAfter starts kura, SIGKILLs it after d, and reports whether it was
// still running then.
func (e *env) killAfter(d time.Duration, args ...string) bool {
	e.t.Helper()
	c := e.cmd(args...)
	if err := c.Start(); err != nil {
		e.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case <-done:
		return false
	case <-time.After(d):
		c.Process.Signal(syscall.SIGKILL)
		<-done
		return true
	}
}

// Kill -9 a backup and a prune at many points: afterwards verify
// --read-data passes, every older snapshot restores byte for byte, and the
// next backup succeeds.
func TestCrashSafety(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: kills many backups")
	}
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 256<<20, 21, 400)
	v1 := filepath.Join(e.dir, "v1.raw")
	copyFile(t, img, v1)
	e.ok("init", "--chunk-size", "256K")
	start := time.Now()
	e.ok("backup", "image", img, "--name", "vm")
	full := time.Since(start)

	// Change most of the disk so the next backup writes a lot.
	makeImage(t, img, 256<<20, 22, 400)
	v2 := filepath.Join(e.dir, "v2.raw")
	copyFile(t, img, v2)

	check := func(label string) {
		t.Helper()
		r := e.run("verify", "--read-data")
		if r.code != 0 {
			t.Fatalf("%s: verify failed:\n%s%s", label, r.stdout, r.stderr)
		}
		out := filepath.Join(t.TempDir(), "r")
		e.ok("restore", "vm@latest", "--to", out)
		got := filepath.Join(out, "disk.raw")
		// The latest complete snapshot is v1 or (after a completed backup) v2.
		a, _ := os.ReadFile(got)
		b1, _ := os.ReadFile(v1)
		b2, _ := os.ReadFile(v2)
		if string(a) != string(b1) && string(a) != string(b2) {
			t.Fatalf("%s: restored disk matches neither version", label)
		}
	}
	killed := 0
	for i, frac := range []float64{0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 1.2} {
		d := time.Duration(frac * float64(full))
		if e.killAfter(d, "backup", "image", img, "--name", "vm") {
			killed++
		}
		check(fmt.Sprintf("backup killed after %s (#%d)", d, i))
	}
	if killed < 3 {
		t.Fatalf("only %d of 7 backups were killed mid-way; the test proves little", killed)
	}
	// The next backup succeeds and restores.
	e.ok("backup", "image", img, "--name", "vm")
	out := filepath.Join(t.TempDir(), "after")
	e.ok("restore", "vm@latest", "--to", out)
	sameFile(t, filepath.Join(out, "disk.raw"), v2)

	// Now leave only the v2 snapshot and kill prunes.
	ss := e.snapshots()
	for _, s := range ss[:len(ss)-1] {
		e.ok("forget", s.ID)
	}
	start = time.Now()
	e.ok("prune", "--dry-run")
	for i, d := range []time.Duration{5, 20, 50, 100, 200, 400} {
		e.killAfter(d*time.Millisecond+time.Since(start)/50, "prune")
		r := e.run("verify", "--read-data")
		if r.code != 0 {
			t.Fatalf("prune killed (#%d): verify failed:\n%s%s", i, r.stdout, r.stderr)
		}
		o := filepath.Join(t.TempDir(), "p")
		e.ok("restore", "latest", "--to", o)
		sameFile(t, filepath.Join(o, "disk.raw"), v2)
	}
	e.ok("prune")
	e.ok("verify", "--read-data")
	e.ok("backup", "image", img, "--name", "vm")
}

// Many backups write to one repository at once while prune runs: nothing a
// live backup references is deleted, and every restore point that exists
// restores at once, right after each round, without another prune (a
// backup that reused a chunk of a pack the prune had just marked once made
// a restore point that could not be read until the next prune).
func TestConcurrentBackupsAndPrune(t *testing.T) {
	if testing.Short() {
		t.Skip("slow")
	}
	e := newEnv(t)
	e.ok("init", "--chunk-size", "128K")
	const vms, rounds = 3, 5
	latest := map[string]string{}
	var mu sync.Mutex
	for round := 0; round < rounds; round++ {
		var wg sync.WaitGroup
		errs := make(chan string, 16)
		for v := 0; v < vms; v++ {
			name := fmt.Sprintf("vm%d", v)
			img := filepath.Join(e.dir, fmt.Sprintf("%s-r%d.raw", name, round))
			// Half of each image is shared with the previous round's.
			makeImage(t, img, 48<<20, uint64(v*100+round), 60)
			if round > 0 {
				prev := filepath.Join(e.dir, fmt.Sprintf("%s-r%d.raw", name, round-1))
				data, _ := os.ReadFile(prev)
				f, _ := os.OpenFile(img, os.O_WRONLY, 0)
				f.WriteAt(data[:24<<20], 0)
				f.Close()
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := e.run("backup", "image", img, "--name", name)
				if r.code != 0 {
					errs <- r.stderr
					return
				}
				mu.Lock()
				latest[name] = img
				mu.Unlock()
			}()
		}
		// Prune concurrently with the backups, twice.
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2; i++ {
				r := e.run("forget", "--keep-last", "1", "--prune")
				if r.code != 0 && !strings.Contains(r.stderr, "another prune") {
					errs <- "forget --prune: " + r.stderr
				}
			}
		}()
		wg.Wait()
		close(errs)
		for msg := range errs {
			t.Fatal(msg)
		}
		// verify resolves chunks as restore does: both must pass now.
		e.ok("verify")
		for _, s := range e.snapshots() {
			out := filepath.Join(t.TempDir(), s.ID[:8])
			e.ok("restore", s.ID, "--to", out)
			disk := s.Disks[0].Name + ".raw"
			sameFile(t, filepath.Join(out, disk), filepath.Join(e.dir, disk))
		}
	}
	e.ok("prune")
	e.ok("verify", "--read-data")
	for name, img := range latest {
		out := filepath.Join(t.TempDir(), name)
		e.ok("restore", name+"@latest", "--to", out)
		sameFile(t, filepath.Join(out, strings.TrimSuffix(filepath.Base(img), ".raw")+".raw"), img)
	}
}

// A full repository disk: the backup fails with a clear error and the
// repository keeps every earlier snapshot.
func TestFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	e := newEnv(t)
	mnt := filepath.Join(e.dir, "small")
	os.MkdirAll(mnt, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	e.repo = filepath.Join(mnt, "repo")
	e.ok("init")
	small := filepath.Join(e.dir, "small.raw")
	makeImage(t, small, 8<<20, 31, 10)
	e.ok("backup", "image", small, "--name", "vm")

	big := filepath.Join(e.dir, "big.raw")
	f, _ := os.Create(big)
	buf := make([]byte, 64<<20)
	rand.Read(buf) // incompressible
	f.Write(buf)
	f.Close()
	e.fails("no space", "backup", "image", big, "--name", "vm")

	e.ok("verify", "--read-data")
	out := filepath.Join(e.dir, "out")
	e.ok("restore", "vm@latest", "--to", out)
	sameFile(t, filepath.Join(out, "small.raw"), small)
	// After pruning the partial data, a small backup fits again.
	e.ok("prune")
	e.ok("backup", "image", small, "--name", "vm")
}

// A full target disk: restore and file restore fail with a clear error and
// leave no partial image behind.
func TestRestoreTargetFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	e := newEnv(t)
	e.ok("init")
	img := filepath.Join(e.dir, "disk.raw")
	f, _ := os.Create(img)
	f.Truncate(32 << 20)
	buf := make([]byte, 12<<20)
	rand.Read(buf)
	f.WriteAt(buf, 4<<20)
	f.Close()
	e.ok("backup", "image", img, "--name", "vm")

	mnt := filepath.Join(e.dir, "small")
	os.MkdirAll(mnt, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	for _, format := range []string{"raw", "qcow2"} {
		e.fails("no space left", "restore", "vm@latest", "--to", mnt, "--format", format)
		if ents, _ := os.ReadDir(mnt); len(ents) != 0 {
			t.Errorf("%s: a failed restore left %d files in the target", format, len(ents))
		}
	}
	// The repository is untouched: a restore elsewhere works.
	out := filepath.Join(e.dir, "out")
	e.ok("restore", "vm@latest", "--to", out)
	sameFile(t, filepath.Join(out, "disk.raw"), img)
}
