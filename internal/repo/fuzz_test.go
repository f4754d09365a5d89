package repo

import (
	"context"
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
