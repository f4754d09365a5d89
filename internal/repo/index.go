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

// Index maps blob ids to their location. Safe for concurrent use.
type Index struct {
	mu      sync.RWMutex
	packs   []crypt.ID
	packNum map[crypt.ID]uint32
	blobs   map[crypt.ID]loc
	files   []string // index files loaded
}

func newIndex() *Index {
	return &Index{packNum: map[crypt.ID]uint32{}, blobs: map[crypt.ID]loc{}}
}

func (x *Index) add(pack crypt.ID, entries []packEntry) {
	x.mu.Lock()
	defer x.mu.Unlock()
	n, ok := x.packNum[pack]
	if !ok {
		n = uint32(len(x.packs))
		x.packs = append(x.packs, pack)
		x.packNum[pack] = n
	}
	for _, e := range entries {
		if _, dup := x.blobs[e.ID]; dup {
			continue
		}
		x.blobs[e.ID] = loc{pack: n, offset: e.Offset, length: e.Length, rawLength: e.RawLength, typ: e.Type, compressed: e.Compressed}
	}
}

// Has reports whether the blob is indexed.
func (x *Index) Has(id crypt.ID) bool {
	x.mu.RLock()
	_, ok := x.blobs[id]
	x.mu.RUnlock()
	return ok
}

// Lookup returns a blob's location.
func (x *Index) Lookup(id crypt.ID) (Loc, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	l, ok := x.blobs[id]
	if !ok {
		return Loc{}, false
	}
	return Loc{Pack: x.packs[l.pack], Type: l.typ, Compressed: l.compressed, Offset: l.offset, Length: l.length, RawLength: l.rawLength}, true
}

// Len returns the number of indexed blobs.
func (x *Index) Len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.blobs)
}

// Each calls fn for every indexed blob.
func (x *Index) Each(fn func(id crypt.ID, l Loc)) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	for id, l := range x.blobs {
		fn(id, Loc{Pack: x.packs[l.pack], Type: l.typ, Compressed: l.compressed, Offset: l.offset, Length: l.length, RawLength: l.rawLength})
	}
}

// byPack groups entries by pack, in offset order.
func (x *Index) byPack() map[crypt.ID][]packEntry {
	out := map[crypt.ID][]packEntry{}
	x.Each(func(id crypt.ID, l Loc) {
		out[l.Pack] = append(out[l.Pack], packEntry{ID: id, Type: l.Type, Compressed: l.Compressed, Offset: l.Offset, Length: l.Length, RawLength: l.RawLength})
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
		return nil, fmt.Errorf("%s is damaged (%v): %w; run `kura verify`", name, err, ErrDamaged)
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

// LoadIndex reads every index file (once). Packs queued for deletion by a
// prune are left out, so a backup never deduplicates against them.
func (r *Repo) LoadIndex(ctx context.Context) error {
	r.idxMu.Lock()
	defer r.idxMu.Unlock()
	if r.loaded {
		return nil
	}
	doomed, err := r.doomedPacks(ctx)
	if err != nil {
		return err
	}
	var names []string
	if err := r.be.List(ctx, "index/", func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	}); err != nil {
		return err
	}
	// Every backup adds an index file: read and decode them in parallel
	// (76 files took 95 ms one after the other), merge them in order.
	decoded := make([]map[crypt.ID][]packEntry, len(names))
	errs := make([]error, len(names))
	next := atomic.Int64{}
	var wg sync.WaitGroup
	for range min(len(names), 2*runtime.GOMAXPROCS(0)) {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < len(names) && ctx.Err() == nil; i = int(next.Add(1) - 1) {
				plain, err := r.loadObject(ctx, names[i])
				if err != nil {
					errs[i] = err
					continue
				}
				if decoded[i], err = decodeIndex(plain); err != nil {
					errs[i] = fmt.Errorf("%s is damaged (%v): %w; run `kura verify`", names[i], err, ErrDamaged)
				}
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	// Sized up front: growing the map entry by entry took half the time.
	var npacks, nblobs int
	for _, d := range decoded {
		npacks += len(d)
		for _, es := range d {
			nblobs += len(es)
		}
	}
	idx := &Index{packNum: make(map[crypt.ID]uint32, npacks), blobs: make(map[crypt.ID]loc, nblobs)}
	for i, name := range names {
		if errors.Is(errs[i], backend.ErrNotFound) {
			continue // removed by a concurrent prune: at worst some chunks are stored again
		}
		if errs[i] != nil {
			return errs[i]
		}
		for p, es := range decoded[i] {
			if doomed[p] {
				continue
			}
			idx.add(p, es)
		}
		idx.files = append(idx.files, name)
	}
	r.idx = idx
	r.loaded = true
	return nil
}

// Index returns the loaded index.
func (r *Repo) Index() *Index { return r.idx }

func indexFileID(name string) string { return strings.TrimPrefix(name, "index/") }
