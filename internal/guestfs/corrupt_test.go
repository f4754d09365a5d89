package guestfs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path"
	"runtime"
	"sort"
	"sync"
	"testing"
	"time"
)

// Robustness: images with corrupted metadata must give errors, never
// panics, hangs or huge allocations.

// overlay is a disk image in memory with some bytes replaced.
type overlay struct {
	base    []byte
	patches []patch // sorted by off
}

type patch struct {
	off int64
	b   byte
}

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(o.base)) {
		return 0, io.EOF
	}
	n := copy(p, o.base[off:])
	i := sort.Search(len(o.patches), func(i int) bool { return o.patches[i].off >= off })
	for ; i < len(o.patches) && o.patches[i].off < off+int64(n); i++ {
		p[o.patches[i].off-off] = o.patches[i].b
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// recordingReader notes which 512-byte sectors are read.
type recordingReader struct {
	r  io.ReaderAt
	mu sync.Mutex
	s  map[int64]bool
}

func (r *recordingReader) ReadAt(p []byte, off int64) (int, error) {
	if len(p) <= 64<<10 { // metadata-sized reads only
		r.mu.Lock()
		for s := off / 512; s <= (off+int64(len(p))-1)/512; s++ {
			r.s[s] = true
		}
		r.mu.Unlock()
	}
	return r.r.ReadAt(p, off)
}

// walkAll probes a disk and reads every volume completely: listings,
// metadata, symlinks and up to 16 MiB of every file. It returns the first
// error (a corrupt image may legitimately have many).
func walkAll(ctx context.Context, disk io.ReaderAt, size int64, readData int64) (err error) {
	vols, err := Probe(ctx, disk, size)
	if err != nil {
		return err
	}
	var first error
	note := func(err error) {
		if err != nil && first == nil {
			first = err
		}
	}
	for _, v := range vols {
		if v.FSType == "" {
			note(v.Err)
			continue
		}
		f, err := Open(ctx, disk, size, v)
		if err != nil {
			note(err)
			continue
		}
		seen := map[uint64]bool{}
		budget := 20000
		var buf []byte // one read buffer for all files: the walk's own garbage stays small
		var walk func(p string, depth int)
		walk = func(p string, depth int) {
			if ctx.Err() != nil || depth > 64 || budget <= 0 {
				return
			}
			ents, err := f.ReadDir(ctx, p)
			note(err)
			for _, e := range ents {
				budget--
				cp := path.Join(p, e.Name)
				_, err := f.Lstat(ctx, cp)
				note(err)
				switch {
				case e.Mode.IsDir():
					if !seen[e.Ino] {
						seen[e.Ino] = true
						walk(cp, depth+1)
					}
				case e.Mode&os.ModeSymlink != 0:
					_, err := f.Readlink(ctx, cp)
					note(err)
				case e.Mode.IsRegular():
					gf, err := f.Open(ctx, cp)
					note(err)
					if err == nil && readData > 0 {
						if buf == nil {
							buf = make([]byte, 1<<20)
						}
						for off := int64(0); off < gf.Size() && off < readData && ctx.Err() == nil; off += int64(len(buf)) {
							if _, err := gf.ReadAt(buf, off); err != nil && err != io.EOF {
								note(err)
								break
							}
						}
					}
				}
			}
		}
		walk("/", 0)
	}
	return first
}

// metadataSectors returns the sectors read while walking the image
// without reading file data.
func metadataSectors(t testing.TB, base []byte) []int64 {
	rec := &recordingReader{r: &overlay{base: base}, s: map[int64]bool{}}
	if err := walkAll(context.Background(), rec, int64(len(base)), 0); err != nil {
		t.Fatalf("clean image does not walk: %v", err)
	}
	var out []int64
	for s := range rec.s {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// corrupt returns patches that change 1..n random bytes in metadata
// sectors, sometimes with interesting values.
func corrupt(rng *rand.Rand, sectors []int64, n int) []patch {
	k := 1 + rng.Intn(n)
	ps := make([]patch, 0, k)
	for i := 0; i < k; i++ {
		off := sectors[rng.Intn(len(sectors))]*512 + int64(rng.Intn(512))
		var b byte
		switch rng.Intn(4) {
		case 0:
			b = 0
		case 1:
			b = 0xFF
		case 2:
			b = byte(1 << rng.Intn(8))
		default:
			b = byte(rng.Intn(256))
		}
		ps = append(ps, patch{off, b})
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].off < ps[j].off })
	return ps
}

// checkRobust walks a corrupted image with a deadline and fails on a
// panic (the parsers' guard reports it as ErrCorrupt "internal error",
// which we also treat as a failure), a hang or a memory blow-up.
func checkRobust(t testing.TB, o *overlay, what string, readData int64) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	var err error
	alloc := allocated(func() { err = walkAll(ctx, o, int64(len(o.base)), readData) })
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("%s: walk took %v (patches %v)", what, el, o.patches)
	}
	if err != nil && errors.Is(err, ErrCorrupt) && containsInternal(err) {
		t.Errorf("%s: parser panicked: %v (patches %v)", what, err, o.patches)
	}
	if max := allocBound(int64(len(o.base))); alloc > max {
		t.Errorf("%s: open and walk allocated %d MiB, more than the %d MiB bound (patches %v)", what, alloc>>20, max>>20, o.patches)
	}
}

// allocated returns the bytes that fn allocated on the heap.
//
// It is the growth of runtime.MemStats.TotalAlloc, the cumulative count of
// bytes allocated, not a reading of the live heap: HeapAlloc depends on
// when the collector last ran and on what earlier inputs left behind, so
// it flakes, and a collection before and after would miss a gigabyte that
// was allocated and dropped in between. TotalAlloc only grows, counts an
// allocation the moment it is made, and is an upper bound on how far fn
// raised the peak heap. ReadMemStats stops the world, so the counts are
// exact. Nothing else allocates in the process meanwhile: no test in this
// package calls t.Parallel, seeds run one after another, and the fuzz
// engine mutates inputs between calls, not during them (each fuzz worker
// is a process of its own). The count is therefore a function of the
// input alone (up to map iteration order, and a deadline that can only
// cut a walk short), and a check against it cannot flake.
func allocated(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// allocBound is how many bytes probing, opening and walking a disk of
// size bytes may allocate. The test images are 12 to 64 MiB; undamaged
// they walk with 4-6 MiB of allocations (1 MiB of it the walk's read
// buffer), and thousands of randomly damaged copies stayed under 11 MiB.
// Everything a parser reads is in the image, so even keeping a copy of
// every byte of it twice over (a read buffer and a decoded form) is 2x
// its size; 16 MiB on top covers the fixed costs (page caches of up to
// 8 MiB, the read buffer, decoded entries). A parser that allocates more
// has trusted a length or count field that claims more than the image
// holds: that is the blow-up this catches, long before it reaches the
// gigabytes a real damaged disk could claim.
func allocBound(size int64) uint64 {
	return uint64(2*size) + 16<<20
}

func containsInternal(err error) bool {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if ce, ok := e.(*corruptError); ok && len(ce.msg) > 14 && ce.msg[:14] == "internal error" {
			return true
		}
	}
	return false
}

var robustImages = []string{"ext4", "ext2", "ext4-inline", "xfs", "vfat", "fat12", "ntfs"}

func loadImage(t testing.TB, name string) ([]byte, []int64) {
	img := image(t, name)
	base, err := os.ReadFile(img.path)
	if err != nil {
		t.Fatal(err)
	}
	return base, metadataSectors(t, base)
}

// TestCorruptImages corrupts each image in a fixed set of random ways.
func TestCorruptImages(t *testing.T) {
	iterations := 30
	if testing.Short() {
		iterations = 15
	}
	for _, name := range robustImages {
		t.Run(name, func(t *testing.T) {
			base, sectors := loadImage(t, name)
			rng := rand.New(rand.NewSource(int64(len(name))))
			for i := 0; i < iterations; i++ {
				checkRobust(t, &overlay{base: base, patches: corrupt(rng, sectors, 8)}, fmt.Sprintf("%s #%d", name, i), 2<<20)
			}
		})
	}
}

// Fuzz targets: the fuzz input is a list of (offset, byte) patches applied
// to metadata sectors of a real image, so the fuzzer explores damaged
// metadata instead of mutating megabytes of file data.

func patchesFromFuzz(data []byte, sectors []int64) []patch {
	var ps []patch
	for len(data) >= 5 && len(ps) < 64 {
		idx := binary.LittleEndian.Uint32(data)
		s := sectors[int(idx/512)%len(sectors)]
		ps = append(ps, patch{s*512 + int64(idx%512), data[4]})
		data = data[5:]
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].off < ps[j].off })
	return ps
}

func fuzzImage(f *testing.F, name string) {
	base, sectors := loadImage(f, name)
	rng := rand.New(rand.NewSource(1))
	f.Add([]byte{})
	for i := 0; i < 8; i++ {
		var seed []byte
		for j := 0; j < 1+i; j++ {
			seed = binary.LittleEndian.AppendUint32(seed, uint32(rng.Intn(len(sectors)*512)))
			seed = append(seed, byte(rng.Intn(256)))
		}
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkRobust(t, &overlay{base: base, patches: patchesFromFuzz(data, sectors)}, name, 2<<20)
	})
}

func FuzzOpenWalkExt4(f *testing.F) { fuzzImage(f, "ext4") }
func FuzzOpenWalkExt2(f *testing.F) { fuzzImage(f, "ext2") }
func FuzzOpenWalkXFS(f *testing.F)  { fuzzImage(f, "xfs") }
func FuzzOpenWalkVFAT(f *testing.F) { fuzzImage(f, "vfat") }
func FuzzOpenWalkNTFS(f *testing.F) { fuzzImage(f, "ntfs") }

// FuzzProbe feeds raw bytes as a small disk: partition tables, EBR chains,
// GPT headers, LVM labels and metadata, superblocks.
func FuzzProbe(f *testing.F) {
	for _, l := range []struct {
		name  string
		build func() string
	}{
		{"mbr", func() string { d, _ := mbrDisk(f, nil, []*fsImage{image(f, "vfat")}); return d }},
		{"gpt", func() string { d, _ := gptDisk(f, []*fsImage{image(f, "vfat")}); return d }},
		{"lvm", func() string { d, _ := lvmDisk(f, []*fsImage{image(f, "fat12")}); return d }},
	} {
		d := l.build()
		b, err := os.ReadFile(d)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b[:64<<10])
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		alloc := allocated(func() {
			vols, err := Probe(ctx, &overlay{base: data}, int64(len(data)))
			if err != nil && containsInternal(err) {
				t.Errorf("Probe panicked: %v", err)
			}
			for _, v := range vols {
				if v.Err != nil && containsInternal(v.Err) {
					t.Errorf("Probe panicked: %v", v.Err)
				}
				if fs, err := Open(ctx, &overlay{base: data}, int64(len(data)), v); err == nil {
					fs.ReadDir(ctx, "/")
				} else if containsInternal(err) {
					t.Errorf("Open panicked: %v", err)
				}
			}
		})
		if el := time.Since(start); el > 3*time.Second {
			t.Errorf("probing and opening a %d-byte disk took %v", len(data), el)
		}
		if max := allocBound(int64(len(data))); alloc > max {
			t.Errorf("probing and opening a %d-byte disk allocated %d MiB, more than the %d MiB bound", len(data), alloc>>20, max>>20)
		}
	})
}

func FuzzLVMConfig(f *testing.F) {
	f.Add(sampleLVMMeta)
	f.Add("a { b = [ \"x\", 1 ] c { } }")
	f.Fuzz(func(t *testing.T, s string) {
		cfg, err := parseLVMConfig(s)
		if err != nil {
			return
		}
		for k, v := range cfg {
			if m, ok := v.(map[string]any); ok {
				lvmLVs(k, m, []*lvmPV{{uuid: "abc", size: 1 << 30}}, 1<<31)
			}
		}
	})
}
