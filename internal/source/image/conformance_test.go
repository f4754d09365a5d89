package image

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/kura-backup/kura/internal/source/sourcetest"
)

// TestConformance runs the source.Disk conformance suite on a raw sparse
// file whose size is not a multiple of any block size, and on qcow2 and
// vmdk images of the reference disk.
func TestConformance(t *testing.T) {
	t.Run("raw, odd size", func(t *testing.T) {
		const size = 32<<20 + 3000
		data := make([]byte, size)
		rng := rand.New(rand.NewPCG(5, 6))
		runs := []struct{ off, n int64 }{{4096, 4096}, {1<<20 + 7, 70000}, {9 << 20, 2 << 20}, {size - 5000, 5000}}
		for _, r := range runs {
			for i := r.off; i < r.off+r.n; i++ {
				data[i] = byte(rng.IntN(255) + 1)
			}
		}
		path := filepath.Join(t.TempDir(), "odd.img")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		err = f.Truncate(size)
		for _, r := range runs {
			if err == nil {
				_, err = f.WriteAt(data[r.off:r.off+r.n], r.off)
			}
		}
		if err == nil {
			_, err = f.WriteAt(make([]byte, 1<<20), 20<<20) // allocated zeros
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
		sourcetest.TestDisk(t, open(t, path, Options{}), sourcetest.BytesReference("odd", "raw", data))
	})
	raw, want := reference(t)
	t.Run("raw", func(t *testing.T) {
		sourcetest.TestDisk(t, open(t, raw, Options{Format: "raw"}), sourcetest.BytesReference("disk", "raw", want))
	})
	t.Run("qcow2", func(t *testing.T) {
		img := convert(t, raw, "qcow2")
		sourcetest.TestDisk(t, open(t, img, Options{}), sourcetest.BytesReference("disk", "qcow2", want))
	})
	t.Run("vmdk", func(t *testing.T) {
		img := convert(t, raw, "vmdk")
		sourcetest.TestDisk(t, open(t, img, Options{}), sourcetest.BytesReference("disk", "vmdk", want))
	})
}
