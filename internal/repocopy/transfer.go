package repocopy

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"sort"
	"sync"

	"github.com/zeebo/blake3"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
)

// A restore point's blobs go over in spans: the blobs the target lacks are
// grouped by the source pack that holds them, and each pack's needed part
// is read in as few ranged reads as gaps allow (as a restore reads). A
// pool of workers reads spans from the source, authenticates every blob
// in them and appends it to the target's current pack; a full pack is
// uploaded by the worker that filled it while the others go on reading,
// so the source is read and the target written at once. Memory stays
// bounded: each worker holds one span (at most maxSpan bytes) and at most
// one pack being uploaded.
const (
	// maxGap is the largest stretch of a pack not needed that is read
	// through rather than split into two reads.
	maxGap = 1 << 20
	// maxSpan bounds one read.
	maxSpan = 8 << 20
)

// blobUse is one blob of the source the target lacks.
type blobUse struct {
	id    crypt.ID // in the source
	loc   repo.Loc // where the source keeps it
	data  bool     // a chunk (else a map blob)
	order int      // when the restore point's disks first name it
	dst   crypt.ID // its id in the target, once known
	sent  bool     // this copy wrote it to the target
}

// span is one read of a contiguous part of a pack.
type span struct {
	pack       crypt.ID
	start, end int64
	order      int // lowest order of its blobs
	blobs      []*blobUse
}

// plan is what one restore point needs sent.
type plan struct {
	known map[crypt.ID]crypt.ID // source id → target id of blobs the target has
	todo  []*blobUse
	byID  map[crypt.ID]*blobUse
}

// worker holds one worker's buffers.
type worker struct {
	buf     []byte // span reads
	scratch []byte // a sealed blob's copy, opened to authenticate it
	plain   []byte // decompressed blobs
	sealer  *repo.Sealer
	hasher  *blake3.Hasher // the target's id hash
}

// plan lists the blobs of s the target lacks and finds them in the
// source. With a shared key a blob the target's index has (intact, not
// marked for deletion) is not sent; with independent keys a chunk whose
// target id base knows is not read either, when the target has that id.
func (c *copier) plan(ctx context.Context, s *repo.Snapshot, maps []*repo.ChunkMap, base map[crypt.ID]crypt.ID) (*plan, error) {
	p := &plan{known: map[crypt.ID]crypt.ID{}, byID: map[crypt.ID]*blobUse{}}
	x := c.dst.Index()
	var present int64
	add := func(id crypt.ID, data bool) {
		if _, ok := p.known[id]; ok || p.byID[id] != nil {
			return
		}
		if c.shared && x.Has(id) {
			p.known[id] = id
		} else if did, ok := base[id]; ok && x.Has(did) && c.sameLength(id, did) {
			p.known[id] = did
		} else {
			u := &blobUse{id: id, data: data, order: len(p.todo)}
			p.byID[id] = u
			p.todo = append(p.todo, u)
			return
		}
		if data {
			present++
		}
	}
	for i, d := range s.Disks {
		if c.shared && d.MapVersion == repo.SnapshotVersion {
			for _, mid := range d.Maps {
				add(mid, false)
			}
		}
		for _, id := range maps[i].All() {
			add(id, true)
		}
	}
	c.count(0, 0, present, 0)
	var need int64
	for _, u := range p.todo {
		if u.data {
			need++
		}
	}
	c.mu.Lock()
	c.prog.ChunksToCheck = need
	c.mu.Unlock()

	locate := func() (missing []*blobUse) {
		for _, u := range p.todo {
			l, ok := c.src.Locate(u.id)
			if !ok {
				missing = append(missing, u)
			}
			u.loc = l
		}
		return missing
	}
	if len(locate()) > 0 {
		// An index file of the source may be lost: its packs' headers
		// tell where their blobs are.
		if _, err := c.src.ScanUnindexedPacks(ctx); err != nil {
			return nil, fmt.Errorf("reading the source's unindexed packs: %w", err)
		}
		if missing := locate(); len(missing) > 0 {
			return nil, skip(fmt.Errorf("restore point %s (%s): %d chunks are missing from the source (chunk %s first): %w; run `kura verify` on the source",
				short(s.ID), s.Name, len(missing), missing[0].id.Short(), repo.ErrBlobMissing))
		}
	}
	return p, nil
}

// sameLength reports whether source blob id and target blob did have the
// same plaintext length: a cheap check that an id pairing is right.
func (c *copier) sameLength(id, did crypt.ID) bool {
	sl, ok1 := c.src.Locate(id)
	dl, ok2 := c.dst.Locate(did)
	return ok1 && ok2 && sl.RawLength == dl.RawLength
}

// translate returns m with the target's ids (independent keys).
func (p *plan) translate(m *repo.ChunkMap) (*repo.ChunkMap, error) {
	out := repo.NewChunkMap(m.Len(), int(m.DataChunks()))
	for pos, id := range m.All() {
		did, ok := p.known[id]
		if !ok {
			if u := p.byID[id]; u != nil && !u.dst.IsZero() {
				did, ok = u.dst, true
			}
		}
		if !ok {
			return nil, fmt.Errorf("internal error: no target id for chunk %s", id.Short())
		}
		if err := out.Append(pos, did); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// sentIDs returns the target ids of the blobs this copy wrote.
func (p *plan) sentIDs() []crypt.ID {
	var out []crypt.ID
	for _, u := range p.todo {
		if u.sent {
			out = append(out, u.dst)
		}
	}
	return out
}

// makeSpans groups blobs by pack into reads, ordered by when the restore
// point first names them: the target's packs then follow the disks'
// order roughly, which keeps a restore from the target reading forward.
func makeSpans(us []*blobUse) []*span {
	byPack := map[crypt.ID][]*blobUse{}
	for _, u := range us {
		byPack[u.loc.Pack] = append(byPack[u.loc.Pack], u)
	}
	var out []*span
	for p, bs := range byPack {
		sort.Slice(bs, func(a, b int) bool { return bs[a].loc.Offset < bs[b].loc.Offset })
		var sp *span
		for _, u := range bs {
			off, end := int64(u.loc.Offset), int64(u.loc.Offset)+int64(u.loc.Length)
			if sp == nil || off-sp.end > maxGap || end-sp.start > maxSpan {
				sp = &span{pack: p, start: off, end: end, order: u.order}
				out = append(out, sp)
			}
			sp.end = max(sp.end, end)
			sp.order = min(sp.order, u.order)
			sp.blobs = append(sp.blobs, u)
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].order < out[b].order })
	return out
}

// workers returns the copy's workers, made once and reused.
func (c *copier) workers() []*worker {
	if c.ws == nil {
		for range c.opts.Workers {
			c.ws = append(c.ws, &worker{sealer: c.dst.NewSealer(), hasher: c.dst.Key().Hasher()})
		}
	}
	return c.ws
}

// run hands spans to the workers, which call do for each. An error do
// returns wrapped by skip stops handing out spans (the ones being handled
// finish, so that nothing claimed in the target is left unwritten) and is
// returned; any other error cancels the rest and is returned.
func (c *copier) run(ctx context.Context, spans []*span, do func(context.Context, *worker, *span) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex
		fatal    error
		skipped  error
		stopping bool
	)
	failed := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		var se *skipError
		if errors.As(err, &se) {
			if skipped == nil {
				skipped = err
			}
			stopping = true
			return
		}
		if fatal == nil {
			fatal = err
		}
		stopping = true
		cancel()
	}
	stopped := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return stopping
	}
	jobs := make(chan *span)
	var wg sync.WaitGroup
	for _, w := range c.workers() {
		wg.Go(func() {
			for sp := range jobs {
				if stopped() || ctx.Err() != nil {
					continue
				}
				if err := do(ctx, w, sp); err != nil {
					failed(err)
				}
			}
		})
	}
feed:
	for _, sp := range spans {
		if stopped() {
			break
		}
		select {
		case jobs <- sp:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	switch {
	case fatal != nil:
		return fatal
	case skipped != nil:
		return skipped
	}
	return ctx.Err()
}

// readSpan reads sp from r into w's buffer.
func readSpan(ctx context.Context, r *repo.Repo, w *worker, sp *span) ([]byte, error) {
	if n := sp.end - sp.start + backend.DirectRoom; int64(cap(w.buf)) < n {
		w.buf = backend.AlignedBuffer(int(max(n, maxSpan/4)))
	}
	return r.LoadPackRangeInto(ctx, sp.pack, sp.start, sp.end-sp.start, w.buf)
}

// transfer sends the blobs of p to the target.
func (c *copier) transfer(ctx context.Context, label string, p *plan) error {
	err := c.run(ctx, makeSpans(p.todo), func(ctx context.Context, w *worker, sp *span) error {
		data, err := readSpan(ctx, c.src, w, sp)
		if err != nil {
			if !errors.Is(err, repo.ErrDamaged) {
				return fmt.Errorf("reading from the source: %w", err)
			}
			// The pack is missing or cut short: every blob of the span
			// is recorded damaged and read from another copy if any.
			ids := make([]crypt.ID, len(sp.blobs))
			for i, u := range sp.blobs {
				ids[i] = u.id
			}
			_ = c.src.ReportDamages(ctx, ids, sp.pack, err) // logged by the repository
			for _, u := range sp.blobs {
				if err := c.fallback(ctx, w, u); err != nil {
					return err
				}
			}
			c.report()
			return nil
		}
		c.count(int64(len(data)), 0, 0, 0)
		for _, u := range sp.blobs {
			sealed := data[int64(u.loc.Offset)-sp.start : int64(u.loc.Offset)-sp.start+int64(u.loc.Length)]
			if err := c.copyBlob(ctx, w, u, sealed); err != nil {
				return err
			}
		}
		c.report()
		return nil
	})
	var se *skipError
	if errors.As(err, &se) {
		return skip(fmt.Errorf("%s: %w", label, se.err))
	}
	if err != nil {
		return fmt.Errorf("%s: %w", label, err)
	}
	return nil
}

// copyBlob authenticates one blob read from the source and writes it to
// the target: sealed as it is when the keys are shared, else decrypted
// and sealed under the target's key and id.
func (c *copier) copyBlob(ctx context.Context, w *worker, u *blobUse, sealed []byte) error {
	if cap(w.plain) < int(u.loc.RawLength) {
		w.plain = make([]byte, 0, u.loc.RawLength)
	}
	var plain []byte
	var err error
	if c.shared {
		// Authenticated only (AES-GCM, into scratch): the sealed bytes
		// are what is sent, and a damaged byte fails here. Decompressing
		// and hashing every blob to check its id cost most of a copy's
		// CPU; --verify and the target's verify --read-data check ids.
		w.scratch, err = c.src.AuthenticateBlob(u.id, u.loc, sealed, w.scratch)
	} else {
		plain, err = c.src.OpenBlob(u.id, u.loc, sealed, w.plain)
	}
	if err != nil {
		if !errors.Is(err, repo.ErrDamaged) {
			return fmt.Errorf("reading from the source: %w", err)
		}
		_ = c.src.ReportDamage(ctx, u.id, u.loc.Pack, err) // logged by the repository
		return c.fallback(ctx, w, u)
	}
	if c.shared {
		u.dst = u.id
		if !c.dst.Claim(u.id) {
			c.done(u, false)
			return nil
		}
		if err := c.dst.SaveBlob(ctx, u.loc.Type, u.id, sealed, u.loc.Compressed, int(u.loc.RawLength)); err != nil {
			return fmt.Errorf("writing to the target: %w", err)
		}
		c.done(u, true)
		return nil
	}
	return c.store(ctx, w, u, plain)
}

// fallback copies u from another intact copy in the source after the one
// read was found damaged (LoadBlob records damage and tries the other
// copies). With none, the restore point cannot be copied.
func (c *copier) fallback(ctx context.Context, w *worker, u *blobUse) error {
	plain, err := c.src.LoadBlob(ctx, u.id, w.plain)
	if err != nil {
		if unreadable(err) {
			what := "chunk"
			if !u.data {
				what = "map blob"
			}
			return skip(fmt.Errorf("%s %s has no intact copy in the source: %w; run `kura verify --read-data` on the source", what, u.id.Short(), err))
		}
		return fmt.Errorf("reading from the source: %w", err)
	}
	c.count(int64(u.loc.Length), 0, 0, 0)
	return c.store(ctx, w, u, plain)
}

// store seals plain under the target's key and writes it, unless the
// target has it.
func (c *copier) store(ctx context.Context, w *worker, u *blobUse, plain []byte) error {
	did := u.id
	if !c.shared {
		w.hasher.Reset()
		_, _ = w.hasher.Write(plain)
		w.hasher.Sum(did[:0])
	}
	u.dst = did
	if !c.dst.Claim(did) {
		c.done(u, false)
		return nil
	}
	if err := c.dst.StoreBlob(ctx, w.sealer, u.loc.Type, did, plain); err != nil {
		return fmt.Errorf("writing to the target: %w", err)
	}
	c.done(u, true)
	return nil
}

// done counts u as sent, or as found in the target.
func (c *copier) done(u *blobUse, sent bool) {
	u.sent = sent
	if !u.data {
		return
	}
	c.mu.Lock()
	c.prog.ChunksChecked++
	if sent {
		c.prog.ChunksSent++
		c.res.ChunksSent++
		c.res.DataSent += int64(u.loc.RawLength)
	} else {
		c.prog.ChunksPresent++
		c.res.ChunksPresent++
	}
	c.mu.Unlock()
}

// verify reads back the target's blobs ids from storage, authenticates
// them and checks them against their ids. It returns how many it read.
func (c *copier) verify(ctx context.Context, ids []crypt.ID) (int64, error) {
	us := make([]*blobUse, 0, len(ids))
	for i, id := range ids {
		l, ok := c.dst.Locate(id)
		if !ok {
			return 0, skip(fmt.Errorf("chunk %s written to the target is not in its index; run the copy again", id.Short()))
		}
		us = append(us, &blobUse{id: id, loc: l, order: i})
	}
	var mu sync.Mutex
	var n int64
	err := c.run(ctx, makeSpans(us), func(ctx context.Context, w *worker, sp *span) error {
		data, err := readSpan(ctx, c.dst, w, sp)
		if err != nil {
			if errors.Is(err, repo.ErrDamaged) {
				ids := make([]crypt.ID, len(sp.blobs))
				for i, u := range sp.blobs {
					ids[i] = u.id
				}
				_ = c.dst.ReportDamages(ctx, ids, sp.pack, err)
				return skip(fmt.Errorf("what was written to the target does not read back: %w; run the copy again", err))
			}
			return fmt.Errorf("reading back from the target: %w", err)
		}
		for _, u := range sp.blobs {
			if cap(w.plain) < int(u.loc.RawLength) {
				w.plain = make([]byte, 0, u.loc.RawLength)
			}
			sealed := data[int64(u.loc.Offset)-sp.start : int64(u.loc.Offset)-sp.start+int64(u.loc.Length)]
			if _, err := c.dst.OpenBlob(u.id, u.loc, sealed, w.plain); err != nil {
				_ = c.dst.ReportDamage(ctx, u.id, u.loc.Pack, err)
				return skip(fmt.Errorf("what was written to the target does not read back: %w; run the copy again", err))
			}
		}
		mu.Lock()
		n += int64(len(sp.blobs))
		mu.Unlock()
		return nil
	})
	return n, err
}

// iterPull pulls the positions and ids of m one by one.
func iterPull(m *repo.ChunkMap) (func() (int64, crypt.ID, bool), func()) {
	return iter.Pull2(m.All())
}
