package s3

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
)

// lockedBuckets holds, per server, a bucket created with object lock,
// made on first use.
var lockedBuckets sync.Map // *s3test.Server -> string

func lockedConfig(t *testing.T, srv *s3test.Server) Config {
	t.Helper()
	name, ok := lockedBuckets.Load(srv)
	if !ok {
		b := "locked-" + strings.ToLower(crypt.RandomID().Short())
		if err := srv.MakeLockedBucket(context.Background(), b); err != nil {
			t.Fatalf("creating a bucket with object lock: %v", err)
		}
		name, _ = lockedBuckets.LoadOrStore(srv, b)
	}
	cfg := testConfig(srv)
	cfg.Bucket = name.(string)
	return cfg
}

func rawClient(t *testing.T, srv *s3test.Server) *minio.Client {
	t.Helper()
	c, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// versions lists every version and delete marker of key.
func versions(t *testing.T, c *minio.Client, bucket, key string) (objs, markers int) {
	t.Helper()
	for oi := range c.ListObjects(context.Background(), bucket, minio.ListObjectsOptions{Prefix: key, WithVersions: true, Recursive: true}) {
		if oi.Err != nil {
			t.Fatal(oi.Err)
		}
		if oi.Key != key {
			continue
		}
		if oi.IsDeleteMarker {
			markers++
		} else {
			objs++
		}
	}
	return objs, markers
}

// TestProbeLock proves on each server that the probe passes a bucket that
// locks and refuses one that does not, with a message naming the setting.
func TestProbeLock(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		for _, mode := range []string{"compliance", "governance"} {
			if err := open(t, lockedConfig(t, srv)).ProbeLock(ctx, mode); err != nil {
				t.Errorf("probe (%s) of a bucket with object lock: %v", mode, err)
			}
		}
		err := open(t, testConfig(srv)).ProbeLock(ctx, "compliance")
		if !errors.Is(err, ErrNoLock) || !strings.Contains(err.Error(), "object-lock-enabled-for-bucket") || strings.Contains(err.Error(), "\n") {
			t.Errorf("probe of a bucket without object lock: %v", err)
		}
		if err := open(t, lockedConfig(t, srv)).ProbeLock(ctx, "forever"); err == nil {
			t.Error("probe with an unknown mode passed")
		}
	})
}

// TestLockedObjects proves the lock on each server rather than assuming
// it: a locked version refuses deletion by version until its retention
// ends; Remove hides it; Purge waits for the end of the retention, then
// deletes the versions and the marker; names rewritten in place carry no
// retention and their old versions go at once; retention moves forward,
// never back.
func TestLockedObjects(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		cfg := lockedConfig(t, srv)
		b := open(t, cfg)
		c := rawClient(t, srv)
		const period = 4 * time.Second
		b.SetRetention("compliance", period)

		pack := "data/ab/" + crypt.RandomID().String()
		if err := b.Save(ctx, pack, []byte("a pack")); err != nil {
			t.Fatal(err)
		}
		key := b.prefix + pack
		// (versitygw 1.8 answers GetObjectRetention with XML minio-go
		// does not read; HEAD says the same.)
		st, err := c.StatObject(ctx, cfg.Bucket, key, minio.StatObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		until, _ := time.Parse(time.RFC3339, st.Metadata.Get("X-Amz-Object-Lock-Retain-Until-Date"))
		if mode := st.Metadata.Get("X-Amz-Object-Lock-Mode"); mode != "COMPLIANCE" || until.Before(time.Now()) {
			t.Fatalf("retention of a saved pack: %q until %v", mode, until)
		}
		if err := c.RemoveObject(ctx, cfg.Bucket, key, minio.RemoveObjectOptions{VersionID: st.VersionID}); err == nil {
			t.Fatal("the server deleted a locked version")
		}

		// A lock record: no retention, rewritten, removed.
		lock := "locks/" + crypt.RandomID().String()
		for _, s := range []string{"one", "two"} {
			if err := b.Save(ctx, lock, []byte(s)); err != nil {
				t.Fatal(err)
			}
		}
		if st, err := c.StatObject(ctx, cfg.Bucket, b.prefix+lock, minio.StatObjectOptions{}); err != nil || st.Metadata.Get("X-Amz-Object-Lock-Mode") != "" {
			t.Errorf("a lock record got a retention: %v %v", st.Metadata, err)
		}

		if err := b.Remove(ctx, pack); err != nil {
			t.Fatal(err)
		}
		if err := b.Remove(ctx, lock); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Stat(ctx, pack); !errors.Is(err, backend.ErrNotFound) {
			t.Fatalf("a removed pack: %v", err)
		}
		keep := func(string) bool { return false }
		res, err := b.Purge(ctx, keep)
		if err != nil {
			t.Fatal(err)
		}
		if res.Locked != 1 || res.Deleted != 2 || res.LockedUntil.IsZero() {
			t.Errorf("purge while locked: %+v, want the pack waiting and the lock record's 2 versions deleted", res)
		}
		if n, _ := versions(t, c, cfg.Bucket, key); n != 1 {
			t.Errorf("%d versions of the locked pack after a purge, want 1", n)
		}
		if n, m := versions(t, c, cfg.Bucket, b.prefix+lock); n+m != 0 {
			t.Errorf("lock record: %d versions and %d markers left", n, m)
		}

		// Retention moves forward, never back.
		snap := "snapshots/" + crypt.RandomID().String()
		if err := b.Save(ctx, snap, []byte("a snapshot")); err != nil {
			t.Fatal(err)
		}
		later := time.Now().Add(time.Hour)
		if err := b.ExtendRetention(ctx, snap, later); err != nil {
			t.Fatal(err)
		}
		if err := b.ExtendRetention(ctx, snap, time.Now().Add(2*time.Second)); err != nil {
			t.Errorf("a shorter retention is no error, it is left alone: %v", err)
		}
		st, err = c.StatObject(ctx, cfg.Bucket, b.prefix+snap, minio.StatObjectOptions{})
		if u, _ := time.Parse(time.RFC3339, st.Metadata.Get("X-Amz-Object-Lock-Retain-Until-Date")); err != nil || u.Before(later.Add(-2*time.Second)) {
			t.Errorf("retention after extending to %v: %v %v", later, u, err)
		}

		// Once the pack's retention has passed, purge deletes it and
		// its marker. The snapshot is current and untouched.
		time.Sleep(time.Until(until.Add(1500 * time.Millisecond)))
		res, err = b.Purge(ctx, keep)
		if err != nil {
			t.Fatal(err)
		}
		if res.Deleted != 1 || res.Locked != 0 {
			t.Errorf("purge after the lock ended: %+v", res)
		}
		if n, m := versions(t, c, cfg.Bucket, key); n+m != 0 {
			t.Errorf("expired pack: %d versions and %d markers left", n, m)
		}
		if _, err := b.Load(ctx, snap, 0, 0); err != nil {
			t.Errorf("the current snapshot after purge: %v", err)
		}
	})
}

// TestPurgeReportsAttack: objects kura needs hidden by someone's delete,
// and write-once objects overwritten, are reported, never purged.
func TestPurgeReportsAttack(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		cfg := lockedConfig(t, srv)
		b := open(t, cfg)
		c := rawClient(t, srv)
		b.SetRetention("compliance", time.Hour)
		idx := "index/" + crypt.RandomID().String()
		snap := "snapshots/" + crypt.RandomID().String()
		for _, n := range []string{idx, snap} {
			if err := b.Save(ctx, n, []byte("sealed "+n)); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.RemoveObject(ctx, cfg.Bucket, b.prefix+idx, minio.RemoveObjectOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.PutObject(ctx, cfg.Bucket, b.prefix+snap, strings.NewReader("garbage"), 7, minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
		res, err := b.Purge(ctx, func(n string) bool { return n == idx })
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Hidden) != 1 || res.Hidden[0] != idx || len(res.Overwritten) != 1 || res.Overwritten[0] != snap || res.Deleted != 0 {
			t.Errorf("purge after an attack: %+v", res)
		}
	})
}

// TestAsOf reads a repository as it was before its objects were
// overwritten and deleted.
func TestAsOf(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		cfg := lockedConfig(t, srv)
		b := open(t, cfg)
		c := rawClient(t, srv)
		b.SetRetention("compliance", time.Hour)
		names := []string{"config", "keys/" + crypt.RandomID().String(), "data/00/" + crypt.RandomID().String()}
		for _, n := range names {
			if err := b.Save(ctx, n, []byte("before: "+n)); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(1100 * time.Millisecond) // S3 times have a second's precision
		before := time.Now()
		time.Sleep(1100 * time.Millisecond)
		if _, err := c.PutObject(ctx, cfg.Bucket, b.prefix+names[0], strings.NewReader("after"), 5, minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
		for _, n := range names[1:] {
			if err := c.RemoveObject(ctx, cfg.Bucket, b.prefix+n, minio.RemoveObjectOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		if err := b.Save(ctx, "snapshots/"+crypt.RandomID().String(), []byte("new")); err != nil {
			t.Fatal(err)
		}

		vcfg := cfg
		vcfg.AsOf = before
		v := open(t, vcfg)
		var listed []string
		if err := v.List(ctx, "", func(oi backend.ObjectInfo) error {
			listed = append(listed, oi.Name)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if len(listed) != len(names) {
			t.Errorf("as of %v the view lists %v, want %v", before, listed, names)
		}
		for _, n := range names {
			got, err := v.Load(ctx, n, 0, 0)
			if err != nil || !bytes.Equal(got, []byte("before: "+n)) {
				t.Errorf("as-of load of %s: %q %v", n, got, err)
			}
		}
		// A name loaded before any listing is looked up by itself.
		v2 := open(t, vcfg)
		if got, err := v2.Load(ctx, names[2], 2, 4); err != nil || string(got) != "fore" {
			t.Errorf("as-of ranged load without a listing: %q %v", got, err)
		}
		if _, err := v2.Stat(ctx, "snapshots/none"); !errors.Is(err, backend.ErrNotFound) {
			t.Errorf("as-of stat of a name that did not exist: %v", err)
		}
		if err := v.Save(ctx, "snapshots/x", []byte("x")); !errors.Is(err, backend.ErrReadOnly) {
			t.Errorf("save into an as-of view: %v", err)
		}
		if err := v.Remove(ctx, names[0]); !errors.Is(err, backend.ErrReadOnly) {
			t.Errorf("remove from an as-of view: %v", err)
		}
		if !strings.Contains(v.Location(), "as-of=") {
			t.Errorf("the view's location does not say as of when: %s", v.Location())
		}
	})
}
