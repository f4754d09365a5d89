package repo

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/compress"
	"github.com/kura-backup/kura/internal/crypt"
)

// packWriter accumulates sealed blobs until the pack is full.
type packWriter struct {
	buf      []byte
	entries  []packEntry
	inflight map[crypt.ID]struct{} // claimed by a caller, not yet indexed
	unsaved  map[crypt.ID][]packEntry
	uploads  sync.WaitGroup
	errMu    sync.Mutex
	err      error
	stored   Counters
}

// Counters total what a writer stored.
type Counters struct {
	Blobs       int64 // blobs written
	RawBytes    int64 // their plaintext size
	StoredBytes int64 // their sealed size in packs
	Packs       int64
}

func (r *Repo) pw() *packWriter {
	if r.writer == nil {
		r.writer = &packWriter{inflight: map[crypt.ID]struct{}{}, unsaved: map[crypt.ID][]packEntry{}}
	}
	return r.writer
}

// Claim reports whether the caller should store the blob id: false when it
// is already in the index or another caller is storing it. A caller that
// claims must call SaveBlob (or the backup fails).
func (r *Repo) Claim(id crypt.ID) bool {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.idx.Has(id) {
		return false
	}
	w := r.pw()
	if _, ok := w.inflight[id]; ok {
		return false
	}
	w.inflight[id] = struct{}{}
	return true
}

// Sealer compresses and seals blobs; each goroutine uses its own.
type Sealer struct {
	key *crypt.Key
	enc *compress.Encoder
	buf []byte
}

// NewSealer returns a Sealer for this repository.
func (r *Repo) NewSealer() *Sealer {
	return &Sealer{key: r.key, enc: compress.NewEncoder()}
}

// payload compresses plain if worthwhile; the result is valid until the
// next call.
func (s *Sealer) payload(plain []byte) ([]byte, bool, error) {
	if cap(s.buf) < len(plain)+len(plain)/8+1024 {
		s.buf = make([]byte, 0, len(plain)+len(plain)/8+1024)
	}
	z, err := s.enc.Compress(s.buf[:0], plain)
	if err != nil {
		return nil, false, err
	}
	if compress.Worthwhile(len(z), len(plain)) {
		return z, true, nil
	}
	return plain, false, nil
}

// SaveBlob appends an already sealed blob to the current pack (used to
// copy blobs between packs).
func (r *Repo) SaveBlob(ctx context.Context, t BlobType, id crypt.ID, sealed []byte, compressed bool, rawLen int) error {
	return r.appendBlob(ctx, t, id, compressed, rawLen, len(sealed), func(buf []byte) []byte { return append(buf, sealed...) })
}

// StoreBlob compresses (in the caller's goroutine) and seals plain
// straight into the current pack. The caller must have claimed id.
func (r *Repo) StoreBlob(ctx context.Context, s *Sealer, t BlobType, id crypt.ID, plain []byte) error {
	payload, comp, err := s.payload(plain)
	if err != nil {
		return err
	}
	return r.appendBlob(ctx, t, id, comp, len(plain), len(payload)+crypt.Overhead, func(buf []byte) []byte { return r.key.Seal(buf, payload) })
}

// appendBlob appends one blob (written by put, n bytes) to the current
// pack; a full pack is uploaded by the calling goroutine while others keep
// appending to a fresh one.
func (r *Repo) appendBlob(ctx context.Context, t BlobType, id crypt.ID, compressed bool, rawLen, n int, put func([]byte) []byte) error {
	r.wmu.Lock()
	w := r.pw()
	if w.buf == nil {
		w.buf = r.packBuffer()
	}
	off := len(w.buf)
	w.buf = put(w.buf)
	if len(w.buf)-off != n {
		r.wmu.Unlock()
		return fmt.Errorf("internal error: blob of %d bytes, expected %d", len(w.buf)-off, n)
	}
	w.entries = append(w.entries, packEntry{ID: id, Type: t, Compressed: compressed, Offset: uint32(off), Length: uint32(n), RawLength: uint32(rawLen)})
	w.stored.Blobs++
	w.stored.RawBytes += int64(rawLen)
	w.stored.StoredBytes += int64(n)
	if len(w.buf) < r.cfg.PackSize {
		r.wmu.Unlock()
		return nil
	}
	buf, entries := w.buf, w.entries
	w.buf, w.entries = nil, nil
	w.uploads.Add(1)
	r.wmu.Unlock()
	defer w.uploads.Done()
	return r.uploadPack(ctx, buf, entries)
}

// packBuffer returns an empty, page-aligned pack buffer with room for a
// full pack, one more blob and the header.
func (r *Repo) packBuffer() []byte {
	if b, ok := r.packs.Get().(*[]byte); ok {
		return (*b)[:0]
	}
	return backend.AlignedBuffer(r.cfg.PackSize + r.cfg.ChunkSize + 256<<10)
}

func (r *Repo) uploadPack(ctx context.Context, buf []byte, entries []packEntry) error {
	w := r.writer
	hdr := r.key.Seal(nil, encodeHeader(entries))
	buf = append(buf, hdr...)
	buf = binary.LittleEndian.AppendUint32(buf, uint32(len(hdr)))
	id := crypt.RandomID()
	err := r.be.Save(ctx, packName(id), buf)
	if cap(buf) >= r.cfg.PackSize+r.cfg.ChunkSize && backend.IsAligned(buf) {
		r.packs.Put(&buf)
	}
	r.wmu.Lock()
	if err != nil {
		w.errMu.Lock()
		if w.err == nil {
			w.err = err
		}
		w.errMu.Unlock()
		for _, e := range entries {
			delete(w.inflight, e.ID)
		}
		r.wmu.Unlock()
		return fmt.Errorf("writing pack: %w", err)
	}
	r.idx.add(id, entries)
	for _, e := range entries {
		delete(w.inflight, e.ID)
	}
	w.unsaved[id] = entries
	w.stored.Packs++
	var batch map[crypt.ID][]packEntry
	if len(w.unsaved) >= indexEvery {
		batch, w.unsaved = w.unsaved, map[crypt.ID][]packEntry{}
	}
	r.wmu.Unlock()
	if batch != nil {
		r.saveIndexBatch(ctx, batch)
	}
	return nil
}

// indexEvery is how many packs a writer uploads before it writes an index
// file for them, without waiting for Flush: a backup killed (or cut off
// from its storage) half-way leaves at most that many packs no index
// lists, and the next backup finds the rest in the index and does not
// send them again (on object storage, the difference between resuming and
// starting over). 32 packs of 16 MiB: an index file of about 100 KiB per
// 512 MiB stored.
const indexEvery = 32

// saveIndexBatch writes an index file for batch; if it fails, the packs
// go back to the writer's unsaved ones, for Flush to index (and fail
// on, if the storage still refuses).
func (r *Repo) saveIndexBatch(ctx context.Context, batch map[crypt.ID][]packEntry) {
	name, err := r.saveIndex(ctx, batch)
	if err != nil {
		r.log.Debug("an intermediate index file was not written; the final one will list its packs", "err", err)
		r.wmu.Lock()
		for id, es := range batch {
			r.writer.unsaved[id] = es
		}
		r.wmu.Unlock()
		return
	}
	r.idx.mu.Lock()
	r.idx.files = append(r.idx.files, name)
	r.idx.mu.Unlock()
}

// Flush uploads the partial pack, waits for every upload and writes an
// index file for all packs written since the last Flush. After Flush
// returns nil, every blob saved so far is durable and indexed.
func (r *Repo) Flush(ctx context.Context) error {
	r.wmu.Lock()
	w := r.pw()
	buf, entries := w.buf, w.entries
	w.buf, w.entries = nil, nil
	if len(entries) > 0 {
		w.uploads.Add(1)
	}
	r.wmu.Unlock()
	var err error
	if len(entries) > 0 {
		err = r.uploadPack(ctx, buf, entries)
		w.uploads.Done()
	}
	w.uploads.Wait()
	w.errMu.Lock()
	if err == nil && w.err != nil {
		err = fmt.Errorf("writing pack: %w", w.err)
	}
	w.errMu.Unlock()
	if err != nil {
		return err
	}
	r.wmu.Lock()
	unsaved := w.unsaved
	w.unsaved = map[crypt.ID][]packEntry{}
	r.wmu.Unlock()
	if len(unsaved) == 0 {
		return nil
	}
	name, err := r.saveIndex(ctx, unsaved)
	if err != nil {
		return err
	}
	r.idx.mu.Lock()
	r.idx.files = append(r.idx.files, name)
	r.idx.mu.Unlock()
	return nil
}

// IndexPacks queues packs for the index file the next Flush writes and
// returns how many it queued. It is for packs no index file lists that the
// loaded index holds because ScanUnindexedPacks read them from their
// headers: a writer resuming a run that was interrupted after its packs
// landed but before its index file did makes them part of the index, so
// that it and every later run finds their blobs without a scan and `kura
// verify` sees them indexed. A pack listed by two index files (a backup
// still running indexes its own) is allowed: see docs/FORMAT.md. Packs a
// prune marked for deletion are left out: its sweep, which no lock of
// this process holds back when the mark came first, may be deleting them.
func (r *Repo) IndexPacks(packs []crypt.ID) int {
	want := make(map[crypt.ID]bool, len(packs))
	for _, p := range packs {
		want[p] = true
	}
	found := r.idx.packEntries(want)
	r.wmu.Lock()
	defer r.wmu.Unlock()
	w := r.pw()
	for p, es := range found {
		w.unsaved[p] = es
	}
	return len(found)
}

// Stored returns what this Repo has written so far.
func (r *Repo) Stored() Counters {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	return r.pw().stored
}

// ErrBlobMissing is returned when a blob is not in the index.
var ErrBlobMissing = errors.New("chunk is missing from the repository")

// LoadBlob reads, authenticates and decompresses blob id into dst's
// storage, and checks that its content hashes to id.
//
// A copy that fails is recorded as damaged (ReportDamage) and the next
// intact copy, if any, is read instead. A blob no index lists is looked
// for in the headers of unindexed packs once (an index file may have been
// lost) before it is reported missing.
func (r *Repo) LoadBlob(ctx context.Context, id crypt.ID, dst []byte) ([]byte, error) {
	for tries := 0; ; tries++ {
		l, ok := r.idx.Lookup(id)
		if !ok {
			if tries == 0 {
				if res, err := r.ScanUnindexedPacks(ctx); err == nil && res.Blobs > 0 {
					continue
				}
			}
			return nil, fmt.Errorf("chunk %s: %w", id.Short(), ErrBlobMissing)
		}
		sealed, err := r.LoadPackRange(ctx, l.Pack, int64(l.Offset), int64(l.Length))
		if err == nil {
			// sealed is this call's own: decrypt it in place rather than allocate.
			var plain []byte
			if plain, err = r.openBlob(id, l, sealed, dst, true); err == nil {
				return plain, nil
			}
		} else {
			err = fmt.Errorf("chunk %s: %w", id.Short(), err)
		}
		if !r.healable(ctx, id, l, err) || tries > 8 {
			return nil, err
		}
	}
}

// healable records a failed read of the copy of id at l as damage when it
// is, and reports whether another intact copy is there to try.
func (r *Repo) healable(ctx context.Context, id crypt.ID, l Loc, err error) bool {
	if !errors.Is(err, ErrDamaged) {
		return false
	}
	_ = r.ReportDamage(ctx, id, l.Pack, err) // logged by ReportDamage
	nl, ok := r.idx.Lookup(id)
	return ok && nl.Pack != l.Pack && r.idx.Intact(id)
}

// LoadBlobInto is LoadBlob for a reader that recycles its memory: the
// sealed blob is read into sealedBuf when the backend can read into a
// buffer (backend.LoaderInto) and sealedBuf is large enough (page-aligned
// with backend.DirectRoom to spare for direct I/O), and a
// compressed blob is decompressed into dst. The plaintext returned lives
// in sealedBuf or dst (or in new memory when neither fits).
func (r *Repo) LoadBlobInto(ctx context.Context, id crypt.ID, sealedBuf, dst []byte) ([]byte, error) {
	li, ok := r.be.(backend.LoaderInto)
	l, found := r.idx.Lookup(id)
	if !ok || !found || cap(sealedBuf) < int(l.Length) {
		return r.LoadBlob(ctx, id, dst)
	}
	sealed, err := li.LoadInto(ctx, packName(l.Pack), int64(l.Offset), int64(l.Length), sealedBuf)
	if err != nil {
		err = fmt.Errorf("chunk %s: %w", id.Short(), packError(l.Pack, err))
	} else {
		var plain []byte
		if plain, err = r.openBlob(id, l, sealed, dst, true); err == nil {
			return plain, nil
		}
	}
	if r.healable(ctx, id, l, err) {
		return r.LoadBlob(ctx, id, dst)
	}
	return nil, err
}

// Locate says where blob id is stored (after LoadIndex).
func (r *Repo) Locate(id crypt.ID) (Loc, bool) { return r.idx.Lookup(id) }

// LoadPackRange reads length bytes at off of pack p in one request: a
// restore reads each pack's needed span once instead of blob by blob.
func (r *Repo) LoadPackRange(ctx context.Context, p crypt.ID, off, length int64) ([]byte, error) {
	b, err := r.be.Load(ctx, packName(p), off, length)
	if err != nil {
		return nil, packError(p, err)
	}
	return b, nil
}

// packError says what a failed read of pack p means: a missing or
// truncated pack is damage to the repository.
func packError(p crypt.ID, err error) error {
	switch {
	case errors.Is(err, backend.ErrNotFound):
		return fmt.Errorf("pack %s is missing: %w", p.Short(), ErrDamaged)
	case errors.Is(err, backend.ErrTruncated):
		return fmt.Errorf("pack %s is truncated: %w", p.Short(), ErrDamaged)
	}
	return fmt.Errorf("pack %s: %w", p.Short(), err)
}

// LoadPackRangeInto is LoadPackRange into buf's storage when the backend
// can read into a buffer (backend.LoaderInto) and buf is large enough
// (page-aligned with backend.DirectRoom to spare for direct I/O), so that
// a restore worker reuses one buffer for all its reads.
func (r *Repo) LoadPackRangeInto(ctx context.Context, p crypt.ID, off, length int64, buf []byte) ([]byte, error) {
	li, ok := r.be.(backend.LoaderInto)
	if !ok || int64(cap(buf)) < length {
		return r.LoadPackRange(ctx, p, off, length)
	}
	b, err := li.LoadInto(ctx, packName(p), off, length, buf)
	if err != nil {
		return nil, packError(p, err)
	}
	return b, nil
}

// OpenBlob authenticates, decrypts and decompresses blob id, stored at l,
// from sealed (its bytes as LoadPackRange read them) into dst, and checks
// it against id. sealed is decrypted in place: the caller must not use it
// afterwards.
func (r *Repo) OpenBlob(id crypt.ID, l Loc, sealed, dst []byte) ([]byte, error) {
	return r.openBlob(id, l, sealed, dst, true)
}

// AuthenticateBlob checks that sealed, blob id as stored at l, is intact:
// that it opens under the repository's key (AES-GCM authenticates every
// byte). It decrypts into scratch (grown as needed and returned), leaving
// sealed as it is, and neither decompresses nor hashes: what kura copy
// does with a blob it sends sealed to a repository sharing the key, where
// the target's `verify --read-data` (or copy --verify) checks ids.
func (r *Repo) AuthenticateBlob(id crypt.ID, l Loc, sealed, scratch []byte) ([]byte, error) {
	if cap(scratch) < len(sealed) {
		scratch = make([]byte, 0, len(sealed))
	}
	if _, err := r.key.Open(scratch[:0], sealed); err != nil {
		return scratch, fmt.Errorf("chunk %s in pack %s: %w: %w", id.Short(), l.Pack.Short(), err, ErrDamaged)
	}
	return scratch, nil
}

// openBlob authenticates, decrypts and decompresses a sealed blob into
// dst (when compressed) and checks it against its id. inPlace decrypts
// over sealed itself, which the caller then must not use.
func (r *Repo) openBlob(id crypt.ID, l Loc, sealed, dst []byte, inPlace bool) ([]byte, error) {
	var into []byte
	if inPlace && len(sealed) >= crypt.NonceSize {
		into = sealed[crypt.NonceSize:crypt.NonceSize]
	}
	plain, err := r.key.Open(into, sealed)
	if err != nil {
		return nil, fmt.Errorf("chunk %s in pack %s: %w: %w", id.Short(), l.Pack.Short(), err, ErrDamaged)
	}
	if l.Compressed {
		plain, err = compress.Decompress(dst, plain, int(l.RawLength))
		if err != nil {
			return nil, fmt.Errorf("chunk %s in pack %s: %w: %w", id.Short(), l.Pack.Short(), err, ErrDamaged)
		}
	}
	if len(plain) != int(l.RawLength) || r.key.Hash(plain) != id {
		return nil, fmt.Errorf("chunk %s in pack %s: content does not match its id: %w", id.Short(), l.Pack.Short(), ErrDamaged)
	}
	return plain, nil
}
