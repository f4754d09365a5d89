package snapdisk

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backup"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/source/image"
)

// benchDisk backs up size bytes that compress about 2:1 (random bytes
// drawn from 16 values) into a repository with the default chunk and pack
// sizes.
func benchDisk(b *testing.B, size int) (*repo.Repo, *repo.Snapshot) {
	b.Helper()
	ctx := context.Background()
	dir := b.TempDir()
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = "abcdefghijklmnop"[rng.IntN(16)]
	}
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, data, 0o600); err != nil {
		b.Fatal(err)
	}
	be, err := local.Open(filepath.Join(dir, "repo"))
	if err != nil {
		b.Fatal(err)
	}
	r, err := repo.Init(ctx, be, []byte("pw"), repo.InitOptions{
		KDF: &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("0123456789abcdef")}})
	if err != nil {
		b.Fatal(err)
	}
	d, err := image.Open(ctx, img, image.Options{Format: "raw"})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	snap, err := backup.Run(ctx, r, []source.Disk{d}, backup.Options{Name: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	return r, snap
}

// BenchmarkSequentialRead reads the whole disk front to back in requests
// of 1 MiB, one at a time, as `dd bs=1M iflag=direct` in an
// instant-recovered guest makes QEMU read its export.
func BenchmarkSequentialRead(b *testing.B) {
	const size = 128 << 20
	r, snap := benchDisk(b, size)
	for _, req := range []int{64 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("req=%dKiB", req>>10), func(b *testing.B) {
			ctx := context.Background()
			buf := make([]byte, req)
			b.SetBytes(size)
			for b.Loop() {
				k, err := Open(ctx, r, snap.ID, snap.Disks[0], Options{CacheBytes: 256 << 20})
				if err != nil {
					b.Fatal(err)
				}
				for off := int64(0); off < size; off += int64(req) {
					if err := k.ReadAt(ctx, buf, off); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}
