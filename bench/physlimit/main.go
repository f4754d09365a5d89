// Command physlimit measures the physical limit of a Kura-style full backup of
// a raw disk image on this machine: the time to read the image's allocated
// extents (found with SEEK_DATA/SEEK_HOLE) in 1 MiB chunks and, for every
// chunk that is not all zeros, compute a keyed BLAKE3 hash and a zstd level 1
// compression, on N workers (default: 2, both cores of the reference machine).
//
// Nothing is written anywhere: this is the floor for hashing plus compression
// of the same data that the backup tools are given. With -restore FILE it
// also measures the floor of a verifying restore (see restoreResult). It
// prints one JSON line.
//
//	go run ./bench/physlimit [-workers 2] [-chunk 1048576] [-precache] [-restore out.raw] disk.raw
//
// The image should be in the page cache (cat it to /dev/null first, or pass
// -precache) so that the number measures CPU work, not the disk.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/DataDog/zstd"
	"github.com/zeebo/blake3"
)

const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

type extent struct{ off, len int64 }

// dataExtents lists the data regions of f via SEEK_DATA/SEEK_HOLE. A file
// system without support reports the whole file as one data region.
func dataExtents(f *os.File, size int64) ([]extent, error) {
	var out []extent
	var off int64
	for off < size {
		start, err := f.Seek(off, seekData)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break
			}
			if errors.Is(err, syscall.EINVAL) && off == 0 {
				return []extent{{0, size}}, nil
			}
			return nil, fmt.Errorf("SEEK_DATA at %d: %w", off, err)
		}
		end, err := f.Seek(start, seekHole)
		if err != nil {
			return nil, fmt.Errorf("SEEK_HOLE at %d: %w", start, err)
		}
		out = append(out, extent{start, end - start})
		off = end
	}
	return out, nil
}

// chunkIndexes returns the indexes of the chunk-aligned chunks of the disk
// that overlap any data extent, ascending and without duplicates.
func chunkIndexes(exts []extent, chunk int64) []int64 {
	var idx []int64
	last := int64(-1)
	for _, e := range exts {
		first := e.off / chunk
		end := (e.off + e.len + chunk - 1) / chunk
		for i := first; i < end; i++ {
			if i > last {
				idx = append(idx, i)
				last = i
			}
		}
	}
	return idx
}

type result struct {
	Image           string  `json:"image"`
	SizeBytes       int64   `json:"size_bytes"`
	AllocatedBytes  int64   `json:"allocated_bytes"`
	Extents         int     `json:"extents"`
	ChunkSize       int64   `json:"chunk_size"`
	Chunks          int     `json:"chunks"`
	ReadBytes       int64   `json:"read_bytes"`
	NonzeroChunks   int64   `json:"nonzero_chunks"`
	NonzeroBytes    int64   `json:"nonzero_bytes"`
	CompressedBytes int64   `json:"compressed_bytes"`
	Workers         int     `json:"workers"`
	GOMAXPROCS      int     `json:"gomaxprocs"`
	Seconds         float64 `json:"seconds"`
	MBpsRead        float64 `json:"mbps_read"`      // read bytes / s, 10^6
	MBpsAllocated   float64 `json:"mbps_allocated"` // allocated bytes / s
	MBpsLogical     float64 `json:"mbps_logical"`   // disk size / s
	PrecacheSeconds float64 `json:"precache_seconds,omitempty"`
	// Restore is the restore floor (-restore), see restoreResult.
	Restore *restoreResult `json:"restore,omitempty"`
}

func main() {
	workers := flag.Int("workers", 2, "hash+compress workers")
	chunk := flag.Int64("chunk", 1<<20, "chunk size in bytes")
	level := flag.Int("level", 1, "zstd level")
	precache := flag.Bool("precache", false, "read the whole image once before timing (page cache)")
	restoreOut := flag.String("restore", "", "also measure the restore floor, writing the image to this `file` (removed after)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: physlimit [flags] IMAGE\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *workers, *chunk, *level, *precache, *restoreOut); err != nil {
		fmt.Fprintln(os.Stderr, "physlimit:", err)
		os.Exit(1)
	}
}

func run(path string, workers int, chunk int64, level int, precache bool, restoreOut string) error {
	if workers < 1 || chunk < 4096 {
		return errors.New("bad -workers or -chunk")
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	exts, err := dataExtents(f, size)
	if err != nil {
		return err
	}
	var alloc int64
	for _, e := range exts {
		alloc += e.len
	}
	idx := chunkIndexes(exts, chunk)

	res := result{
		Image: path, SizeBytes: size, AllocatedBytes: alloc, Extents: len(exts),
		ChunkSize: chunk, Chunks: len(idx), Workers: workers, GOMAXPROCS: runtime.GOMAXPROCS(0),
	}
	if precache {
		t := time.Now()
		buf := make([]byte, 8<<20)
		for _, e := range exts {
			if _, err := io.CopyBuffer(io.Discard, io.NewSectionReader(f, e.off, e.len), buf); err != nil {
				return err
			}
		}
		res.PrecacheSeconds = time.Since(t).Seconds()
	}

	// A fixed, arbitrary 32-byte key: the cost is what is measured.
	key := bytes.Repeat([]byte{0x6b}, 32)

	var (
		next                        atomic.Int64
		readB, nzChunks, nzB, compB atomic.Int64
		firstErr                    error
		errOnce                     sync.Once
		wg                          sync.WaitGroup
	)
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			dst := make([]byte, zstd.CompressBound(int(chunk)))
			h, err := blake3.NewKeyed(key)
			if err != nil {
				errOnce.Do(func() { firstErr = err })
				return
			}
			var sum [32]byte
			for {
				i := next.Add(1) - 1
				if i >= int64(len(idx)) {
					return
				}
				off := idx[i] * chunk
				n := chunk
				if off+n > size {
					n = size - off
				}
				b := buf[:n]
				if _, err := f.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
					errOnce.Do(func() { firstErr = err })
					return
				}
				readB.Add(n)
				if isZero(b) {
					continue
				}
				h.Reset()
				h.Write(b)
				h.Sum(sum[:0])
				c, err := zstd.CompressLevel(dst, b, level)
				if err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
				nzChunks.Add(1)
				nzB.Add(n)
				compB.Add(int64(len(c)))
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	secs := time.Since(start).Seconds()
	res.Seconds = secs
	res.ReadBytes = readB.Load()
	res.NonzeroChunks = nzChunks.Load()
	res.NonzeroBytes = nzB.Load()
	res.CompressedBytes = compB.Load()
	res.MBpsRead = float64(res.ReadBytes) / secs / 1e6
	res.MBpsAllocated = float64(alloc) / secs / 1e6
	res.MBpsLogical = float64(size) / secs / 1e6
	if restoreOut != "" {
		if res.Restore, err = runRestore(f, size, idx, chunk, workers, key, restoreOut); err != nil {
			return fmt.Errorf("restore floor: %w", err)
		}
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

var zeroBlock [64 << 10]byte

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := len(b)
		if n > len(zeroBlock) {
			n = len(zeroBlock)
		}
		if !bytes.Equal(b[:n], zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
