package repo

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/kura-backup/kura/internal/crypt"
)

// flipByte flips one bit of the byte at off of file p.
func flipByte(t *testing.T, p string, off int) {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	data[off] ^= 0x10
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// A chunk found damaged is recorded; no later backup reuses it; the next
// one that has its data stores it again, which heals the old restore
// point; prune then removes the damaged copy and its record.
func TestDamagedChunkHeals(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	chunks := randomChunks(5, 6, MinChunkSize)
	old := storeChunks(t, r, "vm", chunks)
	flipByte(t, packFiles(t, dir)[0], 50) // inside the first blob

	rd := reopen(t, dir)
	ids, err := rd.LoadMap(ctx, old.Disks[0])
	if err != nil {
		t.Fatal(err)
	}
	bad := int64(-1)
	for i, id := range ids.All() {
		if _, err := rd.LoadBlob(ctx, id, nil); errors.Is(err, ErrDamaged) {
			bad = i
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if bad < 0 {
		t.Fatal("the flipped byte damaged no chunk")
	}

	bk := reopen(t, dir)
	if bk.Index().Has(ids.Get(bad)) {
		t.Fatal("a backup would reuse the damaged chunk")
	}
	storeChunks(t, bk, "vm", chunks)
	if n := bk.Stored().Blobs; n != 1 {
		t.Fatalf("the next backup stored %d blobs, want the damaged chunk again (1)", n)
	}
	got := readDisk(t, reopen(t, dir), old.Disks[0])
	for i := range chunks {
		if !bytes.Equal(got[i], chunks[i]) {
			t.Fatalf("chunk %d of the old restore point is not healed", i)
		}
	}

	if _, err := reopen(t, dir).Prune(ctx, PruneOptions{RepackBelow: 0.5}); err != nil {
		t.Fatal(err)
	}
	res, err := reopen(t, dir).Check(ctx, CheckOptions{ReadData: true})
	if err != nil || !res.OK() || res.Healed != 0 {
		t.Fatalf("after prune: %+v %v", res, err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "damage", "*")); len(left) != 0 {
		t.Fatalf("damage records left: %v", left)
	}
}

// Every index file lost: readers find the chunks in the pack headers,
// prune deletes nothing a snapshot needs, repair index rebuilds the index.
func TestLostIndexAndRepair(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	chunks := randomChunks(6, 10, MinChunkSize)
	s := storeChunks(t, r, "vm", chunks)
	files, _ := filepath.Glob(filepath.Join(dir, "index", "*"))
	for _, f := range files {
		os.Remove(f)
	}

	res, err := reopen(t, dir).Check(ctx, CheckOptions{})
	if err != nil || res.OK() || res.UnindexedPacks != 0 {
		t.Fatalf("check with the index lost: %+v %v", res, err)
	}
	if _, err := reopen(t, dir).Prune(ctx, PruneOptions{RepackBelow: 0.5}); err != nil {
		t.Fatal(err)
	}
	got := readDisk(t, reopen(t, dir), s.Disks[0])
	for i := range chunks {
		if !bytes.Equal(got[i], chunks[i]) {
			t.Fatalf("chunk %d lost", i)
		}
	}
	rep, err := reopen(t, dir).RepairIndex(ctx)
	if err != nil || rep.Packs == 0 || len(rep.Unreadable) != 0 {
		t.Fatalf("repair index: %+v %v", rep, err)
	}
	if res, err := reopen(t, dir).Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() {
		t.Fatalf("check after repair: %+v %v", res, err)
	}
}

// A pack lost for good: repair snapshots reports the lost ranges and, with
// Rewrite, replaces the restore point by one that restores the rest.
func TestRepairSnapshots(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	// Two packs (256 KiB each): the first chunks in one, the rest in the
	// other; the map is in the last.
	chunks := make([][]byte, 8)
	rng := rand.New(rand.NewPCG(7, 7))
	for i := range chunks {
		chunks[i] = make([]byte, MinChunkSize)
		for j := range chunks[i] {
			chunks[i][j] = byte(rng.Uint32()) // incompressible: 4 chunks fill a pack
		}
	}
	s := storeChunks(t, r, "vm", chunks)
	rd := reopen(t, dir)
	ids, _ := rd.LoadMap(ctx, s.Disks[0])
	l0, _ := rd.Locate(ids.Get(0))
	lm, _ := rd.Locate(s.Disks[0].Maps[0])
	if l0.Pack == lm.Pack {
		t.Fatal("test setup: the first chunk and the map share a pack")
	}
	os.Remove(filepath.Join(dir, packName(l0.Pack)))

	lost, err := reopen(t, dir).RepairSnapshots(ctx, RepairSnapshotsOptions{})
	if err != nil || len(lost) != 1 || len(lost[0].Disks) != 1 || lost[0].Disks[0].Missing+lost[0].Disks[0].Damaged != 4 {
		t.Fatalf("report: %+v %v", lost, err)
	}
	if rg := lost[0].Disks[0].Ranges[0]; rg.Offset != 0 {
		t.Fatalf("first lost range %+v, want one at offset 0", rg)
	}
	lost, err = reopen(t, dir).RepairSnapshots(ctx, RepairSnapshotsOptions{Rewrite: true})
	if err != nil || len(lost) != 1 || lost[0].Repaired == "" {
		t.Fatalf("rewrite: %+v %v", lost, err)
	}
	rd = reopen(t, dir)
	ns, err := rd.LoadSnapshot(ctx, lost[0].Repaired)
	if err != nil || len(ns.Disks[0].Lost) == 0 {
		t.Fatalf("rewritten snapshot: %+v %v", ns, err)
	}
	if _, err := rd.LoadSnapshot(ctx, s.ID); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("the original is still there: %v", err)
	}
	got := readDisk(t, rd, ns.Disks[0])
	for i := range chunks {
		lostHere := false
		for _, rg := range ns.Disks[0].Lost {
			off := int64(i) * MinChunkSize
			lostHere = lostHere || off >= rg.Offset && off < rg.Offset+rg.Length
		}
		switch {
		case lostHere && got[i] != nil:
			t.Fatalf("chunk %d is listed lost but has data", i)
		case !lostHere && !bytes.Equal(got[i], chunks[i]):
			t.Fatalf("chunk %d differs", i)
		}
	}
	if _, err := reopen(t, dir).RepairIndex(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := reopen(t, dir).Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() {
		t.Fatalf("check after repair: %+v %v", res, err)
	}
}

// A pending-deletion record that cannot be read stops nothing: readers and
// writers go on (its packs are simply not kept from writers, and no sweep
// can delete them), verify names it, and prune removes it and judges its
// packs again.
func TestDamagedPendingDeletion(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	gone := storeChunks(t, r, "gone", randomChunks(40, 6, MinChunkSize))
	kept := randomChunks(41, 6, MinChunkSize)
	s := storeChunks(t, r, "kept", kept)
	if err := r.RemoveSnapshot(ctx, gone.ID); err != nil {
		t.Fatal(err)
	}
	lock, _ := reopen(t, dir).Lock(ctx, LockBackup)
	if res, err := reopen(t, dir).Prune(ctx, PruneOptions{}); err != nil || res.PacksPending == 0 {
		t.Fatalf("prune with a backup running: %+v %v", res, err)
	}
	lock.Unlock(ctx)
	recs, _ := filepath.Glob(filepath.Join(dir, "gc", "*"))
	if len(recs) != 1 {
		t.Fatalf("%d pending deletion records", len(recs))
	}
	flipByte(t, recs[0], 20)

	rd := reopen(t, dir) // LoadIndex does not fail
	got := readDisk(t, rd, s.Disks[0])
	for i := range kept {
		if !bytes.Equal(got[i], kept[i]) {
			t.Fatalf("chunk %d differs", i)
		}
	}
	res, err := reopen(t, dir).Check(ctx, CheckOptions{})
	if err != nil || res.OK() || res.Problems[0].Object != "gc/"+filepath.Base(recs[0]) {
		t.Fatalf("check: %+v %v", res, err)
	}
	if _, err := reopen(t, dir).Prune(ctx, PruneOptions{}); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "gc", "*")); len(left) != 0 {
		t.Fatalf("records left: %v", left)
	}
	if res, err := reopen(t, dir).Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() {
		t.Fatalf("check after prune: %+v %v", res, err)
	}
	st, err := reopen(t, dir).Stats(ctx)
	if err != nil || st.Snapshots != 1 || st.StoredBytes > 2*st.ReferencedStored+4096 {
		t.Fatalf("the forgotten data was not pruned: %+v %v", st, err)
	}
}

// Records nothing depends on (boot checks, damage records) that cannot be
// read: verify names them, prune removes them, and nothing else changes.
func TestUnreadableRecords(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	s := storeChunks(t, r, "vm", randomChunks(50, 4, MinChunkSize))
	if err := r.SaveBootCheck(ctx, &BootCheck{Snapshot: s.ID, Passed: true}); err != nil {
		t.Fatal(err)
	}
	if err := r.ReportDamage(ctx, crypt.ID{1}, crypt.ID{2}, ErrDamaged); err != nil {
		t.Fatal(err)
	}
	var victims []string
	for _, sub := range []string{"bootchecks", "damage"} {
		files, _ := filepath.Glob(filepath.Join(dir, sub, "*"))
		if len(files) != 1 {
			t.Fatalf("%s: %v", sub, files)
		}
		flipByte(t, files[0], 30)
		victims = append(victims, sub+"/"+filepath.Base(files[0]))
	}
	res, err := reopen(t, dir).Check(ctx, CheckOptions{})
	if err != nil || len(res.Problems) != 2 || res.Problems[0].Object != victims[0] || res.Problems[1].Object != victims[1] {
		t.Fatalf("check: %+v %v", res, err)
	}
	if _, err := reopen(t, dir).Prune(ctx, PruneOptions{}); err != nil {
		t.Fatal(err)
	}
	if res, err := reopen(t, dir).Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() || res.Snapshots != 1 {
		t.Fatalf("check after prune: %+v %v", res, err)
	}
}
