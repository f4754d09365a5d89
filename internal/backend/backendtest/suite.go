// Package backendtest is the conformance suite every backend.Backend must
// pass: a new backend is done when Run passes against it.
package backendtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"

	"github.com/kura-backup/kura/internal/backend"
)

// Run runs the suite against the backend that newBackend returns; each
// subtest gets a fresh, empty backend.
func Run(t *testing.T, newBackend func(t *testing.T) backend.Backend) {
	ctx := context.Background()
	t.Run("SaveLoadRoundTrip", func(t *testing.T) {
		b := newBackend(t)
		data := bytes.Repeat([]byte("kura"), 1000)
		if err := b.Save(ctx, "data/ab/abcd", data); err != nil {
			t.Fatal(err)
		}
		got, err := b.Load(ctx, "data/ab/abcd", 0, 0)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Load whole = %d bytes, %v; want %d bytes", len(got), err, len(data))
		}
		got, err = b.Load(ctx, "data/ab/abcd", 4, 8)
		if err != nil || string(got) != "kurakura" {
			t.Fatalf("Load range = %q, %v", got, err)
		}
		info, err := b.Stat(ctx, "data/ab/abcd")
		if err != nil || info.Size != int64(len(data)) {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
	})
	t.Run("LoadPastEndFails", func(t *testing.T) {
		b := newBackend(t)
		if err := b.Save(ctx, "x", []byte("short")); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Load(ctx, "x", 2, 10); !errors.Is(err, backend.ErrTruncated) {
			t.Fatalf("Load past the end: %v, want ErrTruncated", err)
		}
	})
	t.Run("LoadInto", func(t *testing.T) {
		b := newBackend(t)
		li, ok := b.(backend.LoaderInto)
		if !ok {
			t.Skip("the backend does not implement LoaderInto")
		}
		data := make([]byte, 3<<20+123) // larger than a page-aligned size, so direct reads end past EOF
		for i := range data {
			data[i] = byte(i*7 + i>>12)
		}
		if err := b.Save(ctx, "data/cd/cdef", data); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			name        string
			off, length int64
			buf         []byte
		}{
			{"unaligned buffer", 5, 100, make([]byte, 200)},
			{"aligned, small range", 4097, 1000, backend.AlignedBuffer(1000 + backend.DirectRoom)},
			{"aligned, large range inside a page", 4100, 1 << 20, backend.AlignedBuffer(1<<20 + backend.DirectRoom)},
			{"aligned, to the end", 1<<20 + 3, int64(len(data)) - (1<<20 + 3), backend.AlignedBuffer(len(data) + backend.DirectRoom)},
			{"aligned without room for direct I/O", 4100, 1 << 20, backend.AlignedBuffer(1 << 20)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				got, err := li.LoadInto(ctx, "data/cd/cdef", tc.off, tc.length, tc.buf)
				if err != nil || !bytes.Equal(got, data[tc.off:tc.off+tc.length]) {
					t.Fatalf("LoadInto = %d bytes, %v; want bytes %d..%d", len(got), err, tc.off, tc.off+tc.length)
				}
			})
		}
		if _, err := li.LoadInto(ctx, "data/cd/cdef", int64(len(data))-10, 1<<20, backend.AlignedBuffer(1<<20+backend.DirectRoom)); !errors.Is(err, backend.ErrTruncated) {
			t.Errorf("LoadInto past the end (direct): %v, want ErrTruncated", err)
		}
		if _, err := li.LoadInto(ctx, "data/cd/cdef", int64(len(data))-10, 100, make([]byte, 100)); !errors.Is(err, backend.ErrTruncated) {
			t.Errorf("LoadInto past the end: %v, want ErrTruncated", err)
		}
		if _, err := li.LoadInto(ctx, "missing", 0, 10, make([]byte, 10)); !errors.Is(err, backend.ErrNotFound) {
			t.Errorf("LoadInto of a missing object: %v, want ErrNotFound", err)
		}
	})
	t.Run("NotFound", func(t *testing.T) {
		b := newBackend(t)
		if _, err := b.Load(ctx, "missing", 0, 0); !errors.Is(err, backend.ErrNotFound) {
			t.Errorf("Load: %v, want ErrNotFound", err)
		}
		if _, err := b.Stat(ctx, "missing"); !errors.Is(err, backend.ErrNotFound) {
			t.Errorf("Stat: %v, want ErrNotFound", err)
		}
		if err := b.Remove(ctx, "missing"); !errors.Is(err, backend.ErrNotFound) {
			t.Errorf("Remove: %v, want ErrNotFound", err)
		}
	})
	t.Run("OverwriteReplaces", func(t *testing.T) {
		b := newBackend(t)
		for _, s := range []string{"one", "two-longer"} {
			if err := b.Save(ctx, "locks/l", []byte(s)); err != nil {
				t.Fatal(err)
			}
		}
		got, err := b.Load(ctx, "locks/l", 0, 0)
		if err != nil || string(got) != "two-longer" {
			t.Fatalf("got %q, %v", got, err)
		}
	})
	t.Run("ListByPrefix", func(t *testing.T) {
		b := newBackend(t)
		names := []string{"config", "keys/k1", "data/00/001", "data/ff/ff2", "index/i1", "snapshots/s1"}
		for _, n := range names {
			if err := b.Save(ctx, n, []byte(n)); err != nil {
				t.Fatal(err)
			}
		}
		for _, tc := range []struct {
			prefix string
			want   []string
		}{
			{"data/", []string{"data/00/001", "data/ff/ff2"}},
			{"data/ff/", []string{"data/ff/ff2"}},
			{"keys/", []string{"keys/k1"}},
			{"nothing/", nil},
			{"", names},
		} {
			var got []string
			err := b.List(ctx, tc.prefix, func(oi backend.ObjectInfo) error {
				got = append(got, oi.Name)
				if oi.Size != int64(len(oi.Name)) {
					return fmt.Errorf("%s: size %d", oi.Name, oi.Size)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			want := append([]string(nil), tc.want...)
			sort.Strings(got)
			sort.Strings(want)
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("List(%q) = %v, want %v", tc.prefix, got, want)
			}
		}
	})
	t.Run("RemoveThenGone", func(t *testing.T) {
		b := newBackend(t)
		if err := b.Save(ctx, "snapshots/s", []byte("x")); err != nil {
			t.Fatal(err)
		}
		if err := b.Remove(ctx, "snapshots/s"); err != nil {
			t.Fatal(err)
		}
		n := 0
		_ = b.List(ctx, "snapshots/", func(backend.ObjectInfo) error { n++; return nil })
		if n != 0 {
			t.Fatalf("%d objects listed after Remove", n)
		}
	})
	t.Run("ConcurrentSaves", func(t *testing.T) {
		b := newBackend(t)
		var wg sync.WaitGroup
		errs := make(chan error, 32)
		for i := 0; i < 32; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				name := fmt.Sprintf("data/%02x/obj%d", i%4, i)
				if err := b.Save(ctx, name, bytes.Repeat([]byte{byte(i)}, 4096)); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		n := 0
		_ = b.List(ctx, "data/", func(backend.ObjectInfo) error { n++; return nil })
		if n != 32 {
			t.Fatalf("listed %d objects, want 32", n)
		}
	})
	t.Run("InvalidNamesRejected", func(t *testing.T) {
		b := newBackend(t)
		for _, n := range []string{"", "/abs", "../escape", "a/../b"} {
			if err := b.Save(ctx, n, []byte("x")); err == nil {
				t.Errorf("Save(%q) succeeded", n)
			}
		}
	})
}
