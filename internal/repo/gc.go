package repo

// Garbage collection runs while backups run, in two phases:
//
//  1. Mark: under the prune lock, find packs that no snapshot references
//     (and copy the live blobs out of mostly-dead packs), then write a
//     pending-deletion object "gc/<id>" naming those packs. From then on
//     every backup that loads the index leaves those packs out, so it never
//     deduplicates against them. After writing it, list the live locks: any
//     backup or reader that was running then may still use the packs, and is
//     recorded in the pending object.
//  2. Sweep: once every recorded lock has ended (finished, or its process
//     died), re-read all snapshots, keep back any doomed pack that a snapshot
//     written meanwhile needs, write a new index without the doomed packs,
//     delete the old index files, then the packs, then the pending object.
//
// A crash at any point leaves either duplicate index entries or
// unreferenced packs, never a snapshot pointing at missing data; the next
// prune finishes the job.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

type pendingDeletion struct {
	Created  time.Time `json:"created"`
	Packs    []string  `json:"packs"`
	WaitFor  []string  `json:"wait_for"`
	Complete bool      `json:"complete"` // WaitFor was recorded
}

func (r *Repo) savePending(ctx context.Context, name string, p pendingDeletion) error {
	data, _ := json.Marshal(p)
	sealed, err := r.sealObject(data)
	if err != nil {
		return err
	}
	return r.be.Save(ctx, name, sealed)
}

// loadPendings reads every pending deletion. One that cannot be read is
// left out with a warning (and returned by name in bad): its packs are then
// neither kept from writers nor deleted by a sweep, since no sweep can read
// which they are, so leaving it out loses nothing; prune removes it and the
// next mark judges those packs afresh.
func (r *Repo) loadPendings(ctx context.Context) (map[string]pendingDeletion, error) {
	out, _, err := r.loadPendingsBad(ctx)
	return out, err
}

func (r *Repo) loadPendingsBad(ctx context.Context) (map[string]pendingDeletion, map[string]error, error) {
	out := map[string]pendingDeletion{}
	bad := map[string]error{}
	var names []string
	if err := r.be.List(ctx, "gc/", func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	}); err != nil {
		return nil, nil, err
	}
	for _, name := range names {
		plain, err := r.loadObject(ctx, name)
		if errors.Is(err, backend.ErrNotFound) {
			continue
		}
		var p pendingDeletion
		if err == nil && json.Unmarshal(plain, &p) != nil {
			err = fmt.Errorf("%s is damaged: %w", name, ErrDamaged)
		}
		if errors.Is(err, ErrDamaged) {
			r.log.Warn("pending deletion record is unreadable; its packs stay until `kura prune` judges them again", "object", name, "err", err)
			bad[name] = err
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		out[name] = p
	}
	return out, bad, nil
}

// doomedPacks returns the packs queued for deletion.
func (r *Repo) doomedPacks(ctx context.Context) (map[crypt.ID]bool, error) {
	ps, err := r.loadPendings(ctx)
	if err != nil {
		return nil, err
	}
	out := map[crypt.ID]bool{}
	for _, p := range ps {
		for _, s := range p.Packs {
			if id, err := crypt.ParseID(s); err == nil {
				out[id] = true
			}
		}
	}
	return out, nil
}

// Referenced returns every blob id that some snapshot needs, and the
// snapshots it read. A snapshot whose map cannot be read fails the call:
// pruning without knowing what it references could delete its data.
func (r *Repo) Referenced(ctx context.Context) (map[crypt.ID]struct{}, []*Snapshot, error) {
	ss, err := r.Snapshots(ctx)
	if err != nil {
		return nil, nil, err
	}
	ref := map[crypt.ID]struct{}{}
	for _, s := range ss {
		for _, d := range s.Disks {
			for _, m := range d.Maps {
				ref[m] = struct{}{}
			}
			ids, err := r.LoadMap(ctx, d)
			if err != nil {
				return nil, nil, fmt.Errorf("snapshot %s: %w", s.ID[:8], err)
			}
			for _, id := range ids.All() {
				if !id.IsZero() {
					ref[id] = struct{}{}
				}
			}
		}
	}
	return ref, ss, nil
}

// PruneOptions tune a prune.
type PruneOptions struct {
	// RepackBelow: packs whose live bytes are below this fraction have their
	// live blobs copied to new packs so the old pack can be deleted.
	RepackBelow float64
	DryRun      bool
}

// PruneResult says what a prune did (or, in a dry run, would do now).
type PruneResult struct {
	Snapshots      int      `json:"snapshots"`
	PacksDeleted   int      `json:"packs_deleted"`
	BytesFreed     int64    `json:"bytes_freed"` // the deleted packs' size
	PacksRepacked  int      `json:"packs_repacked"`
	PacksPending   int      `json:"packs_pending"` // marked, waiting for running backups
	BytesPending   int64    `json:"bytes_pending"`
	WaitingFor     []string `json:"waiting_for,omitempty"` // those backups' locks
	PacksKept      int      `json:"packs_kept,omitempty"`  // unreadable packs no index lists, kept
	IndexRewritten bool     `json:"index_rewritten"`
	TempRemoved    int      `json:"temp_removed"` // temporary files of writers that died
	TempBytes      int64    `json:"temp_bytes"`
	// Lock is what the prune did for the object lock of a locked
	// repository (extended locks, purged versions); nil on others. There
	// BytesFreed is what the deleted packs held, freed on storage only
	// when their lock ends and a later prune purges them.
	Lock *LockResult `json:"lock,omitempty"`
}

// Prune deletes data that no snapshot references. It is safe to run while
// backups run (see the comment at the top of gc.go). It never deletes a
// pack that holds the only intact copy of a chunk a snapshot references,
// whether an index lists that pack or not, nor a pack whose header cannot
// be read.
func (r *Repo) Prune(ctx context.Context, opts PruneOptions) (PruneResult, error) {
	var res PruneResult
	lock, err := r.Lock(ctx, LockPrune)
	if err != nil {
		return res, err
	}
	defer lock.Unlock(context.WithoutCancel(ctx))
	if tc, ok := r.be.(backend.TempCleaner); ok && !opts.DryRun {
		if res.TempRemoved, res.TempBytes, err = tc.RemoveStaleTemp(ctx); err != nil {
			return res, err
		}
	}

	// Records nothing depends on that cannot be read go.
	if !opts.DryRun {
		for _, prefix := range []string{"bootchecks/", "damage/"} {
			bad, err := r.unreadableRecords(ctx, prefix)
			if err != nil {
				return res, err
			}
			for name := range bad {
				if err := r.be.Remove(ctx, name); err != nil && !errors.Is(err, backend.ErrNotFound) {
					return res, err
				}
			}
		}
	}
	// Sweep what earlier prunes marked, so their space is freed first.
	if !opts.DryRun {
		if err := r.sweep(ctx, &res); err != nil {
			return res, err
		}
	}
	if err := r.mark(ctx, opts, &res); err != nil {
		return res, err
	}
	if !opts.DryRun {
		res.PacksPending, res.BytesPending, res.WaitingFor = 0, 0, nil
		if err := r.sweep(ctx, &res); err != nil {
			return res, err
		}
		if res.Lock, err = r.maintainLocks(ctx); err != nil {
			return res, err
		}
	}
	return res, nil
}

func (r *Repo) reloadIndex(ctx context.Context) error {
	r.forgetIndex()
	return r.LoadIndex(ctx)
}

// forgetIndex drops the loaded index so the next LoadIndex reads it again.
func (r *Repo) forgetIndex() {
	r.idxMu.Lock()
	r.loaded = false
	r.idx = newIndex()
	r.idxMu.Unlock()
}

// fullIndex reloads the index with every pack on storage in it: the
// packs no index file lists are read from their headers. It returns the
// packs on storage with their sizes, and those whose header is unreadable.
func (r *Repo) fullIndex(ctx context.Context) (map[crypt.ID]int64, ScanResult, error) {
	if err := r.reloadIndex(ctx); err != nil {
		return nil, ScanResult{}, err
	}
	scan, err := r.ScanUnindexedPacks(ctx)
	if err != nil {
		return nil, scan, err
	}
	onDisk := map[crypt.ID]int64{}
	if err := r.be.List(ctx, "data/", func(oi backend.ObjectInfo) error {
		if id, err := crypt.ParseID(oi.Name[strings.LastIndex(oi.Name, "/")+1:]); err == nil {
			onDisk[id] = oi.Size
		}
		return nil
	}); err != nil {
		return nil, scan, err
	}
	return onDisk, scan, nil
}

// live reports whether the copy of id in pack p must be kept: a snapshot
// references id and this is its best copy (the intact one, or, when none
// is intact, the damaged one — never deleted while it is all there is).
func (r *Repo) live(ref map[crypt.ID]struct{}, id, p crypt.ID) bool {
	if _, ok := ref[id]; !ok {
		return false
	}
	l, ok := r.idx.Lookup(id)
	return ok && l.Pack == p
}

func (r *Repo) mark(ctx context.Context, opts PruneOptions, res *PruneResult) error {
	onDisk, scan, err := r.fullIndex(ctx)
	if err != nil {
		return err
	}
	ref, ss, err := r.Referenced(ctx)
	if err != nil {
		return fmt.Errorf("prune refuses to run: %w", err)
	}
	res.Snapshots = len(ss)
	for id := range ref {
		if _, ok := r.idx.Lookup(id); !ok {
			return fmt.Errorf("prune refuses to run: chunk %s needed by a snapshot is missing: %w; run `kura verify`, then `kura repair snapshots`", id.Short(), ErrDamaged)
		}
	}
	doomedAlready, err := r.doomedPacks(ctx)
	if err != nil {
		return err
	}
	byPack := r.idx.byPack()
	var doom, repack []crypt.ID
	for p := range onDisk {
		if doomedAlready[p] {
			continue
		}
		if _, bad := scan.Unreadable[p]; bad {
			r.log.Warn("keeping a pack whose header is unreadable and that no index lists", "pack", p.Short(), "err", scan.Unreadable[p])
			res.PacksKept++
			continue
		}
		es := byPack[p]
		var live, total int64
		damagedLive, damagedDead := false, false
		for _, e := range es {
			total += int64(e.Length)
			damaged := r.idx.Damage(e.ID, p) != ""
			if r.live(ref, e.ID, p) {
				live += int64(e.Length)
				damagedLive = damagedLive || damaged
			} else {
				damagedDead = damagedDead || damaged
			}
		}
		switch {
		case live == 0:
			doom = append(doom, p)
		case damagedLive:
			// Holds the only copy of a referenced chunk, damaged: keep
			// it as it is until a backup stores the chunk again.
		case damagedDead, r.idx.BadHeader(p) != "", float64(live) < opts.RepackBelow*float64(total):
			// A damaged copy whose chunk was stored again goes at once,
			// and so does a pack whose header is damaged (its chunks,
			// checked, move to a new pack with a good header).
			repack = append(repack, p)
		}
	}
	// Packs the index names that are gone from storage: once no snapshot
	// needs them (their chunks were stored again, or forgotten), the
	// sweep drops their entries and damage records.
	for p, es := range byPack {
		if _, ok := onDisk[p]; ok || doomedAlready[p] {
			continue
		}
		live := false
		for _, e := range es {
			live = live || r.live(ref, e.ID, p)
		}
		if !live {
			doom = append(doom, p)
		}
	}
	if opts.DryRun {
		n, bytes := 0, int64(0)
		for _, p := range append(doom, repack...) {
			if size, ok := onDisk[p]; ok { // a pack already gone is not deleted again
				n++
				bytes += size
			}
		}
		res.PacksRepacked = len(repack)
		return r.dryRunSweep(ctx, res, n, bytes, doomedAlready, onDisk)
	}
	for _, p := range repack {
		ok, err := r.repack(ctx, p, byPack[p], ref)
		if err != nil {
			return err
		}
		if ok {
			doom = append(doom, p)
			res.PacksRepacked++
		}
	}
	if len(doom) == 0 {
		return nil
	}
	if err := r.Flush(ctx); err != nil {
		return err
	}
	pd := pendingDeletion{Created: time.Now().UTC()}
	for _, p := range doom {
		pd.Packs = append(pd.Packs, p.String())
	}
	sort.Strings(pd.Packs)
	name := "gc/" + crypt.RandomID().String()
	if err := r.savePending(ctx, name, pd); err != nil {
		return err
	}
	return r.recordWaiters(ctx, name, pd)
}

// dryRunSweep fills a dry run's figures as the real run would: the n
// packs (bytes) it would mark, and the packs earlier prunes marked, are
// deleted now unless a backup or reader is running, else they wait.
func (r *Repo) dryRunSweep(ctx context.Context, res *PruneResult, n int, bytes int64, pending map[crypt.ID]bool, onDisk map[crypt.ID]int64) error {
	for p := range pending {
		if size, ok := onDisk[p]; ok {
			n++
			bytes += size
		}
	}
	live, err := r.liveLocks(ctx)
	if err != nil {
		return err
	}
	for name, li := range live {
		if li.Kind != LockPrune {
			res.WaitingFor = append(res.WaitingFor, name)
		}
	}
	sort.Strings(res.WaitingFor)
	if len(res.WaitingFor) > 0 {
		res.PacksPending, res.BytesPending = n, bytes
	} else {
		res.PacksDeleted, res.BytesFreed = n, bytes
	}
	return nil
}

// recordWaiters lists the live non-prune locks after the pending object
// exists and records them in it.
func (r *Repo) recordWaiters(ctx context.Context, name string, pd pendingDeletion) error {
	live, err := r.liveLocks(ctx)
	if err != nil {
		return err
	}
	pd.WaitFor = nil
	for n, li := range live {
		if li.Kind != LockPrune {
			pd.WaitFor = append(pd.WaitFor, n)
		}
	}
	sort.Strings(pd.WaitFor)
	pd.Complete = true
	return r.savePending(ctx, name, pd)
}

// repack copies the live blobs of pack p into new packs, unchanged (they
// stay sealed), each checked first: a damaged blob is never spread. It
// reports whether p may go; a blob found damaged with no other intact
// copy keeps p (and is recorded as damaged).
func (r *Repo) repack(ctx context.Context, p crypt.ID, es []packEntry, ref map[crypt.ID]struct{}) (bool, error) {
	data, err := r.be.Load(ctx, packName(p), 0, 0)
	if err != nil {
		err = packError(p, err)
		if errors.Is(err, ErrDamaged) {
			r.log.Warn("not repacking an unreadable pack", "pack", p.Short(), "err", err)
			return false, nil
		}
		return false, fmt.Errorf("repacking: %w", err)
	}
	ok := true
	for _, e := range es {
		if !r.live(ref, e.ID, p) {
			continue
		}
		end := int64(e.Offset) + int64(e.Length)
		l := Loc{Pack: p, Type: e.Type, Compressed: e.Compressed, Offset: e.Offset, Length: e.Length, RawLength: e.RawLength}
		var sealed []byte
		if end > int64(len(data)) {
			err = fmt.Errorf("chunk %s in pack %s: beyond the pack's end: %w", e.ID.Short(), p.Short(), ErrDamaged)
		} else {
			sealed = append([]byte(nil), data[e.Offset:end]...)
			_, err = r.openBlob(e.ID, l, sealed, nil, false)
		}
		if err != nil {
			if r.healable(ctx, e.ID, l, err) {
				continue // an intact copy elsewhere: this one is garbage now
			}
			ok = false
			continue
		}
		r.wmu.Lock()
		r.pw().inflight[e.ID] = struct{}{}
		r.wmu.Unlock()
		if err := r.SaveBlob(ctx, e.Type, e.ID, sealed, e.Compressed, int(e.RawLength)); err != nil {
			return false, err
		}
	}
	return ok, nil
}

// sweep deletes the packs of every pending deletion whose waiters ended,
// and removes the pending deletions that cannot be read.
func (r *Repo) sweep(ctx context.Context, res *PruneResult) error {
	pendings, bad, err := r.loadPendingsBad(ctx)
	if err != nil {
		return err
	}
	for name := range bad {
		if err := r.be.Remove(ctx, name); err != nil && !errors.Is(err, backend.ErrNotFound) {
			return err
		}
	}
	if len(pendings) == 0 {
		return nil
	}
	live, err := r.liveLocks(ctx)
	if err != nil {
		return err
	}
	ready := map[string]pendingDeletion{}
	waiting := map[crypt.ID]bool{}
	for name, pd := range pendings {
		if !pd.Complete {
			// The prune that marked it died before recording waiters;
			// everything live now is a superset of them.
			if err := r.recordWaiters(ctx, name, pd); err != nil {
				return err
			}
		}
		wait := !pd.Complete
		for _, w := range pd.WaitFor {
			if _, ok := live[w]; ok {
				wait = true
				res.WaitingFor = append(res.WaitingFor, w)
			}
		}
		if wait {
			for _, s := range pd.Packs {
				if id, err := crypt.ParseID(s); err == nil {
					waiting[id] = true
				}
			}
			continue
		}
		ready[name] = pd
	}
	sort.Strings(res.WaitingFor)
	res.WaitingFor = slices.Compact(res.WaitingFor)
	doom := map[crypt.ID]bool{}
	for _, pd := range ready {
		for _, s := range pd.Packs {
			if id, err := crypt.ParseID(s); err == nil {
				doom[id] = true
			}
		}
	}
	onDisk, scan, err := r.fullIndex(ctx)
	if err != nil {
		return err
	}
	for p := range waiting {
		if size, ok := onDisk[p]; ok {
			res.PacksPending++
			res.BytesPending += size
		}
	}
	if len(ready) == 0 {
		return nil
	}
	// Snapshots written since the mark may use blobs of doomed packs (a
	// backup that started before the mark): keep a pack that holds the
	// best copy of a referenced chunk, the one readers use.
	ref, _, err := r.Referenced(ctx)
	if err != nil {
		return fmt.Errorf("prune refuses to delete: %w", err)
	}
	for id := range ref {
		if l, ok := r.idx.Lookup(id); ok && doom[l.Pack] {
			delete(doom, l.Pack)
		}
	}
	for p := range scan.Unreadable {
		delete(doom, p)
	}
	// New index: every copy outside the doomed packs (packs read from
	// their headers included), then drop the old files.
	keep := map[crypt.ID][]packEntry{}
	for p, es := range r.idx.byPack() {
		if !doom[p] {
			keep[p] = es
		}
	}
	if _, err := r.saveIndex(ctx, keep); err != nil {
		return err
	}
	res.IndexRewritten = true
	for _, f := range r.idx.files {
		if err := r.be.Remove(ctx, f); err != nil && !errors.Is(err, backend.ErrNotFound) {
			return err
		}
	}
	deleted := map[crypt.ID]bool{}
	for p := range doom {
		err := r.be.Remove(ctx, packName(p))
		if err != nil && !errors.Is(err, backend.ErrNotFound) {
			return err
		}
		if err == nil {
			res.PacksDeleted++
			res.BytesFreed += onDisk[p]
		}
		deleted[p] = true
	}
	if err := r.forgetDamage(ctx, deleted); err != nil {
		return err
	}
	for name := range ready {
		if err := r.be.Remove(ctx, name); err != nil && !errors.Is(err, backend.ErrNotFound) {
			return err
		}
	}
	return r.reloadIndex(ctx)
}
