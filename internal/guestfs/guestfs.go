// Package guestfs reads guest filesystems out of a raw disk image in user
// space, so that single files can be restored from a VM disk backup without
// the host kernel ever mounting untrusted guest data.
//
// Probe finds the volumes on a disk (MBR with extended/logical partitions,
// GPT, LVM2 linear logical volumes, or a filesystem spanning the whole disk)
// and Open gives read-only access to one of them through the FS interface.
// Supported filesystems are ext2/3/4, XFS v5, FAT12/16/32 (vfat) and NTFS,
// each with an own parser written for untrusted input: every loop over
// on-disk structures is bounded, allocations sized from on-disk fields are
// capped, and damaged metadata yields errors matching ErrCorrupt instead of
// panics or hangs. Extract copies files and directory trees from an FS to the
// host without ever writing outside the target directory.
//
// The package only reads through the io.ReaderAt it is given, at the offsets
// the metadata points to; it never reads the whole disk. Small metadata reads
// go through a bounded page cache per opened volume.
//
// guestfs knows nothing about the repository or about VMs: it sees a disk as
// bytes.
package guestfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"
	"sync"
	"time"
)

// Errors returned by this package match these sentinels with errors.Is.
var (
	// ErrNotExist means a path does not exist in the guest filesystem.
	// errors.Is(err, fs.ErrNotExist) also holds.
	ErrNotExist error = &sentinel{"no such file or directory", fs.ErrNotExist}
	// ErrCorrupt means on-disk metadata is inconsistent: the disk image is
	// damaged, truncated, or not the filesystem it claims to be.
	ErrCorrupt = errors.New("corrupt filesystem metadata")
	// ErrUnsupported means the data is valid but uses a feature this package
	// does not read (for example NTFS compression or an LVM RAID volume).
	ErrUnsupported = errors.New("unsupported")
	// ErrNotDir, ErrIsDir and ErrNotRegular are returned when a path names
	// the wrong kind of file for the operation.
	ErrNotDir     = errors.New("not a directory")
	ErrIsDir      = errors.New("is a directory")
	ErrNotRegular = errors.New("not a regular file")
	ErrNotSymlink = errors.New("not a symbolic link")
)

type sentinel struct {
	msg string
	is  error
}

func (e *sentinel) Error() string        { return e.msg }
func (e *sentinel) Is(target error) bool { return target == e.is }

// corruptError describes damaged metadata; it matches ErrCorrupt.
type corruptError struct{ msg string }

func (e *corruptError) Error() string        { return e.msg }
func (e *corruptError) Is(target error) bool { return target == ErrCorrupt }

// corruptf returns an error matching ErrCorrupt, e.g.
// corruptf("ext4 inode %d: bad extent magic", ino).
func corruptf(format string, args ...any) error {
	return &corruptError{fmt.Sprintf(format, args...)}
}

// unsupportedf returns an error matching ErrUnsupported.
func unsupportedf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, ErrUnsupported)...)
}

// Volume is a filesystem found on a disk by Probe.
type Volume struct {
	// Name is "p1", "p2", ... for partitions (logical partitions start at
	// p5 as in Linux), "vg/lv" for LVM logical volumes and "" for a
	// filesystem that spans the whole disk.
	Name string
	// FSType is "ext4" (ext2 and ext3 are reported as ext4), "xfs", "vfat"
	// or "ntfs"; it is "" when the volume holds nothing this package can
	// read, and then Err says why.
	FSType string
	Label  string
	// Offset and Size are the volume's byte range on the disk. For an LVM
	// logical volume made of several segments, Offset is that of the first
	// segment; Open uses the full segment map that Probe recorded.
	Offset, Size int64
	// Err is set when FSType is "": it matches ErrUnsupported (no known
	// filesystem, an LVM layout that is not linear) or ErrCorrupt.
	Err error

	segs []segment // LVM: logical to disk mapping; nil means [Offset, Offset+Size)
}

func (v Volume) String() string {
	n := v.Name
	if n == "" {
		n = "disk"
	}
	return n
}

// Entry describes one file in a guest filesystem.
type Entry struct {
	Name string
	// Mode holds the type bits and the permission, setuid, setgid and
	// sticky bits. FAT and NTFS have no Unix modes: directories get 0755,
	// files 0644 (0444/0555 when read-only).
	Mode     fs.FileMode
	UID, GID uint32 // always 0 on FAT and NTFS
	Size     int64
	// ChangeTime is the inode change time (FAT has none: it repeats
	// ModTime; NTFS uses the MFT record change time).
	ModTime, AccessTime, ChangeTime time.Time
	// Ino identifies the file within the filesystem: hard links share it.
	Ino   uint64
	Nlink uint32
}

// File is an opened regular file. Holes in sparse files and unwritten
// extents read as zeros. ReadAt is safe for concurrent use.
type File interface {
	io.ReaderAt
	Size() int64
}

// FS is a read-only guest filesystem. Paths are slash-separated and
// relative to the filesystem root ("/etc/hostname"; a missing leading slash
// is the same path). "." and ".." are resolved lexically and never leave the
// root.
//
// Symbolic links in the middle of a path are followed within the guest
// filesystem (a target is resolved against the guest root, never the
// host's), up to 40 links; the last element of a path is never followed
// except by ReadDir. All methods are safe for concurrent use.
//
// Errors match ErrNotExist, ErrNotDir, ErrIsDir, ErrNotRegular,
// ErrNotSymlink, ErrCorrupt or ErrUnsupported, or are ctx.Err() or an I/O
// error of the underlying disk reader, and name the path involved.
type FS interface {
	// Lstat describes the file at path without following a final symlink.
	Lstat(ctx context.Context, path string) (Entry, error)
	// ReadDir lists a directory, sorted by name, without "." and "..".
	ReadDir(ctx context.Context, path string) ([]Entry, error)
	// Open opens a regular file.
	Open(ctx context.Context, path string) (File, error)
	// Readlink returns a symlink's target as stored in the guest.
	Readlink(ctx context.Context, path string) (string, error)
}

// Limits on what an on-disk field can make us allocate or loop over.
const (
	maxDirEntries = 1 << 20 // entries in one directory
	maxExtents    = 1 << 20 // extents/runs mapped for one file
	maxSymlink    = 4096    // bytes in a symlink target
	maxLinkFollow = 40      // symlinks followed while resolving one path
)

// dirent is one directory entry as a driver lists it.
type dirent struct {
	name   string
	id     uint64
	hidden bool // resolvable by name but left out of ReadDir (NTFS metafiles)
}

// driver is what each filesystem parser implements; the generic fsys turns
// it into an FS. Files are named by a driver-specific id (inode number, MFT
// record number, FAT directory entry offset).
type driver interface {
	fsType() string
	rootID() uint64
	stat(ctx context.Context, id uint64) (Entry, error) // Name left empty
	list(ctx context.Context, id uint64) ([]dirent, error)
	open(ctx context.Context, id uint64) (File, error)
	readlink(ctx context.Context, id uint64) (string, error)
	caseInsensitive() bool
}

// fsys implements FS on top of a driver: path resolution, error wrapping,
// sorting, panic containment and a small directory listing cache.
type fsys struct {
	d    driver
	name string // volume name for messages

	mu   sync.Mutex
	dirs map[uint64][]dirent
}

func newFS(d driver, volName string) *fsys {
	return &fsys{d: d, name: volName, dirs: make(map[uint64][]dirent)}
}

const maxCachedDirs = 256

func (f *fsys) list(ctx context.Context, id uint64) ([]dirent, error) {
	f.mu.Lock()
	ents, ok := f.dirs[id]
	f.mu.Unlock()
	if ok {
		return ents, nil
	}
	ents, err := f.d.list(ctx, id)
	if err != nil {
		return nil, err
	}
	if len(ents) > maxDirEntries {
		return nil, corruptf("%s directory %d has more than %d entries", f.d.fsType(), id, maxDirEntries)
	}
	f.mu.Lock()
	if len(f.dirs) >= maxCachedDirs {
		clear(f.dirs)
	}
	f.dirs[id] = ents
	f.mu.Unlock()
	return ents, nil
}

// wrap turns a driver error into the user-facing form
// "guestfs: p1: /etc/passwd: <what>".
func (f *fsys) wrap(p string, err error) error {
	if err == nil {
		return nil
	}
	var ce *corruptError
	if errors.As(err, &ce) {
		return fmt.Errorf("guestfs: %s: %s: %w — the disk image is damaged", f.name, p, err)
	}
	return fmt.Errorf("guestfs: %s: %s: %w", f.name, p, err)
}

// guard converts a panic in parser code into an ErrCorrupt error. The
// parsers bound-check what they read, so this is a last line of defence.
func guard(err *error) {
	if r := recover(); r != nil {
		*err = corruptf("internal error on malformed metadata: %v", r)
	}
}

func cleanPath(p string) string {
	return path.Clean("/" + p)
}

// resolve walks p from the root and returns the id of its last element,
// following symlinks in the middle of the path (and the last element too
// when followLast is set).
func (f *fsys) resolve(ctx context.Context, p string, followLast bool) (uint64, error) {
	links := 0
	parts := splitPath(cleanPath(p))
	// stack of ids of the directories walked so far; stack[0] is root.
	stack := []uint64{f.d.rootID()}
	for len(parts) > 0 {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		name := parts[0]
		parts = parts[1:]
		switch name {
		case ".":
			continue
		case "..":
			if len(stack) > 1 {
				stack = stack[:len(stack)-1]
			}
			continue
		}
		dir := stack[len(stack)-1]
		e, err := f.d.stat(ctx, dir)
		if err != nil {
			return 0, err
		}
		if !e.Mode.IsDir() {
			return 0, ErrNotDir
		}
		ents, err := f.list(ctx, dir)
		if err != nil {
			return 0, err
		}
		id, ok := f.find(ents, name)
		if !ok {
			return 0, ErrNotExist
		}
		if len(parts) == 0 && !followLast {
			stack = append(stack, id)
			break
		}
		ce, err := f.d.stat(ctx, id)
		if err != nil {
			return 0, err
		}
		if ce.Mode&fs.ModeSymlink == 0 {
			stack = append(stack, id)
			continue
		}
		links++
		if links > maxLinkFollow {
			return 0, fmt.Errorf("too many levels of symbolic links")
		}
		target, err := f.d.readlink(ctx, id)
		if err != nil {
			return 0, err
		}
		if strings.HasPrefix(target, "/") {
			stack = stack[:1]
		}
		parts = append(splitPath(target), parts...)
		if len(parts) > 4096 {
			return 0, fmt.Errorf("path too long after following symbolic links")
		}
	}
	return stack[len(stack)-1], nil
}

func splitPath(p string) []string {
	var out []string
	for _, s := range strings.Split(p, "/") {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}

func (f *fsys) find(ents []dirent, name string) (uint64, bool) {
	for _, e := range ents {
		if e.name == name {
			return e.id, true
		}
	}
	if f.d.caseInsensitive() {
		for _, e := range ents {
			if strings.EqualFold(e.name, name) {
				return e.id, true
			}
		}
	}
	return 0, false
}

func (f *fsys) Lstat(ctx context.Context, p string) (e Entry, err error) {
	defer func() { err = f.wrap(p, err) }()
	defer guard(&err)
	id, err := f.resolve(ctx, p, false)
	if err != nil {
		return Entry{}, err
	}
	e, err = f.d.stat(ctx, id)
	if err != nil {
		return Entry{}, err
	}
	e.Name = path.Base(cleanPath(p))
	return e, nil
}

func (f *fsys) ReadDir(ctx context.Context, p string) (out []Entry, err error) {
	defer func() { err = f.wrap(p, err) }()
	defer guard(&err)
	id, err := f.resolve(ctx, p, true)
	if err != nil {
		return nil, err
	}
	e, err := f.d.stat(ctx, id)
	if err != nil {
		return nil, err
	}
	if !e.Mode.IsDir() {
		return nil, ErrNotDir
	}
	ents, err := f.list(ctx, id)
	if err != nil {
		return nil, err
	}
	out = make([]Entry, 0, len(ents))
	seen := make(map[string]bool, len(ents))
	for _, de := range ents {
		if de.hidden || de.name == "." || de.name == ".." || seen[de.name] {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		seen[de.name] = true
		ce, err := f.d.stat(ctx, de.id)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", de.name, err)
		}
		ce.Name = de.name
		out = append(out, ce)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (f *fsys) Open(ctx context.Context, p string) (file File, err error) {
	defer func() { err = f.wrap(p, err) }()
	defer guard(&err)
	id, err := f.resolve(ctx, p, false)
	if err != nil {
		return nil, err
	}
	e, err := f.d.stat(ctx, id)
	if err != nil {
		return nil, err
	}
	switch {
	case e.Mode.IsDir():
		return nil, ErrIsDir
	case !e.Mode.IsRegular():
		return nil, ErrNotRegular
	}
	file, err = f.d.open(ctx, id)
	if err != nil {
		return nil, err
	}
	return &guardedFile{f: file, fs: f, path: p}, nil
}

func (f *fsys) Readlink(ctx context.Context, p string) (target string, err error) {
	defer func() { err = f.wrap(p, err) }()
	defer guard(&err)
	id, err := f.resolve(ctx, p, false)
	if err != nil {
		return "", err
	}
	e, err := f.d.stat(ctx, id)
	if err != nil {
		return "", err
	}
	if e.Mode&fs.ModeSymlink == 0 {
		return "", ErrNotSymlink
	}
	return f.d.readlink(ctx, id)
}

// guardedFile wraps errors and panics from a driver's file reads.
type guardedFile struct {
	f    File
	fs   *fsys
	path string
}

func (g *guardedFile) Size() int64 { return g.f.Size() }

func (g *guardedFile) ReadAt(p []byte, off int64) (n int, err error) {
	defer func() {
		if err != nil && err != io.EOF {
			err = g.fs.wrap(g.path, err)
		}
	}()
	defer guard(&err)
	return g.f.ReadAt(p, off)
}

// unixMode converts a Unix st_mode to an fs.FileMode.
func unixMode(m uint32) fs.FileMode {
	mode := fs.FileMode(m & 0o777)
	switch m & 0o170000 {
	case 0o010000:
		mode |= fs.ModeNamedPipe
	case 0o020000:
		mode |= fs.ModeDevice | fs.ModeCharDevice
	case 0o040000:
		mode |= fs.ModeDir
	case 0o060000:
		mode |= fs.ModeDevice
	case 0o100000:
	case 0o120000:
		mode |= fs.ModeSymlink
	case 0o140000:
		mode |= fs.ModeSocket
	default:
		mode |= fs.ModeIrregular
	}
	if m&0o4000 != 0 {
		mode |= fs.ModeSetuid
	}
	if m&0o2000 != 0 {
		mode |= fs.ModeSetgid
	}
	if m&0o1000 != 0 {
		mode |= fs.ModeSticky
	}
	return mode
}
