package main

import (
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/DataDog/zstd"
	"github.com/zeebo/blake3"
)

// restoreResult is the floor of a restore of the same image: every
// non-zero chunk, compressed with zstd level 1 and sealed with AES-256-GCM
// beforehand (not timed), is opened, decompressed and checked against its
// keyed BLAKE3 hash on N workers (DecodeSeconds), and then the same again
// with each chunk written at its offset into a fresh sparse file that is
// fsynced at the end (WriteSeconds): what a restore that verifies every
// chunk cannot do faster on this machine.
type restoreResult struct {
	Chunks        int     `json:"chunks"`
	DataBytes     int64   `json:"data_bytes"`
	SealedBytes   int64   `json:"sealed_bytes"`
	Workers       int     `json:"workers"`
	DecodeSeconds float64 `json:"decode_seconds"`
	WriteSeconds  float64 `json:"write_seconds"` // decode + pwrite + fsync
	Output        string  `json:"output"`
}

type sealedChunk struct {
	off  int64
	n    int
	data []byte // nonce || AES-GCM(zstd(chunk))
	sum  [32]byte
}

func runRestore(f *os.File, size int64, idx []int64, chunk int64, workers int, key []byte, out string) (*restoreResult, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	// Prepare (not timed): the sealed chunks, as a repository holds them.
	var chunks []sealedChunk
	buf := make([]byte, chunk)
	dst := make([]byte, zstd.CompressBound(int(chunk)))
	h, err := blake3.NewKeyed(key)
	if err != nil {
		return nil, err
	}
	res := &restoreResult{Workers: workers, Output: out}
	for _, i := range idx {
		off := i * chunk
		n := min(chunk, size-off)
		b := buf[:n]
		if _, err := f.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		if isZero(b) {
			continue
		}
		c, err := zstd.CompressLevel(dst, b, 1)
		if err != nil {
			return nil, err
		}
		nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(c)+aead.Overhead())
		nonce[0], nonce[1] = byte(i), byte(i>>8) // unique enough for a benchmark
		sc := sealedChunk{off: off, n: int(n), data: aead.Seal(nonce, nonce, c, nil)}
		h.Reset()
		h.Write(b)
		h.Sum(sc.sum[:0])
		chunks = append(chunks, sc)
		res.DataBytes += n
		res.SealedBytes += int64(len(sc.data))
	}
	res.Chunks = len(chunks)

	pass := func(w *os.File) (float64, error) {
		var next atomic.Int64
		var firstErr error
		var once sync.Once
		var wg sync.WaitGroup
		start := time.Now()
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				plain := make([]byte, chunk)
				opened := make([]byte, 0, zstd.CompressBound(int(chunk)))
				h, _ := blake3.NewKeyed(key)
				var sum [32]byte
				fail := func(err error) { once.Do(func() { firstErr = err }) }
				for {
					i := next.Add(1) - 1
					if i >= int64(len(chunks)) {
						return
					}
					sc := &chunks[i]
					ns := aead.NonceSize()
					c, err := aead.Open(opened[:0], sc.data[:ns], sc.data[ns:], nil)
					if err != nil {
						fail(err)
						return
					}
					n, err := zstd.DecompressInto(plain, c)
					if err != nil || n != sc.n {
						fail(fmt.Errorf("decompress: %v (%d bytes)", err, n))
						return
					}
					p := plain[:n]
					h.Reset()
					h.Write(p)
					if h.Sum(sum[:0]); sum != sc.sum {
						fail(errors.New("hash mismatch"))
						return
					}
					if w != nil {
						if _, err := w.WriteAt(p, sc.off); err != nil {
							fail(err)
							return
						}
					}
				}
			}()
		}
		wg.Wait()
		if firstErr == nil && w != nil {
			firstErr = w.Sync()
		}
		return time.Since(start).Seconds(), firstErr
	}
	if res.DecodeSeconds, err = pass(nil); err != nil {
		return nil, err
	}
	os.Remove(out)
	w, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	defer os.Remove(out)
	defer w.Close()
	if err := w.Truncate(size); err != nil {
		return nil, err
	}
	if res.WriteSeconds, err = pass(w); err != nil {
		return nil, err
	}
	return res, nil
}
