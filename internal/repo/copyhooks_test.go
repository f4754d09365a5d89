package repo

import (
	"context"
	"testing"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/crypt"
)

// A repository made with another's master key (kura init --copy-key-from)
// has its own id and password, and the same chunk ids and encryption.
func TestInitWithKey(t *testing.T) {
	ctx := context.Background()
	src, _ := newRepo(t)
	dir := t.TempDir()
	be, _ := local.Open(dir)
	pw := []byte("the copy's own password")
	if _, err := Init(ctx, be, pw, InitOptions{ChunkSize: MinChunkSize, KDF: fastKDF(), Key: src.Key()}); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, be, testPassword); err == nil {
		t.Error("the source's password opens the copy")
	}
	r, err := Open(ctx, be, pw)
	if err != nil {
		t.Fatal(err)
	}
	if r.Config().ID == src.Config().ID || r.Key().Enc != src.Key().Enc || r.Key().Hash([]byte("x")) != src.Key().Hash([]byte("x")) {
		t.Error("the copy does not share the source's key, or shares its id")
	}
}

// IndexPacks writes index entries for packs an interrupted writer left
// (found by ScanUnindexedPacks), except packs a prune marked for deletion.
func TestIndexPacks(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	if err := r.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	s := r.NewSealer()
	for _, c := range randomChunks(3, 40, MinChunkSize) {
		id := r.Key().Hash(c)
		if r.Claim(id) {
			if err := r.StoreBlob(ctx, s, DataBlob, id, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	// No Flush: the full packs landed, no index file did.
	r2 := reopen(t, dir)
	res, err := r2.ScanUnindexedPacks(ctx)
	if err != nil || res.Packs < 2 {
		t.Fatalf("scan: %+v %v", res, err)
	}
	doomed := res.PackIDs[0]
	if err := r2.savePending(ctx, "gc/"+crypt.RandomID().String(), pendingDeletion{Packs: []string{doomed.String()}, Complete: true}); err != nil {
		t.Fatal(err)
	}
	r3 := reopen(t, dir)
	res, err = r3.ScanUnindexedPacks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := r3.IndexPacks(res.PackIDs); n != res.Packs-1 {
		t.Fatalf("IndexPacks queued %d of %d packs, want all but the doomed one", n, res.Packs)
	}
	if err := r3.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	r4 := reopen(t, dir)
	for _, p := range res.PackIDs {
		if got := r4.Index().HasPack(p); got != (p != doomed) {
			t.Errorf("pack %s indexed: %v", p.Short(), got)
		}
	}
}
