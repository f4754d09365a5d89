package guestfs

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Test images are built with the real tools (mkfs.*, mtools, ntfs-3g,
// sfdisk, sgdisk, lvm2) from a host source tree, then read back through
// this package and compared with the source.

var toolPackages = map[string]string{
	"mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs",
	"mkfs.xfs": "xfsprogs", "xfs_db": "xfsprogs",
	"mkfs.vfat": "dosfstools", "mcopy": "mtools", "mdel": "mtools", "mmd": "mtools", "mrd": "mtools",
	"mkntfs": "ntfs-3g", "ntfs-3g": "ntfs-3g", "ntfscp": "ntfs-3g", "fusermount": "fuse",
	"sfdisk": "fdisk", "sgdisk": "gdisk",
	"pvcreate": "lvm2", "losetup": "mount",
}

func need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: install the Debian package %s", tool, toolPackages[tool])
		}
	}
}

func run(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), append([]string{"LANG=C.UTF-8", "LC_ALL=C.UTF-8", "TZ=UTC"}, env...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.String()
}

func writeFile(t testing.TB, p string, data []byte, mode os.FileMode) {
	t.Helper()
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

func randBytes(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

var (
	testTime   = time.Date(2021, 3, 4, 5, 6, 8, 0, time.UTC)
	deepPath   = "a/b/c/d/e/f/g/h/i/j/deep.txt"
	utf8Dir    = "sub dir ünï"
	utf8File   = "nested file ☃.txt"
	longTarget = strings.Repeat("long-target-component/", 5) + "end"
	manyFiles  = 300
	bigSize    = 3<<20 + 12345
	sparseSize = int64(6 << 20)
)

// sourceTree builds the host tree that test filesystems are made from.
// With unixExtras it also has symlinks, a hard link, a sparse file, special
// modes and owners. The big files are returned separately so that builders
// can write them fragmented.
func sourceTree(t testing.TB, unixExtras bool) (src string, big map[string][]byte) {
	t.Helper()
	src = filepath.Join(t.TempDir(), "src")
	writeFile(t, filepath.Join(src, "hello.txt"), []byte("hello, world\n"), 0o644)
	writeFile(t, filepath.Join(src, "empty.txt"), nil, 0o644)
	writeFile(t, filepath.Join(src, utf8Dir, utf8File), []byte("nested\n"), 0o644)
	writeFile(t, filepath.Join(src, deepPath), []byte("deep\n"), 0o644)
	for i := 0; i < manyFiles; i++ {
		writeFile(t, filepath.Join(src, "many", fmt.Sprintf("file-with-a-rather-long-name-%04d.txt", i)), []byte(fmt.Sprintf("file %d\n", i)), 0o644)
	}
	big = map[string][]byte{"big1.bin": randBytes(1, bigSize), "big2.bin": randBytes(2, bigSize+4096)}
	if unixExtras {
		writeFile(t, filepath.Join(src, "secret"), []byte("s3cret\n"), 0o600)
		writeFile(t, filepath.Join(src, "suid"), []byte("#!/bin/sh\n"), 0o755|os.ModeSetuid)
		if err := os.Chmod(filepath.Join(src, "suid"), 0o755|os.ModeSetuid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(filepath.Join(src, "secret"), 1234, 5678); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(filepath.Join(src, "hello.txt"), 1000, 1001); err != nil {
			t.Fatal(err)
		}
		os.Mkdir(filepath.Join(src, "sticky"), 0o755)
		if err := os.Chmod(filepath.Join(src, "sticky"), 0o777|os.ModeSticky); err != nil {
			t.Fatal(err)
		}
		// In a fixed order (not a map's): the order of creation is the
		// order cp and mkfs copy the tree in, so it decides where
		// metadata lands, and the fuzz corpus's patches are offsets
		// into the metadata of the image as built.
		for _, l := range [][2]string{{"link", "hello.txt"}, {"abslink", "/etc/passwd"}, {"longlink", longTarget}, {"dirlink", "a/b"}} {
			if err := os.Symlink(l[1], filepath.Join(src, l[0])); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Link(filepath.Join(src, "hello.txt"), filepath.Join(src, "hardlink.txt")); err != nil {
			t.Fatal(err)
		}
		f, err := os.Create(filepath.Join(src, "sparse.bin"))
		if err != nil {
			t.Fatal(err)
		}
		for off, s := range map[int64]string{0: "start", 3 << 20: "middle", sparseSize - 3: "end"} {
			if _, err := f.WriteAt([]byte(s), off); err != nil {
				t.Fatal(err)
			}
		}
		f.Close()
	}
	// Fixed times, children before parents.
	var paths []string
	filepath.Walk(src, func(p string, _ os.FileInfo, _ error) error { paths = append(paths, p); return nil })
	for i := len(paths) - 1; i >= 0; i-- {
		tm := testTime.Add(time.Duration(i) * 2 * time.Second)
		ts := []unix.Timespec{unix.NsecToTimespec(tm.Add(time.Hour).UnixNano()), unix.NsecToTimespec(tm.UnixNano())}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, paths[i], ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			t.Fatal(err)
		}
	}
	return src, big
}

// copyInto writes the image file img into disk at off, skipping zero
// blocks so the disk stays sparse.
func copyInto(t testing.TB, disk string, off int64, img string) {
	t.Helper()
	in, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	buf := make([]byte, 1<<20)
	for pos := int64(0); ; pos += int64(len(buf)) {
		n, err := in.ReadAt(buf, pos)
		if n > 0 && !isZero(buf[:n]) {
			if _, err := out.WriteAt(buf[:n], off+pos); err != nil {
				t.Fatal(err)
			}
		}
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func truncate(t testing.TB, p string, size int64) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func fileSize(t testing.TB, p string) int64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// fsImage is a filesystem image built once per test binary run.
type fsImage struct {
	fsType string
	path   string // image file
	src    string // host tree it was built from
	big    map[string][]byte
	caps   caps
}

type caps struct {
	owners, modes, symlinks, hardlinks bool
	mtime                              time.Duration // allowed error; <0: not preserved
	fragmented                         bool          // big files are fragmented
	noHardlinkSrc                      bool          // hard links in src became copies
}

var (
	imgOnce  = map[string]*sync.Once{}
	imgCache = map[string]*fsImage{}
	imgErr   = map[string]string{}
	imgMu    sync.Mutex
	imgDir   string
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "guestfs-test-")
	if err != nil {
		panic(err)
	}
	imgDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// image returns the named test image ("ext4", "ext2", "ext4-inline",
// "xfs", "vfat", "fat12", "fat32", "ntfs"), building it on first use.
func image(t testing.TB, name string) *fsImage {
	t.Helper()
	imgMu.Lock()
	once, ok := imgOnce[name]
	if !ok {
		once = new(sync.Once)
		imgOnce[name] = once
	}
	imgMu.Unlock()
	once.Do(func() {
		rec := &recorder{TB: t}
		var img *fsImage
		func() {
			defer func() {
				if r := recover(); r != nil && r != errSkip && r != errFatal {
					panic(r)
				}
			}()
			img = buildImage(rec, name)
		}()
		imgMu.Lock()
		imgCache[name] = img
		imgErr[name] = rec.msg
		imgMu.Unlock()
	})
	imgMu.Lock()
	img, msg := imgCache[name], imgErr[name]
	imgMu.Unlock()
	if img == nil {
		if strings.HasPrefix(msg, "skip: ") {
			t.Skip(strings.TrimPrefix(msg, "skip: "))
		}
		t.Fatalf("building %s image: %s", name, msg)
	}
	return img
}

var errSkip, errFatal = new(int), new(int)

// recorder lets image builders use t.Fatal/t.Skip inside a sync.Once
// whose result is shared by several tests.
type recorder struct {
	testing.TB
	msg string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatal(args ...any) {
	r.msg = fmt.Sprint(args...)
	panic(errFatal)
}
func (r *recorder) Fatalf(f string, args ...any) {
	r.msg = fmt.Sprintf(f, args...)
	panic(errFatal)
}
func (r *recorder) Skipf(f string, args ...any) {
	r.msg = "skip: " + fmt.Sprintf(f, args...)
	panic(errSkip)
}
func (r *recorder) Skip(args ...any) {
	r.msg = "skip: " + fmt.Sprint(args...)
	panic(errSkip)
}
func (r *recorder) TempDir() string {
	d, err := os.MkdirTemp(imgDir, "b")
	if err != nil {
		panic(err)
	}
	return d
}

func readAllAt(t testing.TB, f File) []byte {
	t.Helper()
	b := make([]byte, f.Size())
	n, err := f.ReadAt(b, 0)
	if n != len(b) {
		t.Fatalf("reading %d bytes: got %d: %v", len(b), n, err)
	}
	return b
}

func mustEqual(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Errorf("%s: content differs (got %d bytes, want %d)", what, len(got), len(want))
	}
}

func openDisk(t testing.TB, p string) (*os.File, int64) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, fileSize(t, p)
}

var bg = context.Background()
