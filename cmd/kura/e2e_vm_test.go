package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// needVM skips a test that boots guests where that cannot work: with
// -short, without root (libvirt, loop devices), or without tools.
func needVM(t *testing.T, tools ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots VMs")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for libvirt")
	}
	for _, b := range append([]string{"qemu-system-x86_64", "qemu-img", "libvirtd", "virsh"}, tools...) {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s not installed", b)
		}
	}
}

// dataGuest boots a libvirt test guest with an ext4 data disk at /data,
// waits for its agent and writes n files of known data (seed) there. The
// guest is destroyed when the test ends.
func dataGuest(ctx context.Context, t *testing.T, dir string, n, seed int) *testvm.Guest {
	t.Helper()
	g, err := testvm.StartLibvirt(ctx, testvm.Options{Dir: dir, Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data", SizeMiB: 256}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Destroy(context.Background()) })
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	mustExec(ctx, t, g, "/usr/local/bin/kura-workload", "write", "/data", strconv.Itoa(n), strconv.Itoa(seed))
	return g
}

// A real libvirt guest (TCG) backed up live through the CLI, with each
// capture method: an app-consistent full backup, an incremental one that
// reads only what the guest changed, and a restore of the data disk that
// fscks clean.
func TestLiveVMBackup(t *testing.T) {
	needVM(t, "fsck.ext4", "debugfs")
	for _, method := range []string{"fleece", "overlay"} {
		t.Run(method, func(t *testing.T) { liveVMBackup(t, method) })
	}
}

func liveVMBackup(t *testing.T, method string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := testvm.EnsureLibvirtd(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	g := dataGuest(ctx, t, dir, 20, 1)
	disks := func() string {
		out, err := exec.Command("virsh", "-c", "qemu:///system", "domblklist", g.Name).CombinedOutput()
		if err != nil {
			t.Fatalf("virsh domblklist: %v\n%s", err, out)
		}
		return string(out)
	}
	before := disks()

	e := newEnv(t)
	e.ok("init")
	out := e.ok("backup", "vm", "--capture", method, g.Name)
	if !strings.Contains(out, "mode app") || !strings.Contains(out, "guest frozen") {
		t.Fatalf("first backup is not app-consistent:\n%s", out)
	}
	// The guest keeps running and writes more; the next backup reads only that.
	if out, code, err := g.Exec(ctx, "/usr/local/bin/kura-workload", "write", "/data/more", "8", "2"); err != nil || code != 0 {
		t.Fatalf("workload: %v %d %s", err, code, out)
	}
	e.ok("backup", "vm", "--capture", method, g.Name)
	if after := disks(); after != before {
		t.Fatalf("the guest's disks after the backups:\n%s\nwant, as before them:\n%s", after, before)
	}
	var ss []struct {
		ID     string `json:"id"`
		Kind   string `json:"kind"`
		Mode   string `json:"mode"`
		Config struct {
			Type string `json:"type"`
			Data string `json:"data"`
		} `json:"config"`
		Disks []struct {
			Name string `json:"name"`
			Size int64  `json:"size"`
			Read string `json:"read"`
		} `json:"disks"`
		Stats struct {
			BytesRead    int64   `json:"bytes_read"`
			FreezeMillis float64 `json:"freeze_ms"`
			FreezeCall   float64 `json:"freeze_call_ms"`
			Instant      float64 `json:"instant_ms"`
			ThawCall     float64 `json:"thaw_call_ms"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(e.ok("snapshots", "--json", "--name", g.Name)), &ss); err != nil {
		t.Fatal(err)
	}
	if len(ss) != 2 {
		t.Fatalf("%d snapshots", len(ss))
	}
	full, inc := ss[0], ss[1]
	if full.Kind != "full" || inc.Kind != "incremental" || inc.Mode != "app" || inc.Stats.FreezeMillis <= 0 {
		t.Fatalf("kinds %q/%q, mode %q, freeze %v", full.Kind, inc.Kind, inc.Mode, inc.Stats.FreezeMillis)
	}
	if st := inc.Stats; st.FreezeCall <= 0 || st.Instant <= 0 || st.ThawCall <= 0 || st.FreezeCall+st.Instant+st.ThawCall > st.FreezeMillis+1 {
		t.Errorf("freeze window %.1f ms split into freeze call %.1f, instant %.1f, thaw call %.1f", st.FreezeMillis, st.FreezeCall, st.Instant, st.ThawCall)
	}
	if full.Config.Type != "libvirt-xml" || !strings.Contains(full.Config.Data, g.Name) {
		t.Fatalf("domain XML not saved: %q", full.Config.Type)
	}
	for _, d := range inc.Disks {
		if d.Read != "changed" {
			t.Errorf("disk %s read %q in the incremental backup", d.Name, d.Read)
		}
	}
	if inc.Stats.BytesRead*4 > full.Stats.BytesRead {
		t.Errorf("incremental read %d bytes, full %d: not reading only changes", inc.Stats.BytesRead, full.Stats.BytesRead)
	}
	// Restore the data disk of the incremental restore point: a clean
	// filesystem holding what the guest wrote.
	restored := filepath.Join(dir, "vdb.raw")
	e.ok("restore", g.Name+"@latest", "--disk", "vdb", "--to", restored)
	if out, err := exec.Command("fsck.ext4", "-fn", restored).CombinedOutput(); err != nil {
		t.Fatalf("restored data disk does not fsck clean: %v\n%s", err, out)
	}
	ls, err := exec.Command("debugfs", "-R", "ls /more", restored).CombinedOutput()
	if err != nil || !strings.Contains(string(ls), "MANIFEST") {
		t.Fatalf("restored disk lacks the files written before the incremental backup: %v\n%s", err, ls)
	}
	e.ok("verify", "--read-data")
}

// Bad input to `kura backup vm`/`qmp`: one-line errors, nothing written.
func TestVMBackupBadInput(t *testing.T) {
	e := newEnv(t)
	e.ok("init")
	e.fails("--all", "backup", "vm")
	e.fails("--mode", "backup", "vm", "web01", "--mode", "bogus")
	e.fails("--capture", "backup", "vm", "web01", "--capture", "snapshot")
	e.fails("--freeze-timeout", "backup", "vm", "web01", "--freeze-timeout", "soon")
	e.fails("--socket", "backup", "qmp", "--name", "vm7")
	e.fails("no-such.qmp", "backup", "qmp", "--socket", filepath.Join(e.dir, "no-such.qmp"), "--name", "vm7")
	if os.Geteuid() == 0 && !testing.Short() {
		if _, err := exec.LookPath("libvirtd"); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := testvm.EnsureLibvirtd(ctx); err != nil {
				t.Fatal(err)
			}
			e.fails("kura-no-such-vm", "backup", "vm", "kura-no-such-vm")
		}
	}
	if ss := e.snapshots(); len(ss) != 0 {
		t.Fatalf("failed backups wrote %d snapshots", len(ss))
	}
}
