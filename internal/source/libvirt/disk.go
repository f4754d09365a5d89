package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/qsd"
	"github.com/kura-backup/kura/internal/source"
)

// exportDisk is one disk of a live capture: the backup job's NBD export of
// its point-in-time view.
type exportDisk struct {
	info   source.DiskInfo
	client *nbd.Client
	// daemon serves the export for the overlay method (nil: libvirt's
	// backup job does); Close stops it.
	daemon *qsd.Daemon
	// explain adds what became of the VM to a failed read ("the VM is no
	// longer running").
	explain func(ctx context.Context, err error) error

	closeOnce sync.Once
	closeErr  error
}

// trackedDisk is an exportDisk read incrementally: it also says which
// ranges changed since the checkpoint the capture was based on.
type trackedDisk struct {
	*exportDisk
	bitmap string // the meta context, "qemu:dirty-bitmap:backup-vda"
}

var (
	_ source.Disk          = (*exportDisk)(nil)
	_ source.ChangeTracker = (*trackedDisk)(nil)
)

func (d *exportDisk) Info() source.DiskInfo { return d.info }

func (d *exportDisk) checkRange(op string, off, length int64) error {
	if off < 0 || length < 0 || off > d.info.Size || length > d.info.Size-off {
		err := fmt.Errorf("%s disk %s: range [%d, +%d) is outside the disk (%d bytes)", op, d.info.Name, off, length, d.info.Size)
		if op == "reading" && off >= 0 && length >= 0 {
			return fmt.Errorf("%w: %w", err, io.EOF)
		}
		return err
	}
	return nil
}

func (d *exportDisk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := d.checkRange("reading", off, int64(len(p))); err != nil {
		return err
	}
	if err := d.client.ReadAt(ctx, p, off); err != nil {
		return fmt.Errorf("reading disk %s at offset %d: %w", d.info.Name, off, d.explain(ctx, err))
	}
	return nil
}

// Extents maps base:allocation to zero and data extents.
//
// Only NBD_STATE_ZERO counts as zero. The export is the fleecing overlay
// over the VM's disk, and QEMU answers for the whole backing chain; a range
// it calls a hole without calling it zero could still read as data from a
// backing layer, so it is read. (QEMU 7.2 sets ZERO with every HOLE of such
// an export, so nothing is read in vain; the tests check it.)
func (d *exportDisk) Extents(ctx context.Context, off, length int64) ([]source.Extent, error) {
	if err := d.checkRange("describing", off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	status, err := d.client.BlockStatus(ctx, nbd.MetaBaseAllocation, off, length)
	if err != nil {
		return nil, fmt.Errorf("describing disk %s at offset %d: %w", d.info.Name, off, d.explain(ctx, err))
	}
	return toExtents(status, func(flags uint32) bool { return flags&nbd.StateZero != 0 }), nil
}

// Changed maps the backup's dirty bitmap to extents: dirty ranges are
// Zero=false (changed, must be read), clean ones Zero=true.
func (d *trackedDisk) Changed(ctx context.Context, off, length int64) ([]source.Extent, error) {
	if err := d.checkRange("describing the changes of", off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	status, err := d.client.BlockStatus(ctx, d.bitmap, off, length)
	if err != nil {
		return nil, fmt.Errorf("reading the changed blocks of disk %s at offset %d: %w", d.info.Name, off, d.explain(ctx, err))
	}
	return toExtents(status, func(flags uint32) bool { return flags&nbd.StateDirty == 0 }), nil
}

// toExtents converts NBD extents, merging neighbours of the same kind.
func toExtents(status []nbd.Extent, zero func(uint32) bool) []source.Extent {
	exts := make([]source.Extent, 0, len(status))
	for _, e := range status {
		z := zero(e.Flags)
		if n := len(exts); n > 0 && exts[n-1].Zero == z {
			exts[n-1].Length += e.Length
			continue
		}
		exts = append(exts, source.Extent{Offset: e.Offset, Length: e.Length, Zero: z})
	}
	return exts
}

// Close disconnects from the export; the capture's End ends the job.
func (d *exportDisk) Close() error {
	d.closeOnce.Do(func() {
		d.closeErr = d.client.Close()
		if d.daemon != nil {
			d.closeErr = errors.Join(d.closeErr, d.daemon.Close())
		}
	})
	return d.closeErr
}

// offlineDisk is a disk of a shut-down VM read from its file, renamed to
// its target.
type offlineDisk struct {
	source.Disk
	name string
}

func (d *offlineDisk) Info() source.DiskInfo {
	info := d.Disk.Info()
	info.Name = d.name
	return info
}
