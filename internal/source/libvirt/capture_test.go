package libvirt

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/testvm"
)

// installHangHook restarts the guest agent with testvm.HangFreezeHook.
func installHangHook(t *testing.T, ctx context.Context, g *testvm.Guest) {
	t.Helper()
	if err := g.InstallFreezeHook(ctx, testvm.HangFreezeHook); err != nil {
		t.Fatal(err)
	}
}

// checkpoints lists the domain's checkpoints.
func checkpoints(t *testing.T, v *VM) []string {
	t.Helper()
	cps, _, err := v.c.l.DomainListAllCheckpoints(v.dom, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, cp := range cps {
		names = append(names, cp.Name)
	}
	slices.Sort(names)
	return names
}

// noBackupJob checks that the backup job is gone, or goes within 5 s:
// after a good backup libvirt tears it down on its own (End does not wait).
func noBackupJob(t *testing.T, v *VM) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		x, err := v.c.l.DomainBackupGetXMLDesc(v.dom, 0)
		if libvirtCode(err) == golibvirt.ErrNoDomainBackup {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("a backup job is still there 5 s after the capture ended: %v %s", err, x)
			return
		}
	}
}

func agentStatus(t *testing.T, ctx context.Context, g *testvm.Guest) string {
	t.Helper()
	var st string
	if err := g.Agent(ctx, "guest-fsfreeze-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func endCapture(t *testing.T, ctx context.Context, c source.Capture, ok bool) {
	t.Helper()
	dir := ""
	if lc, live := c.(*capture); live {
		dir = lc.dir
	}
	start := time.Now()
	if err := c.End(ctx, ok); err != nil {
		t.Fatalf("End(%v): %v", ok, err)
	}
	t.Logf("End(%v) took %s", ok, time.Since(start).Round(time.Millisecond))
	if dir != "" {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("scratch directory %s still there after End: %v", dir, err)
		}
	}
}

// TestLibvirtCapture is the driver's conformance test against a real
// libvirt guest: full and incremental captures in every mode, the
// checkpoint chain, and the failures a user meets.
func TestLibvirtCapture(t *testing.T) {
	needLibvirt(t)
	testStart := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	dir := t.TempDir()

	// A raw data disk: 64 MiB, 1 MiB of random data at 8 MiB, the rest a hole.
	rawPath := filepath.Join(dir, "vdd.raw")
	rawData := make([]byte, 1<<20)
	rand.Read(rawData)
	if err := os.WriteFile(rawPath, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(rawPath, 64<<20); err != nil {
		t.Fatal(err)
	}
	if f, err := os.OpenFile(rawPath, os.O_WRONLY, 0); err == nil {
		f.WriteAt(rawData, 8<<20)
		f.Close()
	}

	g, err := testvm.StartLibvirt(ctx, testvm.Options{Dir: dir, Disks: []testvm.DiskSpec{
		{FS: "ext4", Mount: "/data"},
		{FS: "xfs", Mount: "/data2"},
		{Source: rawPath, Format: "raw"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Destroy(context.Background()) })
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest %s booted in %s (%s)", g.Name, g.BootTime.Round(time.Second), g.Accel)
	installHangHook(t, ctx, g)

	conn, vm := connectVM(t, ctx, g.Name)

	t.Run("block stats", func(t *testing.T) {
		before, err := conn.BlockStats(ctx, g.Name)
		if err != nil {
			t.Fatal(err)
		}
		guestSh(t, ctx, g, "dd if=/dev/urandom of=/data/stats.bin bs=64k count=64 oflag=direct 2>/dev/null && rm /data/stats.bin")
		after, err := conn.BlockStats(ctx, g.Name)
		if err != nil {
			t.Fatal(err)
		}
		b, a := before["vdb"], after["vdb"]
		if len(after) != 4 || a.WriteOps-b.WriteOps < 64 || a.WriteBytes-b.WriteBytes < 64*64<<10 || a.WriteTimeNs <= b.WriteTimeNs {
			t.Fatalf("block stats of %s: before %+v after %+v (all: %v)", g.Name, b, a, after)
		}
		all, err := conn.AllBlockStats(ctx)
		if err != nil || len(all[g.Name]) != 4 || all[g.Name]["vdb"].WriteOps < a.WriteOps {
			t.Fatalf("AllBlockStats: %v, %s: %+v", err, g.Name, all[g.Name])
		}
	})

	t.Run("list, lookup and config", func(t *testing.T) {
		names, err := conn.List(ctx)
		if err != nil || !slices.Contains(names, g.Name) {
			t.Fatalf("List = %v, %v; want it to contain %s", names, err, g.Name)
		}
		if _, err := conn.VM(ctx, "kura-no-such-vm"); !isNotFound(err) || !strings.Contains(err.Error(), "kura-no-such-vm") {
			t.Errorf("VM of a missing domain: %v; want ErrNotFound naming it", err)
		}
		typ, x, err := vm.Config(ctx)
		if err != nil || typ != "libvirt-xml" || !strings.Contains(x, "<name>"+g.Name+"</name>") || !strings.Contains(x, "vdb.qcow2") {
			t.Fatalf("Config = %q, %d bytes, %v", typ, len(x), err)
		}
	})

	guestSh(t, ctx, g, "kura-workload write /data 8 1 && kura-workload write /data2 8 2")

	// Full capture, default mode: the agent answers, so app.
	vdbBase := filepath.Join(dir, "vdb-base.raw") // vdb as of the last capture
	var cp1 string
	if !t.Run("full app capture", func(t *testing.T) {
		start := time.Now()
		c, err := vm.Capture(ctx, source.CaptureOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.End(ctx, false)
		t.Logf("Capture took %s; freeze window %s: freeze call %s, backup job's start %s, thaw call %s", time.Since(start).Round(time.Millisecond), c.FreezeWindow().Round(time.Microsecond), c.(*capture).FreezeParts().Freeze.Round(time.Microsecond), c.(*capture).FreezeParts().Instant.Round(time.Microsecond), c.(*capture).FreezeParts().Thaw.Round(time.Microsecond))
		if c.Mode() != source.ModeApp {
			t.Errorf("Mode = %q; want app", c.Mode())
		}
		if w := c.FreezeWindow(); w <= 0 || w > 20*time.Second { // generous: the freeze is the guest's work, slow under TCG and load
			t.Errorf("FreezeWindow = %s", w)
		}
		if c.Pause() != 0 {
			t.Errorf("Pause = %s in app mode", c.Pause())
		}
		if st := agentStatus(t, ctx, g); st != "thawed" {
			t.Errorf("guest %s after Capture", st)
		}
		cp1 = c.Checkpoint()
		if !strings.HasPrefix(cp1, CheckpointPrefix) {
			t.Fatalf("Checkpoint = %q", cp1)
		}
		for _, n := range c.Notes() {
			t.Logf("note %+v", n)
			if n.Read != "full" {
				t.Errorf("note %+v; want full for a first backup", n)
			}
		}
		if n := noteFor(c, "vdd"); !strings.Contains(n.Reason, "raw") {
			t.Errorf("raw disk note %+v; want it to say raw", n)
		}
		var names []string
		for _, d := range c.Disks() {
			names = append(names, d.Info().Name)
			if _, ok := d.(source.ChangeTracker); ok {
				t.Errorf("disk %s of a full capture tracks changes", d.Info().Name)
			}
		}
		if !slices.Equal(names, []string{"vda", "vdb", "vdc", "vdd"}) {
			t.Fatalf("disks %v", names)
		}
		if info := diskByName(t, c, "vdb").Info(); info.Format != "qcow2" || info.Size != 256<<20 || !strings.HasSuffix(info.Path, "vdb.qcow2") {
			t.Errorf("vdb info %+v", info)
		}
		if info := diskByName(t, c, "vdd").Info(); info.Format != "raw" || info.Path != rawPath {
			t.Errorf("vdd info %+v", info)
		}

		// QEMU answers base:allocation for the whole backing chain: a hole
		// is always zero too (the root disk is an overlay over a base image).
		cl, err := nbd.Dial(ctx, "unix", capSocket(c), nbd.Options{ExportName: "vda", MetaContexts: []string{nbd.MetaBaseAllocation}})
		if err != nil {
			t.Fatal(err)
		}
		st, err := cl.BlockStatus(ctx, nbd.MetaBaseAllocation, 0, cl.Size())
		cl.Close()
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range st {
			if e.Flags&nbd.StateHole != 0 && e.Flags&nbd.StateZero == 0 {
				t.Errorf("vda export: hole without zero at %d+%d", e.Offset, e.Length)
			}
		}

		images := map[string]string{"vda": filepath.Join(dir, "vda.raw"), "vdb": vdbBase, "vdc": filepath.Join(dir, "vdc.raw"), "vdd": filepath.Join(dir, "vdd-copy.raw")}
		for _, d := range c.Disks() {
			name := d.Info().Name
			start := time.Now()
			sum, read := copyDisk(t, ctx, d, images[name])
			took := time.Since(start)
			if want := exportHash(t, capSocket(c), name); sum != want {
				t.Errorf("disk %s read through the capture: sha256 %s; nbdcopy of the export: %s", name, sum, want)
			}
			t.Logf("disk %s: read %d MiB of %d MiB in %s, equal to nbdcopy", name, read>>20, d.Info().Size>>20, took.Round(time.Millisecond))
		}
		if n := verifyExt4(t, vdbBase); n != 8 {
			t.Errorf("%d files in /data; want 8", n)
		}
		if n := verifyXFS(t, images["vdc"]); n != 8 && n != 0 {
			t.Errorf("%d files in /data2; want 8", n)
		}
		if out, err := exec.Command("fsck.ext4", "-fn", images["vda"]).CombinedOutput(); err != nil {
			t.Errorf("the root filesystem of the app-consistent capture: fsck.ext4 -fn: %v\n%s", err, out)
		}
		raw, err := os.ReadFile(images["vdd"])
		if err != nil || string(raw[8<<20:9<<20]) != string(rawData) {
			t.Errorf("raw disk vdd: data at 8 MiB differs from what was written (%v)", err)
		}
		endCapture(t, ctx, c, true)
		noBackupJob(t, vm)
		if cps := checkpoints(t, vm); !slices.Equal(cps, []string{cp1}) {
			t.Errorf("checkpoints %v; want [%s]", cps, cp1)
		}
	}) {
		return
	}

	// Incremental: 2 MiB more in /data, then only the changes are read, and
	// applied to the previous image they give the new one.
	guestSh(t, ctx, g, "kura-workload write /data 2 3")
	var cp2 string
	if !t.Run("incremental crash capture", func(t *testing.T) {
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: cp1})
		if err != nil {
			t.Fatal(err)
		}
		defer c.End(ctx, false)
		if c.Mode() != source.ModeCrash || c.FreezeWindow() != 0 || c.Pause() != 0 {
			t.Errorf("Mode %q, FreezeWindow %s, Pause %s; want crash, 0, 0", c.Mode(), c.FreezeWindow(), c.Pause())
		}
		for _, n := range c.Notes() {
			t.Logf("note %+v", n)
		}
		for _, name := range []string{"vda", "vdb", "vdc"} {
			if n := noteFor(c, name); n.Read != "changed" {
				t.Errorf("disk %s: note %+v; want changed", name, n)
			}
		}
		if n := noteFor(c, "vdd"); n.Read != "full" || !strings.Contains(n.Reason, "raw") {
			t.Errorf("raw disk: note %+v; want full because raw", n)
		}
		vdb := diskByName(t, c, "vdb")
		changed := applyChanges(t, ctx, vdb, vdbBase)
		t.Logf("vdb: %d KiB changed of %d MiB", changed>>10, vdb.Info().Size>>20)
		if changed < 2<<20 || changed > vdb.Info().Size/10 {
			t.Errorf("vdb: %d bytes changed after writing 2 MiB; want at least 2 MiB and under a tenth of the disk", changed)
		}
		if got, want := fileHash(t, vdbBase), exportHash(t, capSocket(c), "vdb"); got != want {
			t.Fatalf("previous image + changed ranges: sha256 %s; the export now: %s", got, want)
		}
		cp2 = c.Checkpoint()
		endCapture(t, ctx, c, true)
		if cps := checkpoints(t, vm); !slices.Equal(cps, []string{cp2}) {
			t.Errorf("checkpoints %v; want [%s]: older kura checkpoints go after a good backup", cps, cp2)
		}
	}) {
		return
	}

	// A failed backup (End(false)) drops its checkpoint; the next capture,
	// from the last good checkpoint, still sees every change since it.
	guestSh(t, ctx, g, "kura-workload write /data 1 4")
	if !t.Run("failed suspend capture keeps the chain", func(t *testing.T) {
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeSuspend, Since: cp2})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("suspend mode: paused for %s", c.Pause().Round(time.Microsecond))
		if c.Mode() != source.ModeSuspend || c.Pause() <= 0 || c.Pause() > 5*time.Second || c.FreezeWindow() != 0 {
			t.Errorf("Mode %q, Pause %s, FreezeWindow %s", c.Mode(), c.Pause(), c.FreezeWindow())
		}
		if st, err := vm.state(ctx); err != nil || st != golibvirt.DomainRunning {
			t.Errorf("VM state after a suspend capture: %s, %v; want running", stateName(st), err)
		}
		if c.Checkpoint() == "" || c.Checkpoint() == cp2 {
			t.Errorf("Checkpoint %q", c.Checkpoint())
		}
		endCapture(t, ctx, c, false)
		if cps := checkpoints(t, vm); !slices.Equal(cps, []string{cp2}) {
			t.Errorf("checkpoints %v; want [%s]: a failed backup's checkpoint goes", cps, cp2)
		}
		guestSh(t, ctx, g, "kura-workload write /data 1 5")
		c, err = vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: cp2})
		if err != nil {
			t.Fatal(err)
		}
		defer c.End(ctx, false)
		changed := applyChanges(t, ctx, diskByName(t, c, "vdb"), vdbBase)
		if got, want := fileHash(t, vdbBase), exportHash(t, capSocket(c), "vdb"); got != want {
			t.Fatalf("image at %s + changes since: sha256 %s; the export now: %s", cp2, got, want)
		}
		t.Logf("changes since %s across the failed backup: %d KiB, image matches", cp2, changed>>10)
		endCapture(t, ctx, c, true)
	}) {
		return
	}

	t.Run("missing checkpoint reads in full", func(t *testing.T) {
		const gone = "kura-19990101T000000.000000Z"
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: gone})
		if err != nil {
			t.Fatal(err)
		}
		defer c.End(ctx, false)
		for _, d := range c.Disks() {
			if _, ok := d.(source.ChangeTracker); ok {
				t.Errorf("disk %s tracks changes since a missing checkpoint", d.Info().Name)
			}
		}
		for _, name := range []string{"vda", "vdb", "vdc"} {
			if n := noteFor(c, name); n.Read != "full" || !strings.Contains(n.Reason, gone) || !strings.Contains(n.Reason, "missing") {
				t.Errorf("disk %s: note %+v; want full because %s is missing", name, n, gone)
			}
		}
		if c.Checkpoint() == "" {
			t.Error("no new checkpoint after a full read")
		}
		endCapture(t, ctx, c, true)
		if cps := checkpoints(t, vm); !slices.Equal(cps, []string{c.Checkpoint()}) {
			t.Errorf("checkpoints %v; want [%s]", cps, c.Checkpoint())
		}
	})

	t.Run("broken bitmap reads that disk in full", func(t *testing.T) {
		cps := checkpoints(t, vm)
		if len(cps) != 1 {
			t.Fatalf("checkpoints %v", cps)
		}
		since := cps[0]
		// Remove vdb's bitmap behind libvirt's back, as a replaced disk
		// image would lose it.
		x, _ := vm.c.l.DomainGetXMLDesc(vm.dom, 0)
		m := regexp.MustCompile(`(?s)<source file='[^']*vdb\.qcow2' index='(\d+)'/>`).FindStringSubmatch(x)
		if m == nil {
			t.Fatalf("no index for vdb in the domain XML")
		}
		run(t, "virsh", "-c", "qemu:///system", "qemu-monitor-command", g.Name,
			fmt.Sprintf(`{"execute":"block-dirty-bitmap-remove","arguments":{"node":"libvirt-%s-format","name":%q}}`, m[1], since))
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Since: since})
		if err != nil {
			t.Fatal(err)
		}
		defer c.End(ctx, false)
		if n := noteFor(c, "vdb"); n.Read != "full" || !strings.Contains(n.Reason, "missing or broken") {
			t.Errorf("vdb: note %+v; want full because its bitmap is gone", n)
		}
		if n := noteFor(c, "vda"); n.Read != "changed" {
			t.Errorf("vda: note %+v; want changed", n)
		}
		endCapture(t, ctx, c, true) // deletes the broken checkpoint too
		if cps := checkpoints(t, vm); !slices.Equal(cps, []string{c.Checkpoint()}) {
			t.Errorf("checkpoints %v; want [%s]", cps, c.Checkpoint())
		}
	})

	t.Run("hung freeze fails the capture and leaves the VM untouched", func(t *testing.T) {
		conn2, err := ConnectWithOptions(ctx, "qemu:///system", Options{Agent: guestTimeouts(3 * time.Second)})
		if err != nil {
			t.Fatal(err)
		}
		defer conn2.Close()
		v2, err := conn2.VM(ctx, g.Name)
		if err != nil {
			t.Fatal(err)
		}
		before := checkpoints(t, vm)
		guestSh(t, ctx, g, "echo 8 >/run/kura-hang-freeze")
		defer guestSh(t, ctx, g, "rm -f /run/kura-hang-freeze")
		start := time.Now()
		c, err := v2.Capture(ctx, source.CaptureOptions{Mode: source.ModeApp})
		took := time.Since(start)
		if err == nil {
			c.End(ctx, false)
			t.Fatal("Capture succeeded with a freeze that hangs")
		}
		t.Logf("Capture failed after %s: %v", took.Round(time.Millisecond), err)
		if !strings.Contains(err.Error(), "freezing") || !strings.Contains(err.Error(), g.Name) {
			t.Errorf("error %q does not say that freezing VM %s failed", err, g.Name)
		}
		if took > 45*time.Second {
			t.Errorf("took %s", took)
		}
		if st := agentStatus(t, ctx, g); st != "thawed" {
			t.Errorf("guest %s after the failed capture", st)
		}
		if st, err := vm.state(ctx); err != nil || st != golibvirt.DomainRunning {
			t.Errorf("VM %s, %v; want running", stateName(st), err)
		}
		noBackupJob(t, vm)
		if cps := checkpoints(t, vm); !slices.Equal(cps, before) {
			t.Errorf("checkpoints %v; want %v unchanged", cps, before)
		}
	})

	t.Run("backup job of a killed kura is cleared", func(t *testing.T) {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"="+g.Name)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		line, _ := bufio.NewReader(out).ReadString('\n')
		if !strings.HasPrefix(line, "captured ") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("child: %q", line)
		}
		cmd.Process.Kill()
		cmd.Wait()
		if _, err := vm.c.l.DomainBackupGetXMLDesc(vm.dom, 0); err != nil {
			t.Fatalf("no backup job left by the killed child: %v", err)
		}
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash})
		if err != nil {
			t.Fatalf("Capture after a kura died mid-backup: %v", err)
		}
		endCapture(t, ctx, c, true)
		if cps := checkpoints(t, vm); !slices.Equal(cps, []string{c.Checkpoint()}) {
			t.Errorf("checkpoints %v; want [%s]: the dead run's checkpoint goes too", cps, c.Checkpoint())
		}
		if m, _ := filepath.Glob(fmt.Sprintf("/var/tmp/kura-%d-*", cmd.Process.Pid)); len(m) != 0 {
			t.Errorf("the dead run's scratch directory is still there: %v", m)
		}
	})

	t.Run("a capture right after a good one waits for its job's teardown", func(t *testing.T) {
		// End(true) aborts the job and returns; libvirt tears the job
		// down on its own. A capture at once must wait for that rather
		// than take it for another backup, and the job must go.
		for i := 0; i < 3; i++ {
			c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash})
			if err != nil {
				t.Fatalf("capture %d, right after the previous one ended: %v", i+1, err)
			}
			endCapture(t, ctx, c, true)
		}
		noBackupJob(t, vm)
	})

	t.Run("a capture that does not wait for its parent", func(t *testing.T) {
		// With ParentReady open, the capture takes its instant from the
		// VM's only Kura checkpoint and asks Parent afterwards; whatever
		// Parent says, the disks are read as they would have been.
		wrong := errors.New("wrong password")
		cases := []struct {
			name   string
			parent func(cp string) (string, error)
			ready  bool   // Parent answers at once: no guess
			read   string // how vdb is read: "changed" or "full"
			reason string // in vdb's note when read in full
			err    error
		}{
			{name: "parent is the VM's checkpoint", parent: func(cp string) (string, error) { return cp, nil }, read: "changed"},
			{name: "no parent (a new repository)", parent: func(string) (string, error) { return "", nil }, read: "full", reason: "first backup"},
			{name: "parent the VM no longer has", parent: func(string) (string, error) { return "kura-19990101T000000.000000Z", nil }, read: "full", reason: "missing"},
			{name: "parent fails", parent: func(string) (string, error) { return "", wrong }, err: wrong},
			{name: "parent ready", parent: func(cp string) (string, error) { return cp, nil }, ready: true, read: "changed"},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				before := checkpoints(t, vm)
				if len(before) != 1 {
					t.Fatalf("checkpoints %v; want one", before)
				}
				guestSh(t, ctx, g, "kura-workload write /data 1 5") // rewrites a file: the count stays
				ready := make(chan struct{})
				if tc.ready {
					close(ready)
				}
				var atAsk []string
				opts := source.CaptureOptions{ParentReady: ready, Parent: func(context.Context) (string, error) {
					atAsk = checkpoints(t, vm)
					return tc.parent(before[0])
				}}
				c, err := vm.Capture(ctx, opts)
				if tc.ready && len(atAsk) != 1 || !tc.ready && len(atAsk) != 2 {
					t.Errorf("checkpoints when Parent was asked: %v; want %d", atAsk, map[bool]int{true: 1, false: 2}[tc.ready])
				}
				if tc.err != nil {
					if !errors.Is(err, tc.err) {
						t.Fatalf("Capture: %v; want %v", err, tc.err)
					}
					if cps := checkpoints(t, vm); !slices.Equal(cps, before) {
						t.Errorf("checkpoints %v after Parent failed; want %v", cps, before)
					}
					noBackupJob(t, vm)
					if st := agentStatus(t, ctx, g); st != "thawed" {
						t.Errorf("guest filesystems %q after Parent failed; want thawed", st)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				defer c.End(ctx, false)
				if c.Mode() != source.ModeApp {
					t.Errorf("mode %q; want app", c.Mode())
				}
				n := noteFor(c, "vdb")
				if n.Read != tc.read || !strings.Contains(n.Reason, tc.reason) {
					t.Errorf("vdb: note %+v; want %s (%s)", n, tc.read, tc.reason)
				}
				_, tracks := diskByName(t, c, "vdb").(source.ChangeTracker)
				if tracks != (tc.read == "changed") {
					t.Errorf("vdb tracks changes: %v; want %v", tracks, tc.read == "changed")
				}
				endCapture(t, ctx, c, true)
				if cps := checkpoints(t, vm); !slices.Equal(cps, []string{c.Checkpoint()}) {
					t.Errorf("checkpoints %v; want [%s]", cps, c.Checkpoint())
				}
			})
		}
	})

	t.Run("a managed-saved VM is read offline and says so", func(t *testing.T) {
		run(t, "virsh", "-c", "qemu:///system", "managedsave", g.Name)
		defer func() {
			run(t, "virsh", "-c", "qemu:///system", "start", g.Name)
			if _, err := g.WaitAgent(ctx); err != nil {
				t.Fatal(err)
			}
		}()
		c, err := vm.Capture(ctx, source.CaptureOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.End(ctx, false)
		if n := noteFor(c, "vdb"); n.Read != "full" || !strings.Contains(n.Reason, "managed save") {
			t.Errorf("vdb of a managed-saved VM: note %+v; want full, saying it was saved", n)
		}
		endCapture(t, ctx, c, true)
	})

	t.Run("shutdown mode", func(t *testing.T) {
		// The test guest has no D-Bus, hence no logind: it ignores the ACPI
		// power button, and qemu-ga's guest-shutdown (shutdown -P +0)
		// fails. A direct poweroff works.
		guestSh(t, ctx, g, `rm -f /sbin/shutdown && printf '#!/bin/sh\nexec /bin/systemctl poweroff\n' >/sbin/shutdown && chmod 755 /sbin/shutdown`)
		since := checkpoints(t, vm)[0]
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeShutdown, Since: since})
		if err != nil {
			t.Fatal(err)
		}
		defer c.End(ctx, false)
		// The VM runs again (booting) while its disks are read.
		if st, err := vm.state(ctx); err != nil || st != golibvirt.DomainRunning {
			t.Fatalf("VM %s, %v after a shutdown capture; want running", stateName(st), err)
		}
		t.Logf("shutdown mode: VM down for %s", c.Pause().Round(time.Millisecond))
		if c.Pause() <= 0 {
			t.Errorf("Pause %s", c.Pause())
		}
		if c.Mode() != source.ModeShutdown || !strings.HasPrefix(c.Checkpoint(), CheckpointPrefix) {
			t.Errorf("Mode %q, Checkpoint %q; want shutdown and a new checkpoint", c.Mode(), c.Checkpoint())
		}
		for _, n := range c.Notes() {
			if n.Disk == "vdb" && n.Read != "changed" {
				t.Errorf("vdb read %q (%s) in shutdown mode after checkpoint %s; want changed", n.Read, n.Reason, since)
			}
		}
		// The instant is the cleanly shut-down disk: a clean ext4 that needs
		// no journal recovery, with every file the guest wrote.
		img := filepath.Join(dir, "vdb-shutdown.raw")
		copyDisk(t, ctx, diskByName(t, c, "vdb"), img)
		if n := verifyExt4(t, img); n != 12 {
			t.Errorf("%d files in /data; want 12", n)
		}
		sb := run(t, "dumpe2fs", "-h", img)
		if !regexp.MustCompile(`(?m)^Filesystem state:\s+clean$`).MatchString(sb) || strings.Contains(sb, "needs_recovery") {
			t.Errorf("vdb captured in shutdown mode is not a cleanly unmounted ext4:\n%s", sb)
		}
		endCapture(t, ctx, c, true)
		if st, err := vm.state(ctx); err != nil || st != golibvirt.DomainRunning {
			t.Fatalf("VM %s, %v after End; want running", stateName(st), err)
		}
		if _, err := g.WaitAgent(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("VM destroyed mid-read", func(t *testing.T) {
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash})
		if err != nil {
			t.Fatal(err)
		}
		vda := diskByName(t, c, "vda")
		buf := make([]byte, 1<<20)
		var readErr error
		for off, i := int64(0), 0; off < vda.Info().Size; off, i = off+int64(len(buf)), i+1 {
			if i == 4 {
				run(t, "virsh", "-c", "qemu:///system", "destroy", g.Name)
			}
			if readErr = vda.ReadAt(ctx, buf, off); readErr != nil {
				break
			}
		}
		t.Logf("read error: %v", readErr)
		if readErr == nil || !strings.Contains(readErr.Error(), g.Name) || !strings.Contains(readErr.Error(), "no longer running") {
			t.Errorf("read after the VM was destroyed: %v; want an error saying VM %s is no longer running", readErr, g.Name)
		}
		ectx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		start := time.Now()
		err = c.End(ectx, false)
		t.Logf("End after the VM was destroyed: %s, %v", time.Since(start).Round(time.Millisecond), err)
		if time.Since(start) > 30*time.Second {
			t.Errorf("End took %s", time.Since(start))
		}
		if _, serr := os.Stat(c.(*capture).dir); !errors.Is(serr, os.ErrNotExist) {
			t.Errorf("scratch directory left behind: %v", serr)
		}
	})
	t.Logf("TestLibvirtCapture: %s", time.Since(testStart).Round(time.Second))
}

func TestGuessSince(t *testing.T) {
	open, closed := make(chan struct{}), make(chan struct{})
	close(closed)
	parent := func(context.Context) (string, error) { return "", nil }
	one := checkpointRead{name: "kura-2", kura: 1}
	for _, tc := range []struct {
		name    string
		opts    source.CaptureOptions
		newest  checkpointRead
		want    string
		guessed bool
	}{
		{"no Parent", source.CaptureOptions{ParentReady: open}, one, "", false},
		{"no ParentReady", source.CaptureOptions{Parent: parent}, one, "", false},
		{"Parent ready", source.CaptureOptions{Parent: parent, ParentReady: closed}, one, "", false},
		{"one checkpoint", source.CaptureOptions{Parent: parent, ParentReady: open}, one, "kura-2", true},
		{"no checkpoint", source.CaptureOptions{Parent: parent, ParentReady: open}, checkpointRead{}, "", true},
		{"two checkpoints", source.CaptureOptions{Parent: parent, ParentReady: open}, checkpointRead{name: "kura-2", kura: 2}, "", false},
		{"checkpoints unreadable", source.CaptureOptions{Parent: parent, ParentReady: open}, checkpointRead{err: errors.New("x")}, "", false},
		{"full", source.CaptureOptions{Parent: parent, ParentReady: open, Full: true}, checkpointRead{name: "kura-2", kura: 2}, "", true},
		{"Since given", source.CaptureOptions{Parent: parent, ParentReady: open, Since: "kura-1"}, checkpointRead{name: "kura-2", kura: 2}, "kura-1", true},
	} {
		got, guessed := guessSince(tc.opts, tc.newest)
		if got != tc.want || guessed != tc.guessed {
			t.Errorf("%s: guessSince = %q, %v; want %q, %v", tc.name, got, guessed, tc.want, tc.guessed)
		}
	}
}

// A shut-off VM is read offline unless libvirt says it was migrated away.
// (Migration needs a second host, which these machines lack: the reason is
// given here as libvirt reports it after `virsh migrate` without
// --undefinesource.)
func TestOfflineAllowed(t *testing.T) {
	v := &VM{dom: golibvirt.Domain{Name: "web01"}}
	for _, tc := range []struct {
		state  golibvirt.DomainState
		reason golibvirt.DomainShutoffReason
		want   string // in the error; "" allows it
	}{
		{golibvirt.DomainShutoff, golibvirt.DomainShutoffShutdown, ""},
		{golibvirt.DomainShutoff, golibvirt.DomainShutoffDestroyed, ""},
		{golibvirt.DomainShutoff, golibvirt.DomainShutoffSaved, ""},
		{golibvirt.DomainShutoff, golibvirt.DomainShutoffMigrated, "migrated to another host"},
		{golibvirt.DomainCrashed, golibvirt.DomainShutoffMigrated, ""}, // another state's reason numbering
	} {
		err := v.offlineAllowed(tc.state, int32(tc.reason))
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "virsh undefine web01")) {
			t.Errorf("state %d reason %d: %v; want %q", tc.state, tc.reason, err, tc.want)
		}
	}
}
