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
	// ReadData reads every pack on storage, its header and every blob.
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
	Snapshots      int       `json:"snapshots"`
	Packs          int       `json:"packs"`
	Blobs          int       `json:"blobs"`
	PacksRead      int       `json:"packs_read"`
	UnindexedPacks int       `json:"unindexed_packs"` // no index lists them, and no restore point needs them: prune removes them
	Healed         int       `json:"healed"`          // damaged copies of chunks that have an intact copy
	Problems       []Problem `json:"problems"`
	// PendingDeletion counts packs a prune marked, waiting for the sweep.
	PendingDeletion int `json:"pending_deletion"`
}

// OK reports whether no problem was found.
func (c CheckResult) OK() bool { return len(c.Problems) == 0 }

// Check verifies the repository. It resolves every chunk of every
// snapshot exactly as a restore does (the same index: packs marked for
// deletion included, damaged copies passed over, packs no index lists read
// from their headers), so a snapshot Check passes is one a restore can
// read as far as the structure goes. It reports damaged index files, packs
// that are missing or truncated, packs no index lists that hold chunks a
// snapshot needs, and packs whose header is unreadable.
//
// With ReadData it reads every pack on storage whole, authenticates its
// header and every blob, and names the snapshots each damaged chunk
// affects. Every damaged copy it finds is recorded (see damage.go), so
// the next backup that reads the same data stores it again.
func (r *Repo) Check(ctx context.Context, opts CheckOptions) (CheckResult, error) {
	var res CheckResult
	lock, err := r.Lock(ctx, LockRead)
	if err != nil {
		return res, err
	}
	defer lock.Unlock(context.WithoutCancel(ctx))
	problem := func(obj string, err error, snaps ...string) {
		res.Problems = append(res.Problems, Problem{Object: obj, Error: err.Error(), Snapshots: snaps})
	}

	onDisk, scan, err := r.fullIndex(ctx)
	if err != nil {
		return res, err
	}
	for _, f := range sortedKeys(r.badIndex) {
		problem(f, fmt.Errorf("%v; restores read the packs it listed from their headers; run `kura repair index`", r.badIndex[f]))
	}
	for p, why := range scan.Unreadable {
		problem(packName(p), fmt.Errorf("no index lists this pack and its header is unreadable (%s): its chunks cannot be found", why))
	}
	pendings, badGC, err := r.loadPendingsBad(ctx)
	if err != nil {
		return res, err
	}
	for name, err := range badGC {
		problem(name, fmt.Errorf("%v; the next `kura prune` removes it and judges its packs again", err))
	}
	for _, pd := range pendings {
		res.PendingDeletion += len(pd.Packs)
	}
	if err := r.be.List(ctx, "data/", func(oi backend.ObjectInfo) error {
		if _, err := crypt.ParseID(oi.Name[strings.LastIndex(oi.Name, "/")+1:]); err != nil {
			problem(oi.Name, errors.New("unexpected file in data/"))
		}
		return nil
	}); err != nil {
		return res, err
	}
	r.checkKeys(ctx, problem)
	for _, prefix := range []string{"bootchecks/", "damage/"} {
		bad, err := r.unreadableRecords(ctx, prefix)
		if err != nil {
			return res, err
		}
		for _, name := range sortedKeys(bad) {
			problem(name, fmt.Errorf("%v; nothing depends on it: the next `kura prune` removes it", bad[name]))
		}
	}

	// Packs the index names: present and long enough?
	byPack := r.idx.byPack()
	res.Packs, res.Blobs = len(byPack), r.idx.Len()
	lostPacks, err := r.markLostPacks(ctx, onDisk)
	if err != nil {
		return res, err
	}
	for p, why := range lostPacks {
		problem(packName(p), why)
	}

	// Snapshots: every chunk resolved as a restore would.
	snapUses, err := r.checkSnapshots(ctx, &res, problem)
	if err != nil {
		return res, err
	}
	scanned := map[crypt.ID]bool{}
	for _, p := range scan.PackIDs {
		scanned[p] = true
	}
	needed := map[crypt.ID]int{} // scanned packs holding the best copy of a needed chunk
	for id := range snapUses {
		if l, ok := r.idx.Lookup(id); ok && scanned[l.Pack] {
			needed[l.Pack]++
		}
	}
	for _, p := range scan.PackIDs {
		if n := needed[p]; n > 0 {
			problem(packName(p), fmt.Errorf("no index lists this pack, but it holds %d chunks restore points need (read from its header for now); run `kura repair index`", n))
		} else {
			res.UnindexedPacks++
		}
	}

	if opts.ReadData {
		if err := r.checkData(ctx, opts, onDisk, &res, snapUses, problem); err != nil {
			return res, err
		}
	}
	for _, c := range r.DamagedCopies() {
		if c.Healed {
			res.Healed++
		}
	}
	sort.SliceStable(res.Problems, func(i, j int) bool { return res.Problems[i].Object < res.Problems[j].Object })
	r.forgetIndex() // Check read every pack's header into the index
	return res, nil
}

// markLostPacks finds the packs the index names that are missing from
// storage or shorter than the index says, records their blobs as damaged
// and returns them with the reason.
func (r *Repo) markLostPacks(ctx context.Context, onDisk map[crypt.ID]int64) (map[crypt.ID]error, error) {
	out := map[crypt.ID]error{}
	var lost []damagedCopy
	for p, es := range r.idx.byPack() {
		size, ok := onDisk[p]
		last := es[len(es)-1]
		var why error
		switch {
		case !ok:
			why = fmt.Errorf("pack %s is missing: %w", p.Short(), ErrDamaged)
		case size < int64(last.Offset)+int64(last.Length)+4+crypt.Overhead:
			why = fmt.Errorf("pack %s is truncated: %d bytes, the index needs more than %d: %w", p.Short(), size, int64(last.Offset)+int64(last.Length), ErrDamaged)
		default:
			continue
		}
		out[p] = why
		for _, e := range es {
			lost = append(lost, damagedCopy{Blob: e.ID.String(), Pack: p.String(), Error: errText(why)})
		}
	}
	return out, r.reportDamage(ctx, lost, nil)
}

// checkSnapshots loads every snapshot and its maps and resolves every
// chunk; it returns which snapshots use each chunk.
func (r *Repo) checkSnapshots(ctx context.Context, res *CheckResult, problem func(string, error, ...string)) (map[crypt.ID][]string, error) {
	ids, err := r.SnapshotIDs(ctx)
	if err != nil {
		return nil, err
	}
	uses := map[crypt.ID][]string{}
	for _, id := range ids {
		s, err := r.LoadSnapshot(ctx, id)
		if err != nil {
			if !errors.Is(err, ErrNoSnapshot) {
				problem("snapshots/"+id, fmt.Errorf("%w; `kura forget %s` removes it", err, id[:8]))
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
				problem("snapshots/"+id, err, label)
				continue
			}
			for _, c := range cids.All() {
				if !c.IsZero() {
					blobs = append(blobs, c)
				}
			}
		}
		missing, damaged := 0, 0
		seen := map[crypt.ID]bool{}
		for _, b := range blobs {
			if seen[b] {
				continue
			}
			seen[b] = true
			uses[b] = append(uses[b], label)
			switch _, ok := r.idx.Lookup(b); {
			case !ok:
				missing++
			case !r.idx.Intact(b):
				damaged++
			}
		}
		if missing > 0 {
			problem("snapshots/"+id, fmt.Errorf("%d chunks are missing from the repository; `kura repair snapshots` can mark what is lost", missing), label)
		}
		if damaged > 0 {
			problem("snapshots/"+id, fmt.Errorf("%d chunks are stored only damaged; a backup that reads the same data heals them, or `kura restore --ignore-damage` restores the rest", damaged), label)
		}
	}
	return uses, nil
}

// checkKeys reports key files that cannot be parsed.
func (r *Repo) checkKeys(ctx context.Context, problem func(string, error, ...string)) {
	if err := r.be.List(ctx, "keys/", func(oi backend.ObjectInfo) error {
		if _, err := r.loadKeyFile(ctx, oi.Name); err != nil && !errors.Is(err, backend.ErrNotFound) {
			problem(oi.Name, fmt.Errorf("%w; if another key opens the repository, `kura key remove` it", err))
		}
		return nil
	}); err != nil {
		problem("keys/", err)
	}
}

// checkData reads every pack on storage and authenticates its header and
// blobs.
func (r *Repo) checkData(ctx context.Context, opts CheckOptions, onDisk map[crypt.ID]int64, res *CheckResult, uses map[crypt.ID][]string, problem func(string, error, ...string)) error {
	byPack := r.idx.byPack()
	type packResult struct {
		header error
		bad    map[crypt.ID]string
	}
	results := map[crypt.ID]packResult{}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for p := range onDisk {
		g.Go(func() error {
			herr, bad := r.checkPack(gctx, p, byPack[p])
			mu.Lock()
			defer mu.Unlock()
			res.PacksRead++
			if opts.PacksDone != nil {
				opts.PacksDone.Add(1)
			}
			results[p] = packResult{herr, bad}
			return gctx.Err()
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	var found []damagedCopy
	for p, pr := range results {
		if pr.header != nil {
			problem(packName(p), pr.header)
			if errors.Is(pr.header, ErrDamaged) {
				found = append(found, damagedCopy{Blob: headerBlob, Pack: p.String(), Error: errText(pr.header)})
			}
		}
		for id, why := range pr.bad {
			found = append(found, damagedCopy{Blob: id.String(), Pack: p.String(), Error: why})
		}
	}
	if err := r.reportDamage(ctx, found, nil); err != nil {
		return err
	}
	// A damaged copy is a problem when no intact copy of its chunk is left.
	reported := map[crypt.ID]bool{}
	sort.Slice(found, func(i, j int) bool { return found[i].Blob < found[j].Blob })
	for _, c := range found {
		id, err := crypt.ParseID(c.Blob)
		if err != nil || reported[id] || r.idx.Intact(id) {
			continue
		}
		reported[id] = true
		snaps := append([]string(nil), uses[id]...)
		sort.Strings(snaps)
		problem("chunk "+id.Short(), errors.New(c.Error), snaps...)
	}
	return nil
}

// checkPack reads a whole pack, authenticates its header, checks it
// against the index and authenticates every blob the index or the header
// lists. It returns the header's defect and the damaged blobs and why.
func (r *Repo) checkPack(ctx context.Context, p crypt.ID, es []packEntry) (error, map[crypt.ID]string) {
	bad := map[crypt.ID]string{}
	data, err := r.be.Load(ctx, packName(p), 0, 0)
	if err != nil {
		err = packError(p, err)
		for _, e := range es {
			bad[e.ID] = err.Error()
		}
		return err, bad
	}
	hdr, herr := parsePack(r.key, data)
	if herr != nil {
		herr = fmt.Errorf("pack %s: %v (its chunks are read through the index; the next `kura prune` copies them to a new pack): %w", p.Short(), herr, ErrDamaged)
	}
	inHeader := map[crypt.ID]packEntry{}
	for _, e := range hdr {
		inHeader[e.ID] = e
	}
	inIndex := map[crypt.ID]bool{}
	buf := make([]byte, 0, r.cfg.ChunkSize)
	check := func(e packEntry) {
		end := int64(e.Offset) + int64(e.Length)
		if end > int64(len(data)) {
			bad[e.ID] = fmt.Sprintf("pack %s is truncated", p.Short())
			return
		}
		l := Loc{Pack: p, Type: e.Type, Compressed: e.Compressed, Offset: e.Offset, Length: e.Length, RawLength: e.RawLength}
		if _, err := r.openBlob(e.ID, l, data[e.Offset:end], buf, false); err != nil {
			bad[e.ID] = err.Error()
		}
	}
	for _, e := range es {
		inIndex[e.ID] = true
		if herr == nil {
			if h, ok := inHeader[e.ID]; !ok || h.Offset != e.Offset || h.Length != e.Length {
				if herr == nil {
					herr = fmt.Errorf("pack %s: header and index disagree about chunk %s: %w", p.Short(), e.ID.Short(), ErrDamaged)
				}
			}
		}
		check(e)
	}
	for _, e := range hdr {
		if !inIndex[e.ID] {
			check(e)
		}
	}
	return herr, bad
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
