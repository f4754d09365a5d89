package libvirt

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/testvm"
)

// TestIOThreadDisks backs up a guest whose disks QEMU serves in an I/O
// thread. QEMU 7.2 as Debian 12 ships it aborts, killing the guest, when
// a client of such a disk's NBD export disconnects: the capture must end
// the backup job, and let QEMU close the connections, before it closes
// them. Before that order, the first capture here crashed the guest.
func TestIOThreadDisks(t *testing.T) {
	needLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g, _, vm := bootGuest(t, ctx, testvm.Options{Dir: dir, IOThread: true,
		Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data"}}})
	if x := run(t, "virsh", "-c", "qemu:///system", "dumpxml", g.Name); !strings.Contains(x, "iothread='1'") {
		t.Fatalf("the guest's disks are not in an I/O thread:\n%s", x)
	}

	// alive fails the test if QEMU is gone or was restarted: the guest
	// agent answers through the same QEMU process that started.
	alive := func(when string) {
		t.Helper()
		if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(g.PID))); err != nil {
			log, _ := os.ReadFile(filepath.Join("/var/log/libvirt/qemu", g.Name+".log"))
			lines := strings.Split(strings.TrimSpace(string(log)), "\n")
			t.Fatalf("QEMU (pid %d) is gone %s: %v\n%s", g.PID, when, err, strings.Join(lines[max(0, len(lines)-4):], "\n"))
		}
		if st := strings.TrimSpace(run(t, "virsh", "-c", "qemu:///system", "domstate", g.Name)); st != "running" {
			t.Fatalf("guest %s %s", st, when)
		}
	}

	// Both capture methods; the overlay method's merge (a block commit)
	// also runs in the disks' I/O thread.
	n := 0
	for _, method := range []string{source.MethodFleece, source.MethodOverlay} {
		since := ""
		for _, tc := range []struct {
			name string
			ok   bool
		}{{"full, ended good", true}, {"incremental, ended good", true}, {"incremental, ended failed", false}} {
			n++
			name := method + ": " + tc.name
			guestSh(t, ctx, g, "kura-workload write /data 4 "+strconv.Itoa(n))
			c, err := vm.Capture(ctx, source.CaptureOptions{Since: since, Method: method})
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			// Read a little of every disk over NBD, leaving the connections
			// open as a backup does.
			for _, d := range c.Disks() {
				buf := make([]byte, 64<<10)
				if err := d.ReadAt(ctx, buf, 0); err != nil {
					t.Fatalf("%s: reading disk %s: %v", name, d.Info().Name, err)
				}
			}
			endCapture(t, ctx, c, tc.ok)
			time.Sleep(time.Second) // an abort is not instant
			alive("after the capture " + name)
			if tc.ok {
				since = c.Checkpoint()
			}
			noBackupJob(t, vm)
		}
	}
}
