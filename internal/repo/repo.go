// Package repo implements Kura's repository format: the config and key
// files, content-addressed chunks packed into pack files, the index that
// locates them, snapshot manifests, locks, and garbage collection.
//
// It knows nothing of virtual machines: a snapshot is a name, some opaque
// configuration and a list of disks, each a list of chunk ids by position.
// docs/FORMAT.md describes the on-disk format.
package repo

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"sync"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// FormatVersion is the repository format this code writes and reads.
const FormatVersion = 1

// DefaultChunkSize is the chunk size chosen by benchmark (docs/BENCHMARKS.md).
const DefaultChunkSize = 256 << 10

// Chunk sizes a repository may use.
const (
	MinChunkSize = 64 << 10
	MaxChunkSize = 16 << 20
)

// Errors callers branch on.
var (
	ErrNotRepository = errors.New("not a kura repository")
	ErrWrongPassword = errors.New("wrong password or no key matches")
	ErrNewerFormat   = errors.New("repository format is newer than this kura")
	ErrExists        = errors.New("a repository already exists there")
	ErrDamaged       = errors.New("repository object is damaged")
	ErrNoSnapshot    = errors.New("no such snapshot")
	ErrAmbiguous     = errors.New("snapshot id prefix is ambiguous")
	ErrLocked        = errors.New("repository is locked")
)

// Config is the repository's "config" object: plaintext, so that a reader
// can check the format version before asking for a password, and
// authenticated by MAC under the master key once unlocked.
type Config struct {
	Version     int       `json:"version"`
	ID          string    `json:"id"`
	ChunkSize   int       `json:"chunk_size"`
	PackSize    int       `json:"pack_size"`
	Compression string    `json:"compression"`
	Encryption  string    `json:"encryption"`
	ChunkHash   string    `json:"chunk_hash"`
	Created     time.Time `json:"created"`
	// Lock is the repository's object lock (objlock.go), or nil.
	Lock *LockConfig `json:"lock,omitempty"`
	MAC  []byte      `json:"mac,omitempty"`
}

func (c Config) mac(k *crypt.Key) []byte {
	c.MAC = nil
	data, _ := json.Marshal(c)
	m := hmac.New(sha256.New, k.Enc[:])
	m.Write([]byte("kura config\x00"))
	m.Write(data)
	return m.Sum(nil)
}

// InitOptions tune a new repository.
type InitOptions struct {
	ChunkSize int // power of two between MinChunkSize and MaxChunkSize; 0 = default
	PackSize  int // target pack size; 0 = 16 MiB
	KDF       *crypt.KDFParams
	// Lock creates the repository with object lock; the storage must be
	// able to lock objects (backend.Locker), which Init checks.
	Lock *LockConfig
	// Key, when set, is the master key to use instead of a new one: the
	// repository then shares it (and so its chunk ids) with the repository
	// it came from, and `kura copy` between the two moves sealed blobs
	// as they are (kura init --copy-key-from).
	Key *crypt.Key
}

// Repo is an open, unlocked repository. It is safe for concurrent use.
type Repo struct {
	be     backend.Backend
	cfg    Config
	key    *crypt.Key
	keyID  string
	idx    *Index
	idxMu  sync.Mutex // guards loading the index
	loaded bool
	// badIndex names the index files LoadIndex found damaged; scanned says
	// whether the packs no index lists were read from their headers since.
	badIndex map[string]error
	scanned  bool
	scanRes  ScanResult
	log      *slog.Logger
	// lockUnenforced: the config asks for object lock, the storage here
	// cannot lock (applyLock).
	lockUnenforced bool

	wmu    sync.Mutex
	writer *packWriter
	packs  sync.Pool // *[]byte: pack buffers, reused after upload
}

// Backend returns the storage the repository lives on.
func (r *Repo) Backend() backend.Backend { return r.be }

// Config returns the repository's configuration.
func (r *Repo) Config() Config { return r.cfg }

// Key returns the master key (for chunk hashing by the backup pipeline).
func (r *Repo) Key() *crypt.Key { return r.key }

// KeyID names the key file that unlocked the repository.
func (r *Repo) KeyID() string { return r.keyID }

// Init creates a new repository on be, protected by password.
func Init(ctx context.Context, be backend.Backend, password []byte, opts InitOptions) (*Repo, error) {
	if len(password) == 0 {
		return nil, errors.New("an empty password is not allowed: set KURA_PASSWORD or use --password-file")
	}
	if _, err := be.Stat(ctx, "config"); err == nil {
		return nil, fmt.Errorf("%s: %w", be.Location(), ErrExists)
	} else if !errors.Is(err, backend.ErrNotFound) {
		return nil, err
	}
	cs := opts.ChunkSize
	if cs == 0 {
		cs = DefaultChunkSize
	}
	if cs < MinChunkSize || cs > MaxChunkSize || bits.OnesCount(uint(cs)) != 1 {
		return nil, fmt.Errorf("chunk size %d: must be a power of two between %d KiB and %d MiB", cs, MinChunkSize>>10, MaxChunkSize>>20)
	}
	ps := opts.PackSize
	if ps == 0 {
		ps = 16 << 20
	}
	if ps < cs {
		ps = cs
	}
	if opts.Lock != nil {
		lc := *opts.Lock
		if err := lc.Validate(); err != nil {
			return nil, err
		}
		l, ok := backend.Find[backend.Locker](be)
		if !ok {
			return nil, fmt.Errorf("%s: object lock needs an S3 bucket with object lock enabled; this storage cannot lock objects", be.Location())
		}
		if err := l.ProbeLock(ctx, lc.Mode); err != nil {
			return nil, err
		}
		opts.Lock = &lc
	}
	var key *crypt.Key
	if opts.Key != nil {
		// A copy: the caller's key stays its own.
		key = &crypt.Key{Enc: opts.Key.Enc, ID: opts.Key.ID}
		if err := key.Restore(); err != nil {
			return nil, err
		}
	} else {
		var err error
		if key, err = crypt.NewKey(); err != nil {
			return nil, err
		}
	}
	cfg := Config{
		Version: FormatVersion, ID: crypt.RandomID().String(), ChunkSize: cs, PackSize: ps,
		Compression: "zstd", Encryption: "aes-256-gcm", ChunkHash: "blake3-keyed",
		Created: time.Now().UTC().Truncate(time.Second), Lock: opts.Lock,
	}
	cfg.MAC = cfg.mac(key)
	applyLock(be, cfg)
	r := &Repo{be: be, cfg: cfg, key: key, idx: newIndex(), log: slog.New(slog.DiscardHandler)}
	r.loaded = true
	kdf := crypt.DefaultKDF()
	if opts.KDF != nil {
		kdf = *opts.KDF
	}
	// Key first, config last: a directory with a config is a repository.
	id, err := r.addKey(ctx, password, kdf)
	if err != nil {
		return nil, err
	}
	r.keyID = id
	data, _ := json.MarshalIndent(cfg, "", "  ")
	if err := be.Save(ctx, "config", data); err != nil {
		return nil, fmt.Errorf("writing config: %w", err)
	}
	return r, nil
}

// ReadConfig loads and checks the config without unlocking.
func ReadConfig(ctx context.Context, be backend.Backend) (Config, error) {
	var cfg Config
	data, err := be.Load(ctx, "config", 0, 0)
	if err != nil {
		if errors.Is(err, backend.ErrNotFound) {
			return cfg, fmt.Errorf("%s: %w (no config file; create one with `kura init`)", be.Location(), ErrNotRepository)
		}
		return cfg, fmt.Errorf("reading config: %w", err)
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return cfg, fmt.Errorf("%s: config is damaged (%v): %w", be.Location(), err, ErrNotRepository)
	}
	if cfg.Version > FormatVersion {
		return cfg, fmt.Errorf("%s uses format version %d, this kura reads up to %d: %w; upgrade kura", be.Location(), cfg.Version, FormatVersion, ErrNewerFormat)
	}
	if cfg.Version < 1 || cfg.ChunkSize < MinChunkSize || cfg.ChunkSize > MaxChunkSize || bits.OnesCount(uint(cfg.ChunkSize)) != 1 || cfg.PackSize < cfg.ChunkSize {
		return cfg, fmt.Errorf("%s: config has invalid values: %w", be.Location(), ErrNotRepository)
	}
	return cfg, nil
}

// Open unlocks the repository on be with password, trying every key file.
func Open(ctx context.Context, be backend.Backend, password []byte) (*Repo, error) {
	cfg, err := ReadConfig(ctx, be)
	if err != nil {
		return nil, err
	}
	key, keyID, err := unlock(ctx, be, password)
	if err != nil {
		return nil, err
	}
	return openWith(be, cfg, key, keyID)
}

// OpenWithKey opens the repository in be with its master key, already
// unlocked by another process of the same user (kura instant hands it to
// the export it starts, which then skips the key derivation). The key
// must authenticate the repository's config.
func OpenWithKey(ctx context.Context, be backend.Backend, key *crypt.Key, keyID string) (*Repo, error) {
	cfg, err := ReadConfig(ctx, be)
	if err != nil {
		return nil, err
	}
	if err := key.Restore(); err != nil {
		return nil, err
	}
	return openWith(be, cfg, key, keyID)
}

func openWith(be backend.Backend, cfg Config, key *crypt.Key, keyID string) (*Repo, error) {
	if !hmac.Equal(cfg.MAC, cfg.mac(key)) {
		return nil, fmt.Errorf("config: authentication failed, it was modified or damaged, or the key is not this repository's: %w", ErrDamaged)
	}
	r := &Repo{be: be, cfg: cfg, key: key, keyID: keyID, idx: newIndex(), log: slog.New(slog.DiscardHandler)}
	r.lockUnenforced = !applyLock(be, cfg)
	return r, nil
}

// SetLogger sets where the repository reports what it works around: a
// damaged index file, chunks found damaged. Warnings go to it at level
// Warn; nil discards them.
func (r *Repo) SetLogger(l *slog.Logger) {
	if l == nil {
		l = slog.New(slog.DiscardHandler)
	}
	r.log = l
	if r.lockUnenforced {
		l.Warn("the repository was created with object lock, but its storage here cannot lock objects: what this process writes is not locked", "location", r.be.Location())
	}
}
