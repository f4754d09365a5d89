package repo

import (
	"bytes"
	"context"
	"testing"
)

func TestPruneDeletesOnlyGarbage(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	a := randomChunks(10, 12, MinChunkSize)
	b := randomChunks(11, 12, MinChunkSize)
	sa := storeChunks(t, r, "vm", a)
	sb := storeChunks(t, reopen(t, dir), "vm", b)
	before := len(packFiles(t, dir))

	r2 := reopen(t, dir)
	if err := r2.RemoveSnapshot(ctx, sa.ID); err != nil {
		t.Fatal(err)
	}
	res, err := r2.Prune(ctx, PruneOptions{RepackBelow: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	if res.PacksDeleted == 0 || res.PacksPending != 0 {
		t.Fatalf("prune: %+v", res)
	}
	after := len(packFiles(t, dir))
	if after >= before {
		t.Fatalf("packs %d -> %d", before, after)
	}
	r3 := reopen(t, dir)
	got := readDisk(t, r3, sb.Disks[0])
	for i := range b {
		if !bytes.Equal(got[i], b[i]) {
			t.Fatalf("kept snapshot's chunk %d differs after prune", i)
		}
	}
	if res, err := r3.Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() {
		t.Fatalf("check after prune: %+v %v", res, err)
	}
	// Nothing left to do.
	res, err = r3.Prune(ctx, PruneOptions{RepackBelow: 0.5})
	if err != nil || res.PacksDeleted != 0 {
		t.Fatalf("second prune: %+v %v", res, err)
	}
}

// A backup that started before prune marked its garbage may reuse that
// garbage; prune must not delete it under the backup's feet.
func TestPruneSparesWhatARunningBackupReuses(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	old := randomChunks(20, 8, MinChunkSize)
	sOld := storeChunks(t, r, "vm", old)

	// The backup starts: lock, then index (it now knows old's chunks).
	bk := reopen(t, dir)
	lock, err := bk.Lock(ctx, LockBackup)
	if err != nil {
		t.Fatal(err)
	}

	// Meanwhile old's snapshot is forgotten and pruned.
	pr := reopen(t, dir)
	if err := pr.RemoveSnapshot(ctx, sOld.ID); err != nil {
		t.Fatal(err)
	}
	res, err := pr.Prune(ctx, PruneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.PacksDeleted != 0 || res.PacksPending == 0 || len(res.WaitingFor) != 1 {
		t.Fatalf("prune with a backup running: %+v", res)
	}

	// The backup reuses every old chunk and commits its snapshot.
	sNew := storeChunks(t, bk, "vm", old)
	if n := bk.Stored().Blobs; n != 0 { // same chunks, same map
		t.Fatalf("backup stored %d blobs, want 0", n)
	}
	// A reader that starts now, before any further prune, restores the
	// new snapshot: its chunks are in a pack marked for deletion, which
	// stays readable until the sweep settles it. verify agrees.
	rd := reopen(t, dir)
	got := readDisk(t, rd, sNew.Disks[0])
	for i := range old {
		if !bytes.Equal(got[i], old[i]) {
			t.Fatalf("chunk %d unreadable while its pack is marked", i)
		}
	}
	if res, err := reopen(t, dir).Check(ctx, CheckOptions{}); err != nil || !res.OK() {
		t.Fatalf("check while the pack is marked: %+v %v", res, err)
	}
	lock.Unlock(ctx)

	// The next prune sees the new snapshot and keeps the data.
	res, err = reopen(t, dir).Prune(ctx, PruneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.PacksPending != 0 {
		t.Fatalf("second prune still waiting: %+v", res)
	}
	got = readDisk(t, reopen(t, dir), sNew.Disks[0])
	for i := range old {
		if !bytes.Equal(got[i], old[i]) {
			t.Fatalf("chunk %d lost", i)
		}
	}

	// A backup starting after the mark does not deduplicate against
	// doomed packs: it stores its own copy.
	r4 := reopen(t, dir)
	if err := r4.RemoveSnapshot(ctx, sNew.ID); err != nil {
		t.Fatal(err)
	}
	lock2, _ := reopen(t, dir).Lock(ctx, LockBackup) // someone else running
	if _, err := r4.Prune(ctx, PruneOptions{}); err != nil {
		t.Fatal(err)
	}
	late := reopen(t, dir)
	storeChunks(t, late, "vm", old)
	if n := late.Stored().Blobs; n != int64(len(old))+1 {
		t.Fatalf("late backup stored %d blobs, want %d", n, len(old)+1)
	}
	lock2.Unlock(ctx)
	if _, err := reopen(t, dir).Prune(ctx, PruneOptions{}); err != nil {
		t.Fatal(err)
	}
	if res, err := reopen(t, dir).Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() {
		t.Fatalf("check: %+v %v", res, err)
	}
}

func TestPruneRepacksMostlyDeadPacks(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	chunks := randomChunks(30, 3, MinChunkSize) // one pack holds all three
	s1 := storeChunks(t, r, "a", chunks)
	keep := [][]byte{chunks[0]}
	s2 := storeChunks(t, reopen(t, dir), "b", keep)
	r2 := reopen(t, dir)
	r2.RemoveSnapshot(ctx, s1.ID)
	res, err := r2.Prune(ctx, PruneOptions{RepackBelow: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	if res.PacksRepacked == 0 {
		t.Fatalf("nothing repacked: %+v", res)
	}
	got := readDisk(t, reopen(t, dir), s2.Disks[0])
	if !bytes.Equal(got[0], chunks[0]) {
		t.Fatal("repacked chunk differs")
	}
}

func TestOnlyOnePrune(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	l, err := r.Lock(ctx, LockPrune)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock(ctx)
	if _, err := reopen(t, dir).Prune(ctx, PruneOptions{}); err == nil {
		t.Fatal("second prune ran")
	}
}

// prune's figures are what it deletes: a dry run says what the real run
// then does, and packs an earlier prune marked count when they go.
func TestPruneFiguresAreTrue(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	a := storeChunks(t, r, "a", randomChunks(30, 12, MinChunkSize))
	storeChunks(t, r, "b", randomChunks(31, 12, MinChunkSize))
	if err := r.RemoveSnapshot(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	dry, err := reopen(t, dir).Prune(ctx, PruneOptions{RepackBelow: 0.5, DryRun: true})
	if err != nil || dry.PacksDeleted == 0 || dry.BytesFreed == 0 {
		t.Fatalf("dry run: %+v %v", dry, err)
	}
	real, err := reopen(t, dir).Prune(ctx, PruneOptions{RepackBelow: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	if real.PacksDeleted != dry.PacksDeleted || real.BytesFreed != dry.BytesFreed || real.PacksRepacked != dry.PacksRepacked {
		t.Fatalf("dry run %+v, real run %+v", dry, real)
	}

	// Marked while a backup runs, deleted by the next prune: that one
	// reports the bytes.
	c := storeChunks(t, reopen(t, dir), "c", randomChunks(32, 12, MinChunkSize))
	if err := r.RemoveSnapshot(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	lock, _ := reopen(t, dir).Lock(ctx, LockBackup)
	marked, err := reopen(t, dir).Prune(ctx, PruneOptions{})
	if err != nil || marked.PacksPending == 0 || marked.BytesPending == 0 || marked.BytesFreed != 0 {
		t.Fatalf("prune with a backup running: %+v %v", marked, err)
	}
	lock.Unlock(ctx)
	swept, err := reopen(t, dir).Prune(ctx, PruneOptions{})
	if err != nil || swept.PacksDeleted != marked.PacksPending || swept.BytesFreed != marked.BytesPending {
		t.Fatalf("the sweep after the backup: %+v (marked %+v) %v", swept, marked, err)
	}
}
