package guestfs

import (
	"container/list"
	"encoding/binary"
	"fmt"
	"io"
	"sort"
	"sync"
)

var (
	le = binary.LittleEndian
	be = binary.BigEndian
)

// readFull reads exactly len(p) bytes at off; a short read is reported as
// corruption because metadata pointed past the end of the volume.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	if off < 0 {
		return corruptf("metadata points to negative offset %d", off)
	}
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == io.EOF || err == nil {
		return corruptf("metadata at byte %d points past the end of the volume", off)
	}
	return fmt.Errorf("reading %d bytes at %d: %w", len(p), off, err)
}

// readAt allocates and reads n bytes at off; n must already be bounded.
func readAt(r io.ReaderAt, off int64, n int) ([]byte, error) {
	if n < 0 || n > 64<<20 {
		return nil, corruptf("metadata read of %d bytes is out of bounds", n)
	}
	b := make([]byte, n)
	if err := readFull(r, b, off); err != nil {
		return nil, err
	}
	return b, nil
}

// section is a bounded window of a ReaderAt. Reads past the end return
// io.EOF like io.SectionReader.
type section struct {
	r    io.ReaderAt
	off  int64
	size int64
}

func (s *section) Size() int64 { return s.size }

func (s *section) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= s.size {
		return 0, io.EOF
	}
	if max := s.size - off; int64(len(p)) > max {
		n, err := s.r.ReadAt(p[:max], s.off+off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return s.r.ReadAt(p, s.off+off)
}

// segment maps [lstart, lstart+size) of a volume to disk offset pstart.
type segment struct {
	lstart, pstart, size int64
}

// segReader concatenates disk segments (an LVM logical volume).
type segReader struct {
	r    io.ReaderAt
	segs []segment // sorted by lstart, contiguous from 0
	size int64
}

func (s *segReader) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for len(p) > 0 {
		if off >= s.size || off < 0 {
			return n, io.EOF
		}
		i := sort.Search(len(s.segs), func(i int) bool { return s.segs[i].lstart+s.segs[i].size > off })
		if i == len(s.segs) {
			return n, io.EOF
		}
		sg := s.segs[i]
		within := off - sg.lstart
		chunk := p
		if rest := sg.size - within; int64(len(chunk)) > rest {
			chunk = chunk[:rest]
		}
		m, err := s.r.ReadAt(chunk, sg.pstart+within)
		n += m
		if err != nil && !(err == io.EOF && m == len(chunk)) {
			return n, err
		}
		p = p[m:]
		off += int64(m)
	}
	return n, nil
}

// volumeReader returns the bytes of v on disk.
func volumeReader(disk io.ReaderAt, v Volume) io.ReaderAt {
	if len(v.segs) > 0 {
		return &segReader{r: disk, segs: v.segs, size: v.Size}
	}
	return &section{r: disk, off: v.Offset, size: v.Size}
}

// pageCache caches small reads of a slow ReaderAt in 4 KiB pages, up to a
// fixed number of pages (LRU). Large reads bypass it.
type pageCache struct {
	r    io.ReaderAt
	size int64

	mu    sync.Mutex
	pages map[int64]*list.Element
	lru   list.List // of *cpage, front = most recent
	max   int
}

type cpage struct {
	idx  int64
	data []byte // may be short at the end of the volume
	err  error
}

const (
	pageSize       = 4096
	cacheBypassLen = 64 << 10
)

func newPageCache(r io.ReaderAt, size int64, maxBytes int) *pageCache {
	return &pageCache{r: r, size: size, pages: make(map[int64]*list.Element), max: maxBytes / pageSize}
}

func (c *pageCache) page(idx int64) *cpage {
	c.mu.Lock()
	if el, ok := c.pages[idx]; ok {
		c.lru.MoveToFront(el)
		c.mu.Unlock()
		return el.Value.(*cpage)
	}
	c.mu.Unlock()
	pg := &cpage{idx: idx}
	n := int64(pageSize)
	if rest := c.size - idx*pageSize; rest < n {
		n = rest
	}
	if n > 0 {
		buf := make([]byte, n)
		m, err := c.r.ReadAt(buf, idx*pageSize)
		if m < len(buf) {
			if err == nil || err == io.EOF {
				buf = buf[:m]
			} else {
				pg.err = err
			}
		}
		pg.data = buf
	}
	if pg.err != nil {
		return pg // do not cache I/O errors
	}
	c.mu.Lock()
	if el, ok := c.pages[idx]; ok {
		c.mu.Unlock()
		return el.Value.(*cpage)
	}
	c.pages[idx] = c.lru.PushFront(pg)
	for c.lru.Len() > c.max {
		old := c.lru.Back()
		c.lru.Remove(old)
		delete(c.pages, old.Value.(*cpage).idx)
	}
	c.mu.Unlock()
	return pg
}

func (c *pageCache) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if len(p) >= cacheBypassLen {
		if off >= c.size {
			return 0, io.EOF
		}
		if int64(len(p)) > c.size-off {
			n, err := c.r.ReadAt(p[:c.size-off], off)
			if err == nil {
				err = io.EOF
			}
			return n, err
		}
		return c.r.ReadAt(p, off)
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		if pos >= c.size {
			return n, io.EOF
		}
		pg := c.page(pos / pageSize)
		if pg.err != nil {
			return n, pg.err
		}
		within := int(pos % pageSize)
		if within >= len(pg.data) {
			return n, io.EOF
		}
		n += copy(p[n:], pg.data[within:])
	}
	return n, nil
}

// extent maps a run of file blocks to volume bytes.
type extent struct {
	logical int64 // first byte in the file
	phys    int64 // first byte on the volume; ignored when zero is set
	length  int64 // bytes
	zero    bool  // hole or unwritten: reads as zeros
}

// extentFile is a file whose bytes are given by a sorted extent list; gaps
// between extents read as zeros. resident, when non-nil, holds all the data.
type extentFile struct {
	r        io.ReaderAt
	size     int64
	ext      []extent
	initSize int64 // bytes beyond this read as zeros (NTFS initialized size)
}

func newExtentFile(r io.ReaderAt, size int64, ext []extent) (*extentFile, error) {
	sort.Slice(ext, func(i, j int) bool { return ext[i].logical < ext[j].logical })
	for i := 1; i < len(ext); i++ {
		if ext[i].logical < ext[i-1].logical+ext[i-1].length {
			return nil, corruptf("overlapping extents at file offset %d", ext[i].logical)
		}
	}
	return &extentFile{r: r, size: size, ext: ext, initSize: size}, nil
}

func (f *extentFile) Size() int64 { return f.size }

func (f *extentFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if off >= f.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > f.size-off {
		p = p[:f.size-off]
		eof = io.EOF
	}
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		buf := p[n:]
		i := sort.Search(len(f.ext), func(i int) bool { return f.ext[i].logical+f.ext[i].length > pos })
		if pos >= f.initSize {
			clear(buf)
			n += len(buf)
			break
		}
		if int64(len(buf)) > f.initSize-pos {
			buf = buf[:f.initSize-pos]
		}
		if i == len(f.ext) || f.ext[i].logical > pos {
			// hole up to the next extent
			hole := int64(len(buf))
			if i < len(f.ext) && f.ext[i].logical-pos < hole {
				hole = f.ext[i].logical - pos
			}
			clear(buf[:hole])
			n += int(hole)
			continue
		}
		e := f.ext[i]
		within := pos - e.logical
		if rest := e.length - within; int64(len(buf)) > rest {
			buf = buf[:rest]
		}
		if e.zero {
			clear(buf)
			n += len(buf)
			continue
		}
		if err := readFull(f.r, buf, e.phys+within); err != nil {
			return n, err
		}
		n += len(buf)
	}
	return n, eof
}

// bytesFile is a file held in memory (inline or resident data).
type bytesFile []byte

func (b bytesFile) Size() int64 { return int64(len(b)) }
func (b bytesFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if off >= int64(len(b)) {
		return 0, io.EOF
	}
	n := copy(p, b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readAllFile reads a small file completely (directories, symlinks).
func readAllFile(f File, max int64) ([]byte, error) {
	if f.Size() > max || f.Size() < 0 {
		return nil, corruptf("size %d exceeds limit %d", f.Size(), max)
	}
	b := make([]byte, f.Size())
	n, err := f.ReadAt(b, 0)
	if n == len(b) {
		return b, nil
	}
	return nil, err
}
