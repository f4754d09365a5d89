package nbd

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// BenchmarkReadAt reads a 256 MiB qemu-nbd export of a fully allocated raw
// image in 1 MiB requests from 4 goroutines sharing one client. The
// reported MB/s is the client's end-to-end throughput.
func BenchmarkReadAt(b *testing.B) {
	const size, chunk, workers = 256 << 20, 1 << 20, 4
	path := filepath.Join(b.TempDir(), "bench.raw")
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i>>12) | 1
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		b.Fatal(err)
	}
	c := dialT(b, "unix", qemuNBD(b, "raw", path, "--read-only", "--cache=writeback"), Options{})
	ctx := context.Background()
	b.SetBytes(size)
	b.ResetTimer()
	for b.Loop() {
		var next atomic.Int64
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := make([]byte, chunk)
				for {
					off := next.Add(chunk) - chunk
					if off >= size {
						return
					}
					if err := c.ReadAt(ctx, p, off); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
	}
}
