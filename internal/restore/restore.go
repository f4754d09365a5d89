// Package restore brings disks back out of the repository: it reads a
// snapshot's chunks in parallel, checks each against its id (a keyed hash of
// the data that was backed up), and writes them to a target — a sparse raw
// file, a block device, or a qcow2 image written through an NBD export.
//
// Every restore point is complete, so no chain is replayed: a disk is its
// map of chunk ids and nothing else.
package restore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
)

// Target receives a restored disk.
type Target interface {
	// WriteAt writes p at off. Called concurrently for distinct ranges.
	WriteAt(ctx context.Context, p []byte, off int64) error
	// NeedsZeroes reports whether zero chunks must be written explicitly
	// (true for block devices; false for fresh sparse files and images).
	NeedsZeroes() bool
	// Commit makes the restored disk durable and puts it in place.
	Commit(ctx context.Context) error
	// Abort discards a partial restore; the original target is untouched.
	Abort()
}

// Progress is updated while a restore runs.
type Progress struct {
	Total   atomic.Int64
	Done    atomic.Int64
	Started time.Time
}

// Options tune a restore.
type Options struct {
	Workers  int // 0 = 2 × CPUs
	Progress *Progress
	// IgnoreDamage restores every intact range and fills the chunks that
	// are missing or damaged (with no intact copy left) with zeros,
	// listing them in Damage, instead of failing.
	IgnoreDamage bool
	// Damage collects what IgnoreDamage filled with zeros.
	Damage *DamageReport
}

// DamageReport lists the byte ranges of a disk a restore could not read
// and filled with zeros. Safe for concurrent use.
type DamageReport struct {
	mu     sync.Mutex
	ranges []repo.Range
	first  error
}

func (d *DamageReport) add(off, n int64, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ranges = append(d.ranges, repo.Range{Offset: off, Length: n})
	if d.first == nil {
		d.first = err
	}
}

// Ranges returns the damaged ranges, sorted and merged.
func (d *DamageReport) Ranges() []repo.Range {
	d.mu.Lock()
	defer d.mu.Unlock()
	return repo.MergeRanges(append([]repo.Range(nil), d.ranges...))
}

// Err returns the first error behind the damage, nil when there was none.
func (d *DamageReport) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.first
}

// unreadable reports whether err means the chunk cannot be read from the
// repository (as opposed to a failure of the target or a cancel).
func unreadable(err error) bool {
	return errors.Is(err, repo.ErrDamaged) || errors.Is(err, repo.ErrBlobMissing)
}

// Disk restores one disk of a snapshot into t, then commits t. On error t
// is aborted.
func Disk(ctx context.Context, r *repo.Repo, d repo.Disk, t Target, opts Options) (err error) {
	defer func() {
		if err != nil {
			t.Abort()
		}
	}()
	if opts.Workers <= 0 {
		opts.Workers = 2 * runtime.GOMAXPROCS(0)
	}
	if opts.Progress == nil {
		opts.Progress = &Progress{}
	}
	if opts.Progress.Started.IsZero() {
		opts.Progress.Started = time.Now()
	}
	if opts.IgnoreDamage && opts.Damage == nil {
		opts.Damage = &DamageReport{}
	}
	if err := r.LoadIndex(ctx); err != nil {
		return err
	}
	var m *repo.ChunkMap
	if opts.IgnoreDamage {
		var lost []repo.Range
		if m, lost, err = r.LoadMapLenient(ctx, d); err != nil {
			return err
		}
		for _, rg := range lost { // read as zeros: m has no chunk there
			opts.Damage.add(rg.Offset, rg.Length, fmt.Errorf("disk %s: the map of bytes %d-%d is lost: %w", d.Name, rg.Offset, rg.Offset+rg.Length-1, repo.ErrDamaged))
		}
	} else if m, err = r.LoadMap(ctx, d); err != nil {
		return err
	}
	opts.Progress.Total.Add(d.DataBytes)
	cs := int64(d.ChunkSize)
	jobs, err := planReads(r, d, m, opts.IgnoreDamage)
	if errors.Is(err, repo.ErrBlobMissing) {
		// An index file may have been lost: look in the packs no index
		// lists before giving up.
		if _, serr := r.ScanUnindexedPacks(ctx); serr != nil {
			return serr
		}
		jobs, err = planReads(r, d, m, opts.IgnoreDamage)
	}
	if err != nil {
		return err
	}
	var zeroes []posRange
	if t.NeedsZeroes() {
		zeroes = zeroRanges(m)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var once sync.Once
	var firstErr error
	fail := func(err error) { once.Do(func() { firstErr = err; cancel() }) }

	queue := make(chan *readJob)
	var wg sync.WaitGroup
	for w := 0; w < opts.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, cs)
			zero := make([]byte, cs)
			var span []byte // this worker's pack reads, reused: fresh memory for every read costs page faults
			// write puts chunk pos of the disk in place; data must hold
			// exactly the chunk (the disk's last one may be short).
			write := func(data []byte, pos int64) bool {
				off := pos * cs
				if size := min(cs, d.Size-off); int64(len(data)) != size {
					fail(fmt.Errorf("disk %s at offset %d: chunk holds %d bytes, want %d: %w", d.Name, off, len(data), size, repo.ErrDamaged))
					return false
				}
				if err := t.WriteAt(ctx, data, off); err != nil {
					fail(fmt.Errorf("disk %s: writing at offset %d: %w", d.Name, off, err))
					return false
				}
				return true
			}
			// lost handles a chunk whose copy in the span failed: it is
			// recorded as damaged and read from another intact copy if
			// there is one; else, with IgnoreDamage, its positions are
			// filled with zeros and listed.
			lost := func(u *blobUse, err error) bool {
				if errors.Is(err, repo.ErrDamaged) {
					_ = r.ReportDamage(ctx, u.id, u.loc.Pack, err) // logged by the repository
					if r.Index().Intact(u.id) {
						plain, lerr := r.LoadBlob(ctx, u.id, buf)
						if lerr == nil {
							for _, pos := range u.pos {
								if !write(plain, pos) {
									return false
								}
								opts.Progress.Done.Add(int64(len(plain)))
							}
							return true
						}
						err = lerr
					}
				}
				if !opts.IgnoreDamage || !unreadable(err) {
					fail(fmt.Errorf("disk %s at offset %d: %w", d.Name, u.pos[0]*cs, err))
					return false
				}
				for _, pos := range u.pos {
					off := pos * cs
					n := min(cs, d.Size-off)
					if t.NeedsZeroes() && !write(zero[:n], pos) {
						return false
					}
					opts.Damage.add(off, n, fmt.Errorf("disk %s at offset %d: %w", d.Name, off, err))
					opts.Progress.Done.Add(n)
				}
				return true
			}
			for j := range queue {
				if ctx.Err() != nil {
					continue
				}
				if len(j.missing) > 0 { // chunks no pack holds (IgnoreDamage)
					for _, u := range j.missing {
						if !lost(u, fmt.Errorf("chunk %s: %w", u.id.Short(), repo.ErrBlobMissing)) {
							break
						}
					}
					continue
				}
				if len(j.blobs) == 0 { // zero chunks of a target that needs them written
					for pos := j.zeroes.start; pos < j.zeroes.end && ctx.Err() == nil; pos++ {
						if !write(zero[:min(cs, d.Size-pos*cs)], pos) {
							break
						}
					}
					continue
				}
				if n := j.end - j.start + backend.DirectRoom; int64(cap(span)) < n {
					span = backend.AlignedBuffer(int(n))
				}
				data, err := r.LoadPackRangeInto(ctx, j.pack, j.start, j.end-j.start, span)
				if err != nil {
					// The whole span failed (a pack missing or cut
					// short): one damage record for all its chunks.
					ids := make([]crypt.ID, len(j.blobs))
					for i, u := range j.blobs {
						ids[i] = u.id
					}
					_ = r.ReportDamages(ctx, ids, j.pack, err) // logged by the repository
					for _, u := range j.blobs {
						if !lost(u, fmt.Errorf("chunk %s: %w", u.id.Short(), err)) {
							break
						}
					}
					continue
				}
				for _, u := range j.blobs {
					sealed := data[int64(u.loc.Offset)-j.start : int64(u.loc.Offset)-j.start+int64(u.loc.Length)]
					plain, err := r.OpenBlob(u.id, u.loc, sealed, buf)
					if err != nil {
						if !lost(u, err) {
							break
						}
						continue
					}
					ok := true
					for _, pos := range u.pos {
						if ok = write(plain, pos); !ok {
							break
						}
						opts.Progress.Done.Add(int64(len(plain)))
					}
					if !ok {
						break
					}
				}
			}
		}()
	}
	// Feed the reads and the zero ranges, cut into jobs of zeroJob chunks
	// as they go, by the disk position they serve.
	send := func(j *readJob) bool {
		select {
		case queue <- j:
			return true
		case <-ctx.Done():
			return false
		}
	}
feed:
	for len(jobs) > 0 || len(zeroes) > 0 {
		if len(zeroes) == 0 || (len(jobs) > 0 && jobs[0].first < zeroes[0].start) {
			if !send(jobs[0]) {
				break feed
			}
			jobs = jobs[1:]
			continue
		}
		z := &zeroes[0]
		end := min(z.end, z.start+zeroJob)
		if !send(&readJob{first: z.start, zeroes: posRange{z.start, end}}) {
			break feed
		}
		if z.start = end; z.start == z.end {
			zeroes = zeroes[1:]
		}
	}
	close(queue)
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return firstErr
	}
	return t.Commit(ctx)
}

// blobUse is one stored chunk and the disk positions (in chunks) it fills.
type blobUse struct {
	id  crypt.ID
	loc repo.Loc
	pos []int64
}

// readJob is one read of a contiguous span of a pack holding the blobs
// to restore from it, or (no blobs) zero chunks to write.
type readJob struct {
	pack       crypt.ID
	start, end int64 // byte span of the pack to read
	blobs      []*blobUse
	first      int64 // lowest disk position served, for ordering
	zeroes     posRange
	missing    []*blobUse // chunks no pack holds, to fill with zeros
}

// posRange is the chunk positions [start, end).
type posRange struct{ start, end int64 }

// zeroJob is how many zero chunks one job writes.
const zeroJob = 64

// maxGap is the largest unneeded stretch of a pack read through rather
// than split into two reads.
const maxGap = 1 << 20

// planReads groups the disk's data chunks by pack: each pack's needed
// blobs are read in as few contiguous spans as gaps allow, each span once,
// and the spans are ordered by the disk position they serve so that
// writes go roughly front to back. A chunk that fills several positions
// is read once. A chunk no index lists fails the plan, or with
// ignoreMissing goes into one job that fills its positions with zeros.
func planReads(r *repo.Repo, d repo.Disk, m *repo.ChunkMap, ignoreMissing bool) ([]*readJob, error) {
	cs := int64(d.ChunkSize)
	byID := map[crypt.ID]*blobUse{}
	byPack := map[crypt.ID][]*blobUse{}
	var missing []*blobUse
	for pos, id := range m.All() {
		if u := byID[id]; u != nil {
			u.pos = append(u.pos, pos)
			continue
		}
		l, ok := r.Locate(id)
		u := &blobUse{id: id, loc: l, pos: []int64{pos}}
		byID[id] = u
		if !ok {
			if !ignoreMissing {
				return nil, fmt.Errorf("disk %s at offset %d: chunk %s: %w", d.Name, pos*cs, id.Short(), repo.ErrBlobMissing)
			}
			missing = append(missing, u)
			continue
		}
		byPack[l.Pack] = append(byPack[l.Pack], u)
	}

	var jobs []*readJob
	for p, us := range byPack {
		sort.Slice(us, func(a, b int) bool { return us[a].loc.Offset < us[b].loc.Offset })
		var j *readJob
		for _, u := range us {
			off, end := int64(u.loc.Offset), int64(u.loc.Offset)+int64(u.loc.Length)
			if j == nil || off-j.end > maxGap {
				j = &readJob{pack: p, start: off, end: end, first: u.pos[0]}
				jobs = append(jobs, j)
			}
			j.end = max(j.end, end)
			j.first = min(j.first, u.pos[0])
			j.blobs = append(j.blobs, u)
		}
	}
	if len(missing) > 0 {
		jobs = append(jobs, &readJob{first: missing[0].pos[0], missing: missing})
	}
	sort.Slice(jobs, func(a, b int) bool { return jobs[a].first < jobs[b].first })
	return jobs, nil
}

// zeroRanges returns the runs of all-zero positions of m: the gaps
// between its data chunks.
func zeroRanges(m *repo.ChunkMap) []posRange {
	var out []posRange
	next := int64(0)
	for pos := range m.All() {
		if pos > next {
			out = append(out, posRange{next, pos})
		}
		next = pos + 1
	}
	if next < m.Len() {
		out = append(out, posRange{next, m.Len()})
	}
	return out
}

// ErrExists is returned when the restore target exists and overwriting was
// not asked for.
var ErrExists = errors.New("target exists")

// writeSparse writes only the blocks of p (blk bytes each, aligned to off)
// that hold non-zero bytes, so a fresh target keeps holes where the disk
// had zeros.
func writeSparse(p []byte, off int64, blk int, write func(p []byte, off int64) error) error {
	zero := make([]byte, blk)
	start := -1 // start of the current run of non-zero blocks
	for i := 0; i < len(p); i += blk {
		end := min(i+blk, len(p))
		isZero := bytes.Equal(p[i:end], zero[:end-i])
		switch {
		case !isZero && start < 0:
			start = i
		case isZero && start >= 0:
			if err := write(p[start:i], off+int64(start)); err != nil {
				return err
			}
			start = -1
		}
	}
	if start >= 0 {
		return write(p[start:], off+int64(start))
	}
	return nil
}
