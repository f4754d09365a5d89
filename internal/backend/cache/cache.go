// Package cache owns the local metadata cache of a repository on object
// storage: a backend.Backend decorator that keeps on local disk a copy of
// the objects every command reads before it does anything else — the
// config, key files, index files, snapshots, damage records and boot
// checks — so that a command reads them from a local file instead of
// making one round trip to the store per object.
//
// # Why a cached copy is valid
//
// Those names are write-once (backend.WriteOnce) and, all but the config,
// random ids: a name never gets other content, so a local copy whose name
// and size match what the store lists is the store's object. The store
// stays the source of truth for which objects exist: a List still asks it
// (one request per listing) and drops the local copies of names it no
// longer lists (removed by a prune or a forget, here or on another host),
// and of names it lists with another size. Pack files (data/) are never
// cached (they are the repository's bulk and are read in ranges), nor lock
// records (locks/) and pending deletions (gc/), which are rewritten in
// place.
//
// The config is the one name that is not random: a repository deleted and
// created anew at the same location has another config under the same
// name. So the first load of the config through a Backend asks the store;
// when the store's config differs from the cached one, every cached object
// of the location is dropped. Later loads in the same process are served
// from the cache.
//
// # A damaged cache file
//
// Each cache file holds the object's bytes, exactly as the store holds
// them, behind a header with a magic, the object's size and the SHA-256 of
// its bytes. A load checks all three; a file that fails (cut short by a
// crash or a full disk, damaged on disk, written by something else) is
// removed and the object loaded from the store again, with a warning. A
// bad cache file thus never reaches the repository layer. That layer would
// not take it for good data either — index files, snapshots, damage
// records and boot checks are sealed with AES-256-GCM, the config carries
// an HMAC under the master key that opening checks, and a key file's
// sealed master key opens only when intact — but it would report it as
// damage in the repository, or as a wrong password: the checksum keeps a
// local fault local.
//
// # What it holds
//
// The same bytes as the store: sealed objects (no plaintext of any backup),
// the key files (whose master key is sealed under the password), and the
// config (plaintext parameters such as the chunk size, as in the store).
//
// # Several processes
//
// Processes that share a cache directory need no lock. Every file is
// written to a temporary name in its directory and renamed into place, so
// a reader opens a whole file or none, and the checksum catches what a
// crash may leave behind on a filesystem that orders the rename before
// the data. Two processes that write the same name write the same bytes
// (write-once), so whichever rename comes last leaves the right file. A
// process may write the copy of an object that another has just dropped
// because the store no longer lists it (it loaded the object before the
// deletion): the copy is still the deleted object's bytes, served only to
// a load of that name, and dropped by the next listing. Nothing reads a
// file, changes it and writes it back, so no update is lost.
//
// The cache can be deleted at any time (kura cache clear, or rm -r); it is
// filled again as objects are loaded.
package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// prefixes are the cached namespaces; the config is cached too.
var prefixes = [...]string{"keys/", "index/", "snapshots/", "damage/", "bootchecks/"}

// Cached reports whether the cache keeps a copy of name: the config, key
// files, index files, snapshots, damage records and boot checks. Never
// pack files, lock records or pending deletions.
func Cached(name string) bool {
	if name == "config" {
		return true
	}
	if strings.Contains(name, "..") || path.Clean(name) != name {
		return false
	}
	for _, p := range prefixes {
		if strings.HasPrefix(name, p) && len(name) > len(p) {
			return true
		}
	}
	return false
}

const (
	magic     = "KURAMC01"
	headerLen = len(magic) + 8 + sha256.Size
	tmpPrefix = ".tmp-"
	// staleTemp is the age from which a temporary file is taken as left
	// by a killed process: writing one takes milliseconds.
	staleTemp = time.Hour
	// objectsDir holds the copies; LocationFile names the location.
	objectsDir = "objects"
	// LocationFile, in a repository's cache directory, holds the location
	// the directory caches, for people (the directory's name is a hash).
	LocationFile = "location"
)

// Root returns the directory that holds the caches of every repository,
// from getenv: $KURA_CACHE_DIR, else $XDG_CACHE_HOME/kura/repos, else
// $HOME/.cache/kura/repos; "" when none is set.
func Root(getenv func(string) string) string {
	if d := getenv("KURA_CACHE_DIR"); d != "" {
		return d
	}
	if d := getenv("XDG_CACHE_HOME"); d != "" && filepath.IsAbs(d) {
		return filepath.Join(d, "kura", "repos")
	}
	if h := getenv("HOME"); h != "" {
		return filepath.Join(h, ".cache", "kura", "repos")
	}
	return ""
}

// Dir returns the cache directory of the repository at location loc
// (in a canonical form, without credentials) under root: a hash of loc,
// so that any location gives a safe, fixed-length name.
func Dir(root, loc string) string {
	h := sha256.Sum256([]byte(loc))
	return filepath.Join(root, hex.EncodeToString(h[:16]))
}

// Backend caches the metadata objects of the backend it wraps. It
// implements backend.LoaderInto (cached names from the cache, others
// through the wrapped backend's LoadInto, or Load and a copy) and
// backend.TempCleaner when the wrapped backend does.
type Backend struct {
	be      backend.Backend
	dir     string // the repository's cache directory
	objects string // dir/objects
	log     *slog.Logger

	configChecked atomic.Bool // the config was loaded from the store once
	writeWarned   atomic.Bool
}

// New wraps be with a cache in dir (from Dir), which it creates (mode
// 0700) with a LocationFile naming loc. A nil log discards the lines.
func New(be backend.Backend, dir, loc string, log *slog.Logger) (*Backend, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Backend{be: be, dir: dir, objects: filepath.Join(dir, objectsDir), log: log}
	if err := os.MkdirAll(b.objects, 0o700); err != nil {
		return nil, fmt.Errorf("metadata cache: %w", err)
	}
	// What a process killed while dropping the cache, or writing the
	// location file, left behind.
	if entries, err := os.ReadDir(dir); err == nil {
		for _, e := range entries {
			if info, err := e.Info(); err == nil && strings.HasPrefix(e.Name(), tmpPrefix) && time.Since(info.ModTime()) > staleTemp {
				_ = os.RemoveAll(filepath.Join(dir, e.Name()))
			}
		}
	}
	want := []byte(loc + "\n")
	lf := filepath.Join(dir, LocationFile)
	if got, err := os.ReadFile(lf); err != nil || !bytes.Equal(got, want) {
		if err := writeAtomic(lf, want); err != nil {
			return nil, fmt.Errorf("metadata cache: %w", err)
		}
	}
	return b, nil
}

// Unwrap returns the wrapped backend.
func (b *Backend) Unwrap() backend.Backend { return b.be }

// Dir returns the repository's cache directory.
func (b *Backend) Dir() string { return b.dir }

func (b *Backend) path(name string) string {
	return filepath.Join(b.objects, filepath.FromSlash(name))
}

// Save implements backend.Backend: it saves to the store and then, for a
// cached name, to the cache.
func (b *Backend) Save(ctx context.Context, name string, data []byte) error {
	if err := b.be.Save(ctx, name, data); err != nil {
		return err
	}
	if Cached(name) {
		b.put(name, data)
		if name == "config" {
			b.configChecked.Store(true)
		}
	}
	return nil
}

// Load implements backend.Backend: a cached name comes from the cache,
// or from the store and then into the cache (the whole object, also for
// a range: metadata objects are read whole).
func (b *Backend) Load(ctx context.Context, name string, offset, length int64) ([]byte, error) {
	if !Cached(name) {
		return b.be.Load(ctx, name, offset, length)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var data []byte
	ok := false
	if name != "config" || b.configChecked.Load() {
		data, ok = b.get(name)
	}
	if !ok {
		var err error
		if data, err = b.fill(ctx, name); err != nil {
			return nil, err
		}
	}
	return slice(b, name, data, offset, length)
}

// fill loads name from the store into the cache.
func (b *Backend) fill(ctx context.Context, name string) ([]byte, error) {
	data, err := b.be.Load(ctx, name, 0, 0)
	if err != nil {
		if errors.Is(err, backend.ErrNotFound) {
			b.drop(name)
			if name == "config" {
				b.dropAll("the store has no config")
			}
		}
		return nil, err
	}
	if name == "config" {
		if old, ok := b.get(name); ok && !bytes.Equal(old, data) {
			b.dropAll("the store's config differs from the cached one: another repository is at this location")
		}
		b.configChecked.Store(true)
	}
	b.put(name, data)
	return data, nil
}

// slice returns the range of data that Load(offset, length) asks for,
// with the errors of backend.Backend.
func slice(b *Backend, name string, data []byte, offset, length int64) ([]byte, error) {
	size := int64(len(data))
	switch {
	case offset < 0 || length < 0:
		return nil, fmt.Errorf("load %s: invalid range %d+%d", name, offset, length)
	case offset > size || (length > 0 && offset+length > size) || (offset == size && length > 0):
		return nil, fmt.Errorf("load %s in %s: range %d+%d, object is %d bytes: %w", name, b.be.Location(), offset, length, size, backend.ErrTruncated)
	case length == 0:
		return data[offset:], nil
	}
	return data[offset : offset+length : offset+length], nil
}

// LoadInto implements backend.LoaderInto.
func (b *Backend) LoadInto(ctx context.Context, name string, offset, length int64, buf []byte) ([]byte, error) {
	li, ok := b.be.(backend.LoaderInto)
	if Cached(name) || !ok {
		data, err := b.Load(ctx, name, offset, length)
		if err != nil {
			return nil, err
		}
		return append(buf[:0], data...), nil
	}
	return li.LoadInto(ctx, name, offset, length, buf)
}

// Stat implements backend.Backend: it asks the store, and drops the
// cached copy of an object the store does not have.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	oi, err := b.be.Stat(ctx, name)
	if Cached(name) {
		switch {
		case errors.Is(err, backend.ErrNotFound):
			b.drop(name)
		case err == nil:
			b.checkSize(name, oi.Size)
		}
	}
	return oi, err
}

// List implements backend.Backend: it asks the store. A cached copy of a
// listed object whose size differs from the listed size is dropped before
// fn sees the object (the next load reloads it); once the listing is
// complete, the cached copies under prefix that the store did not list
// are dropped, but for those written since the listing began.
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	var spaces []string
	for _, p := range prefixes {
		if strings.HasPrefix(p, prefix) || strings.HasPrefix(prefix, p) {
			spaces = append(spaces, p)
		}
	}
	withConfig := strings.HasPrefix("config", prefix)
	if len(spaces) == 0 && !withConfig {
		return b.be.List(ctx, prefix, fn)
	}
	// A copy older than the listing is of an object the store had before
	// it, so one the listing leaves out is gone from the store; a newer
	// copy may be of an object saved since. Whole seconds: some
	// filesystems keep no finer times.
	start := time.Now().Truncate(time.Second)
	listed := map[string]bool{}
	err := b.be.List(ctx, prefix, func(oi backend.ObjectInfo) error {
		if Cached(oi.Name) {
			listed[oi.Name] = true
			b.checkSize(oi.Name, oi.Size)
		}
		return fn(oi)
	})
	if err != nil {
		return err
	}
	dropped := 0
	if withConfig && !listed["config"] && b.dropIfOlder("config", start) {
		dropped++
	}
	for _, p := range spaces {
		dropped += b.dropUnlisted(p, prefix, listed, start)
	}
	if dropped > 0 {
		b.log.Debug("metadata cache: dropped the copies of objects the repository no longer lists", "prefix", prefix, "objects", dropped, "cache", b.dir)
	}
	return nil
}

// dropUnlisted removes the cached copies in namespace space whose names
// start with prefix, that listed lacks and that are older than start;
// and temporary files left by killed processes.
func (b *Backend) dropUnlisted(space, prefix string, listed map[string]bool, start time.Time) int {
	n := 0
	root := filepath.Join(b.objects, filepath.FromSlash(space))
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil // a directory that is not there yet, or went
		}
		rel, rerr := filepath.Rel(b.objects, p)
		if rerr != nil {
			return nil
		}
		name := filepath.ToSlash(rel)
		if strings.HasPrefix(d.Name(), tmpPrefix) {
			if info, err := d.Info(); err == nil && time.Since(info.ModTime()) > staleTemp {
				_ = os.Remove(p)
			}
			return nil
		}
		if !strings.HasPrefix(name, prefix) || listed[name] {
			return nil
		}
		if b.dropIfOlder(name, start) {
			n++
		}
		return nil
	})
	return n
}

// dropIfOlder removes name's cached copy if it was written before t.
func (b *Backend) dropIfOlder(name string, t time.Time) bool {
	p := b.path(name)
	info, err := os.Lstat(p)
	if err != nil || !info.ModTime().Before(t) {
		return false
	}
	return os.Remove(p) == nil
}

// checkSize drops name's cached copy if its size is not size.
func (b *Backend) checkSize(name string, size int64) {
	info, err := os.Lstat(b.path(name))
	if err != nil {
		return
	}
	if info.Size() != int64(headerLen)+size {
		b.log.Debug("metadata cache: the repository lists another size: dropped", "object", name, "listed", size, "cached", info.Size()-int64(headerLen))
		b.drop(name)
	}
}

// Remove implements backend.Backend: it removes the object from the
// store and its copy from the cache.
func (b *Backend) Remove(ctx context.Context, name string) error {
	err := b.be.Remove(ctx, name)
	if Cached(name) {
		b.drop(name)
	}
	return err
}

// Location implements backend.Backend.
func (b *Backend) Location() string { return b.be.Location() }

// RemoveStaleTemp implements backend.TempCleaner when the wrapped backend
// does; otherwise it removes nothing. (The cache's own temporary files
// are removed by List.)
func (b *Backend) RemoveStaleTemp(ctx context.Context) (int, int64, error) {
	if tc, ok := b.be.(backend.TempCleaner); ok {
		return tc.RemoveStaleTemp(ctx)
	}
	return 0, 0, nil
}

// get returns name's cached copy, checked; a copy that fails the check
// is removed.
func (b *Backend) get(name string) ([]byte, bool) {
	p := b.path(name)
	raw, err := os.ReadFile(p)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			b.log.Warn("metadata cache: cannot read a cached object; loading it from the repository", "object", name, "cache", p, "err", err)
		}
		return nil, false
	}
	data, err := decode(raw)
	if err != nil {
		b.log.Warn("metadata cache: a cached object is damaged; removed, loading it from the repository", "object", name, "cache", p, "err", err)
		b.drop(name)
		return nil, false
	}
	return data, true
}

// put writes name's cached copy. A failure is logged, not returned: the
// object came from or went to the store, the cache only misses it.
func (b *Backend) put(name string, data []byte) {
	p := b.path(name)
	err := writeAtomic(p, encodeHeader(data), data)
	if err == nil {
		return
	}
	if b.writeWarned.CompareAndSwap(false, true) {
		b.log.Warn("metadata cache: cannot write to the cache; going on without it where it fails", "cache", b.dir, "err", err)
	} else {
		b.log.Debug("metadata cache: cannot write a cached object", "object", name, "err", err)
	}
}

// drop removes name's cached copy.
func (b *Backend) drop(name string) {
	if err := os.Remove(b.path(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		b.log.Debug("metadata cache: cannot remove a cached object", "object", name, "err", err)
	}
}

// dropAll removes every cached object of the location: the objects
// directory is renamed away, then removed.
func (b *Backend) dropAll(why string) {
	gone := filepath.Join(b.dir, tmpPrefix+"drop-"+crypt.RandomID().Short())
	if err := os.Rename(b.objects, gone); err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			b.log.Warn("metadata cache: cannot drop the cache", "cache", b.dir, "why", why, "err", err)
		}
		return
	}
	b.log.Info("metadata cache: dropped every cached object of the repository", "why", why, "cache", b.dir)
	if err := os.RemoveAll(gone); err != nil {
		b.log.Warn("metadata cache: cannot remove the dropped cache", "dir", gone, "err", err)
	}
}

// encodeHeader returns the header of a cache file holding data.
func encodeHeader(data []byte) []byte {
	h := make([]byte, 0, headerLen)
	h = append(h, magic...)
	h = binary.LittleEndian.AppendUint64(h, uint64(len(data)))
	sum := sha256.Sum256(data)
	return append(h, sum[:]...)
}

// decode checks a cache file and returns the object's bytes in it.
func decode(raw []byte) ([]byte, error) {
	if len(raw) < headerLen || string(raw[:len(magic)]) != magic {
		return nil, errors.New("not a cache file (no header)")
	}
	size := binary.LittleEndian.Uint64(raw[len(magic):])
	data := raw[headerLen:]
	if size != uint64(len(data)) {
		return nil, fmt.Errorf("holds %d bytes, its header says %d", len(data), size)
	}
	sum := sha256.Sum256(data)
	if !bytes.Equal(sum[:], raw[len(magic)+8:headerLen]) {
		return nil, errors.New("checksum mismatch")
	}
	return data, nil
}

// writeAtomic writes the concatenation of parts to p through a temporary
// file in p's directory (created 0700 if missing), mode 0600. No sync: a
// torn file fails its checksum and is loaded again.
func writeAtomic(p string, parts ...[]byte) error {
	dir := filepath.Dir(p)
	f, err := os.CreateTemp(dir, tmpPrefix+"*")
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(dir, 0o700); err == nil {
			f, err = os.CreateTemp(dir, tmpPrefix+"*")
		}
	}
	if err != nil {
		return err
	}
	for _, part := range parts {
		if err == nil {
			_, err = f.Write(part)
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
	return err
}

var (
	_ backend.LoaderInto  = (*Backend)(nil)
	_ backend.TempCleaner = (*Backend)(nil)
)
