package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// memDevice is a Device in memory whose zero 64 KiB blocks are holes and
// whose bad range fails reads.
type memDevice struct {
	data           []byte
	badOff, badLen int64
}

const memBlock = 64 << 10

func (m *memDevice) Size() int64 { return int64(len(m.data)) }

func (m *memDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < m.badOff+m.badLen && off+int64(len(p)) > m.badOff {
		return fmt.Errorf("chunk at %d failed authentication", m.badOff)
	}
	copy(p, m.data[off:])
	return nil
}

func (m *memDevice) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	var out []Extent
	end := min(off+length, m.Size())
	for pos := off; pos < end; {
		bend := min((pos/memBlock+1)*memBlock, end)
		var f uint32
		if zeroRun(m.data[pos:bend]) == int(bend-pos) {
			f = StateHole | StateZero
		}
		if n := len(out); n > 0 && out[n-1].Flags == f {
			out[n-1].Length += bend - pos
		} else {
			out = append(out, Extent{Offset: pos, Length: bend - pos, Flags: f})
		}
		pos = bend
	}
	return out, nil
}

// newMemDevice is 8 MiB with data in some 64 KiB blocks and holes in
// the rest, and a short tail.
func newMemDevice() *memDevice {
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 8<<20+1234)
	for b := 0; b < len(data); b += memBlock {
		if rng.IntN(3) == 0 {
			continue
		}
		for i := b; i < min(b+memBlock, len(data)); i++ {
			data[i] = byte(rng.Uint32())
		}
	}
	return &memDevice{data: data, badOff: -1}
}

func serve(t *testing.T, exports ...ServerExport) string {
	t.Helper()
	sock := socketPath(t)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- (&Server{Exports: exports}).Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock
}

func TestServerReadsAndBlockStatus(t *testing.T) {
	dev := newMemDevice()
	sock := serve(t, ServerExport{Name: "vda", Description: "disk a", Device: dev})
	ctx := context.Background()
	c, err := Dial(ctx, "unix", sock, Options{ExportName: "vda", MetaContexts: []string{MetaBaseAllocation}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Size() != dev.Size() || !c.Flags().ReadOnly() || !c.Flags().CanMultiConn() || !c.StructuredReplies() {
		t.Fatalf("size %d flags %v structured %v", c.Size(), c.Flags(), c.StructuredReplies())
	}
	for _, tc := range []struct {
		name     string
		off, len int64
	}{
		{"whole", 0, dev.Size()},
		{"odd", 12345, 3 << 20},
		{"tail", dev.Size() - 5000, 5000},
		{"empty", 100, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := make([]byte, tc.len)
			for i := range p {
				p[i] = 0xAA // holes must overwrite this
			}
			if err := c.ReadAt(ctx, p, tc.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, dev.data[tc.off:tc.off+tc.len]) {
				t.Fatal("read differs from the device")
			}
			if tc.len == 0 {
				return
			}
			exts, err := c.BlockStatus(ctx, MetaBaseAllocation, tc.off, tc.len)
			if err != nil {
				t.Fatal(err)
			}
			checkExtents(t, exts, tc.off, tc.len, dev.data)
		})
	}
	if err := c.ReadAt(ctx, make([]byte, 10), dev.Size()-5); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("read past the end: %v", err)
	}
	if err := c.WriteAt(ctx, []byte("x"), 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write: %v", err)
	}
}

func TestServerReadError(t *testing.T) {
	dev := newMemDevice()
	dev.badOff, dev.badLen = 1<<20, 256<<10
	sock := serve(t, ServerExport{Name: "vda", Device: dev})
	ctx := context.Background()
	c, err := Dial(ctx, "unix", sock, Options{ExportName: "vda"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.ReadAt(ctx, make([]byte, 4096), 1<<20+8192)
	var ne *Error
	if !errors.As(err, &ne) || ne.Errno != syscall.EIO || !strings.Contains(err.Error(), "failed authentication") {
		t.Fatalf("bad range: %v, want EIO naming the cause", err)
	}
	// The connection and the rest of the device stay usable.
	p := make([]byte, 4096)
	if err := c.ReadAt(ctx, p, 2<<20); err != nil || !bytes.Equal(p, dev.data[2<<20:2<<20+4096]) {
		t.Fatalf("read after the error: %v", err)
	}
}

func TestServerExportsAndConnections(t *testing.T) {
	a, b := newMemDevice(), &memDevice{data: bytes.Repeat([]byte("b"), 1<<20), badOff: -1}
	sock := serve(t, ServerExport{Name: "vda", Description: "first", Device: a}, ServerExport{Name: "vdb", Device: b})
	ctx := context.Background()
	list, err := ListExports(ctx, "unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Name != "vda" || list[0].Description != "first" || list[1].Name != "vdb" {
		t.Fatalf("exports: %+v", list)
	}
	if _, err := Dial(ctx, "unix", sock, Options{ExportName: "nope"}); err == nil || !strings.Contains(err.Error(), `"nope" not found`) {
		t.Fatalf("unknown export: %v", err)
	}
	// "" is the first export.
	c, err := Dial(ctx, "unix", sock, Options{})
	if err != nil || c.Size() != a.Size() {
		t.Fatalf("default export: %v", err)
	}
	c.Close()
	// Many clients at once, each with many requests in flight.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := Dial(ctx, "unix", sock, Options{ExportName: "vda"})
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			var inner sync.WaitGroup
			for j := range 16 {
				inner.Add(1)
				go func() {
					defer inner.Done()
					off := int64((i*16+j)*37000) % (a.Size() - 70000)
					p := make([]byte, 70000)
					if err := c.ReadAt(ctx, p, off); err != nil {
						errs <- err
					} else if !bytes.Equal(p, a.data[off:off+70000]) {
						errs <- fmt.Errorf("client %d read %d at %d differs", i, j, off)
					}
				}()
			}
			inner.Wait()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestServerWithQemuTools reads an export with qemu-img and nbdcopy (real
// clients written by others) and checks their view against the device,
// holes included.
func TestServerWithQemuTools(t *testing.T) {
	dev := newMemDevice()
	sock := serve(t, ServerExport{Name: "vda", Device: dev})
	uri := "nbd+unix:///vda?socket=" + sock
	dir := t.TempDir()
	want := filepath.Join(dir, "want.raw")
	if err := os.WriteFile(want, dev.data, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", want, uri)
	got := filepath.Join(dir, "got.raw")
	run(t, "nbdcopy", "--connections=4", uri, got)
	data, err := os.ReadFile(got)
	if err != nil || !bytes.Equal(data, dev.data) {
		t.Fatalf("nbdcopy copy differs: %v", err)
	}
	out, err := exec.Command(requireTool(t, "nbdinfo"), "--map", uri).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "hole,zero") || !strings.Contains(string(out), "data") {
		t.Fatalf("nbdinfo --map: %v\n%s", err, out)
	}
}
