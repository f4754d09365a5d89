package restore

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backup"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
)

// BenchmarkRestoreDense restores a fully allocated 256 MiB disk (data
// compressing about 2:1, default chunk and pack sizes) into a sparse raw
// file: the dense case must not pay for sparse maps.
func BenchmarkRestoreDense(b *testing.B) {
	ctx := context.Background()
	const size = 256 << 20
	src := &memDisk{data: make([]byte, size)}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range src.data {
		src.data[i] = "abcdefghijklmnop"[rng.IntN(16)]
	}
	be, _ := local.Open(filepath.Join(b.TempDir(), "repo"))
	r, err := repo.Init(ctx, be, []byte("pw"), repo.InitOptions{KDF: &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("0123456789abcdef")}})
	if err != nil {
		b.Fatal(err)
	}
	snap, err := backup.Run(ctx, r, []source.Disk{src}, backup.Options{Name: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	b.SetBytes(size)
	for b.Loop() {
		t, err := NewRawFile(filepath.Join(dir, "disk.raw"), size, true)
		if err != nil {
			b.Fatal(err)
		}
		if err := Disk(ctx, r, snap.Disks[0], t, Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
