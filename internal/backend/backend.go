// Package backend defines where a repository's objects are stored: one small
// interface that the repository consumes, and that every storage (local
// directory, S3-compatible object store) implements.
//
// A backend stores named, immutable objects. It knows nothing of what the
// objects mean; it never sees plaintext.
package backend

import (
	"context"
	"errors"
	"strings"
	"time"
	"unsafe"
)

// ErrNotFound is returned (wrapped) by Load, Stat and Remove when the named
// object does not exist.
var ErrNotFound = errors.New("object not found")

// ErrTruncated is returned (wrapped) by Load when the asked range runs past
// the end of the object.
var ErrTruncated = errors.New("object is shorter than expected (truncated?)")

// ErrNoSpace is returned (wrapped) by Save when the storage is full.
var ErrNoSpace = errors.New("no space left on the repository's storage")

// ErrExists is returned (wrapped) by Save when a backend that keeps
// write-once names (WriteOnce) already holds other bytes under the name.
var ErrExists = errors.New("object exists with other content (write-once)")

// WriteOnce reports whether name is one the repository writes once and
// never replaces: the config, key files, pack files, index files,
// snapshots, damage records and boot checks, all but the config named by
// random ids. Lock records (locks/) and pending deletions (gc/) are
// rewritten in place and are not write-once.
func WriteOnce(name string) bool {
	if name == "config" {
		return true
	}
	for _, p := range writeOncePrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

var writeOncePrefixes = [...]string{"keys/", "data/", "index/", "snapshots/", "damage/", "bootchecks/"}

// Transient marks err as one that may go away when the call is made again
// (a server's 503, a reset connection, a timeout): decorators that retry
// (internal/backend/retry) retry only such errors. It returns nil for nil.
func Transient(err error) error {
	if err == nil {
		return nil
	}
	return &transientError{err}
}

// IsTransient reports whether err, or an error it wraps, was marked by
// Transient.
func IsTransient(err error) bool {
	var t *transientError
	return errors.As(err, &t)
}

type transientError struct{ err error }

func (e *transientError) Error() string { return e.err.Error() }
func (e *transientError) Unwrap() error { return e.err }

// ObjectInfo describes a stored object.
type ObjectInfo struct {
	Name    string
	Size    int64
	ModTime time.Time
}

// Backend stores named objects. Names are slash-separated paths such as
// "data/3f/3f2a…" or "config"; they never start with a slash or contain "..".
//
// Guarantees every implementation must give:
//   - Save is atomic: a reader sees either the whole object or none of it,
//     never a prefix, also after a crash. When Save returns nil the object is
//     durable. Saving an existing name replaces it atomically; a backend
//     may instead keep the names WriteOnce reports as write-once: then
//     saving the same bytes again succeeds (a retried Save) and saving
//     other bytes fails with ErrExists, the stored object unchanged.
//   - Read after write: an object is visible to Load, Stat and List as soon as
//     Save returns.
//   - Load of a range that runs past the end of the object returns ErrTruncated.
//   - List calls fn once per object whose name starts with prefix, in no
//     particular order; objects being saved (temporary files) are not listed.
//   - Errors that a repeated call may not meet again are marked Transient;
//     ErrNotFound, ErrTruncated, ErrExists, ErrNoSpace and a refused
//     credential never are.
//   - All methods are safe for concurrent use.
type Backend interface {
	// Save stores data under name.
	Save(ctx context.Context, name string, data []byte) error
	// Load returns length bytes of the object starting at offset; length 0
	// means to the end of the object.
	Load(ctx context.Context, name string, offset, length int64) ([]byte, error)
	// Stat returns the object's size and modification time.
	Stat(ctx context.Context, name string) (ObjectInfo, error)
	// List calls fn for each object under prefix; a non-nil error from fn
	// stops the listing and is returned.
	List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error
	// Remove deletes the object.
	Remove(ctx context.Context, name string) error
	// Location describes the backend for messages ("local:/srv/kura").
	Location() string
}

// LoaderInto is implemented by backends that can read a range into the
// caller's buffer, so that a reader that loads many objects (a restore, an
// NBD export of a restore point) reuses its memory instead of allocating
// per load. LoadInto reads length bytes of the object starting at offset
// into buf's storage and returns them, a slice of buf (not necessarily at
// its start); buf must have room for length bytes. When buf is page-aligned
// (AlignedBuffer) with room for the range widened to page boundaries
// (length + 2*PageSize), the backend may read with direct I/O, bypassing
// the page cache. The errors are Load's.
type LoaderInto interface {
	LoadInto(ctx context.Context, name string, offset, length int64, buf []byte) ([]byte, error)
}

// TempCleaner is implemented by backends that write objects through
// temporary files (the local directory): a process killed while saving
// leaves its temporary file behind, and nothing else would ever remove
// it. RemoveStaleTemp removes the temporary files whose writer is gone
// (a process of this host that no longer runs) and any older than
// StaleTempAge, and returns how many and how many bytes it removed. It
// never removes a file that a live process may still be writing.
type TempCleaner interface {
	RemoveStaleTemp(ctx context.Context) (n int, bytes int64, err error)
}

// StaleTempAge is the age from which a temporary file is taken as
// abandoned whoever wrote it: no object takes a day to write.
const StaleTempAge = 24 * time.Hour

// DirectRoom is how much larger than a range a buffer for LoadInto must
// be for direct I/O.
const DirectRoom = 2 * PageSize

// PageSize is the alignment of buffers from AlignedBuffer.
const PageSize = 4096

// ErrReadOnly is returned (wrapped) by Save and Remove of a backend that
// only reads: a repository as it was at an earlier time (s3 "as-of").
var ErrReadOnly = errors.New("read-only view of the repository")

// Unwrapper is implemented by decorators (retry, limit, cache): Unwrap
// returns the backend they wrap.
type Unwrapper interface {
	Unwrap() Backend
}

// Find returns the first backend of be's chain of decorators (be itself,
// then what each Unwrap returns) that implements T. Decorators that add
// something to T's calls (retries) implement T themselves, so that the
// calls go through them; the others are looked through.
func Find[T any](be Backend) (T, bool) {
	for be != nil {
		if t, ok := be.(T); ok {
			return t, true
		}
		u, ok := be.(Unwrapper)
		if !ok {
			break
		}
		be = u.Unwrap()
	}
	var zero T
	return zero, false
}

// Lock modes of object lock (S3's names): in compliance mode nobody can
// delete a locked version or shorten its retention, not even the
// account's root; in governance mode a user with the bypass permission
// can.
const (
	LockCompliance = "COMPLIANCE"
	LockGovernance = "GOVERNANCE"
)

// Locker is implemented by storage that can lock stored objects against
// deletion and overwrite until a date (S3 object lock on a versioned
// bucket). A locked repository deletes by hiding: Remove leaves a delete
// marker over the object, whose locked versions stay until their
// retention ends and a later Purge deletes them.
type Locker interface {
	// ProbeLock checks that the storage really refuses to delete or
	// overwrite an object locked in mode: it writes a probe object with a
	// short retention, tries to delete that version and to replace it,
	// and fails with an error that names the setting to change when the
	// storage lets either happen.
	ProbeLock(ctx context.Context, mode string) error
	// SetRetention makes every later Save of a write-once name
	// (WriteOnce) carry a retention of mode until the time of the Save
	// plus period. Names rewritten in place (locks, pending deletions)
	// get none: their versions would pile up.
	SetRetention(mode string, period time.Duration)
	// ExtendRetention moves the retention of the object's current version
	// to until, in the mode SetRetention gave. It never shortens one: a
	// version locked beyond until is left as it is.
	ExtendRetention(ctx context.Context, name string, until time.Time) error
	// Purge deletes what Remove hid once its retention has ended: every
	// version of a name whose newest version is a delete marker, unless
	// keep says the repository still needs the name, then the marker
	// itself; and the older versions of names rewritten in place (locks,
	// pending deletions). It never deletes an older version of a
	// write-once object still present: such a version is what an
	// overwrite hid, and reports it in Overwritten instead.
	Purge(ctx context.Context, keep func(name string) bool) (PurgeResult, error)
}

// PurgeResult says what a Locker's Purge did.
type PurgeResult struct {
	// Deleted versions (delete markers not counted) and their bytes.
	Deleted      int
	DeletedBytes int64
	// Locked versions of removed objects whose retention has not ended:
	// a later Purge deletes them. LockedUntil is the latest end of their
	// retention that Purge knows.
	Locked      int
	LockedBytes int64
	LockedUntil time.Time
	// Overwritten names write-once objects whose current version hides
	// older ones: an overwrite, which kura never does.
	Overwritten []string
	// Hidden names objects the repository needs (keep) that a delete
	// marker hides: a deletion kura did not do.
	Hidden []string
}

// hugePage is the size of a transparent huge page (x86-64, arm64).
const hugePage = 2 << 20

// AlignedBuffer returns an empty slice with capacity at least n (rounded up
// to PageSize) whose storage starts on a page boundary. A backend that
// writes with direct I/O can then write the caller's bytes without copying.
//
// A buffer of 2 MiB or more starts on a huge-page boundary and is advised
// to the kernel as huge-page memory: filling a fresh 16 MiB pack buffer
// then takes 8 page faults instead of 4096, which on a virtual machine was
// a third of an incremental backup's CPU time.
func AlignedBuffer(n int) []byte {
	n = (n + PageSize - 1) &^ (PageSize - 1)
	align := PageSize
	if n >= hugePage {
		align = hugePage
	}
	raw := make([]byte, n+align)
	off := int(uintptr(align)-uintptr(unsafe.Pointer(&raw[0]))%uintptr(align)) % align
	b := raw[off : off : off+n]
	if align == hugePage {
		adviseHugePages(raw[off : off+n&^(hugePage-1)])
	}
	return b
}

// IsAligned reports whether b starts on a page boundary.
func IsAligned(b []byte) bool {
	return cap(b) > 0 && uintptr(unsafe.Pointer(unsafe.SliceData(b)))%PageSize == 0
}
