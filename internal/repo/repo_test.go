package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/crypt"
)

var testPassword = []byte("correct horse")

func fastKDF() *crypt.KDFParams {
	return &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("0123456789abcdef")}
}

// newRepo creates a repository with small chunks and packs in a temp dir.
func newRepo(t *testing.T) (*Repo, string) {
	t.Helper()
	dir := t.TempDir()
	be, err := local.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := Init(context.Background(), be, testPassword, InitOptions{ChunkSize: MinChunkSize, PackSize: 256 << 10, KDF: fastKDF()})
	if err != nil {
		t.Fatal(err)
	}
	return r, dir
}

func reopen(t *testing.T, dir string) *Repo {
	t.Helper()
	be, _ := local.Open(dir)
	r, err := Open(context.Background(), be, testPassword)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.LoadIndex(context.Background()); err != nil {
		t.Fatal(err)
	}
	return r
}

// storeChunks saves chunks and a snapshot of one disk made of them.
func storeChunks(t *testing.T, r *Repo, name string, chunks [][]byte) *Snapshot {
	t.Helper()
	ctx := context.Background()
	if err := r.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	s := r.NewSealer()
	ids := NewChunkMap(int64(len(chunks)), 0)
	for i, c := range chunks {
		if c == nil {
			continue
		}
		id := r.Key().Hash(c)
		if err := ids.Append(int64(i), id); err != nil {
			t.Fatal(err)
		}
		if !r.Claim(id) {
			continue
		}
		if err := r.StoreBlob(ctx, s, DataBlob, id, c); err != nil {
			t.Fatal(err)
		}
	}
	maps, err := r.SaveMap(ctx, ids)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	cs := r.Config().ChunkSize
	snap := &Snapshot{Name: name, Disks: []Disk{{Name: "d0", Size: int64(len(chunks) * cs), ChunkSize: cs, Maps: maps, DataChunks: ids.DataChunks()}}}
	if _, err := r.SaveSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	return snap
}

func randomChunks(seed uint64, n, size int) [][]byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	out := make([][]byte, n)
	for i := range out {
		b := make([]byte, size)
		for j := range b {
			b[j] = byte(rng.IntN(4)) // compressible
		}
		out[i] = b
	}
	return out
}

// readDisk restores a snapshot's disk into memory.
func readDisk(t *testing.T, r *Repo, d Disk) [][]byte {
	t.Helper()
	ids, err := r.LoadMap(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	out := make([][]byte, ids.Len())
	for i, id := range ids.All() {
		out[i], err = r.LoadBlob(context.Background(), id, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	_, dir := newRepo(t)
	be, _ := local.Open(dir)
	if _, err := Open(ctx, be, []byte("wrong")); !errors.Is(err, ErrWrongPassword) {
		t.Errorf("wrong password: %v", err)
	}
	if _, err := Init(ctx, be, testPassword, InitOptions{KDF: fastKDF()}); !errors.Is(err, ErrExists) {
		t.Errorf("init twice: %v", err)
	}
	empty, _ := local.Open(t.TempDir())
	if _, err := Open(ctx, empty, testPassword); !errors.Is(err, ErrNotRepository) {
		t.Errorf("empty dir: %v", err)
	}
	if _, err := Init(ctx, empty, testPassword, InitOptions{ChunkSize: 3000, KDF: fastKDF()}); err == nil || !strings.Contains(err.Error(), "power of two") {
		t.Errorf("bad chunk size: %v", err)
	}

	cfgPath := filepath.Join(dir, "config")
	orig, _ := os.ReadFile(cfgPath)
	edit := func(f func(map[string]any)) {
		var m map[string]any
		_ = json.Unmarshal(orig, &m)
		f(m)
		data, _ := json.Marshal(m)
		os.WriteFile(cfgPath, data, 0o600)
	}
	edit(func(m map[string]any) { m["version"] = FormatVersion + 1 })
	if _, err := Open(ctx, be, testPassword); !errors.Is(err, ErrNewerFormat) || !strings.Contains(err.Error(), "upgrade kura") {
		t.Errorf("newer format: %v", err)
	}
	edit(func(m map[string]any) { m["pack_size"] = 1 << 30 })
	if _, err := Open(ctx, be, testPassword); !errors.Is(err, ErrDamaged) {
		t.Errorf("tampered config: %v", err)
	}
	os.WriteFile(cfgPath, []byte("{garbage"), 0o600)
	if _, err := Open(ctx, be, testPassword); !errors.Is(err, ErrNotRepository) {
		t.Errorf("garbage config: %v", err)
	}
}

func TestKeys(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	id, err := r.AddKey(ctx, []byte("second password"))
	if err != nil {
		t.Fatal(err)
	}
	be, _ := local.Open(dir)
	r2, err := Open(ctx, be, []byte("second password"))
	if err != nil {
		t.Fatalf("second password does not open: %v", err)
	}
	if r2.Key().Hash([]byte("x")) != r.Key().Hash([]byte("x")) {
		t.Fatal("the two passwords unlock different master keys")
	}
	if err := r2.RemoveKey(ctx, id[:8]); err == nil {
		t.Fatal("removed the key in use")
	}
	if err := r2.RemoveKey(ctx, r.KeyID()[:8]); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, be, testPassword); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("removed password still opens: %v", err)
	}
	if err := r2.RemoveKey(ctx, id); err == nil {
		t.Fatal("removed the last key")
	}
}

func TestRoundTripAndDedup(t *testing.T) {
	r, dir := newRepo(t)
	chunks := randomChunks(1, 20, MinChunkSize)
	chunks[3] = nil                               // a hole
	chunks[7] = append([]byte(nil), chunks[5]...) // a duplicate
	s1 := storeChunks(t, r, "vm1", chunks)
	st := r.Stored()
	if st.Blobs != 19 { // 18 distinct data chunks + 1 map
		t.Fatalf("stored %d blobs, want 19", st.Blobs)
	}
	// A second snapshot of the same data stores nothing new.
	r2 := reopen(t, dir)
	storeChunks(t, r2, "vm1", chunks)
	if n := r2.Stored().Blobs; n != 0 {
		t.Fatalf("second backup stored %d blobs, want 0", n)
	}
	got := readDisk(t, reopen(t, dir), s1.Disks[0])
	for i := range chunks {
		if !bytes.Equal(got[i], chunks[i]) {
			t.Fatalf("chunk %d differs", i)
		}
	}
}

func TestFindSnapshot(t *testing.T) {
	day := func(d, h int) time.Time { return time.Date(2026, 11, d, h, 30, 0, 0, time.Local) }
	ss := []*Snapshot{{ID: "aaaa1111", Name: "web", Time: day(19, 9)}, {ID: "aaab2222", Name: "db", Time: day(20, 1)},
		{ID: "cccc4444", Name: "web", Time: day(20, 3)}, {ID: "bbbb3333", Name: "web", Time: day(20, 22)}}
	// A name saved before names were checked.
	ss = append([]*Snapshot{{ID: "dddd5555", Name: "old@name", Time: day(18, 1)}}, ss...)
	for _, tc := range []struct {
		ref, want string
		err       error
	}{
		{"latest", "bbbb3333", nil},
		{"web@latest", "bbbb3333", nil},
		{"db@latest", "aaab2222", nil},
		{"aaaa", "aaaa1111", nil},
		{"aaa", "", ErrAmbiguous},
		{"ee", "", ErrNoSnapshot},
		{"mail@latest", "", ErrNoSnapshot},
		{"web@2026-11-19", "aaaa1111", nil},
		{"web@2026-11-20", "bbbb3333", nil},
		{"web@2026-11-20T03", "cccc4444", nil},
		{"web@2026-11-20 03:30", "cccc4444", nil},
		{"web@2026-11-21", "", ErrNoSnapshot},
		// Half-written references select nothing (issue 23: `kura forget
		// web@` deleted the newest restore point).
		{"web@", "", ErrBadRef},
		{"@latest", "", ErrBadRef},
		{"@", "", ErrBadRef},
		{"", "", ErrBadRef},
		{"web@yesterday", "", ErrBadRef},
		{"web@2026-11-20x", "", ErrBadRef},
		{"web@20261120", "", ErrBadRef},
		{"old@name@latest", "dddd5555", nil},
	} {
		s, err := FindSnapshot(ss, tc.ref)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("%s: err %v, want %v", tc.ref, err, tc.err)
			}
			if tc.err == ErrBadRef && !strings.Contains(err.Error(), "NAME@latest, NAME@2026-11-20") {
				t.Errorf("%s: error %q does not say which forms are valid", tc.ref, err)
			}
			continue
		}
		if err != nil || s.ID != tc.want {
			t.Errorf("%s: got %v %v, want %s", tc.ref, s, err, tc.want)
		}
	}
}

func packFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.Walk(filepath.Join(dir, "data"), func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			out = append(out, p)
		}
		return nil
	})
	return out
}

func TestCheckFindsDamageAndNamesSnapshots(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	storeChunks(t, r, "vm1", randomChunks(2, 10, MinChunkSize))
	res, err := reopen(t, dir).Check(ctx, CheckOptions{ReadData: true})
	if err != nil || !res.OK() {
		t.Fatalf("clean repository: %+v %v", res, err)
	}
	// Flip one byte in the middle of the first pack's blob area.
	p := packFiles(t, dir)[0]
	data, _ := os.ReadFile(p)
	data[100] ^= 0x40
	os.WriteFile(p, data, 0o600)
	res, err = reopen(t, dir).Check(ctx, CheckOptions{ReadData: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.OK() {
		t.Fatal("bit flip not found")
	}
	named := false
	for _, pr := range res.Problems {
		for _, s := range pr.Snapshots {
			if strings.Contains(s, "vm1") {
				named = true
			}
		}
	}
	if !named {
		t.Fatalf("problems do not name the affected snapshot: %+v", res.Problems)
	}
	// The damage read-data found is recorded: the structure check, which
	// resolves chunks as a restore does, now reports it too.
	res, _ = reopen(t, dir).Check(ctx, CheckOptions{})
	if res.OK() || !strings.Contains(res.Problems[0].Error, "stored only damaged") {
		t.Fatalf("structure check after read-data: %+v", res.Problems)
	}
	// Truncating the pack is a structure problem.
	os.WriteFile(p, data[:50], 0o600)
	res, _ = reopen(t, dir).Check(ctx, CheckOptions{})
	if res.OK() {
		t.Fatal("truncated pack not found")
	}
}

func TestLoadDamagedObjects(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	snap := storeChunks(t, r, "vm1", randomChunks(3, 4, MinChunkSize))
	for _, sub := range []string{"index", "snapshots"} {
		files, _ := filepath.Glob(filepath.Join(dir, sub, "*"))
		for _, f := range files {
			data, _ := os.ReadFile(f)
			os.WriteFile(f, data[:len(data)-3], 0o600)
		}
	}
	be, _ := local.Open(dir)
	r2, err := Open(ctx, be, testPassword)
	if err != nil {
		t.Fatal(err)
	}
	// A damaged index file is worked around: the packs are read from
	// their headers.
	if err := r2.LoadIndex(ctx); err != nil {
		t.Errorf("truncated index: %v", err)
	}
	if _, err := r2.LoadBlob(ctx, snap.Disks[0].Maps[0], nil); err != nil {
		t.Errorf("map blob after the index was damaged: %v", err)
	}
	if _, err := r2.LoadSnapshot(ctx, snap.ID); !errors.Is(err, ErrDamaged) {
		t.Errorf("truncated snapshot: %v", err)
	}
}

// newRepoAt builds an unlocked Repo over dir without key files (fuzzing).
func newRepoAt(dir string, key *crypt.Key) (*Repo, error) {
	be, err := local.Open(dir)
	if err != nil {
		return nil, err
	}
	r := &Repo{be: be, key: key, idx: newIndex(), loaded: true, cfg: Config{Version: 1, ChunkSize: MinChunkSize, PackSize: 1 << 20}}
	return r, nil
}

// A key unlocked by one process opens the repository in another without
// the password; a key of another repository is refused.
func TestOpenWithKey(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	be, _ := local.Open(dir)
	k := *r.Key()
	r2, err := OpenWithKey(ctx, be, &k, r.KeyID())
	if err != nil {
		t.Fatal(err)
	}
	if r2.KeyID() != r.KeyID() || r2.Key().Hash([]byte("x")) != r.Key().Hash([]byte("x")) {
		t.Errorf("the reopened repository has another key")
	}
	other, _ := newRepo(t)
	ok := *other.Key()
	if _, err := OpenWithKey(ctx, be, &ok, other.KeyID()); !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "not this repository's") {
		t.Errorf("OpenWithKey with another repository's key: %v", err)
	}
}

// A writer indexes its packs every indexEvery packs, not only at Flush:
// a backup killed half-way leaves what it uploaded indexed, and the next
// one does not send it again.
func TestPacksIndexedBeforeFlush(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t) // 256 KiB packs
	chunks := randomChunks(40, 16*indexEvery, MinChunkSize)
	s := r.NewSealer()
	ids := make([]crypt.ID, len(chunks))
	for i, c := range chunks {
		ids[i] = r.Key().Hash(c)
		if err := r.StoreBlob(ctx, s, DataBlob, ids[i], c); err != nil {
			t.Fatal(err)
		}
	}
	packs := r.Stored().Packs
	if packs < indexEvery+1 || packs%indexEvery == 0 {
		t.Fatalf("the test wrote %d packs, want more than %d and not a multiple", packs, indexEvery)
	}
	// No Flush: the process dies here.
	next := reopen(t, dir)
	n := 0
	for _, id := range ids {
		if next.idx.Has(id) {
			n++
		}
	}
	if want := int(packs/indexEvery*indexEvery) * len(ids) / int(packs); n < want*9/10 || n == len(ids) {
		t.Fatalf("%d of %d chunks indexed after a writer wrote %d packs and stopped without Flush, want about %d", n, len(ids), packs, want)
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := reopen(t, dir); func() bool {
		for _, id := range ids {
			if !got.idx.Has(id) {
				return false
			}
		}
		return true
	}() == false {
		t.Fatal("not every chunk indexed after Flush")
	}
}
