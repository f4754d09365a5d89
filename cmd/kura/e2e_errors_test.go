package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Bad input: each case gives a one-line error that says what to do, exits
// non-zero, and leaves the repository as it was.
func TestBadInput(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 16<<20, 5, 10)
	e.ok("init")
	e.ok("backup", "image", img, "--name", "vm")
	restored := filepath.Join(e.dir, "ok")
	e.ok("restore", "latest", "--to", restored)
	sameFile(t, filepath.Join(restored, "disk.raw"), img)

	t.Run("wrong password", func(t *testing.T) {
		w := *e
		w.t, w.pw = t, "nope"
		w.fails("wrong password", "snapshots")
	})
	t.Run("no repository given", func(t *testing.T) {
		w := *e
		w.t, w.repo = t, ""
		w.fails("KURA_REPO", "snapshots")
	})
	t.Run("not a repository", func(t *testing.T) {
		w := *e
		w.t, w.repo = t, t.TempDir()
		w.fails("kura init", "snapshots")
	})
	t.Run("init twice", func(t *testing.T) {
		w := *e
		w.t = t
		w.fails("already exists", "init")
	})
	t.Run("missing image", func(t *testing.T) {
		w := *e
		w.t = t
		w.fails("nothing.raw", "backup", "image", filepath.Join(e.dir, "nothing.raw"))
	})
	t.Run("unreadable image", func(t *testing.T) {
		if os.Geteuid() == 0 {
			t.Skip("root reads every file")
		}
		p := filepath.Join(e.dir, "secret.raw")
		makeImage(t, p, 1<<20, 1, 1)
		os.Chmod(p, 0)
		w := *e
		w.t = t
		w.fails("permission denied", "backup", "image", p)
	})
	t.Run("unknown snapshot", func(t *testing.T) {
		w := *e
		w.t = t
		w.fails("kura snapshots", "restore", "nosuch@latest", "--to", t.TempDir())
	})
	t.Run("missing qemu-storage-daemon", func(t *testing.T) {
		if _, err := exec.LookPath("qemu-img"); err != nil {
			t.Skip("qemu-img not installed")
		}
		q := filepath.Join(e.dir, "d.qcow2")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", q, "16M").CombinedOutput(); err != nil {
			t.Fatal(err, string(out))
		}
		w := *e
		w.t = t
		w.path = t.TempDir() // an empty PATH
		w.fails("apt-get install qemu-utils", "backup", "image", q)
	})
	// After every failure above, the repository is intact.
	e.ok("verify", "--read-data")
}

func corruptFirst(t *testing.T, dir string, f func([]byte) []byte) string {
	t.Helper()
	var target string
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && target == "" {
			target = p
		}
		return nil
	})
	if target == "" {
		t.Fatalf("no file under %s", dir)
	}
	data, err := os.ReadFile(target)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(target, f(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return target
}

func TestDamagedRepository(t *testing.T) {
	flip := func(b []byte) []byte { b[len(b)/3] ^= 1; return b }
	truncate := func(b []byte) []byte { return b[:len(b)/2] }
	cases := []struct {
		name    string
		sub     string
		damage  func([]byte) []byte
		verify  string // what verify --read-data must say
		restore string // what restore must say ("" = restore still works)
	}{
		{"bit flip in a pack", "data", flip, "affects snapshots", "damaged"},
		{"truncated pack", "data", truncate, "truncated", "damaged"},
		{"bit flip in the index", "index", flip, "index/", ""}, // read from the pack headers instead
		{"truncated snapshot", "snapshots", truncate, "snapshots/", "damaged"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			img := filepath.Join(e.dir, "disk.raw")
			makeImage(t, img, 8<<20, 11, 30)
			e.ok("init")
			e.ok("backup", "image", img, "--name", "vm")
			corruptFirst(t, filepath.Join(e.repo, tc.sub), tc.damage)
			r := e.run("verify", "--read-data")
			if r.code != 3 || !strings.Contains(r.stdout+r.stderr, tc.verify) {
				t.Fatalf("verify: exit %d, want 3 and %q\n%s%s", r.code, tc.verify, r.stdout, r.stderr)
			}
			if tc.restore == "" {
				out := t.TempDir()
				e.ok("restore", "latest", "--to", out)
				sameFile(t, filepath.Join(out, "disk.raw"), img)
				return
			}
			e.fails(tc.restore, "restore", "latest", "--to", t.TempDir())
		})
	}
}

// One damaged snapshot does not hide the others: they are still listed and
// restore, and the damaged one is named.
func TestDamagedSnapshotDoesNotHideOthers(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 8<<20, 12, 20)
	e.ok("init")
	e.ok("backup", "image", img, "--name", "a")
	e.ok("backup", "image", img, "--name", "b")
	ss := e.snapshots()
	victim := filepath.Join(e.repo, "snapshots", ss[0].ID)
	data, _ := os.ReadFile(victim)
	os.WriteFile(victim, data[:len(data)/2], 0o600)
	r := e.run("snapshots")
	if r.code != 0 || !strings.Contains(r.stdout, "b") || !strings.Contains(r.stderr, ss[0].ID[:8]) {
		t.Fatalf("snapshots with one damaged: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	out := filepath.Join(t.TempDir(), "o")
	e.ok("restore", "b@latest", "--to", out)
	sameFile(t, filepath.Join(out, "disk.raw"), img)
	e.fails("damaged", "restore", "a@latest", "--to", t.TempDir())
	e.fails("damaged", "prune") // prune refuses: it cannot know what the damaged snapshot references
	// Forgetting the damaged snapshot by id lets prune run again.
	e.ok("forget", ss[0].ID[:8])
	e.ok("prune")
	e.ok("verify", "--read-data")
	e.ok("restore", "b@latest", "--to", filepath.Join(t.TempDir(), "again"))
}
