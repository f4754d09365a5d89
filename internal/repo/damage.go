package repo

// Damage found is damage healed.
//
// A stored copy of a blob that fails to read back (authentication fails,
// its content does not match its id, its pack is missing or truncated) is
// recorded in a "damage/<id>" object, wherever it was found: a restore, an
// export, verify --read-data, a prune's repack. From then on:
//
//   - Index.Has leaves the copy out, so no backup deduplicates against it:
//     the next backup that reads the same bytes stores the chunk again (and
//     an incremental backup reads positions whose chunk has no intact copy,
//     see backup's plan). Because a chunk's id is the keyed hash of its
//     plaintext, the fresh copy heals every restore point that references
//     the id.
//   - Index.Lookup prefers any intact copy, so readers use the fresh one.
//   - Prune treats a damaged copy as garbage once an intact copy exists,
//     and keeps it (never repacking it) while none does; when the pack
//     holding it is deleted, its record goes too.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// damageRecord is the content of a "damage/<id>" object.
type damageRecord struct {
	Time     time.Time     `json:"time"`
	Hostname string        `json:"hostname,omitempty"`
	Copies   []damagedCopy `json:"copies"`
}

// damagedCopy names one damaged stored copy of a blob, or (Blob is
// headerBlob) a pack whose header is damaged.
type damagedCopy struct {
	Blob  string `json:"blob"`
	Pack  string `json:"pack"`
	Error string `json:"error"`
}

// headerBlob in a damage record names a pack's header rather than a blob.
const headerBlob = "header"

type damageEntry struct {
	id, pack crypt.ID
	why      string
	object   string // the damage/ object that records it
}

// loadDamage reads every damage record. A record that cannot be read is
// skipped: it only ever makes backups store more.
func (r *Repo) loadDamage(ctx context.Context) ([]damageEntry, error) {
	var names []string
	if err := r.be.List(ctx, "damage/", func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	}); err != nil {
		return nil, err
	}
	sort.Strings(names)
	var out []damageEntry
	for _, name := range names {
		plain, err := r.loadObject(ctx, name)
		switch {
		case errors.Is(err, backend.ErrNotFound):
			continue
		case errors.Is(err, ErrDamaged):
			r.log.Warn("damage record is unreadable; ignoring it", "object", name, "err", err)
			continue
		case err != nil:
			return nil, err
		}
		var rec damageRecord
		if err := json.Unmarshal(plain, &rec); err != nil {
			r.log.Warn("damage record is unreadable; ignoring it", "object", name, "err", err)
			continue
		}
		for _, c := range rec.Copies {
			id, err1 := crypt.ParseID(c.Blob)
			if c.Blob == headerBlob {
				id, err1 = crypt.ID{}, nil
			}
			pack, err2 := crypt.ParseID(c.Pack)
			if err1 == nil && err2 == nil {
				out = append(out, damageEntry{id: id, pack: pack, why: c.Error, object: name})
			}
		}
	}
	return out, nil
}

// maxDamageWhy bounds the reason kept per damaged copy.
const maxDamageWhy = 300

// ReportDamage records that the copy of blob id stored in pack is damaged
// (cause says how it failed; only errors wrapping ErrDamaged are recorded).
// From then on no backup reuses that copy, readers prefer any other, and
// prune removes it once an intact copy exists. Reporting a copy already
// known is a no-op.
func (r *Repo) ReportDamage(ctx context.Context, id, pack crypt.ID, cause error) error {
	return r.reportDamage(ctx, []damagedCopy{{Blob: id.String(), Pack: pack.String(), Error: errText(cause)}}, cause)
}

// ReportDamages is ReportDamage for several blobs of one pack that failed
// together (a pack found missing or truncated), recorded in one object.
func (r *Repo) ReportDamages(ctx context.Context, ids []crypt.ID, pack crypt.ID, cause error) error {
	copies := make([]damagedCopy, len(ids))
	for i, id := range ids {
		copies[i] = damagedCopy{Blob: id.String(), Pack: pack.String(), Error: errText(cause)}
	}
	return r.reportDamage(ctx, copies, cause)
}

func errText(err error) string {
	s := "damaged"
	if err != nil {
		s = err.Error()
	}
	if len(s) > maxDamageWhy {
		s = s[:maxDamageWhy]
	}
	return s
}

// reportDamage records copies found damaged together, in one object.
func (r *Repo) reportDamage(ctx context.Context, copies []damagedCopy, cause error) error {
	if cause != nil && !errors.Is(cause, ErrDamaged) {
		return nil
	}
	var news []damagedCopy
	for _, c := range copies {
		pack, err := crypt.ParseID(c.Pack)
		if err != nil {
			continue
		}
		if c.Blob == headerBlob {
			if r.idx.markBadHeader(pack, c.Error) {
				news = append(news, c)
			}
			continue
		}
		id, err := crypt.ParseID(c.Blob)
		if err != nil {
			continue
		}
		if r.idx.markDamaged(id, pack, c.Error) {
			news = append(news, c)
		}
	}
	if len(news) == 0 {
		return nil
	}
	for _, c := range news {
		if c.Blob == headerBlob {
			r.log.Warn("pack header is damaged; the next prune copies its chunks to a new pack", "pack", c.Pack[:8], "err", c.Error)
			continue
		}
		r.log.Warn("chunk is damaged; the next backup that reads its data stores it again", "chunk", c.Blob[:8], "pack", c.Pack[:8], "err", c.Error)
	}
	if err := r.saveDamage(ctx, news); err != nil {
		r.log.Warn("could not record damaged chunks in the repository", "err", err)
		return err
	}
	return nil
}

func (r *Repo) saveDamage(ctx context.Context, copies []damagedCopy) error {
	host, _ := os.Hostname()
	data, err := json.Marshal(damageRecord{Time: time.Now().UTC(), Hostname: host, Copies: copies})
	if err != nil {
		return err
	}
	sealed, err := r.sealObject(data)
	if err != nil {
		return err
	}
	if err := r.be.Save(ctx, "damage/"+crypt.RandomID().String(), sealed); err != nil {
		return fmt.Errorf("recording damaged chunks: %w", err)
	}
	return nil
}

// DamagedCopy is one stored copy of a blob known to be damaged.
type DamagedCopy struct {
	Blob   crypt.ID `json:"blob"`
	Pack   crypt.ID `json:"pack"`
	Error  string   `json:"error"`
	Healed bool     `json:"healed"` // an intact copy exists
}

// DamagedCopies lists the copies recorded as damaged (after LoadIndex).
func (r *Repo) DamagedCopies() []DamagedCopy {
	x := r.idx
	x.mu.RLock()
	defer x.mu.RUnlock()
	var out []DamagedCopy
	for k, why := range x.damaged {
		l, ok := x.blobs[k.id]
		healed := ok && x.rank(k.id, l) < 2
		out = append(out, DamagedCopy{Blob: k.id, Pack: x.packs[k.pack], Error: why, Healed: healed})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Blob.String() < out[j].Blob.String() })
	return out
}

// forgetDamage rewrites the damage records without the copies in packs
// that no longer exist.
func (r *Repo) forgetDamage(ctx context.Context, deleted map[crypt.ID]bool) error {
	entries, err := r.loadDamage(ctx)
	if err != nil {
		return err
	}
	drop := map[string]bool{} // objects naming a deleted pack
	for _, e := range entries {
		if deleted[e.pack] {
			drop[e.object] = true
		}
	}
	if len(drop) == 0 {
		return nil
	}
	var keep []damagedCopy
	for _, e := range entries {
		if drop[e.object] && !deleted[e.pack] {
			blob := e.id.String()
			if e.id.IsZero() {
				blob = headerBlob
			}
			keep = append(keep, damagedCopy{Blob: blob, Pack: e.pack.String(), Error: e.why})
		}
	}
	if len(keep) > 0 {
		if err := r.saveDamage(ctx, keep); err != nil {
			return err
		}
	}
	for name := range drop {
		if err := r.be.Remove(ctx, name); err != nil && !errors.Is(err, backend.ErrNotFound) {
			return err
		}
	}
	return nil
}
