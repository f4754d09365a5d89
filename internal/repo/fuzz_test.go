package repo

import (
	"context"
	"errors"
	"testing"

	"github.com/kura-backup/kura/internal/crypt"
)

// The decoders below read bytes from storage, which may be damaged or
// hostile: they must fail cleanly, never panic or allocate without bound.

func FuzzDecodeIndex(f *testing.F) {
	f.Add(encodeIndex(map[crypt.ID][]packEntry{{1}: {{ID: crypt.ID{2}, Type: DataBlob, Compressed: true, Offset: 0, Length: 100, RawLength: 200}}}))
	f.Add([]byte(indexMagic))
	f.Add([]byte("KIDX\x01\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, data []byte) {
		packs, err := decodeIndex(data)
		if err != nil {
			return
		}
		// What decodes must re-encode to something that decodes the same.
		again, err := decodeIndex(encodeIndex(packs))
		if err != nil || len(again) != len(packs) {
			t.Fatalf("re-encoding failed: %v", err)
		}
	})
}

func FuzzDecodeHeader(f *testing.F) {
	f.Add(encodeHeader([]packEntry{{ID: crypt.ID{1}, Length: 100, RawLength: 50}}), int64(100))
	f.Add([]byte{}, int64(0))
	f.Fuzz(func(t *testing.T, data []byte, dataLen int64) {
		es, err := decodeHeader(data, dataLen)
		if err != nil {
			return
		}
		var sum int64
		for _, e := range es {
			sum += int64(e.Length)
		}
		if sum != dataLen {
			t.Fatalf("entries cover %d bytes, pack has %d", sum, dataLen)
		}
	})
}

func FuzzOpenObject(f *testing.F) {
	key, _ := crypt.NewKey()
	r := &Repo{key: key}
	good, _ := r.sealObject([]byte(`{"name":"vm1"}`))
	f.Add(good)
	f.Add([]byte("short"))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = r.openObject(data)
		_, _ = parsePack(key, data)
	})
}

func FuzzLoadSnapshotJSON(f *testing.F) {
	key, _ := crypt.NewKey()
	f.Add([]byte(`{"version":1,"name":"x","disks":[{"name":"d","size":1048576,"chunk_size":65536,"maps":[]}]}`))
	f.Add([]byte(`{"version":99}`))
	f.Fuzz(func(t *testing.T, plain []byte) {
		dir := t.TempDir()
		r, _ := newRepoAt(dir, key)
		sealed, _ := r.sealObject(plain)
		ctx := context.Background()
		_ = r.be.Save(ctx, "snapshots/s", sealed)
		s, err := r.LoadSnapshot(ctx, "s")
		if err != nil {
			return
		}
		for _, d := range s.Disks {
			if d.ChunkSize <= 0 {
				continue
			}
			_, _ = r.LoadMap(ctx, d) // must fail cleanly: no maps stored
		}
	})
}

func FuzzDecodeMapBlob(f *testing.F) {
	m := NewChunkMap(1<<20, 0)
	for _, p := range []int64{0, 3, 4, 1000, 1 << 19} {
		_ = m.Append(p, crypt.ID{byte(p), 1})
	}
	_ = encodeMapBlobs(m, func(plain []byte) error {
		f.Add(append([]byte(nil), plain...), int64(1<<20), int64(0))
		return nil
	})
	f.Add([]byte{0x80}, int64(10), int64(0))
	f.Add([]byte{}, int64(10), int64(0))
	f.Fuzz(func(t *testing.T, data []byte, n, next int64) {
		if n < 0 || next < 0 || next > n {
			return
		}
		m := NewChunkMap(n, 0)
		start := next
		err := decodeMapBlob(data, &next, m)
		if err != nil {
			if !errors.Is(err, ErrDamaged) {
				t.Fatalf("error does not wrap ErrDamaged: %v", err)
			}
			return
		}
		// What decodes lies inside the disk, in order, and holds data.
		last := start - 1
		for p, id := range m.All() {
			if p <= last || p >= n || id.IsZero() {
				t.Fatalf("decoded position %d after %d of %d, id %s", p, last, n, id.Short())
			}
			last = p
		}
		if m.DataChunks() == 0 || m.DataChunks() > MapEntries || next != last+1 {
			t.Fatalf("%d records, next %d after last %d", m.DataChunks(), next, last)
		}
		// Re-encoded, it decodes the same.
		var blobs [][]byte
		_ = encodeMapBlobs(m, func(p []byte) error { blobs = append(blobs, append([]byte(nil), p...)); return nil })
		again, err := decodeAll(n, blobs)
		if err != nil || again.DataChunks() != m.DataChunks() {
			t.Fatalf("re-encoding failed: %v", err)
		}
		for p, id := range m.All() {
			if again.Get(p) != id {
				t.Fatalf("position %d differs after re-encoding", p)
			}
		}
	})
}
