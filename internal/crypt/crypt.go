// Package crypt holds Kura's cryptographic primitives: the master key, the
// password-based key derivation that wraps it, authenticated encryption of
// every stored object, and the keyed hash that names chunks.
//
// It knows nothing of packs, snapshots or files: it turns bytes into sealed
// bytes and back.
package crypt

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/zeebo/blake3"
	"golang.org/x/crypto/argon2"
)

// IDSize is the length of a chunk or object id in bytes.
const IDSize = 32

// ID names a chunk (keyed hash of its plaintext) or an object (random).
type ID [IDSize]byte

// String returns the full hex form of the id.
func (id ID) String() string { return hex.EncodeToString(id[:]) }

// Short returns the first 8 hex digits, as shown in listings.
func (id ID) Short() string { return hex.EncodeToString(id[:4]) }

// IsZero reports whether id is the zero id (used for "no chunk here").
func (id ID) IsZero() bool { return id == ID{} }

// ParseID parses a 64-digit hex id.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 2*IDSize {
		return id, fmt.Errorf("id %q: want %d hex digits", s, 2*IDSize)
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, fmt.Errorf("id %q: %w", s, err)
	}
	return id, nil
}

// RandomID returns a fresh random id.
func RandomID() ID {
	var id ID
	if _, err := rand.Read(id[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return id
}

// ErrAuth is returned when a sealed object fails authentication: it was
// damaged, truncated, or sealed with another key.
var ErrAuth = errors.New("authentication failed (data damaged or wrong key)")

// NonceSize and Overhead describe the sealed form: nonce || ciphertext || tag.
const (
	NonceSize = 12
	Overhead  = NonceSize + 16
)

// Key is a repository's master key: Enc encrypts objects, ID keys the chunk
// hash. It is generated once at init and only ever stored wrapped.
type Key struct {
	Enc [32]byte `json:"enc"`
	ID  [32]byte `json:"id"`

	aead cipher.AEAD
}

// NewKey generates a random master key.
func NewKey() (*Key, error) {
	k := &Key{}
	if _, err := rand.Read(k.Enc[:]); err != nil {
		return nil, err
	}
	if _, err := rand.Read(k.ID[:]); err != nil {
		return nil, err
	}
	return k, k.init()
}

func (k *Key) init() error {
	block, err := aes.NewCipher(k.Enc[:])
	if err != nil {
		return err
	}
	k.aead, err = cipher.NewGCM(block)
	return err
}

// Hash returns the keyed BLAKE3 hash of data: a chunk's id.
func (k *Key) Hash(data []byte) ID {
	h, err := blake3.NewKeyed(k.ID[:])
	if err != nil {
		panic(err) // key length is fixed
	}
	_, _ = h.Write(data)
	var id ID
	h.Sum(id[:0])
	return id
}

// Hasher returns a reusable keyed hasher; callers Reset it between chunks.
func (k *Key) Hasher() *blake3.Hasher {
	h, err := blake3.NewKeyed(k.ID[:])
	if err != nil {
		panic(err)
	}
	return h
}

// Seal appends the sealed form of plain to dst and returns it.
func (k *Key) Seal(dst, plain []byte) []byte {
	n := len(dst)
	dst = append(dst, make([]byte, NonceSize)...)
	if _, err := rand.Read(dst[n : n+NonceSize]); err != nil {
		panic(err)
	}
	return k.aead.Seal(dst, dst[n:n+NonceSize], plain, nil)
}

// Open appends the plaintext of sealed to dst, or returns ErrAuth.
func (k *Key) Open(dst, sealed []byte) ([]byte, error) {
	if len(sealed) < Overhead {
		return nil, fmt.Errorf("sealed object of %d bytes is truncated: %w", len(sealed), ErrAuth)
	}
	out, err := k.aead.Open(dst, sealed[:NonceSize], sealed[NonceSize:], nil)
	if err != nil {
		return nil, ErrAuth
	}
	return out, nil
}

// KDFParams are the Argon2id parameters used to derive a wrapping key.
type KDFParams struct {
	Time    uint32 `json:"time"`
	Memory  uint32 `json:"memory_kib"`
	Threads uint8  `json:"threads"`
	Salt    []byte `json:"salt"`
}

// DefaultKDF returns parameters with a fresh salt: 64 MiB, 3 passes — about
// a quarter second on one core, expensive for a password guesser.
func DefaultKDF() KDFParams {
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		panic(err)
	}
	return KDFParams{Time: 3, Memory: 64 * 1024, Threads: 2, Salt: salt}
}

// Derive returns the wrapping key for password under p.
func (p KDFParams) Derive(password []byte) (*Key, error) {
	if p.Time == 0 || p.Memory == 0 || p.Threads == 0 || len(p.Salt) < 8 {
		return nil, errors.New("invalid key derivation parameters")
	}
	prepareKDFMemory(int(p.Memory) << 10)
	raw := argon2.IDKey(password, p.Salt, p.Time, p.Memory, p.Threads, 32)
	releaseKDFMemory()
	k := &Key{}
	copy(k.Enc[:], raw)
	return k, k.init()
}

// Restore finishes a Key decoded from JSON.
func (k *Key) Restore() error { return k.init() }
