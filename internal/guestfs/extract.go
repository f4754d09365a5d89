package guestfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ExtractOptions tunes Extract.
type ExtractOptions struct {
	// NoOwners skips setting the guest's UID/GID on extracted files. Owners
	// are only ever set when the process runs as root.
	NoOwners bool
	// Overwrite replaces existing files (not directories, which are merged)
	// in the target directory; without it an existing file is an error.
	Overwrite bool
	// OnError, when set, is called for an error on one guest path; if it
	// returns nil that path is skipped and extraction goes on, otherwise
	// Extract stops with the returned error. Without it the first error
	// stops Extract.
	OnError func(guestPath string, err error) error
}

// ExtractStats counts what Extract created.
type ExtractStats struct {
	Files     int   // regular files written (hard links excluded)
	Dirs      int   // directories created or merged into
	Symlinks  int   // symbolic links created
	HardLinks int   // extra names of a file created with link(2)
	Skipped   int   // device nodes, FIFOs, sockets and paths OnError skipped
	Bytes     int64 // bytes of file data copied
}

// Extract copies the given guest paths (files, symlinks, or directories
// with everything below them) from f into dir on the host, keeping their
// guest paths below dir: "/etc/hostname" becomes dir/etc/hostname. Parent
// directories that do not exist yet are created with mode 0755. It keeps
// modes (including setuid/setgid/sticky), owners (when running as root and
// not opts.NoOwners), modification and access times, symlinks (created as
// is and never followed, even when absolute) and hard links (files with the
// same Ino within one Extract call become links of one file). Sparse files
// stay sparse. Device nodes, FIFOs and sockets are skipped and counted.
//
// Extract never writes outside dir: all file system operations go through
// an os.Root opened on dir, guest names containing "/" or NUL or equal to
// "." or ".." are rejected as corrupt, and directory loops are detected.
func Extract(ctx context.Context, f FS, paths []string, dir string, opts ExtractOptions) (ExtractStats, error) {
	x := &extractor{f: f, opts: opts, links: map[uint64]string{},
		owners: !opts.NoOwners && os.Geteuid() == 0}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return x.stats, fmt.Errorf("guestfs: creating target directory: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return x.stats, fmt.Errorf("guestfs: opening target directory: %w", err)
	}
	defer root.Close()
	x.root = root
	for _, p := range paths {
		gp := cleanPath(p)
		rel := strings.TrimPrefix(gp, "/")
		if rel == "" {
			rel = "."
		}
		e, err := f.Lstat(ctx, gp)
		if err == nil {
			err = root.MkdirAll(path.Dir(rel), 0o755)
		}
		if err == nil {
			err = x.extract(ctx, gp, rel, e, nil)
		}
		if err != nil {
			if err := x.fail(ctx, gp, err); err != nil {
				x.finishDirs()
				return x.stats, err
			}
		}
	}
	return x.stats, x.finishDirs()
}

type extractor struct {
	f      FS
	root   *os.Root
	opts   ExtractOptions
	owners bool
	stats  ExtractStats
	links  map[uint64]string // Ino of a multiply linked file -> host rel path
	dirs   []dirMeta         // directory metadata applied after their contents
}

type dirMeta struct {
	rel string
	e   Entry
}

func (x *extractor) fail(ctx context.Context, gp string, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !strings.HasPrefix(err.Error(), "guestfs:") {
		err = fmt.Errorf("guestfs: extracting %s: %w", gp, err)
	}
	if x.opts.OnError == nil {
		return err
	}
	if err := x.opts.OnError(gp, err); err != nil {
		return err
	}
	x.stats.Skipped++
	return nil
}

func (x *extractor) extract(ctx context.Context, gp, rel string, e Entry, ancestors []uint64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	switch {
	case e.Mode.IsDir():
		return x.dir(ctx, gp, rel, e, ancestors)
	case e.Mode.IsRegular():
		return x.file(ctx, gp, rel, e)
	case e.Mode&fs.ModeSymlink != 0:
		return x.symlink(ctx, gp, rel, e)
	}
	x.stats.Skipped++
	return nil
}

func (x *extractor) dir(ctx context.Context, gp, rel string, e Entry, ancestors []uint64) error {
	for _, a := range ancestors {
		if a == e.Ino {
			return fmt.Errorf("guestfs: %s: directory loop (inode %d is its own ancestor): %w", gp, e.Ino, ErrCorrupt)
		}
	}
	if len(ancestors) > 1024 {
		return fmt.Errorf("guestfs: %s: directory tree is more than 1024 levels deep: %w", gp, ErrCorrupt)
	}
	if err := x.root.Mkdir(rel, 0o700); err != nil {
		if !errors.Is(err, fs.ErrExist) {
			return err
		}
		if fi, err := x.root.Lstat(rel); err != nil || !fi.IsDir() {
			return fmt.Errorf("guestfs: %s: target exists and is not a directory", gp)
		}
	}
	x.stats.Dirs++
	x.dirs = append(x.dirs, dirMeta{rel: rel, e: e})
	ents, err := x.f.ReadDir(ctx, gp)
	if err != nil {
		return err
	}
	ancestors = append(ancestors, e.Ino)
	for _, c := range ents {
		cgp := path.Join(gp, c.Name)
		if c.Name == "" || c.Name == "." || c.Name == ".." || strings.ContainsAny(c.Name, "/\x00") {
			err = fmt.Errorf("guestfs: %s: invalid file name %q in directory: %w", gp, c.Name, ErrCorrupt)
		} else {
			err = x.extract(ctx, cgp, path.Join(rel, c.Name), c, ancestors)
		}
		if err != nil {
			if err := x.fail(ctx, cgp, err); err != nil {
				return err
			}
		}
	}
	return nil
}

func (x *extractor) file(ctx context.Context, gp, rel string, e Entry) error {
	if e.Nlink > 1 {
		if first, ok := x.links[e.Ino]; ok {
			if x.opts.Overwrite {
				x.root.Remove(rel)
			}
			if err := x.root.Link(first, rel); err != nil {
				return err
			}
			x.stats.HardLinks++
			return nil
		}
	}
	src, err := x.f.Open(ctx, gp)
	if err != nil {
		return err
	}
	flag := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if x.opts.Overwrite {
		if fi, err := x.root.Lstat(rel); err == nil && !fi.IsDir() {
			if err := x.root.Remove(rel); err != nil {
				return err
			}
		}
	}
	out, err := x.root.OpenFile(rel, flag, 0o600)
	if err != nil {
		return err
	}
	n, err := copySparse(ctx, out, src)
	x.stats.Bytes += n
	if err == nil && x.owners {
		err = out.Chown(int(e.UID), int(e.GID))
	}
	if err == nil {
		err = out.Chmod(e.Mode & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky))
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = x.root.Chtimes(rel, e.AccessTime, e.ModTime)
	}
	if err != nil {
		return err
	}
	x.stats.Files++
	if e.Nlink > 1 {
		x.links[e.Ino] = rel
	}
	return nil
}

// copySparse copies src to out, seeking over all-zero blocks so holes stay
// holes.
func copySparse(ctx context.Context, out *os.File, src File) (int64, error) {
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	size := src.Size()
	var written int64
	for off := int64(0); off < size; off += chunk {
		if err := ctx.Err(); err != nil {
			return written, err
		}
		n := int64(chunk)
		if size-off < n {
			n = size - off
		}
		b := buf[:n]
		if m, err := src.ReadAt(b, off); int64(m) < n {
			if err == nil {
				err = fmt.Errorf("short read")
			}
			return written, err
		}
		// Write in 64 KiB pieces, leaving all-zero ones as holes.
		for p := int64(0); p < n; p += sparseBlock {
			piece := b[p:min(p+sparseBlock, n)]
			if !isZero(piece) {
				if _, err := out.WriteAt(piece, off+p); err != nil {
					return written, err
				}
			}
			written += int64(len(piece))
		}
	}
	return written, out.Truncate(size)
}

const sparseBlock = 64 << 10

var zeroPage = make([]byte, sparseBlock)

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroPage))
		if !bytes.Equal(b[:n], zeroPage[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

func (x *extractor) symlink(ctx context.Context, gp, rel string, e Entry) error {
	target, err := x.f.Readlink(ctx, gp)
	if err != nil {
		return err
	}
	if target == "" || strings.ContainsRune(target, 0) {
		return fmt.Errorf("guestfs: %s: invalid symlink target: %w", gp, ErrCorrupt)
	}
	if x.opts.Overwrite {
		if fi, err := x.root.Lstat(rel); err == nil && !fi.IsDir() {
			x.root.Remove(rel)
		}
	}
	if err := x.root.Symlink(target, rel); err != nil {
		return err
	}
	x.stats.Symlinks++
	if x.owners {
		if err := x.root.Lchown(rel, int(e.UID), int(e.GID)); err != nil {
			return err
		}
	}
	// Set the link's own times (lutimes) relative to its parent directory,
	// which the root keeps inside dir.
	parent, err := x.root.Open(path.Dir(rel))
	if err != nil {
		return err
	}
	defer parent.Close()
	ts := []unix.Timespec{timespec(e.AccessTime), timespec(e.ModTime)}
	return unix.UtimesNanoAt(int(parent.Fd()), path.Base(rel), ts, unix.AT_SYMLINK_NOFOLLOW)
}

func timespec(t time.Time) unix.Timespec {
	if t.IsZero() {
		return unix.Timespec{Nsec: unix.UTIME_OMIT}
	}
	return unix.NsecToTimespec(t.UnixNano())
}

// finishDirs applies directory owners, modes and times, deepest first, once
// their contents are written.
func (x *extractor) finishDirs() error {
	var first error
	for i := len(x.dirs) - 1; i >= 0; i-- {
		d := x.dirs[i]
		var err error
		if x.owners {
			err = x.root.Lchown(d.rel, int(d.e.UID), int(d.e.GID))
		}
		if err == nil {
			err = x.root.Chmod(d.rel, d.e.Mode&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky))
		}
		if err == nil {
			err = x.root.Chtimes(d.rel, d.e.AccessTime, d.e.ModTime)
		}
		if err != nil && first == nil {
			first = fmt.Errorf("guestfs: setting metadata of %s: %w", d.rel, err)
		}
	}
	x.dirs = nil
	return first
}
