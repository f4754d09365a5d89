package guest

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSocketFreezer(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name  string
		setup func(a *fakeAgent)
		run   func(t *testing.T, f Freezer, a *fakeAgent)
	}{
		{
			name: "freeze, status frozen, thaw, status thawed",
			run: func(t *testing.T, f Freezer, a *fakeAgent) {
				if n, err := f.Freeze(ctx); err != nil || n != 2 {
					t.Fatalf("Freeze = %d, %v; want 2 filesystems", n, err)
				}
				if st, err := f.Status(ctx); err != nil || st != StatusFrozen {
					t.Fatalf("Status = %q, %v; want frozen", st, err)
				}
				if n, err := f.Thaw(ctx); err != nil || n != 2 {
					t.Fatalf("Thaw = %d, %v; want 2 filesystems", n, err)
				}
				if st, err := f.Status(ctx); err != nil || st != StatusThawed {
					t.Fatalf("Status = %q, %v; want thawed", st, err)
				}
			},
		},
		{
			name: "thawing a thawed guest thaws nothing",
			run: func(t *testing.T, f Freezer, a *fakeAgent) {
				if n, err := f.Thaw(ctx); err != nil || n != 0 {
					t.Fatalf("Thaw = %d, %v; want 0, nil", n, err)
				}
			},
		},
		{
			name: "ping answers",
			run: func(t *testing.T, f Freezer, a *fakeAgent) {
				if err := f.Ping(ctx); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "the agent's own error is an AgentError",
			run: func(t *testing.T, f Freezer, a *fakeAgent) {
				a.setFrozen(true)
				_, err := f.Freeze(ctx)
				var ae *AgentError
				if !errors.As(err, &ae) || ae.Command != cmdFreeze || !strings.Contains(ae.Desc, "frozen state") {
					t.Fatalf("Freeze of a frozen guest: %v; want an AgentError", err)
				}
			},
		},
		{
			name:  "stale output before the sync reply is skipped",
			setup: func(a *fakeAgent) { a.junk = "{\"return\": 7}\n{\"return\": {}}\n" },
			run: func(t *testing.T, f Freezer, a *fakeAgent) {
				if st, err := f.Status(ctx); err != nil || st != StatusThawed {
					t.Fatalf("Status = %q, %v", st, err)
				}
			},
		},
		{
			name: "a hung freeze times out quickly with ErrTimeout",
			run: func(t *testing.T, f Freezer, a *fakeAgent) {
				release := a.hangOn(cmdFreeze)
				defer release()
				start := time.Now()
				_, err := f.Freeze(ctx)
				if !errors.Is(err, ErrTimeout) {
					t.Fatalf("Freeze: %v; want ErrTimeout", err)
				}
				if d := time.Since(start); d > time.Second {
					t.Errorf("Freeze took %s with a 300ms timeout", d)
				}
				if !strings.Contains(err.Error(), a.path) {
					t.Errorf("error %q does not name the socket", err)
				}
			},
		},
		{
			name:  "an agent that never answers is unresponsive",
			setup: func(a *fakeAgent) { a.silent = true },
			run: func(t *testing.T, f Freezer, a *fakeAgent) {
				start := time.Now()
				err := f.Ping(ctx)
				if !errors.Is(err, ErrUnresponsive) {
					t.Fatalf("Ping: %v; want ErrUnresponsive", err)
				}
				if d := time.Since(start); d > time.Second {
					t.Errorf("Ping took %s with a 200ms timeout", d)
				}
			},
		},
		{
			name: "a cancelled context stops the call",
			run: func(t *testing.T, f Freezer, a *fakeAgent) {
				release := a.hangOn(cmdThaw)
				defer release()
				cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
				defer cancel()
				start := time.Now()
				if _, err := f.Thaw(cctx); err == nil {
					t.Fatal("Thaw of a hung agent succeeded")
				}
				if d := time.Since(start); d > 250*time.Millisecond {
					t.Errorf("Thaw took %s after its context ended at 50ms", d)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newFakeAgent(t)
			if tt.setup != nil {
				tt.setup(a)
			}
			f := NewSocket(a.path, Timeouts{Freeze: 300 * time.Millisecond, Thaw: 300 * time.Millisecond, Ping: 200 * time.Millisecond})
			tt.run(t, f, a)
		})
	}
}

func TestSocketFreezerNoAgent(t *testing.T) {
	dir := t.TempDir()
	// A socket nobody listens on, and no socket at all.
	dead := filepath.Join(dir, "dead.sock")
	ln, err := net.Listen("unix", dead)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	for _, path := range []string{dead, filepath.Join(dir, "missing.sock")} {
		_, err := NewSocket(path, Timeouts{}).Freeze(context.Background())
		if !errors.Is(err, ErrUnresponsive) || !strings.Contains(err.Error(), path) {
			t.Errorf("Freeze via %s: %v; want ErrUnresponsive naming the socket", path, err)
		}
	}
	if _, err := os.Stat(dead); err != nil {
		t.Fatal(err)
	}
}
