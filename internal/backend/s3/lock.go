package s3

import (
	"bytes"
	"context"
	"crypto/md5"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"golang.org/x/sync/errgroup"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// Object lock (backend.Locker).
//
// A bucket with object lock is versioned: a PUT adds a version, a plain
// DELETE adds a delete marker that hides the object, and only a DELETE
// that names a version removes bytes, which the server refuses while the
// version's retention lasts. So a locked repository deletes by hiding
// (Remove is a plain DELETE, as on any bucket), and Purge, run by prune,
// deletes the hidden versions once their retention has ended. The
// retention of the objects the repository still needs is moved forward
// by prune (ExtendRetention) before it ends.

// lockPolicy is what SetRetention set.
type lockPolicy struct {
	mode   minio.RetentionMode
	period time.Duration
}

// probeRetention is how long ProbeLock locks its probe object: long
// enough to outlast the probe's requests on a server whose clock is a
// few minutes behind, short enough that the probe's bytes go soon.
const probeRetention = 10 * time.Minute

// purgeConcurrency is how many deletions Purge has in flight.
const purgeConcurrency = 16

// ErrNoLock is returned (wrapped) by ProbeLock when the bucket does not
// lock objects as asked.
var ErrNoLock = errors.New("the bucket does not enforce object lock")

func retentionMode(mode string) (minio.RetentionMode, error) {
	m := minio.RetentionMode(strings.ToUpper(mode))
	if !m.IsValid() {
		return "", fmt.Errorf("object lock mode %q: want compliance or governance", mode)
	}
	return m, nil
}

// SetRetention implements backend.Locker.
func (b *Backend) SetRetention(mode string, period time.Duration) {
	m, err := retentionMode(mode)
	if err != nil || period <= 0 {
		b.lock.Store(nil)
		return
	}
	b.lock.Store(&lockPolicy{mode: m, period: period})
}

// retention returns the options that lock a write-once name saved now,
// or none.
func (b *Backend) retention(name string) (minio.RetentionMode, time.Time) {
	p := b.lock.Load()
	if p == nil || !backend.WriteOnce(name) {
		return "", time.Time{}
	}
	return p.mode, time.Now().Add(p.period).UTC().Truncate(time.Second).Add(time.Second)
}

// ProbeLock implements backend.Locker.
func (b *Backend) ProbeLock(ctx context.Context, mode string) error {
	m, err := retentionMode(mode)
	if err != nil {
		return err
	}
	enabled, _, _, _, err := b.core.Client.GetObjectLockConfig(ctx, b.cfg.Bucket)
	howTo := fmt.Sprintf("create a bucket with object lock enabled (for example `aws s3api create-bucket --bucket %s --object-lock-enabled-for-bucket`; most servers cannot enable it on an existing bucket) and init the repository there", b.cfg.Bucket)
	switch {
	case isCode(err, "ObjectLockConfigurationNotFoundError") || isCode(err, "NoSuchObjectLockConfiguration") || (err == nil && enabled != "Enabled"):
		return fmt.Errorf("bucket %q has no object lock: %s: %w", b.cfg.Bucket, howTo, ErrNoLock)
	case isCode(err, "NotImplemented"):
		return fmt.Errorf("the S3 server at %s does not implement object lock: use a server that does: %w", b.cfg.Endpoint, ErrNoLock)
	case err != nil:
		return b.wrap("read the object lock configuration of", "", err)
	}

	key := b.prefix + "lockprobe/" + crypt.RandomID().String()
	first := []byte("kura object lock probe: this version must outlive every attempt to delete or replace it\n")
	up, err := b.putOne(ctx, key, first, md5.Sum(first), minio.PutObjectOptions{Mode: m, RetainUntilDate: time.Now().Add(probeRetention).UTC()})
	if err != nil {
		return b.wrap("write the lock probe", key, err)
	}
	if up.VersionID == "" || up.VersionID == "null" {
		return fmt.Errorf("bucket %q did not version the lock probe: object lock needs versioning: %s: %w", b.cfg.Bucket, howTo, ErrNoLock)
	}
	// Whatever happens, hide the probe (a delete marker); prune's Purge
	// deletes its locked version once the lock has ended.
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = b.core.RemoveObject(cctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{})
	}()

	err = b.core.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{VersionID: up.VersionID})
	if err == nil {
		return fmt.Errorf("bucket %q let a locked version be deleted: its object lock is not enforced for these credentials (in governance mode, a user allowed s3:BypassGovernanceRetention may delete; use compliance mode or other credentials): %w", b.cfg.Bucket, ErrNoLock)
	}
	if !lockedErr(err) {
		return b.wrap("try to delete the locked lock probe", key, err)
	}
	second := []byte("kura object lock probe: an attempt to replace it\n")
	over, err := b.putOne(ctx, key, second, md5.Sum(second), minio.PutObjectOptions{})
	if err != nil && !lockedErr(err) {
		return b.wrap("try to replace the locked lock probe", key, err)
	}
	body, _, _, err := b.core.GetObject(ctx, b.cfg.Bucket, key, minio.GetObjectOptions{VersionID: up.VersionID})
	if err != nil {
		return fmt.Errorf("bucket %q lost the locked version of the lock probe after it was replaced (%v): %w", b.cfg.Bucket, minio.ToErrorResponse(err).Code, ErrNoLock)
	}
	got, err := io.ReadAll(io.LimitReader(body, 1<<20))
	body.Close()
	if err != nil {
		return b.wrap("read the lock probe back", key, err)
	}
	if !bytes.Equal(got, first) {
		return fmt.Errorf("bucket %q let a locked version be replaced: %s: %w", b.cfg.Bucket, howTo, ErrNoLock)
	}
	if over.VersionID != "" && over.VersionID != up.VersionID {
		_ = b.core.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{VersionID: over.VersionID})
	}
	return nil
}

// lockedErr reports whether a DELETE or PUT of a version was refused
// because the version is locked. Servers say it in different words:
// AWS and versitygw answer AccessDenied, others InvalidRequest or
// ObjectLocked.
func lockedErr(err error) bool {
	switch minio.ToErrorResponse(err).Code {
	case "AccessDenied", "InvalidRequest", "ObjectLocked", "ObjectLockedException", "InvalidObjectState", "MethodNotAllowed":
		return true
	}
	return false
}

// ExtendRetention implements backend.Locker.
func (b *Backend) ExtendRetention(ctx context.Context, name string, until time.Time) error {
	if b.asOf != nil {
		return fmt.Errorf("extend the retention of %s: %w", name, backend.ErrReadOnly)
	}
	p := b.lock.Load()
	if p == nil {
		return fmt.Errorf("extend the retention of %s: the repository is not locked", name)
	}
	key, err := b.key(name)
	if err != nil {
		return err
	}
	until = until.UTC().Truncate(time.Second)
	mode := p.mode
	err = b.core.Client.PutObjectRetention(ctx, b.cfg.Bucket, key, minio.PutObjectRetentionOptions{Mode: &mode, RetainUntilDate: &until})
	if err == nil {
		return nil
	}
	if lockedErr(err) {
		// Refused: maybe because it would shorten a retention (compliance
		// mode forbids that), which is no failure.
		if cur, ok := b.retainUntil(ctx, key, ""); ok && !cur.Before(until) {
			return nil
		}
	}
	return b.wrap("extend the retention of", key, err)
}

// retainUntil returns the end of a version's retention ("": the current
// one), from a HEAD: GetObjectRetention's answer is not the same XML on
// every server (versitygw 1.8 names its root element differently).
func (b *Backend) retainUntil(ctx context.Context, key, versionID string) (time.Time, bool) {
	st, err := b.core.StatObject(ctx, b.cfg.Bucket, key, minio.StatObjectOptions{VersionID: versionID})
	if err != nil {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339, st.Metadata.Get("X-Amz-Object-Lock-Retain-Until-Date"))
	return t, err == nil
}

// version is one version of a key, or a delete marker, from a listing.
type version struct {
	id     string
	size   int64
	etag   string
	mod    time.Time
	latest bool
	marker bool
}

// eachKey lists every version under prefix and calls fn with the
// versions of one key at a time, the latest first. The listing is read
// whole before fn is called: not every server lists a key's versions
// and delete markers next to each other (versitygw 1.8 lists the
// markers apart), and fn may delete versions.
func (b *Backend) eachKey(ctx context.Context, prefix string, fn func(key string, vs []version) error) error {
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := b.core.Client.ListObjects(lctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true, WithVersions: true})
	var err error
	byKey := map[string][]version{}
	var keys []string
	for oi := range ch {
		if err != nil {
			continue
		}
		if oi.Err != nil {
			err = b.wrap("list versions of", prefix, oi.Err)
			cancel()
			continue
		}
		if _, ok := byKey[oi.Key]; !ok {
			keys = append(keys, oi.Key)
		}
		byKey[oi.Key] = append(byKey[oi.Key], version{id: oi.VersionID, size: oi.Size, etag: strings.Trim(oi.ETag, `"`), mod: oi.LastModified, latest: oi.IsLatest, marker: oi.IsDeleteMarker})
	}
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		return err
	}
	for _, k := range keys {
		vs := byKey[k]
		sortVersions(vs)
		if err := fn(k, vs); err != nil {
			return err
		}
	}
	return nil
}

// sortVersions puts a key's latest version first and keeps the server's
// order (newest first) for the rest. The order is not re-derived from
// the versions' times: some servers (versitygw 1.8) report an older
// version with a newer version's time.
func sortVersions(vs []version) {
	for i, v := range vs {
		if v.latest && i > 0 {
			copy(vs[1:i+1], vs[:i])
			vs[0] = v
			return
		}
	}
}

// Purge implements backend.Locker.
func (b *Backend) Purge(ctx context.Context, keep func(name string) bool) (backend.PurgeResult, error) {
	var res backend.PurgeResult
	if b.asOf != nil {
		return res, fmt.Errorf("purge: %w", backend.ErrReadOnly)
	}
	var period time.Duration
	if p := b.lock.Load(); p != nil {
		period = p.period
	}
	now := time.Now()
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(purgeConcurrency)

	// drop deletes versions; markers go only once every other version of
	// the key is gone.
	drop := func(key, name string, vs, markers []version) {
		g.Go(func() error {
			left := 0
			for _, v := range vs {
				if period > 0 && backend.WriteOnce(name) && now.Before(v.mod.Add(period)) {
					// Still locked as written: no request spent on a
					// refusal. (A retention extended since ends later.)
					mu.Lock()
					res.Locked++
					res.LockedBytes += v.size
					if u := v.mod.Add(period); u.After(res.LockedUntil) {
						res.LockedUntil = u
					}
					mu.Unlock()
					left++
					continue
				}
				err := b.core.RemoveObject(gctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{VersionID: v.id})
				switch {
				case err == nil || isCode(err, "NoSuchVersion") || isCode(err, "NoSuchKey"):
					mu.Lock()
					res.Deleted++
					res.DeletedBytes += v.size
					mu.Unlock()
				case lockedErr(err):
					until, _ := b.retainUntil(gctx, key, v.id)
					mu.Lock()
					res.Locked++
					res.LockedBytes += v.size
					if until.After(res.LockedUntil) {
						res.LockedUntil = until
					}
					mu.Unlock()
					left++
				default:
					return b.wrap("delete a version of", key, err)
				}
			}
			if left > 0 {
				return nil
			}
			for _, m := range markers {
				if err := b.core.RemoveObject(gctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{VersionID: m.id}); err != nil && !isCode(err, "NoSuchVersion") && !isCode(err, "NoSuchKey") {
					return b.wrap("delete a delete marker of", key, err)
				}
			}
			return nil
		})
	}

	err := b.eachKey(gctx, b.prefix, func(key string, vs []version) error {
		name, ok := strings.CutPrefix(key, b.prefix)
		if !ok || name == "" {
			return nil
		}
		var objs, markers []version
		for _, v := range vs {
			if v.marker {
				markers = append(markers, v)
			} else {
				objs = append(objs, v)
			}
		}
		if vs[0].marker { // removed (sortVersions put the latest first)
			if keep(name) {
				if len(objs) > 0 {
					res.Hidden = append(res.Hidden, name)
				}
				return nil
			}
			drop(key, name, objs, markers)
			return nil
		}
		older := objs[1:]
		if len(older) == 0 && len(markers) == 0 {
			return nil
		}
		if backend.WriteOnce(name) {
			// Older versions of a write-once name: the same bytes saved
			// twice (a retried PUT on a server without conditional
			// writes) may go; other bytes are what an overwrite hid.
			var same []version
			for _, v := range older {
				if v.etag != objs[0].etag || v.size != objs[0].size {
					res.Overwritten = append(res.Overwritten, name)
					return nil
				}
				same = append(same, v)
			}
			older = same
		}
		// Names rewritten in place (locks, pending deletions), and
		// identical copies: their older versions go, and the markers
		// between them (the current version stays, so markers can go at
		// once).
		drop(key, name, older, nil)
		for _, m := range markers {
			g.Go(func() error {
				if err := b.core.RemoveObject(gctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{VersionID: m.id}); err != nil && !isCode(err, "NoSuchVersion") {
					return b.wrap("delete a delete marker of", key, err)
				}
				return nil
			})
		}
		return nil
	})
	if werr := g.Wait(); err == nil {
		err = werr
	}
	return res, err
}

var _ backend.Locker = (*Backend)(nil)
