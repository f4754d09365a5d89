package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// A whole VM comes back: `kura restore --define --as --start` writes every
// disk, defines a copy of the domain beside the original (new name, UUID
// and MAC addresses, disks pointing at the restored files) and starts it;
// the copy boots and holds what the original had at the backup. A taken
// name or an image backup is refused before any disk is written.
func TestRestoreDefine(t *testing.T) {
	needVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g := dataGuest(ctx, t, dir, 12, 7)

	e := newEnv(t)
	e.ok("init")
	e.ok("backup", "vm", g.Name)
	// Written after the backup: the restored VM must not have it.
	if out, code, err := g.Exec(ctx, "/bin/sh", "-c", "echo later > /data/after-backup && sync"); err != nil || code != 0 {
		t.Fatalf("write after backup: %v %d %s", err, code, out)
	}

	images := filepath.Join(dir, "restored")
	copyName := g.Name + "-r"
	// The original's name is taken: refused before anything is written.
	e.fails("exists", "restore", g.Name+"@latest", "--define", "--to", images)
	// --overwrite never replaces a running domain.
	e.fails("is running", "restore", g.Name+"@latest", "--define", "--overwrite", "--to", images)
	if ents, _ := os.ReadDir(images); len(ents) != 0 {
		t.Fatalf("a refused restore wrote %d files into %s", len(ents), images)
	}
	e.fails("--define restores every disk", "restore", g.Name+"@latest", "--define", "--disk", "vdb", "--as", copyName)
	e.fails("--as and --start go with --define", "restore", g.Name+"@latest", "--to", images, "--as", copyName)

	out := e.ok("restore", g.Name+"@latest", "--define", "--as", copyName, "--to", images, "--format", "qcow2", "--start")
	r, err := testvm.AttachLibvirt(ctx, copyName, "/data")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Destroy(context.Background())
	if !strings.Contains(out, "defined VM "+copyName) || !strings.Contains(out, "started VM "+copyName) {
		t.Fatalf("restore --define output:\n%s", out)
	}
	for _, dev := range []string{"vda", "vdb"} {
		if _, err := os.Stat(filepath.Join(images, copyName+"-"+dev+".qcow2")); err != nil {
			t.Errorf("restored disk %s: %v", dev, err)
		}
	}
	x, err := exec.Command("virsh", "dumpxml", copyName).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh dumpxml %s: %v\n%s", copyName, err, x)
	}
	orig, _ := exec.Command("virsh", "domuuid", g.Name).Output()
	if strings.Contains(string(x), strings.TrimSpace(string(orig))) || strings.Contains(string(x), g.Disks[1].Path) || !strings.Contains(string(x), images) {
		t.Fatalf("the restored domain shares the original's UUID or disks:\n%s", x)
	}
	// The copy boots from the restored disks and holds the data of the backup.
	if _, err := r.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	if out, code, err := r.Exec(ctx, "/usr/local/bin/kura-workload", "verify", "/data"); err != nil || code != 0 || !strings.Contains(out, "OK 12 files") {
		t.Fatalf("restored VM's /data: %v %d %q", err, code, out)
	}
	if _, code, _ := r.Exec(ctx, "/usr/bin/test", "-e", "/data/after-backup"); code == 0 {
		t.Fatal("the restored VM has a file written after the backup")
	}

	// An image backup holds no VM to define.
	img := filepath.Join(dir, "plain.raw")
	if err := os.WriteFile(img, []byte(strings.Repeat("kura", 1<<16)), 0o600); err != nil {
		t.Fatal(err)
	}
	e.ok("backup", "image", img, "--name", "plain")
	e.fails("holds disk images, not a VM", "restore", "plain@latest", "--define", "--to", images)
}
