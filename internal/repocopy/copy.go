// Package repocopy copies restore points from one repository to another
// (`kura copy`): an offsite copy of a local repository on object storage,
// or the reverse.
//
// Only what the target lacks is sent: a chunk or map blob the target's
// index already has is never sent again, so both repositories stay
// deduplicated and a second copy of the same restore points sends nothing.
// Two cases, by key:
//
//   - The target shares the source's master key (kura init
//     --copy-key-from): chunk ids are the same on both sides, and blobs go
//     over sealed, byte for byte, without being decrypted into a new form.
//     Each is still authenticated (opened and hashed) before it is sent,
//     so nothing damaged is copied.
//   - The target has its own key: each chunk is decrypted, hashed with the
//     target's id key and sealed under the target's key, and the maps are
//     written anew with the target's ids. The source-to-target id of a
//     chunk comes from an earlier copy of the same VM already in the
//     target (its map beside its original's, position by position), so an
//     incremental copy reads only the chunks that changed.
//
// A copied restore point keeps its name, time, host, disks, VM
// configuration, tags and statistics, and records where it came from
// (repo.Snapshot.CopiedFrom): a restore point the target has is skipped.
// Packs and index files are written before the snapshot, so an interrupted
// copy leaves the target consistent (a restore point is there whole or not
// at all), and the packs it sent are found again by the next run (see
// Copy). docs/COPY.md has the user's side.
package repocopy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"time"

	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
)

// Options choose what Copy copies and how.
type Options struct {
	// Name copies only restore points of this name (a VM's name).
	Name string
	// Latest copies the newest Latest restore points of each name (of
	// Name, when set); 0 copies all.
	Latest int
	// Refs name restore points to copy, as `kura restore` takes them
	// (an id or unique prefix, NAME@latest, NAME@DATE, latest). They
	// cannot be combined with Name or Latest.
	Refs []string
	// Verify reads back and authenticates every blob written to the
	// target, and its maps, before the restore point's snapshot is saved.
	Verify bool
	// Workers read from the source and write to the target at once; 0 is
	// two per CPU, at least 4 (object storage is bound by round trips).
	Workers int
	// Progress, when set, is called as the copy goes (never twice at
	// once).
	Progress func(Progress)
	// Logger receives what the copy works around; nil discards it.
	Logger *slog.Logger
}

// Progress is what a copy has done so far.
type Progress struct {
	Snapshots     int    // restore points selected
	Done          int    // of them copied, skipped or failed
	Current       string // the restore point being copied (name and time)
	BytesRead     int64  // sealed bytes read from the source
	BytesSent     int64  // sealed bytes written to the target's packs
	ChunksSent    int64  // data chunks written to the target
	ChunksPresent int64  // data chunks the target had already: not sent
	ChunksToCheck int64  // data chunks of the current restore point the target lacked when planned
	ChunksChecked int64  // of them handled (sent or found present)
}

// Result says what Copy did.
type Result struct {
	// SharedKey is true when source and target share a master key: blobs
	// went over sealed as they were.
	SharedKey bool      `json:"shared_key"`
	Selected  int       `json:"selected"`
	Copied    []Copied  `json:"copied"`
	Skipped   []Copied  `json:"skipped"` // in the target already
	Failed    []Failure `json:"failed,omitempty"`
	// ChunksSent data chunks (and MapsSent map blobs) were written to the
	// target; ChunksPresent were there already (counted per restore
	// point).
	ChunksSent    int64 `json:"chunks_sent"`
	MapsSent      int64 `json:"maps_sent"`
	ChunksPresent int64 `json:"chunks_present"`
	// BytesRead sealed bytes were read from the source, BytesSent sealed
	// bytes written to the target's packs; DataSent is the plaintext size
	// of what was sent.
	BytesRead int64 `json:"bytes_read"`
	BytesSent int64 `json:"bytes_sent"`
	DataSent  int64 `json:"data_sent"`
	// PacksIndexed packs that an interrupted earlier run (or backup) left
	// in the target without an index file were found and indexed.
	PacksIndexed int `json:"packs_indexed,omitempty"`
	// BlobsVerified blobs were read back from the target (Verify).
	BlobsVerified int64         `json:"blobs_verified,omitempty"`
	Duration      time.Duration `json:"-"`
	Seconds       float64       `json:"seconds"`
}

// Copied names a restore point in the source and its copy in the target.
type Copied struct {
	Name   string    `json:"name"`
	Time   time.Time `json:"time"`
	Source string    `json:"source"` // snapshot id in the source
	Target string    `json:"target"` // snapshot id in the target
}

// Failure is a restore point that was not copied, and why.
type Failure struct {
	Name   string    `json:"name,omitempty"`
	Time   time.Time `json:"time,omitzero"`
	Source string    `json:"source"`
	Error  string    `json:"error"`
}

// ErrNotCopied is wrapped by Copy's error when some restore points were not
// copied (Result.Failed says which and why) while the others were.
var ErrNotCopied = errors.New("restore points were not copied")

// skipError marks an error that fails one restore point's copy (its source
// data is damaged or missing, or what was written did not read back) while
// the others still copy.
type skipError struct{ err error }

func (e *skipError) Error() string { return e.err.Error() }
func (e *skipError) Unwrap() error { return e.err }

func skip(err error) error { return &skipError{err} }

// copier is one run of Copy.
type copier struct {
	src, dst *repo.Repo
	srcID    string // the repositories' config ids
	dstID    string
	shared   bool
	opts     Options
	log      *slog.Logger
	res      Result

	mu        sync.Mutex // guards prog and calls of opts.Progress
	prog      Progress
	sentBase  int64 // dst.Stored().StoredBytes when the copy began
	blobsBase int64

	// The target's restore points by identity (see identities), kept up
	// to date as restore points are copied.
	dstSnaps []*repo.Snapshot
	dstBy    map[origin]*repo.Snapshot
	srcBy    map[string]*repo.Snapshot // the source's restore points by id

	ws []*worker // made once, reused for every restore point
}

// origin identifies a restore point: a repository id and a snapshot id.
type origin struct{ repo, snap string }

// identities are the names a restore point goes by: its own id in its
// repository, and those of the snapshots it is a copy of. Two restore
// points with a name in common are the same one.
func identities(repoID string, s *repo.Snapshot) []origin {
	out := []origin{{repoID, s.ID}}
	for _, o := range s.CopiedFrom {
		out = append(out, origin{o.Repo, o.Snapshot})
	}
	return out
}

// Copy copies the restore points opts selects from src to dst. It returns
// what it did; an error that wraps ErrNotCopied means the restore points
// listed in Result.Failed were not copied and the others were.
//
// It takes a read lock on the source and a backup lock on the target (the
// target's lock first, before its index is read, as a backup does), so a
// prune of either side waits for it or leaves alone what it uses.
//
// A copy that was interrupted (cancelled, or its process killed) after
// some packs landed in the target but before their index file did leaves
// those packs unlisted; Copy reads the header of every pack of the target
// that no index file lists before it plans anything, uses their blobs and
// indexes them, so nothing that landed is sent again. That costs one
// listing of the target's packs per run (docs/COPY.md has the
// measurement).
func Copy(ctx context.Context, src, dst *repo.Repo, opts Options) (Result, error) {
	start := time.Now()
	c := &copier{src: src, dst: dst, srcID: src.Config().ID, dstID: dst.Config().ID, opts: opts, log: opts.Logger}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.opts.Workers <= 0 {
		c.opts.Workers = max(4, 2*runtime.GOMAXPROCS(0))
	}
	c.res.Copied, c.res.Skipped = []Copied{}, []Copied{}
	err := c.copy(ctx)
	c.res.Duration = time.Since(start)
	c.res.Seconds = c.res.Duration.Seconds()
	return c.res, err
}

func (c *copier) copy(ctx context.Context) error {
	src, dst, opts := c.src, c.dst, c.opts
	if c.srcID == c.dstID {
		return fmt.Errorf("source and target are the same repository (%s): give two different repositories", short(c.srcID))
	}
	if len(opts.Refs) > 0 && (opts.Name != "" || opts.Latest > 0) {
		return errors.New("give restore points either by reference or by --name/--latest, not both")
	}
	if opts.Latest < 0 {
		return fmt.Errorf("latest %d: give a positive number of restore points per name", opts.Latest)
	}
	sk, dk := src.Key(), dst.Key()
	c.shared = sk.Enc == dk.Enc && sk.ID == dk.ID
	c.res.SharedKey = c.shared

	// The target's lock comes before its index is read (see repo's gc.go):
	// a prune that marks packs after this never deletes what the copy
	// deduplicates against before the copy's snapshots are visible.
	dlock, err := dst.Lock(ctx, repo.LockBackup)
	if err != nil {
		return fmt.Errorf("locking the target %s: %w", dst.Backend().Location(), err)
	}
	defer dlock.Unlock(context.WithoutCancel(ctx))
	slock, err := src.Lock(ctx, repo.LockRead)
	if err != nil {
		return fmt.Errorf("locking the source %s: %w", src.Backend().Location(), err)
	}
	defer slock.Unlock(context.WithoutCancel(ctx))
	if err := src.LoadIndex(ctx); err != nil {
		return fmt.Errorf("reading the source's index: %w", err)
	}
	if err := dst.LoadIndex(ctx); err != nil {
		return fmt.Errorf("reading the target's index: %w", err)
	}
	scanStart := time.Now()
	scan, err := dst.ScanUnindexedPacks(ctx)
	if err != nil {
		return fmt.Errorf("looking for packs an interrupted copy left in the target: %w", err)
	}
	if len(scan.PackIDs) > 0 {
		c.res.PacksIndexed = dst.IndexPacks(scan.PackIDs)
		c.log.Info("packs left by an interrupted run are indexed and reused", "packs", scan.Packs, "blobs", scan.Blobs)
	}
	c.log.Debug("target's unindexed packs scanned", "took", time.Since(scanStart), "found", scan.Packs)
	st := dst.Stored()
	c.sentBase, c.blobsBase = st.StoredBytes, st.Blobs

	all, damaged, err := src.SnapshotsLenient(ctx)
	if err != nil {
		return fmt.Errorf("listing the source's restore points: %w", err)
	}
	todo, err := selectSnapshots(all, opts)
	if err != nil {
		return err
	}
	considered := len(todo)
	if len(opts.Refs) == 0 && opts.Name == "" && opts.Latest == 0 {
		considered += len(damaged)
		for _, id := range damaged {
			c.res.Failed = append(c.res.Failed, Failure{Source: id, Error: fmt.Sprintf("snapshot %s of the source is damaged and cannot be read; see `kura verify` on the source", short(id))})
		}
	}
	c.srcBy = map[string]*repo.Snapshot{}
	for _, s := range all {
		c.srcBy[s.ID] = s
	}
	dstAll, _, err := dst.SnapshotsLenient(ctx)
	if err != nil {
		return fmt.Errorf("listing the target's restore points: %w", err)
	}
	c.dstBy = map[origin]*repo.Snapshot{}
	for _, t := range dstAll {
		c.addTarget(t)
	}
	c.res.Selected = len(todo)
	c.prog.Snapshots = len(todo)

	for _, s := range todo {
		if t := c.inTarget(s); t != nil {
			c.res.Skipped = append(c.res.Skipped, Copied{Name: s.Name, Time: s.Time, Source: s.ID, Target: t.ID})
			c.step("")
			continue
		}
		c.step(s.Name + "@" + s.Time.Local().Format("2006-01-02T15:04:05"))
		t, err := c.copySnapshot(ctx, s)
		var se *skipError
		switch {
		case errors.As(err, &se):
			c.log.Info("restore point not copied", "snapshot", short(s.ID), "name", s.Name, "err", se.err)
			c.res.Failed = append(c.res.Failed, Failure{Name: s.Name, Time: s.Time, Source: s.ID, Error: se.err.Error()})
		case err != nil:
			c.finishCounts()
			return err
		default:
			c.res.Copied = append(c.res.Copied, Copied{Name: s.Name, Time: s.Time, Source: s.ID, Target: t.ID})
			c.addTarget(t)
			c.log.Info("restore point copied", "snapshot", short(s.ID), "name", s.Name, "target", short(t.ID))
		}
		c.step("")
	}
	// Packs found by the scan are indexed even when nothing was copied.
	if err := dst.Flush(ctx); err != nil {
		c.finishCounts()
		return fmt.Errorf("writing the target's index: %w", err)
	}
	c.finishCounts()
	if n := len(c.res.Failed); n > 0 {
		f := c.res.Failed[0]
		return fmt.Errorf("%d of %d %w; the first: %s", n, considered, ErrNotCopied, f.Error)
	}
	return nil
}

// finishCounts takes the totals the target's writer kept.
func (c *copier) finishCounts() {
	st := c.dst.Stored()
	c.res.BytesSent = st.StoredBytes - c.sentBase
	c.res.MapsSent = st.Blobs - c.blobsBase - c.res.ChunksSent
}

// step reports that a restore point is done (current == "") or starts.
func (c *copier) step(current string) {
	c.mu.Lock()
	if current == "" {
		c.prog.Done++
	}
	c.prog.Current = current
	c.prog.ChunksToCheck, c.prog.ChunksChecked = 0, 0
	c.mu.Unlock()
	c.report()
}

// report calls opts.Progress with the counters as they are.
func (c *copier) report() {
	if c.opts.Progress == nil {
		return
	}
	sent := c.dst.Stored().StoredBytes - c.sentBase
	c.mu.Lock()
	defer c.mu.Unlock()
	c.prog.BytesSent = sent
	c.opts.Progress(c.prog)
}

// count adds to the progress counters.
func (c *copier) count(read, sent, present, checked int64) {
	c.mu.Lock()
	c.prog.BytesRead += read
	c.prog.ChunksSent += sent
	c.prog.ChunksPresent += present
	c.prog.ChunksChecked += checked
	c.res.BytesRead += read
	c.res.ChunksSent += sent
	c.res.ChunksPresent += present
	c.mu.Unlock()
}

// addTarget records a restore point of the target.
func (c *copier) addTarget(t *repo.Snapshot) {
	c.dstSnaps = append(c.dstSnaps, t)
	for _, o := range identities(c.dstID, t) {
		c.dstBy[o] = t
	}
}

// inTarget returns the target's copy of s, if it has one.
func (c *copier) inTarget(s *repo.Snapshot) *repo.Snapshot {
	for _, o := range identities(c.srcID, s) {
		if t := c.dstBy[o]; t != nil {
			return t
		}
	}
	return nil
}

// selectSnapshots picks the restore points to copy from all (sorted
// oldest first), oldest first.
func selectSnapshots(all []*repo.Snapshot, opts Options) ([]*repo.Snapshot, error) {
	if len(opts.Refs) > 0 {
		seen := map[string]bool{}
		var out []*repo.Snapshot
		for _, ref := range opts.Refs {
			s, err := repo.FindSnapshot(all, ref)
			if err != nil {
				return nil, fmt.Errorf("in the source: %w", err)
			}
			if !seen[s.ID] {
				seen[s.ID] = true
				out = append(out, s)
			}
		}
		repo.SortSnapshots(out)
		return out, nil
	}
	byName := map[string][]*repo.Snapshot{}
	for _, s := range all {
		if opts.Name == "" || s.Name == opts.Name {
			byName[s.Name] = append(byName[s.Name], s)
		}
	}
	if opts.Name != "" && len(byName) == 0 {
		return nil, fmt.Errorf("the source has no restore point named %q (see `kura snapshots` there): %w", opts.Name, repo.ErrNoSnapshot)
	}
	var out []*repo.Snapshot
	for _, ss := range byName {
		if opts.Latest > 0 && len(ss) > opts.Latest {
			ss = ss[len(ss)-opts.Latest:]
		}
		out = append(out, ss...)
	}
	repo.SortSnapshots(out)
	return out, nil
}

// copySnapshot copies one restore point and returns the target's
// snapshot. An error wrapped by skip fails only this restore point.
func (c *copier) copySnapshot(ctx context.Context, s *repo.Snapshot) (*repo.Snapshot, error) {
	label := fmt.Sprintf("restore point %s (%s)", short(s.ID), s.Name)
	// The source's maps, read through its damage machinery.
	maps := make([]*repo.ChunkMap, len(s.Disks))
	for i, d := range s.Disks {
		m, err := c.src.LoadMap(ctx, d)
		if err != nil {
			if unreadable(err) {
				return nil, skip(fmt.Errorf("%s: the source cannot read its map: %w; run `kura verify --read-data` on the source", label, err))
			}
			return nil, fmt.Errorf("%s: reading its map from the source: %w", label, err)
		}
		maps[i] = m
	}
	var base map[crypt.ID]crypt.ID
	if !c.shared {
		base = c.knownIDs(ctx, s)
	}
	plan, err := c.plan(ctx, s, maps, base)
	if err != nil {
		return nil, err
	}
	if err := c.transfer(ctx, label, plan); err != nil {
		return nil, err
	}

	// The target's disks: the same maps when ids and encoding are the
	// same, else maps written anew with the target's ids.
	t := *s
	t.ID = ""
	t.Disks = make([]repo.Disk, len(s.Disks))
	tmaps := make([]*repo.ChunkMap, len(s.Disks))
	for i, d := range s.Disks {
		t.Disks[i] = d
		t.Disks[i].Lost = append([]repo.Range(nil), d.Lost...)
		m := maps[i]
		if !c.shared {
			if m, err = plan.translate(m); err != nil {
				return nil, fmt.Errorf("%s: disk %s: %w", label, d.Name, err)
			}
		}
		tmaps[i] = m
		if c.shared && d.MapVersion == repo.SnapshotVersion {
			t.Disks[i].Maps = append([]crypt.ID(nil), d.Maps...)
			continue
		}
		ids, err := c.dst.SaveMap(ctx, m)
		if err != nil {
			return nil, fmt.Errorf("%s: writing the map of disk %s to the target: %w", label, d.Name, err)
		}
		t.Disks[i].Maps = ids
		if d.MapVersion != repo.SnapshotVersion {
			// Re-encoded from dense maps: count as sparse maps do.
			t.Disks[i].DataChunks = m.DataChunks()
			t.Disks[i].DataBytes = dataBytes(m, int64(d.ChunkSize), d.Size)
		}
	}
	// Data and maps, then the index, then the snapshot.
	if err := c.dst.Flush(ctx); err != nil {
		return nil, fmt.Errorf("%s: writing to the target: %w", label, err)
	}
	if err := c.check(ctx, label, &t, tmaps, plan); err != nil {
		return nil, err
	}
	if p := s.Parent; p != "" {
		t.Parent = ""
		if pt := c.dstBy[origin{c.srcID, p}]; pt != nil {
			t.Parent = pt.ID
		}
	}
	t.CopiedFrom = append([]repo.Origin{{Repo: c.srcID, Snapshot: s.ID, Copied: time.Now().UTC().Truncate(time.Second)}}, s.CopiedFrom...)
	if _, err := c.dst.SaveSnapshot(ctx, &t); err != nil {
		return nil, fmt.Errorf("%s: saving its snapshot in the target: %w", label, err)
	}
	return &t, nil
}

// check makes sure the target can restore t before its snapshot is saved:
// every chunk and map blob it names is in the target's index, intact and
// not marked for deletion by a prune; with Verify, every blob this copy
// wrote is read back and authenticated, and every map is read back.
func (c *copier) check(ctx context.Context, label string, t *repo.Snapshot, maps []*repo.ChunkMap, p *plan) error {
	x := c.dst.Index()
	for i, d := range t.Disks {
		for _, id := range d.Maps {
			if !x.Has(id) {
				return skip(fmt.Errorf("%s: disk %s: map %s did not reach the target's index; run the copy again", label, d.Name, id.Short()))
			}
		}
		for pos, id := range maps[i].All() {
			if !x.Has(id) {
				return skip(fmt.Errorf("%s: disk %s at offset %d: chunk %s did not reach the target's index; run the copy again", label, d.Name, pos*int64(d.ChunkSize), id.Short()))
			}
		}
	}
	if !c.opts.Verify {
		return nil
	}
	n, err := c.verify(ctx, p.sentIDs())
	c.res.BlobsVerified += n
	if err != nil {
		return err
	}
	for _, d := range t.Disks {
		d.MapVersion = repo.SnapshotVersion
		m, err := c.dst.LoadMap(ctx, d)
		if err != nil {
			if unreadable(err) {
				return skip(fmt.Errorf("%s: disk %s: the map written to the target does not read back: %w; run the copy again", label, d.Name, err))
			}
			return fmt.Errorf("%s: reading back from the target: %w", label, err)
		}
		c.res.BlobsVerified += int64(len(d.Maps))
		if m.DataChunks() != d.DataChunks {
			return skip(fmt.Errorf("%s: disk %s: the map read back holds %d chunks, want %d", label, d.Name, m.DataChunks(), d.DataChunks))
		}
	}
	return nil
}

// knownIDs returns target ids of source chunks that an earlier copy of the
// same VM already in the target tells: its map and its original's map in
// the source name the same chunks at the same positions. Of the target's
// copies whose original is still in the source, the one nearest in time to
// s is used, before s if any. A map that cannot be read gives nothing.
func (c *copier) knownIDs(ctx context.Context, s *repo.Snapshot) map[crypt.ID]crypt.ID {
	var best, orig *repo.Snapshot
	better := func(t *repo.Snapshot) bool {
		if best == nil {
			return true
		}
		before, bestBefore := !t.Time.After(s.Time), !best.Time.After(s.Time)
		if before != bestBefore {
			return before
		}
		return absDur(t.Time.Sub(s.Time)) < absDur(best.Time.Sub(s.Time))
	}
	for _, t := range c.dstSnaps {
		if t.Name != s.Name || len(t.CopiedFrom) == 0 || t.CopiedFrom[0].Repo != c.srcID {
			continue
		}
		o := c.srcBy[t.CopiedFrom[0].Snapshot]
		if o != nil && better(t) {
			best, orig = t, o
		}
	}
	out := map[crypt.ID]crypt.ID{}
	if best == nil {
		return out
	}
	for _, sd := range orig.Disks {
		for _, td := range best.Disks {
			if td.Name != sd.Name || td.Size != sd.Size || td.ChunkSize != sd.ChunkSize {
				continue
			}
			sm, err := c.src.LoadMap(ctx, sd)
			if err != nil {
				c.log.Debug("earlier copy not usable for ids", "snapshot", short(orig.ID), "err", err)
				continue
			}
			tm, err := c.dst.LoadMap(ctx, td)
			if err != nil {
				c.log.Debug("earlier copy not usable for ids", "snapshot", short(best.ID), "err", err)
				continue
			}
			pairByPosition(sm, tm, out)
		}
	}
	c.log.Debug("chunk ids known from an earlier copy", "copy", short(best.ID), "ids", len(out))
	return out
}

// pairByPosition adds to out the ids of a and b at the positions both hold.
func pairByPosition(a, b *repo.ChunkMap, out map[crypt.ID]crypt.ID) {
	nextB, stop := iterPull(b)
	defer stop()
	bp, bid, ok := nextB()
	for ap, aid := range a.All() {
		for ok && bp < ap {
			bp, bid, ok = nextB()
		}
		if !ok {
			return
		}
		if bp == ap {
			out[aid] = bid
		}
	}
}

func absDur(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// dataBytes is the bytes of m's data chunks, the disk's last chunk
// counting its actual length.
func dataBytes(m *repo.ChunkMap, cs, size int64) int64 {
	var n int64
	for pos := range m.All() {
		n += min(cs, size-pos*cs)
	}
	return n
}

// unreadable says whether err means stored data is damaged or missing.
func unreadable(err error) bool {
	return errors.Is(err, repo.ErrDamaged) || errors.Is(err, repo.ErrBlobMissing)
}

func short(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}
