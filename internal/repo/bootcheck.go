package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// BootCheck records one verification of a restore point by booting it
// (`kura verify --boot`): a "bootchecks/<snapshot id>-<random id>"
// object, sealed like a snapshot. A snapshot may have many; they are
// removed with it.
type BootCheck struct {
	Snapshot string    `json:"snapshot"`
	Time     time.Time `json:"time"`
	Passed   bool      `json:"passed"`
	// AgentMillis is how long the guest agent took to answer after the
	// VM started (0 when it did not).
	AgentMillis float64 `json:"agent_ms,omitempty"`
	// Check is the user's check command run in the guest, with its exit
	// status and output (truncated).
	Check       string `json:"check,omitempty"`
	CheckExit   int    `json:"check_exit,omitempty"`
	CheckOutput string `json:"check_output,omitempty"`
	// Error says why the check failed.
	Error string `json:"error,omitempty"`
	// Screenshot is the guest console as a PNG image.
	Screenshot []byte `json:"screenshot,omitempty"`
}

const bootCheckPrefix = "bootchecks/"

// SaveBootCheck stores c.
func (r *Repo) SaveBootCheck(ctx context.Context, c *BootCheck) error {
	plain, err := json.Marshal(c)
	if err != nil {
		return err
	}
	sealed, err := r.sealObject(plain)
	if err != nil {
		return err
	}
	name := bootCheckPrefix + c.Snapshot + "-" + crypt.RandomID().String()[:16]
	if err := r.be.Save(ctx, name, sealed); err != nil {
		return fmt.Errorf("recording the boot check: %w", err)
	}
	return nil
}

// BootChecks returns the boot checks of snapshot id, oldest first.
// Unreadable records are skipped.
func (r *Repo) BootChecks(ctx context.Context, id string) ([]*BootCheck, error) {
	var names []string
	err := r.be.List(ctx, bootCheckPrefix+id+"-", func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	})
	if err != nil {
		return nil, err
	}
	var out []*BootCheck
	for _, n := range names {
		plain, err := r.loadObject(ctx, n)
		if err != nil {
			continue
		}
		var c BootCheck
		if json.Unmarshal(plain, &c) == nil && c.Snapshot == id {
			out = append(out, &c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Time.Before(out[j].Time) })
	return out, nil
}

// LastBootChecks returns the latest boot check of every snapshot that
// has one, by snapshot id.
func (r *Repo) LastBootChecks(ctx context.Context) (map[string]*BootCheck, error) {
	ids := map[string]bool{}
	err := r.be.List(ctx, bootCheckPrefix, func(oi backend.ObjectInfo) error {
		rest := strings.TrimPrefix(oi.Name, bootCheckPrefix)
		if i := strings.LastIndexByte(rest, '-'); i > 0 {
			ids[rest[:i]] = true
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := map[string]*BootCheck{}
	for id := range ids {
		cs, err := r.BootChecks(ctx, id)
		if err != nil {
			return nil, err
		}
		if len(cs) > 0 {
			out[id] = cs[len(cs)-1]
		}
	}
	return out, nil
}

// removeBootChecks deletes the boot checks of snapshot id.
func (r *Repo) removeBootChecks(ctx context.Context, id string) error {
	var names []string
	if err := r.be.List(ctx, bootCheckPrefix+id+"-", func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	}); err != nil {
		return err
	}
	for _, n := range names {
		if err := r.be.Remove(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// unreadableRecords returns the records under prefix ("bootchecks/",
// "damage/") that cannot be read or parsed as JSON, and why. Nothing
// depends on them being there: verify reports them and prune removes them.
func (r *Repo) unreadableRecords(ctx context.Context, prefix string) (map[string]error, error) {
	var names []string
	if err := r.be.List(ctx, prefix, func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	}); err != nil {
		return nil, err
	}
	bad := map[string]error{}
	for _, n := range names {
		plain, err := r.loadObject(ctx, n)
		switch {
		case errors.Is(err, backend.ErrNotFound):
			continue
		case err == nil && !json.Valid(plain):
			err = fmt.Errorf("%s is damaged (not JSON): %w", n, ErrDamaged)
		}
		if errors.Is(err, ErrDamaged) {
			bad[n] = err
		} else if err != nil {
			return nil, err
		}
	}
	return bad, nil
}
