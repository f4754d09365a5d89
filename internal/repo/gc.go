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

func (r *Repo) loadPendings(ctx context.Context) (map[string]pendingDeletion, error) {
	out := map[string]pendingDeletion{}
	var names []string
	if err := r.be.List(ctx, "gc/", func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	}); err != nil {
		return nil, err
	}
	for _, name := range names {
		plain, err := r.loadObject(ctx, name)
		if errors.Is(err, backend.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		var p pendingDeletion
		if err := json.Unmarshal(plain, &p); err != nil {
			return nil, fmt.Errorf("%s is damaged: %w", name, ErrDamaged)
		}
		out[name] = p
	}
	return out, nil
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

// rawIndex is every index file's entries, doomed packs included.
type rawIndex struct {
	files []string
	packs map[crypt.ID][]packEntry
}

func (r *Repo) loadRawIndex(ctx context.Context) (*rawIndex, error) {
	ri := &rawIndex{packs: map[crypt.ID][]packEntry{}}
	if err := r.be.List(ctx, "index/", func(oi backend.ObjectInfo) error {
		ri.files = append(ri.files, oi.Name)
		return nil
	}); err != nil {
		return nil, err
	}
	for _, name := range ri.files {
		plain, err := r.loadObject(ctx, name)
		if err != nil {
			return nil, err
		}
		packs, err := decodeIndex(plain)
		if err != nil {
			return nil, fmt.Errorf("%s is damaged (%v): %w", name, err, ErrDamaged)
		}
		for p, es := range packs {
			if _, seen := ri.packs[p]; !seen {
				ri.packs[p] = es
			}
		}
	}
	return ri, nil
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

// referencedFull computes the referenced set against an index that still
// holds doomed packs: the normal index leaves them out, but snapshots
// written by backups that started before their mark may use their blobs.
func (r *Repo) referencedFull(ctx context.Context) (map[crypt.ID]struct{}, []*Snapshot, *Index, *rawIndex, error) {
	ri, err := r.loadRawIndex(ctx)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	full := newIndex()
	for p, es := range ri.packs {
		full.add(p, es)
	}
	saved := r.idx
	r.idx = full
	ref, ss, err := r.Referenced(ctx)
	r.idx = saved
	return ref, ss, full, ri, err
}

// PruneOptions tune a prune.
type PruneOptions struct {
	// RepackBelow: packs whose live bytes are below this fraction have their
	// live blobs copied to new packs so the old pack can be deleted.
	RepackBelow float64
	DryRun      bool
}

// PruneResult says what a prune did.
type PruneResult struct {
	Snapshots      int      `json:"snapshots"`
	PacksDeleted   int      `json:"packs_deleted"`
	PacksRepacked  int      `json:"packs_repacked"`
	BytesFreed     int64    `json:"bytes_freed"`
	PacksPending   int      `json:"packs_pending"`         // marked, waiting for running backups
	WaitingFor     []string `json:"waiting_for,omitempty"` // those backups' locks
	IndexRewritten bool     `json:"index_rewritten"`
}

// Prune deletes data that no snapshot references. It is safe to run while
// backups run (see the comment at the top of gc.go).
func (r *Repo) Prune(ctx context.Context, opts PruneOptions) (PruneResult, error) {
	var res PruneResult
	lock, err := r.Lock(ctx, LockPrune)
	if err != nil {
		return res, err
	}
	defer lock.Unlock(context.WithoutCancel(ctx))

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
		if err := r.sweep(ctx, &res); err != nil {
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

func (r *Repo) mark(ctx context.Context, opts PruneOptions, res *PruneResult) error {
	if err := r.reloadIndex(ctx); err != nil {
		return err
	}
	ref, ss, full, _, err := r.referencedFull(ctx)
	if err != nil {
		return fmt.Errorf("prune refuses to run: %w", err)
	}
	res.Snapshots = len(ss)
	for id := range ref {
		if !full.Has(id) {
			return fmt.Errorf("prune refuses to run: chunk %s needed by a snapshot is missing: %w; run `kura verify`", id.Short(), ErrDamaged)
		}
	}
	// Packs on storage that no index names (left by a crashed backup).
	onDisk := map[crypt.ID]int64{}
	if err := r.be.List(ctx, "data/", func(oi backend.ObjectInfo) error {
		if id, err := crypt.ParseID(oi.Name[strings.LastIndex(oi.Name, "/")+1:]); err == nil {
			onDisk[id] = oi.Size
		}
		return nil
	}); err != nil {
		return err
	}
	doomedAlready, err := r.doomedPacks(ctx)
	if err != nil {
		return err
	}
	byPack := r.idx.byPack()
	var doom []crypt.ID
	var repack []crypt.ID
	for p := range onDisk {
		if doomedAlready[p] {
			continue
		}
		es, indexed := byPack[p]
		if !indexed {
			doom = append(doom, p)
			continue
		}
		var live, total int64
		for _, e := range es {
			total += int64(e.Length)
			if _, ok := ref[e.ID]; ok {
				live += int64(e.Length)
			}
		}
		switch {
		case live == 0:
			doom = append(doom, p)
		case float64(live) < opts.RepackBelow*float64(total):
			repack = append(repack, p)
		}
	}
	for _, p := range doom {
		res.BytesFreed += onDisk[p]
	}
	res.PacksRepacked = len(repack)
	if opts.DryRun || len(doom)+len(repack) == 0 {
		res.PacksPending = len(doom) + len(repack)
		return nil
	}
	for _, p := range repack {
		if err := r.repack(ctx, p, byPack[p], ref); err != nil {
			return err
		}
		doom = append(doom, p)
		res.BytesFreed += onDisk[p]
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
// stay sealed).
func (r *Repo) repack(ctx context.Context, p crypt.ID, es []packEntry, ref map[crypt.ID]struct{}) error {
	data, err := r.be.Load(ctx, packName(p), 0, 0)
	if err != nil {
		return fmt.Errorf("repacking %s: %w", p.Short(), err)
	}
	for _, e := range es {
		if _, ok := ref[e.ID]; !ok {
			continue
		}
		end := int64(e.Offset) + int64(e.Length)
		if end > int64(len(data)) {
			return fmt.Errorf("repacking %s: blob beyond pack end: %w", p.Short(), ErrDamaged)
		}
		sealed := append([]byte(nil), data[e.Offset:end]...)
		l := Loc{Pack: p, Type: e.Type, Compressed: e.Compressed, Offset: e.Offset, Length: e.Length, RawLength: e.RawLength}
		// Check before copying: never spread a damaged blob.
		if _, err := r.openBlob(e.ID, l, sealed, nil, false); err != nil {
			return fmt.Errorf("repacking: %w", err)
		}
		r.wmu.Lock()
		r.pw().inflight[e.ID] = struct{}{}
		r.wmu.Unlock()
		if err := r.SaveBlob(ctx, e.Type, e.ID, sealed, e.Compressed, int(e.RawLength)); err != nil {
			return err
		}
	}
	return nil
}

// sweep deletes the packs of every pending deletion whose waiters ended.
func (r *Repo) sweep(ctx context.Context, res *PruneResult) error {
	pendings, err := r.loadPendings(ctx)
	if err != nil || len(pendings) == 0 {
		return err
	}
	live, err := r.liveLocks(ctx)
	if err != nil {
		return err
	}
	ready := map[string]pendingDeletion{}
	res.WaitingFor = nil
	for name, pd := range pendings {
		if !pd.Complete {
			// The prune that marked it died before recording waiters;
			// everything live now is a superset of them.
			if err := r.recordWaiters(ctx, name, pd); err != nil {
				return err
			}
			res.PacksPending += len(pd.Packs)
			continue
		}
		waiting := false
		for _, w := range pd.WaitFor {
			if _, ok := live[w]; ok {
				waiting = true
				res.WaitingFor = append(res.WaitingFor, w)
			}
		}
		if waiting {
			res.PacksPending += len(pd.Packs)
			continue
		}
		ready[name] = pd
	}
	if len(ready) == 0 {
		return nil
	}
	doom := map[crypt.ID]bool{}
	for _, pd := range ready {
		for _, s := range pd.Packs {
			if id, err := crypt.ParseID(s); err == nil {
				doom[id] = true
			}
		}
	}
	// Snapshots written since the mark may use blobs of doomed packs (a
	// backup that started before the mark). Keep such packs.
	if err := r.reloadIndex(ctx); err != nil {
		return err
	}
	ref, _, full, ri, err := r.referencedFull(ctx)
	if err != nil {
		return fmt.Errorf("prune refuses to delete: %w", err)
	}
	for id := range ref {
		if r.idx.Has(id) {
			continue
		}
		if l, ok := full.Lookup(id); ok && doom[l.Pack] {
			delete(doom, l.Pack)
		}
	}
	// New index: every pack but the doomed ones, then drop the old files.
	keep := map[crypt.ID][]packEntry{}
	for p, es := range ri.packs {
		if !doom[p] {
			keep[p] = es
		}
	}
	if _, err := r.saveIndex(ctx, keep); err != nil {
		return err
	}
	res.IndexRewritten = true
	for _, f := range ri.files {
		if err := r.be.Remove(ctx, f); err != nil && !errors.Is(err, backend.ErrNotFound) {
			return err
		}
	}
	for p := range doom {
		err := r.be.Remove(ctx, packName(p))
		if err != nil && !errors.Is(err, backend.ErrNotFound) {
			return err
		}
		res.PacksDeleted++
	}
	for name := range ready {
		if err := r.be.Remove(ctx, name); err != nil && !errors.Is(err, backend.ErrNotFound) {
			return err
		}
	}
	return r.reloadIndex(ctx)
}
