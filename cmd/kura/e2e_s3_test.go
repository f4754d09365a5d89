package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
)

// s3servers are the real S3 servers of this package's tests, started on
// first use and stopped in TestMain.
var s3servers = s3test.NewPool()

// TestS3EndToEnd drives kura against a repository on each real S3 server
// as a user would, on a generated raw image (no VM): init, backup, list,
// restore byte for byte, an incremental backup, verify --read-data,
// forget and prune, restore again; the metadata cache filled, followed
// and cleared; and the errors a user meets with a wrong key or a missing
// bucket, each on one line.
func TestS3EndToEnd(t *testing.T) {
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := s3servers.Get(t, k)
			e := newEnv(t)
			e.repo = srv.Location(srv.Bucket, "e2e/"+crypt.RandomID().Short())
			cacheRoot := filepath.Join(e.dir, "cache")
			e.vars = append(srv.Env(), "KURA_CACHE_DIR="+cacheRoot)
			raw := filepath.Join(e.dir, "vm1-disk0.raw")
			makeImage(t, raw, 48<<20, 11, 40)
			first := filepath.Join(e.dir, "first.raw")
			copyFile(t, raw, first)

			if out := e.ok("init", "--chunk-size", "256K"); !strings.Contains(out, e.repo) {
				t.Errorf("init does not name the location: %s", out)
			}
			e.ok("backup", "image", raw, "--name", "vm1")
			ss := e.snapshots()
			if len(ss) != 1 || ss[0].Name != "vm1" || len(ss[0].Disks) != 1 {
				t.Fatalf("snapshots: %+v", ss)
			}
			firstID := ss[0].ID
			out1 := filepath.Join(e.dir, "out1")
			e.ok("restore", "vm1@latest", "--to", out1)
			sameFile(t, filepath.Join(out1, "vm1-disk0.raw"), raw)

			// An incremental backup stores only what changed.
			scribble(t, raw, 12, 10)
			e.ok("backup", "image", raw, "--name", "vm1")
			ss = e.snapshots("--name", "vm1")
			if len(ss) != 2 {
				t.Fatalf("%d snapshots after the second backup", len(ss))
			}
			if n := ss[1].Stats.BytesNew; n > 10*256<<10+1<<20 {
				t.Errorf("second backup stored %d new bytes for 10 changed blocks", n)
			}
			out2 := filepath.Join(e.dir, "out2")
			e.ok("restore", "vm1@latest", "--to", out2)
			sameFile(t, filepath.Join(out2, "vm1-disk0.raw"), raw)
			out3 := filepath.Join(e.dir, "out3")
			e.ok("restore", firstID, "--to", out3)
			sameFile(t, filepath.Join(out3, "vm1-disk0.raw"), first)

			if out := e.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") {
				t.Fatalf("verify: %s", out)
			}

			// Forget the older restore point and prune: the newer restores.
			e.ok("forget", "--name", "vm1", "--keep-last", "1", "--prune")
			if ss := e.snapshots(); len(ss) != 1 || ss[0].ID == firstID {
				t.Fatalf("after forget: %+v", ss)
			}
			out4 := filepath.Join(e.dir, "out4")
			e.ok("restore", "latest", "--to", out4)
			sameFile(t, filepath.Join(out4, "vm1-disk0.raw"), raw)
			if out := e.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") {
				t.Fatalf("verify after prune: %s", out)
			}

			// The metadata cache followed the forget: it holds the one
			// snapshot left. It can be cleared, and left unused.
			cached := func(sub string) []string {
				t.Helper()
				m, _ := filepath.Glob(filepath.Join(cacheRoot, "*", "objects", sub, "*"))
				return m
			}
			if got := cached("snapshots"); len(got) != 1 || filepath.Base(got[0]) != e.snapshots()[0].ID {
				t.Errorf("cached snapshots %v, want the one left", got)
			}
			if len(cached("index")) == 0 || len(cached("keys")) != 1 || len(cached("data")) != 0 || len(cached("locks")) != 0 {
				t.Errorf("cache holds index %v, keys %v, data %v, locks %v", cached("index"), cached("keys"), cached("data"), cached("locks"))
			}
			if out := e.ok("cache", "clear"); !strings.Contains(out, "removed "+cacheRoot) {
				t.Errorf("cache clear: %s", out)
			}
			e.ok("--no-cache", "snapshots")
			if m, _ := filepath.Glob(filepath.Join(cacheRoot, "*")); len(m) != 0 {
				t.Errorf("--no-cache wrote %v", m)
			}
			e.ok("snapshots")
			if len(cached("snapshots")) != 1 {
				t.Errorf("the cache was not filled again: %v", cached("snapshots"))
			}
			if out := e.ok("cache", "clear", "--all"); !strings.Contains(out, "removed "+cacheRoot) {
				t.Errorf("cache clear --all: %s", out)
			}

			// A bandwidth limit is taken by any command, and checked.
			e.ok("--limit-upload", "50MiB", "--limit-download", "50MiB/s", "snapshots")
			e.fails("--limit-upload", "--limit-upload", "fast", "snapshots")

			// A second init on the same location is refused.
			e.fails("already exists", "init")

			// A wrong key: one line that says to check the credentials,
			// without the secret.
			wrong := *e
			wrong.vars = []string{"AWS_ACCESS_KEY_ID=" + srv.AccessKey, "AWS_SECRET_ACCESS_KEY=wrong-secret-for-e2e"}
			r := wrong.fails("check the credentials", "snapshots")
			if strings.Contains(r.stderr, "wrong-secret-for-e2e") || strings.Contains(r.stderr, srv.SecretKey) {
				t.Errorf("the error shows a secret: %s", r.stderr)
			}
			// No credentials at all.
			none := *e
			none.vars = []string{"AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=", "AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(e.dir, "none")}
			none.fails("no S3 credentials", "snapshots")
			// A missing bucket: one line that says to create it.
			missing := *e
			missing.repo = srv.Location("no-such-bucket", "x")
			missing.fails("create it", "init")
			missing.fails("create it", "snapshots")
		})
	}
}
