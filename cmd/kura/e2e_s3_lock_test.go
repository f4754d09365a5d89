package main

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
)

// TestS3LockedRepository: a repository created with object lock on each
// real S3 server. init --lock refuses a bucket without object lock and a
// lock shorter than the maintenance interval; on a locked bucket every
// object is locked, prune deletes by hiding and says what waits for its
// lock to end; and the ransomware drill: with the very credentials kura
// uses, an attacker forgets every restore point and prunes, overwrites
// every object, deletes every object and tries to delete every version.
// Afterwards the repository read as of a time before the attack restores
// every restore point byte for byte.
func TestS3LockedRepository(t *testing.T) {
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			ctx := context.Background()
			srv := s3servers.Get(t, k)
			bucket := "drill-" + strings.ToLower(crypt.RandomID().Short())
			if err := srv.MakeLockedBucket(ctx, bucket); err != nil {
				t.Fatal(err)
			}
			prefix := "kura/" + crypt.RandomID().Short()
			e := newEnv(t)
			e.vars = srv.Env()

			// A bucket without object lock, and figures without margin.
			e.repo = srv.Location(srv.Bucket, "nolock/"+crypt.RandomID().Short())
			e.fails("object-lock-enabled-for-bucket", "init", "--lock", "compliance", "--lock-days", "2", "--lock-maintenance-days", "1")
			e.repo = srv.Location(bucket, prefix)
			e.fails("less than a day of margin", "init", "--lock", "compliance", "--lock-days", "7", "--lock-maintenance-days", "7")
			e.fails("go with --lock", "init", "--lock-days", "7")

			out := e.ok("init", "--chunk-size", "256K", "--lock", "compliance", "--lock-days", "2", "--lock-maintenance-days", "1")
			if !strings.Contains(out, "object lock: compliance mode") {
				t.Errorf("init does not say the repository is locked: %s", out)
			}
			raw := filepath.Join(e.dir, "vm1-disk0.raw")
			makeImage(t, raw, 24<<20, 21, 24)
			states := []string{filepath.Join(e.dir, "state0.raw"), filepath.Join(e.dir, "state1.raw")}
			copyFile(t, raw, states[0])
			e.ok("backup", "image", raw, "--name", "vm1")
			scribble(t, raw, 22, 20)
			copyFile(t, raw, states[1])
			e.ok("backup", "image", raw, "--name", "vm1")
			ss := e.snapshots()
			if len(ss) != 2 {
				t.Fatalf("%d restore points", len(ss))
			}

			// Every object kura wrote is locked.
			c, err := srv.Client()
			if err != nil {
				t.Fatal(err)
			}
			locked := 0
			for oi := range c.ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: prefix + "/", Recursive: true}) {
				if oi.Err != nil {
					t.Fatal(oi.Err)
				}
				name := strings.TrimPrefix(oi.Key, prefix+"/")
				st, err := c.StatObject(ctx, bucket, oi.Key, minio.StatObjectOptions{})
				if err != nil {
					t.Fatal(err)
				}
				mode := st.Metadata.Get("X-Amz-Object-Lock-Mode")
				until, _ := time.Parse(time.RFC3339, st.Metadata.Get("X-Amz-Object-Lock-Retain-Until-Date"))
				if strings.HasPrefix(name, "locks/") {
					continue
				}
				if mode != "COMPLIANCE" || until.Before(time.Now().Add(47*time.Hour)) {
					t.Errorf("%s: lock %q until %v, want compliance for 2 days", name, mode, until)
				}
				locked++
			}
			if locked < 5 {
				t.Fatalf("only %d objects in the repository", locked)
			}

			// Prune on a locked repository hides and says what waits.
			forgotten := ss[0].ID
			e.ok("forget", forgotten)
			out = e.ok("prune")
			if !strings.Contains(out, "still locked") || !strings.Contains(out, "freed once their lock ends") {
				t.Errorf("prune on a locked repository: %s", out)
			}
			if out := e.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") {
				t.Fatalf("verify after prune: %s", out)
			}
			copyFile(t, states[0], raw) // state 0 again, as a new restore point
			e.ok("backup", "image", raw, "--name", "vm1")
			ss = e.snapshots()
			if len(ss) != 2 {
				t.Fatalf("%d restore points before the attack", len(ss))
			}
			want := map[string]string{ss[0].ID: states[1], ss[1].ID: states[0]}
			kept := []string{ss[0].ID, ss[1].ID}

			time.Sleep(1100 * time.Millisecond)
			before := time.Now().UTC()
			time.Sleep(1100 * time.Millisecond)

			// The attack. First with kura itself: forget everything, prune.
			for _, id := range kept {
				e.ok("forget", id)
			}
			e.ok("prune")
			// Then every version it can see, deleted by id (which also
			// deletes kura's delete markers); then every object
			// overwritten, then deleted, so that nothing shows.
			refused, deleted := 0, 0
			for oi := range c.ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: prefix + "/", Recursive: true, WithVersions: true}) {
				if oi.Err != nil {
					t.Fatal(oi.Err)
				}
				if err := c.RemoveObject(ctx, bucket, oi.Key, minio.RemoveObjectOptions{VersionID: oi.VersionID}); err != nil {
					refused++
				} else {
					deleted++
				}
			}
			var keys []string
			for oi := range c.ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: prefix + "/", Recursive: true}) {
				keys = append(keys, oi.Key)
			}
			garbage := bytes.Repeat([]byte("encrypted by ransomware "), 100)
			for i, key := range keys {
				if i%2 == 0 {
					if _, err := c.PutObject(ctx, bucket, key, bytes.NewReader(garbage), int64(len(garbage)), minio.PutObjectOptions{}); err != nil {
						t.Errorf("overwrite %s: %v", key, err)
					}
				}
				if err := c.RemoveObject(ctx, bucket, key, minio.RemoveObjectOptions{}); err != nil {
					t.Errorf("delete %s: %v", key, err)
				}
			}
			t.Logf("attack: of the versions, %d deleted (unlocked ones and markers), %d refused; then %d objects overwritten or deleted", deleted, refused, len(keys))
			if refused < locked {
				t.Errorf("only %d versions refused deletion, %d objects were locked", refused, locked)
			}
			e.fails("kura init", "snapshots")

			// Recovery: the repository as of a time before the attack.
			view := *e
			view.repo = srv.Location(bucket, prefix) + "?as-of=" + before.Format(time.RFC3339)
			// The view passes over delete markers (their times cannot be
			// trusted on every server), so the restore point forgotten
			// before the attack, whose data is still locked, is back too.
			want[forgotten] = states[0]
			got := view.snapshots()
			ids := map[string]bool{}
			for _, s := range got {
				ids[s.ID] = true
			}
			if len(got) != 3 || !ids[kept[0]] || !ids[kept[1]] || !ids[forgotten] {
				t.Fatalf("as of %s: restore points %+v, want %v and %s", before.Format(time.RFC3339), got, kept, forgotten)
			}
			for _, s := range got {
				dst := filepath.Join(e.dir, "restored-"+s.ID[:8])
				view.ok("restore", s.ID, "--to", dst)
				sameFile(t, filepath.Join(dst, "vm1-disk0.raw"), want[s.ID])
			}
			if out := view.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") {
				t.Errorf("verify of the repository as of before the attack: %s", out)
			}
			view.fails("read-only", "backup", "image", raw, "--name", "vm1")

			// A writable repository again: the restore points copied out
			// of the view into a fresh one.
			rec := *e
			rec.repo = filepath.Join(e.dir, "recovered")
			rec.ok("init")
			view.ok("copy", "--from", view.repo, "--to", rec.repo)
			if got := rec.snapshots(); len(got) != 3 {
				t.Fatalf("copied out of the view: %+v", got)
			}
			dst := filepath.Join(e.dir, "from-recovered")
			rec.ok("restore", "vm1@latest", "--to", dst) // the third backup: state 0
			sameFile(t, filepath.Join(dst, "vm1-disk0.raw"), states[0])
		})
	}
}
