package main

// Faults against real S3 servers: the server killed and restarted in the
// middle of a backup or a prune, a server gone for longer than the retry
// budget. Each must end with the command done after its retries, or
// failed with one line that says what to do; either way the repository
// stays consistent: verify --read-data finds no problem and every restore
// point restores byte for byte.

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
)

// s3env is a test environment with a fresh repository location under
// srv's bucket; prefix is the location's key prefix.
func s3env(t *testing.T, srv *s3test.Server) (e *env, prefix string) {
	e = newEnv(t)
	prefix = "faults/" + crypt.RandomID().Short()
	e.repo = srv.Location(srv.Bucket, prefix)
	e.vars = srv.Env()
	return e, prefix
}

// running is a kura process started in the background.
type running struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
	done           chan struct{}
	code           int
	started        time.Time
	took           time.Duration
}

func (e *env) start(args ...string) *running {
	e.t.Helper()
	r := &running{cmd: e.cmd(args...), done: make(chan struct{})}
	r.cmd.Stdout, r.cmd.Stderr = &r.stdout, &r.stderr
	r.started = time.Now()
	if err := r.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() {
		err := r.cmd.Wait()
		r.took = time.Since(r.started)
		if ee, ok := err.(*exec.ExitError); ok {
			r.code = ee.ExitCode()
		} else if err != nil {
			r.code = -1
		}
		close(r.done)
	}()
	return r
}

func (r *running) exited() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// wait waits for the process, at most limit; then it kills it and fails.
func (r *running) wait(t *testing.T, limit time.Duration) {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(limit):
		r.cmd.Process.Kill()
		<-r.done
		t.Fatalf("kura %v still ran after %v\nstderr: %s", r.cmd.Args[1:], limit, r.stderr.String())
	}
}

// lastLine is the last line of the process's stderr: the error line of a
// failed command, after any retry warnings.
func (r *running) lastLine() string {
	lines := strings.Split(strings.TrimSpace(r.stderr.String()), "\n")
	return lines[len(lines)-1]
}

// countObjects counts the keys under prefix (a repository's prefix and a
// folder of it: ".../data/").
func countObjects(t *testing.T, srv *s3test.Server, prefix string) int {
	t.Helper()
	c, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for oi := range c.ListObjects(context.Background(), srv.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if oi.Err != nil {
			t.Fatalf("listing %s: %v", prefix, oi.Err)
		}
		n++
	}
	return n
}

// waitObjects waits until at least n keys are under prefix, or until r
// exits; it reports whether they are.
func waitObjects(t *testing.T, srv *s3test.Server, prefix string, n int, r *running, limit time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) && !r.exited() {
		if countObjects(t, srv, prefix) >= n {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// checkRepo checks what every fault must leave: verify --read-data finds
// no problem, and each restore point of states (snapshot id -> the image
// it was taken from) restores byte for byte; the repository holds no
// other restore point.
func checkRepo(t *testing.T, e *env, states map[string]string, label string) {
	t.Helper()
	if r := e.run("verify", "--read-data"); r.code != 0 || !strings.Contains(r.stdout, "no problems found") {
		t.Fatalf("%s: verify --read-data (exit %d):\n%s%s", label, r.code, r.stdout, r.stderr)
	}
	ss := e.snapshots()
	if len(ss) != len(states) {
		t.Fatalf("%s: %d restore points, want %d", label, len(ss), len(states))
	}
	for _, s := range ss {
		img, ok := states[s.ID]
		if !ok {
			t.Fatalf("%s: restore point %s comes from no backup that finished", label, s.ID[:8])
		}
		out := filepath.Join(t.TempDir(), "r")
		e.ok("restore", s.ID, "--to", out, "-q")
		sameFile(t, filepath.Join(out, filepath.Base(img)), img)
	}
}

// newSnapshot returns the id of the one restore point in e that is not
// in states.
func newSnapshot(t *testing.T, e *env, states map[string]string) string {
	t.Helper()
	var ids []string
	for _, s := range e.snapshots() {
		if _, ok := states[s.ID]; !ok {
			ids = append(ids, s.ID)
		}
	}
	if len(ids) != 1 {
		t.Fatalf("%d new restore points, want 1", len(ids))
	}
	return ids[0]
}

// keep copies the image to a file of its own, the state a restore point
// must restore to.
func keep(t *testing.T, e *env, img, name string) string {
	t.Helper()
	dir := filepath.Join(e.dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, filepath.Base(img))
	copyFile(t, img, p)
	return p
}

// checkOneLine fails unless msg, a command's error output, is one line.
func checkOneLine(t *testing.T, what, msg string) {
	t.Helper()
	msg = strings.TrimSpace(msg)
	if msg == "" || strings.Contains(msg, "\n") {
		t.Fatalf("%s: the error is not one line: %q", what, msg)
	}
	if strings.Contains(msg, "goroutine ") || strings.Contains(msg, "panic") {
		t.Fatalf("%s: a panic or stack: %q", what, msg)
	}
}

// checkUnreachable fails unless msg says that srv could not be reached,
// naming its endpoint, and what to do.
func checkUnreachable(t *testing.T, srv *s3test.Server, what, msg string) {
	t.Helper()
	host := strings.TrimPrefix(srv.Endpoint, "http://")
	for _, want := range []string{host, "could not be reached", "check that it is running"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%s: %q does not say %q", what, msg, want)
		}
	}
}

// packs returns the pack files under a repository's prefix.
func packs(t *testing.T, srv *s3test.Server, prefix string) map[string]bool {
	t.Helper()
	c, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for oi := range c.ListObjects(context.Background(), srv.Bucket, minio.ListObjectsOptions{Prefix: prefix + "/data/", Recursive: true}) {
		if oi.Err != nil {
			t.Fatalf("listing packs: %v", oi.Err)
		}
		out[oi.Key] = true
	}
	return out
}

// TestS3ServerRestart kills the S3 server in the middle of a backup of a
// 200 MiB image, once it has uploaded some packs, and starts it again on
// the same port and data two seconds later; then in the middle of a
// forget --prune. A command either rides out the outage on its retries or
// fails with one line; the repository is consistent either way, and a
// failed command done again succeeds.
func TestS3ServerRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: restarts S3 servers")
	}
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := s3servers.Get(t, k)
			ctx := context.Background()
			t.Cleanup(func() {
				// The pool's server serves the next tests whatever happened.
				if !srv.Running() {
					if err := srv.Restart(ctx); err != nil {
						t.Error(err)
					}
				}
			})
			e, prefix := s3env(t, srv)
			img := filepath.Join(e.dir, "disk.raw")
			makeImage(t, img, 200<<20, 31, 150)
			e.ok("init")
			states := map[string]string{}

			// Kill the server once two packs are up.
			v1 := keep(t, e, img, "v1")
			b := e.start("backup", "image", img, "--name", "vm", "-q")
			if !waitObjects(t, srv, prefix+"/data/", 2, b, 60*time.Second) {
				b.wait(t, time.Minute)
				t.Fatalf("the backup ended (exit %d) before it saved two packs: the image is too small for this machine\n%s", b.code, b.stderr.String())
			}
			srv.Kill()
			killedAt := time.Since(b.started)
			time.Sleep(2 * time.Second)
			restart := time.Now()
			if err := srv.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			t.Logf("server killed %v into the backup, back after %v", killedAt.Round(time.Millisecond), time.Since(restart).Round(time.Millisecond))
			b.wait(t, 3*time.Minute)
			if b.code == 0 {
				t.Logf("the backup rode out the outage: done in %v, %d retry warnings", b.took.Round(time.Millisecond), strings.Count(b.stderr.String(), "retrying"))
				states[newSnapshot(t, e, states)] = v1
			} else {
				t.Logf("the backup failed after %v: %s", b.took.Round(time.Millisecond), b.lastLine())
				checkOneLine(t, "backup during a restart", b.lastLine())
				checkUnreachable(t, srv, "backup during a restart", b.lastLine())
				checkRepo(t, e, states, "after the failed backup")
				e.ok("backup", "image", img, "--name", "vm", "-q")
				states[newSnapshot(t, e, states)] = v1
			}
			checkRepo(t, e, states, "after the backup")

			// A second restore point, then forget the first and prune,
			// with the server killed once the prune has taken its lock.
			scribble(t, img, 32, 200)
			v2 := keep(t, e, img, "v2")
			e.ok("backup", "image", img, "--name", "vm", "-q")
			states[newSnapshot(t, e, states)] = v2
			p := e.start("forget", "--name", "vm", "--keep-last", "1", "--prune")
			if waitObjects(t, srv, prefix+"/locks/", 1, p, 30*time.Second) {
				srv.Kill()
				t.Logf("server killed %v into forget --prune", time.Since(p.started).Round(time.Millisecond))
				time.Sleep(2 * time.Second)
				if err := srv.Restart(ctx); err != nil {
					t.Fatal(err)
				}
			} else {
				t.Logf("forget --prune ended before the kill (exit %d)", p.code)
			}
			p.wait(t, 3*time.Minute)
			if p.code == 0 {
				t.Logf("forget --prune rode out the outage: %v", p.took.Round(time.Millisecond))
			} else {
				t.Logf("forget --prune failed after %v: %s", p.took.Round(time.Millisecond), p.lastLine())
				checkOneLine(t, "forget --prune during a restart", p.lastLine())
				checkUnreachable(t, srv, "forget --prune during a restart", p.lastLine())
				// The older restore point is gone or not, as far as forget got.
				now := map[string]string{}
				for _, s := range e.snapshots() {
					now[s.ID] = states[s.ID]
				}
				checkRepo(t, e, now, "after the failed forget --prune")
				e.ok("forget", "--name", "vm", "--keep-last", "1", "--prune")
			}
			for id, img := range states {
				if img == v1 {
					delete(states, id)
				}
			}
			checkRepo(t, e, states, "after forget --prune")

			// A copy from a local repository into the bucket, the server
			// killed once two of the copy's packs are up.
			src := *e
			src.repo = filepath.Join(e.dir, "local-source")
			src.ok("init")
			src.ok("backup", "image", img, "--name", "vm", "-q")
			dst := *e
			dst.repo = srv.Location(srv.Bucket, prefix+"-copy")
			dst.ok("init")
			copyArgs := []string{"copy", "--from", src.repo, "--to", dst.repo}
			c := e.start(copyArgs...)
			if waitObjects(t, srv, prefix+"-copy/data/", 2, c, 60*time.Second) {
				srv.Kill()
				t.Logf("server killed %v into the copy", time.Since(c.started).Round(time.Millisecond))
				time.Sleep(2 * time.Second)
				if err := srv.Restart(ctx); err != nil {
					t.Fatal(err)
				}
			} else {
				t.Logf("the copy ended before the kill (exit %d)", c.code)
			}
			c.wait(t, 3*time.Minute)
			if c.code == 0 {
				t.Logf("the copy rode out the outage: %v", c.took.Round(time.Millisecond))
			} else {
				t.Logf("the copy failed after %v: %s", c.took.Round(time.Millisecond), c.lastLine())
				checkOneLine(t, "copy during a restart", c.lastLine())
				if r := dst.run("verify", "--read-data"); r.code != 0 || !strings.Contains(r.stdout, "no problems found") {
					t.Fatalf("the copy's target after the failed copy (exit %d):\n%s%s", r.code, r.stdout, r.stderr)
				}
				e.ok(copyArgs...)
			}
			if ss := dst.snapshots(); len(ss) != 1 {
				t.Fatalf("the copy's target holds %d restore points", len(ss))
			}
			out := filepath.Join(e.dir, "from-copy")
			dst.ok("restore", "vm@latest", "--to", out)
			sameFile(t, filepath.Join(out, filepath.Base(img)), v2)
			if r := dst.run("verify", "--read-data"); r.code != 0 || !strings.Contains(r.stdout, "no problems found") {
				t.Fatalf("the copy's target: verify (exit %d):\n%s%s", r.code, r.stdout, r.stderr)
			}
		})
	}
}

// TestS3ServerDown kills the S3 server in the middle of a backup and
// leaves it down for longer than the retry budget: the backup fails with
// one line that names the endpoint and says it could not be reached. The
// server back, the repository is consistent, the next backup succeeds,
// and the packs the failed backup left are unreferenced ones that prune
// removes.
func TestS3ServerDown(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: waits out the retry budget")
	}
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := s3servers.Get(t, k)
			ctx := context.Background()
			t.Cleanup(func() {
				if !srv.Running() {
					if err := srv.Restart(ctx); err != nil {
						t.Error(err)
					}
				}
			})
			e, prefix := s3env(t, srv)
			img := filepath.Join(e.dir, "disk.raw")
			makeImage(t, img, 200<<20, 41, 150)
			e.ok("init")
			states := map[string]string{}
			v1 := keep(t, e, img, "v1")
			e.ok("backup", "image", img, "--name", "vm", "-q")
			states[newSnapshot(t, e, states)] = v1

			// New data all over, and the server gone once the backup has
			// saved a pack of it.
			makeImage(t, img, 200<<20, 42, 150)
			v2 := keep(t, e, img, "v2")
			before := packs(t, srv, prefix)
			b := e.start("backup", "image", img, "--name", "vm", "-q")
			if !waitObjects(t, srv, prefix+"/data/", len(before)+1, b, 60*time.Second) {
				b.wait(t, time.Minute)
				t.Fatalf("the backup ended (exit %d) before it saved a pack", b.code)
			}
			srv.Kill()
			killed := time.Now()
			b.wait(t, 2*time.Minute)
			// It gives up once a pack's save has used its retries (~20 s on
			// average, 40 s at most), then spends as long again trying to
			// remove its lock.
			t.Logf("the backup failed %v after the server died, after %d retry warnings: %s", time.Since(killed).Round(time.Millisecond), strings.Count(b.stderr.String(), "retrying"), b.lastLine())
			if b.code == 0 {
				t.Fatal("the backup succeeded with the server down")
			}
			checkOneLine(t, "backup with the server down", b.lastLine())
			checkUnreachable(t, srv, "backup with the server down", b.lastLine())
			if n := strings.Count(b.stderr.String(), "retrying"); n < 9 {
				t.Errorf("the backup gave up after %d retries", n)
			}

			if err := srv.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			checkRepo(t, e, states, "after the failed backup")
			left := map[string]bool{}
			for p := range packs(t, srv, prefix) {
				if !before[p] {
					left[p] = true
				}
			}
			t.Logf("the failed backup left %d packs", len(left))
			e.ok("backup", "image", img, "--name", "vm", "-q")
			states[newSnapshot(t, e, states)] = v2
			checkRepo(t, e, states, "after the next backup")
			out := e.ok("prune")
			t.Logf("%s", strings.TrimSpace(out))
			now := packs(t, srv, prefix)
			for p := range left {
				if now[p] {
					t.Errorf("prune left %s, a pack of the failed backup", p)
				}
			}
			if out := e.ok("prune", "--dry-run"); !strings.Contains(out, "0 packs") {
				t.Errorf("a second prune would still remove something: %s", out)
			}
			checkRepo(t, e, states, "after prune")
		})
	}
}
