package repo

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// RepairIndexResult says what RepairIndex did.
type RepairIndexResult struct {
	Packs        int `json:"packs"`          // packs read
	Blobs        int `json:"blobs"`          // blobs indexed
	FromOldIndex int `json:"from_old_index"` // packs whose header is unreadable, kept from the old index
	// Unreadable packs: header unreadable and no readable index lists them.
	Unreadable   map[string]string `json:"unreadable,omitempty"`
	FilesWritten int               `json:"files_written"`
	FilesRemoved int               `json:"files_removed"`
}

// packsPerIndexFile bounds the size of one index file RepairIndex writes.
const packsPerIndexFile = 4096

// RepairIndex rebuilds the index from the pack headers: every pack on
// storage is read from its header (a few KiB at its end), new index files
// are written, and the old ones, damaged or not, are removed. A pack whose
// header is unreadable keeps the entries a readable old index file gave it;
// with none, it is reported (its chunks cannot be found).
//
// It takes the prune lock: no prune runs meanwhile. Backups may run: an
// index file written after the old ones were listed is kept.
func (r *Repo) RepairIndex(ctx context.Context) (RepairIndexResult, error) {
	res := RepairIndexResult{Unreadable: map[string]string{}}
	lock, err := r.Lock(ctx, LockPrune)
	if err != nil {
		return res, err
	}
	defer lock.Unlock(context.WithoutCancel(ctx))
	old, bad, err := r.buildIndex(ctx)
	if err != nil {
		return res, err
	}
	for _, name := range sortedKeys(bad) {
		r.log.Warn("index file is damaged; it is replaced", "file", name, "err", bad[name])
	}
	oldByPack := old.byPack()
	var packs []backend.ObjectInfo
	if err := r.be.List(ctx, "data/", func(oi backend.ObjectInfo) error {
		packs = append(packs, oi)
		return nil
	}); err != nil {
		return res, err
	}
	fresh := map[crypt.ID][]packEntry{}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, oi := range packs {
		id, err := crypt.ParseID(oi.Name[strings.LastIndex(oi.Name, "/")+1:])
		if err != nil {
			continue
		}
		g.Go(func() error {
			es, err := r.readPackHeader(gctx, id, oi.Size)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				fresh[id] = es
				res.Packs++
				res.Blobs += len(es)
			case errors.Is(err, backend.ErrNotFound):
			case errors.Is(err, ErrDamaged):
				if es := oldByPack[id]; len(es) > 0 {
					fresh[id] = es
					res.FromOldIndex++
					res.Blobs += len(es)
					r.log.Warn("pack header is unreadable; keeping what the old index says of it", "pack", id.Short(), "err", err)
				} else {
					res.Unreadable[id.String()] = err.Error()
				}
			default:
				return err
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	ids := make([]crypt.ID, 0, len(fresh))
	for id := range fresh {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i].String() < ids[j].String() })
	for len(ids) > 0 {
		n := min(len(ids), packsPerIndexFile)
		part := map[crypt.ID][]packEntry{}
		for _, id := range ids[:n] {
			part[id] = fresh[id]
		}
		if _, err := r.saveIndex(ctx, part); err != nil {
			return res, err
		}
		res.FilesWritten++
		ids = ids[n:]
	}
	for _, f := range old.files {
		if err := r.be.Remove(ctx, f); err != nil && !errors.Is(err, backend.ErrNotFound) {
			return res, err
		}
		res.FilesRemoved++
	}
	r.forgetIndex()
	return res, nil
}

// Range is a span of a disk, in bytes.
type Range struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// addRange appends [off, off+n) to rs, merging it with the last range when
// they touch.
func addRange(rs []Range, off, n int64) []Range {
	if k := len(rs) - 1; k >= 0 && rs[k].Offset+rs[k].Length == off {
		rs[k].Length += n
		return rs
	}
	return append(rs, Range{off, n})
}

// LostDisk is one disk of a snapshot with data that cannot be restored.
type LostDisk struct {
	Name    string  `json:"name"`
	Missing int     `json:"missing"` // chunks no pack holds
	Damaged int     `json:"damaged"` // chunks stored only damaged
	Ranges  []Range `json:"ranges"`  // the bytes they cover
}

// LostSnapshot is a snapshot that references data that cannot be read.
type LostSnapshot struct {
	ID       string     `json:"id"`
	Name     string     `json:"name"`
	Disks    []LostDisk `json:"disks"`
	Repaired string     `json:"repaired,omitempty"` // the id of the rewritten snapshot
}

// RepairSnapshotsOptions tune RepairSnapshots.
type RepairSnapshotsOptions struct {
	// Rewrite replaces each affected snapshot by one whose lost chunks
	// read as zeros and whose disks list the lost ranges, then removes
	// the original.
	Rewrite bool
	// IDs limits the repair to these snapshots (full ids); empty: all.
	IDs []string
}

// RepairSnapshots finds the snapshots that reference chunks no pack holds
// intact: missing for good, or stored only damaged. It reports the byte
// ranges each disk has lost, and with Rewrite replaces each such snapshot
// by one that restores (lost ranges as zeros, listed in the disk's "lost"
// field and the snapshot's note) and removes the original.
//
// Run a backup of the same VMs first: a backup that reads the same data
// stores damaged chunks again and heals them, which a rewrite cannot undo.
func (r *Repo) RepairSnapshots(ctx context.Context, opts RepairSnapshotsOptions) ([]LostSnapshot, error) {
	lock, err := r.Lock(ctx, LockBackup)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock(context.WithoutCancel(ctx))
	onDisk, _, err := r.fullIndex(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := r.markLostPacks(ctx, onDisk); err != nil {
		return nil, err
	}
	ss, err := r.Snapshots(ctx)
	if err != nil {
		return nil, err
	}
	want := map[string]bool{}
	for _, id := range opts.IDs {
		want[id] = true
	}
	var out []LostSnapshot
	for _, s := range ss {
		if len(want) > 0 && !want[s.ID] {
			continue
		}
		ls := LostSnapshot{ID: s.ID, Name: s.Name}
		fixed := *s
		fixed.Disks = append([]Disk(nil), s.Disks...)
		for i, d := range s.Disks {
			ids, ld, err := r.lostChunks(ctx, d)
			if err != nil {
				return out, fmt.Errorf("snapshot %s: %w", s.ID[:8], err)
			}
			if len(ld.Ranges) == 0 {
				continue
			}
			ls.Disks = append(ls.Disks, ld)
			if !opts.Rewrite {
				continue
			}
			maps, err := r.SaveMap(ctx, ids)
			if err != nil {
				return out, err
			}
			nd := d
			nd.Maps = maps
			nd.Lost = MergeRanges(append(append([]Range(nil), d.Lost...), ld.Ranges...))
			nd.DataChunks, nd.DataBytes = ids.DataChunks(), 0
			for pos := range ids.All() {
				nd.DataBytes += min(int64(d.ChunkSize), d.Size-pos*int64(d.ChunkSize))
			}
			fixed.Disks[i] = nd
		}
		if len(ls.Disks) == 0 {
			continue
		}
		if opts.Rewrite {
			if err := r.Flush(ctx); err != nil {
				return out, err
			}
			var lost int64
			for _, d := range ls.Disks {
				for _, rg := range d.Ranges {
					lost += rg.Length
				}
			}
			note := fmt.Sprintf("repaired from %s: %d bytes lost, restored as zeros", s.ID[:8], lost)
			if fixed.Stats.Note != "" {
				note = fixed.Stats.Note + "; " + note
			}
			fixed.Stats.Note = note
			id, err := r.SaveSnapshot(ctx, &fixed)
			if err != nil {
				return out, err
			}
			if err := r.RemoveSnapshot(ctx, s.ID); err != nil {
				return out, fmt.Errorf("snapshot %s was rewritten as %s, but removing the original failed: %w", s.ID[:8], id[:8], err)
			}
			ls.Repaired = id
		}
		out = append(out, ls)
	}
	return out, nil
}

// lostChunks returns disk d's chunk map without the chunks that have no
// intact copy, and what was lost. A map blob that cannot be read loses the
// positions it covered.
func (r *Repo) lostChunks(ctx context.Context, d Disk) (*ChunkMap, LostDisk, error) {
	ld := LostDisk{Name: d.Name}
	cs := int64(d.ChunkSize)
	m, lostMaps, err := r.LoadMapLenient(ctx, d)
	if err != nil {
		return nil, ld, err
	}
	for _, rg := range lostMaps {
		ld.Missing += int((rg.Length + cs - 1) / cs)
	}
	ld.Ranges = lostMaps
	kept := NewChunkMap(m.Len(), int(m.DataChunks()))
	for pos, id := range m.All() {
		_, ok := r.idx.Lookup(id)
		switch {
		case !ok:
			ld.Missing++
		case !r.idx.Intact(id):
			ld.Damaged++
		default:
			if err := kept.Append(pos, id); err != nil {
				return nil, ld, err
			}
			continue
		}
		off := pos * cs
		ld.Ranges = append(ld.Ranges, Range{off, min(cs, d.Size-off)})
	}
	ld.Ranges = MergeRanges(ld.Ranges)
	return kept, ld, nil
}

// MergeRanges sorts ranges and merges the ones that touch or overlap.
func MergeRanges(rs []Range) []Range {
	sort.Slice(rs, func(i, j int) bool { return rs[i].Offset < rs[j].Offset })
	var out []Range
	for _, rg := range rs {
		if k := len(out) - 1; k >= 0 && out[k].Offset+out[k].Length >= rg.Offset {
			out[k].Length = max(out[k].Length, rg.Offset+rg.Length-out[k].Offset)
			continue
		}
		out = append(out, rg)
	}
	return out
}
