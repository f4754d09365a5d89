package repo

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/kura-backup/kura/internal/crypt"
)

// idOf returns a distinct non-zero id for i.
func idOf(i int64) crypt.ID {
	var id crypt.ID
	binary.LittleEndian.PutUint64(id[8:], uint64(i)+1)
	id[31] = 0xaa
	return id
}

// buildMap appends positions (increasing) with ids idOf(pos).
func buildMap(t testing.TB, n int64, positions []int64) *ChunkMap {
	t.Helper()
	m := NewChunkMap(n, len(positions))
	for _, p := range positions {
		if err := m.Append(p, idOf(p)); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

// scattered returns k increasing random positions below n.
func scattered(seed uint64, n int64, k int) []int64 {
	rng := rand.New(rand.NewPCG(seed, 7))
	seen := map[int64]bool{}
	for len(seen) < k {
		seen[rng.Int64N(n)] = true
	}
	out := make([]int64, 0, k)
	for p := range seen {
		out = append(out, p)
	}
	for i := 1; i < len(out); i++ { // insertion sort is fine for tests
		for j := i; j > 0 && out[j] < out[j-1]; j-- {
			out[j], out[j-1] = out[j-1], out[j]
		}
	}
	return out
}

func TestChunkMapAppendGetNext(t *testing.T) {
	for _, tc := range []struct {
		name    string
		n       int64
		appends []int64 // -1 before a position appends the zero id there
		wantErr []bool
		data    []int64 // positions holding data afterwards
	}{
		{name: "empty", n: 10},
		{name: "first and last", n: 10, appends: []int64{0, 9}, wantErr: []bool{false, false}, data: []int64{0, 9}},
		{name: "beyond the disk", n: 10, appends: []int64{3, 10}, wantErr: []bool{false, true}, data: []int64{3}},
		{name: "negative", n: 10, appends: []int64{-5}, wantErr: []bool{true}},
		{name: "not increasing", n: 10, appends: []int64{5, 5, 4, 6}, wantErr: []bool{false, true, true, false}, data: []int64{5, 6}},
		{name: "16 TiB of 256 KiB chunks", n: 16 << 40 / (256 << 10), appends: []int64{1, 1 << 20, 16<<40/(256<<10) - 1}, wantErr: []bool{false, false, false}, data: []int64{1, 1 << 20, 16<<40/(256<<10) - 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := NewChunkMap(tc.n, 0)
			for i, p := range tc.appends {
				err := m.Append(p, idOf(p))
				if (err != nil) != tc.wantErr[i] {
					t.Fatalf("Append(%d): %v, want error %v", p, err, tc.wantErr[i])
				}
			}
			if m.Len() != tc.n || m.DataChunks() != int64(len(tc.data)) {
				t.Fatalf("Len %d DataChunks %d, want %d %d", m.Len(), m.DataChunks(), tc.n, len(tc.data))
			}
			var got []int64
			for p, id := range m.All() {
				if id != idOf(p) || m.Get(p) != idOf(p) {
					t.Fatalf("position %d: id %s, Get %s", p, id.Short(), m.Get(p).Short())
				}
				got = append(got, p)
			}
			if len(got) != len(tc.data) {
				t.Fatalf("All yields %v, want %v", got, tc.data)
			}
			for i := range got {
				if got[i] != tc.data[i] {
					t.Fatalf("All yields %v, want %v", got, tc.data)
				}
			}
			if len(m.IDs()) != len(tc.data) {
				t.Fatalf("IDs holds %d, want %d", len(m.IDs()), len(tc.data))
			}
			// Positions between data are zero; Next finds the following data.
			for _, p := range []int64{0, 2, 4, tc.n / 2, tc.n - 2} {
				want := crypt.ID{}
				var next int64 = -1
				for _, d := range tc.data {
					if d == p {
						want = idOf(p)
					}
					if d >= p && next < 0 {
						next = d
					}
				}
				if m.Get(p) != want {
					t.Errorf("Get(%d) = %s, want %s", p, m.Get(p).Short(), want.Short())
				}
				np, _, ok := m.Next(p)
				if ok != (next >= 0) || (ok && np != next) {
					t.Errorf("Next(%d) = %d %v, want %d", p, np, ok, next)
				}
			}
		})
	}
	m := NewChunkMap(4, 0)
	if err := m.Append(2, crypt.ID{}); err != nil || m.DataChunks() != 0 {
		t.Fatalf("a zero id is stored: %v, %d data chunks", err, m.DataChunks())
	}
}

// encodeAll returns the map blobs of m.
func encodeAll(t testing.TB, m *ChunkMap) [][]byte {
	t.Helper()
	var blobs [][]byte
	if err := encodeMapBlobs(m, func(p []byte) error {
		blobs = append(blobs, bytes.Clone(p))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return blobs
}

// decodeAll decodes the map blobs of a disk of n positions.
func decodeAll(n int64, blobs [][]byte) (*ChunkMap, error) {
	m := NewChunkMap(n, 0)
	var next int64
	for _, b := range blobs {
		if err := decodeMapBlob(b, &next, m); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func sameMap(t *testing.T, got, want *ChunkMap) {
	t.Helper()
	if got.Len() != want.Len() || got.DataChunks() != want.DataChunks() {
		t.Fatalf("map of %d/%d positions, want %d/%d", got.DataChunks(), got.Len(), want.DataChunks(), want.Len())
	}
	for p, id := range want.All() {
		if got.Get(p) != id {
			t.Fatalf("position %d: %s, want %s", p, got.Get(p).Short(), id.Short())
		}
	}
}

func TestMapCodecRoundTrip(t *testing.T) {
	const tib16 = 16 << 40 / (256 << 10) // positions of a 16 TiB disk
	dense := make([]int64, 20000)
	for i := range dense {
		dense[i] = int64(i)
	}
	for _, tc := range []struct {
		name     string
		n        int64
		pos      []int64
		maxBlobs int
		maxBytes int // of all blobs together
	}{
		{name: "zeros only", n: tib16, maxBlobs: 0},
		{name: "one chunk at 0", n: 1, pos: []int64{0}, maxBlobs: 1, maxBytes: 33},
		{name: "last of 16 TiB", n: tib16, pos: []int64{tib16 - 1}, maxBlobs: 1, maxBytes: 5 + 32},
		{name: "dense", n: 20000, pos: dense, maxBlobs: 20000/mapMinEntries + 1, maxBytes: 20000*33 + (20000/mapMinEntries+1)*2}, // each blob's first position is absolute: 2 more bytes
		{name: "scattered over 16 TiB", n: tib16, pos: scattered(1, tib16, 9000), maxBlobs: 9000/mapMinEntries + 1, maxBytes: 9000 * (4 + 32)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := buildMap(t, tc.n, tc.pos)
			blobs := encodeAll(t, m)
			size := 0
			for _, b := range blobs {
				size += len(b)
			}
			if len(blobs) > tc.maxBlobs || size > tc.maxBytes {
				t.Fatalf("%d blobs of %d bytes, want at most %d of %d", len(blobs), size, tc.maxBlobs, tc.maxBytes)
			}
			got, err := decodeAll(tc.n, blobs)
			if err != nil {
				t.Fatal(err)
			}
			sameMap(t, got, m)
		})
	}
}

// The same id over and over (a disk filled with one pattern) must not
// cut a blob after every record.
func TestMapBlobsOfRepeatedID(t *testing.T) {
	id := crypt.ID{1} // first two bytes 0x0001: below the cut
	m := NewChunkMap(100000, 0)
	for p := int64(0); p < 100000; p++ {
		if err := m.Append(p, id); err != nil {
			t.Fatal(err)
		}
	}
	if blobs := encodeAll(t, m); len(blobs) != (100000+mapMinEntries-1)/mapMinEntries {
		t.Fatalf("%d map blobs for 100000 identical ids", len(blobs))
	}
}

// A chunk that appears in the middle of a disk changes one or two map
// blobs, not every blob after it: incremental backups store the others
// no more.
func TestMapBlobsChangeLocally(t *testing.T) {
	const n = 1 << 22
	pos := scattered(2, n, 60000)
	rng := rand.New(rand.NewPCG(9, 9))
	ids := map[int64]crypt.ID{}
	build := func(extra int64) *ChunkMap {
		m := NewChunkMap(n, len(pos)+1)
		added := false
		for _, p := range pos {
			if !added && extra >= 0 && extra < p {
				m.Append(extra, crypt.ID{0xee, 0xee, 1})
				added = true
			}
			if _, ok := ids[p]; !ok {
				var id crypt.ID
				for i := range id {
					id[i] = byte(rng.Uint32())
				}
				ids[p] = id
			}
			m.Append(p, ids[p])
		}
		return m
	}
	before := encodeAll(t, build(-1))
	extra := pos[1000] + 1
	if extra == pos[1001] {
		t.Skip("no gap at the chosen place")
	}
	after := encodeAll(t, build(extra))
	had := map[string]bool{}
	for _, b := range before {
		had[string(b)] = true
	}
	changed := 0
	for _, b := range after {
		if !had[string(b)] {
			changed++
		}
	}
	if changed > 2 || len(before) < 10 {
		t.Fatalf("one new chunk changed %d of %d map blobs", changed, len(after))
	}
}

func TestMapCodecRejectsDamage(t *testing.T) {
	good := func(skip uint64, b byte) []byte {
		out := binary.AppendUvarint(nil, skip)
		id := crypt.ID{b, 2, 3}
		return append(out, id[:]...)
	}
	many := make([]byte, 0, (MapEntries+1)*33)
	for i := 0; i <= MapEntries; i++ {
		many = append(many, good(0, 9)...)
	}
	for _, tc := range []struct {
		name string
		n    int64
		blob []byte
		want string
	}{
		{"empty blob", 10, nil, "empty"},
		{"truncated id", 10, good(1, 1)[:20], "truncated"},
		{"truncated position", 10, []byte{0x80}, "bad position"},
		{"position overflows", 10, append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, make([]byte, 32)...), "beyond"},
		{"position beyond the disk", 10, good(10, 1), "beyond"},
		{"second record beyond", 10, append(good(8, 1), good(1, 1)...), "beyond"},
		{"zero id", 10, append(binary.AppendUvarint(nil, 1), make([]byte, 32)...), "zero chunk id"},
		{"too many records", MapEntries + 10, many, "more than"},
		{"huge uvarint", 10, bytes.Repeat([]byte{0xff}, 11), "bad position"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeAll(tc.n, [][]byte{tc.blob})
			if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrDamaged about %q", err, tc.want)
			}
		})
	}
	// Across blobs positions keep increasing: the second blob cannot go
	// back, and a disk's last position cannot be used twice.
	if _, err := decodeAll(10, [][]byte{good(9, 1), good(0, 1)}); !errors.Is(err, ErrDamaged) {
		t.Fatalf("record after the disk's last position: %v", err)
	}
}

// saveMapV1 stores ids the way snapshot version 1 did: every position's
// id, zero for all-zero chunks, MapEntries ids per map blob.
func saveMapV1(t *testing.T, r *Repo, ids []crypt.ID) []crypt.ID {
	t.Helper()
	ctx := context.Background()
	s := r.NewSealer()
	var maps []crypt.ID
	for start := 0; start < len(ids); start += MapEntries {
		end := min(start+MapEntries, len(ids))
		plain := make([]byte, 0, (end-start)*crypt.IDSize)
		for _, id := range ids[start:end] {
			plain = append(plain, id[:]...)
		}
		mid := r.key.Hash(plain)
		maps = append(maps, mid)
		if r.Claim(mid) {
			if err := r.StoreBlob(ctx, s, MapBlob, mid, plain); err != nil {
				t.Fatal(err)
			}
		}
	}
	return maps
}

// saveSnapshotJSON writes a snapshot manifest as given, version included.
func saveSnapshotJSON(t *testing.T, r *Repo, s *Snapshot) string {
	t.Helper()
	plain, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := r.sealObject(plain)
	if err != nil {
		t.Fatal(err)
	}
	id := crypt.RandomID().String()
	if err := r.be.Save(context.Background(), "snapshots/"+id, sealed); err != nil {
		t.Fatal(err)
	}
	return id
}

// Snapshots written before version 2 keep their dense maps and read as
// they did: restore, prune and check use them.
func TestReadVersion1Snapshot(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t)
	if err := r.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	cs := r.Config().ChunkSize
	chunks := randomChunks(4, 5, cs)
	const n = MapEntries + 100 // two map blobs
	ids := make([]crypt.ID, n)
	s := r.NewSealer()
	for i, at := range []int{0, 7, MapEntries - 1, MapEntries, n - 1} {
		ids[at] = r.Key().Hash(chunks[i])
		if r.Claim(ids[at]) {
			if err := r.StoreBlob(ctx, s, DataBlob, ids[at], chunks[i]); err != nil {
				t.Fatal(err)
			}
		}
	}
	maps := saveMapV1(t, r, ids)
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	disk := Disk{Name: "vda", Size: int64(n) * int64(cs), ChunkSize: cs, Maps: maps, DataChunks: 5}
	id := saveSnapshotJSON(t, r, &Snapshot{Version: 1, Name: "old", Disks: []Disk{disk}})

	r2 := reopen(t, dir)
	snap, err := r2.LoadSnapshot(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if snap.Disks[0].MapVersion != 1 {
		t.Fatalf("version-1 disk reads as map version %d", snap.Disks[0].MapVersion)
	}
	m, err := r2.LoadMap(ctx, snap.Disks[0])
	if err != nil {
		t.Fatal(err)
	}
	if m.Len() != n || m.DataChunks() != 5 {
		t.Fatalf("map of %d data chunks of %d, want 5 of %d", m.DataChunks(), m.Len(), n)
	}
	for p, want := range ids {
		if got := m.Get(int64(p)); got != want {
			t.Fatalf("position %d: %s, want %s", p, got.Short(), want.Short())
		}
	}
	got := readDisk(t, r2, snap.Disks[0])
	if !bytes.Equal(got[MapEntries], chunks[3]) || got[1] != nil {
		t.Fatal("version-1 disk restores wrong data")
	}
	ref, _, err := r2.Referenced(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range append(m.IDs(), maps...) {
		if _, ok := ref[id]; !ok {
			t.Fatalf("prune does not see blob %s of a version-1 snapshot", id.Short())
		}
	}
	if res, err := r2.Check(ctx, CheckOptions{ReadData: true}); err != nil || !res.OK() {
		t.Fatalf("check of a version-1 snapshot: %+v %v", res, err)
	}
	// A version-1 disk missing a map blob is damaged.
	short := snap.Disks[0]
	short.Maps = short.Maps[:1]
	if _, err := r2.LoadMap(ctx, short); !errors.Is(err, ErrDamaged) {
		t.Fatalf("version-1 disk with a map blob missing: %v", err)
	}
}

// A snapshot's maps are checked against its disk: positions past the
// disk's end and a count of data chunks other than the manifest's are
// damage, and a disk of zeros has no maps at all.
func TestLoadMapChecksDisk(t *testing.T) {
	ctx := context.Background()
	r, _ := newRepo(t)
	if err := r.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	cs := int64(r.Config().ChunkSize)
	const n = 1 << 26 // 4 TiB of 64 KiB chunks
	m := buildMap(t, n, []int64{5, n / 2, n - 1})
	maps, err := r.SaveMap(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	zeros, err := r.SaveMap(ctx, NewChunkMap(n, 0))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if len(maps) != 1 || len(zeros) != 0 {
		t.Fatalf("%d map blobs for 3 chunks, %d for none", len(maps), len(zeros))
	}
	ok := Disk{Name: "vda", Size: n * cs, ChunkSize: int(cs), Maps: maps, DataChunks: 3}
	got, err := r.LoadMap(ctx, ok)
	if err != nil {
		t.Fatal(err)
	}
	sameMap(t, got, m)
	for _, tc := range []struct {
		name string
		edit func(d *Disk)
	}{
		{"disk shorter than its map", func(d *Disk) { d.Size = (n - 1) * cs }},
		{"fewer data chunks", func(d *Disk) { d.DataChunks = 2 }},
		{"more data chunks", func(d *Disk) { d.DataChunks = 4 }},
		{"map blob missing", func(d *Disk) { d.Maps = nil }},
		{"map blob twice", func(d *Disk) { d.Maps = append(d.Maps, d.Maps[0]); d.DataChunks = 6 }},
		{"no chunk size", func(d *Disk) { d.ChunkSize = 0 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := ok
			tc.edit(&d)
			if _, err := r.LoadMap(ctx, d); !errors.Is(err, ErrDamaged) {
				t.Fatalf("got %v, want ErrDamaged", err)
			}
		})
	}
	z, err := r.LoadMap(ctx, Disk{Name: "vdb", Size: n * cs, ChunkSize: int(cs)})
	if err != nil || z.DataChunks() != 0 || z.Len() != n {
		t.Fatalf("disk of zeros: %v", err)
	}
}
