// Package backup runs one backup: it plans which extents of each disk to
// read, reads them in parallel, cuts them into fixed-size chunks aligned to
// disk offsets, and stores new chunks in the repository, then writes the
// snapshot manifest.
//
// It joins a source (where bytes come from) to a repository (where they
// go); it knows neither how a source produces bytes nor how the repository
// lays them out.
package backup

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
)

// Options describe a backup.
type Options struct {
	Name     string         // restore point name (the VM's name)
	Source   string         // "image", "libvirt", "qmp"
	Kind     string         // "full" unless a driver reads only changes
	Mode     string         // consistency mode, for live VMs
	Config   *repo.VMConfig // VM configuration to save
	Tags     map[string]string
	Workers  int // parallel readers/compressors; 0 = 2 × CPUs
	Progress *Progress
	Logger   *slog.Logger
	// ReadGate, when set, is called before each read of n bytes from a
	// disk; the read starts once it returns, and done is called when the
	// read ends, ok if it succeeded. The daemon's latency control paces
	// backups and limits their reads in flight with it.
	ReadGate func(ctx context.Context, n int) (done func(ok bool), err error)
	// ReadSize, when positive, splits every read from a disk into reads
	// of at most this many bytes, each through ReadGate: on a busy
	// datastore a guest's I/O that queues behind a backup read waits for
	// less. 0 reads whole chunks (or the changed parts of them).
	ReadSize int
	// Stats to merge into the snapshot (freeze window, pause time).
	Stats repo.BackupStats
	// Parent is the previous restore point of this VM. Disks that implement
	// source.ChangeTracker take unchanged chunks from it instead of reading.
	Parent *repo.Snapshot
	// Checkpoint is saved in the snapshot for the next incremental backup.
	Checkpoint string
	// Notes say per disk why it was read in full; keyed by disk name.
	Notes map[string]string
}

// Progress is updated while a backup runs; read it with Snapshot.
type Progress struct {
	Total   atomic.Int64 // bytes planned for reading (known after planning)
	Done    atomic.Int64 // bytes read and processed
	Stored  atomic.Int64 // new bytes stored (plaintext)
	Reused  atomic.Int64 // chunks found in the repository already
	Started time.Time
}

// Run backs up disks into r and returns the snapshot it wrote. The disks
// are not closed.
func Run(ctx context.Context, r *repo.Repo, disks []source.Disk, opts Options) (*repo.Snapshot, error) {
	if err := repo.ValidName(opts.Name); err != nil {
		return nil, err
	}
	if opts.Workers <= 0 {
		opts.Workers = 2 * runtime.GOMAXPROCS(0)
	}
	if opts.Progress == nil {
		opts.Progress = &Progress{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Kind == "" {
		opts.Kind = "full"
	}
	opts.Progress.Started = time.Now()
	lock, err := r.Lock(ctx, repo.LockBackup)
	if err != nil {
		return nil, err
	}
	defer lock.Unlock(context.WithoutCancel(ctx))
	opts.Logger.Debug("locked", "took", time.Since(opts.Progress.Started))
	// The lock is taken before the index is read: see repo's gc.go.
	if err := r.LoadIndex(ctx); err != nil {
		return nil, err
	}
	opts.Logger.Debug("index loaded", "took", time.Since(opts.Progress.Started))
	host, _ := os.Hostname()
	snap := &repo.Snapshot{
		Time: time.Now().UTC(), Name: opts.Name, Hostname: host, Source: opts.Source,
		Kind: opts.Kind, Mode: opts.Mode, Config: opts.Config, Tags: opts.Tags, Stats: opts.Stats,
	}
	snap.Stats.Start = opts.Progress.Started.UTC()
	cs := int64(r.Config().ChunkSize)
	plans := make([]*diskPlan, len(disks))
	for i, d := range disks {
		plans[i], err = makePlan(ctx, r, d, cs, opts)
		if err != nil {
			return nil, err
		}
		opts.Progress.Total.Add(plans[i].readBytes)
	}
	opts.Logger.Debug("planned", "took", time.Since(opts.Progress.Started))
	before := r.Stored()
	incremental := false
	for i, d := range disks {
		rd, st, err := backupDisk(ctx, r, d, plans[i], opts)
		if err != nil {
			return nil, err
		}
		incremental = incremental || plans[i].parent != nil
		snap.Disks = append(snap.Disks, rd)
		snap.Stats.BytesRead += st.read
		snap.Stats.ChunksReused += st.reused
	}
	if incremental {
		snap.Kind = "incremental"
		if opts.Parent != nil {
			snap.Parent = opts.Parent.ID
		}
	}
	snap.Checkpoint = opts.Checkpoint
	opts.Logger.Debug("disks read", "took", time.Since(opts.Progress.Started))
	// Data, then index, then snapshot.
	if err := r.Flush(ctx); err != nil {
		return nil, err
	}
	opts.Logger.Debug("flushed", "took", time.Since(opts.Progress.Started))
	after := r.Stored()
	snap.Stats.ChunksNew = after.Blobs - before.Blobs
	snap.Stats.BytesNew = after.RawBytes - before.RawBytes
	snap.Stats.BytesStored = after.StoredBytes - before.StoredBytes
	snap.Stats.End = time.Now().UTC()
	if _, err := r.SaveSnapshot(ctx, snap); err != nil {
		return nil, err
	}
	opts.Logger.Info("backup done", "snapshot", snap.ID[:8], "name", snap.Name, "read", snap.Stats.BytesRead, "new", snap.Stats.BytesNew)
	return snap, nil
}

// diskPlan says which chunk positions of a disk to read. It is kept as
// ranges, so that its size follows the data and the changes, not the
// disk's virtual size.
type diskPlan struct {
	data      []source.Extent // data extents, zero ones dropped, merged
	read      []posRange      // chunk positions to read, increasing, merged
	parent    *repo.ChunkMap  // chunk ids of the parent's disk (incremental only)
	readBytes int64           // data bytes in the positions to read
	how       string          // "full", "changed", or "full (reason)"
}

// posRange is the chunk positions [start, end).
type posRange struct{ start, end int64 }

// makePlan lists d's data extents and, when d tracks changes and the
// parent has the same disk, marks only changed chunks (and chunks whose
// parent data is no longer in the repository) for reading.
func makePlan(ctx context.Context, r *repo.Repo, d source.Disk, cs int64, opts Options) (*diskPlan, error) {
	info := d.Info()
	p := &diskPlan{how: "full"}
	if note := opts.Notes[info.Name]; note != "" {
		p.how = "full (" + note + ")"
	}
	var err error
	if p.data, err = extents(ctx, info, d.Extents); err != nil {
		return nil, fmt.Errorf("disk %s: listing allocated extents: %w", info.Name, err)
	}
	if ct, ok := d.(source.ChangeTracker); ok && opts.Parent != nil && opts.Notes[info.Name] == "" {
		p.parent, err = parentMap(ctx, r, opts.Parent, info, cs)
		if err != nil {
			opts.Logger.Warn("reading the whole disk: the previous restore point cannot be used", "disk", info.Name, "err", err)
			p.how = "full (previous restore point unusable)"
		}
		if p.parent != nil {
			changed, err := extents(ctx, info, ct.Changed)
			if err != nil {
				return nil, fmt.Errorf("disk %s: reading the changed-block map: %w", info.Name, err)
			}
			p.read = chunkRanges(changed, cs)
			// Chunks of the parent pruned meanwhile are read again.
			var missing []posRange
			k := 0
			for pos, id := range p.parent.All() {
				for k < len(p.read) && p.read[k].end <= pos {
					k++
				}
				if (k == len(p.read) || pos < p.read[k].start) && !r.Index().Has(id) {
					missing = append(missing, posRange{pos, pos + 1})
				}
			}
			if len(missing) > 0 {
				p.read = mergeRanges(append(p.read, missing...))
				opts.Logger.Info("re-reading chunks the repository no longer has", "disk", info.Name, "chunks", len(missing))
			}
			p.how = "changed"
		}
	}
	if p.parent == nil {
		p.read = chunkRanges(p.data, cs)
	}
	p.each(cs, info.Size, func(pos int64, ranges []source.Extent) bool {
		for _, rg := range ranges {
			p.readBytes += rg.Length
		}
		return true
	})
	return p, nil
}

// chunkRanges returns the chunk positions that extents (increasing, not
// overlapping) touch, as merged ranges.
func chunkRanges(exts []source.Extent, cs int64) []posRange {
	var out []posRange
	for _, e := range exts {
		a, b := e.Offset/cs, (e.Offset+e.Length+cs-1)/cs
		if k := len(out) - 1; k >= 0 && a <= out[k].end {
			out[k].end = max(out[k].end, b)
			continue
		}
		out = append(out, posRange{a, b})
	}
	return out
}

// mergeRanges sorts rs and merges overlapping and adjacent ranges.
func mergeRanges(rs []posRange) []posRange {
	slices.SortFunc(rs, func(a, b posRange) int { return cmp.Compare(a.start, b.start) })
	out := rs[:0]
	for _, r := range rs {
		if k := len(out) - 1; k >= 0 && r.start <= out[k].end {
			out[k].end = max(out[k].end, r.end)
			continue
		}
		out = append(out, r)
	}
	return out
}

// each calls fn, in disk order until fn returns false, for every position
// to read that holds data, with the data ranges in it. Positions to read
// without data (an incremental's trimmed chunks) are skipped: they are
// all zeros now.
func (p *diskPlan) each(cs, size int64, fn func(pos int64, ranges []source.Extent) bool) {
	k := 0
	var ranges []source.Extent
	for _, rd := range p.read {
		for pos := rd.start; pos < rd.end; pos++ {
			start := pos * cs
			for k < len(p.data) && p.data[k].Offset+p.data[k].Length <= start {
				k++
			}
			if k == len(p.data) {
				return
			}
			if p.data[k].Offset >= rd.end*cs {
				break // no data in the rest of this range
			}
			if first := p.data[k].Offset / cs; first > pos {
				pos, start = first, first*cs // skip the hole
			}
			end := min((pos+1)*cs, size)
			ranges = ranges[:0]
			for j := k; j < len(p.data) && p.data[j].Offset < end; j++ {
				a, b := max(p.data[j].Offset, start), min(p.data[j].Offset+p.data[j].Length, end)
				ranges = append(ranges, source.Extent{Offset: a, Length: b - a})
			}
			if !fn(pos, ranges) {
				return
			}
		}
	}
}

// extents walks [0, size) through list in windows and returns the non-zero
// extents, merged.
func extents(ctx context.Context, info source.DiskInfo, list func(context.Context, int64, int64) ([]source.Extent, error)) ([]source.Extent, error) {
	var out []source.Extent
	const window = 1 << 30
	for off := int64(0); off < info.Size; off += window {
		n := min(window, info.Size-off)
		exts, err := list(ctx, off, n)
		if err != nil {
			return nil, err
		}
		for _, e := range exts {
			if e.Zero || e.Length <= 0 {
				continue
			}
			if k := len(out) - 1; k >= 0 && out[k].Offset+out[k].Length == e.Offset {
				out[k].Length += e.Length
				continue
			}
			out = append(out, source.Extent{Offset: e.Offset, Length: e.Length})
		}
	}
	return out, nil
}

// parentMap returns the parent's chunk map for the disk named like info,
// or an error when the parent has no such disk of the same geometry.
func parentMap(ctx context.Context, r *repo.Repo, parent *repo.Snapshot, info source.DiskInfo, cs int64) (*repo.ChunkMap, error) {
	for _, pd := range parent.Disks {
		if pd.Name != info.Name {
			continue
		}
		if pd.Size != info.Size || int64(pd.ChunkSize) != cs {
			return nil, fmt.Errorf("disk %s changed size (%d to %d bytes)", info.Name, pd.Size, info.Size)
		}
		return r.LoadMap(ctx, pd)
	}
	return nil, fmt.Errorf("previous restore point %s has no disk %s", parent.ID[:8], info.Name)
}

// job is one chunk position to read: the data ranges inside it.
type job struct {
	pos    int64
	ranges []source.Extent
}

type diskStats struct{ read, reused int64 }

// chunkResult is a data chunk read: its position and id.
type chunkResult struct {
	pos int64
	id  crypt.ID
}

func backupDisk(ctx context.Context, r *repo.Repo, d source.Disk, p *diskPlan, opts Options) (repo.Disk, diskStats, error) {
	info := d.Info()
	cs := int64(r.Config().ChunkSize)
	n := (info.Size + cs - 1) / cs
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	jobs := make(chan job, opts.Workers*2)
	var st diskStats
	var read, reused atomic.Int64
	var once sync.Once
	var firstErr error
	fail := func(err error) {
		once.Do(func() { firstErr = err; cancel() })
	}
	// Each worker keeps the data chunks it read, in the order it read
	// them; all-zero chunks are left out.
	results := make([][]chunkResult, opts.Workers)
	var wg sync.WaitGroup
	for w := 0; w < opts.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, cs)
			sealer := r.NewSealer()
			hasher := r.Key().Hasher()
			for j := range jobs {
				if ctx.Err() != nil {
					continue
				}
				start := j.pos * cs
				size := min(cs, info.Size-start)
				b := buf[:size]
				if covered(j.ranges) != size {
					clear(b) // holes inside the chunk read as zeros
				}
				for _, e := range splitRanges(j.ranges, int64(opts.ReadSize)) {
					done := func(bool) {}
					if opts.ReadGate != nil {
						var err error
						if done, err = opts.ReadGate(ctx, int(e.Length)); err != nil {
							fail(err)
							break
						}
					}
					err := d.ReadAt(ctx, b[e.Offset-start:e.Offset-start+e.Length], e.Offset)
					done(err == nil)
					if err != nil {
						fail(fmt.Errorf("disk %s: reading %d bytes at offset %d: %w", info.Name, e.Length, e.Offset, err))
						break
					}
					read.Add(e.Length)
					opts.Progress.Done.Add(e.Length)
				}
				if ctx.Err() != nil {
					continue
				}
				if isZero(b) {
					continue
				}
				hasher.Reset()
				_, _ = hasher.Write(b)
				var id crypt.ID
				hasher.Sum(id[:0])
				results[w] = append(results[w], chunkResult{j.pos, id})
				if !r.Claim(id) {
					reused.Add(1)
					opts.Progress.Reused.Add(1)
					continue
				}
				if err := r.StoreBlob(ctx, sealer, repo.DataBlob, id, b); err != nil {
					fail(fmt.Errorf("disk %s: storing chunk at offset %d: %w", info.Name, start, err))
					continue
				}
				opts.Progress.Stored.Add(size)
			}
		}()
	}
	// Feed the chunk positions that hold data, in disk order.
	p.each(cs, info.Size, func(pos int64, ranges []source.Extent) bool {
		select {
		case jobs <- job{pos: pos, ranges: append([]source.Extent(nil), ranges...)}:
			return true
		case <-ctx.Done():
			return false
		}
	})
	close(jobs)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return repo.Disk{}, st, firstErr
	}
	m, err := buildMap(n, p.parent, p.read, results)
	if err != nil {
		return repo.Disk{}, st, fmt.Errorf("disk %s: %w", info.Name, err)
	}
	maps, err := r.SaveMap(ctx, m)
	if err != nil {
		return repo.Disk{}, st, err
	}
	st.read, st.reused = read.Load(), reused.Load()
	return repo.Disk{
		Name: info.Name, Size: info.Size, Format: info.Format, SourcePath: info.Path,
		ChunkSize: int(cs), Maps: maps, DataChunks: m.DataChunks(), DataBytes: dataBytesOf(m, cs, info.Size),
		Read: p.how,
	}, st, nil
}

// buildMap returns the disk's chunk map: the chunks read (results, one
// list per worker), and, for an incremental backup, the parent's chunks
// at the positions not read. Positions read that are not in results are
// all zeros now.
func buildMap(n int64, parent *repo.ChunkMap, read []posRange, results [][]chunkResult) (*repo.ChunkMap, error) {
	var got []chunkResult
	for _, rs := range results {
		got = append(got, rs...)
	}
	slices.SortFunc(got, func(a, b chunkResult) int { return cmp.Compare(a.pos, b.pos) })
	hint := len(got)
	if parent != nil {
		hint += int(parent.DataChunks())
	}
	m := repo.NewChunkMap(n, hint)
	j, k := 0, 0
	if parent != nil {
		for pos, id := range parent.All() {
			for k < len(read) && read[k].end <= pos {
				k++
			}
			if k < len(read) && read[k].start <= pos {
				continue // read again: what it holds now is in got
			}
			for ; j < len(got) && got[j].pos < pos; j++ {
				if err := m.Append(got[j].pos, got[j].id); err != nil {
					return nil, err
				}
			}
			if err := m.Append(pos, id); err != nil {
				return nil, err
			}
		}
	}
	for ; j < len(got); j++ {
		if err := m.Append(got[j].pos, got[j].id); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// isZero reports whether b is all zeros.
func isZero(b []byte) bool {
	var zero [4096]byte
	for len(b) > 0 {
		n := min(len(b), len(zero))
		if !bytes.Equal(b[:n], zero[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// dataBytesOf sums the sizes of the data positions of m.
func dataBytesOf(m *repo.ChunkMap, cs, size int64) int64 {
	var n int64
	for pos := range m.All() {
		n += min(cs, size-pos*cs)
	}
	return n
}

func covered(rs []source.Extent) int64 {
	var n int64
	for _, r := range rs {
		n += r.Length
	}
	return n
}

// splitRanges cuts ranges into pieces of at most size bytes (size <= 0:
// as they are).
func splitRanges(ranges []source.Extent, size int64) []source.Extent {
	if size <= 0 {
		return ranges
	}
	var out []source.Extent
	for _, e := range ranges {
		for off := e.Offset; off < e.Offset+e.Length; off += size {
			out = append(out, source.Extent{Offset: off, Length: min(size, e.Offset+e.Length-off)})
		}
	}
	return out
}
