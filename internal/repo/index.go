package repo

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/compress"
	"github.com/kura-backup/kura/internal/crypt"
)

// Loc says where a blob is stored.
type Loc struct {
	Pack       crypt.ID
	Type       BlobType
	Compressed bool
	Offset     uint32
	Length     uint32
	RawLength  uint32
}

type loc struct {
	pack       uint32 // index into Index.packs
	offset     uint32
	length     uint32
	rawLength  uint32
	typ        BlobType
	compressed bool
}

// Index maps blob ids to their locations. Safe for concurrent use.
//
// A blob may be stored more than once: a backup that finds a chunk damaged
// or only in packs a prune marked for deletion stores it again, and a
// crashed backup or a repack leaves copies behind. The index keeps every
// copy and answers with the best one: an intact copy in a pack that is not
// marked for deletion, then an intact copy in a marked pack (readers may
// still use it until the sweep has settled it, see gc.go), then a copy
// known to be damaged (so a reader's error says "damaged", not "missing").
type Index struct {
	mu      sync.RWMutex
	packs   []crypt.ID
	packNum map[crypt.ID]uint32
	blobs   map[crypt.ID]loc   // the best copy of each blob
	alt     map[crypt.ID][]loc // the other copies (rare)
	doomed  map[uint32]bool    // packs a prune marked for deletion
	damaged map[copyKey]string // copies known damaged, and why
	listed  map[uint32]bool    // packs with indexed blobs
	badHdr  map[uint32]string  // packs whose header is known damaged, and why
	files   []string           // index files loaded
}

// copyKey names one stored copy of a blob.
type copyKey struct {
	id   crypt.ID
	pack uint32
}

func newIndex() *Index {
	return newIndexSized(0, 0)
}

func newIndexSized(npacks, nblobs int) *Index {
	return &Index{
		packNum: make(map[crypt.ID]uint32, npacks), blobs: make(map[crypt.ID]loc, nblobs),
		alt: map[crypt.ID][]loc{}, doomed: map[uint32]bool{}, damaged: map[copyKey]string{}, listed: map[uint32]bool{}, badHdr: map[uint32]string{},
	}
}

// rank orders the copies of a blob: lower is better.
func (x *Index) rank(id crypt.ID, l loc) int {
	switch {
	case x.damaged[copyKey{id, l.pack}] != "":
		return 2
	case x.doomed[l.pack]:
		return 1
	}
	return 0
}

func (x *Index) packNo(pack crypt.ID) uint32 {
	n, ok := x.packNum[pack]
	if !ok {
		n = uint32(len(x.packs))
		x.packs = append(x.packs, pack)
		x.packNum[pack] = n
	}
	return n
}

func (x *Index) add(pack crypt.ID, entries []packEntry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.packNo(pack)
	x.listed[n] = true
	for _, e := range entries {
		x.addLoc(e.ID, loc{pack: n, offset: e.Offset, length: e.Length, rawLength: e.RawLength, typ: e.Type, compressed: e.Compressed})
	}
}

// addLoc adds one copy; x.mu is held.
func (x *Index) addLoc(id crypt.ID, l loc) {
	cur, dup := x.blobs[id]
	if !dup {
		x.blobs[id] = l
		return
	}
	if cur.pack == l.pack {
		return
	}
	for _, a := range x.alt[id] {
		if a.pack == l.pack {
			return
		}
	}
	if x.rank(id, l) < x.rank(id, cur) {
		x.blobs[id] = l
		l = cur
	}
	x.alt[id] = append(x.alt[id], l)
}

// repick makes the best copy of id its primary one; x.mu is held.
func (x *Index) repick(id crypt.ID) {
	alts := x.alt[id]
	if len(alts) == 0 {
		return
	}
	best := x.blobs[id]
	bi := -1
	for i, a := range alts {
		if x.rank(id, a) < x.rank(id, best) {
			best, bi = a, i
		}
	}
	if bi < 0 {
		return
	}
	alts[bi] = x.blobs[id]
	x.blobs[id] = best
}

// setDoomed marks packs as queued for deletion.
func (x *Index) setDoomed(packs map[crypt.ID]bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for p := range packs {
		x.doomed[x.packNo(p)] = true
	}
	for id := range x.alt {
		x.repick(id)
	}
}

// markDamaged records that the copy of id in pack is damaged; it reports
// whether that was news.
func (x *Index) markDamaged(id, pack crypt.ID, why string) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	k := copyKey{id, x.packNo(pack)}
	if x.damaged[k] != "" {
		return false
	}
	if why == "" {
		why = "damaged"
	}
	x.damaged[k] = why
	x.repick(id)
	return true
}

// markBadHeader records that pack's header is damaged (its blobs may be
// intact, read through the index); it reports whether that was news.
func (x *Index) markBadHeader(pack crypt.ID, why string) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	n := x.packNo(pack)
	if x.badHdr[n] != "" {
		return false
	}
	x.badHdr[n] = why
	return true
}

// BadHeader says why pack's header is known damaged ("" when it is not).
func (x *Index) BadHeader(pack crypt.ID) string {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n, ok := x.packNum[pack]
	if !ok {
		return ""
	}
	return x.badHdr[n]
}

// Has reports whether the blob has an intact copy that no prune has marked
// for deletion: only then may a backup reuse it instead of storing it.
func (x *Index) Has(id crypt.ID) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	l, ok := x.blobs[id]
	return ok && x.rank(id, l) == 0
}

// Lookup returns the best copy of a blob: see Index.
func (x *Index) Lookup(id crypt.ID) (Loc, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	l, ok := x.blobs[id]
	if !ok {
		return Loc{}, false
	}
	return x.export(l), true
}

func (x *Index) export(l loc) Loc {
	return Loc{Pack: x.packs[l.pack], Type: l.typ, Compressed: l.compressed, Offset: l.offset, Length: l.length, RawLength: l.rawLength}
}

// Damage says why the copy of id in pack is known to be damaged ("" when
// it is not).
func (x *Index) Damage(id, pack crypt.ID) string {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n, ok := x.packNum[pack]
	if !ok {
		return ""
	}
	return x.damaged[copyKey{id, n}]
}

// Intact reports whether id has a copy not known to be damaged (in a
// marked pack or not).
func (x *Index) Intact(id crypt.ID) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	l, ok := x.blobs[id]
	return ok && x.rank(id, l) < 2
}

// Len returns the number of indexed blobs.
func (x *Index) Len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.blobs)
}

// Each calls fn for the best copy of every indexed blob.
func (x *Index) Each(fn func(id crypt.ID, l Loc)) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	for id, l := range x.blobs {
		fn(id, x.export(l))
	}
}

// EachCopy calls fn for every stored copy of every blob; best says whether
// it is the copy Lookup returns.
func (x *Index) EachCopy(fn func(id crypt.ID, l Loc, best bool)) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	for id, l := range x.blobs {
		fn(id, x.export(l), true)
	}
	for id, ls := range x.alt {
		for _, l := range ls {
			fn(id, x.export(l), false)
		}
	}
}

// HasPack reports whether any blob of pack p is indexed.
func (x *Index) HasPack(p crypt.ID) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n, ok := x.packNum[p]
	return ok && x.listed[n]
}

// byPack groups every copy by pack, in offset order.
func (x *Index) byPack() map[crypt.ID][]packEntry {
	out := map[crypt.ID][]packEntry{}
	x.EachCopy(func(id crypt.ID, l Loc, _ bool) {
		out[l.Pack] = append(out[l.Pack], packEntry{ID: id, Type: l.Type, Compressed: l.Compressed, Offset: l.Offset, Length: l.Length, RawLength: l.RawLength})
	})
	for _, es := range out {
		sort.Slice(es, func(i, j int) bool { return es[i].Offset < es[j].Offset })
	}
	return out
}

// packEntries returns every indexed copy in the given packs, grouped by
// pack in offset order, leaving out packs a prune marked for deletion.
func (x *Index) packEntries(packs map[crypt.ID]bool) map[crypt.ID][]packEntry {
	x.mu.RLock()
	for p := range packs {
		if n, ok := x.packNum[p]; ok && x.doomed[n] {
			delete(packs, p)
		}
	}
	x.mu.RUnlock()
	out := map[crypt.ID][]packEntry{}
	x.EachCopy(func(id crypt.ID, l Loc, _ bool) {
		if packs[l.Pack] {
			out[l.Pack] = append(out[l.Pack], packEntry{ID: id, Type: l.Type, Compressed: l.Compressed, Offset: l.Offset, Length: l.Length, RawLength: l.RawLength})
		}
	})
	for _, es := range out {
		sort.Slice(es, func(i, j int) bool { return es[i].Offset < es[j].Offset })
	}
	return out
}

const indexMagic = "KIDX\x01"

// encodeIndex encodes packs' entries as an index file body (before
// compression and sealing).
func encodeIndex(packs map[crypt.ID][]packEntry) []byte {
	var buf bytes.Buffer
	buf.WriteString(indexMagic)
	ids := make([]crypt.ID, 0, len(packs))
	for id := range packs {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return bytes.Compare(ids[i][:], ids[j][:]) < 0 })
	var tmp [binary.MaxVarintLen64]byte
	uv := func(v uint64) { buf.Write(tmp[:binary.PutUvarint(tmp[:], v)]) }
	for _, p := range ids {
		buf.Write(p[:])
		uv(uint64(len(packs[p])))
		for _, e := range packs[p] {
			buf.Write(e.ID[:])
			flags := byte(0)
			if e.Compressed {
				flags = flagCompressed
			}
			buf.WriteByte(byte(e.Type))
			buf.WriteByte(flags)
			uv(uint64(e.Offset))
			uv(uint64(e.Length))
			uv(uint64(e.RawLength))
		}
	}
	return buf.Bytes()
}

// decodeIndex parses an index file body.
func decodeIndex(data []byte) (map[crypt.ID][]packEntry, error) {
	if !bytes.HasPrefix(data, []byte(indexMagic)) {
		return nil, errors.New("not an index (bad magic)")
	}
	r := bytes.NewReader(data[len(indexMagic):])
	out := map[crypt.ID][]packEntry{}
	readID := func(id *crypt.ID) error {
		if _, err := io.ReadFull(r, id[:]); err != nil {
			return errors.New("truncated id")
		}
		return nil
	}
	uv := func(max uint64) (uint64, error) {
		v, err := binary.ReadUvarint(r)
		if err != nil {
			return 0, errors.New("truncated number")
		}
		if v > max {
			return 0, fmt.Errorf("value %d out of range", v)
		}
		return v, nil
	}
	for r.Len() > 0 {
		var p crypt.ID
		if err := readID(&p); err != nil {
			return nil, err
		}
		n, err := uv(1 << 24)
		if err != nil {
			return nil, err
		}
		if n > uint64(r.Len())/(crypt.IDSize+5) {
			return nil, fmt.Errorf("entry count %d exceeds the data", n)
		}
		es := make([]packEntry, 0, n)
		for i := uint64(0); i < n; i++ {
			var e packEntry
			if err := readID(&e.ID); err != nil {
				return nil, err
			}
			t, err1 := r.ReadByte()
			f, err2 := r.ReadByte()
			if err1 != nil || err2 != nil {
				return nil, errors.New("truncated entry")
			}
			if BlobType(t) > MapBlob {
				return nil, fmt.Errorf("unknown blob type %d", t)
			}
			e.Type, e.Compressed = BlobType(t), f&flagCompressed != 0
			off, err := uv(1<<32 - 1)
			if err != nil {
				return nil, err
			}
			l, err := uv(1<<32 - 1)
			if err != nil {
				return nil, err
			}
			raw, err := uv(MaxChunkSize)
			if err != nil {
				return nil, err
			}
			e.Offset, e.Length, e.RawLength = uint32(off), uint32(l), uint32(raw)
			es = append(es, e)
		}
		out[p] = append(out[p], es...)
	}
	return out, nil
}

// sealObject compresses and seals a metadata object.
func (r *Repo) sealObject(plain []byte) ([]byte, error) {
	enc := compress.NewEncoder()
	z, err := enc.Compress(make([]byte, 0, len(plain)/2+64), plain)
	if err != nil {
		return nil, err
	}
	hdr := binary.LittleEndian.AppendUint32(nil, uint32(len(plain)))
	return r.key.Seal(nil, append(hdr, z...)), nil
}

// openObject reverses sealObject.
func (r *Repo) openObject(sealed []byte) ([]byte, error) {
	p, err := r.key.Open(nil, sealed)
	if err != nil {
		return nil, err
	}
	if len(p) < 4 {
		return nil, errors.New("object too short")
	}
	n := binary.LittleEndian.Uint32(p)
	if n > 1<<30 {
		return nil, fmt.Errorf("object claims %d bytes", n)
	}
	return compress.Decompress(nil, p[4:], int(n))
}

// loadObject loads, opens and decompresses a metadata object.
func (r *Repo) loadObject(ctx context.Context, name string) ([]byte, error) {
	data, err := r.be.Load(ctx, name, 0, 0)
	if err != nil {
		return nil, err
	}
	plain, err := r.openObject(data)
	if err != nil {
		return nil, fmt.Errorf("%s is damaged (%v): %w", name, err, ErrDamaged)
	}
	return plain, nil
}

// saveIndex writes an index file for packs.
func (r *Repo) saveIndex(ctx context.Context, packs map[crypt.ID][]packEntry) (string, error) {
	sealed, err := r.sealObject(encodeIndex(packs))
	if err != nil {
		return "", err
	}
	name := "index/" + crypt.RandomID().String()
	if err := r.be.Save(ctx, name, sealed); err != nil {
		return "", fmt.Errorf("writing index: %w", err)
	}
	return name, nil
}

// LoadIndex reads every index file (once), the pending deletions and the
// damage records.
//
// Packs a prune marked for deletion stay readable (a restore point a
// backup wrote while the prune ran may need them until the sweep has
// settled them), but Has leaves them out, so a backup never deduplicates
// against them. Copies recorded as damaged are never reused either.
//
// A damaged index file does not stop reading: it is named in a warning,
// and the packs no readable index file lists are indexed from their own
// headers instead (`kura repair index` makes that permanent).
func (r *Repo) LoadIndex(ctx context.Context) error {
	r.idxMu.Lock()
	defer r.idxMu.Unlock()
	if r.loaded {
		return nil
	}
	idx, bad, err := r.buildIndex(ctx)
	if err != nil {
		return err
	}
	r.idx, r.badIndex, r.loaded, r.scanned = idx, bad, true, false
	if len(bad) > 0 {
		for _, name := range sortedKeys(bad) {
			r.log.Warn("index file is damaged; reading the packs it listed from their own headers; run `kura repair index`", "file", name, "err", bad[name])
		}
		if _, err := r.scanLocked(ctx); err != nil {
			return err
		}
	}
	return nil
}

// buildIndex reads the index files, pending deletions and damage records
// into a fresh Index. Index files that are damaged (not ones that vanished
// under a concurrent prune) are returned with their errors.
func (r *Repo) buildIndex(ctx context.Context) (*Index, map[string]error, error) {
	doomed, err := r.doomedPacks(ctx)
	if err != nil {
		return nil, nil, err
	}
	damage, err := r.loadDamage(ctx)
	if err != nil {
		return nil, nil, err
	}
	var names []string
	if err := r.be.List(ctx, "index/", func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	}); err != nil {
		return nil, nil, err
	}
	// Every backup adds an index file: read and decode them in parallel
	// (76 files took 95 ms one after the other), merge them in order.
	decoded := make([]map[crypt.ID][]packEntry, len(names))
	errs := make([]error, len(names))
	next := atomic.Int64{}
	var wg sync.WaitGroup
	// On object storage the reads are bound by round trips, not CPU: at
	// least 16 at once.
	for range min(len(names), max(2*runtime.GOMAXPROCS(0), 16)) {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < len(names) && ctx.Err() == nil; i = int(next.Add(1) - 1) {
				plain, err := r.loadObject(ctx, names[i])
				if err != nil {
					errs[i] = err
					continue
				}
				if decoded[i], err = decodeIndex(plain); err != nil {
					errs[i] = fmt.Errorf("%s is damaged (%v): %w", names[i], err, ErrDamaged)
				}
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	// Sized up front: growing the map entry by entry took half the time.
	var npacks, nblobs int
	for _, d := range decoded {
		npacks += len(d)
		for _, es := range d {
			nblobs += len(es)
		}
	}
	idx := newIndexSized(npacks, nblobs)
	idx.setDoomed(doomed)
	for _, d := range damage {
		if d.id.IsZero() {
			idx.markBadHeader(d.pack, d.why)
		} else {
			idx.markDamaged(d.id, d.pack, d.why)
		}
	}
	bad := map[string]error{}
	for i, name := range names {
		switch {
		case errors.Is(errs[i], backend.ErrNotFound):
			continue // removed by a concurrent prune, which indexed its packs anew first
		case errors.Is(errs[i], ErrDamaged), errors.Is(errs[i], backend.ErrTruncated):
			bad[name] = errs[i]
			idx.files = append(idx.files, name)
			continue
		case errs[i] != nil:
			return nil, nil, errs[i]
		}
		for p, es := range decoded[i] {
			idx.add(p, es)
		}
		idx.files = append(idx.files, name)
	}
	return idx, bad, nil
}

// ScanResult says what indexing packs from their headers found.
type ScanResult struct {
	PackIDs    []crypt.ID          // packs no index file lists, read from their headers
	Packs      int                 // how many
	Blobs      int                 // blobs those headers list
	Unreadable map[crypt.ID]string // packs whose header could not be read, and why
}

// ScanUnindexedPacks reads the header of every pack that no index file
// lists and adds its blobs to the loaded index (once per loaded index): a
// restore point whose index entries were lost stays readable. It is what
// LoadIndex does by itself when an index file is damaged, and what a
// reader does when a chunk is not found.
func (r *Repo) ScanUnindexedPacks(ctx context.Context) (ScanResult, error) {
	if err := r.LoadIndex(ctx); err != nil {
		return ScanResult{}, err
	}
	r.idxMu.Lock()
	defer r.idxMu.Unlock()
	if r.scanned {
		return r.scanRes, nil
	}
	return r.scanLocked(ctx)
}

// scanLocked is ScanUnindexedPacks with r.idxMu held.
func (r *Repo) scanLocked(ctx context.Context) (ScanResult, error) {
	res := ScanResult{Unreadable: map[crypt.ID]string{}}
	var todo []backend.ObjectInfo
	if err := r.be.List(ctx, "data/", func(oi backend.ObjectInfo) error {
		id, err := crypt.ParseID(oi.Name[strings.LastIndex(oi.Name, "/")+1:])
		if err == nil && !r.idx.HasPack(id) {
			todo = append(todo, oi)
		}
		return nil
	}); err != nil {
		return res, err
	}
	for _, oi := range todo {
		id, _ := crypt.ParseID(oi.Name[strings.LastIndex(oi.Name, "/")+1:])
		es, err := r.readPackHeader(ctx, id, oi.Size)
		switch {
		case errors.Is(err, backend.ErrNotFound):
			continue // deleted by a prune meanwhile
		case errors.Is(err, ErrDamaged):
			res.Unreadable[id] = err.Error()
			continue
		case err != nil:
			return res, err
		}
		r.idx.add(id, es)
		res.PackIDs = append(res.PackIDs, id)
		res.Packs++
		res.Blobs += len(es)
	}
	if res.Packs > 0 {
		r.log.Info("indexed packs from their headers", "packs", res.Packs, "blobs", res.Blobs)
	}
	r.scanned, r.scanRes = true, res
	return res, nil
}

// headerTail is how much of a pack's end is read to find its header in one
// request: the header of a 16 MiB pack of 64 KiB chunks is about 11 KiB.
const headerTail = 64 << 10

// readPackHeader reads and opens the header of pack id (size bytes long).
// A header that cannot be read or authenticated is ErrDamaged.
func (r *Repo) readPackHeader(ctx context.Context, id crypt.ID, size int64) ([]packEntry, error) {
	if size < 4+crypt.Overhead {
		return nil, fmt.Errorf("pack %s of %d bytes is truncated: %w", id.Short(), size, ErrDamaged)
	}
	off := max(0, size-headerTail)
	tail, err := r.be.Load(ctx, packName(id), off, size-off)
	if err != nil {
		return nil, packError(id, err)
	}
	hlen := int64(binary.LittleEndian.Uint32(tail[len(tail)-4:]))
	if hlen < crypt.Overhead || hlen > size-4 {
		return nil, fmt.Errorf("pack %s: header length %d does not fit a pack of %d bytes: %w", id.Short(), hlen, size, ErrDamaged)
	}
	if hlen+4 > int64(len(tail)) {
		if tail, err = r.be.Load(ctx, packName(id), size-4-hlen, hlen+4); err != nil {
			return nil, packError(id, err)
		}
	}
	hdr, err := r.key.Open(nil, tail[int64(len(tail))-4-hlen:len(tail)-4])
	if err != nil {
		return nil, fmt.Errorf("pack %s header: %w: %w", id.Short(), err, ErrDamaged)
	}
	es, err := decodeHeader(hdr, size-4-hlen)
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w: %w", id.Short(), err, ErrDamaged)
	}
	return es, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Index returns the loaded index.
func (r *Repo) Index() *Index { return r.idx }

func indexFileID(name string) string { return strings.TrimPrefix(name, "index/") }
