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
	"unsafe"

	"github.com/kura-backup/kura/internal/backend"
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
//
// Chunk memory is recycled: a chunk's buffer goes back to a free list when
// the chunk leaves the cache and no reader is copying from it, so a disk
// read end to end does not allocate (and fault in) fresh memory for every
// chunk — on virtual machines, where a page fault is dear, that halves the
// CPU an export costs.
type Disk struct {
	r      *repo.Repo
	snap   string
	d      repo.Disk
	ids    *repo.ChunkMap
	cs     int64
	ahead  int
	log    *slog.Logger
	prefch chan struct{} // bounds background loads

	mu       sync.Mutex
	cache    map[crypt.ID]*load // loaded chunks, also in lru
	lru      *list.List         // of *load, most recent first
	bytes    int64
	maxBytes int64
	loading  map[crypt.ID]*load
	lastEnd  int64    // chunk after the previous read, for read-ahead
	free     [][]byte // recycled buffers of bufSize
	maxFree  int
}

// load is one chunk being loaded or loaded. Its fields after done is
// closed are set once; refs, cached, elem and buf change under Disk.mu.
type load struct {
	id   crypt.ID
	done chan struct{}
	data []byte
	err  error

	buf    []byte // recycled storage behind data
	refs   int    // readers that may still copy from data
	cached bool
	elem   *list.Element
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
	k := &Disk{
		r: r, snap: snapID, d: d, ids: ids, cs: int64(d.ChunkSize),
		ahead: max(opts.ReadAhead, 0), log: opts.Logger, prefch: make(chan struct{}, 4),
		cache: map[crypt.ID]*load{}, lru: list.New(), maxBytes: opts.CacheBytes,
		loading: map[crypt.ID]*load{}, lastEnd: -1,
	}
	// Enough for a full cache, the loads in flight and their spares.
	k.maxFree = int(opts.CacheBytes/k.bufSize()) + 64
	return k, nil
}

// bufSize is the size of a recycled buffer: a sealed chunk (the chunk,
// its nonce and tag, with room for direct I/O) fits, and so does a
// decompressed one.
func (k *Disk) bufSize() int64 {
	return (k.cs + crypt.Overhead + backend.DirectRoom + backend.PageSize - 1) &^ (backend.PageSize - 1)
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
		waits[c-first] = k.chunk(c, false)
	}
	defer func() {
		for _, l := range waits {
			if l != nil {
				k.release(l)
			}
		}
	}()
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
				"offset", c*k.cs, "chunk", l.id.Short(), "err", l.err)
			return fmt.Errorf("snapshot %s disk %s at offset %d: %w", k.snap, k.d.Name, c*k.cs, l.err)
		}
		if int64(len(l.data)) != min(k.cs, k.d.Size-c*k.cs) {
			return fmt.Errorf("snapshot %s disk %s at offset %d: chunk %s holds %d bytes: %w",
				k.snap, k.d.Name, c*k.cs, l.id.Short(), len(l.data), repo.ErrDamaged)
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
	for c := last + 1; c <= last+int64(k.ahead) && c < k.ids.Len(); c++ {
		k.chunk(c, true)
	}
}

// Prefetch loads the chunks of [off, off+length) into the cache in the
// background (NBD_CMD_CACHE).
func (k *Disk) Prefetch(ctx context.Context, off, length int64) {
	if off < 0 || length <= 0 || off >= k.d.Size {
		return
	}
	for c := off / k.cs; c <= (min(off+length, k.d.Size)-1)/k.cs; c++ {
		k.chunk(c, true)
	}
}

// chunk returns the load of chunk position c, starting it if needed, and
// holds it for the caller, who must release it; nil for a zero chunk. A
// background load holds nothing and returns nil; it gives up rather than
// wait when enough background loads run.
func (k *Disk) chunk(c int64, background bool) *load {
	id := k.ids.Get(c)
	if id.IsZero() {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if l, ok := k.cache[id]; ok {
		k.lru.MoveToFront(l.elem)
		if background {
			return nil
		}
		l.refs++
		return l
	}
	if l, ok := k.loading[id]; ok {
		if background {
			return nil
		}
		l.refs++
		return l
	}
	if background {
		select {
		case k.prefch <- struct{}{}:
		default:
			return nil
		}
	}
	l := &load{id: id, done: make(chan struct{})}
	k.loading[id] = l
	go k.fetch(l, background)
	if background {
		return nil
	}
	l.refs++
	return l
}

// fetch loads l's chunk into recycled buffers and caches it. The load
// outlives the reader that asked: others may wait for it too.
func (k *Disk) fetch(l *load, background bool) {
	if background {
		defer func() { <-k.prefch }()
	}
	k.mu.Lock()
	sealed, dst := k.getBuf(), k.getBuf()
	k.mu.Unlock()
	data, err := k.r.LoadBlobInto(context.Background(), l.id, sealed, dst)
	k.mu.Lock()
	delete(k.loading, l.id)
	l.data, l.err = data, err
	switch {
	case err == nil && within(data, sealed):
		l.buf = sealed
		k.putBuf(dst)
	case err == nil && within(data, dst):
		l.buf = dst
		k.putBuf(sealed)
	default:
		k.putBuf(sealed)
		k.putBuf(dst)
	}
	if err == nil {
		k.add(l)
	}
	k.mu.Unlock()
	close(l.done)
}

// within reports whether b lies in buf's storage.
func within(b, buf []byte) bool {
	if cap(b) == 0 || cap(buf) == 0 {
		return false
	}
	p, start := uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(unsafe.Pointer(unsafe.SliceData(buf)))
	return p >= start && p < start+uintptr(cap(buf))
}

// release ends a reader's hold on l, recycling its buffer when it has
// left the cache meanwhile.
func (k *Disk) release(l *load) {
	k.mu.Lock()
	defer k.mu.Unlock()
	l.refs--
	k.recycle(l)
}

// recycle returns l's buffer to the free list once l is neither cached
// nor read. k.mu is held.
func (k *Disk) recycle(l *load) {
	if l.refs == 0 && !l.cached && l.buf != nil {
		k.putBuf(l.buf)
		l.buf, l.data = nil, nil
	}
}

// getBuf returns a recycled buffer, or a new one. k.mu is held.
func (k *Disk) getBuf() []byte {
	if n := len(k.free); n > 0 {
		b := k.free[n-1]
		k.free = k.free[:n-1]
		return b
	}
	return backend.AlignedBuffer(int(k.bufSize()))[:k.bufSize()]
}

// putBuf keeps b for reuse. k.mu is held.
func (k *Disk) putBuf(b []byte) {
	if int64(cap(b)) == k.bufSize() && len(k.free) < k.maxFree {
		k.free = append(k.free, b[:cap(b)])
	}
}

// add caches l, evicting the least recently used. k.mu is held.
func (k *Disk) add(l *load) {
	if _, ok := k.cache[l.id]; ok {
		return
	}
	l.cached = true
	l.elem = k.lru.PushFront(l)
	k.cache[l.id] = l
	k.bytes += int64(len(l.data))
	for k.bytes > k.maxBytes && k.lru.Len() > 1 {
		e := k.lru.Back()
		old := e.Value.(*load)
		k.lru.Remove(e)
		delete(k.cache, old.id)
		k.bytes -= int64(len(old.data))
		old.cached, old.elem = false, nil
		k.recycle(old)
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
		if k.ids.Get(c).IsZero() {
			flags = nbd.StateHole | nbd.StateZero
			// The hole runs to the next data chunk, at most 2 GiB on
			// (one reply's extent length is 32 bits).
			cend = min(end, pos+1<<31)
			if next, _, ok := k.ids.Next(c); ok {
				cend = min(cend, next*k.cs)
			}
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
