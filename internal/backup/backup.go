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
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
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
	// Stats to merge into the snapshot (freeze window, pause time).
	Stats repo.BackupStats
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
	if opts.Name == "" {
		return nil, errors.New("a backup needs a name (--name)")
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
	// The lock is taken before the index is read: see repo's gc.go.
	if err := r.LoadIndex(ctx); err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	snap := &repo.Snapshot{
		Time: time.Now().UTC(), Name: opts.Name, Hostname: host, Source: opts.Source,
		Kind: opts.Kind, Mode: opts.Mode, Config: opts.Config, Tags: opts.Tags, Stats: opts.Stats,
	}
	snap.Stats.Start = opts.Progress.Started.UTC()
	plans := make([][]source.Extent, len(disks))
	for i, d := range disks {
		plans[i], err = plan(ctx, d, int64(r.Config().ChunkSize))
		if err != nil {
			return nil, err
		}
		for _, e := range plans[i] {
			opts.Progress.Total.Add(e.Length)
		}
	}
	before := r.Stored()
	for i, d := range disks {
		rd, st, err := backupDisk(ctx, r, d, plans[i], opts)
		if err != nil {
			return nil, err
		}
		snap.Disks = append(snap.Disks, rd)
		snap.Stats.BytesRead += st.read
		snap.Stats.ChunksReused += st.reused
	}
	// Data, then index, then snapshot.
	if err := r.Flush(ctx); err != nil {
		return nil, err
	}
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

// plan returns the data extents of d (zero extents dropped, adjacent ones
// merged).
func plan(ctx context.Context, d source.Disk, chunk int64) ([]source.Extent, error) {
	info := d.Info()
	var out []source.Extent
	const window = 1 << 30
	for off := int64(0); off < info.Size; off += window {
		n := min(window, info.Size-off)
		exts, err := d.Extents(ctx, off, n)
		if err != nil {
			return nil, fmt.Errorf("disk %s: listing allocated extents: %w", info.Name, err)
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

// job is one chunk position to read: the data ranges inside it.
type job struct {
	pos    int64
	ranges []source.Extent
}

type diskStats struct{ read, reused int64 }

func backupDisk(ctx context.Context, r *repo.Repo, d source.Disk, exts []source.Extent, opts Options) (repo.Disk, diskStats, error) {
	info := d.Info()
	cs := int64(r.Config().ChunkSize)
	n := (info.Size + cs - 1) / cs
	ids := make([]crypt.ID, n)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	jobs := make(chan job, opts.Workers*2)
	var st diskStats
	var dataChunks, dataBytes atomic.Int64
	var read, reused atomic.Int64
	var once sync.Once
	var firstErr error
	fail := func(err error) {
		once.Do(func() { firstErr = err; cancel() })
	}
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
				clear(b)
				for _, e := range j.ranges {
					if err := d.ReadAt(ctx, b[e.Offset-start:e.Offset-start+e.Length], e.Offset); err != nil {
						fail(fmt.Errorf("disk %s: reading %d bytes at offset %d: %w", info.Name, e.Length, e.Offset, err))
						break
					}
					read.Add(e.Length)
					opts.Progress.Done.Add(e.Length)
				}
				if ctx.Err() != nil || isZero(b) {
					continue
				}
				hasher.Reset()
				_, _ = hasher.Write(b)
				var id crypt.ID
				hasher.Sum(id[:0])
				ids[j.pos] = id
				dataChunks.Add(1)
				dataBytes.Add(size)
				if !r.Claim(id) {
					reused.Add(1)
					opts.Progress.Reused.Add(1)
					continue
				}
				sealed, comp, err := sealer.Seal(b)
				if err == nil {
					err = r.SaveBlob(ctx, repo.DataBlob, id, sealed, comp, len(b))
				}
				if err != nil {
					fail(fmt.Errorf("disk %s: storing chunk at offset %d: %w", info.Name, start, err))
					continue
				}
				opts.Progress.Stored.Add(size)
			}
		}()
	}
	// Feed chunk positions in disk order.
	var cur *job
	feed := func() bool {
		if cur == nil {
			return true
		}
		select {
		case jobs <- *cur:
			cur = nil
			return true
		case <-ctx.Done():
			return false
		}
	}
outer:
	for _, e := range exts {
		for off := e.Offset; off < e.Offset+e.Length; {
			pos := off / cs
			end := min((pos+1)*cs, e.Offset+e.Length)
			if cur != nil && cur.pos != pos {
				if !feed() {
					break outer
				}
			}
			if cur == nil {
				cur = &job{pos: pos}
			}
			cur.ranges = append(cur.ranges, source.Extent{Offset: off, Length: end - off})
			off = end
		}
	}
	feed()
	close(jobs)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return repo.Disk{}, st, firstErr
	}
	maps, err := r.SaveMap(ctx, ids)
	if err != nil {
		return repo.Disk{}, st, err
	}
	st.read, st.reused = read.Load(), reused.Load()
	return repo.Disk{
		Name: info.Name, Size: info.Size, Format: info.Format, SourcePath: info.Path,
		ChunkSize: int(cs), Maps: maps, DataChunks: dataChunks.Load(), DataBytes: dataBytes.Load(),
		Read: "full",
	}, st, nil
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
