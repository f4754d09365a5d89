package libvirt

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/testvm"
)

// TestOverlayRecovery: a VM left running on the overlays of a Kura that
// was killed, and a VM shut off while it ran on a capture's overlays, both
// get their writes merged back into their disks, without losing any.
func TestOverlayRecovery(t *testing.T) {
	needLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g, _, vm := bootGuest(t, ctx, testvm.Options{Dir: dir, Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data"}}})
	sources := func(flags string) string {
		return run(t, "virsh", "-c", DefaultURI, "domblklist", g.Name, flags)
	}
	before := sources("--details")
	if strings.Contains(before, overlaySuffix) {
		t.Fatalf("the guest starts on an overlay:\n%s", before)
	}
	// write makes the guest write a file of random data and returns its
	// checksum; check reads it back past the guest's page cache.
	write := func(name string) string {
		return strings.TrimSpace(guestSh(t, ctx, g, fmt.Sprintf("head -c 3M /dev/urandom > /data/%s && sync && sha256sum < /data/%s", name, name)))
	}
	check := func(name, want string) {
		t.Helper()
		got := strings.TrimSpace(guestSh(t, ctx, g, fmt.Sprintf("echo 3 > /proc/sys/vm/drop_caches; sha256sum < /data/%s", name)))
		if got != want {
			t.Errorf("/data/%s reads %s, want %s", name, got, want)
		}
	}

	// killedKura runs a child kura that captures the guest with the
	// overlay method and is SIGKILLed; it returns the child's pid and the
	// checkpoint of its capture, and checks that the VM is left on overlays.
	killedKura := func(t *testing.T) (pid int, checkpoint string) {
		t.Helper()
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), childEnv+"="+g.Name, childMethodEnv+"="+source.MethodOverlay)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		line, _ := bufio.NewReader(out).ReadString('\n')
		cmd.Process.Kill()
		cmd.Wait()
		if !strings.HasPrefix(line, "captured ") {
			t.Fatalf("child: %q", line)
		}
		if on := sources("--details"); !strings.Contains(on, overlaySuffix) {
			t.Fatalf("the killed kura left no overlay:\n%s", on)
		}
		return cmd.Process.Pid, strings.TrimSpace(strings.TrimPrefix(line, "captured "))
	}

	// clearStale runs ClearStale and checks that the VM is back on its
	// disks and the scratch directory of the kura with pid is gone.
	clearStale := func(t *testing.T, pid int) {
		t.Helper()
		if err := vm.ClearStale(ctx); err != nil {
			t.Fatalf("ClearStale: %v", err)
		}
		if after := sources("--details"); after != before {
			t.Errorf("disks after ClearStale:\n%s\nwant\n%s", after, before)
		}
		if m, _ := filepath.Glob(fmt.Sprintf("/var/tmp/kura-%d-*", pid)); len(m) != 0 {
			t.Errorf("the dead run's scratch directory is still there: %v", m)
		}
	}

	var childCheckpoint string
	t.Run("overlays of a killed kura are merged back", func(t *testing.T) {
		var pid int
		pid, childCheckpoint = killedKura(t)
		sum := write("during")
		if swept := SweepScratch(""); len(swept) > 0 {
			for _, s := range swept {
				if strings.Contains(s, fmt.Sprintf("kura-%d-", pid)) {
					t.Fatalf("SweepScratch removed %s, whose overlays the VM runs on", s)
				}
			}
		}
		clearStale(t, pid)
		check("during", sum)
	})

	t.Run("changes since the dead run's checkpoint survive the merge", func(t *testing.T) {
		if childCheckpoint == "" {
			t.Skip("no checkpoint")
		}
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Method: source.MethodOverlay, Since: childCheckpoint})
		if err != nil {
			t.Fatal(err)
		}
		if n := noteFor(c, "vdb"); n.Read != readChanged {
			t.Errorf("vdb read %s (%s), want changed blocks since %s", n.Read, n.Reason, childCheckpoint)
		}
		if changed := changedBytes(t, ctx, c, "vdb"); changed < 3<<20 {
			t.Errorf("%d bytes changed since %s; the guest wrote 3 MiB after it", changed, childCheckpoint)
		}
		// The guest writes on while End merges; every round of the cheap
		// way is made (as if each commit took long: longer than 1 ns), and the VM ends on
		// its own disks with every write in them.
		c.(*capture).quickCommit = time.Nanosecond
		stop := make(chan struct{})
		writes := make(chan error, 1)
		go func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					writes <- nil
					return
				default:
				}
				script := fmt.Sprintf("dd if=/dev/urandom of=/data/merging bs=64k count=16 seek=%d conv=notrunc 2>/dev/null && sync", (i%8)*16)
				if r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", script); err != nil || r.ExitCode != 0 {
					writes <- fmt.Errorf("%s: exit %d, %v: %s", script, r.ExitCode, err, r.Stderr)
					return
				}
			}
		}()
		endCapture(t, ctx, c, true)
		close(stop)
		if err := <-writes; err != nil {
			t.Fatalf("guest writes during the merge: %v", err)
		}
		if got, want := c.(*capture).layered, len(c.(*capture).overlays); got != want || want == 0 {
			t.Errorf("%d of %d overlays merged below a second one", got, want)
		}
		if c.(*capture).rounds != mergeRounds {
			t.Errorf("%d rounds of merging, want %d", c.(*capture).rounds, mergeRounds)
		}
		// Libvirt's block job events, not polls, told End that its
		// commits ended and that the active ones could pivot.
		if c.(*capture).jobWakes == 0 {
			t.Error("no block job event woke the merge")
		}
		if after := sources("--details"); after != before {
			t.Errorf("disks after End:\n%s\nwant\n%s", after, before)
		}
		sum := strings.TrimSpace(guestSh(t, ctx, g, "sync; sha256sum < /data/merging"))
		check("merging", sum)
		// The writes during the merge count for the capture's checkpoint.
		c2, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Method: source.MethodOverlay, Since: c.Checkpoint()})
		if err != nil {
			t.Fatal(err)
		}
		defer endCapture(t, ctx, c2, true)
		if changed := changedBytes(t, ctx, c2, "vdb"); changed < 1<<20 {
			t.Errorf("%d bytes changed since %s; the guest wrote 1 MiB or more while it was merged", changed, c.Checkpoint())
		}
	})

	t.Run("a capture merges a killed kura's overlays first", func(t *testing.T) {
		pid, since := killedKura(t)
		sum := write("before-capture")
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Method: source.MethodOverlay, Since: since})
		if err != nil {
			t.Fatalf("Capture with a dead kura's overlays in place: %v", err)
		}
		if n := noteFor(c, "vdb"); n.Read != readChanged {
			t.Errorf("vdb read %s (%s), want changed blocks since %s", n.Read, n.Reason, since)
		}
		if changed := changedBytes(t, ctx, c, "vdb"); changed < 3<<20 {
			t.Errorf("%d bytes changed since %s; the guest wrote 3 MiB on the dead run's overlay", changed, since)
		}
		endCapture(t, ctx, c, true)
		if after := sources("--details"); after != before {
			t.Errorf("disks after the capture:\n%s\nwant\n%s", after, before)
		}
		if m, _ := filepath.Glob(fmt.Sprintf("/var/tmp/kura-%d-*", pid)); len(m) != 0 {
			t.Errorf("the dead run's scratch directory is still there: %v", m)
		}
		check("before-capture", sum)
	})

	// A kura killed during End's merge leaves the disk on a second overlay
	// above the first, before or after the commit of the first: both are
	// merged back, and the writes on them count for the dead run's
	// checkpoint.
	for _, tt := range []struct {
		name        string
		commitFirst bool
	}{
		{"on two overlays", false},
		{"on the second overlay after the first merged", true},
	} {
		t.Run("a killed kura's merge left the VM "+tt.name, func(t *testing.T) {
			pid, since := killedKura(t)
			first := diskSource(t, sources("--details"), "vdb")
			top := filepath.Join(filepath.Dir(first), "vdb.top"+overlaySuffix)
			args := []string{"-c", DefaultURI, "snapshot-create-as", g.Name, "--disk-only", "--no-metadata", "--atomic"}
			for _, target := range diskTargets(t, sources("--details")) {
				spec := target + ",snapshot=no"
				if target == "vdb" {
					spec = "vdb,snapshot=external,file=" + top
				}
				args = append(args, "--diskspec", spec)
			}
			run(t, "virsh", args...)
			if tt.commitFirst {
				run(t, "virsh", "-c", DefaultURI, "blockcommit", g.Name, "vdb", "--top", first, "--shallow", "--wait")
			}
			if on := diskSource(t, sources("--details"), "vdb"); on != top {
				t.Fatalf("vdb on %s, want %s", on, top)
			}
			sum := write("stacked")
			clearStale(t, pid)
			check("stacked", sum)
			c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Method: source.MethodOverlay, Since: since})
			if err != nil {
				t.Fatal(err)
			}
			defer endCapture(t, ctx, c, true)
			if changed := changedBytes(t, ctx, c, "vdb"); changed < 3<<20 {
				t.Errorf("%d bytes changed since %s; the guest wrote 3 MiB on the second overlay", changed, since)
			}
		})
	}

	t.Run("a VM shut off on its overlays", func(t *testing.T) {
		c, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Method: source.MethodOverlay})
		if err != nil {
			t.Fatal(err)
		}
		sum := write("poweroff")
		run(t, "virsh", "-c", DefaultURI, "destroy", g.Name)
		if err := c.End(ctx, true); err != nil {
			t.Fatalf("End: %v", err)
		}
		if after := sources("--inactive"); strings.Contains(after, overlaySuffix) {
			t.Fatalf("the definition still names an overlay:\n%s", after)
		}
		if x := run(t, "virsh", "-c", DefaultURI, "dumpxml", "--inactive", g.Name); strings.Contains(x, overlaySuffix) {
			t.Fatalf("the definition still names an overlay:\n%s", x)
		}
		if _, err := os.Stat(c.(*capture).dir); !os.IsNotExist(err) {
			t.Errorf("the scratch directory is still there: %v", err)
		}
		run(t, "virsh", "-c", DefaultURI, "start", g.Name)
		if _, err := g.WaitAgent(ctx); err != nil {
			t.Fatal(err)
		}
		if on := sources("--details"); on != before {
			t.Errorf("disks after the restart:\n%s\nwant\n%s", on, before)
		}
		guestSh(t, ctx, g, "mountpoint -q /data || mount /dev/vdb /data")
		check("poweroff", sum)
		// The offline merge wrote the guest's writes into the disk image
		// while its bitmaps were enabled: the checkpoint of that capture
		// must cover them, or the next incremental backup would miss them.
		c2, err := vm.Capture(ctx, source.CaptureOptions{Mode: source.ModeCrash, Method: source.MethodOverlay, Since: c.Checkpoint()})
		if err != nil {
			t.Fatal(err)
		}
		defer endCapture(t, ctx, c2, true)
		if n := noteFor(c2, "vdb"); n.Read != readChanged {
			t.Fatalf("vdb read %s (%s), want changed blocks since %s", n.Read, n.Reason, c.Checkpoint())
		}
		if changed := changedBytes(t, ctx, c2, "vdb"); changed < 3<<20 {
			t.Errorf("%d bytes changed since %s; the guest wrote 3 MiB on the overlay that was merged offline", changed, c.Checkpoint())
		}
	})
}

// diskTargets lists the targets in `virsh domblklist --details` output.
func diskTargets(t *testing.T, list string) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(list, "\n") {
		if f := strings.Fields(l); len(f) == 4 && f[0] != "Type" {
			out = append(out, f[2])
		}
	}
	if len(out) == 0 {
		t.Fatalf("no disks in:\n%s", list)
	}
	return out
}

// diskSource is the source of disk target in `virsh domblklist
// --details` output.
func diskSource(t *testing.T, list, target string) string {
	t.Helper()
	for _, l := range strings.Split(list, "\n") {
		if f := strings.Fields(l); len(f) == 4 && f[2] == target {
			return f[3]
		}
	}
	t.Fatalf("no disk %s in:\n%s", target, list)
	return ""
}

// changedBytes is how much of disk name the capture reports changed.
func changedBytes(t *testing.T, ctx context.Context, c source.Capture, name string) int64 {
	t.Helper()
	d := diskByName(t, c, name)
	exts, err := d.(source.ChangeTracker).Changed(ctx, 0, d.Info().Size)
	if err != nil {
		t.Fatal(err)
	}
	var changed int64
	for _, e := range exts {
		if !e.Zero {
			changed += e.Length
		}
	}
	return changed
}
