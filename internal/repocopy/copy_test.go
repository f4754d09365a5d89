package repocopy

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backup"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/restore"
	"github.com/kura-backup/kura/internal/source"
)

const chunk = 64 << 10

var kdf = &crypt.KDFParams{Time: 1, Memory: 1024, Threads: 1, Salt: []byte("0123456789abcdef")}

// side is one repository of a test: its directory, password and the
// backend it is opened through.
type side struct {
	dir string
	pw  []byte
	be  *countingBackend
}

// newSide creates a repository; key, when set, is the master key to share.
func newSide(t *testing.T, pw string, key *crypt.Key) *side {
	t.Helper()
	s := &side{dir: filepath.Join(t.TempDir(), "repo"), pw: []byte(pw)}
	be, err := local.Open(s.dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := repo.Init(context.Background(), be, s.pw, repo.InitOptions{ChunkSize: chunk, PackSize: 512 << 10, KDF: kdf, Key: key}); err != nil {
		t.Fatal(err)
	}
	return s
}

// open opens the repository afresh (a new process, as it were).
func (s *side) open(t *testing.T) *repo.Repo {
	t.Helper()
	be, err := local.Open(s.dir)
	if err != nil {
		t.Fatal(err)
	}
	s.be = &countingBackend{Backend: be}
	r, err := repo.Open(context.Background(), s.be, s.pw)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// countingBackend counts the packs saved through it and can fail or
// cancel after a number of them.
type countingBackend struct {
	backend.Backend
	packs     atomic.Int64
	packBytes atomic.Int64
	failAfter int64              // > 0: pack saves after this many fail
	onFail    context.CancelFunc // called instead of failing, when set
}

var errInjected = errors.New("injected failure")

func (b *countingBackend) Save(ctx context.Context, name string, data []byte) error {
	if strings.HasPrefix(name, "data/") {
		if b.failAfter > 0 && b.packs.Load() >= b.failAfter {
			if b.onFail != nil {
				b.onFail()
				return ctx.Err()
			}
			return errInjected
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := b.Backend.Save(ctx, name, data); err != nil {
			return err
		}
		b.packs.Add(1)
		b.packBytes.Add(int64(len(data)))
		return nil
	}
	if b.failAfter > 0 && b.packs.Load() >= b.failAfter && b.onFail == nil && strings.HasPrefix(name, "index/") {
		return errInjected // a process that died writes no index either
	}
	return b.Backend.Save(ctx, name, data)
}

// memDisk is an in-memory disk; its zero regions are reported as zero
// extents in 64 KiB granules, like a sparse file's.
type memDisk struct {
	name string
	data []byte
}

func (m *memDisk) Info() source.DiskInfo {
	return source.DiskInfo{Name: m.name, Size: int64(len(m.data)), Format: "raw"}
}

func (m *memDisk) Extents(ctx context.Context, off, length int64) ([]source.Extent, error) {
	const g = 64 << 10
	var out []source.Extent
	for p := off; p < off+length; p += g {
		n := min(g, off+length-p)
		z := bytes.Count(m.data[p:p+n], []byte{0}) == int(n)
		if k := len(out) - 1; k >= 0 && out[k].Zero == z {
			out[k].Length += n
			continue
		}
		out = append(out, source.Extent{Offset: p, Length: n, Zero: z})
	}
	return out, nil
}

func (m *memDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	copy(p, m.data[off:])
	return nil
}

func (m *memDisk) Close() error { return nil }

// image returns size bytes: compressible random data with holes, and an
// odd-sized last chunk when size is not a multiple of the chunk size.
func image(seed uint64, size int) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, size)
	for off := 0; off < size; off += chunk {
		if rng.IntN(5) == 0 {
			continue // a hole
		}
		for i := off; i < min(off+chunk, size); i++ {
			b[i] = byte(rng.IntN(16))
		}
	}
	return b
}

// change rewrites n chunks of b in place and returns how many distinct
// chunks now differ.
func change(b []byte, seed uint64, n int) {
	rng := rand.New(rand.NewPCG(seed, 2))
	chunks := len(b) / chunk
	for _, k := range rng.Perm(chunks)[:n] {
		for i := k * chunk; i < (k+1)*chunk; i++ {
			b[i] = byte(rng.IntN(16) + 1)
		}
	}
}

func backupDisks(t *testing.T, r *repo.Repo, name string, disks ...*memDisk) *repo.Snapshot {
	t.Helper()
	var ds []source.Disk
	for _, d := range disks {
		ds = append(ds, d)
	}
	s, err := backup.Run(context.Background(), r, ds, backup.Options{Name: name, Source: "image", Workers: 2,
		Tags: map[string]string{"env": "test"}, Config: &repo.VMConfig{Type: "libvirt-xml", Data: "<domain>" + name + "</domain>"}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// memTarget is a restore target in memory.
type memTarget struct {
	mu   sync.Mutex
	data []byte
}

func (m *memTarget) WriteAt(ctx context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}
func (m *memTarget) NeedsZeroes() bool                { return false }
func (m *memTarget) Commit(ctx context.Context) error { return nil }
func (m *memTarget) Abort()                           {}

// restored restores every disk of s from r.
func restored(t *testing.T, r *repo.Repo, s *repo.Snapshot) [][]byte {
	t.Helper()
	var out [][]byte
	for _, d := range s.Disks {
		m := &memTarget{data: make([]byte, d.Size)}
		if err := restore.Disk(context.Background(), r, d, m, restore.Options{Workers: 2}); err != nil {
			t.Fatalf("restoring %s disk %s: %v", s.ID[:8], d.Name, err)
		}
		out = append(out, m.data)
	}
	return out
}

// snapshotsOf lists r's restore points, oldest first.
func snapshotsOf(t *testing.T, r *repo.Repo) []*repo.Snapshot {
	t.Helper()
	ss, err := r.Snapshots(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ss
}

// checkClean runs verify --read-data on r and fails on any problem.
func checkClean(t *testing.T, r *repo.Repo) repo.CheckResult {
	t.Helper()
	res, err := r.Check(context.Background(), repo.CheckOptions{ReadData: true})
	if err != nil {
		t.Fatal(err)
	}
	if !res.OK() {
		t.Fatalf("verify found problems: %+v", res.Problems)
	}
	return res
}

// noDuplicates fails when the target holds any blob twice: a blob sent
// again.
func noDuplicates(t *testing.T, r *repo.Repo) {
	t.Helper()
	if _, err := r.ScanUnindexedPacks(context.Background()); err != nil {
		t.Fatal(err)
	}
	dups := 0
	r.Index().EachCopy(func(id crypt.ID, l repo.Loc, best bool) {
		if !best {
			dups++
		}
	})
	if dups > 0 {
		t.Errorf("the target holds %d blobs twice: something was sent again", dups)
	}
}

// keyCase is how a test's target is keyed.
type keyCase struct {
	name   string
	shared bool
}

var keyCases = []keyCase{{"shared key", true}, {"independent keys", false}}

// pair makes a source and a target, the target sharing the source's key
// or not.
func pair(t *testing.T, kc keyCase) (src, dst *side) {
	t.Helper()
	src = newSide(t, "source password", nil)
	var key *crypt.Key
	if kc.shared {
		r := src.open(t)
		key = r.Key()
	}
	return src, newSide(t, "another password", key)
}

// TestCopy copies three restore points of two VMs, checks that each
// restores from the target byte for byte with its metadata, that a
// second copy sends nothing, and that the target verifies clean.
func TestCopy(t *testing.T) {
	for _, kc := range keyCases {
		t.Run(kc.name, func(t *testing.T) {
			ctx := context.Background()
			src, dst := pair(t, kc)
			sr := src.open(t)
			a := &memDisk{"vda", image(1, 40*chunk+1000)}
			b := &memDisk{"vdb", image(2, 24*chunk)}
			s1 := backupDisks(t, sr, "vm1", a, b)
			want1 := [][]byte{bytes.Clone(a.data), bytes.Clone(b.data)}
			change(a.data, 3, 4)
			s2 := backupDisks(t, sr, "vm1", a, b)
			want2 := [][]byte{bytes.Clone(a.data), bytes.Clone(b.data)}
			s3 := backupDisks(t, sr, "vm2", &memDisk{"disk0", image(4, 16*chunk)})

			dr := dst.open(t)
			var calls atomic.Int64
			var last Progress
			res, err := Copy(ctx, sr, dr, Options{Verify: true, Progress: func(p Progress) { calls.Add(1); last = p }})
			if err != nil {
				t.Fatal(err)
			}
			if res.SharedKey != kc.shared || len(res.Copied) != 3 || len(res.Skipped) != 0 || len(res.Failed) != 0 {
				t.Fatalf("result: %+v", res)
			}
			if res.ChunksSent == 0 || res.BytesSent == 0 || res.BlobsVerified < res.ChunksSent {
				t.Errorf("counters: %+v", res)
			}
			if calls.Load() == 0 || last.Done != 3 || last.ChunksSent != res.ChunksSent {
				t.Errorf("progress: %d calls, last %+v", calls.Load(), last)
			}

			// Every restore point restores from the target, metadata kept.
			dr = dst.open(t)
			got := snapshotsOf(t, dr)
			if len(got) != 3 {
				t.Fatalf("target has %d restore points", len(got))
			}
			for i, s := range []*repo.Snapshot{s1, s2, s3} {
				c := got[i]
				if c.Name != s.Name || !c.Time.Equal(s.Time) || c.Hostname != s.Hostname || c.Source != s.Source || c.Tags["env"] != "test" ||
					c.Config == nil || c.Config.Data != s.Config.Data || c.Stats.BytesRead != s.Stats.BytesRead || len(c.Disks) != len(s.Disks) {
					t.Errorf("restore point %d: metadata differs:\n%+v\n%+v", i, c, s)
				}
				if len(c.CopiedFrom) != 1 || c.CopiedFrom[0].Repo != sr.Config().ID || c.CopiedFrom[0].Snapshot != s.ID {
					t.Errorf("restore point %d: copied_from %+v", i, c.CopiedFrom)
				}
				if kc.shared != (c.Disks[0].Maps[0] == s.Disks[0].Maps[0]) {
					t.Errorf("restore point %d: map ids shared %v, want %v", i, !kc.shared, kc.shared)
				}
			}
			for i, want := range [][][]byte{want1, want2} {
				for k, data := range restored(t, dr, got[i]) {
					if !bytes.Equal(data, want[k]) {
						t.Errorf("restore point %d disk %d differs from the source", i, k)
					}
				}
			}
			if kc.shared {
				// Sealed byte for byte.
				id := got[0].Disks[0].Maps[0]
				sl, _ := sr.Locate(id)
				dl, _ := dr.Locate(id)
				x, err1 := sr.LoadPackRange(ctx, sl.Pack, int64(sl.Offset), int64(sl.Length))
				y, err2 := dr.LoadPackRange(ctx, dl.Pack, int64(dl.Offset), int64(dl.Length))
				if err1 != nil || err2 != nil || !bytes.Equal(x, y) {
					t.Errorf("a blob was not copied sealed as it was (%v, %v)", err1, err2)
				}
			}
			checkClean(t, dr)

			// A second copy sends nothing.
			packs := dst.be.packs.Load()
			res, err = Copy(ctx, src.open(t), dr, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Copied) != 0 || len(res.Skipped) != 3 || res.ChunksSent != 0 || res.BytesSent != 0 || dst.be.packs.Load() != packs {
				t.Errorf("second copy: %+v, %d packs written", res, dst.be.packs.Load()-packs)
			}
			if n := len(snapshotsOf(t, dr)); n != 3 {
				t.Errorf("target has %d restore points after the second copy", n)
			}
			noDuplicates(t, dst.open(t))
		})
	}
}

// TestCopyIncremental: copying a newer restore point of a VM the target
// has sends only the chunks that changed, and with independent keys
// reads only those from the source too.
func TestCopyIncremental(t *testing.T) {
	for _, kc := range keyCases {
		t.Run(kc.name, func(t *testing.T) {
			ctx := context.Background()
			src, dst := pair(t, kc)
			sr := src.open(t)
			a := &memDisk{"vda", image(5, 64*chunk)}
			backupDisks(t, sr, "vm1", a)
			if _, err := Copy(ctx, sr, dst.open(t), Options{}); err != nil {
				t.Fatal(err)
			}
			const changed = 5
			change(a.data, 6, changed)
			s2 := backupDisks(t, sr, "vm1", a)
			dr := dst.open(t)
			res, err := Copy(ctx, src.open(t), dr, Options{Name: "vm1"})
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Copied) != 1 || len(res.Skipped) != 1 || res.ChunksSent != changed {
				t.Errorf("sent %d chunks for %d changed: %+v", res.ChunksSent, changed, res)
			}
			if res.BytesRead > int64(changed+1)*(chunk+1<<20) {
				t.Errorf("read %d bytes from the source for %d changed chunks", res.BytesRead, changed)
			}
			if present := s2.Disks[0].DataChunks - changed; res.ChunksPresent != present {
				t.Errorf("%d chunks found present, want %d", res.ChunksPresent, present)
			}
			ss := snapshotsOf(t, dr)
			if data := restored(t, dr, ss[1])[0]; !bytes.Equal(data, a.data) {
				t.Error("the incremental copy does not restore")
			}
			checkClean(t, dr)
		})
	}
}

// TestCopyInterrupted stops a copy after some packs landed — by a
// cancel, or by a target that fails every write from then on, as a
// process killed would leave it — checks that the target is consistent,
// then runs the copy again: nothing that landed is sent again, and every
// restore point restores byte for byte.
func TestCopyInterrupted(t *testing.T) {
	for _, kc := range keyCases {
		for _, how := range []string{"cancel", "failing target"} {
			t.Run(kc.name+"/"+how, func(t *testing.T) {
				ctx := context.Background()
				src, dst := pair(t, kc)
				sr := src.open(t)
				a := &memDisk{"vda", image(7, 96*chunk)}
				backupDisks(t, sr, "vm1", a)
				want1 := bytes.Clone(a.data)
				change(a.data, 8, 30)
				backupDisks(t, sr, "vm1", a)
				backupDisks(t, sr, "vm2", &memDisk{"vda", image(9, 64*chunk)})

				dr := dst.open(t)
				cctx, cancel := context.WithCancel(ctx)
				defer cancel()
				dst.be.failAfter = 3 // within the first restore point's packs
				if how == "cancel" {
					dst.be.onFail = cancel
				}
				res, err := Copy(cctx, sr, dr, Options{})
				if err == nil {
					t.Fatalf("the interrupted copy succeeded: %+v", res)
				}
				if how == "cancel" && !errors.Is(err, context.Canceled) || how != "cancel" && !errors.Is(err, errInjected) {
					t.Fatalf("error: %v", err)
				}
				landed := dst.be.packs.Load()

				// Consistent: whole restore points or none, and verify is clean.
				dr = dst.open(t)
				before := snapshotsOf(t, dr)
				if len(before) > 1 {
					t.Fatalf("%d restore points copied before the interruption; the test wants it earlier", len(before))
				}
				checkClean(t, dr)

				dr = dst.open(t)
				res, err = Copy(ctx, src.open(t), dr, Options{})
				if err != nil {
					t.Fatal(err)
				}
				if len(res.Copied)+len(res.Skipped) != 3 || res.PacksIndexed == 0 {
					t.Errorf("second run: %+v", res)
				}
				t.Logf("%d packs landed before the interruption, %d indexed by the second run, which sent %d chunks", landed, res.PacksIndexed, res.ChunksSent)
				dr = dst.open(t)
				noDuplicates(t, dr)
				checkClean(t, dr)
				ss := snapshotsOf(t, dr)
				if len(ss) != 3 {
					t.Fatalf("%d restore points in the target", len(ss))
				}
				if !bytes.Equal(restored(t, dr, ss[0])[0], want1) || !bytes.Equal(restored(t, dr, ss[1])[0], a.data) {
					t.Error("a restore point copied in two runs does not restore")
				}
				// And a third run has nothing to do.
				res, err = Copy(ctx, src.open(t), dst.open(t), Options{})
				if err != nil || res.ChunksSent != 0 || len(res.Skipped) != 3 || res.PacksIndexed != 0 {
					t.Errorf("third run: %+v %v", res, err)
				}
			})
		}
	}
}

// corrupt flips a byte of the stored copy of id that r reads first.
func corrupt(t *testing.T, s *side, r *repo.Repo, id crypt.ID) repo.Loc {
	t.Helper()
	l, ok := r.Locate(id)
	if !ok {
		t.Fatalf("chunk %s not found", id.Short())
	}
	p := l.Pack.String()
	path := filepath.Join(s.dir, "data", p[:2], p)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [1]byte
	off := int64(l.Offset) + int64(l.Length)/2
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x40
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return l
}

// TestCopyDamagedSource: a damaged chunk of the source is recorded as
// damage there; with another intact copy it is copied from that one,
// without one its restore point fails to copy with a message that says
// so, and the other restore points still copy.
func TestCopyDamagedSource(t *testing.T) {
	for _, kc := range keyCases {
		for _, how := range []string{"no other copy", "another intact copy", "pack missing"} {
			t.Run(kc.name+"/"+how, func(t *testing.T) {
				ctx := context.Background()
				src, dst := pair(t, kc)
				sr := src.open(t)
				v1 := &memDisk{"vda", image(10, 32*chunk)}
				backupDisks(t, sr, "vm1", v1)
				v2 := &memDisk{"vda", image(11, 32*chunk)}
				s2 := backupDisks(t, sr, "vm2", v2)
				m, err := sr.LoadMap(ctx, s2.Disks[0])
				if err != nil {
					t.Fatal(err)
				}
				bad := m.IDs()[3]

				sr = src.open(t)
				if err := sr.LoadIndex(ctx); err != nil {
					t.Fatal(err)
				}
				if how == "another intact copy" {
					// A second copy of the chunk, in a pack of its own.
					plain, err := sr.LoadBlob(ctx, bad, nil)
					if err != nil {
						t.Fatal(err)
					}
					if err := sr.StoreBlob(ctx, sr.NewSealer(), repo.DataBlob, bad, plain); err != nil {
						t.Fatal(err)
					}
					if err := sr.Flush(ctx); err != nil {
						t.Fatal(err)
					}
				}
				l := corrupt(t, src, sr, bad)
				if how == "pack missing" {
					p := l.Pack.String()
					if err := os.Remove(filepath.Join(src.dir, "data", p[:2], p)); err != nil {
						t.Fatal(err)
					}
				}
				dr := dst.open(t)
				res, err := Copy(ctx, sr, dr, Options{})
				if how == "another intact copy" {
					if err != nil {
						t.Fatal(err)
					}
					if len(res.Copied) != 2 {
						t.Fatalf("result: %+v", res)
					}
					ss := snapshotsOf(t, dst.open(t))
					if !bytes.Equal(restored(t, dst.open(t), ss[1])[0], v2.data) {
						t.Error("vm2 does not restore from the target")
					}
				} else {
					if !errors.Is(err, ErrNotCopied) {
						t.Fatalf("error %v, want ErrNotCopied", err)
					}
					if len(res.Copied) != 1 || res.Copied[0].Name != "vm1" || len(res.Failed) != 1 || res.Failed[0].Name != "vm2" {
						t.Fatalf("result: %+v", res)
					}
					msg := res.Failed[0].Error
					if how == "pack missing" && !strings.Contains(msg, "is missing") || how != "pack missing" && !strings.Contains(msg, bad.Short()) ||
						!strings.Contains(msg, "no intact copy in the source") || !strings.Contains(msg, "kura verify") {
						t.Errorf("failure message: %s", msg)
					}
					if strings.Contains(err.Error(), "\n") {
						t.Errorf("error is not one line: %q", err)
					}
					ss := snapshotsOf(t, dst.open(t))
					if len(ss) != 1 || ss[0].Name != "vm1" {
						t.Errorf("target holds %+v", ss)
					}
				}
				// The damage is recorded in the source.
				sr = src.open(t)
				if err := sr.LoadIndex(ctx); err != nil {
					t.Fatal(err)
				}
				found := false
				for _, d := range sr.DamagedCopies() {
					found = found || d.Blob == bad
				}
				if !found {
					t.Errorf("the damaged chunk is not recorded in the source: %+v", sr.DamagedCopies())
				}
				checkClean(t, dst.open(t))
			})
		}
	}
}

// TestSelect picks restore points by name, by the newest per name and
// by reference.
func TestSelect(t *testing.T) {
	t0 := time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)
	var all []*repo.Snapshot
	for i, n := range []string{"a", "b", "a", "a", "b"} {
		all = append(all, &repo.Snapshot{ID: strings.Repeat(string(rune('1'+i)), 64), Name: n, Time: t0.Add(time.Duration(i) * time.Hour)})
	}
	ids := func(ss []*repo.Snapshot) string {
		var out []string
		for _, s := range ss {
			out = append(out, s.ID[:1])
		}
		return strings.Join(out, ",")
	}
	for _, tc := range []struct {
		name string
		opts Options
		want string
		err  string
	}{
		{"all", Options{}, "1,2,3,4,5", ""},
		{"by name", Options{Name: "a"}, "1,3,4", ""},
		{"latest per name", Options{Latest: 1}, "4,5", ""},
		{"latest of a name", Options{Name: "a", Latest: 2}, "3,4", ""},
		{"by reference", Options{Refs: []string{"b@latest", "1", "1"}}, "1,5", ""},
		{"unknown name", Options{Name: "c"}, "", "no restore point named"},
		{"unknown reference", Options{Refs: []string{"9"}}, "", "in the source"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := selectSnapshots(all, tc.opts)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || ids(got) != tc.want {
				t.Fatalf("got %s (%v), want %s", ids(got), err, tc.want)
			}
		})
	}
}

// TestCopyRefused: the same repository on both sides, and references
// mixed with --name, are refused before anything is written.
func TestCopyRefused(t *testing.T) {
	src := newSide(t, "pw", nil)
	sr := src.open(t)
	if _, err := Copy(context.Background(), sr, src.open(t), Options{}); err == nil || !strings.Contains(err.Error(), "same repository") {
		t.Errorf("same repository: %v", err)
	}
	dst := newSide(t, "pw2", nil)
	if _, err := Copy(context.Background(), sr, dst.open(t), Options{Refs: []string{"latest"}, Name: "x"}); err == nil || !strings.Contains(err.Error(), "not both") {
		t.Errorf("refs and name: %v", err)
	}
}
