// Package local stores repository objects as files in a local directory, the
// embedded default backend.
//
// Each object is written to a temporary file in its final directory, synced,
// renamed into place, and the directory synced, so an object is either whole
// or absent after a crash.
package local

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// tmpPrefix marks files being written; List skips them. A temporary
// file's name says who writes it: ".tmp-<host>-<pid>-<random>", host a
// short hash of the writer's hostname (hostTag), so that
// RemoveStaleTemp can tell a file whose writer died from one being
// written. Files of the older form ".tmp-<random>" are removed by age
// only.
const tmpPrefix = ".tmp-"

// Backend is a directory on a local filesystem.
type Backend struct {
	root    string
	host    string    // hostTag of this host
	aligned sync.Pool // *[]byte, page-aligned buffers for direct writes
}

// directMin is the object size from which Save bypasses the page cache
// (O_DIRECT): pack files are written once and rarely read back soon, and on
// virtual machines filling the page cache costs more than the device write.
const directMin = 1 << 20

const pageSize = 4096

// Open returns a backend rooted at dir. The directory need not exist yet;
// Save creates directories as needed.
func Open(dir string) (*Backend, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("repository path %q: %w", dir, err)
	}
	name, _ := os.Hostname()
	return &Backend{root: abs, host: hostTag(name)}, nil
}

// hostTag is a short, file-name-safe hash of a hostname.
func hostTag(hostname string) string {
	h := sha256.Sum256([]byte(hostname))
	return hex.EncodeToString(h[:4])
}

// tempName is the name of a temporary file this process writes in dir.
func (b *Backend) tempName(dir string) string {
	return filepath.Join(dir, fmt.Sprintf("%s%s-%d-%s", tmpPrefix, b.host, os.Getpid(), crypt.RandomID().Short()+crypt.RandomID().Short()))
}

// parseTempName returns the host tag and pid in a temporary file's base
// name, ok false for the older form that has neither.
func parseTempName(base string) (host string, pid int, ok bool) {
	parts := strings.Split(strings.TrimPrefix(base, tmpPrefix), "-")
	if len(parts) != 3 || len(parts[0]) != 8 {
		return "", 0, false
	}
	pid, err := strconv.Atoi(parts[1])
	if err != nil || pid <= 0 {
		return "", 0, false
	}
	return parts[0], pid, true
}

// Location implements backend.Backend.
func (b *Backend) Location() string { return "local:" + b.root }

// Root returns the directory.
func (b *Backend) Root() string { return b.root }

func (b *Backend) path(name string) (string, error) {
	if name == "" || strings.HasPrefix(name, "/") || strings.Contains(name, "..") || path.Clean(name) != name {
		return "", fmt.Errorf("invalid object name %q", name)
	}
	return filepath.Join(b.root, filepath.FromSlash(name)), nil
}

func wrap(op, name string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s %s: %w", op, name, backend.ErrNotFound)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("%s %s: %w", op, name, backend.ErrNoSpace)
	}
	return fmt.Errorf("%s %s: %w", op, name, err)
}

// Save implements backend.Backend.
func (b *Backend) Save(ctx context.Context, name string, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p, err := b.path(name)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return wrap("save", name, err)
	}
	tmp := b.tempName(dir)
	err = b.writeFile(tmp, data)
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return wrap("save", name, err)
	}
	return syncDir(dir)
}

// writeFile writes data to a new file and syncs it, directly (O_DIRECT,
// page-aligned, padded then truncated) for large objects when the
// filesystem allows it.
func (b *Backend) writeFile(path string, data []byte) error {
	if len(data) >= directMin {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_DIRECT, 0o600)
		if err == nil {
			err = b.writeDirect(f, data)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			return err
		}
		if !errors.Is(err, syscall.EINVAL) {
			return err
		}
		// The filesystem does not support O_DIRECT (tmpfs): write normally.
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (b *Backend) writeDirect(f *os.File, data []byte) error {
	padded := (len(data) + pageSize - 1) &^ (pageSize - 1)
	var w []byte
	if backend.IsAligned(data) && cap(data) >= padded {
		w = data[:padded] // the caller's buffer is ready for direct I/O
	} else {
		buf := b.alignedBuffer(padded)
		defer b.aligned.Put(buf)
		w = (*buf)[:padded]
		copy(w, data)
	}
	clear(w[len(data):])
	if _, err := f.Write(w); err != nil {
		return err
	}
	if err := f.Truncate(int64(len(data))); err != nil {
		return err
	}
	return f.Sync()
}

// alignedBuffer returns a page-aligned buffer of at least n bytes.
func (b *Backend) alignedBuffer(n int) *[]byte {
	if v, ok := b.aligned.Get().(*[]byte); ok && cap(*v) >= n {
		return v
	}
	a := backend.AlignedBuffer(n)[:n]
	return &a
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// Load implements backend.Backend.
func (b *Backend) Load(ctx context.Context, name string, offset, length int64) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p, err := b.path(name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, wrap("load", name, err)
	}
	defer f.Close()
	if length == 0 {
		st, err := f.Stat()
		if err != nil {
			return nil, wrap("load", name, err)
		}
		length = st.Size() - offset
		if length < 0 {
			return nil, fmt.Errorf("load %s: offset %d beyond size %d: %w", name, offset, st.Size(), backend.ErrTruncated)
		}
	}
	buf := make([]byte, length)
	if err := readAt(f, name, buf, offset); err != nil {
		return nil, err
	}
	return buf, nil
}

// directReadMin is the range size from which LoadInto reads with direct
// I/O when the caller's buffer allows: packs are written with direct I/O,
// so they are not in the page cache anyway, and copying them out of it
// costs more CPU than the device read on virtual machines.
const directReadMin = 64 << 10

// LoadInto implements backend.LoaderInto.
func (b *Backend) LoadInto(ctx context.Context, name string, offset, length int64, buf []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if int64(cap(buf)) < length {
		return nil, fmt.Errorf("load %s: buffer of %d bytes for %d", name, cap(buf), length)
	}
	path, err := b.path(name)
	if err != nil {
		return nil, err
	}
	start := offset &^ (pageSize - 1)
	span := (offset + length - start + pageSize - 1) &^ (pageSize - 1)
	if length >= directReadMin && backend.IsAligned(buf) && int64(cap(buf)) >= span {
		f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
		if err == nil {
			defer f.Close()
			n, err := f.ReadAt(buf[:span], start)
			switch {
			case int64(n) >= offset-start+length:
				return buf[offset-start : offset-start+length], nil
			case err == nil || err == io.EOF:
				return nil, fmt.Errorf("load %s: range %d+%d: %w", name, offset, length, backend.ErrTruncated)
			case !errors.Is(err, syscall.EINVAL):
				return nil, wrap("load", name, err)
			}
			// EINVAL: the filesystem refuses direct reads; read normally.
		} else if !errors.Is(err, syscall.EINVAL) {
			return nil, wrap("load", name, err)
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, wrap("load", name, err)
	}
	defer f.Close()
	if err := readAt(f, name, buf[:length], offset); err != nil {
		return nil, err
	}
	return buf[:length], nil
}

// readAt fills buf from offset of f, object name.
func readAt(f *os.File, name string, buf []byte, offset int64) error {
	n, err := f.ReadAt(buf, offset)
	if err == io.EOF && n == len(buf) {
		err = nil
	}
	if err != nil {
		if err == io.EOF {
			return fmt.Errorf("load %s: range %d+%d: %w", name, offset, len(buf), backend.ErrTruncated)
		}
		return wrap("load", name, err)
	}
	return nil
}

var _ backend.LoaderInto = (*Backend)(nil)

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	p, err := b.path(name)
	if err != nil {
		return backend.ObjectInfo{}, err
	}
	st, err := os.Stat(p)
	if err != nil {
		return backend.ObjectInfo{}, wrap("stat", name, err)
	}
	return backend.ObjectInfo{Name: name, Size: st.Size(), ModTime: st.ModTime()}, nil
}

// List implements backend.Backend.
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	// Walk from the deepest existing directory that covers prefix.
	start := b.root
	if i := strings.LastIndex(prefix, "/"); i >= 0 {
		start = filepath.Join(b.root, filepath.FromSlash(prefix[:i]))
	}
	err := filepath.WalkDir(start, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, rerr := filepath.Rel(b.root, p)
		if rerr != nil {
			return rerr
		}
		name := filepath.ToSlash(rel)
		if d.IsDir() {
			if name != "." && !strings.HasPrefix(name+"/", prefix) && !strings.HasPrefix(prefix, name+"/") {
				return filepath.SkipDir
			}
			return nil
		}
		if strings.HasPrefix(d.Name(), tmpPrefix) || !strings.HasPrefix(name, prefix) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while listing
			}
			return err
		}
		return fn(backend.ObjectInfo{Name: name, Size: info.Size(), ModTime: info.ModTime()})
	})
	if err != nil {
		return fmt.Errorf("list %s in %s: %w", prefix, b.root, err)
	}
	return nil
}

// Remove implements backend.Backend.
func (b *Backend) Remove(ctx context.Context, name string) error {
	p, err := b.path(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil {
		return wrap("remove", name, err)
	}
	return nil
}

// RemoveStaleTemp implements backend.TempCleaner. A temporary file is
// removed when this host wrote it and its process is gone, or when it is
// older than backend.StaleTempAge; a file of a live process of this host
// (this one included), or of another host, younger than that is kept.
func (b *Backend) RemoveStaleTemp(ctx context.Context) (n int, bytes int64, err error) {
	now := time.Now()
	err = filepath.WalkDir(b.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.IsDir() || !strings.HasPrefix(d.Name(), tmpPrefix) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // renamed into place meanwhile
			}
			return err
		}
		if !b.tempStale(d.Name(), info.ModTime(), now) {
			return nil
		}
		if err := os.Remove(p); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		n++
		bytes += info.Size()
		return nil
	})
	if err != nil {
		return n, bytes, fmt.Errorf("removing stale temporary files in %s: %w", b.root, err)
	}
	return n, bytes, nil
}

// tempStale decides whether the temporary file base, last modified at
// mod, is abandoned.
func (b *Backend) tempStale(base string, mod, now time.Time) bool {
	if now.Sub(mod) > backend.StaleTempAge {
		return true
	}
	host, pid, ok := parseTempName(base)
	if !ok || host != b.host || pid == os.Getpid() {
		return false
	}
	// ESRCH: no such process. EPERM: it runs, as another user.
	return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}

var _ backend.TempCleaner = (*Backend)(nil)
