package repo

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// CheckOptions tune Check.
type CheckOptions struct {
	// ReadData reads every pack and authenticates every blob.
	ReadData bool
	// PacksDone counts packs read, for progress.
	PacksDone *atomic.Int64
}

// Problem is one defect Check found.
type Problem struct {
	Object    string   `json:"object"`
	Error     string   `json:"error"`
	Snapshots []string `json:"snapshots,omitempty"` // restore points it affects
}

// CheckResult is what Check found.
type CheckResult struct {
	Snapshots       int       `json:"snapshots"`
	Packs           int       `json:"packs"`
	Blobs           int       `json:"blobs"`
	PacksRead       int       `json:"packs_read"`
	UnindexedPacks  int       `json:"unindexed_packs"` // left by interrupted backups; prune removes them
	Problems        []Problem `json:"problems"`
	PendingDeletion int       `json:"pending_deletion"`
}

// OK reports whether no problem was found.
func (c CheckResult) OK() bool { return len(c.Problems) == 0 }

// Check verifies the repository's structure: every index file, snapshot
// and map readable, every chunk a snapshot needs indexed in an existing
// pack. With ReadData it also reads and authenticates every blob, and
// names the snapshots each damaged blob affects.
func (r *Repo) Check(ctx context.Context, opts CheckOptions) (CheckResult, error) {
	var res CheckResult
	lock, err := r.Lock(ctx, LockRead)
	if err != nil {
		return res, err
	}
	defer lock.Unlock(context.WithoutCancel(ctx))
	problem := func(obj string, err error) {
		res.Problems = append(res.Problems, Problem{Object: obj, Error: err.Error()})
	}

	// Index files, one by one, so one damaged file does not hide the rest.
	var files []string
	if err := r.be.List(ctx, "index/", func(oi backend.ObjectInfo) error {
		files = append(files, oi.Name)
		return nil
	}); err != nil {
		return res, err
	}
	full := newIndex()
	for _, f := range files {
		plain, err := r.loadObject(ctx, f)
		if err != nil {
			if !errors.Is(err, backend.ErrNotFound) {
				problem(f, err)
			}
			continue
		}
		packs, err := decodeIndex(plain)
		if err != nil {
			problem(f, fmt.Errorf("damaged: %v", err))
			continue
		}
		for p, es := range packs {
			full.add(p, es)
		}
	}
	doomed, err := r.doomedPacks(ctx)
	if err != nil {
		problem("gc/", err)
	}
	res.PendingDeletion = len(doomed)

	// Packs on storage.
	onDisk := map[crypt.ID]int64{}
	if err := r.be.List(ctx, "data/", func(oi backend.ObjectInfo) error {
		id, err := crypt.ParseID(oi.Name[strings.LastIndex(oi.Name, "/")+1:])
		if err != nil {
			problem(oi.Name, errors.New("unexpected file in data/"))
			return nil
		}
		onDisk[id] = oi.Size
		return nil
	}); err != nil {
		return res, err
	}
	byPack := full.byPack()
	res.Packs, res.Blobs = len(byPack), full.Len()
	badPack := map[crypt.ID]bool{}
	for p, es := range byPack {
		size, ok := onDisk[p]
		last := es[len(es)-1]
		switch {
		case !ok:
			problem(packName(p), errors.New("pack is missing"))
			badPack[p] = true
		case size < int64(last.Offset)+int64(last.Length)+4+crypt.Overhead:
			problem(packName(p), fmt.Errorf("pack is truncated: %d bytes, index needs more than %d", size, int64(last.Offset)+int64(last.Length)))
			badPack[p] = true
		}
	}
	for p := range onDisk {
		if _, ok := byPack[p]; !ok {
			res.UnindexedPacks++
		}
	}

	// Snapshots and their maps.
	r.idx = full
	ids, err := r.SnapshotIDs(ctx)
	if err != nil {
		return res, err
	}
	users := map[crypt.ID][]string{} // blob -> snapshots, filled lazily below
	snapBlobs := map[string][]crypt.ID{}
	for _, id := range ids {
		s, err := r.LoadSnapshot(ctx, id)
		if err != nil {
			if !errors.Is(err, ErrNoSnapshot) {
				problem("snapshots/"+id, err)
			}
			continue
		}
		res.Snapshots++
		label := s.ID[:8] + " (" + s.Name + ")"
		var blobs []crypt.ID
		for _, d := range s.Disks {
			blobs = append(blobs, d.Maps...)
			cids, err := r.LoadMap(ctx, d)
			if err != nil {
				res.Problems = append(res.Problems, Problem{Object: "snapshots/" + id, Error: err.Error(), Snapshots: []string{label}})
				continue
			}
			for _, c := range cids.All() {
				if !c.IsZero() {
					blobs = append(blobs, c)
				}
			}
		}
		snapBlobs[label] = blobs
		missing := 0
		for _, b := range blobs {
			l, ok := full.Lookup(b)
			if !ok || badPack[l.Pack] {
				missing++
			}
		}
		if missing > 0 {
			res.Problems = append(res.Problems, Problem{Object: "snapshots/" + id, Error: fmt.Sprintf("%d chunks are missing or in missing packs", missing), Snapshots: []string{label}})
		}
	}

	if opts.ReadData {
		damaged := map[crypt.ID]string{}
		var mu sync.Mutex
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(4)
		for p, es := range byPack {
			if badPack[p] {
				continue
			}
			g.Go(func() error {
				errs := r.checkPack(gctx, p, es)
				mu.Lock()
				defer mu.Unlock()
				res.PacksRead++
				if opts.PacksDone != nil {
					opts.PacksDone.Add(1)
				}
				for id, e := range errs {
					damaged[id] = e
				}
				return gctx.Err()
			})
		}
		if err := g.Wait(); err != nil {
			return res, err
		}
		if len(damaged) > 0 {
			for label, blobs := range snapBlobs {
				for _, b := range blobs {
					if _, ok := damaged[b]; ok {
						users[b] = append(users[b], label)
					}
				}
			}
			var dids []crypt.ID
			for id := range damaged {
				dids = append(dids, id)
			}
			sort.Slice(dids, func(i, j int) bool { return dids[i].String() < dids[j].String() })
			for _, id := range dids {
				snaps := users[id]
				sort.Strings(snaps)
				res.Problems = append(res.Problems, Problem{Object: "chunk " + id.Short(), Error: damaged[id], Snapshots: snaps})
			}
		}
	}
	sort.SliceStable(res.Problems, func(i, j int) bool { return res.Problems[i].Object < res.Problems[j].Object })
	r.forgetIndex() // Check swapped in its own full index
	return res, nil
}

// checkPack reads a whole pack, checks its header against the index and
// authenticates every blob. It returns the damaged blobs and why.
func (r *Repo) checkPack(ctx context.Context, p crypt.ID, es []packEntry) map[crypt.ID]string {
	bad := map[crypt.ID]string{}
	data, err := r.be.Load(ctx, packName(p), 0, 0)
	if err != nil {
		for _, e := range es {
			bad[e.ID] = fmt.Sprintf("pack %s unreadable: %v", p.Short(), err)
		}
		return bad
	}
	hdr, herr := parsePack(r.key, data)
	inHeader := map[crypt.ID]packEntry{}
	for _, e := range hdr {
		inHeader[e.ID] = e
	}
	buf := make([]byte, 0, r.cfg.ChunkSize)
	for _, e := range es {
		if herr == nil {
			if h, ok := inHeader[e.ID]; !ok || h.Offset != e.Offset || h.Length != e.Length {
				bad[e.ID] = fmt.Sprintf("pack %s: header and index disagree", p.Short())
				continue
			}
		}
		end := int64(e.Offset) + int64(e.Length)
		if end > int64(len(data)) {
			bad[e.ID] = fmt.Sprintf("pack %s is truncated", p.Short())
			continue
		}
		l := Loc{Pack: p, Type: e.Type, Compressed: e.Compressed, Offset: e.Offset, Length: e.Length, RawLength: e.RawLength}
		if _, err := r.openBlob(e.ID, l, data[e.Offset:end], buf, false); err != nil {
			bad[e.ID] = err.Error()
		}
	}
	return bad
}

// Stats summarizes the repository.
type Stats struct {
	Snapshots        int     `json:"snapshots"`
	LogicalBytes     int64   `json:"logical_bytes"`     // sum of disk sizes over snapshots
	DataBytes        int64   `json:"data_bytes"`        // non-zero data over snapshots (what restores write)
	UniqueBytes      int64   `json:"unique_bytes"`      // distinct chunks' plaintext
	StoredBytes      int64   `json:"stored_bytes"`      // all pack files on storage
	ReferencedStored int64   `json:"referenced_stored"` // packed size of referenced blobs
	Packs            int     `json:"packs"`
	Chunks           int     `json:"chunks"`
	DedupRatio       float64 `json:"dedup_ratio"`       // DataBytes / UniqueBytes
	CompressionRatio float64 `json:"compression_ratio"` // UniqueBytes / ReferencedStored
	TotalRatio       float64 `json:"total_ratio"`       // DataBytes / StoredBytes
}

// Stats computes repository statistics.
func (r *Repo) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	if err := r.LoadIndex(ctx); err != nil {
		return st, err
	}
	ss, err := r.Snapshots(ctx)
	if err != nil {
		return st, err
	}
	st.Snapshots = len(ss)
	seen := map[crypt.ID]struct{}{}
	for _, s := range ss {
		for _, d := range s.Disks {
			st.LogicalBytes += d.Size
			st.DataBytes += d.DataBytes
			ids, err := r.LoadMap(ctx, d)
			if err != nil {
				return st, fmt.Errorf("snapshot %s: %w", s.ID[:8], err)
			}
			for _, id := range append(ids.IDs(), d.Maps...) {
				if id.IsZero() {
					continue
				}
				if _, ok := seen[id]; ok {
					continue
				}
				seen[id] = struct{}{}
				if l, ok := r.idx.Lookup(id); ok {
					if l.Type == DataBlob {
						st.UniqueBytes += int64(l.RawLength)
						st.Chunks++
					}
					st.ReferencedStored += int64(l.Length)
				}
			}
		}
	}
	if err := r.be.List(ctx, "data/", func(oi backend.ObjectInfo) error {
		st.Packs++
		st.StoredBytes += oi.Size
		return nil
	}); err != nil {
		return st, err
	}
	if st.UniqueBytes > 0 {
		st.DedupRatio = float64(st.DataBytes) / float64(st.UniqueBytes)
	}
	if st.ReferencedStored > 0 {
		st.CompressionRatio = float64(st.UniqueBytes) / float64(st.ReferencedStored)
	}
	if st.StoredBytes > 0 {
		st.TotalRatio = float64(st.DataBytes) / float64(st.StoredBytes)
	}
	return st, nil
}
