// Package image is the source driver for a disk image file or block device
// on the host.
//
// Raw images and block devices are read directly (pread), with holes found
// by SEEK_DATA/SEEK_HOLE. Other formats QEMU understands (qcow2, vmdk,
// vhdx, vdi, ...) are exported read-only by a private qemu-storage-daemon
// (internal/qsd) and read over NBD (internal/nbd), with extents from the
// "base:allocation" meta context. Either way the result is a source.Disk;
// the package knows nothing about repositories or VMs.
package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/qsd"
	"github.com/kura-backup/kura/internal/source"
	"golang.org/x/sys/unix"
)

// Options tune how an image is opened.
type Options struct {
	// Format is the image format ("raw", "qcow2", "vmdk", "vhdx", "vdi",
	// ...). Empty means detect it from the image's magic bytes. A raw disk
	// whose guest wrote another format's header to its first sector is
	// misdetected, so callers that know the format should set it.
	Format string
	// ForceShare reads a non-raw image even while another process (a
	// running VM) has it open for writing. The copy may be inconsistent.
	ForceShare bool
}

// exportName is the NBD export name of the private daemon.
const exportName = "kura"

// readChunk bounds one pread, so that a large ReadAt notices cancellation.
const readChunk = 16 << 20

// Open opens the image at path read-only. ctx bounds the opening only;
// the disk stays usable until Close.
//
// A path that does not exist gives an error wrapping source.ErrNotFound.
func Open(ctx context.Context, path string, opts Options) (source.Disk, error) {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	// Stat first: opening a FIFO would block until someone writes to it.
	st, err := os.Stat(path)
	if err != nil {
		return nil, openError(path, err)
	}
	mode := st.Mode()
	blockDev := mode&fs.ModeDevice != 0 && mode&fs.ModeCharDevice == 0
	switch {
	case mode.IsDir():
		return nil, fmt.Errorf("opening disk image %s: is a directory, not a disk image", path)
	case !mode.IsRegular() && !blockDev:
		return nil, fmt.Errorf("opening disk image %s: not a regular file or block device (%v)", path, mode.Type())
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, openError(path, err)
	}
	info := source.DiskInfo{Name: diskName(path), Path: path, Format: opts.Format}
	if info.Format == "" {
		if info.Format, err = qsd.ProbeFormat(path); err != nil {
			f.Close()
			return nil, err
		}
	}
	if info.Format == "raw" {
		return openRaw(f, info, blockDev)
	}
	f.Close()
	return openQEMU(ctx, info, opts)
}

func openError(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("opening disk image %s: %w: %w", path, source.ErrNotFound, err)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("opening disk image %s: permission denied: run kura as a user who can read it (%w)", path, err)
	}
	return fmt.Errorf("opening disk image %s: %w", path, err)
}

// diskName is the image's base name without its extension.
func diskName(path string) string {
	base := filepath.Base(path)
	if name := strings.TrimSuffix(base, filepath.Ext(base)); name != "" {
		return name
	}
	return base
}

func checkRange(info source.DiskInfo, op string, off, length int64) error {
	if off < 0 || length < 0 || off > info.Size || length > info.Size-off {
		err := fmt.Errorf("%s %s: range [%d, +%d) is outside the disk (%d bytes)", op, info.Path, off, length, info.Size)
		if op == "reading" && off >= 0 && length >= 0 {
			return fmt.Errorf("%w: %w", err, io.EOF)
		}
		return err
	}
	return nil
}

// rawDisk reads a raw image or block device directly.
type rawDisk struct {
	f        *os.File
	info     source.DiskInfo
	blockDev bool

	closeOnce sync.Once
	closeErr  error
}

func openRaw(f *os.File, info source.DiskInfo, blockDev bool) (source.Disk, error) {
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("finding the size of %s: %w", info.Path, err)
	}
	info.Size = size
	return &rawDisk{f: f, info: info, blockDev: blockDev}, nil
}

func (d *rawDisk) Info() source.DiskInfo { return d.info }

// ReadAt uses pread, which does not move the file offset, so concurrent
// calls are safe.
func (d *rawDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := checkRange(d.info, "reading", off, int64(len(p))); err != nil {
		return err
	}
	for done := 0; done < len(p); {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(len(p)-done, readChunk)
		if _, err := d.f.ReadAt(p[done:done+n], off+int64(done)); err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("the file shrank since it was opened: %w", io.ErrUnexpectedEOF)
			}
			return fmt.Errorf("reading %s at offset %d: %w", d.info.Path, off+int64(done), err)
		}
		done += n
	}
	return nil
}

// Extents asks the file system where the data is (SEEK_DATA, SEEK_HOLE).
// A block device, or a file system that cannot tell, is all data.
func (d *rawDisk) Extents(ctx context.Context, off, length int64) ([]source.Extent, error) {
	if err := checkRange(d.info, "describing", off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	if d.blockDev {
		return []source.Extent{{Offset: off, Length: length}}, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var exts []source.Extent
	add := func(start, end int64, zero bool) {
		if n := len(exts); n > 0 && exts[n-1].Zero == zero {
			exts[n-1].Length += end - start
			return
		}
		exts = append(exts, source.Extent{Offset: start, Length: end - start, Zero: zero})
	}
	end := off + length
	var seekErr error
	rc, err := d.f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("describing %s: %w", d.info.Path, err)
	}
	err = rc.Control(func(fd uintptr) {
		for pos := off; pos < end; {
			data, err := unix.Seek(int(fd), pos, unix.SEEK_DATA)
			switch {
			case errors.Is(err, unix.ENXIO):
				// No data at or after pos: the rest is a hole.
				data = end
			case errors.Is(err, unix.EINVAL), errors.Is(err, unix.EOPNOTSUPP):
				// The file system cannot tell: say it is all data.
				add(pos, end, false)
				return
			case err != nil:
				seekErr = err
				return
			}
			if data > pos {
				add(pos, min(data, end), true)
				pos = min(data, end)
				if pos == end {
					return
				}
			}
			hole, err := unix.Seek(int(fd), pos, unix.SEEK_HOLE)
			if err != nil && !errors.Is(err, unix.ENXIO) {
				seekErr = err
				return
			}
			if err != nil || hole <= pos {
				// The file changed under us; reading is always correct.
				hole = end
			}
			add(pos, min(hole, end), false)
			pos = min(hole, end)
		}
	})
	if err == nil {
		err = seekErr
	}
	if err != nil {
		return nil, fmt.Errorf("finding the data extents of %s: %w", d.info.Path, err)
	}
	return exts, nil
}

// Close closes the file; calling it again returns the first call's error.
func (d *rawDisk) Close() error {
	d.closeOnce.Do(func() { d.closeErr = d.f.Close() })
	return d.closeErr
}

// qemuDisk reads an image through a private qemu-storage-daemon.
type qemuDisk struct {
	info       source.DiskInfo
	daemon     *qsd.Daemon
	client     *nbd.Client
	allocation bool // the daemon granted base:allocation
}

func openQEMU(ctx context.Context, info source.DiskInfo, opts Options) (source.Disk, error) {
	daemon, err := qsd.Start(ctx, qsd.Options{
		Path:       info.Path,
		Format:     info.Format,
		ExportName: exportName,
		ForceShare: opts.ForceShare,
	})
	if err != nil {
		return nil, err // names the image and says what the daemon said
	}
	client, err := nbd.Dial(ctx, "unix", daemon.Socket(), nbd.Options{
		ExportName:   daemon.ExportName(),
		MetaContexts: []string{nbd.MetaBaseAllocation},
	})
	if err != nil {
		daemon.Close()
		return nil, fmt.Errorf("opening %s image %s: connecting to qemu-storage-daemon: %w: %s", info.Format, info.Path, err, daemon.Stderr())
	}
	info.Size = client.Size()
	d := &qemuDisk{info: info, daemon: daemon, client: client}
	for _, mc := range client.MetaContexts() {
		d.allocation = d.allocation || mc.Name == nbd.MetaBaseAllocation
	}
	return d, nil
}

func (d *qemuDisk) Info() source.DiskInfo { return d.info }

func (d *qemuDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := checkRange(d.info, "reading", off, int64(len(p))); err != nil {
		return err
	}
	if err := d.client.ReadAt(ctx, p, off); err != nil {
		return d.wrap("reading", off, err)
	}
	return nil
}

// Extents maps base:allocation to zero and data extents.
//
// NBD_STATE_ZERO means the range reads as zeros. NBD_STATE_HOLE alone
// means only "not allocated", which in general may read as anything. For
// this export it is zero too: QEMU answers base:allocation for the whole
// backing chain of a read-only image, and the image formats read here
// (qcow2, vmdk, vhdx, vdi, ...) return zeros for a block allocated in no
// layer. (QEMU 7.2 sets ZERO along with HOLE for all of them; counting
// HOLE as zero keeps that so should a driver report less.)
func (d *qemuDisk) Extents(ctx context.Context, off, length int64) ([]source.Extent, error) {
	if err := checkRange(d.info, "describing", off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	if !d.allocation {
		return []source.Extent{{Offset: off, Length: length}}, nil
	}
	status, err := d.client.BlockStatus(ctx, nbd.MetaBaseAllocation, off, length)
	if err != nil {
		return nil, d.wrap("describing", off, err)
	}
	exts := make([]source.Extent, 0, len(status))
	for _, e := range status {
		zero := e.Flags&(nbd.StateZero|nbd.StateHole) != 0
		if n := len(exts); n > 0 && exts[n-1].Zero == zero {
			exts[n-1].Length += e.Length
			continue
		}
		exts = append(exts, source.Extent{Offset: e.Offset, Length: e.Length, Zero: zero})
	}
	return exts, nil
}

// wrap names the image in err, and adds what the daemon said if it died.
func (d *qemuDisk) wrap(op string, off int64, err error) error {
	select {
	case <-d.daemon.Exited():
		return fmt.Errorf("%s %s at offset %d: qemu-storage-daemon exited: %w: %s", op, d.info.Path, off, err, strings.TrimSpace(d.daemon.Stderr()))
	default:
		return fmt.Errorf("%s %s at offset %d: %w", op, d.info.Path, off, err)
	}
}

func (d *qemuDisk) Close() error {
	return errors.Join(d.client.Close(), d.daemon.Close())
}
