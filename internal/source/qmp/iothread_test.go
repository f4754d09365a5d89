package qmp

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/testvm"
)

// TestIOThreadDisks captures a guest whose disks QEMU serves in an I/O
// thread. QEMU 7.2 as Debian 12 ships it aborts, killing the guest, when
// a client of such a disk's NBD export disconnects on its own: End must
// remove the exports (QEMU then closes the connections from its main
// loop) before it closes them.
func TestIOThreadDisks(t *testing.T) {
	needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	dir := filepath.Join(t.TempDir(), "guest")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	g, err := testvm.StartQEMU(ctx, testvm.Options{Dir: dir, MemoryMiB: 512, IOThread: true,
		Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data", SizeMiB: 128}}})
	if err != nil {
		t.Fatalf("StartQEMU: %v", err)
	}
	defer g.Destroy(context.Background())
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	v, err := Open(ctx, g.QMPSocket, "")
	if err != nil {
		t.Fatal(err)
	}
	since := ""
	for i, tc := range []struct {
		name string
		mode string
		ok   bool
	}{{"crash full, ended good", source.ModeCrash, true}, {"app incremental, ended good", source.ModeApp, true}, {"crash incremental, ended failed", source.ModeCrash, false}} {
		workload(t, ctx, g, "/data/w"+strconv.Itoa(i), 4, i+1)
		releaseAgent(g)
		c, err := v.Capture(ctx, source.CaptureOptions{Mode: tc.mode, Since: since})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		for _, d := range c.Disks() {
			if err := d.ReadAt(ctx, make([]byte, 64<<10), 0); err != nil {
				t.Fatalf("%s: reading disk %s: %v", tc.name, d.Info().Name, err)
			}
		}
		endCapture(t, ctx, c, tc.ok)
		time.Sleep(time.Second)
		// QEMU still answers (checkClean dials QMP), and so does the
		// guest (the next workload).
		checkClean(t, ctx, g.QMPSocket)
		if tc.ok {
			since = c.Checkpoint()
		}
	}
	workload(t, ctx, g, "/data/last", 1, 9)
}
