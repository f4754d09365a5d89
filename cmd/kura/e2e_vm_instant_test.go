package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// Instant recovery: `kura instant` boots a copy of a backed-up VM straight
// from the repository, the guest reads its backed-up data and writes new
// data; `--migrate` moves it onto local disks while it runs, after which
// the repository can disappear and the VM keeps working; `--stop`
// discards an instant VM and everything it wrote.
func TestInstantRecovery(t *testing.T) {
	needVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g := dataGuest(ctx, t, dir, 12, 7)
	e := newEnv(t)
	e.ok("init")
	e.ok("backup", "vm", g.Name)

	// Refused before anything starts: the original's name is taken, and
	// an image backup holds no VM.
	e.fails("exists", "instant", g.Name+"@latest", "--dir", dir)
	img := filepath.Join(dir, "plain.raw")
	os.WriteFile(img, []byte(strings.Repeat("kura", 1<<16)), 0o600)
	e.ok("backup", "image", img, "--name", "plain")
	e.fails("is not of a VM", "instant", "plain@latest", "--dir", dir)
	e.fails("no instant recovery of nosuch is running", "instant", "--migrate", "nosuch", "--to", dir)

	irName := g.Name + "-ir"
	overlays := filepath.Join(dir, "overlays")
	out := e.ok("instant", g.Name+"@latest", "--as", irName, "--dir", overlays)
	if !strings.Contains(out, "VM "+irName+" runs from restore point") || !strings.Contains(out, "guest agent answered") {
		t.Fatalf("kura instant output:\n%s", out)
	}
	ir, err := testvm.AttachLibvirt(ctx, irName, "/data")
	if err != nil {
		t.Fatal(err)
	}
	defer ir.Destroy(context.Background())
	if list := e.ok("instant", "--list"); !strings.Contains(list, irName) || !strings.Contains(list, "server running") {
		t.Fatalf("instant --list:\n%s", list)
	}
	// The guest reads what was backed up and writes while it runs from
	// the repository.
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "verify", "/data")
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "write", "/data/new", "6", "9")

	// Migrate to local disks while the guest runs.
	local := filepath.Join(dir, "local")
	out = e.ok("instant", "--migrate", irName, "--to", local)
	if !strings.Contains(out, "no longer depends on kura") {
		t.Fatalf("instant --migrate output:\n%s", out)
	}
	for _, dev := range []string{"vda", "vdb"} {
		p := filepath.Join(local, irName+"-"+dev+".qcow2")
		info, err := exec.Command("qemu-img", "info", "-U", p).CombinedOutput()
		if err != nil || strings.Contains(string(info), "backing file") {
			t.Fatalf("local disk %s: %v\n%s", p, err, info)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(overlays, irName, "*.qcow2")); len(left) != 0 {
		t.Errorf("overlays left after the migration: %v", left)
	}
	if _, err := os.Stat(sessionDir(irName)); !os.IsNotExist(err) {
		t.Errorf("session left after the migration: %v", err)
	}
	if x, _ := exec.Command("virsh", "dominfo", irName).Output(); !strings.Contains(string(x), "Persistent:     yes") {
		t.Errorf("the migrated VM is not a defined domain:\n%s", x)
	}
	// The repository goes away: the VM reads all of its disks and keeps
	// what it wrote before and after the move.
	runsWithoutRepo(ctx, t, e, ir)

	// --stop discards an instant VM with what it wrote.
	second := g.Name + "-ir2"
	e.ok("instant", g.Name+"@latest", "--as", second, "--dir", overlays, "--no-wait")
	out = e.ok("instant", "--stop", second)
	if !strings.Contains(out, "stopped instant VM "+second) {
		t.Fatalf("instant --stop output:\n%s", out)
	}
	if x, err := exec.Command("virsh", "domstate", second).CombinedOutput(); err == nil {
		t.Errorf("domain %s still exists after --stop: %s", second, x)
	}
	if _, err := os.Stat(filepath.Join(overlays, second)); !os.IsNotExist(err) {
		t.Errorf("overlays of %s left after --stop: %v", second, err)
	}
	e.fails("no instant recovery of "+second, "instant", "--stop", second)
}

// runsWithoutRepo moves the repository away while guest ir, migrated to
// local disks, reads all of them, checks what it wrote before and after
// the move and writes more; then puts the repository back.
func runsWithoutRepo(ctx context.Context, t *testing.T, e *env, ir *testvm.Guest) {
	t.Helper()
	if err := os.Rename(e.repo, e.repo+".gone"); err != nil {
		t.Fatal(err)
	}
	defer os.Rename(e.repo+".gone", e.repo)
	mustExec(ctx, t, ir, "/bin/sh", "-c", "echo 3 > /proc/sys/vm/drop_caches && cat /dev/vda /dev/vdb > /dev/null")
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "verify", "/data")
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "verify", "/data/new")
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "write", "/data/after", "2", "3")
}

func mustExec(ctx context.Context, t *testing.T, g *testvm.Guest, args ...string) string {
	t.Helper()
	out, code, err := g.Exec(ctx, args[0], args[1:]...)
	if err != nil || code != 0 {
		t.Fatalf("%s in guest %s: %v, exit %d\n%s", strings.Join(args, " "), g.Name, err, code, out)
	}
	return out
}

// Instant recovery of a plain QEMU VM, without libvirt: kura starts QEMU
// from the command line saved with the backup, every disk an overlay over
// the repository's export, beside the original, which keeps running
// untouched. --migrate moves it onto local files (drive-mirror, then a
// switch) while it runs, after which the repository can disappear;
// --stop ends a second copy and leaves nothing behind.
func TestInstantQEMU(t *testing.T) {
	needVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g, err := testvm.StartQEMU(ctx, testvm.Options{Dir: dir, Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data", SizeMiB: 256}}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Destroy(context.Background())
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	mustExec(ctx, t, g, "/usr/local/bin/kura-workload", "write", "/data", "10", "5")
	mustExec(ctx, t, g, "/bin/sync")
	e := newEnv(t)
	e.ok("init")
	// testvm holds the original's agent socket (QEMU serves one client):
	// crash mode, after the guest synced.
	e.ok("backup", "qmp", "--socket", g.QMPSocket, "--name", "qvm", "--mode", "crash")

	overlays := filepath.Join(dir, "ir")
	out := e.ok("instant", "qvm@latest", "--as", "qvm-ir", "--dir", overlays)
	if !strings.Contains(out, "VM qvm-ir runs from restore point") || !strings.Contains(out, "guest agent answered") {
		t.Fatalf("kura instant output:\n%s", out)
	}
	s, err := loadSession("qvm-ir")
	if err != nil {
		t.Fatal(err)
	}
	ir := testvm.AttachQEMU("qvm-ir", s.QEMUPID, s.AgentSocket, "", "/data")
	defer ir.Destroy(context.Background())
	// The copy shares no file with the original: not its disks, sockets
	// or console log.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", s.QEMUPID))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{g.QMPSocket, g.AgentSocket, g.ConsoleLog, g.Disks[0].Path, g.Disks[1].Path} {
		if strings.Contains(string(cmdline), p) {
			t.Errorf("the copy's command line names the original's %s:\n%s", p, strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "verify", "/data")
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "write", "/data/new", "4", "9")
	// The original ran on beside it.
	mustExec(ctx, t, g, "/usr/local/bin/kura-workload", "verify", "/data")
	g.Destroy(ctx)

	local := filepath.Join(dir, "local")
	out = e.ok("instant", "--migrate", "qvm-ir", "--to", local)
	if !strings.Contains(out, "no longer depends on kura") || !strings.Contains(out, "start.sh") {
		t.Fatalf("instant --migrate output:\n%s", out)
	}
	for _, dev := range []string{"vda", "vdb"} {
		p := filepath.Join(local, "qvm-ir-"+dev+".qcow2")
		info, err := exec.Command("qemu-img", "info", "-U", p).CombinedOutput()
		if err != nil || strings.Contains(string(info), "backing file") {
			t.Fatalf("local disk %s: %v\n%s", p, err, info)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(overlays, "qvm-ir", "*.qcow2")); len(left) != 0 {
		t.Errorf("overlays left after the migration: %v", left)
	}
	if _, err := os.Stat(sessionDir("qvm-ir")); !os.IsNotExist(err) {
		t.Errorf("session left after the migration: %v", err)
	}
	script, err := os.ReadFile(filepath.Join(overlays, "qvm-ir", "start.sh"))
	if err != nil || !strings.Contains(string(script), filepath.Join(local, "qvm-ir-vdb.qcow2")) || strings.Contains(string(script), "nbd") {
		t.Errorf("start.sh (%v):\n%s", err, script)
	}
	// The repository goes away: the VM reads all of its disks and keeps
	// what it wrote before and after the move.
	runsWithoutRepo(ctx, t, e, ir)
	ir.Destroy(ctx)

	// --stop ends a second copy and removes what it wrote.
	e.ok("instant", "qvm@latest", "--as", "qvm-ir2", "--dir", overlays, "--no-wait")
	s2, err := loadSession("qvm-ir2")
	if err != nil {
		t.Fatal(err)
	}
	if out := e.ok("instant", "--stop", "qvm-ir2"); !strings.Contains(out, "stopped instant VM qvm-ir2") {
		t.Fatalf("instant --stop output:\n%s", out)
	}
	if processAlive(s2.QEMUPID) {
		t.Errorf("QEMU of qvm-ir2 (pid %d) runs after --stop", s2.QEMUPID)
		syscall.Kill(s2.QEMUPID, syscall.SIGKILL)
	}
	if _, err := os.Stat(filepath.Join(overlays, "qvm-ir2")); !os.IsNotExist(err) {
		t.Errorf("files of qvm-ir2 left after --stop: %v", err)
	}
	if processAlive(s2.ServerPID) {
		t.Errorf("the export of qvm-ir2 (pid %d) runs after --stop", s2.ServerPID)
	}
}
