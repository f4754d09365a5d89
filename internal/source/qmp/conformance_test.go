package qmp

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/source/sourcetest"
	"github.com/kura-backup/kura/internal/testvm"
)

// TestQMPConformance runs the source.VM conformance suite on one plain QEMU
// guest. Besides its root disk the guest has three disks it does not
// mount, which the suite writes through the guest with dd: vdb (qcow2),
// vdc (a raw file with known data) and vdd (qcow2, left idle).
func TestQMPConformance(t *testing.T) {
	needQEMU(t)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir := t.TempDir()
	rawPath := filepath.Join(dir, "vdc.raw")
	rawData := sourcetest.SparseRaw(t, rawPath, 16<<20)
	guestDir := filepath.Join(dir, "guest")
	if err := os.Mkdir(guestDir, 0o755); err != nil {
		t.Fatal(err)
	}

	g, err := testvm.StartQEMU(ctx, testvm.Options{Dir: guestDir, MemoryMiB: 512, Disks: []testvm.DiskSpec{
		{SizeMiB: 32},
		{Source: rawPath, Format: "raw"},
		{SizeMiB: 16},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Destroy(context.Background()) })
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest %s booted in %s (%s)", g.Name, g.BootTime.Round(time.Second), g.Accel)

	scratch := t.TempDir()
	vm, err := OpenWith(ctx, g.QMPSocket, "", Options{ScratchDir: scratch})
	if err != nil {
		t.Fatal(err)
	}
	sourcetest.TestVM(t, sourcetest.Harness{
		VM: vm,
		Known: []sourcetest.KnownDisk{
			{Name: "vdb", Format: "qcow2", Content: make([]byte, 32<<20), Tracked: true},
			{Name: "vdc", Format: "raw", Content: rawData},
			{Name: "vdd", Format: "qcow2", Content: make([]byte, 16<<20), Tracked: true, Idle: true},
		},
		Write:       sourcetest.GuestWriter(g),
		ScratchDirs: []string{scratch},
	})
	t.Logf("the conformance suite took %s in all", time.Since(start).Round(time.Second))
}
