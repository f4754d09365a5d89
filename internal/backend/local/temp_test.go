package local

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// deadPID returns the pid of a process that has exited.
func deadPID(t *testing.T) int {
	t.Helper()
	c := exec.Command("true")
	if err := c.Run(); err != nil {
		t.Fatal(err)
	}
	return c.Process.Pid
}

// livePID starts a process that runs until the test ends.
func livePID(t *testing.T) int {
	t.Helper()
	c := exec.Command("sleep", "60")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	return c.Process.Pid
}

func TestTempNameSaysWhoWrites(t *testing.T) {
	b, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	name := filepath.Base(b.tempName(b.root))
	host, pid, ok := parseTempName(name)
	if !ok || host != b.host || pid != os.Getpid() || !strings.HasPrefix(name, tmpPrefix) {
		t.Fatalf("temporary name %s parses as %q %d %v; want host %s, pid %d", name, host, pid, ok, b.host, os.Getpid())
	}
	h, _ := os.Hostname()
	if b.host != hostTag(h) || len(b.host) != 8 || hostTag("other") == b.host {
		t.Fatalf("host tag %q", b.host)
	}
}

func TestRemoveStaleTemp(t *testing.T) {
	b, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := b.Save(ctx, "data/ab/object", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	dead, live := deadPID(t), livePID(t)
	other := hostTag("another-host")
	old := time.Now().Add(-25 * time.Hour)
	for _, tc := range []struct {
		name   string
		size   int
		mod    time.Time // zero: now
		remove bool
	}{
		{fmt.Sprintf(".tmp-%s-%d-aaaa", b.host, dead), 25 << 10, time.Time{}, true},  // this host, writer died
		{fmt.Sprintf(".tmp-%s-%d-bbbb", b.host, live), 13 << 10, time.Time{}, false}, // this host, writer alive
		{fmt.Sprintf(".tmp-%s-%d-cccc", b.host, os.Getpid()), 1, time.Time{}, false}, // this process
		{fmt.Sprintf(".tmp-%s-%d-dddd", other, dead), 7, time.Time{}, false},         // another host: cannot tell
		{fmt.Sprintf(".tmp-%s-%d-eeee", other, dead), 9, old, true},                  // another host, a day old
		{fmt.Sprintf(".tmp-%s-%d-ffff", b.host, live), 11, old, true},                // a day old: nobody writes that long
		{".tmp-0123456789abcdef", 3, time.Time{}, false},                             // older form, recent
		{".tmp-fedcba9876543210", 5, old, true},                                      // older form, a day old
	} {
		p := filepath.Join(b.root, "data", "ab", tc.name)
		if err := os.WriteFile(p, make([]byte, tc.size), 0o600); err != nil {
			t.Fatal(err)
		}
		if !tc.mod.IsZero() {
			os.Chtimes(p, tc.mod, tc.mod)
		}
		t.Cleanup(func() {
			_, err := os.Stat(p)
			if gone := errors.Is(err, fs.ErrNotExist); gone != tc.remove {
				t.Errorf("%s: removed %v, want %v", tc.name, gone, tc.remove)
			}
		})
	}
	n, bytes, err := b.RemoveStaleTemp(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n != 4 || bytes != 25<<10+9+11+5 {
		t.Errorf("RemoveStaleTemp = %d files, %d bytes; want 4, %d", n, bytes, 25<<10+9+11+5)
	}
	if got, err := b.Load(ctx, "data/ab/object", 0, 0); err != nil || string(got) != "kept" {
		t.Errorf("object: %q %v", got, err)
	}
}
