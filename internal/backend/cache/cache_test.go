package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/backendtest"
	"github.com/kura-backup/kura/internal/backend/local"
)

// counting counts the calls that reach the wrapped backend, per method
// and object name.
type counting struct {
	backend.Backend
	mu    sync.Mutex
	calls map[string]int // "load config", "list index/", …
}

func newCounting(t *testing.T) *counting {
	be, err := local.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return &counting{Backend: be, calls: map[string]int{}}
}

func (c *counting) count(op, name string) {
	c.mu.Lock()
	c.calls[op+" "+name]++
	c.mu.Unlock()
}

func (c *counting) get(op, name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls[op+" "+name]
}

// total returns the calls of op on every name.
func (c *counting) total(op string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for k, v := range c.calls {
		if strings.HasPrefix(k, op+" ") {
			n += v
		}
	}
	return n
}

func (c *counting) Load(ctx context.Context, name string, off, length int64) ([]byte, error) {
	c.count("load", name)
	return c.Backend.Load(ctx, name, off, length)
}

func (c *counting) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	c.count("list", prefix)
	return c.Backend.List(ctx, prefix, fn)
}

func (c *counting) Save(ctx context.Context, name string, data []byte) error {
	c.count("save", name)
	return c.Backend.Save(ctx, name, data)
}

func (c *counting) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	c.count("stat", name)
	return c.Backend.Stat(ctx, name)
}

func (c *counting) Remove(ctx context.Context, name string) error {
	c.count("remove", name)
	return c.Backend.Remove(ctx, name)
}

func newCache(t *testing.T, be backend.Backend, dir string) *Backend {
	t.Helper()
	b, err := New(be, dir, be.Location(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// content is what the tests store under name: different names, different
// lengths.
func content(name string) []byte {
	return bytes.Repeat([]byte(name+";"), 1+len(name)%7)
}

func TestConformance(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backend.Backend {
		return newCache(t, newCounting(t), t.TempDir())
	})
}

func TestCached(t *testing.T) {
	for name, want := range map[string]bool{
		"config": true, "keys/k": true, "index/i": true, "snapshots/s": true, "damage/d": true, "bootchecks/s-r": true,
		"data/ab/abcd": false, "locks/l": false, "gc/g": false, "index/": false, "configx": false,
		"index/../data/x": false, "keys//k": false,
	} {
		if got := Cached(name); got != want {
			t.Errorf("Cached(%q) = %v, want %v", name, got, want)
		}
	}
}

// TestLoadsHitTheStoreOnce: a cached name is loaded from the store once,
// by the first of several decorators on the same directory (the next
// process); the config once per decorator.
func TestLoadsHitTheStoreOnce(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	dir := t.TempDir()
	names := []string{"config", "keys/k1", "index/i1", "index/i2", "snapshots/s1", "damage/d1", "bootchecks/s1-r1"}
	for _, n := range names {
		if err := store.Backend.Save(ctx, n, content(n)); err != nil {
			t.Fatal(err)
		}
	}
	for run := range 3 {
		b := newCache(t, store, dir)
		for range 2 {
			for _, n := range names {
				got, err := b.Load(ctx, n, 0, 0)
				if err != nil || !bytes.Equal(got, content(n)) {
					t.Fatalf("run %d: Load(%s) = %q, %v", run, n, got, err)
				}
				// A range of a cached object comes from the cache too.
				got, err = b.Load(ctx, n, 2, 3)
				if err != nil || !bytes.Equal(got, content(n)[2:5]) {
					t.Fatalf("run %d: Load(%s, 2, 3) = %q, %v", run, n, got, err)
				}
				buf := make([]byte, 0, 64)
				got, err = b.LoadInto(ctx, n, 1, 4, buf)
				if err != nil || !bytes.Equal(got, content(n)[1:5]) {
					t.Fatalf("run %d: LoadInto(%s, 1, 4) = %q, %v", run, n, got, err)
				}
			}
		}
		if _, err := b.Load(ctx, "index/i1", 0, 1000); !errors.Is(err, backend.ErrTruncated) {
			t.Fatalf("a cached range past the end: %v, want ErrTruncated", err)
		}
	}
	for _, n := range names {
		want := 1
		if n == "config" {
			want = 3 // checked once by each decorator
		}
		if got := store.get("load", n); got != want {
			t.Errorf("%s loaded from the store %d times, want %d", n, got, want)
		}
	}
}

// TestNeverCached: pack files, lock records and pending deletions always
// come from the store and leave nothing in the cache.
func TestNeverCached(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	dir := t.TempDir()
	b := newCache(t, store, dir)
	names := []string{"data/ab/abcd", "locks/l1", "gc/g1"}
	for _, n := range names {
		if err := b.Save(ctx, n, content(n)); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		for _, n := range names {
			if got, err := b.Load(ctx, n, 0, 0); err != nil || !bytes.Equal(got, content(n)) {
				t.Fatalf("Load(%s) = %q, %v", n, got, err)
			}
			if got, err := b.LoadInto(ctx, n, 0, 4, make([]byte, 4)); err != nil || !bytes.Equal(got, content(n)[:4]) {
				t.Fatalf("LoadInto(%s) = %q, %v", n, got, err)
			}
		}
	}
	// A lock record is rewritten in place: the next load sees it.
	if err := b.Save(ctx, "locks/l1", []byte("refreshed")); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Load(ctx, "locks/l1", 0, 0); string(got) != "refreshed" {
		t.Fatalf("lock record = %q after it was rewritten", got)
	}
	for _, n := range names {
		if got := store.get("load", n); got < 6 {
			t.Errorf("%s loaded from the store %d times, want every time (6+)", n, got)
		}
	}
	if files := cacheFiles(t, dir); len(files) != 0 {
		t.Errorf("the cache holds %v", files)
	}
}

// cacheFiles lists the object names in a cache directory.
func cacheFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	objects := filepath.Join(dir, objectsDir)
	err := filepath.WalkDir(objects, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(objects, p)
			out = append(out, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return out
}

// TestSaveAndRemove: Save writes through and fills the cache; Remove
// removes both.
func TestSaveAndRemove(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	b := newCache(t, store, t.TempDir())
	if err := b.Save(ctx, "snapshots/s1", content("snapshots/s1")); err != nil {
		t.Fatal(err)
	}
	if got, err := store.Backend.Load(ctx, "snapshots/s1", 0, 0); err != nil || !bytes.Equal(got, content("snapshots/s1")) {
		t.Fatalf("the store holds %q, %v", got, err)
	}
	if got, err := b.Load(ctx, "snapshots/s1", 0, 0); err != nil || !bytes.Equal(got, content("snapshots/s1")) {
		t.Fatalf("Load = %q, %v", got, err)
	}
	if n := store.get("load", "snapshots/s1"); n != 0 {
		t.Errorf("a saved object was loaded from the store %d times", n)
	}
	if err := b.Remove(ctx, "snapshots/s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Load(ctx, "snapshots/s1", 0, 0); !errors.Is(err, backend.ErrNotFound) {
		t.Fatalf("Load after Remove: %v, want ErrNotFound", err)
	}
	if files := cacheFiles(t, b.Dir()); len(files) != 0 {
		t.Errorf("the cache holds %v after Remove", files)
	}
}

// TestListDropsDeleted: objects removed from the store behind the cache's
// back (a prune on another host) leave the cache at the next listing;
// the listing asks the store every time.
func TestListDropsDeleted(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	b := newCache(t, store, t.TempDir())
	for _, n := range []string{"index/a", "index/b", "index/c", "snapshots/s", "keys/k", "config"} {
		if err := b.Save(ctx, n, content(n)); err != nil {
			t.Fatal(err)
		}
	}
	backdate(t, b.Dir())
	// Another host prunes: index/b and the snapshot go.
	for _, n := range []string{"index/b", "snapshots/s"} {
		if err := store.Backend.Remove(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	var listed []string
	if err := b.List(ctx, "index/", func(oi backend.ObjectInfo) error {
		listed = append(listed, oi.Name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(listed) != 2 {
		t.Fatalf("listed %v", listed)
	}
	want := "config index/a index/c keys/k snapshots/s" // index/ listed; snapshots/ not yet
	if got := strings.Join(sorted(cacheFiles(t, b.Dir())), " "); got != want {
		t.Fatalf("cache after listing index/: %s, want %s", got, want)
	}
	// A prefix inside a namespace drops only under it.
	if err := b.List(ctx, "snapshots/x", func(backend.ObjectInfo) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(sorted(cacheFiles(t, b.Dir())), " "); got != want {
		t.Fatalf("cache after listing snapshots/x: %s, want %s", got, want)
	}
	// Listing everything drops the rest.
	if err := b.List(ctx, "", func(backend.ObjectInfo) error { return nil }); err != nil {
		t.Fatal(err)
	}
	want = "config index/a index/c keys/k"
	if got := strings.Join(sorted(cacheFiles(t, b.Dir())), " "); got != want {
		t.Fatalf("cache after listing everything: %s, want %s", got, want)
	}
	if _, err := b.Load(ctx, "index/b", 0, 0); !errors.Is(err, backend.ErrNotFound) {
		t.Fatalf("Load of a pruned index file: %v, want ErrNotFound", err)
	}
	if n := store.get("list", "index/"); n != 1 {
		t.Errorf("index/ listed %d times in the store, want 1", n)
	}
	// A listing stopped by fn drops nothing.
	if err := store.Backend.Remove(ctx, "index/c"); err != nil {
		t.Fatal(err)
	}
	stop := errors.New("stop")
	if err := b.List(ctx, "index/", func(backend.ObjectInfo) error { return stop }); !errors.Is(err, stop) {
		t.Fatalf("List = %v, want fn's error", err)
	}
	if files := cacheFiles(t, b.Dir()); !contains(files, "index/c") {
		t.Errorf("an incomplete listing dropped index/c: %v", files)
	}
}

// TestListKeepsNewCopies: a copy written after a listing began (a backup
// that saved its index meanwhile) is not dropped by it.
func TestListKeepsNewCopies(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	b := newCache(t, store, t.TempDir())
	if err := b.Save(ctx, "index/a", content("index/a")); err != nil {
		t.Fatal(err)
	}
	backdate(t, b.Dir())
	err := b.List(ctx, "index/", func(backend.ObjectInfo) error {
		// Saved to the store and the cache while the listing runs; the
		// store's listing has passed it.
		b.put("index/z", content("index/z"))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files := cacheFiles(t, b.Dir()); !contains(files, "index/z") {
		t.Errorf("a copy written during the listing was dropped: %v", files)
	}
}

// TestSizeMismatchReloads: a cached copy whose size differs from the
// store's listing is dropped and loaded again.
func TestSizeMismatchReloads(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	b := newCache(t, store, t.TempDir())
	if err := b.Save(ctx, "keys/k", []byte("old key file")); err != nil {
		t.Fatal(err)
	}
	// The store's object has other bytes (not something kura does: a
	// stand-in for a cache that went wrong).
	if err := store.Backend.Save(ctx, "keys/k", []byte("the store's key file")); err != nil {
		t.Fatal(err)
	}
	var loaded []byte
	if err := b.List(ctx, "keys/", func(oi backend.ObjectInfo) error {
		var err error
		loaded, err = b.Load(ctx, oi.Name, 0, 0)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if string(loaded) != "the store's key file" {
		t.Fatalf("loaded %q during the listing, want the store's bytes", loaded)
	}
	if got, _ := b.Load(ctx, "keys/k", 0, 0); string(got) != "the store's key file" {
		t.Fatalf("Load = %q", got)
	}
	if n := store.get("load", "keys/k"); n != 1 {
		t.Errorf("loaded from the store %d times, want 1", n)
	}
	// Stat does the same.
	if err := store.Backend.Save(ctx, "keys/k", []byte("again other bytes")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stat(ctx, "keys/k"); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Load(ctx, "keys/k", 0, 0); string(got) != "again other bytes" {
		t.Fatalf("Load after Stat = %q", got)
	}
}

// TestDamagedCopy: a cache file cut short, changed, emptied or replaced
// never reaches the caller: it is removed and the object reloaded.
func TestDamagedCopy(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		damage func([]byte) []byte
	}{
		{"truncated", func(b []byte) []byte { return b[:len(b)-3] }},
		{"one bit", func(b []byte) []byte { b[len(b)-5] ^= 4; return b }},
		{"empty", func([]byte) []byte { return nil }},
		{"header only", func(b []byte) []byte { return b[:headerLen] }},
		{"no header", func(b []byte) []byte { return b[headerLen:] }},
		{"longer", func(b []byte) []byte { return append(b, 'x') }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := newCounting(t)
			b := newCache(t, store, t.TempDir())
			name := "index/0123"
			data := content(name)
			if err := b.Save(ctx, name, data); err != nil {
				t.Fatal(err)
			}
			p := b.path(name)
			raw, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, tc.damage(raw), 0o600); err != nil {
				t.Fatal(err)
			}
			for range 2 {
				got, err := b.Load(ctx, name, 0, 0)
				if err != nil || !bytes.Equal(got, data) {
					t.Fatalf("Load = %q, %v; want the store's bytes", got, err)
				}
			}
			if n := store.get("load", name); n != 1 {
				t.Errorf("loaded from the store %d times, want 1 (and then from the repaired cache)", n)
			}
		})
	}
}

// TestConfigReplaced: a repository deleted and created anew at the same
// location has another config: the next process sees the new one, and
// the old repository's cached objects go.
func TestConfigReplaced(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	dir := t.TempDir()
	b := newCache(t, store, dir)
	for _, n := range []string{"config", "keys/old", "snapshots/old"} {
		if err := b.Save(ctx, n, content(n)); err != nil {
			t.Fatal(err)
		}
	}
	// Another host deletes the repository and creates a new one.
	for _, n := range []string{"config", "keys/old", "snapshots/old"} {
		if err := store.Backend.Remove(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"config", "keys/new"} {
		if err := store.Backend.Save(ctx, n, []byte("new repository's "+n)); err != nil {
			t.Fatal(err)
		}
	}
	b2 := newCache(t, store, dir)
	if got, err := b2.Load(ctx, "config", 0, 0); err != nil || string(got) != "new repository's config" {
		t.Fatalf("Load(config) = %q, %v", got, err)
	}
	if got := strings.Join(cacheFiles(t, dir), " "); got != "config" {
		t.Fatalf("cache after the config changed: %s, want only the new config", got)
	}
	if got, err := b2.Load(ctx, "config", 0, 0); err != nil || string(got) != "new repository's config" {
		t.Fatalf("Load(config) again = %q, %v", got, err)
	}
	if n := store.get("load", "config"); n != 1 {
		t.Errorf("config loaded from the store %d times, want 1", n)
	}
}

// TestFilesAndModes: 0700 directories, 0600 files, the location file,
// no temporary files left.
func TestFilesAndModes(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	dir := filepath.Join(t.TempDir(), "repos", "x")
	b, err := New(store, dir, "s3:http://127.0.0.1:9/bucket/prefix", nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"config", "index/i", "bootchecks/s-r"} {
		if err := b.Save(ctx, n, content(n)); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := os.ReadFile(filepath.Join(dir, LocationFile)); err != nil || string(got) != "s3:http://127.0.0.1:9/bucket/prefix\n" {
		t.Fatalf("location file: %q, %v", got, err)
	}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		want := fs.FileMode(0o600)
		if d.IsDir() {
			want = 0o700 | fs.ModeDir
		}
		if info.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, info.Mode(), want)
		}
		if strings.HasPrefix(d.Name(), tmpPrefix) {
			t.Errorf("temporary file left: %s", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// A stale temporary file of a killed process goes at the next listing.
	stale := filepath.Join(dir, objectsDir, "index", tmpPrefix+"123")
	if err := os.WriteFile(stale, []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-2 * staleTemp)
	if err := os.Chtimes(stale, old, old); err != nil {
		t.Fatal(err)
	}
	if err := b.List(ctx, "index/", func(backend.ObjectInfo) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temporary file still there: %v", err)
	}
	// A dropped cache a killed process did not finish removing goes when
	// the next one opens the cache.
	dropped := filepath.Join(dir, tmpPrefix+"drop-x")
	if err := os.MkdirAll(filepath.Join(dropped, "index"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(dropped, old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := New(store, dir, "s3:http://127.0.0.1:9/bucket/prefix", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dropped); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale dropped cache still there: %v", err)
	}
}

func TestRoot(t *testing.T) {
	env := func(kv ...string) func(string) string {
		return func(k string) string {
			for i := 0; i+1 < len(kv); i += 2 {
				if kv[i] == k {
					return kv[i+1]
				}
			}
			return ""
		}
	}
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"KURA_CACHE_DIR", "/c", "XDG_CACHE_HOME", "/x", "HOME", "/h"}, "/c"},
		{[]string{"XDG_CACHE_HOME", "/x", "HOME", "/h"}, "/x/kura/repos"},
		{[]string{"XDG_CACHE_HOME", "relative", "HOME", "/h"}, "/h/.cache/kura/repos"},
		{[]string{"HOME", "/h"}, "/h/.cache/kura/repos"},
		{nil, ""},
	} {
		if got := Root(env(tc.env...)); got != tc.want {
			t.Errorf("Root(%v) = %q, want %q", tc.env, got, tc.want)
		}
	}
	if Dir("/r", "s3:http://h/b") == Dir("/r", "s3:http://h/b/p") || filepath.Dir(Dir("/r", "x")) != "/r" {
		t.Errorf("Dir: %s %s", Dir("/r", "s3:http://h/b"), Dir("/r", "s3:http://h/b/p"))
	}
}

// TestConcurrentProcesses: two decorators on one cache directory (two
// processes) save, load, list and remove at once; every load returns the
// store's bytes. Run with -race.
func TestConcurrentProcesses(t *testing.T) {
	ctx := context.Background()
	store := newCounting(t)
	dir := t.TempDir()
	bs := []*Backend{newCache(t, store, dir), newCache(t, store, dir)}
	spaces := []string{"index/", "snapshots/", "keys/"}
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := range 8 {
		b := bs[w%2]
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := range 300 {
				name := fmt.Sprintf("%s%02d", spaces[rng.IntN(len(spaces))], rng.IntN(24))
				var err error
				switch op := rng.IntN(10); {
				case op < 3:
					err = b.Save(ctx, name, content(name))
				case op < 8:
					var got []byte
					got, err = b.Load(ctx, name, 0, 0)
					if err == nil && !bytes.Equal(got, content(name)) {
						err = fmt.Errorf("worker %d, step %d: Load(%s) = %q", w, i, name, got)
					}
					if errors.Is(err, backend.ErrNotFound) {
						err = nil
					}
				case op < 9:
					err = b.List(ctx, spaces[rng.IntN(len(spaces))], func(oi backend.ObjectInfo) error {
						got, err := b.Load(ctx, oi.Name, 0, 0)
						if err == nil && !bytes.Equal(got, content(oi.Name)) {
							return fmt.Errorf("worker %d, step %d: Load(%s) while listing = %q", w, i, oi.Name, got)
						}
						if errors.Is(err, backend.ErrNotFound) {
							return nil // removed since it was listed
						}
						return err
					})
				default:
					err = b.Remove(ctx, name)
					if errors.Is(err, backend.ErrNotFound) {
						err = nil
					}
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// Whatever the interleaving, the cache holds only what the store
	// does, after a listing: every copy a removal raced with was written
	// before it, more than the listing's margin ago once backdated.
	backdate(t, dir)
	for _, s := range spaces {
		if err := bs[0].List(ctx, s, func(backend.ObjectInfo) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range cacheFiles(t, dir) {
		if _, err := store.Backend.Stat(ctx, n); err != nil {
			t.Errorf("the cache holds %s, the store: %v", n, err)
		}
		got, ok := bs[1].get(n)
		if !ok || !bytes.Equal(got, content(n)) {
			t.Errorf("cached %s = %q, %v", n, got, ok)
		}
	}
}

// backdate makes every cache file look written a minute ago, as if by an
// earlier command.
func backdate(t *testing.T, dir string) {
	t.Helper()
	old := time.Now().Add(-time.Minute)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			err = os.Chtimes(p, old, old)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func sorted(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

func contains(s []string, x string) bool { return slices.Contains(s, x) }
