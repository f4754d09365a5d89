package restore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// fileTarget writes a raw image: a sparse regular file (written under a
// temporary name and renamed on Commit) or a block device (written in place).
type fileTarget struct {
	f      *os.File
	tmp    string // "" for a device
	final  string
	device bool

	written atomic.Int64 // bytes written since writeback was last started
}

// writebackEvery is how much dirty data may pile up before writeback is
// started in the background, so the final fsync has little left to do.
const writebackEvery = 64 << 20

// NewRawFile opens path as a raw restore target for a disk of size bytes.
// An existing regular file is replaced only if overwrite is set; a block
// device is written in place only if overwrite is set.
func NewRawFile(path string, size int64, overwrite bool) (Target, error) {
	if st, err := os.Stat(path); err == nil && overwrite && st.Mode()&fs.ModeDevice != 0 {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, fmt.Errorf("opening device %s: %w", path, err)
		}
		devSize, err := f.Seek(0, 2)
		if err != nil || devSize < size {
			f.Close()
			return nil, fmt.Errorf("device %s holds %d bytes, the disk needs %d", path, devSize, size)
		}
		return &fileTarget{f: f, final: path, device: true}, nil
	}
	f, err := newPartial(path, overwrite)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("sizing %s: %w", f.Name(), err)
	}
	return &fileTarget{f: f, tmp: f.Name(), final: path}, nil
}

func (t *fileTarget) WriteAt(ctx context.Context, p []byte, off int64) error {
	if t.device {
		_, err := t.f.WriteAt(p, off)
		return err
	}
	err := writeSparse(p, off, sparseBlock, func(p []byte, off int64) error {
		_, err := t.f.WriteAt(p, off)
		return err
	})
	if t.written.Add(int64(len(p))) >= writebackEvery {
		t.written.Store(0)
		// Start writeback of everything dirty without waiting for it.
		_ = unix.SyncFileRange(int(t.f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
	if errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%w: free space on the restore target's filesystem", err)
	}
	return err
}

func (t *fileTarget) NeedsZeroes() bool { return t.device }

func (t *fileTarget) Commit(ctx context.Context) error {
	if err := t.f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", t.final, err)
	}
	if err := t.f.Close(); err != nil {
		return err
	}
	if t.device {
		return nil
	}
	if err := os.Rename(t.tmp, t.final); err != nil {
		os.Remove(t.tmp)
		return fmt.Errorf("moving restored disk into place: %w", err)
	}
	return nil
}

func (t *fileTarget) Abort() {
	t.f.Close()
	if t.tmp != "" {
		os.Remove(t.tmp)
	}
}

// sparseBlock is the granularity at which zero runs inside a chunk are
// left as holes: small enough to keep a restored disk about as sparse as
// its source, large enough that a chunk is written in a few calls.
const sparseBlock = 64 << 10

// newPartial checks that path may be written (it does not exist, or
// overwrite is set) and creates an empty temporary file beside it, which
// Commit later renames to path.
func newPartial(path string, overwrite bool) (*os.File, error) {
	if _, err := os.Stat(path); err == nil && !overwrite {
		return nil, fmt.Errorf("%s: %w; pass --overwrite to replace it", path, ErrExists)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("restore target %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".kura-partial-*")
	if err != nil {
		return nil, fmt.Errorf("creating restore file in %s: %w", dir, err)
	}
	return f, nil
}
