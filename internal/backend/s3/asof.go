package s3

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kura-backup/kura/internal/backend"
)

// A view as of a time (Config.AsOf): on a versioned bucket every object
// the repository held at that time is still there as a version unless
// someone deleted that version, which object lock forbids while its
// retention lasts. So after an attack that deleted or overwrote objects
// (hiding the locked versions behind delete markers and new versions),
// reading each key's newest version no later than the time before the
// attack gives the repository back as it was. The view only reads: Save,
// Remove and the rest fail with backend.ErrReadOnly, and a user copies
// the restore points out (kura copy) or restores from it.

// writtenMeta is the user metadata (x-amz-meta-kura-written) in which
// every Save records its time. A version's LastModified should say the
// same, but some servers (versitygw 1.8) report an older version with
// the time of the newest one; so where a key has several versions, the
// view asks each for its metadata.
const writtenMeta = "Kura-Written"

// asOfView maps keys to the version that was current at a time.
type asOfView struct {
	at time.Time
	mu sync.Mutex
	// ids holds, per key seen, the version id current at `at`, or ""
	// when the key did not exist then.
	ids map[string]string
}

// pick returns the newest version of vs written no later than the view's
// time. Delete markers are passed over: their times cannot be trusted
// on every server (versitygw 1.8 gives a marker the time of the version
// it hides), and taking a marker for earlier than it is would hide what
// an attack deleted. So an object deleted before the view's time shows
// in the view while its locked versions remain (docs/S3.md).
func (v *asOfView) pick(vs []version) (version, bool) {
	var best version
	found := false
	for _, x := range vs {
		if x.marker || x.mod.After(v.at) {
			continue
		}
		if !found || x.mod.After(best.mod) {
			best, found = x, true
		}
	}
	return best, found
}

// writtenTimes replaces the times of a key's versions by the ones their
// metadata records, when the key has more than one version or a delete
// marker (an object that was overwritten or deleted).
func (b *Backend) writtenTimes(ctx context.Context, key string, vs []version) error {
	if len(vs) < 2 {
		return nil
	}
	for i := range vs {
		if vs[i].marker {
			continue
		}
		st, err := b.core.StatObject(ctx, b.cfg.Bucket, key, minio.StatObjectOptions{VersionID: vs[i].id})
		if err != nil {
			return b.wrap("stat a version of", key, err)
		}
		for k, v := range st.UserMetadata {
			if strings.EqualFold(k, writtenMeta) || strings.EqualFold(k, "X-Amz-Meta-"+writtenMeta) {
				if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
					vs[i].mod = t
				}
			}
		}
	}
	return nil
}

// listAsOf is List on the view.
func (b *Backend) listAsOf(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	return b.eachKey(ctx, b.prefix+prefix, func(key string, vs []version) error {
		if err := b.writtenTimes(ctx, key, vs); err != nil {
			return err
		}
		x, ok := b.asOf.pick(vs)
		b.asOf.mu.Lock()
		if ok {
			b.asOf.ids[key] = x.id
		} else {
			b.asOf.ids[key] = ""
		}
		b.asOf.mu.Unlock()
		name := key[len(b.prefix):]
		if !ok || name == "" || name[len(name)-1] == '/' {
			return nil
		}
		return fn(backend.ObjectInfo{Name: name, Size: x.size, ModTime: x.mod})
	})
}

// versionAt returns the id of key's version current at the view's time,
// listing the key's versions if no listing has shown it yet; a key that
// did not exist then is backend.ErrNotFound.
func (b *Backend) versionAt(ctx context.Context, key string) (string, error) {
	b.asOf.mu.Lock()
	id, seen := b.asOf.ids[key]
	b.asOf.mu.Unlock()
	if !seen {
		err := b.eachKey(ctx, key, func(k string, vs []version) error {
			if k != key {
				return nil
			}
			if err := b.writtenTimes(ctx, key, vs); err != nil {
				return err
			}
			if x, ok := b.asOf.pick(vs); ok {
				id = x.id
			}
			return nil
		})
		if err != nil {
			return "", err
		}
		b.asOf.mu.Lock()
		b.asOf.ids[key] = id
		b.asOf.mu.Unlock()
	}
	if id == "" {
		return "", fmt.Errorf("%s as of %s: %w", b.show(key), b.asOf.at.Format(time.RFC3339), backend.ErrNotFound)
	}
	return id, nil
}

func (b *Backend) readOnly(op, name string) error {
	return fmt.Errorf("%s %s: the repository is opened as of %s: %w", op, name, b.asOf.at.Format(time.RFC3339), backend.ErrReadOnly)
}
