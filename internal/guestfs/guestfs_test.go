package guestfs

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// checkTree compares the guest filesystem with the host tree it was built
// from: listings, types, contents, modes, owners, times and link targets.
func checkTree(t *testing.T, f FS, img *fsImage) {
	t.Helper()
	err := filepath.Walk(img.src, func(hp string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(img.src, hp)
		gp := "/" + filepath.ToSlash(rel)
		if rel == "." {
			gp = "/"
		}
		e, err := f.Lstat(bg, gp)
		if err != nil {
			t.Errorf("Lstat(%q): %v", gp, err)
			return nil
		}
		st := fi.Sys().(*syscallStat)
		if got, want := e.Mode.Type(), fi.Mode().Type(); got != want {
			t.Errorf("%s: type %v, want %v", gp, got, want)
			return nil
		}
		if img.caps.modes {
			if e.Mode != fi.Mode() {
				t.Errorf("%s: mode %v, want %v", gp, e.Mode, fi.Mode())
			}
		}
		if img.caps.owners && gp != "/" {
			if e.UID != st.Uid || e.GID != st.Gid {
				t.Errorf("%s: owner %d:%d, want %d:%d", gp, e.UID, e.GID, st.Uid, st.Gid)
			}
		}
		if !img.caps.owners && (e.UID != 0 || e.GID != 0) {
			t.Errorf("%s: owner %d:%d on a filesystem without owners", gp, e.UID, e.GID)
		}
		if img.caps.mtime >= 0 && gp != "/" && !(img.fsType == "ext4" && fi.IsDir()) {
			if d := e.ModTime.Sub(fi.ModTime()); d > img.caps.mtime || d < -img.caps.mtime {
				t.Errorf("%s: mtime %v, want %v", gp, e.ModTime, fi.ModTime())
			}
		}
		if (e.ModTime.IsZero() || e.ModTime.Year() < 1980) && !(gp == "/" && img.fsType == "vfat") {
			t.Errorf("%s: implausible mtime %v", gp, e.ModTime)
		}
		switch {
		case fi.IsDir():
			ents, err := f.ReadDir(bg, gp)
			if err != nil {
				t.Errorf("ReadDir(%q): %v", gp, err)
				return nil
			}
			hents, _ := os.ReadDir(hp)
			var got, want []string
			for _, e := range ents {
				if e.Name == "lost+found" || img.big[e.Name] != nil && gp == "/" {
					continue
				}
				got = append(got, e.Name)
			}
			for _, e := range hents {
				want = append(want, e.Name())
			}
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Errorf("ReadDir(%q) = %q, want %q", gp, got, want)
			}
		case fi.Mode().IsRegular():
			if e.Size != fi.Size() {
				t.Errorf("%s: size %d, want %d", gp, e.Size, fi.Size())
			}
			gf, err := f.Open(bg, gp)
			if err != nil {
				t.Errorf("Open(%q): %v", gp, err)
				return nil
			}
			want, _ := os.ReadFile(hp)
			mustEqual(t, gp, readAllAt(t, gf), want)
			if img.caps.hardlinks && e.Nlink != uint32(st.Nlink) {
				t.Errorf("%s: nlink %d, want %d", gp, e.Nlink, st.Nlink)
			}
		case fi.Mode()&os.ModeSymlink != 0:
			want, _ := os.Readlink(hp)
			got, err := f.Readlink(bg, gp)
			if err != nil || got != want {
				t.Errorf("Readlink(%q) = %q, %v; want %q", gp, got, err, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Big files written separately (fragmented where the tools allow).
	for name, want := range img.big {
		gf, err := f.Open(bg, "/"+name)
		if err != nil {
			t.Errorf("Open(%s): %v", name, err)
			continue
		}
		got := readAllAt(t, gf)
		mustEqual(t, name, got, want)
		// Unaligned reads across extent boundaries.
		for _, off := range []int64{1, 4095, 65537, int64(len(want)) - 7000} {
			b := make([]byte, 10000)
			n, _ := gf.ReadAt(b, off)
			if !bytes.Equal(b[:n], want[off:min(off+10000, int64(len(want)))]) {
				t.Errorf("%s: ReadAt(%d) differs", name, off)
			}
		}
	}
	// Specific cases.
	if _, err := f.Lstat(bg, "/etc/nope"); !errors.Is(err, ErrNotExist) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Lstat(/etc/nope) = %v, want ErrNotExist", err)
	} else if !strings.Contains(err.Error(), "/etc/nope: no such file or directory") {
		t.Errorf("error message %q does not name the path", err)
	}
	if _, err := f.ReadDir(bg, "/hello.txt"); !errors.Is(err, ErrNotDir) {
		t.Errorf("ReadDir(file) = %v, want ErrNotDir", err)
	}
	if _, err := f.Open(bg, "/"+path.Dir(deepPath)); !errors.Is(err, ErrIsDir) {
		t.Errorf("Open(dir) = %v, want ErrIsDir", err)
	}
	if e, err := f.Lstat(bg, "/a/b/../b/./c/d/e/f/g/h/i/j/deep.txt"); err != nil || e.Size != 5 {
		t.Errorf("Lstat with dot-dot = %+v, %v", e, err)
	}
	if img.caps.symlinks {
		// Symlink in the middle of a path is followed inside the guest.
		if e, err := f.Lstat(bg, "/dirlink/c/d/e/f/g/h/i/j/deep.txt"); err != nil || e.Size != 5 {
			t.Errorf("Lstat through dirlink = %+v, %v", e, err)
		}
		if _, err := f.Open(bg, "/link"); !errors.Is(err, ErrNotRegular) {
			t.Errorf("Open(symlink) = %v, want ErrNotRegular", err)
		}
	}
	if img.caps.hardlinks && !img.caps.noHardlinkSrc {
		a, _ := f.Lstat(bg, "/hello.txt")
		b, _ := f.Lstat(bg, "/hardlink.txt")
		if a.Ino == 0 || a.Ino != b.Ino || a.Nlink != 2 {
			t.Errorf("hard link: ino %d/%d nlink %d", a.Ino, b.Ino, a.Nlink)
		}
	}
}

// fragments returns the number of extents of a file, to check that the
// test images exercise fragmented layouts.
func fragments(t *testing.T, f FS, p string) int {
	gf, err := f.Open(bg, p)
	if err != nil {
		t.Fatal(err)
	}
	if ef, ok := gf.(*guardedFile).f.(*extentFile); ok {
		return len(ef.ext)
	}
	return 1
}

func probeOne(t *testing.T, disk string, name string) (FS, Volume) {
	t.Helper()
	d, size := openDisk(t, disk)
	vols, err := Probe(bg, d, size)
	if err != nil {
		t.Fatalf("Probe: %v", err)
	}
	for _, v := range vols {
		if v.Name == name {
			f, err := Open(bg, d, size, v)
			if err != nil {
				t.Fatalf("Open(%s): %v", name, err)
			}
			return f, v
		}
	}
	t.Fatalf("Probe found no volume %q: %+v", name, vols)
	return nil, Volume{}
}

var allImages = []string{"ext4", "xfs", "vfat", "ntfs"}

func TestWholeDisk(t *testing.T) {
	for _, name := range []string{"ext4", "ext2", "ext4-inline", "xfs", "vfat", "fat12", "fat32", "ntfs"} {
		t.Run(name, func(t *testing.T) {
			img := image(t, name)
			f, v := probeOne(t, img.path, "")
			if v.FSType != img.fsType {
				t.Errorf("FSType %q, want %q", v.FSType, img.fsType)
			}
			if v.Label == "" || v.Offset != 0 || v.Size != fileSize(t, img.path) {
				t.Errorf("volume %+v", v)
			}
			checkTree(t, f, img)
			if img.caps.fragmented && name != "ext4-inline" {
				if n := fragments(t, f, "/big1.bin"); n < 3 {
					t.Errorf("big1.bin has only %d extents; the test image is not fragmented", n)
				}
			}
		})
	}
}

func TestLayouts(t *testing.T) {
	imgs := func(t *testing.T, names ...string) []*fsImage {
		var out []*fsImage
		for _, n := range names {
			out = append(out, image(t, n))
		}
		return out
	}
	layouts := []struct {
		name  string
		build func(t *testing.T) (string, []placed)
	}{
		{"mbr-primary+logical", func(t *testing.T) (string, []placed) {
			return mbrDisk(t, imgs(t, "ext4", "xfs", "vfat"), imgs(t, "ext4", "xfs", "vfat", "ntfs"))
		}},
		{"gpt", func(t *testing.T) (string, []placed) { return gptDisk(t, imgs(t, allImages...)) }},
		{"lvm", func(t *testing.T) (string, []placed) { return lvmDisk(t, imgs(t, allImages...)) }},
	}
	for _, l := range layouts {
		t.Run(l.name, func(t *testing.T) {
			disk, want := l.build(t)
			d, size := openDisk(t, disk)
			vols, err := Probe(bg, d, size)
			if err != nil {
				t.Fatalf("Probe: %v", err)
			}
			byName := map[string]Volume{}
			for _, v := range vols {
				byName[v.Name] = v
			}
			if len(vols) != len(want) {
				t.Errorf("Probe found %d volumes, want %d: %+v", len(vols), len(want), vols)
				for _, v := range vols {
					t.Logf("%s: %s %v %d+%d", v, v.FSType, v.Err, v.Offset, v.Size)
				}
			}
			for _, p := range want {
				t.Run(p.name+"-"+p.img.fsType, func(t *testing.T) {
					v, ok := byName[p.name]
					if !ok {
						t.Fatalf("no volume %s in %+v", p.name, vols)
					}
					if v.FSType != p.img.fsType || v.Err != nil {
						t.Fatalf("volume %s: FSType %q Err %v, want %s", p.name, v.FSType, v.Err, p.img.fsType)
					}
					f, err := Open(bg, d, size, v)
					if err != nil {
						t.Fatal(err)
					}
					checkTree(t, f, p.img)
				})
			}
		})
	}
}

func TestSparse(t *testing.T) {
	for _, name := range []string{"ext4", "ext2", "ntfs", "xfs"} {
		t.Run(name, func(t *testing.T) {
			img := image(t, name)
			f, _ := probeOne(t, img.path, "")
			gf, err := f.Open(bg, "/sparse.bin")
			if err != nil {
				t.Fatal(err)
			}
			if gf.Size() != sparseSize {
				t.Fatalf("size %d", gf.Size())
			}
			b := readAllAt(t, gf)
			if string(b[:5]) != "start" || string(b[3<<20:3<<20+6]) != "middle" || string(b[sparseSize-3:]) != "end" {
				t.Error("sparse file data misplaced")
			}
			if name != "xfs" { // mkfs.xfs -p writes holes as zeros
				ef := gf.(*guardedFile).f.(*extentFile)
				var mapped int64
				for _, e := range ef.ext {
					if !e.zero {
						mapped += e.length
					}
				}
				if mapped > 1<<20 {
					t.Errorf("sparse file maps %d bytes; holes were not kept", mapped)
				}
			}
		})
	}
}

func TestXFSTimesMatchXFSDB(t *testing.T) {
	img := image(t, "xfs")
	f, _ := probeOne(t, img.path, "")
	e, err := f.Lstat(bg, "/hello.txt")
	if err != nil {
		t.Fatal(err)
	}
	if time.Since(e.ModTime) > time.Hour || e.UID != 1000 || e.GID != 1001 {
		t.Errorf("hello.txt: %+v", e)
	}
	out := run(t, nil, "xfs_db", "-r", "-c", "inode "+itoa(e.Ino), "-c", "print core.mtime core.nlinkv2", img.path)
	want := e.ModTime.Format("Jan  2 15:04:05 2006")
	want2 := e.ModTime.Format("Jan 2 15:04:05 2006")
	if !strings.Contains(out, want) && !strings.Contains(out, want2) {
		t.Errorf("xfs_db says %q, we read mtime %v", out, e.ModTime)
	}
}

func itoa(n uint64) string { return strings.TrimSpace(strings.Repeat(" ", 0) + uintToString(n)) }

func uintToString(n uint64) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}
