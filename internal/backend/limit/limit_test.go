package limit

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/backendtest"
	"github.com/kura-backup/kura/internal/backend/local"
)

func newLocal(t *testing.T) backend.Backend {
	b, err := local.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mem is a backend in memory: the rate test measures the limit, not a
// disk's fsyncs.
type mem struct {
	mu   sync.Mutex
	objs map[string][]byte
}

func (m *mem) Save(_ context.Context, name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.objs[name] = append([]byte(nil), data...)
	return nil
}

func (m *mem) Load(_ context.Context, name string, off, n int64) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.objs[name]
	if !ok {
		return nil, backend.ErrNotFound
	}
	if n == 0 {
		n = int64(len(d)) - off
	}
	if off+n > int64(len(d)) {
		return nil, backend.ErrTruncated
	}
	return append([]byte(nil), d[off:off+n]...), nil
}

func (m *mem) Stat(_ context.Context, name string) (backend.ObjectInfo, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.objs[name]
	if !ok {
		return backend.ObjectInfo{}, backend.ErrNotFound
	}
	return backend.ObjectInfo{Name: name, Size: int64(len(d))}, nil
}

func (m *mem) List(context.Context, string, func(backend.ObjectInfo) error) error { return nil }
func (m *mem) Remove(context.Context, string) error                               { return nil }
func (m *mem) Location() string                                                   { return "mem:" }

// TestRate measures the rate: 4 MiB through a 4 MiB/s limit, from four
// goroutines at once (the limit is shared), takes about a second less the
// burst; the other direction is not held (4 MiB through its 1 MiB/s limit
// would take 3.5 s).
func TestRate(t *testing.T) {
	if testing.Short() {
		t.Skip("measures wall-clock time")
	}
	ctx := context.Background()
	const rate = 4 << 20
	const total = 4 << 20
	obj := make([]byte, 256<<10)
	burst := float64(rate / 8)
	for _, tc := range []struct {
		name     string
		up, down float64
		op       string
		min, max time.Duration
	}{
		{"upload limited", rate, 0, "save", dur(float64(total)-burst, rate), 3 * time.Second},
		{"download limited", 0, rate, "load", dur(float64(total)-burst, rate), 3 * time.Second},
		{"download limited, whole objects", 0, rate, "load-whole", dur(float64(total)-burst, rate), 3 * time.Second},
		{"download limited, into a buffer", 0, rate, "loadinto", dur(float64(total)-burst, rate), 3 * time.Second},
		{"uploads not held by a download limit", 0, 1 << 20, "save", 0, 2 * time.Second},
		{"downloads not held by an upload limit", 1 << 20, 0, "load", 0, 2 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inner := &mem{objs: map[string][]byte{}}
			for i := range 4 {
				if err := inner.Save(ctx, fmt.Sprintf("data/%d", i), obj); err != nil {
					t.Fatal(err)
				}
			}
			b := New(inner, tc.up, tc.down)
			start := time.Now()
			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for g := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, len(obj))
					for i := range total / len(obj) / 4 {
						var err error
						name := fmt.Sprintf("data/%d", g)
						switch tc.op {
						case "save":
							err = b.Save(ctx, fmt.Sprintf("data/%d-%d", g, i), obj)
						case "load":
							_, err = b.Load(ctx, name, 0, int64(len(obj)))
						case "load-whole":
							_, err = b.Load(ctx, name, 0, 0)
						case "loadinto":
							_, err = b.LoadInto(ctx, name, 0, int64(len(obj)), buf)
						}
						if err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			took := time.Since(start)
			t.Logf("%s: %d bytes in %v (%.1f MiB/s)", tc.op, total, took, float64(total)/took.Seconds()/(1<<20))
			if took < tc.min || took > tc.max {
				t.Errorf("took %v, want %v to %v", took, tc.min, tc.max)
			}
		})
	}
}

func dur(bytes, rate float64) time.Duration {
	return time.Duration(bytes / rate * float64(time.Second))
}

func TestCancelWhileWaiting(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	b := New(newLocal(t), 1<<10, 0) // 1 KiB/s: a 1 MiB save would wait 16 minutes
	start := time.Now()
	if err := b.Save(ctx, "data/x", make([]byte, 1<<20)); err == nil {
		t.Fatal("Save succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Save returned after %v", d)
	}
}

func TestConformance(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backend.Backend { return New(newLocal(t), 512<<20, 512<<20) })
}
