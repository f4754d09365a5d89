package libvirt

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/source/sourcetest"
	"github.com/kura-backup/kura/internal/testvm"
)

// TestLibvirtConformance runs the source.VM conformance suite on a
// libvirt guest, once for each capture method. Besides its root disk the guest has three disks it does
// not mount, which the suite writes through the guest with dd: vdb (qcow2),
// vdc (a raw file with known data) and vdd (qcow2, left idle).
func TestLibvirtConformance(t *testing.T) {
	needLibvirt(t)
	for _, method := range []string{source.MethodFleece, source.MethodOverlay} {
		t.Run(method, func(t *testing.T) { conformance(t, method) })
	}
}

func conformance(t *testing.T, method string) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir := t.TempDir()
	rawPath := filepath.Join(dir, "vdc.raw")
	rawData := sourcetest.SparseRaw(t, rawPath, 16<<20)

	g, err := testvm.StartLibvirt(ctx, testvm.Options{Dir: dir, MemoryMiB: 512, Disks: []testvm.DiskSpec{
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
	conn, err := ConnectWithOptions(ctx, DefaultURI, Options{ScratchDir: scratch})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	vm, err := conn.VM(ctx, g.Name)
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
		Method:      method,
	})
	t.Logf("the conformance suite took %s in all", time.Since(start).Round(time.Second))
}
