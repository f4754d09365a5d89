// Package snapdisk reads one disk of a restore point at any offset,
// straight from the repository, without restoring it first. It is what
// kura's NBD export, instant recovery and file-level restore read.
//
// A disk is its map of chunk ids; a read finds the chunks it covers, loads
// each (authenticated, decrypted, checked against its id) once even when
// many readers want it at the same time, and keeps recent chunks in a
// bounded cache. Sequential reads trigger read-ahead of the next chunks, so
// a guest streaming its disk does not wait for the repository chunk by
// chunk. Zero chunks are never stored and read as zeros; Extents reports
// them as holes so clients can skip them.
package snapdisk

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/repo"
)

// Options tune a Disk.
type Options struct {
	// CacheBytes bounds the decrypted chunks kept in memory (0 means
	// 64 MiB).
	CacheBytes int64
	// ReadAhead is how many chunks past a sequential read are loaded in
	// the background (0 means 16; negative disables read-ahead).
	ReadAhead int
	// Logger receives the errors readers get (which chunk, which
	// snapshot); nil logs nothing.
	Logger *slog.Logger
}

// Disk is a read-only view of one disk of a snapshot. It is safe for
// concurrent use.
type Disk struct {
	r      *repo.Repo
	snap   string
	d      repo.Disk
	ids    []crypt.ID
	cs     int64
	ahead  int
	log    *slog.Logger
	prefch chan struct{} // bounds background loads

	mu       sync.Mutex
	cache    map[crypt.ID]*list.Element // of *entry
	lru      *list.List
	bytes    int64
	maxBytes int64
	loading  map[crypt.ID]*load
	lastEnd  int64 // chunk after the previous read, for read-ahead
}

type entry struct {
	id   crypt.ID
	data []byte
}

type load struct {
	done chan struct{}
	data []byte
	err  error
}

// Open prepares disk d of snapshot snapID for reading. The repository's
// index must be loaded (repo.LoadIndex) or is loaded here.
func Open(ctx context.Context, r *repo.Repo, snapID string, d repo.Disk, opts Options) (*Disk, error) {
	if err := r.LoadIndex(ctx); err != nil {
		return nil, err
	}
	ids, err := r.LoadMap(ctx, d)
	if err != nil {
		return nil, fmt.Errorf("disk %s of snapshot %s: %w", d.Name, snapID, err)
	}
	if d.ChunkSize <= 0 {
		return nil, fmt.Errorf("disk %s of snapshot %s: chunk size %d: %w", d.Name, snapID, d.ChunkSize, repo.ErrDamaged)
	}
	if opts.CacheBytes <= 0 {
		opts.CacheBytes = 64 << 20
	}
	if opts.ReadAhead == 0 {
		opts.ReadAhead = 16
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Disk{
		r: r, snap: snapID, d: d, ids: ids, cs: int64(d.ChunkSize),
		ahead: max(opts.ReadAhead, 0), log: opts.Logger, prefch: make(chan struct{}, 4),
		cache: map[crypt.ID]*list.Element{}, lru: list.New(), maxBytes: opts.CacheBytes,
		loading: map[crypt.ID]*load{}, lastEnd: -1,
	}, nil
}

// Size is the disk's size in bytes.
func (k *Disk) Size() int64 { return k.d.Size }

// Name is the disk's name in the snapshot.
func (k *Disk) Name() string { return k.d.Name }

// ErrRange is returned for reads outside the disk.
var ErrRange = errors.New("read beyond the end of the disk")

// ReadAt fills p from offset off. A chunk that is missing or fails
// authentication fails the read with an error wrapping repo.ErrDamaged or
// repo.ErrBlobMissing that names the chunk and the snapshot; other ranges
// stay readable.
func (k *Disk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < 0 || off > k.d.Size || int64(len(p)) > k.d.Size-off {
		return fmt.Errorf("disk %s: %d bytes at %d of %d: %w", k.d.Name, len(p), off, k.d.Size, ErrRange)
	}
	if len(p) == 0 {
		return nil
	}
	first, last := off/k.cs, (off+int64(len(p))-1)/k.cs
	k.readAhead(first, last)
	// Start every chunk's load first, so a multi-chunk read loads them
	// in parallel.
	waits := make([]*load, last-first+1)
	for c := first; c <= last; c++ {
		waits[c-first] = k.chunk(ctx, c, false)
	}
	for c := first; c <= last; c++ {
		start := max(off, c*k.cs)
		end := min(off+int64(len(p)), (c+1)*k.cs)
		dst := p[start-off : end-off]
		l := waits[c-first]
		if l == nil {
			clear(dst)
			continue
		}
		select {
		case <-l.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if l.err != nil {
			k.log.Error("reading a chunk of the restore point failed", "snapshot", k.snap, "disk", k.d.Name,
				"offset", c*k.cs, "chunk", k.ids[c].Short(), "err", l.err)
			return fmt.Errorf("snapshot %s disk %s at offset %d: %w", k.snap, k.d.Name, c*k.cs, l.err)
		}
		if int64(len(l.data)) != min(k.cs, k.d.Size-c*k.cs) {
			return fmt.Errorf("snapshot %s disk %s at offset %d: chunk %s holds %d bytes: %w",
				k.snap, k.d.Name, c*k.cs, k.ids[c].Short(), len(l.data), repo.ErrDamaged)
		}
		copy(dst, l.data[start-c*k.cs:])
	}
	return nil
}

// readAhead starts background loads of the chunks after [first, last]
// when this read continues the previous one.
func (k *Disk) readAhead(first, last int64) {
	k.mu.Lock()
	seq := first == k.lastEnd || first == k.lastEnd-1
	k.lastEnd = last + 1
	k.mu.Unlock()
	if !seq || k.ahead == 0 {
		return
	}
	for c := last + 1; c <= last+int64(k.ahead) && c < int64(len(k.ids)); c++ {
		k.chunk(context.Background(), c, true)
	}
}

// Prefetch loads the chunks of [off, off+length) into the cache in the
// background (NBD_CMD_CACHE).
func (k *Disk) Prefetch(ctx context.Context, off, length int64) {
	if off < 0 || length <= 0 || off >= k.d.Size {
		return
	}
	for c := off / k.cs; c <= (min(off+length, k.d.Size)-1)/k.cs; c++ {
		k.chunk(context.Background(), c, true)
	}
}

// chunk returns the load of chunk position c, starting it if needed; nil
// for a zero chunk. A background load gives up rather than wait when
// enough background loads run.
func (k *Disk) chunk(ctx context.Context, c int64, background bool) *load {
	id := k.ids[c]
	if id.IsZero() {
		return nil
	}
	k.mu.Lock()
	if e, ok := k.cache[id]; ok {
		k.lru.MoveToFront(e)
		k.mu.Unlock()
		l := &load{done: make(chan struct{}), data: e.Value.(*entry).data}
		close(l.done)
		return l
	}
	if l, ok := k.loading[id]; ok {
		k.mu.Unlock()
		return l
	}
	if background {
		select {
		case k.prefch <- struct{}{}:
		default:
			k.mu.Unlock()
			return nil
		}
	}
	l := &load{done: make(chan struct{})}
	k.loading[id] = l
	k.mu.Unlock()
	go func() {
		if background {
			defer func() { <-k.prefch }()
		}
		// The load outlives the first reader that asked: others may wait
		// for it too.
		data, err := k.r.LoadBlob(context.WithoutCancel(ctx), id, nil)
		l.data, l.err = data, err
		k.mu.Lock()
		delete(k.loading, id)
		if err == nil {
			k.add(id, data)
		}
		k.mu.Unlock()
		close(l.done)
	}()
	return l
}

// add caches a chunk, evicting the least recently used. k.mu is held.
func (k *Disk) add(id crypt.ID, data []byte) {
	if _, ok := k.cache[id]; ok {
		return
	}
	k.cache[id] = k.lru.PushFront(&entry{id: id, data: data})
	k.bytes += int64(len(data))
	for k.bytes > k.maxBytes && k.lru.Len() > 1 {
		e := k.lru.Back()
		en := e.Value.(*entry)
		k.lru.Remove(e)
		delete(k.cache, en.id)
		k.bytes -= int64(len(en.data))
	}
}

// Extents describes [off, off+length) with base:allocation flags: zero
// chunks are holes that read as zeros, every other chunk is data.
func (k *Disk) Extents(ctx context.Context, off, length int64) ([]nbd.Extent, error) {
	if off < 0 || length <= 0 || off >= k.d.Size {
		return nil, fmt.Errorf("disk %s: extents at %d: %w", k.d.Name, off, ErrRange)
	}
	end := min(off+length, k.d.Size)
	var out []nbd.Extent
	for pos := off; pos < end; {
		c := pos / k.cs
		cend := min((c+1)*k.cs, end)
		var flags uint32
		if k.ids[c].IsZero() {
			flags = nbd.StateHole | nbd.StateZero
		}
		if n := len(out); n > 0 && out[n-1].Flags == flags {
			out[n-1].Length += cend - pos
		} else {
			out = append(out, nbd.Extent{Offset: pos, Length: cend - pos, Flags: flags})
		}
		pos = cend
		// One reply's extent length is 32 bits.
		if out[len(out)-1].Length >= 1<<31 {
			break
		}
	}
	return out, nil
}

// ReaderAt adapts the disk to io.ReaderAt for parsers that read it
// (file-level restore); ctx bounds every read.
func (k *Disk) ReaderAt(ctx context.Context) io.ReaderAt { return readerAt{ctx, k} }

type readerAt struct {
	ctx context.Context
	k   *Disk
}

func (r readerAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.k.d.Size {
		return 0, io.EOF
	}
	n := len(p)
	var err error
	if int64(n) > r.k.d.Size-off {
		n = int(r.k.d.Size - off)
		err = io.EOF
	}
	if e := r.k.ReadAt(r.ctx, p[:n], off); e != nil {
		return 0, e
	}
	return n, err
}
