package qmp

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/source"
)

func (d *disk) Info() source.DiskInfo { return d.info }

func (d *disk) Extents(ctx context.Context, off, length int64) ([]source.Extent, error) {
	if err := d.check("extents of", off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	// The fleecing node's backing is the live disk: its block status
	// covers the whole chain, so unallocated in the fleecing image reads
	// through to the disk as it still is (unchanged since the instant).
	es, err := d.client.BlockStatus(ctx, nbd.MetaBaseAllocation, off, length)
	if err != nil {
		return nil, d.wrap("extents of", off, err)
	}
	out := make([]source.Extent, len(es))
	for i, e := range es {
		out[i] = source.Extent{Offset: e.Offset, Length: e.Length, Zero: e.Flags&nbd.StateZero != 0}
	}
	return out, nil
}

func (d *disk) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := d.check("reading", off, int64(len(p))); err != nil {
		return err
	}
	if err := d.client.ReadAt(ctx, p, off); err != nil {
		return d.wrap("reading", off, err)
	}
	return nil
}

// Close disconnects from the disk's NBD export; End removes the export.
func (d *disk) Close() error {
	if d.client == nil {
		return nil
	}
	return d.client.Close()
}

// Changed reports as non-zero the ranges the base checkpoint's dirty
// bitmap marks as written since that checkpoint.
func (t trackedDisk) Changed(ctx context.Context, off, length int64) ([]source.Extent, error) {
	if err := t.check("changes of", off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	meta := nbd.MetaDirtyBitmapPrefix + bitmapPrefix + t.cp.since
	es, err := t.client.BlockStatus(ctx, meta, off, length)
	if err != nil {
		return nil, t.wrap("changes of", off, err)
	}
	out := make([]source.Extent, len(es))
	for i, e := range es {
		out[i] = source.Extent{Offset: e.Offset, Length: e.Length, Zero: e.Flags&nbd.StateDirty == 0}
	}
	return out, nil
}

func (d *disk) check(op string, off, length int64) error {
	if d.client == nil {
		return fmt.Errorf("%s disk %s of VM %s: the capture was not set up or has ended", op, d.info.Name, d.cp.vmName)
	}
	if off < 0 || length < 0 || off > d.info.Size || length > d.info.Size-off {
		return fmt.Errorf("%s disk %s of VM %s: range [%d, +%d) is outside the disk (%d bytes)", op, d.info.Name, d.cp.vmName, off, length, d.info.Size)
	}
	return nil
}

// wrap adds the disk to err and, when QEMU went away, says so. A lost NBD
// connection is the first sign of a VM that exited: QMP is asked whether
// QEMU is still there.
func (d *disk) wrap(op string, off int64, err error) error {
	if broken := d.cp.brokenErr(); broken != nil {
		return fmt.Errorf("%s disk %s of VM %s at offset %d: %w (%v)", op, d.info.Name, d.cp.vmName, off, broken, err)
	}
	var serverErr *nbd.Error
	if !errors.As(err, &serverErr) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		pctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, qerr := queryStatus(pctx, d.cp.c)
		cancel()
		if errors.Is(qerr, ErrClosed) {
			return fmt.Errorf("%s disk %s of VM %s at offset %d: the VM exited or closed its QMP socket during the backup: %w: run the backup again once it runs", op, d.info.Name, d.cp.vmName, off, err)
		}
	}
	return fmt.Errorf("%s disk %s of VM %s at offset %d: %w", op, d.info.Name, d.cp.vmName, off, err)
}
