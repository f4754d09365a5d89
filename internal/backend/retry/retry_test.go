package retry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/backendtest"
	"github.com/kura-backup/kura/internal/backend/local"
)

// flaky fails the first n calls of every method with err, then passes
// them to the local backend.
type flaky struct {
	backend.Backend
	mu    sync.Mutex
	n     int
	err   error
	calls int
}

func (f *flaky) fail() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.n > 0 {
		f.n--
		return f.err
	}
	return nil
}

func (f *flaky) Save(ctx context.Context, name string, data []byte) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Backend.Save(ctx, name, data)
}

func (f *flaky) Load(ctx context.Context, name string, off, n int64) ([]byte, error) {
	if err := f.fail(); err != nil {
		return nil, err
	}
	return f.Backend.Load(ctx, name, off, n)
}

func (f *flaky) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	if err := f.fail(); err != nil {
		return backend.ObjectInfo{}, err
	}
	return f.Backend.Stat(ctx, name)
}

func (f *flaky) Remove(ctx context.Context, name string) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Backend.Remove(ctx, name)
}

func newLocal(t *testing.T) backend.Backend {
	b, err := local.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// noSleep records the waits instead of sleeping.
type noSleep struct {
	mu    sync.Mutex
	waits []time.Duration
}

func (s *noSleep) sleep(ctx context.Context, d time.Duration) error {
	s.mu.Lock()
	s.waits = append(s.waits, d)
	s.mu.Unlock()
	return ctx.Err()
}

func newRetry(be backend.Backend, p Policy, log *slog.Logger) (*Backend, *noSleep) {
	r := New(be, p, log)
	s := &noSleep{}
	r.sleep = s.sleep
	r.rnd = func(n int64) int64 { return n - 1 } // the ceiling: the waits show the backoff
	return r, s
}

type netTimeout struct{}

func (netTimeout) Error() string   { return "i/o timeout" }
func (netTimeout) Timeout() bool   { return true }
func (netTimeout) Temporary() bool { return true }

var _ net.Error = netTimeout{}

func TestRetries(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name      string
		err       error
		fails     int
		wantErr   error // nil: success
		wantCalls int
	}{
		{"transient, then success", backend.Transient(errors.New("503 SlowDown")), 3, nil, 4},
		{"connection reset", fmt.Errorf("put: %w", syscall.ECONNRESET), 2, nil, 3},
		{"timeout", netTimeout{}, 1, nil, 2},
		{"body cut short", io.ErrUnexpectedEOF, 1, nil, 2},
		{"transient beyond the attempts", backend.Transient(errors.New("500 InternalError")), 10, errors.New("gave up after 4 attempts"), 4},
		{"not found is final", fmt.Errorf("x: %w", backend.ErrNotFound), 1, backend.ErrNotFound, 1},
		{"truncated is final", fmt.Errorf("x: %w", backend.ErrTruncated), 1, backend.ErrTruncated, 1},
		{"exists is final", fmt.Errorf("x: %w", backend.ErrExists), 1, backend.ErrExists, 1},
		{"no space is final", fmt.Errorf("x: %w", backend.ErrNoSpace), 1, backend.ErrNoSpace, 1},
		{"a transient not-found is final", backend.Transient(fmt.Errorf("x: %w", backend.ErrNotFound)), 1, backend.ErrNotFound, 1},
		{"auth error is final", errors.New("AccessDenied: check the credentials"), 1, errors.New("AccessDenied"), 1},
		{"cancel is final", context.Canceled, 1, context.Canceled, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &flaky{Backend: newLocal(t), n: tc.fails, err: tc.err}
			var logged bytes.Buffer
			r, s := newRetry(f, Policy{Attempts: 4, Base: 10 * time.Millisecond, Max: 25 * time.Millisecond}, slog.New(slog.NewTextHandler(&logged, nil)))
			err := r.Save(ctx, "data/00/x", []byte("payload"))
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("Save: %v", err)
			case tc.wantErr != nil && err == nil:
				t.Fatalf("Save succeeded, want %v", tc.wantErr)
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr) && !strings.Contains(err.Error(), tc.wantErr.Error()):
				t.Fatalf("Save: %v, want %v", err, tc.wantErr)
			}
			if f.calls != tc.wantCalls {
				t.Errorf("%d calls, want %d", f.calls, tc.wantCalls)
			}
			if n := strings.Count(logged.String(), "retrying"); n != tc.wantCalls-1 {
				t.Errorf("%d retry lines, want %d:\n%s", n, tc.wantCalls-1, logged.String())
			}
			// Exponential, capped: 10ms, 20ms, 25ms (the ceilings).
			want := []time.Duration{10 * time.Millisecond, 20 * time.Millisecond, 25 * time.Millisecond}[:tc.wantCalls-1]
			if fmt.Sprint(s.waits) != fmt.Sprint(want) {
				t.Errorf("waits %v, want %v", s.waits, want)
			}
			if tc.wantErr == nil {
				if got, err := r.Load(ctx, "data/00/x", 0, 0); err != nil || string(got) != "payload" {
					t.Errorf("Load after Save = %q, %v", got, err)
				}
			}
		})
	}
}

func TestEveryMethodRetries(t *testing.T) {
	ctx := context.Background()
	f := &flaky{Backend: newLocal(t), err: backend.Transient(errors.New("503"))}
	r, _ := newRetry(f, Policy{Attempts: 3}, nil)
	if err := f.Backend.Save(ctx, "snapshots/s", []byte("abc")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3)
	// In this order: remove takes away what save wrote.
	for _, c := range []struct {
		name string
		call func() error
	}{
		{"load", func() error { _, err := r.Load(ctx, "snapshots/s", 0, 0); return err }},
		{"loadinto", func() error { _, err := r.LoadInto(ctx, "snapshots/s", 1, 2, buf); return err }},
		{"stat", func() error { _, err := r.Stat(ctx, "snapshots/s"); return err }},
		{"save", func() error { return r.Save(ctx, "snapshots/t", []byte("x")) }},
		{"remove", func() error { return r.Remove(ctx, "snapshots/t") }},
	} {
		name, call := c.name, c.call
		f.n, f.calls = 2, 0
		if err := call(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		if f.calls != 3 {
			t.Errorf("%s: %d calls, want 3", name, f.calls)
		}
	}
}

func TestFullJitter(t *testing.T) {
	p := Policy{Attempts: 10, Base: 100 * time.Millisecond, Max: time.Second}
	for n := 1; n < 8; n++ {
		ceil := min(100*time.Millisecond<<(n-1), time.Second)
		if d := p.backoff(n, func(int64) int64 { return 0 }); d != 0 {
			t.Errorf("backoff(%d) with the lowest draw = %v, want 0", n, d)
		}
		var drawn int64
		if d := p.backoff(n, func(m int64) int64 { drawn = m; return m - 1 }); d != ceil {
			t.Errorf("backoff(%d) with the highest draw = %v, want %v", n, d, ceil)
		}
		if drawn != int64(ceil)+1 {
			t.Errorf("backoff(%d) drew from [0,%d), want [0,%d]", n, drawn, ceil)
		}
	}
}

// The default policy's budget is what docs/S3.md promises: at most about
// 40 s of waiting in all, and with full jitter rarely less than a short
// server restart (a few seconds) takes. Six calls capped at 20 s waited
// at most 7.75 s, 3.9 s on average.
func TestDefaultPolicyBudget(t *testing.T) {
	p := DefaultPolicy.withDefaults()
	var most time.Duration
	for n := 1; n < p.Attempts; n++ {
		most += p.backoff(n, func(m int64) int64 { return m - 1 })
	}
	if most < 30*time.Second || most > 45*time.Second {
		t.Errorf("the default policy waits at most %v in all, want about 40 s", most)
	}
	if first := p.backoff(1, func(m int64) int64 { return m - 1 }); first > 500*time.Millisecond {
		t.Errorf("the first retry waits up to %v: a single lost answer should be retried at once", first)
	}
	// With random draws, a budget below 5 s is rare (each draw's mean is
	// half its ceiling): out of 2000 draws, a handful at most.
	short := 0
	for range 2000 {
		var total time.Duration
		for n := 1; n < p.Attempts; n++ {
			total += p.backoff(n, rand.Int64N)
		}
		if total < 5*time.Second {
			short++
		}
	}
	if short > 10 {
		t.Errorf("%d of 2000 retry sequences waited less than 5 s in all", short)
	}
}

func TestCancelStopsWaiting(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	f := &flaky{Backend: newLocal(t), n: 100, err: backend.Transient(errors.New("503"))}
	r := New(f, Policy{Attempts: 100, Base: time.Hour, Max: time.Hour}, nil)
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	if err := r.Save(ctx, "x", []byte("y")); err == nil {
		t.Fatal("Save succeeded")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("cancelled Save returned after %v", d)
	}
}

// A listing that fails part way is taken up again without passing an
// object to fn twice.
type flakyList struct {
	backend.Backend
	failAfter int
}

func (f *flakyList) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	n := 0
	return f.Backend.List(ctx, prefix, func(oi backend.ObjectInfo) error {
		if f.failAfter > 0 && n == f.failAfter {
			f.failAfter = 0
			return backend.Transient(errors.New("connection reset"))
		}
		n++
		return fn(oi)
	})
}

func TestListResumesWithoutDuplicates(t *testing.T) {
	ctx := context.Background()
	be := newLocal(t)
	for i := range 10 {
		if err := be.Save(ctx, fmt.Sprintf("index/%d", i), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	r, _ := newRetry(&flakyList{Backend: be, failAfter: 4}, Policy{}, nil)
	seen := map[string]int{}
	if err := r.List(ctx, "index/", func(oi backend.ObjectInfo) error { seen[oi.Name]++; return nil }); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 10 {
		t.Fatalf("listed %d objects, want 10", len(seen))
	}
	for n, c := range seen {
		if c != 1 {
			t.Errorf("%s passed %d times", n, c)
		}
	}
	stop := errors.New("stop")
	if err := r.List(ctx, "index/", func(backend.ObjectInfo) error { return stop }); err != stop {
		t.Errorf("List returned %v, want fn's error", err)
	}
}

// The decorator passes the conformance suite over the local backend.
func TestConformance(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backend.Backend { return New(newLocal(t), Policy{}, nil) })
}
