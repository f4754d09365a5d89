package testvm

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// maxBoot is how long a guest may take from start to a responding agent.
// Under TCG on a two-core machine it takes 15 to 30 s.
const maxBoot = 60 * time.Second

// needGuests skips a test that boots guests where that cannot work.
func needGuests(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a guest (tens of seconds); runs without -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("boots a guest: needs root (QEMU, libvirt, building the guest image)")
	}
	if _, err := exec.LookPath(qemuBinary); err != nil {
		t.Skipf("boots a guest: %s not installed (apt-get install qemu-system-x86)", qemuBinary)
	}
}

func testImage(t *testing.T, ctx context.Context) Image {
	t.Helper()
	img, err := EnsureImage(ctx)
	if err != nil {
		t.Fatalf("EnsureImage: %v", err)
	}
	return img
}

// exercise runs the workload on every mounted data disk and checks it.
func exercise(t *testing.T, ctx context.Context, g *Guest) {
	t.Helper()
	for _, d := range g.Disks[1:] {
		if d.Mount == "" {
			continue
		}
		out, code, err := g.Exec(ctx, "/usr/local/bin/kura-workload", "write", d.Mount, "20", "1")
		if err != nil || code != 0 {
			t.Fatalf("kura-workload write %s: exit %d, %v: %s", d.Mount, code, err, out)
		}
		start := time.Now()
		out, code, err = g.Exec(ctx, "/usr/local/bin/kura-workload", "verify", d.Mount)
		if err != nil || code != 0 || !strings.HasPrefix(out, "OK 20 files") {
			t.Fatalf("kura-workload verify %s: exit %d, %v: %q", d.Mount, code, err, out)
		}
		t.Logf("%s (%s on %s, %s): wrote and verified 20 MiB, verify took %s", d.Mount, d.FS, d.Target, d.Bus, time.Since(start).Round(time.Millisecond))
		out, _, err = g.Exec(ctx, "/bin/findmnt", "-n", "-o", "FSTYPE", d.Mount)
		if err != nil || strings.TrimSpace(out) != d.FS {
			t.Errorf("%s is %q in the guest, want %s (%v)", d.Mount, strings.TrimSpace(out), d.FS, err)
		}
	}
	// A failing command reports its exit status and standard error.
	r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", "echo oops >&2; exit 3")
	if err != nil || r.ExitCode != 3 || r.Stderr != "oops\n" {
		t.Errorf("failing command: %+v, %v; want exit 3 and stderr \"oops\\n\"", r, err)
	}
	// Standard input reaches the command.
	r, err = g.ExecFull(ctx, []byte("hello"), "/bin/cat")
	if err != nil || r.Stdout != "hello" {
		t.Errorf("cat with input: %+v, %v", r, err)
	}
}

var dataDisks = []DiskSpec{
	{FS: "ext4", Mount: "/data", SizeMiB: 256},
	{FS: "xfs", Mount: "/data2", SizeMiB: 512, Bus: BusSCSI},
}

func TestLibvirtGuestRunsWorkload(t *testing.T) {
	needGuests(t)
	if _, err := exec.LookPath("virsh"); err != nil {
		t.Skip("libvirt-clients not installed (apt-get install libvirt-daemon-system libvirt-clients)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	img := testImage(t, ctx)

	g, err := StartLibvirt(ctx, Options{Image: img, Dir: t.TempDir(), Disks: dataDisks})
	if err != nil {
		t.Fatalf("StartLibvirt: %v", err)
	}
	destroyed := false
	defer func() {
		if !destroyed {
			g.Destroy(context.Background())
		}
	}()
	boot, err := g.WaitAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("libvirt guest %s (%s): boot to agent %s", g.Name, g.Accel, boot.Round(time.Millisecond))
	checkBootTime(t, boot)
	if got := targets(g.Disks); !slices.Equal(got, []string{"vda", "vdb", "sda"}) {
		t.Errorf("disk targets %v, want [vda vdb sda]", got)
	}
	exercise(t, ctx, g)

	// The checkpoint metadata a backup leaves must not stop Destroy.
	if _, err := virsh(ctx, "checkpoint-create-as", g.Name, "--name", "cp1"); err != nil {
		t.Fatalf("creating a checkpoint: %v", err)
	}
	pid := g.PID
	if !processAlive(pid) {
		t.Errorf("QEMU pid %d of the running guest not found", pid)
	}
	if err := g.Destroy(ctx); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	destroyed = true
	out, err := virsh(ctx, "list", "--all", "--name")
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(strings.Fields(out), g.Name) {
		t.Errorf("domain %s still listed after Destroy: %s", g.Name, out)
	}
	if processAlive(pid) && pidIsQEMU(pid) {
		t.Errorf("QEMU (pid %d) still runs after Destroy", pid)
	}
	for _, d := range g.Disks {
		if _, err := os.Stat(d.Path); err == nil {
			t.Errorf("disk %s still exists after Destroy", d.Path)
		}
	}
}

func TestQEMUGuestRunsWorkload(t *testing.T) {
	needGuests(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	img := testImage(t, ctx)

	g, err := StartQEMU(ctx, Options{Image: img, Disks: dataDisks})
	if err != nil {
		t.Fatalf("StartQEMU: %v", err)
	}
	destroyed := false
	defer func() {
		if !destroyed {
			g.Destroy(context.Background())
		}
	}()
	boot, err := g.WaitAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("QEMU guest %s (%s): boot to agent %s", g.Name, g.Accel, boot.Round(time.Millisecond))
	checkBootTime(t, boot)
	for _, d := range g.Disks {
		if d.NodeName != d.Target {
			t.Errorf("disk %s has node name %q, want %q", d.Target, d.NodeName, d.Target)
		}
	}
	exercise(t, ctx, g)

	// QMP answers on its socket and knows the disks by node name.
	if err := qmpHasNodes(ctx, g.QMPSocket, "vda", "vdb", "sda"); err != nil {
		t.Error(err)
	}

	pid := g.PID
	if err := g.Destroy(ctx); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	destroyed = true
	if processAlive(pid) {
		t.Errorf("QEMU (pid %d) still runs after Destroy", pid)
	}
	for _, p := range []string{g.Dir, g.QMPSocket, g.AgentSocket} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s still exists after Destroy", p)
		}
	}
}

func TestProbeAccelDecidesOnce(t *testing.T) {
	needGuests(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	img := testImage(t, ctx)
	start := time.Now()
	a, err := ProbeAccel(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	first := time.Since(start)
	start = time.Now()
	b, err := ProbeAccel(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	if a != b {
		t.Errorf("ProbeAccel said %s, then %s", a, b)
	}
	if again := time.Since(start); again > time.Second {
		t.Errorf("second ProbeAccel took %s: the verdict was not cached", again)
	}
	t.Logf("accelerator %s (first call %s)", a, first.Round(time.Millisecond))
}

// checkBootTime fails a boot slower than maxBoot, unless the machine is busy
// with other work (more runnable tasks than CPUs): then the time says nothing
// about the guest, and is only logged.
func checkBootTime(t *testing.T, boot time.Duration) {
	t.Helper()
	if boot <= maxBoot {
		return
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		var load float64
		if _, err := fmt.Sscan(string(b), &load); err == nil && load > float64(runtime.NumCPU()) {
			t.Logf("boot to agent took %s, more than %s, but the load average is %.1f on %d CPUs", boot, maxBoot, load, runtime.NumCPU())
			return
		}
	}
	t.Errorf("boot to agent took %s, more than %s", boot, maxBoot)
}

func targets(disks []Disk) []string {
	var s []string
	for _, d := range disks {
		s = append(s, d.Target)
	}
	return s
}

// qmpHasNodes checks over QMP that the guest has block nodes of these names.
func qmpHasNodes(ctx context.Context, socket string, names ...string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return fmt.Errorf("connecting to QMP: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	rd := bufio.NewReader(c)
	// reply reads past greeting and events to the next return or error.
	reply := func() (json.RawMessage, error) {
		for {
			line, err := rd.ReadBytes('\n')
			if err != nil {
				return nil, err
			}
			var m struct {
				Return json.RawMessage `json:"return"`
				Error  json.RawMessage `json:"error"`
			}
			if err := json.Unmarshal(line, &m); err != nil {
				return nil, err
			}
			if m.Error != nil {
				return nil, fmt.Errorf("QMP error %s", m.Error)
			}
			if m.Return != nil {
				return m.Return, nil
			}
		}
	}
	fmt.Fprintf(c, "{\"execute\":\"qmp_capabilities\"}\n")
	if _, err := reply(); err != nil {
		return fmt.Errorf("QMP capabilities: %w", err)
	}
	fmt.Fprintf(c, "{\"execute\":\"query-named-block-nodes\",\"arguments\":{\"flat\":true}}\n")
	ret, err := reply()
	if err != nil {
		return fmt.Errorf("query-named-block-nodes: %w", err)
	}
	var nodes []struct {
		NodeName string `json:"node-name"`
	}
	if err := json.Unmarshal(ret, &nodes); err != nil {
		return err
	}
	have := map[string]bool{}
	for _, n := range nodes {
		have[n.NodeName] = true
	}
	for _, n := range names {
		if !have[n] {
			return fmt.Errorf("QMP lists no block node %q (has %v)", n, have)
		}
	}
	return nil
}
