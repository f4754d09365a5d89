package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// qsdExport exports image with qemu-storage-daemon on a fresh unix socket
// under the given export names and returns the socket path.
func qsdExport(t testing.TB, format, image string, writable bool, names ...string) string {
	t.Helper()
	sock := socketPath(t)
	js := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	args := []string{
		"--blockdev", js(map[string]any{"driver": "file", "node-name": "file0", "filename": image, "read-only": !writable}),
		"--blockdev", js(map[string]any{"driver": format, "node-name": "fmt0", "file": "file0", "read-only": !writable}),
		"--nbd-server", js(map[string]any{"addr": map[string]any{"type": "unix", "path": sock}}),
	}
	for i, name := range names {
		args = append(args, "--export", js(map[string]any{
			"type": "nbd", "id": fmt.Sprintf("exp%d", i), "node-name": "fmt0",
			"name": name, "writable": writable, "description": "disk " + name,
		}))
	}
	startServer(t, "unix", sock, "qemu-storage-daemon", args...)
	return sock
}

func TestReadMatchesImage(t *testing.T) {
	img := newTestImage(t)
	qcow2 := img.convert(t, "qcow2")
	tests := []struct {
		name       string
		serve      func(t *testing.T) (sock, export string)
		maxRequest int
	}{
		{"qemu-nbd raw", func(t *testing.T) (string, string) {
			return qemuNBD(t, "raw", img.raw, "--read-only"), ""
		}, 0},
		{"qemu-nbd qcow2 named export", func(t *testing.T) (string, string) {
			return qemuNBD(t, "qcow2", qcow2, "--read-only", "--export-name=disk0"), "disk0"
		}, 0},
		{"qemu-nbd qcow2 small requests", func(t *testing.T) (string, string) {
			return qemuNBD(t, "qcow2", qcow2, "--read-only"), ""
		}, 256 << 10},
		{"qemu-storage-daemon qcow2", func(t *testing.T) (string, string) {
			return qsdExport(t, "qcow2", qcow2, false, "vda"), "vda"
		}, 0},
		{"qemu-storage-daemon raw", func(t *testing.T) (string, string) {
			return qsdExport(t, "raw", img.raw, false, "vdb"), "vdb"
		}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock, export := tt.serve(t)
			c := dialT(t, "unix", sock, Options{ExportName: export, MaxRequest: tt.maxRequest})
			if c.Size() != testImageSize {
				t.Fatalf("Size = %d, want %d", c.Size(), testImageSize)
			}
			if !c.Flags().ReadOnly() {
				t.Errorf("read-only export not flagged read-only: %#x", c.Flags())
			}
			if !c.StructuredReplies() {
				t.Errorf("QEMU did not agree to structured replies")
			}
			if tt.maxRequest > 0 && c.MaxRequest() != tt.maxRequest {
				t.Errorf("MaxRequest = %d, want %d", c.MaxRequest(), tt.maxRequest)
			}
			ctx := context.Background()
			// The whole disk in one call: split into pipelined requests.
			got := make([]byte, testImageSize)
			if err := c.ReadAt(ctx, got, 0); err != nil {
				t.Fatalf("ReadAt whole disk: %v", err)
			}
			if !bytes.Equal(got, img.data) {
				i := firstDiff(got, img.data)
				t.Fatalf("whole-disk read differs at offset %d: got %#x, want %#x", i, got[i], img.data[i])
			}
			// Unaligned reads around each data run.
			for _, r := range dataRuns {
				off := max(r.off-777, 0)
				n := min(r.n+1555, testImageSize-off)
				p := make([]byte, n)
				if err := c.ReadAt(ctx, p, off); err != nil {
					t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
				}
				if !bytes.Equal(p, img.data[off:off+n]) {
					t.Fatalf("ReadAt(%d, %d) differs at +%d", off, n, firstDiff(p, img.data[off:off+n]))
				}
			}
		})
	}
}

func TestReadPastEnd(t *testing.T) {
	img := newTestImage(t)
	c := dialT(t, "unix", qemuNBD(t, "raw", img.raw, "--read-only"), Options{})
	for _, tt := range []struct {
		name string
		off  int64
		n    int
	}{
		{"straddles end", testImageSize - 10, 20},
		{"starts at end", testImageSize, 1},
		{"negative offset", -1, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := c.ReadAt(context.Background(), make([]byte, tt.n), tt.off)
			if !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("ReadAt(%d, %d) = %v, want ErrOutOfRange", tt.off, tt.n, err)
			}
		})
	}
}

// checkExtents verifies that exts cover [off, off+length) exactly and in
// order, that zero extents read as zero in data, and returns them.
func checkExtents(t *testing.T, exts []Extent, off, length int64, data []byte) {
	t.Helper()
	pos := off
	for _, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extents do not tile [%d, %d): %+v", off, off+length, exts)
		}
		if e.Flags&StateZero != 0 {
			if i := bytes.IndexFunc(data[e.Offset:e.Offset+e.Length], func(r rune) bool { return r != 0 }); i >= 0 {
				t.Fatalf("extent %+v is flagged zero but byte %d is not", e, e.Offset+int64(i))
			}
		}
		pos += e.Length
	}
	if pos != off+length {
		t.Fatalf("extents end at %d, want %d: %+v", pos, off+length, exts)
	}
}

func TestBlockStatusBaseAllocation(t *testing.T) {
	img := newTestImage(t)
	qcow2 := img.convert(t, "qcow2")
	tests := []struct {
		name   string
		format string
		path   string
	}{
		{"raw sparse file", "raw", img.raw},
		{"qcow2", "qcow2", qcow2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := qemuNBD(t, tt.format, tt.path, "--read-only")
			c := dialT(t, "unix", sock, Options{MetaContexts: []string{MetaBaseAllocation}})
			ctxs := c.MetaContexts()
			if len(ctxs) != 1 || ctxs[0].Name != MetaBaseAllocation {
				t.Fatalf("granted meta contexts = %+v, want only %s", ctxs, MetaBaseAllocation)
			}
			ctx := context.Background()
			exts, err := c.BlockStatus(ctx, MetaBaseAllocation, 0, c.Size())
			if err != nil {
				t.Fatalf("BlockStatus: %v", err)
			}
			checkExtents(t, exts, 0, c.Size(), img.data)
			// Every data run lies in extents without the zero flag.
			for _, r := range dataRuns {
				for _, e := range exts {
					if e.Offset < r.off+r.n && r.off < e.Offset+e.Length && e.Flags&StateZero != 0 {
						t.Errorf("data run [%d, +%d) overlaps zero extent %+v", r.off, r.n, e)
					}
				}
			}
			// The untouched middle of the disk is a hole that reads as zero.
			mid := []Extent(nil)
			for _, e := range exts {
				if e.Offset <= 20<<20 && 20<<20 < e.Offset+e.Length {
					mid = append(mid, e)
				}
			}
			if len(mid) != 1 || mid[0].Flags != StateHole|StateZero {
				t.Errorf("extent at 20 MiB = %+v, want hole|zero", mid)
			}
			// A sub-range is clipped to exactly what was asked.
			off, n := int64(5<<20-1000), int64(2000)
			sub, err := c.BlockStatus(ctx, MetaBaseAllocation, off, n)
			if err != nil {
				t.Fatalf("BlockStatus(%d, %d): %v", off, n, err)
			}
			checkExtents(t, sub, off, n, img.data)
			if last := sub[len(sub)-1]; last.Flags&StateZero != 0 {
				t.Errorf("extent over data at 5 MiB flagged zero: %+v", sub)
			}
			// A context that was not negotiated is an error.
			if _, err := c.BlockStatus(ctx, "qemu:allocation-depth", 0, 4096); !errors.Is(err, ErrNoMetaContext) {
				t.Errorf("BlockStatus with unknown context = %v, want ErrNoMetaContext", err)
			}
		})
	}
}

// TestBlockStatusPartialReplies uses an nbdkit server that describes only
// up to the next 64 KiB boundary per request, so BlockStatus must loop.
func TestBlockStatusPartialReplies(t *testing.T) {
	sock := socketPath(t)
	startServer(t, "unix", sock, "nbdkit", "--foreground", "--unix", sock, "eval",
		"get_size=echo 1048576",
		"pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
		"can_extents=exit 0",
		`extents=off=$4; if [ $(( (off/65536) % 2 )) = 0 ]; then t=; else t=hole,zero; fi; echo $off $((65536 - off % 65536)) $t`,
	)
	c := dialT(t, "unix", sock, Options{MetaContexts: []string{MetaBaseAllocation}})
	off, length := int64(1000), int64(1<<20-3000)
	exts, err := c.BlockStatus(context.Background(), MetaBaseAllocation, off, length)
	if err != nil {
		t.Fatalf("BlockStatus: %v", err)
	}
	checkExtents(t, exts, off, length, make([]byte, 1<<20))
	if len(exts) != 16 {
		t.Fatalf("got %d extents, want 16 alternating: %+v", len(exts), exts)
	}
	for i, e := range exts {
		want := uint32(0)
		if i%2 == 1 {
			want = StateHole | StateZero
		}
		if e.Flags != want {
			t.Errorf("extent %d = %+v, want flags %d", i, e, want)
		}
	}
}

func TestConcurrentReads(t *testing.T) {
	img := newTestImage(t)
	qcow2 := img.convert(t, "qcow2")
	c := dialT(t, "unix", qemuNBD(t, "qcow2", qcow2, "--read-only"), Options{MaxRequest: 512 << 10})
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for g := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for range 40 {
				n := rng.Int64N(2<<20) + 1
				off := rng.Int64N(testImageSize - n)
				p := make([]byte, n)
				if err := c.ReadAt(context.Background(), p, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, img.data[off:off+n]) {
					errs <- fmt.Errorf("goroutine %d: ReadAt(%d, %d) differs at +%d", g, off, n, firstDiff(p, img.data[off:off+n]))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestWriteFlushRoundTrip(t *testing.T) {
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			img := newTestImage(t)
			path := img.convert(t, format)
			sock := qemuNBD(t, format, path, "--discard=unmap")
			c := dialT(t, "unix", sock, Options{MetaContexts: []string{MetaBaseAllocation}, MaxRequest: 1 << 20})
			if c.Flags().ReadOnly() || !c.Flags().CanFlush() || !c.Flags().CanWriteZeroes() || !c.Flags().CanTrim() {
				t.Fatalf("writable export flags = %#x, want writable with flush, write-zeroes and trim", c.Flags())
			}
			ctx := context.Background()
			want := bytes.Clone(img.data)

			// A write larger than MaxRequest, unaligned.
			p := make([]byte, 3<<20+333)
			for i := range p {
				p[i] = byte(i*7 + 3)
			}
			off := int64(10<<20 + 17)
			if err := c.WriteAt(ctx, p, off); err != nil {
				t.Fatalf("WriteAt: %v", err)
			}
			copy(want[off:], p)

			// Zero a data run, letting the server punch a hole.
			if err := c.WriteZeroes(ctx, 5<<20, 3<<20, 0); err != nil {
				t.Fatalf("WriteZeroes: %v", err)
			}
			clear(want[5<<20 : 8<<20])
			// And zero with NO_HOLE.
			if err := c.WriteZeroes(ctx, 0, 64<<10, CmdFlagNoHole); err != nil {
				t.Fatalf("WriteZeroes(NO_HOLE): %v", err)
			}
			clear(want[0 : 64<<10])
			if err := c.Flush(ctx); err != nil {
				t.Fatalf("Flush: %v", err)
			}

			got := make([]byte, testImageSize)
			if err := c.ReadAt(ctx, got, 0); err != nil {
				t.Fatalf("ReadAt: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("read after write differs at %d", firstDiff(got, want))
			}
			exts, err := c.BlockStatus(ctx, MetaBaseAllocation, 5<<20, 3<<20)
			if err != nil {
				t.Fatalf("BlockStatus: %v", err)
			}
			if len(exts) != 1 || exts[0].Flags&StateZero == 0 {
				t.Errorf("zeroed range status = %+v, want one zero extent", exts)
			}
			// Trim needs no particular outcome; it must be accepted.
			if err := c.Trim(ctx, 30<<20, 1<<20); err != nil {
				t.Fatalf("Trim: %v", err)
			}
			if err := c.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}

			// What reached the file, read by qemu-img rather than us.
			out := filepath.Join(t.TempDir(), "out.raw")
			run(t, "qemu-img", "convert", "-f", format, "-O", "raw", "-U", path, out)
			onDisk, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(onDisk, want) {
				t.Fatalf("image file differs from what was written at %d", firstDiff(onDisk, want))
			}
		})
	}
}

func TestWriteToReadOnlyExport(t *testing.T) {
	img := newTestImage(t)
	c := dialT(t, "unix", qemuNBD(t, "raw", img.raw, "--read-only"), Options{})
	ctx := context.Background()
	if err := c.WriteAt(ctx, []byte("x"), 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("WriteAt = %v, want ErrReadOnly", err)
	}
	if err := c.WriteZeroes(ctx, 0, 512, 0); !errors.Is(err, ErrReadOnly) && !errors.Is(err, ErrUnsupported) {
		t.Errorf("WriteZeroes = %v, want ErrReadOnly or ErrUnsupported", err)
	}
}

func TestListExports(t *testing.T) {
	img := newTestImage(t)
	t.Run("qemu-storage-daemon", func(t *testing.T) {
		sock := qsdExport(t, "raw", img.raw, false, "vda", "backup")
		exports, err := ListExports(context.Background(), "unix", sock)
		if err != nil {
			t.Fatalf("ListExports: %v", err)
		}
		got := map[string]string{}
		for _, e := range exports {
			got[e.Name] = e.Description
		}
		if len(got) != 2 || got["vda"] != "disk vda" || got["backup"] != "disk backup" {
			t.Fatalf("ListExports = %+v, want vda and backup with descriptions", exports)
		}
		// The server still serves after a listing.
		c := dialT(t, "unix", sock, Options{ExportName: "backup"})
		if c.Size() != testImageSize {
			t.Errorf("Size = %d after listing", c.Size())
		}
	})
	t.Run("qemu-nbd", func(t *testing.T) {
		sock := qemuNBD(t, "raw", img.raw, "--read-only", "--export-name=only", "--description=the only one")
		exports, err := ListExports(context.Background(), "unix", sock)
		if err != nil {
			t.Fatalf("ListExports: %v", err)
		}
		if len(exports) != 1 || exports[0] != (Export{Name: "only", Description: "the only one"}) {
			t.Fatalf("ListExports = %+v", exports)
		}
	})
}

// nbdinfoMap runs nbdinfo --map and returns its extents, as an independent
// reading of the same meta context.
func nbdinfoMap(t *testing.T, sock, export, metaContext string) []Extent {
	t.Helper()
	uri := fmt.Sprintf("nbd+unix:///%s?socket=%s", export, sock)
	out := run(t, "nbdinfo", "--map="+metaContext, uri)
	var exts []Extent
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("unexpected nbdinfo line %q", line)
		}
		off, _ := strconv.ParseInt(f[0], 10, 64)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		fl, _ := strconv.ParseUint(f[2], 10, 32)
		if k := len(exts); k > 0 && exts[k-1].Flags == uint32(fl) {
			exts[k-1].Length += n
			continue
		}
		exts = append(exts, Extent{Offset: off, Length: n, Flags: uint32(fl)})
	}
	return exts
}

func TestDirtyBitmap(t *testing.T) {
	requireTool(t, "qemu-io")
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", path) // before the bitmap: not dirty
	run(t, "qemu-img", "bitmap", "--add", "--granularity=64K", path, "b0")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 1M 64K", "-c", "write -P 0xbb 10M 100K", path)
	wantDirty := []Extent{
		{0, 1 << 20, 0},
		{1 << 20, 64 << 10, StateDirty},
		{1<<20 + 64<<10, 10<<20 - (1<<20 + 64<<10), 0},
		{10 << 20, 128 << 10, StateDirty}, // 100K rounds up to the granularity
		{10<<20 + 128<<10, 64<<20 - (10<<20 + 128<<10), 0},
	}
	sock := qemuNBD(t, "qcow2", path, "--read-only", "--bitmap=b0", "--export-name=vda")
	bitmap := MetaDirtyBitmapPrefix + "b0"
	c := dialT(t, "unix", sock, Options{ExportName: "vda", MetaContexts: []string{MetaBaseAllocation, bitmap}})
	ids := map[string]uint32{}
	for _, mc := range c.MetaContexts() {
		ids[mc.Name] = mc.ID
	}
	if _, ok := ids[bitmap]; !ok || len(ids) != 2 || ids[bitmap] == ids[MetaBaseAllocation] {
		t.Fatalf("granted meta contexts = %+v, want %s and %s with distinct ids", c.MetaContexts(), MetaBaseAllocation, bitmap)
	}
	got, err := c.BlockStatus(context.Background(), bitmap, 0, c.Size())
	if err != nil {
		t.Fatalf("BlockStatus(%s): %v", bitmap, err)
	}
	if fmt.Sprint(got) != fmt.Sprint(wantDirty) {
		t.Errorf("dirty extents = %v\nwant %v", got, wantDirty)
	}
	if _, err := os.Stat("/usr/bin/nbdinfo"); err == nil {
		if ref := nbdinfoMap(t, sock, "vda", bitmap); fmt.Sprint(ref) != fmt.Sprint(got) {
			t.Errorf("dirty extents = %v\nnbdinfo says %v", got, ref)
		}
	}
	// The allocation context still answers alongside the bitmap.
	alloc, err := c.BlockStatus(context.Background(), MetaBaseAllocation, 0, c.Size())
	if err != nil {
		t.Fatalf("BlockStatus(base:allocation): %v", err)
	}
	if alloc[0].Flags != 0 || alloc[0].Length < 4<<20 {
		t.Errorf("allocation starts with %+v, want data covering the first 4 MiB", alloc[0])
	}
}

func TestDialErrors(t *testing.T) {
	img := newTestImage(t)
	sock := qemuNBD(t, "raw", img.raw, "--read-only", "--export-name=vda")

	refusedSock := socketPath(t)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: refusedSock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close() // the socket file stays, nobody listens
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusedTCP := tl.Addr().String()
	tl.Close()

	tests := []struct {
		name          string
		network, addr string
		export        string
		is            error
		contains      []string
	}{
		{"unknown export", "unix", sock, "nope", ErrExportNotFound, []string{`export "nope" not found`, sock}},
		{"unix connection refused", "unix", refusedSock, "", syscall.ECONNREFUSED, []string{"connection refused", "is the NBD server running", refusedSock}},
		{"tcp connection refused", "tcp", refusedTCP, "", syscall.ECONNREFUSED, []string{"connection refused", refusedTCP}},
		{"no socket", "unix", refusedSock + "-missing", "", syscall.ENOENT, []string{"no such socket"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Dial(context.Background(), tt.network, tt.addr, Options{ExportName: tt.export})
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !errors.Is(err, tt.is) {
				t.Errorf("Dial error %q does not wrap %v", err, tt.is)
			}
			for _, s := range tt.contains {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("Dial error %q does not mention %q", err, s)
				}
			}
		})
	}
}

func TestTCP(t *testing.T) {
	img := newTestImage(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().(*net.TCPAddr)
	l.Close()
	startServer(t, "tcp", addr.String(), "qemu-nbd", "--bind=127.0.0.1", "--port="+strconv.Itoa(addr.Port),
		"--format=raw", "--read-only", "--persistent", "--shared=0", img.raw)
	c := dialT(t, "tcp", addr.String(), Options{})
	p := make([]byte, 8<<20)
	if err := c.ReadAt(context.Background(), p, 1<<20); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if !bytes.Equal(p, img.data[1<<20:9<<20]) {
		t.Fatalf("TCP read differs at +%d", firstDiff(p, img.data[1<<20:9<<20]))
	}
}

func TestServerErrors(t *testing.T) {
	sock := socketPath(t)
	startServer(t, "unix", sock, "nbdkit", "--foreground", "--unix", sock,
		"--filter=error", "memory", "size=1M", "error-pread=EIO", "error-pread-rate=100%",
		"error-zero=ENOSPC", "error-zero-rate=100%")
	c := dialT(t, "unix", sock, Options{})
	ctx := context.Background()
	err := c.ReadAt(ctx, make([]byte, 4096), 8192)
	var nerr *Error
	if !errors.As(err, &nerr) || nerr.Op != "read" || nerr.Offset != 8192 || nerr.Length != 4096 || !errors.Is(err, syscall.EIO) {
		t.Errorf("ReadAt error = %v (%#v), want an *Error for the read at 8192 wrapping EIO", err, nerr)
	}
	if err := c.WriteZeroes(ctx, 1<<19, 1<<19, 0); !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "write-zeroes of 524288 bytes at offset 524288") {
		t.Errorf("WriteZeroes error = %v, want write-zeroes at 524288 failing with ENOSPC", err)
	}
	// Errors are per command: the connection still works.
	if err := c.WriteAt(ctx, []byte("hello"), 100); err != nil {
		t.Errorf("WriteAt after errors: %v", err)
	}
}

func TestCancelAndClose(t *testing.T) {
	sock := socketPath(t)
	// Every read takes 5 seconds.
	startServer(t, "unix", sock, "nbdkit", "--foreground", "--unix", sock,
		"--filter=delay", "memory", "size=1M", "rdelay=5")
	c := dialT(t, "unix", sock, Options{})

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.ReadAt(ctx, make([]byte, 4096), 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAt with deadline = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("cancelled ReadAt took %v", d)
	}

	// A read in flight fails with ErrClosed when the client closes.
	errc := make(chan error, 1)
	go func() { errc <- c.ReadAt(context.Background(), make([]byte, 4096), 0) }()
	time.Sleep(100 * time.Millisecond)
	start = time.Now()
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Errorf("in-flight ReadAt after Close = %v, want ErrClosed", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close with a read in flight took %v", d)
	}
	if err := c.ReadAt(context.Background(), make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadAt after Close = %v, want ErrClosed", err)
	}
}

func TestServerGoesAway(t *testing.T) {
	img := newTestImage(t)
	sock := socketPath(t)
	server := startServer(t, "unix", sock, "qemu-nbd", "--socket="+sock, "--format=raw", "--read-only", "--persistent", img.raw)
	c := dialT(t, "unix", sock, Options{})
	if err := c.ReadAt(context.Background(), make([]byte, 4096), 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	if err := server.Kill(); err != nil {
		t.Fatal(err)
	}
	err := c.ReadAt(context.Background(), make([]byte, 4096), 0)
	if err == nil || !strings.Contains(err.Error(), "closed the connection") {
		t.Fatalf("ReadAt after the server died = %v, want an error saying the server closed the connection", err)
	}
}
