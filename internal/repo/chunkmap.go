package repo

import (
	"encoding/binary"
	"fmt"
	"iter"
	"sort"

	"github.com/kura-backup/kura/internal/crypt"
)

// ChunkMap is a disk's chunk ids by position, in memory. It holds only the
// positions with data, sorted, so that its size follows the data a disk
// holds, not its virtual size: a 16 TiB disk with 2 GiB of data costs a few
// hundred KiB, not the 2 GiB a dense list of ids would. Every position it
// does not hold is an all-zero chunk.
//
// A ChunkMap is built by Append in position order and is read-only after
// that; reading it from several goroutines is safe.
type ChunkMap struct {
	n   int64      // positions of the disk
	pos []int64    // data positions, increasing
	ids []crypt.ID // ids[i] is the chunk at pos[i], never zero
}

// NewChunkMap returns an empty map of a disk of n chunk positions (all
// zero), with room for hint data chunks.
func NewChunkMap(n int64, hint int) *ChunkMap {
	hint = max(hint, 0)
	return &ChunkMap{n: n, pos: make([]int64, 0, hint), ids: make([]crypt.ID, 0, hint)}
}

// Len is the disk's number of chunk positions.
func (m *ChunkMap) Len() int64 { return m.n }

// DataChunks is the number of positions holding data (non-zero ids).
func (m *ChunkMap) DataChunks() int64 { return int64(len(m.pos)) }

// Append sets position pos to id. Positions must be appended in
// increasing order and lie below Len; a zero id (an all-zero chunk) is
// not stored.
func (m *ChunkMap) Append(pos int64, id crypt.ID) error {
	if pos < 0 || pos >= m.n {
		return fmt.Errorf("chunk position %d outside a disk of %d chunks", pos, m.n)
	}
	if k := len(m.pos); k > 0 && m.pos[k-1] >= pos {
		return fmt.Errorf("chunk position %d after position %d: positions must increase", pos, m.pos[k-1])
	}
	if id.IsZero() {
		return nil
	}
	m.pos = append(m.pos, pos)
	m.ids = append(m.ids, id)
	return nil
}

// Get returns the id of the chunk at pos, the zero id for an all-zero
// chunk (or a position outside the disk).
func (m *ChunkMap) Get(pos int64) crypt.ID {
	i := m.search(pos)
	if i < len(m.pos) && m.pos[i] == pos {
		return m.ids[i]
	}
	return crypt.ID{}
}

// Next returns the first data position at or after pos and its id; ok is
// false when no data follows.
func (m *ChunkMap) Next(pos int64) (next int64, id crypt.ID, ok bool) {
	i := m.search(pos)
	if i == len(m.pos) {
		return 0, crypt.ID{}, false
	}
	return m.pos[i], m.ids[i], true
}

// search returns the index of the first data position >= pos.
func (m *ChunkMap) search(pos int64) int {
	return sort.Search(len(m.pos), func(i int) bool { return m.pos[i] >= pos })
}

// All yields the data positions and their ids in increasing position
// order; all-zero chunks are left out.
func (m *ChunkMap) All() iter.Seq2[int64, crypt.ID] {
	return func(yield func(int64, crypt.ID) bool) {
		for i, p := range m.pos {
			if !yield(p, m.ids[i]) {
				return
			}
		}
	}
}

// IDs returns the ids of the data chunks in position order (duplicates
// included). The slice is the map's own: do not modify it; appending to
// it copies.
func (m *ChunkMap) IDs() []crypt.ID { return m.ids[:len(m.ids):len(m.ids)] }

// Map blobs, format 2 (snapshot version 2; docs/FORMAT.md, "Blobs"): a
// map blob is a sequence of records, each
//
//	uvarint skip | chunk id (32 bytes)
//
// where skip counts the all-zero positions before this record's position,
// after the previous record's position in the same blob; the first record
// of every blob gives its position itself. So each blob stands alone: a
// lost map blob loses only the positions between its neighbours, and a
// chunk that vanishes at the end of one blob does not change the next. Every record names a data chunk (never the
// zero id), a blob holds 1 to MapEntries records, and positions past a
// disk's last record are all zero: a disk of zeros has no map blob.

// mapMinEntries and mapCutMask choose where a writer ends a map blob: after
// at least mapMinEntries records, at the first id whose first two bytes
// (little-endian) are below mapCutBelow (1 in 2048 ids), or at
// MapEntries. The cut depends on the ids around it, not on positions
// counted from the start of the disk, so a chunk that appears or vanishes
// changes the map blob it is in, not every blob after it, and an
// incremental backup stores the other map blobs again only if they
// changed. Readers do not care where blobs end.
const (
	mapMinEntries = 512
	mapCutBelow   = 65536 / 2048
)

// mapRecordMax is the largest encoded record: a 10-byte uvarint and an id.
const mapRecordMax = binary.MaxVarintLen64 + crypt.IDSize

// encodeMapBlobs calls fn with the plaintext of each map blob of m, in
// order. The plaintext is reused after fn returns.
func encodeMapBlobs(m *ChunkMap, fn func(plain []byte) error) error {
	buf := make([]byte, 0, min(len(m.pos), MapEntries)*mapRecordMax)
	next, records := int64(0), 0
	for i, p := range m.pos {
		id := m.ids[i]
		buf = binary.AppendUvarint(buf, uint64(p-next))
		buf = append(buf, id[:]...)
		next, records = p+1, records+1
		if records == MapEntries || (records >= mapMinEntries && binary.LittleEndian.Uint16(id[:2]) < mapCutBelow) {
			if err := fn(buf); err != nil {
				return err
			}
			buf, records, next = buf[:0], 0, 0 // the next blob's first position is absolute
		}
	}
	if records > 0 {
		return fn(buf)
	}
	return nil
}

// decodeMapBlob appends the records of one map blob to m. next is the
// position after the previous record of the disk (0 before the first):
// the blob's positions must come after it. It is advanced. A blob that is
// empty, holds more than MapEntries records, ends inside a record, names
// the zero id, a position past the disk or one at or before the previous
// record's fails with an error wrapping ErrDamaged, and appends nothing.
func decodeMapBlob(plain []byte, next *int64, m *ChunkMap) error {
	if len(plain) == 0 {
		return fmt.Errorf("empty map blob: %w", ErrDamaged)
	}
	records := 0
	keep := len(m.pos)
	fail := func(err error) error {
		m.pos, m.ids = m.pos[:keep], m.ids[:keep]
		return err
	}
	prev := int64(0) // the first record's skip is its position
	for off := 0; off < len(plain); {
		skip, n := binary.Uvarint(plain[off:])
		if n <= 0 {
			return fail(fmt.Errorf("map record %d: bad position at byte %d: %w", records, off, ErrDamaged))
		}
		off += n
		if prev >= m.n || skip >= uint64(m.n-prev) {
			return fail(fmt.Errorf("map record %d: position beyond the disk's %d chunks: %w", records, m.n, ErrDamaged))
		}
		pos := prev + int64(skip)
		if pos < *next {
			return fail(fmt.Errorf("map record %d: position %d comes before the previous map blob's end %d: %w", records, pos, *next, ErrDamaged))
		}
		if len(plain)-off < crypt.IDSize {
			return fail(fmt.Errorf("map record %d: truncated id: %w", records, ErrDamaged))
		}
		var id crypt.ID
		copy(id[:], plain[off:])
		off += crypt.IDSize
		if id.IsZero() {
			return fail(fmt.Errorf("map record %d: zero chunk id: %w", records, ErrDamaged))
		}
		if records++; records > MapEntries {
			return fail(fmt.Errorf("map blob holds more than %d records: %w", MapEntries, ErrDamaged))
		}
		m.pos = append(m.pos, pos)
		m.ids = append(m.ids, id)
		prev = pos + 1
	}
	*next = prev
	return nil
}

// decodeDenseMapBlob appends the ids of a format-1 map blob (snapshot
// version 1: every position's id, zero for all-zero chunks) to m; next
// is the position of the blob's first id and is advanced.
func decodeDenseMapBlob(plain []byte, next *int64, m *ChunkMap) error {
	if len(plain)%crypt.IDSize != 0 || len(plain) == 0 || len(plain) > MapEntries*crypt.IDSize {
		return fmt.Errorf("map blob of %d bytes: %w", len(plain), ErrDamaged)
	}
	if int64(len(plain)/crypt.IDSize) > m.n-*next {
		return fmt.Errorf("map blob holds positions beyond the disk's %d chunks: %w", m.n, ErrDamaged)
	}
	for p := 0; p < len(plain); p += crypt.IDSize {
		var id crypt.ID
		copy(id[:], plain[p:])
		if !id.IsZero() {
			m.pos = append(m.pos, *next)
			m.ids = append(m.ids, id)
		}
		*next++
	}
	return nil
}
