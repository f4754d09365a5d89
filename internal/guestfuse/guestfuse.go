// Package guestfuse serves a guest filesystem read through package guestfs
// as a read-only FUSE mount, so that users can browse a VM disk backup with
// ordinary tools (ls, cp, diff) while the host kernel only ever sees the
// FUSE protocol, never the untrusted guest filesystem as a block device.
//
// The mount is read-only, nosuid, nodev and noexec, and the kernel checks
// permissions against the guest's modes, UIDs and GIDs
// (default_permissions). Inode numbers are the guest's, so hard links show
// as one inode with its link count. Because a backup never changes, the
// kernel may cache attributes, names and file data for a long time.
//
// guestfuse knows nothing about the repository or about VMs: it serves a
// guestfs.FS.
package guestfuse

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"strings"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/kura-backup/kura/internal/childenv"
	"github.com/kura-backup/kura/internal/guestfs"
)

// Options tunes Mount.
type Options struct {
	// FSName is the source shown in /proc/mounts and by df, e.g.
	// "kura:web01@abcd1234:vda". It defaults to "kura".
	FSName string
	// Logger receives damaged-filesystem reports and FUSE diagnostics. It
	// defaults to slog.Default().
	Logger *slog.Logger
	// AllowOther lets users other than the one who mounted access the
	// mount (subject to the guest's permission bits); for a non-root user
	// it needs user_allow_other in /etc/fuse.conf.
	AllowOther bool
}

// cacheTimeout is how long the kernel may cache attributes, names and
// negative lookups. Nothing in a backup ever changes.
const cacheTimeout = 10 * time.Minute

// Server is a live FUSE mount of a guest filesystem and the server that
// answers its requests. (It cannot be called Mount, which is the function
// that starts it.)
type Server struct {
	mountpoint string
	server     *fuse.Server
	log        *slog.Logger

	served    chan struct{} // closed when the FUSE server has stopped
	ctxFailed chan struct{} // closed when the unmount at the context's end failed

	mu       sync.Mutex
	unmount  bool  // Unmount has been called
	unmntErr error // result of the first Unmount
	ctxErr   error // error of an Unmount triggered by the context's end
}

// Mount serves f read-only at mountpoint, which must be an existing
// directory, until ctx ends or Unmount is called. It returns once the
// mount is live. The operations f receives are cancelled when ctx ends or
// the caller's system call is interrupted.
//
// Mount fails when the root directory of f cannot be read, when /dev/fuse
// cannot be opened, or when the mount itself fails (as root the mount(2)
// system call is used, otherwise the fusermount3 or fusermount helper).
func Mount(ctx context.Context, f guestfs.FS, mountpoint string, opts Options) (*Server, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	st, err := os.Stat(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("guestfuse: mount point: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("guestfuse: mount point %s is not a directory", mountpoint)
	}
	rootEntry, err := f.Lstat(ctx, "/")
	if err != nil {
		return nil, fmt.Errorf("guestfuse: reading the root directory: %w", err)
	}
	if !rootEntry.Mode.IsDir() {
		return nil, fmt.Errorf("guestfuse: root of the guest filesystem is not a directory: %w", guestfs.ErrCorrupt)
	}
	if rootEntry.Ino == reservedIno {
		rootEntry.Ino = 0
	}

	fsName := opts.FSName
	if fsName == "" {
		fsName = "kura"
	}
	m := &Server{mountpoint: mountpoint, log: logger, served: make(chan struct{}), ctxFailed: make(chan struct{})}
	gfs := &guestFS{f: f, ctx: ctx, log: logger}
	root := &node{gfs: gfs, path: "/", ino: rootEntry.Ino, dir: true}

	timeout := cacheTimeout
	fuseLog := slog.NewLogLogger(logger.Handler(), slog.LevelWarn)
	fopts := &gofs.Options{
		MountOptions: fuse.MountOptions{
			FsName:     fsName,
			Name:       "kura",
			AllowOther: opts.AllowOther,
			// "ro" for fusermount; the flags below for mount(2).
			Options:          []string{"ro", "nosuid", "nodev", "noexec", "default_permissions"},
			DirectMount:      os.Geteuid() == 0,
			DirectMountFlags: syscall.MS_RDONLY | syscall.MS_NOSUID | syscall.MS_NODEV,
			Logger:           fuseLog,
			PanicHandler: func(r any) fuse.Status {
				logger.Error("guestfuse: internal error in a FUSE handler", "mountpoint", mountpoint, "panic", fmt.Sprint(r))
				return fuse.EIO
			},
		},
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		NullPermissions: true, // show the guest's modes as they are, 0000 included
		Logger:          fuseLog,
		RootStableAttr:  &gofs.StableAttr{Ino: rootEntry.Ino},
	}
	server, err := fuse.NewServer(gofs.NewNodeFS(root, fopts), mountpoint, &fopts.MountOptions)
	if err != nil {
		return nil, fmt.Errorf("guestfuse: mounting at %s: %w", mountpoint, err)
	}
	m.server = server
	go func() {
		defer close(m.served)
		server.Serve()
	}()
	if err := server.WaitMount(); err != nil {
		_ = server.Unmount()
		return nil, fmt.Errorf("guestfuse: mounting at %s: %w", mountpoint, err)
	}
	go func() {
		select {
		case <-ctx.Done():
			if err := m.Unmount(); err != nil {
				m.mu.Lock()
				m.ctxErr = err
				m.mu.Unlock()
				close(m.ctxFailed)
			}
		case <-m.served:
		}
	}()
	return m, nil
}

// Unmount unmounts the filesystem. When files on it are still open it
// detaches the mount lazily instead: the mount point is free at once and
// the server stops when the last file is closed (see Wait). Calling it
// again, or after the mount ended otherwise, does nothing and returns the
// first call's result.
func (m *Server) Unmount() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.unmount {
		return m.unmntErr
	}
	m.unmount = true
	select {
	case <-m.served:
		return nil // unmounted from outside
	default:
	}
	err := m.server.Unmount()
	if err == nil {
		return nil
	}
	// Unmounted from outside meanwhile? Then there is nothing to detach,
	// and detaching would hit whatever is mounted there now.
	select {
	case <-m.served:
		return nil
	case <-time.After(100 * time.Millisecond):
	}
	if lerr := lazyUnmount(m.mountpoint); lerr != nil {
		m.unmntErr = fmt.Errorf("guestfuse: unmounting %s: %v; lazy unmount: %w", m.mountpoint, err, lerr)
		return m.unmntErr
	}
	m.log.Warn("guestfuse: mount point busy, detached it lazily", "mountpoint", m.mountpoint, "err", err)
	return nil
}

// lazyUnmount detaches a busy mount with umount2(MNT_DETACH), or through
// fusermount -u -z when that is not permitted.
func lazyUnmount(mountpoint string) error {
	err := syscall.Unmount(mountpoint, syscall.MNT_DETACH)
	if err == nil {
		return nil
	}
	for _, bin := range []string{"fusermount3", "fusermount"} {
		p, lerr := exec.LookPath(bin)
		if lerr != nil {
			continue
		}
		out, ferr := childenv.Command(p, "-u", "-z", mountpoint).CombinedOutput()
		if ferr == nil {
			return nil
		}
		return fmt.Errorf("%s -u -z: %v: %s", bin, ferr, strings.TrimSpace(string(out)))
	}
	return err
}

// Wait blocks until the filesystem is unmounted: by Unmount, by the end of
// the context given to Mount, or from outside (fusermount -u, umount). It
// returns early with the error of the unmount that the context's end
// triggered, if that failed (the mount is then still there).
func (m *Server) Wait() error {
	select {
	case <-m.served:
	case <-m.ctxFailed:
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ctxErr
}

// guestFS is what all nodes of one mount share.
type guestFS struct {
	f   guestfs.FS
	ctx context.Context // the Mount context
	log *slog.Logger
}

// opCtx returns a context for one operation that ends when the kernel
// interrupts the request or the mount's context ends.
func (g *guestFS) opCtx(req context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(req)
	stop := context.AfterFunc(g.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// errno maps a guestfs error to what the kernel returns to the caller.
// Damaged metadata and read errors are logged, since EIO alone does not
// say which file or why.
func (g *guestFS) errno(op, p string, err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return syscall.EINTR
	case errors.Is(err, guestfs.ErrNotExist), errors.Is(err, fs.ErrNotExist):
		return syscall.ENOENT
	case errors.Is(err, guestfs.ErrNotDir):
		return syscall.ENOTDIR
	case errors.Is(err, guestfs.ErrIsDir):
		return syscall.EISDIR
	case errors.Is(err, guestfs.ErrNotSymlink), errors.Is(err, guestfs.ErrNotRegular):
		return syscall.EINVAL
	case errors.Is(err, guestfs.ErrUnsupported):
		return syscall.EOPNOTSUPP
	case errors.Is(err, guestfs.ErrCorrupt):
		g.log.Error("guestfuse: guest filesystem is damaged", "op", op, "path", p, "err", err)
		return syscall.EIO
	}
	g.log.Error("guestfuse: reading the guest filesystem failed", "op", op, "path", p, "err", err)
	return syscall.EIO
}

// reservedIno is an inode number go-fuse reserves for itself. Inode number
// 0 makes go-fuse pick an unused number.
const reservedIno = ^uint64(0)

// node is one file of the guest filesystem, named by the path it was first
// looked up by (a file with several hard links is one node). ino is 0 when
// go-fuse picked the inode number.
type node struct {
	gofs.Inode
	gfs    *guestFS
	path   string
	ino    uint64
	dir    bool
	parent *node // nil for the root
}

var (
	_ gofs.NodeLookuper   = (*node)(nil)
	_ gofs.NodeGetattrer  = (*node)(nil)
	_ gofs.NodeSetattrer  = (*node)(nil)
	_ gofs.NodeReaddirer  = (*node)(nil)
	_ gofs.NodeReadlinker = (*node)(nil)
	_ gofs.NodeOpener     = (*node)(nil)
	_ gofs.NodeStatfser   = (*node)(nil)
)

func (n *node) child(name string) string { return path.Join(n.path, name) }

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	ctx, cancel := n.gfs.opCtx(ctx)
	defer cancel()
	p := n.child(name)
	e, err := n.gfs.f.Lstat(ctx, p)
	if err != nil {
		return nil, n.gfs.errno("lookup", p, err)
	}
	if e.Ino == reservedIno {
		return nil, n.gfs.errno("lookup", p, fmt.Errorf("guest inode number %#x: %w", e.Ino, guestfs.ErrCorrupt))
	}
	if e.Mode.IsDir() && e.Ino != 0 {
		// A directory that is its own ancestor would make a loop in the
		// kernel's and go-fuse's trees.
		for a := n; a != nil; a = a.parent {
			if a.ino == e.Ino {
				return nil, n.gfs.errno("lookup", p, fmt.Errorf("directory is also linked at %s (inode %d): %w", a.path, e.Ino, guestfs.ErrCorrupt))
			}
		}
	}
	fillAttr(&out.Attr, e)
	child := &node{gfs: n.gfs, path: p, ino: e.Ino, dir: e.Mode.IsDir(), parent: n}
	return n.NewInode(ctx, child, gofs.StableAttr{Mode: typeBits(e.Mode), Ino: e.Ino}), 0
}

func (n *node) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	ctx, cancel := n.gfs.opCtx(ctx)
	defer cancel()
	e, err := n.gfs.f.Lstat(ctx, n.path)
	if err != nil {
		return n.gfs.errno("stat", n.path, err)
	}
	fillAttr(&out.Attr, e)
	return 0
}

// Setattr covers chmod, chown, truncate and utimes; the read-only mount
// makes the kernel refuse them before they get here.
func (n *node) Setattr(context.Context, gofs.FileHandle, *fuse.SetAttrIn, *fuse.AttrOut) syscall.Errno {
	return syscall.EROFS
}

func (n *node) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	ctx, cancel := n.gfs.opCtx(ctx)
	defer cancel()
	ents, err := n.gfs.f.ReadDir(ctx, n.path)
	if err != nil {
		return nil, n.gfs.errno("readdir", n.path, err)
	}
	list := make([]fuse.DirEntry, 0, len(ents))
	for _, e := range ents {
		if e.Name == "" || e.Name == "." || e.Name == ".." || strings.ContainsAny(e.Name, "/\x00") {
			n.gfs.log.Error("guestfuse: guest filesystem is damaged", "op", "readdir", "path", n.path,
				"err", fmt.Sprintf("invalid file name %q", e.Name))
			continue
		}
		list = append(list, fuse.DirEntry{Name: e.Name, Mode: typeBits(e.Mode), Ino: e.Ino})
	}
	return gofs.NewListDirStream(list), 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	ctx, cancel := n.gfs.opCtx(ctx)
	defer cancel()
	t, err := n.gfs.f.Readlink(ctx, n.path)
	if err != nil {
		return nil, n.gfs.errno("readlink", n.path, err)
	}
	return []byte(t), 0
}

func (n *node) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	ctx, cancel := n.gfs.opCtx(ctx)
	defer cancel()
	f, err := n.gfs.f.Open(ctx, n.path)
	if err != nil {
		return nil, 0, n.gfs.errno("open", n.path, err)
	}
	// The data never changes: keep the page cache across opens.
	return &handle{gfs: n.gfs, path: n.path, f: f}, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	*out = fuse.StatfsOut{Bsize: 4096, Frsize: 4096, NameLen: 255}
	return 0
}

// handle is an open regular file.
type handle struct {
	gfs  *guestFS
	path string
	f    guestfs.File
}

var _ gofs.FileReader = (*handle)(nil)

func (h *handle) Read(_ context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if size := h.f.Size(); off >= size {
		return fuse.ReadResultData(nil), 0
	} else if int64(len(dest)) > size-off {
		dest = dest[:size-off]
	}
	// ReadAt takes no context: check the mount's before reading.
	if err := h.gfs.ctx.Err(); err != nil {
		return nil, h.gfs.errno("read", h.path, err)
	}
	n, err := h.f.ReadAt(dest, off)
	if err != nil && !(err == io.EOF && n == len(dest)) {
		if err == io.EOF {
			err = fmt.Errorf("file shorter than its size %d at offset %d: %w", h.f.Size(), off+int64(n), guestfs.ErrCorrupt)
		}
		return nil, h.gfs.errno("read", h.path, err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// typeBits returns the S_IFMT bits of a mode.
func typeBits(m fs.FileMode) uint32 {
	switch {
	case m.IsDir():
		return syscall.S_IFDIR
	case m&fs.ModeSymlink != 0:
		return syscall.S_IFLNK
	case m&fs.ModeNamedPipe != 0:
		return syscall.S_IFIFO
	case m&fs.ModeSocket != 0:
		return syscall.S_IFSOCK
	case m&fs.ModeCharDevice != 0:
		return syscall.S_IFCHR
	case m&fs.ModeDevice != 0:
		return syscall.S_IFBLK
	}
	return syscall.S_IFREG
}

// fillAttr converts an Entry to FUSE attributes. Device nodes get no
// device number (Entry has none, and the mount is nodev anyway).
func fillAttr(a *fuse.Attr, e guestfs.Entry) {
	mode := typeBits(e.Mode) | uint32(e.Mode.Perm())
	if e.Mode&fs.ModeSetuid != 0 {
		mode |= syscall.S_ISUID
	}
	if e.Mode&fs.ModeSetgid != 0 {
		mode |= syscall.S_ISGID
	}
	if e.Mode&fs.ModeSticky != 0 {
		mode |= syscall.S_ISVTX
	}
	size := max(e.Size, 0)
	*a = fuse.Attr{
		Ino:   e.Ino,
		Size:  uint64(size),
		Mode:  mode,
		Nlink: max(e.Nlink, 1),
		Owner: fuse.Owner{Uid: e.UID, Gid: e.GID},
	}
	a.Blksize = 4096
	a.Blocks = (uint64(size) + 511) / 512
	a.SetTimes(timePtr(e.AccessTime), timePtr(e.ModTime), timePtr(e.ChangeTime))
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}
