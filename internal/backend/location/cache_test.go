package location

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/cache"
	"github.com/kura-backup/kura/internal/backend/limit"
	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backend/retry"
	"github.com/kura-backup/kura/internal/backend/s3"
	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
)

// TestCacheChain: an S3 location gets the metadata cache outside every
// other decorator, in the directory of its location under the cache
// root; not with NoCache, nor without a cache root, nor for a view as of
// a time; a local directory never.
func TestCacheChain(t *testing.T) {
	srv := servers.Get(t, s3test.VersityGW)
	ctx := context.Background()
	loc := srv.Location(srv.Bucket, "chain")
	root := t.TempDir()
	env := envOf(append(srv.Env(), "KURA_CACHE_DIR="+root)...)

	be, err := Open(ctx, loc+"?region=us-east-1", Options{Getenv: env, UploadLimit: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	cb, ok := be.(*cache.Backend)
	if !ok {
		t.Fatalf("Open = %T, want the cache decorator", be)
	}
	if _, ok := cb.Unwrap().(*limit.Backend); !ok {
		t.Fatalf("the cache wraps %T, want the limit decorator", cb.Unwrap())
	}
	// The location's parameters do not change its cache.
	want, err := CacheDir(loc, Options{Getenv: env})
	if err != nil || cb.Dir() != want || filepath.Dir(want) != root {
		t.Fatalf("cache dir %s, CacheDir = %s, %v; root %s", cb.Dir(), want, err, root)
	}
	if got, err := os.ReadFile(filepath.Join(want, cache.LocationFile)); err != nil || string(got) != loc+"\n" {
		t.Fatalf("location file: %q, %v", got, err)
	}
	if other, _ := CacheDir(srv.Location(srv.Bucket, "other"), Options{Getenv: env}); other == want {
		t.Fatal("two prefixes share a cache directory")
	}
	// An explicit root wins over the environment.
	root2 := t.TempDir()
	be, err = Open(ctx, loc, Options{Getenv: env, CacheDir: root2})
	if err != nil {
		t.Fatal(err)
	}
	if cb, ok := be.(*cache.Backend); !ok || filepath.Dir(cb.Dir()) != root2 {
		t.Fatalf("Open with CacheDir = %T", be)
	}
	for name, tc := range map[string]struct {
		loc  string
		opts Options
	}{
		"NoCache":       {loc, Options{Getenv: env, NoCache: true}},
		"no cache root": {loc, Options{Getenv: envOf(srv.Env()...)}},
		"as-of":         {loc + "?as-of=" + time.Now().UTC().Format(time.RFC3339), Options{Getenv: env}},
	} {
		be, err := Open(ctx, tc.loc, tc.opts)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := be.(*retry.Backend); !ok {
			t.Errorf("%s: Open = %T, want the retry decorator only", name, be)
		}
	}
	dir := t.TempDir()
	be, err = Open(ctx, dir, Options{Getenv: env})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := be.(*local.Backend); !ok {
		t.Errorf("a local directory: Open = %T, want no decorator", be)
	}
	// A cache root that cannot be created: no cache, no failure.
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	be, err = Open(ctx, loc, Options{Getenv: env, CacheDir: file})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := be.(*retry.Backend); !ok {
		t.Errorf("an unusable cache root: Open = %T, want the retry decorator only", be)
	}
}

// TestS3CacheRequests: a repository of 12 restore points on a real
// server behind a transport that adds 50 ms to every request. What a
// command does first — repo.Open, list the snapshots, load the index —
// takes one GET per object with a cold cache or without one, and with a
// warm cache only the listings and the one check of the config.
func TestS3CacheRequests(t *testing.T) {
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := servers.Get(t, k)
			ctx := context.Background()
			loc := srv.Location(srv.Bucket, "cache/"+strings.ReplaceAll(t.Name(), "/", "-"))
			base, err := minio.DefaultTransport(false)
			if err != nil {
				t.Fatal(err)
			}
			tr := s3test.NewDelay(base, 0)
			root := t.TempDir()
			open := func(noCache bool) backend.Backend {
				t.Helper()
				be, err := Open(ctx, loc, Options{Getenv: envOf(srv.Env()...), CacheDir: root, NoCache: noCache, S3: s3.Config{Transport: tr}})
				if err != nil {
					t.Fatal(err)
				}
				return be
			}
			password := []byte("cache test")
			r, err := repo.Init(ctx, open(true), password, repo.InitOptions{ChunkSize: repo.MinChunkSize, PackSize: 256 << 10,
				KDF: &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("0123456789abcdef")}})
			if err != nil {
				t.Fatal(err)
			}
			const points = 12
			for i := range points {
				storeSnapshot(t, r, i)
			}

			command := func(noCache bool) map[string]int {
				t.Helper()
				tr.Reset()
				r, err := repo.Open(ctx, open(noCache), password)
				if err != nil {
					t.Fatal(err)
				}
				snaps, err := r.Snapshots(ctx)
				if err != nil || len(snaps) != points {
					t.Fatalf("Snapshots = %d, %v", len(snaps), err)
				}
				if err := r.LoadIndex(ctx); err != nil {
					t.Fatal(err)
				}
				if n := r.Index().Len(); n != points*5 { // 4 chunks and a map each
					t.Fatalf("index lists %d blobs, want %d", n, points*5)
				}
				return tr.Counts()
			}
			tr.SetDelay(50 * time.Millisecond)
			cold := command(false)
			warm := command(false)
			off := command(true)
			t.Logf("requests: cold %v, warm %v, no cache %v", cold, warm, off)
			// Cold: the config, the key, 12 snapshots, 12 index files.
			if cold["GET"] < 2*points+2 {
				t.Errorf("cold cache: %d GETs, want at least %d", cold["GET"], 2*points+2)
			}
			if off["GET"] != cold["GET"] {
				t.Errorf("no cache: %d GETs, the cold cache %d: want as many", off["GET"], cold["GET"])
			}
			// Warm: only the config, checked once per process.
			if warm["GET"] != 1 {
				t.Errorf("warm cache: %d GETs, want 1 (the config)", warm["GET"])
			}
			// As many listings (opening the store lists one key, and
			// minio-go may ask for the next page before it is cancelled).
			if d := warm["LIST"] - cold["LIST"]; d < -1 || d > 1 {
				t.Errorf("warm cache: %d listings, cold %d: the store is listed as often", warm["LIST"], cold["LIST"])
			}
			total := func(m map[string]int) (n int) {
				for _, v := range m {
					n += v
				}
				return n
			}
			if 3*total(warm) > total(cold) {
				t.Errorf("warm cache: %d requests, cold %d: want under a third", total(warm), total(cold))
			}

			// A restore point forgotten elsewhere (no cache) leaves the
			// warm cache at the next listing, once the cache was filled
			// before the forget (a listing keeps copies as new as it).
			dir, _ := CacheDir(loc, Options{CacheDir: root})
			old := time.Now().Add(-time.Minute)
			if err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
				if err == nil && !d.IsDir() {
					err = os.Chtimes(p, old, old)
				}
				return err
			}); err != nil {
				t.Fatal(err)
			}
			other, err := repo.Open(ctx, open(true), password)
			if err != nil {
				t.Fatal(err)
			}
			ids, err := other.SnapshotIDs(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := other.RemoveSnapshot(ctx, ids[0]); err != nil {
				t.Fatal(err)
			}
			r2, err := repo.Open(ctx, open(false), password)
			if err != nil {
				t.Fatal(err)
			}
			if snaps, err := r2.Snapshots(ctx); err != nil || len(snaps) != points-1 {
				t.Fatalf("after a forget elsewhere: %d snapshots, %v; want %d", len(snaps), err, points-1)
			}
			if _, err := os.Stat(filepath.Join(dir, "objects", "snapshots", ids[0])); !os.IsNotExist(err) {
				t.Errorf("the forgotten snapshot is still cached: %v", err)
			}
		})
	}
}

// storeSnapshot writes a restore point of a few random chunks: a pack, an
// index file and a snapshot.
func storeSnapshot(t *testing.T, r *repo.Repo, i int) {
	t.Helper()
	ctx := context.Background()
	if err := r.LoadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	cs := r.Config().ChunkSize
	rng := rand.New(rand.NewPCG(uint64(i), 3))
	const n = 4
	m := repo.NewChunkMap(n, 0)
	s := r.NewSealer()
	for pos := range int64(n) {
		c := make([]byte, cs)
		for j := range c {
			c[j] = byte(rng.Uint32())
		}
		id := r.Key().Hash(c)
		if err := m.Append(pos, id); err != nil {
			t.Fatal(err)
		}
		if r.Claim(id) {
			if err := r.StoreBlob(ctx, s, repo.DataBlob, id, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	maps, err := r.SaveMap(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	snap := &repo.Snapshot{Time: time.Now().UTC(), Name: fmt.Sprintf("vm%d", i),
		Disks: []repo.Disk{{Name: "d0", Size: int64(n * cs), ChunkSize: cs, Maps: maps, DataChunks: m.DataChunks()}}}
	if _, err := r.SaveSnapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
}
