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
	"sync"
	"sync/atomic"
	"time"

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
	if err := r.LoadIndex(ctx); err != nil {
		return err
	}
	ids, err := r.LoadMap(ctx, d)
	if err != nil {
		return err
	}
	opts.Progress.Total.Add(d.DataBytes)
	cs := int64(d.ChunkSize)
	zeroes := t.NeedsZeroes()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var once sync.Once
	var firstErr error
	fail := func(err error) { once.Do(func() { firstErr = err; cancel() }) }

	type job struct {
		pos int64
		id  crypt.ID
	}
	jobs := make(chan job, opts.Workers*2)
	var wg sync.WaitGroup
	for w := 0; w < opts.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, cs)
			zero := make([]byte, cs)
			for j := range jobs {
				if ctx.Err() != nil {
					continue
				}
				off := j.pos * cs
				size := min(cs, d.Size-off)
				var data []byte
				if j.id.IsZero() {
					data = zero[:size]
				} else {
					var err error
					data, err = r.LoadBlob(ctx, j.id, buf)
					if err != nil {
						fail(fmt.Errorf("disk %s at offset %d: %w", d.Name, off, err))
						continue
					}
					if int64(len(data)) != size {
						fail(fmt.Errorf("disk %s at offset %d: chunk holds %d bytes, want %d: %w", d.Name, off, len(data), size, repo.ErrDamaged))
						continue
					}
				}
				if err := t.WriteAt(ctx, data, off); err != nil {
					fail(fmt.Errorf("disk %s: writing at offset %d: %w", d.Name, off, err))
					continue
				}
				if !j.id.IsZero() {
					opts.Progress.Done.Add(size)
				}
			}
		}()
	}
feed:
	for pos, id := range ids {
		if id.IsZero() && !zeroes {
			continue
		}
		select {
		case jobs <- job{int64(pos), id}:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return firstErr
	}
	return t.Commit(ctx)
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
