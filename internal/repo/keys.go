package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
	"sort"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// keyFile is a "keys/<id>" object: the master key sealed under a key derived
// from one password.
type keyFile struct {
	Created  time.Time       `json:"created"`
	Hostname string          `json:"hostname"`
	Username string          `json:"username"`
	KDF      string          `json:"kdf"`
	Params   crypt.KDFParams `json:"params"`
	Data     []byte          `json:"data"` // sealed JSON of crypt.Key
}

// KeyInfo describes a key file for `kura key list`.
type KeyInfo struct {
	ID       string    `json:"id"`
	Current  bool      `json:"current"`
	Created  time.Time `json:"created"`
	Hostname string    `json:"hostname"`
	Username string    `json:"username"`
	Damaged  string    `json:"damaged,omitempty"` // why the key file cannot be read
}

func (r *Repo) addKey(ctx context.Context, password []byte, kdf crypt.KDFParams) (string, error) {
	wrap, err := kdf.Derive(password)
	if err != nil {
		return "", err
	}
	plain, err := json.Marshal(r.key)
	if err != nil {
		return "", err
	}
	kf := keyFile{Created: time.Now().UTC().Truncate(time.Second), KDF: "argon2id", Params: kdf, Data: wrap.Seal(nil, plain)}
	kf.Hostname, _ = os.Hostname()
	if u, err := user.Current(); err == nil {
		kf.Username = u.Username
	}
	data, _ := json.MarshalIndent(kf, "", "  ")
	id := crypt.RandomID().String()
	if err := r.be.Save(ctx, "keys/"+id, data); err != nil {
		return "", fmt.Errorf("writing key file: %w", err)
	}
	return id, nil
}

// AddKey adds a password that unlocks the repository and returns its key id.
func (r *Repo) AddKey(ctx context.Context, password []byte) (string, error) {
	if len(password) == 0 {
		return "", errors.New("an empty password is not allowed")
	}
	return r.addKey(ctx, password, crypt.DefaultKDF())
}

// ListKeys lists the key files.
func (r *Repo) ListKeys(ctx context.Context) ([]KeyInfo, error) {
	var out []KeyInfo
	err := r.be.List(ctx, "keys/", func(oi backend.ObjectInfo) error {
		id := strings.TrimPrefix(oi.Name, "keys/")
		data, err := r.be.Load(ctx, oi.Name, 0, 0)
		if err != nil {
			return err
		}
		var kf keyFile
		if err := json.Unmarshal(data, &kf); err != nil {
			// Listed, so that `kura key remove` can remove it.
			out = append(out, KeyInfo{ID: id, Damaged: err.Error()})
			return nil
		}
		out = append(out, KeyInfo{ID: id, Current: id == r.keyID, Created: kf.Created, Hostname: kf.Hostname, Username: kf.Username})
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, err
}

// RemoveKey removes a key file by id or unique prefix. The key in use and
// the last key cannot be removed.
func (r *Repo) RemoveKey(ctx context.Context, prefix string) error {
	keys, err := r.ListKeys(ctx)
	if err != nil {
		return err
	}
	var match []string
	for _, k := range keys {
		if strings.HasPrefix(k.ID, prefix) {
			match = append(match, k.ID)
		}
	}
	switch {
	case len(match) == 0:
		return fmt.Errorf("no key %q: see `kura key list`", prefix)
	case len(match) > 1:
		return fmt.Errorf("key prefix %q matches %d keys: give more digits", prefix, len(match))
	case match[0] == r.keyID:
		return errors.New("refusing to remove the key in use: unlock with another password first")
	case len(keys) == 1:
		return errors.New("refusing to remove the last key")
	}
	return r.be.Remove(ctx, "keys/"+match[0])
}

func unlock(ctx context.Context, be backend.Backend, password []byte) (*crypt.Key, string, error) {
	var names []string
	if err := be.List(ctx, "keys/", func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	}); err != nil {
		return nil, "", err
	}
	if len(names) == 0 {
		return nil, "", fmt.Errorf("%s has no key files: %w", be.Location(), ErrDamaged)
	}
	var damaged []string
	for _, name := range names {
		data, err := be.Load(ctx, name, 0, 0)
		if err != nil {
			return nil, "", err
		}
		var kf keyFile
		if err := json.Unmarshal(data, &kf); err != nil || kf.KDF != "argon2id" {
			damaged = append(damaged, name)
			continue
		}
		wrap, err := kf.Params.Derive(password)
		if err != nil {
			damaged = append(damaged, name)
			continue
		}
		plain, err := wrap.Open(nil, kf.Data)
		if err != nil {
			continue // another password's key
		}
		var k crypt.Key
		if err := json.Unmarshal(plain, &k); err != nil {
			return nil, "", fmt.Errorf("key file %s: %w", name, ErrDamaged)
		}
		if err := k.Restore(); err != nil {
			return nil, "", err
		}
		return &k, strings.TrimPrefix(name, "keys/"), nil
	}
	if len(damaged) > 0 {
		return nil, "", fmt.Errorf("%w (unreadable key files: %s)", ErrWrongPassword, strings.Join(damaged, ", "))
	}
	return nil, "", ErrWrongPassword
}

// ErrNoPassword is returned by ReadPassword when neither a password file
// nor $KURA_PASSWORD gives the repository's password.
var ErrNoPassword = errors.New("no password: set KURA_PASSWORD or give a password file")

// ReadPassword returns the repository password from file (its first line
// ending trimmed) when file is set, else from $KURA_PASSWORD, else
// ErrNoPassword.
func ReadPassword(file string) ([]byte, error) {
	if file != "" {
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("reading password file: %w", err)
		}
		return []byte(strings.TrimRight(string(data), "\r\n")), nil
	}
	if p, ok := os.LookupEnv("KURA_PASSWORD"); ok {
		return []byte(p), nil
	}
	return nil, ErrNoPassword
}

// loadKeyFile reads and parses a key file without unlocking it: its JSON,
// its KDF and the length of its sealed key.
func (r *Repo) loadKeyFile(ctx context.Context, name string) (*keyFile, error) {
	data, err := r.be.Load(ctx, name, 0, 0)
	if err != nil {
		return nil, err
	}
	var kf keyFile
	if err := json.Unmarshal(data, &kf); err != nil {
		return nil, fmt.Errorf("key file is damaged (%v): %w", err, ErrDamaged)
	}
	if kf.KDF != "argon2id" || len(kf.Params.Salt) == 0 || len(kf.Data) < crypt.Overhead {
		return nil, fmt.Errorf("key file is damaged (kdf %q, %d bytes of sealed key): %w", kf.KDF, len(kf.Data), ErrDamaged)
	}
	return &kf, nil
}
