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

// LargeObjectSize is the size of the suite's large object: above the
// multipart threshold an S3 backend is given in its tests (set it lower
// than that), 3 parts of 5 MiB and a bit.
const LargeObjectSize = 12<<20 + 4321

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
		for _, tc := range []struct {
			off, length int64
			want        string // "" for ErrTruncated
		}{
			{0, 5, "short"},
			{3, 2, "rt"},   // up to the last byte exactly
			{4, 1, "t"},    // the last byte
			{1, 0, "hort"}, // to the end
			{0, 6, ""},     // one byte too many: S3 would clamp it silently
			{5, 1, ""},     // starts at the end
			{9, 1, ""},     // starts past the end
			{6, 0, ""},     // to the end, from past it
		} {
			got, err := b.Load(ctx, "x", tc.off, tc.length)
			switch {
			case tc.want == "" && !errors.Is(err, backend.ErrTruncated):
				t.Errorf("Load(%d, %d) = %q, %v; want ErrTruncated", tc.off, tc.length, got, err)
			case tc.want != "" && (err != nil || string(got) != tc.want):
				t.Errorf("Load(%d, %d) = %q, %v; want %q", tc.off, tc.length, got, err, tc.want)
			}
		}
	})
	t.Run("EmptyObject", func(t *testing.T) {
		b := newBackend(t)
		if err := b.Save(ctx, "locks/empty", nil); err != nil {
			t.Fatal(err)
		}
		got, err := b.Load(ctx, "locks/empty", 0, 0)
		if err != nil || len(got) != 0 {
			t.Fatalf("Load = %q, %v", got, err)
		}
		if info, err := b.Stat(ctx, "locks/empty"); err != nil || info.Size != 0 {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
	})
	t.Run("LargeObject", func(t *testing.T) {
		// Larger than an S3 backend's multipart threshold in its tests,
		// and not a multiple of a part.
		b := newBackend(t)
		data := make([]byte, LargeObjectSize)
		for i := range data {
			data[i] = byte(i*31 + i>>16)
		}
		if err := b.Save(ctx, "data/la/large", data); err != nil {
			t.Fatal(err)
		}
		got, err := b.Load(ctx, "data/la/large", 0, 0)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Load whole = %d bytes, %v; want %d bytes back", len(got), err, len(data))
		}
		off := int64(5<<20 - 100) // across a 5 MiB part boundary
		got, err = b.Load(ctx, "data/la/large", off, 200)
		if err != nil || !bytes.Equal(got, data[off:off+200]) {
			t.Fatalf("Load across a part boundary = %d bytes, %v", len(got), err)
		}
		if info, err := b.Stat(ctx, "data/la/large"); err != nil || info.Size != int64(len(data)) {
			t.Fatalf("Stat = %+v, %v", info, err)
		}
		// Saving the same bytes again (a retried Save) succeeds.
		if err := b.Save(ctx, "data/la/large", data); err != nil {
			t.Fatalf("Save of the same bytes again: %v", err)
		}
	})
	t.Run("SaveAgain", func(t *testing.T) {
		// A write-once name saved again with the same bytes succeeds (a
		// retried Save whose first answer was lost); with other bytes the
		// backend either replaces the object or refuses with ErrExists and
		// keeps the old bytes.
		b := newBackend(t)
		for _, name := range []string{"config", "keys/k", "data/ab/abab", "index/i", "snapshots/s", "locks/l", "gc/g"} {
			if err := b.Save(ctx, name, []byte("first")); err != nil {
				t.Fatal(err)
			}
			if err := b.Save(ctx, name, []byte("first")); err != nil {
				t.Errorf("Save(%s) of the same bytes again: %v", name, err)
			}
			err := b.Save(ctx, name, []byte("other"))
			got, lerr := b.Load(ctx, name, 0, 0)
			switch {
			case lerr != nil:
				t.Errorf("Load(%s): %v", name, lerr)
			case err == nil && string(got) != "other":
				t.Errorf("Save(%s) of other bytes succeeded, Load = %q", name, got)
			case err != nil && (!backend.WriteOnce(name) || !errors.Is(err, backend.ErrExists)):
				t.Errorf("Save(%s) of other bytes: %v (write-once: %v)", name, err, backend.WriteOnce(name))
			case err != nil && string(got) != "first":
				t.Errorf("Save(%s) refused, but Load = %q", name, got)
			}
		}
	})
	t.Run("ListMany", func(t *testing.T) {
		// More than one page of an S3 listing (1000 keys).
		b := newBackend(t)
		const n = 1100
		names := make(chan string)
		errs := make(chan error, 8)
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for name := range names {
					if err := b.Save(ctx, name, []byte("x")); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		for i := range n {
			names <- fmt.Sprintf("index/%04d", i)
		}
		close(names)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		err := b.List(ctx, "index/", func(oi backend.ObjectInfo) error {
			if seen[oi.Name] {
				return fmt.Errorf("%s listed twice", oi.Name)
			}
			seen[oi.Name] = true
			return nil
		})
		if err != nil || len(seen) != n {
			t.Fatalf("List = %d objects, %v; want %d", len(seen), err, n)
		}
		stop := errors.New("stop")
		count := 0
		err = b.List(ctx, "index/", func(backend.ObjectInfo) error {
			count++
			if count == 10 {
				return stop
			}
			return nil
		})
		if !errors.Is(err, stop) || count != 10 {
			t.Fatalf("List stopped by fn: %v after %d objects", err, count)
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
			{"snap", []string{"snapshots/s1"}},
			{"data/f", []string{"data/ff/ff2"}},
			{"con", []string{"config"}},
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
