package guestfs

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestExtract(t *testing.T) {
	for _, name := range []string{"ext4", "ntfs", "vfat"} {
		t.Run(name, func(t *testing.T) {
			img := image(t, name)
			f, _ := probeOne(t, img.path, "")
			dir := t.TempDir()
			st, err := Extract(bg, f, []string{"/"}, dir, ExtractOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%+v", st)
			if st.Files < manyFiles || st.Dirs < 12 || st.Bytes < int64(2*bigSize) {
				t.Errorf("stats %+v", st)
			}
			// Every guest entry has a host counterpart with the same
			// metadata.
			err = filepath.Walk(img.src, func(hp string, fi os.FileInfo, err error) error {
				rel, _ := filepath.Rel(img.src, hp)
				out := filepath.Join(dir, rel)
				ofi, err := os.Lstat(out)
				if err != nil {
					t.Errorf("%s not extracted: %v", rel, err)
					return nil
				}
				ge, err := f.Lstat(bg, "/"+filepath.ToSlash(rel))
				if err != nil {
					t.Fatal(err)
				}
				if ofi.Mode() != ge.Mode {
					t.Errorf("%s: extracted mode %v, guest %v", rel, ofi.Mode(), ge.Mode)
				}
				ost := ofi.Sys().(*syscall.Stat_t)
				if os.Geteuid() == 0 && (ost.Uid != ge.UID || ost.Gid != ge.GID) {
					t.Errorf("%s: owner %d:%d, guest %d:%d", rel, ost.Uid, ost.Gid, ge.UID, ge.GID)
				}
				if !ge.ModTime.IsZero() && !ofi.ModTime().Equal(ge.ModTime) {
					t.Errorf("%s: mtime %v, guest %v", rel, ofi.ModTime(), ge.ModTime)
				}
				switch {
				case ofi.Mode().IsRegular():
					want, _ := os.ReadFile(hp)
					got, _ := os.ReadFile(out)
					mustEqual(t, rel, got, want)
				case ofi.Mode()&fs.ModeSymlink != 0:
					want, _ := os.Readlink(hp)
					got, _ := os.Readlink(out)
					if got != want {
						t.Errorf("%s: link to %q, want %q", rel, got, want)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			for n, want := range img.big {
				got, _ := os.ReadFile(filepath.Join(dir, n))
				mustEqual(t, n, got, want)
			}
			if img.caps.hardlinks {
				a, _ := os.Stat(filepath.Join(dir, "hello.txt"))
				b, _ := os.Stat(filepath.Join(dir, "hardlink.txt"))
				if !os.SameFile(a, b) || st.HardLinks != 1 {
					t.Errorf("hardlink.txt is not a hard link of hello.txt (stats %+v)", st)
				}
				sp, _ := os.Stat(filepath.Join(dir, "sparse.bin"))
				if blocks := sp.Sys().(*syscall.Stat_t).Blocks * 512; blocks > 1<<20 {
					t.Errorf("sparse.bin takes %d bytes on the host; holes were filled", blocks)
				}
			}
		})
	}
}

func TestExtractSelectedPaths(t *testing.T) {
	img := image(t, "ext4")
	f, _ := probeOne(t, img.path, "")
	dir := t.TempDir()
	st, err := Extract(bg, f, []string{"/" + deepPath, "/abslink", "/sub dir ünï"}, dir, ExtractOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 2 || st.Symlinks != 1 || st.Dirs != 1 {
		t.Errorf("stats %+v", st)
	}
	if b, err := os.ReadFile(filepath.Join(dir, deepPath)); err != nil || string(b) != "deep\n" {
		t.Errorf("deep file: %q, %v", b, err)
	}
	if l, err := os.Readlink(filepath.Join(dir, "abslink")); err != nil || l != "/etc/passwd" {
		t.Errorf("abslink: %q, %v", l, err)
	}
	// Extracting again fails on existing files unless Overwrite is set.
	if _, err := Extract(bg, f, []string{"/" + deepPath}, dir, ExtractOptions{}); !errors.Is(err, fs.ErrExist) {
		t.Errorf("second Extract: %v, want ErrExist", err)
	}
	if _, err := Extract(bg, f, []string{"/" + deepPath}, dir, ExtractOptions{Overwrite: true}); err != nil {
		t.Errorf("Extract with Overwrite: %v", err)
	}
	// A missing path is reported, or skipped through OnError.
	var skipped []string
	st, err = Extract(bg, f, []string{"/nope", "/hello.txt"}, t.TempDir(), ExtractOptions{OnError: func(p string, err error) error {
		skipped = append(skipped, p)
		return nil
	}})
	if err != nil || st.Files != 1 || st.Skipped != 1 || len(skipped) != 1 || skipped[0] != "/nope" {
		t.Errorf("OnError: %+v %v %q", st, err, skipped)
	}
}

// evilFS is a guest whose directory entries try to escape the target
// directory. Real mkfs tools cannot create such names, so this one test
// uses a hand-written FS.
type evilFS struct{}

func (evilFS) Lstat(ctx context.Context, p string) (Entry, error) {
	switch p {
	case "/":
		return Entry{Name: "/", Mode: fs.ModeDir | 0o755, Ino: 1}, nil
	case "/esc":
		return Entry{Name: "esc", Mode: fs.ModeSymlink | 0o777, Ino: 2}, nil
	case "/esc/owned", "/d/owned":
		return Entry{Name: "owned", Mode: 0o644, Size: 3, Ino: 4}, nil
	case "/d":
		return Entry{Name: "d", Mode: fs.ModeDir | 0o755, Ino: 5}, nil
	}
	return Entry{}, ErrNotExist
}

func (evilFS) ReadDir(ctx context.Context, p string) ([]Entry, error) {
	switch p {
	case "/":
		return []Entry{
			{Name: "..", Mode: 0o644, Ino: 3},
			{Name: "../../escaped", Mode: 0o644, Ino: 3},
			{Name: "esc", Mode: fs.ModeSymlink | 0o777, Ino: 2},
			{Name: "loop", Mode: fs.ModeDir | 0o755, Ino: 1},
		}, nil
	case "/loop":
		return []Entry{{Name: "loop", Mode: fs.ModeDir | 0o755, Ino: 1}}, nil
	}
	return nil, nil
}

func (evilFS) Open(ctx context.Context, p string) (File, error) { return bytesFile("bad"), nil }
func (evilFS) Readlink(ctx context.Context, p string) (string, error) {
	return "../../..", nil
}

func TestExtractNeverEscapes(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "out")
	var errs []string
	_, err := Extract(bg, evilFS{}, []string{"/", "/esc/owned", "/../../d/owned"}, dir, ExtractOptions{OnError: func(p string, err error) error {
		errs = append(errs, err.Error())
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	filepath.Walk(parent, func(p string, fi os.FileInfo, err error) error {
		if p != parent && p != dir && !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			t.Errorf("wrote outside the target: %s", p)
		}
		return nil
	})
	if _, err := os.Stat(filepath.Join(dir, "d", "owned")); err != nil {
		t.Errorf("/../../d/owned should land in dir/d/owned: %v", err)
	}
	all := strings.Join(errs, "\n")
	for _, want := range []string{"invalid file name", "directory loop"} {
		if !strings.Contains(all, want) {
			t.Errorf("errors %q lack %q", all, want)
		}
	}
	if _, err := os.Lstat(filepath.Join(parent, "escaped")); err == nil {
		t.Error("../../escaped was written")
	}
	if _, err := os.Lstat(filepath.Join(dir, "esc", "owned")); err == nil {
		t.Error("wrote through the extracted symlink")
	}
}

func TestContextCancel(t *testing.T) {
	img := image(t, "ext4")
	f, _ := probeOne(t, img.path, "")
	ctx, cancel := context.WithCancel(bg)
	cancel()
	if _, err := f.ReadDir(ctx, "/many"); !errors.Is(err, context.Canceled) {
		t.Errorf("ReadDir with cancelled context: %v", err)
	}
	ctx, cancel2 := context.WithTimeout(bg, time.Nanosecond)
	defer cancel2()
	time.Sleep(time.Millisecond)
	if _, err := Extract(ctx, f, []string{"/"}, t.TempDir(), ExtractOptions{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Extract with expired context: %v", err)
	}
}
