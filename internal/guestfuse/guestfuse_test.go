package guestfuse

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/guestfs"
)

// The tests build a small ext4 image with mkfs.ext4 from a host source
// tree, read it with guestfs, mount it with Mount and compare what the
// real mount shows with the source tree.

var (
	testMtime = time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
	helloData = []byte("hello, world\n")
	bigData   = randBytes(1, 300<<10+123)
	sparseLen = int64(3 << 20)
	sparseEnd = []byte("end of the sparse file\n")
)

// needFUSE skips the test when FUSE mounts or the image tools are not
// available.
func needFUSE(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("FUSE is not available: %v (load the fuse module, or run where /dev/fuse is usable)", err)
	}
	f.Close()
	if _, err := exec.LookPath("fusermount3"); err != nil {
		if _, err := exec.LookPath("fusermount"); err != nil {
			t.Skip("neither fusermount3 nor fusermount found: install the Debian package fuse3")
		}
	}
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: install the Debian package e2fsprogs", tool)
		}
	}
}

func fusermount() string {
	if p, err := exec.LookPath("fusermount3"); err == nil {
		return p
	}
	return "fusermount"
}

func randBytes(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// buildImage creates the source tree and an ext4 image of it.
func buildImage(t *testing.T) (img, src string) {
	t.Helper()
	src = t.TempDir()
	write := func(name string, data []byte, mode os.FileMode) {
		t.Helper()
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
	write("hello.txt", helloData, 0o644)
	write("big.bin", bigData, 0o600)
	write("sub/nested.txt", []byte("nested\n"), 0o644)
	write("sub/deeper/deep.txt", []byte("deep\n"), 0o444)
	write("hard1", []byte("linked\n"), 0o644)
	write("secret", []byte("top secret\n"), 0o640)
	write("broken/victim", []byte("soon unreadable\n"), 0o644)
	write("broken/extent", []byte("extent header will be damaged\n"), 0o644)
	if err := os.Link(filepath.Join(src, "hard1"), filepath.Join(src, "hard2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("hello.txt", filepath.Join(src, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/sub/nested.txt", filepath.Join(src, "sub/abslink")); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(src, "secret"), 1234, 2345); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(filepath.Join(src, "secret"), testMtime, testMtime); err != nil {
		t.Fatal(err)
	}
	sp, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sp.WriteAt(sparseEnd, sparseLen-int64(len(sparseEnd))); err != nil {
		t.Fatal(err)
	}
	if err := sp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(src, 0o755); err != nil {
		t.Fatal(err)
	}

	img = filepath.Join(t.TempDir(), "ext4.img")
	run(t, "mkfs.ext4", "-q", "-F", "-I", "256", "-E", "root_owner=0:0", "-d", src, img, "16M")
	return img, src
}

// openFS opens the single ext4 filesystem in an image.
func openFS(t *testing.T, img string) guestfs.FS {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	vols, err := guestfs.Probe(ctx, f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 1 || vols[0].FSType != "ext4" {
		t.Fatalf("Probe found %+v, want one ext4 volume", vols)
	}
	gfs, err := guestfs.Open(ctx, f, st.Size(), vols[0])
	if err != nil {
		t.Fatal(err)
	}
	return gfs
}

// syncBuffer collects log output from FUSE handler goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// mount mounts f on a new directory and unmounts it when the test ends.
func mount(t *testing.T, ctx context.Context, f guestfs.FS) (*Server, string, *syncBuffer) {
	t.Helper()
	mp := t.TempDir()
	logs := &syncBuffer{}
	m, err := Mount(ctx, f, mp, Options{FSName: "kura:test@0123abcd:vda", Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
		waitDone(t, m)
		if t.Failed() && logs.String() != "" {
			t.Logf("mount log:\n%s", logs)
		}
	})
	return m, mp, logs
}

// waitDone fails the test when Wait does not return within a few seconds.
func waitDone(t *testing.T, m *Server) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- m.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Wait: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return 10 s after the unmount")
	}
}

// mountInfo returns the /proc/self/mountinfo line for a mount point, or "".
func mountInfo(t *testing.T, mp string) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMountPath(fields[4]) == mp {
			return sc.Text()
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return ""
}

func unescapeMountPath(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// within runs fn and fails the test if it has not returned after d: a
// hanging FUSE handler must show as a failure, not a stuck test.
func within(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v", what, d)
	}
}

func statT(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t)
}

func TestMountShowsGuestFiles(t *testing.T) {
	needFUSE(t)
	img, src := buildImage(t)
	gfs := openFS(t, img)
	_, mp, _ := mount(t, context.Background(), gfs)

	line := mountInfo(t, mp)
	if line == "" {
		t.Fatalf("%s is not in /proc/self/mountinfo after Mount", mp)
	}
	for _, want := range []string{" ro,", "nosuid", "nodev", " fuse.kura ", " kura:test@0123abcd:vda "} {
		if !strings.Contains(line, want) {
			t.Errorf("mountinfo line %q lacks %q", line, want)
		}
	}

	within(t, 10*time.Second, "reading the mount", func() {
		t.Run("listing", func(t *testing.T) {
			ents, err := os.ReadDir(mp)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, e := range ents {
				names = append(names, e.Name())
			}
			want := []string{"big.bin", "broken", "hard1", "hard2", "hello.txt", "link", "lost+found", "secret", "sparse", "sub"}
			if !slices.Equal(names, want) {
				t.Errorf("root lists %q, want %q", names, want)
			}
			ents, err = os.ReadDir(filepath.Join(mp, "sub"))
			if err != nil {
				t.Fatal(err)
			}
			got := map[string]os.FileMode{}
			for _, e := range ents {
				got[e.Name()] = e.Type()
			}
			wantTypes := map[string]os.FileMode{"abslink": os.ModeSymlink, "deeper": os.ModeDir, "nested.txt": 0}
			if fmt.Sprint(got) != fmt.Sprint(wantTypes) {
				t.Errorf("sub lists %v, want %v", got, wantTypes)
			}
		})

		t.Run("contents", func(t *testing.T) {
			for name, want := range map[string][]byte{
				"hello.txt":           helloData,
				"big.bin":             bigData,
				"sub/nested.txt":      []byte("nested\n"),
				"sub/deeper/deep.txt": []byte("deep\n"),
				"hard2":               []byte("linked\n"),
				"link":                helloData, // followed by the kernel
			} {
				got, err := os.ReadFile(filepath.Join(mp, name))
				if err != nil {
					t.Errorf("%s: %v", name, err)
				} else if !bytes.Equal(got, want) {
					t.Errorf("%s: read %d bytes that differ from the %d written", name, len(got), len(want))
				}
			}
		})

		t.Run("sparse", func(t *testing.T) {
			got, err := os.ReadFile(filepath.Join(mp, "sparse"))
			if err != nil {
				t.Fatal(err)
			}
			if int64(len(got)) != sparseLen {
				t.Fatalf("sparse file has %d bytes, want %d", len(got), sparseLen)
			}
			hole := got[:sparseLen-int64(len(sparseEnd))]
			if i := bytes.IndexFunc(hole, func(r rune) bool { return r != 0 }); i >= 0 {
				t.Errorf("hole has a non-zero byte at %d", i)
			}
			if !bytes.HasSuffix(got, sparseEnd) {
				t.Errorf("sparse file ends in %q, want %q", got[len(got)-len(sparseEnd):], sparseEnd)
			}
		})

		t.Run("attributes", func(t *testing.T) {
			for _, name := range []string{"hello.txt", "big.bin", "secret", "sub", "sub/deeper/deep.txt", "link", "sparse"} {
				want := statT(t, filepath.Join(src, name))
				got := statT(t, filepath.Join(mp, name))
				if got.Mode != want.Mode {
					t.Errorf("%s: mode %o, want %o", name, got.Mode, want.Mode)
				}
				if got.Uid != want.Uid || got.Gid != want.Gid {
					t.Errorf("%s: owner %d:%d, want %d:%d", name, got.Uid, got.Gid, want.Uid, want.Gid)
				}
				if got.Size != want.Size && want.Mode&syscall.S_IFMT != syscall.S_IFDIR {
					t.Errorf("%s: size %d, want %d", name, got.Size, want.Size)
				}
				// mkfs.ext4 -d keeps whole seconds only; the mount must show
				// exactly what the guest has.
				if got.Mtim.Sec != want.Mtim.Sec {
					t.Errorf("%s: mtime %v, want %v", name, time.Unix(got.Mtim.Unix()), time.Unix(want.Mtim.Unix()))
				}
				e, err := gfs.Lstat(context.Background(), name)
				if err != nil {
					t.Fatal(err)
				}
				if mt := time.Unix(got.Mtim.Unix()); !mt.Equal(e.ModTime) {
					t.Errorf("%s: mtime %v, want the guest's %v", name, mt, e.ModTime)
				}
			}
			st := statT(t, filepath.Join(mp, "secret"))
			if st.Mode != syscall.S_IFREG|0o640 || st.Uid != 1234 || st.Gid != 2345 {
				t.Errorf("secret: mode %o owner %d:%d, want %o 1234:2345", st.Mode, st.Uid, st.Gid, syscall.S_IFREG|0o640)
			}
			if mt := time.Unix(st.Mtim.Unix()); !mt.Equal(testMtime) {
				t.Errorf("secret: mtime %v, want %v", mt.UTC(), testMtime)
			}
			if at := time.Unix(st.Atim.Unix()); !at.Equal(testMtime) {
				t.Errorf("secret: atime %v, want %v", at.UTC(), testMtime)
			}
			// ctime cannot be set on the source; it must be the guest's.
			e, err := gfs.Lstat(context.Background(), "/secret")
			if err != nil {
				t.Fatal(err)
			}
			if ct := time.Unix(st.Ctim.Unix()); !ct.Equal(e.ChangeTime) {
				t.Errorf("secret: ctime %v, want the guest's %v", ct, e.ChangeTime)
			}
			if st.Ino != e.Ino {
				t.Errorf("secret: inode %d, want the guest's %d", st.Ino, e.Ino)
			}
		})

		t.Run("symlinks", func(t *testing.T) {
			for name, want := range map[string]string{"link": "hello.txt", "sub/abslink": "/sub/nested.txt"} {
				got, err := os.Readlink(filepath.Join(mp, name))
				if err != nil || got != want {
					t.Errorf("Readlink(%s) = %q, %v; want %q", name, got, err, want)
				}
			}
		})

		t.Run("hard links", func(t *testing.T) {
			a, b := statT(t, filepath.Join(mp, "hard1")), statT(t, filepath.Join(mp, "hard2"))
			if a.Ino != b.Ino {
				t.Errorf("hard1 is inode %d, hard2 is inode %d; want the same", a.Ino, b.Ino)
			}
			if a.Nlink != 2 || b.Nlink != 2 {
				t.Errorf("link counts %d and %d, want 2", a.Nlink, b.Nlink)
			}
			if c := statT(t, filepath.Join(mp, "hello.txt")); c.Ino == a.Ino || c.Nlink != 1 {
				t.Errorf("hello.txt: inode %d nlink %d, want an own inode with nlink 1", c.Ino, c.Nlink)
			}
		})

		t.Run("read-only", func(t *testing.T) {
			for _, op := range []struct {
				name string
				do   func() error
			}{
				{"write existing file", func() error { return os.WriteFile(filepath.Join(mp, "hello.txt"), []byte("x"), 0o644) }},
				{"open for append", func() error {
					f, err := os.OpenFile(filepath.Join(mp, "hello.txt"), os.O_WRONLY|os.O_APPEND, 0)
					if err == nil {
						f.Close()
					}
					return err
				}},
				{"create file", func() error { return os.WriteFile(filepath.Join(mp, "new.txt"), []byte("x"), 0o644) }},
				{"mkdir", func() error { return os.Mkdir(filepath.Join(mp, "newdir"), 0o755) }},
				{"remove file", func() error { return os.Remove(filepath.Join(mp, "hello.txt")) }},
				{"remove dir", func() error { return os.Remove(filepath.Join(mp, "sub/deeper")) }},
				{"rename", func() error { return os.Rename(filepath.Join(mp, "hello.txt"), filepath.Join(mp, "bye.txt")) }},
				{"symlink", func() error { return os.Symlink("x", filepath.Join(mp, "newlink")) }},
				{"hard link", func() error { return os.Link(filepath.Join(mp, "hello.txt"), filepath.Join(mp, "hard3")) }},
				{"chmod", func() error { return os.Chmod(filepath.Join(mp, "hello.txt"), 0o777) }},
				{"chown", func() error { return os.Lchown(filepath.Join(mp, "hello.txt"), 1, 1) }},
				{"truncate", func() error { return os.Truncate(filepath.Join(mp, "hello.txt"), 0) }},
				{"chtimes", func() error { return os.Chtimes(filepath.Join(mp, "hello.txt"), time.Now(), time.Now()) }},
			} {
				if err := op.do(); !errors.Is(err, syscall.EROFS) {
					t.Errorf("%s: got %v, want EROFS", op.name, err)
				}
			}
			if got, err := os.ReadFile(filepath.Join(mp, "hello.txt")); err != nil || !bytes.Equal(got, helloData) {
				t.Errorf("hello.txt after the write attempts: %q, %v", got, err)
			}
		})

		t.Run("missing", func(t *testing.T) {
			for _, name := range []string{"missing", "sub/missing", "sub/deeper/missing/more"} {
				if _, err := os.Lstat(filepath.Join(mp, name)); !errors.Is(err, syscall.ENOENT) {
					t.Errorf("Lstat(%s): got %v, want ENOENT", name, err)
				}
			}
			if _, err := os.ReadFile(filepath.Join(mp, "missing")); !errors.Is(err, syscall.ENOENT) {
				t.Errorf("ReadFile(missing): got %v, want ENOENT", err)
			}
			if _, err := os.Lstat(filepath.Join(mp, "hello.txt/x")); !errors.Is(err, syscall.ENOTDIR) {
				t.Errorf("Lstat(hello.txt/x): got %v, want ENOTDIR", err)
			}
		})
	})
}

func TestUnmount(t *testing.T) {
	needFUSE(t)
	img, _ := buildImage(t)
	gfs := openFS(t, img)

	t.Run("Unmount", func(t *testing.T) {
		m, mp, _ := mount(t, context.Background(), gfs)
		if err := m.Unmount(); err != nil {
			t.Fatal(err)
		}
		if line := mountInfo(t, mp); line != "" {
			t.Errorf("still mounted after Unmount: %s", line)
		}
		waitDone(t, m)
		if err := m.Unmount(); err != nil {
			t.Errorf("second Unmount: %v", err)
		}
	})

	t.Run("busy", func(t *testing.T) {
		m, mp, logs := mount(t, context.Background(), gfs)
		f, err := os.Open(filepath.Join(mp, "hello.txt"))
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Unmount(); err != nil {
			t.Fatalf("Unmount with an open file: %v", err)
		}
		if line := mountInfo(t, mp); line != "" {
			t.Errorf("still mounted after a lazy Unmount: %s", line)
		}
		if !strings.Contains(logs.String(), "lazily") {
			t.Errorf("log does not say the busy mount was detached lazily:\n%s", logs)
		}
		// The open file stays readable until closed.
		buf := make([]byte, 64)
		if n, err := f.ReadAt(buf, 0); !bytes.Equal(buf[:n], helloData) {
			t.Errorf("reading the open file after a lazy unmount: %q, %v", buf[:n], err)
		}
		f.Close()
		waitDone(t, m)
	})

	t.Run("context end", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		m, mp, _ := mount(t, ctx, gfs)
		cancel()
		waitDone(t, m)
		if line := mountInfo(t, mp); line != "" {
			t.Errorf("still mounted after the context ended: %s", line)
		}
	})

	t.Run("fusermount -u", func(t *testing.T) {
		m, mp, _ := mount(t, context.Background(), gfs)
		run(t, fusermount(), "-u", mp)
		waitDone(t, m)
		if line := mountInfo(t, mp); line != "" {
			t.Errorf("still mounted after fusermount -u: %s", line)
		}
		if err := m.Unmount(); err != nil {
			t.Errorf("Unmount after fusermount -u: %v", err)
		}
	})
}

// inodeOffset returns the byte offset of an ext4 inode in its image.
func inodeOffset(t *testing.T, img string, ino uint64) int64 {
	t.Helper()
	// "Inode 12 is part of block group 0\n\tlocated at block 37, offset 0x0b00"
	out := run(t, "debugfs", "-R", fmt.Sprintf("imap <%d>", ino), img)
	var blk, off int64
	i := strings.Index(out, "located at block ")
	if i < 0 {
		t.Fatalf("debugfs imap: unexpected output %q", out)
	}
	if _, err := fmt.Sscanf(out[i:], "located at block %d, offset %v", &blk, &off); err != nil {
		t.Fatalf("debugfs imap: %v in %q", err, out)
	}
	out = run(t, "debugfs", "-R", "stats -h", img)
	var bs int64
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "Block size:"); ok {
			bs, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	if bs == 0 {
		t.Fatalf("debugfs stats: no block size in %q", out)
	}
	return blk*bs + off
}

func TestCorruptImageGivesEIO(t *testing.T) {
	needFUSE(t)
	img, _ := buildImage(t)
	ctx := context.Background()
	clean := openFS(t, img)
	victim, err := clean.Lstat(ctx, "/broken/victim")
	if err != nil {
		t.Fatal(err)
	}
	extent, err := clean.Lstat(ctx, "/broken/extent")
	if err != nil {
		t.Fatal(err)
	}

	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// Zero the victim's inode in the inode table: it becomes a free
	// inode that a directory still names.
	off := inodeOffset(t, img, victim.Ino)
	clear(data[off : off+256])
	// Break the extent header magic (i_block at 0x28) of the other file:
	// its metadata stays readable, its data does not.
	off = inodeOffset(t, img, extent.Ino)
	data[off+0x28], data[off+0x29] = 0xde, 0xad
	bad := filepath.Join(t.TempDir(), "bad.img")
	if err := os.WriteFile(bad, data, 0o600); err != nil {
		t.Fatal(err)
	}

	_, mp, logs := mount(t, ctx, openFS(t, bad))
	within(t, 10*time.Second, "reading the damaged image", func() {
		if got, err := os.ReadFile(filepath.Join(mp, "hello.txt")); err != nil || !bytes.Equal(got, helloData) {
			t.Errorf("undamaged hello.txt: %q, %v", got, err)
		}
		if _, err := os.ReadFile(filepath.Join(mp, "broken/extent")); !errors.Is(err, syscall.EIO) {
			t.Errorf("reading a file with a damaged extent header: got %v, want EIO", err)
		}
		if _, err := os.Lstat(filepath.Join(mp, "broken/victim")); !errors.Is(err, syscall.EIO) {
			t.Errorf("Lstat of a zeroed inode: got %v, want EIO", err)
		}
		if _, err := os.ReadFile(filepath.Join(mp, "broken/victim")); !errors.Is(err, syscall.EIO) {
			t.Errorf("reading a zeroed inode: got %v, want EIO", err)
		}
		// guestfs.ReadDir fails as a whole when one entry cannot be read.
		if _, err := os.ReadDir(filepath.Join(mp, "broken")); !errors.Is(err, syscall.EIO) {
			t.Errorf("listing a directory with a zeroed inode: got %v, want EIO", err)
		}
	})
	for _, want := range []string{"damaged", "/broken/extent", "/broken/victim"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log does not mention %q:\n%s", want, logs)
		}
	}
}

// faultyFS is an FS whose methods fail or panic on some paths.
type faultyFS struct {
	guestfs.FS
}

type panickyFile struct{ guestfs.File }

func (panickyFile) ReadAt([]byte, int64) (int, error) { panic("boom in ReadAt") }

func (f faultyFS) Lstat(ctx context.Context, p string) (guestfs.Entry, error) {
	switch p {
	case "/panic":
		panic("boom in Lstat")
	case "/unsupported":
		return guestfs.Entry{}, fmt.Errorf("guestfs: %s: compressed: %w", p, guestfs.ErrUnsupported)
	}
	return f.FS.Lstat(ctx, p)
}

func (f faultyFS) Open(ctx context.Context, p string) (guestfs.File, error) {
	file, err := f.FS.Open(ctx, p)
	if err == nil && p == "/big.bin" {
		return panickyFile{file}, nil
	}
	return file, err
}

func TestFaultyFSKeepsServing(t *testing.T) {
	needFUSE(t)
	img, _ := buildImage(t)
	_, mp, logs := mount(t, context.Background(), faultyFS{openFS(t, img)})
	within(t, 10*time.Second, "reading the mount", func() {
		if _, err := os.Lstat(filepath.Join(mp, "panic")); !errors.Is(err, syscall.EIO) {
			t.Errorf("Lstat that panics: got %v, want EIO", err)
		}
		if _, err := os.ReadFile(filepath.Join(mp, "big.bin")); !errors.Is(err, syscall.EIO) {
			t.Errorf("ReadAt that panics: got %v, want EIO", err)
		}
		if _, err := os.Lstat(filepath.Join(mp, "unsupported")); !errors.Is(err, syscall.EOPNOTSUPP) {
			t.Errorf("unsupported feature: got %v, want EOPNOTSUPP", err)
		}
		if got, err := os.ReadFile(filepath.Join(mp, "hello.txt")); err != nil || !bytes.Equal(got, helloData) {
			t.Errorf("hello.txt after the panics: %q, %v", got, err)
		}
	})
	if !strings.Contains(logs.String(), "boom in Lstat") {
		t.Errorf("log does not report the panic:\n%s", logs)
	}
}

func TestErrno(t *testing.T) {
	g := &guestFS{log: slog.New(slog.NewTextHandler(&syncBuffer{}, nil))}
	for _, tc := range []struct {
		name string
		err  error
		want syscall.Errno
	}{
		{"not exist", fmt.Errorf("guestfs: /x: %w", guestfs.ErrNotExist), syscall.ENOENT},
		{"fs.ErrNotExist", os.ErrNotExist, syscall.ENOENT},
		{"not dir", fmt.Errorf("guestfs: /x: %w", guestfs.ErrNotDir), syscall.ENOTDIR},
		{"is dir", fmt.Errorf("guestfs: /x: %w", guestfs.ErrIsDir), syscall.EISDIR},
		{"not regular", guestfs.ErrNotRegular, syscall.EINVAL},
		{"not symlink", guestfs.ErrNotSymlink, syscall.EINVAL},
		{"corrupt", fmt.Errorf("guestfs: /x: %w", guestfs.ErrCorrupt), syscall.EIO},
		{"unsupported", fmt.Errorf("guestfs: /x: %w", guestfs.ErrUnsupported), syscall.EOPNOTSUPP},
		{"cancelled", fmt.Errorf("guestfs: /x: %w", context.Canceled), syscall.EINTR},
		{"deadline", context.DeadlineExceeded, syscall.EINTR},
		{"disk read error", errors.New("read /dev/nbd0: input/output error"), syscall.EIO},
	} {
		if got := g.errno("test", "/x", tc.err); got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}
