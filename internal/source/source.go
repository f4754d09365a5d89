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
	"log/slog"
	"time"
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
// the backup pipeline reads different ranges in parallel. A range that does
// not lie within the disk (negative, or past Size) makes Extents, ReadAt
// and Changed fail; an empty range within it succeeds. Every driver passes
// the conformance suite in internal/source/sourcetest.
type Disk interface {
	Info() DiskInfo
	// Extents describes [off, off+length) as an ordered list of extents that
	// covers the range exactly (adjacent extents of the same kind may or may
	// not be merged). off and length lie within the disk.
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
	// ReadAt fills p with the bytes at off. It fails rather than return short.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// Close releases the disk (and any helper process exporting it). Calls
	// after Close fail; calling Close again does no harm and returns nil or
	// the first call's error. A disk of a Capture may be closed before End,
	// which closes those still open.
	Close() error
}

// ChangeTracker is implemented by disks that know which ranges changed
// since the checkpoint a capture was based on (changed-block tracking:
// QEMU dirty bitmaps). A backup reads only changed ranges of such a disk
// and takes the rest from the previous restore point.
type ChangeTracker interface {
	// Changed describes [off, off+length) as ordered extents covering it
	// exactly; Zero=false marks ranges that changed (must be read), Zero=true
	// ranges that did not change since the base checkpoint. It may report
	// more than was written (QEMU tracks whole clusters), never less.
	Changed(ctx context.Context, off, length int64) ([]Extent, error)
}

// Consistency modes of a live capture.
const (
	ModeApp      = "app"      // guest filesystems frozen through the guest agent around the instant
	ModeCrash    = "crash"    // no agent: one instant across all disks, like a power cut
	ModeSuspend  = "suspend"  // the VM is paused around the instant only
	ModeShutdown = "shutdown" // clean shutdown, offline copy, start again
)

// Capture methods of a live capture: how the point-in-time view is held
// and read.
const (
	// MethodFleece (the default) is the hypervisor's backup job: QEMU keeps
	// the view with copy-before-write into a scratch image and serves it
	// over NBD, so every read goes through the guest's own QEMU.
	MethodFleece = "fleece"
	// MethodOverlay redirects the guest's writes into a new overlay image
	// at the instant and reads the disk images below it, frozen, with a
	// process of Kura's own; the overlay is merged back when the capture
	// ends. The guest's QEMU serves no backup reads and copies nothing
	// before writes; it pays a merge of what the guest wrote meanwhile.
	MethodOverlay = "overlay"
)

// CaptureOptions say how to take a point-in-time view of a VM.
type CaptureOptions struct {
	// Mode is one of the Mode constants; "" means app when the guest agent
	// answers, else crash.
	Mode string
	// Method is one of the Method constants; "" means MethodFleece.
	// Drivers that support only one method refuse the other.
	Method string
	// Since names the checkpoint of the previous backup; the capture's
	// disks then implement ChangeTracker relative to it when they can.
	// "" (or Full) reads everything.
	Since string
	Full  bool
	// Parent, when set, is called once for the checkpoint of the previous
	// backup when Since is "" ("" if there is none). It lets the caller
	// finish work of its own, such as unlocking the repository, while the
	// driver prepares the capture. Drivers call it through SinceCheckpoint,
	// before the point-in-time instant unless ParentReady allows otherwise;
	// an error from it fails the capture, and a driver that has taken the
	// instant by then undoes it (the new checkpoint deleted, the job ended).
	Parent func(context.Context) (string, error)
	// ParentReady, when set, is closed once Parent answers without
	// waiting. While it is open, a driver whose capture is otherwise ready
	// may take the instant first, from the checkpoint it would be told
	// when it can tell that without Parent (say, the VM has only one
	// checkpoint of Kura's), and call Parent right after the instant: a
	// capture then does not wait for the repository's key derivation.
	// Whatever Parent then says, the capture reads no less than it would
	// have read had it waited: a guess that proves wrong reads in full.
	ParentReady <-chan struct{}
	// Logger, when set, is told of the capture's slower steps (at debug
	// level: how long each took), such as the overlay method's merges.
	Logger *slog.Logger
}

// SinceCheckpoint returns the checkpoint to read changes from: Since, or
// what Parent says, or "" when Full.
func (o CaptureOptions) SinceCheckpoint(ctx context.Context) (string, error) {
	since := o.Since
	if o.Parent != nil {
		p, err := o.Parent(ctx)
		if err != nil {
			return "", err
		}
		if since == "" {
			since = p
		}
	}
	if o.Full {
		return "", nil
	}
	return since, nil
}

// DiskNote explains how one disk of a capture must be read.
type DiskNote struct {
	Disk string
	// Read is "changed" when only changed blocks need reading, else "full"
	// with the reason in Reason ("no checkpoint", "raw file: no persistent
	// bitmap", "checkpoint X missing", ...).
	Read   string
	Reason string
}

// Capture is a point-in-time view of all disks of a VM, taken at one
// instant. End must be called to release it (it ends the backup job and
// removes temporary images).
type Capture interface {
	Disks() []Disk
	// Checkpoint names the checkpoint created at this instant; the next
	// backup passes it as Since. "" when the VM cannot track changes.
	Checkpoint() string
	// Notes has one note per disk of Disks; Read is "changed" exactly for
	// the disks that implement ChangeTracker.
	Notes() []DiskNote
	// Mode is the consistency mode actually used; FreezeWindow and Pause
	// are measured from the freeze call to the thaw call and from pause to
	// resume (zero when not applicable).
	Mode() string
	FreezeWindow() time.Duration
	Pause() time.Duration
	// End releases the capture. ok says whether the backup that read it
	// succeeded (a driver may then delete checkpoints older than this one;
	// if not, the checkpoints that existed before the capture stay usable
	// as Since and still cover every change since them). The disks fail
	// from then on. Calling End again does nothing and returns nil or the
	// first call's error.
	End(ctx context.Context, ok bool) error
}

// FreezeParts splits the freeze window of an app-consistent capture: the
// guest agent's freeze call (the guest syncs and freezes its filesystems),
// the instant (what the driver did while the guest was frozen: take the
// point-in-time view of every disk) and the thaw call.
type FreezeParts struct {
	Freeze, Instant, Thaw time.Duration
}

// FreezeBreakdown is implemented by captures that measure the parts of
// their freeze window; the parts are zero when the guest was not frozen.
type FreezeBreakdown interface {
	FreezeParts() FreezeParts
}

// VM is a virtual machine that a driver (libvirt, QMP) can capture.
type VM interface {
	Name() string
	// Config returns the VM's configuration to save with the snapshot
	// (configType is "libvirt-xml", "qemu-cmdline", ...).
	Config(ctx context.Context) (configType, data string, err error)
	Capture(ctx context.Context, opts CaptureOptions) (Capture, error)
}
