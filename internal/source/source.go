// Package source defines where disk contents come from: the interface every
// source driver (image files, block devices, libvirt and QMP exports)
// implements, and that the backup pipeline consumes.
//
// A source knows nothing about the repository: it only says how big a disk
// is, which of its extents hold data, and reads bytes.
package source

import (
	"context"
	"errors"
)

// ErrNotFound is returned (wrapped) when a named disk or image does not exist.
var ErrNotFound = errors.New("source not found")

// Extent is a contiguous run of a disk. Zero extents read as all zeros (holes,
// unallocated clusters, or ranges the format knows to be zero) and need not
// be read.
type Extent struct {
	Offset int64
	Length int64
	Zero   bool
}

// DiskInfo describes one disk of a source.
type DiskInfo struct {
	// Name identifies the disk within its VM or backup ("vda", "disk0",
	// or the image's base name).
	Name string
	// Size is the virtual size in bytes.
	Size int64
	// Format is the on-disk format of the source ("raw", "qcow2", "vmdk", ...).
	Format string
	// Path is where the disk lives on the host, if it is a file or device.
	Path string
}

// Disk is the point-in-time contents of one disk.
//
// Implementations must be safe for concurrent use by several goroutines:
// the backup pipeline reads different ranges in parallel.
type Disk interface {
	Info() DiskInfo
	// Extents describes [off, off+length) as an ordered list of extents that
	// covers the range exactly (adjacent extents of the same kind may or may
	// not be merged). off and length lie within the disk.
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
	// ReadAt fills p with the bytes at off. It fails rather than return short.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// Close releases the disk (and any helper process exporting it).
	Close() error
}
