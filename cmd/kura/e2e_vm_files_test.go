package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// File-level restore from a backed-up VM: the root ext4, an ext4 and an
// xfs data disk the guest wrote to, and a GPT disk with vfat and NTFS
// (what a Windows guest has). `kura files` lists directories and restores
// files with modes, owners, times, symlinks and hard links, reading the
// repository with kura's own parsers.
func TestFilesFromVM(t *testing.T) {
	needVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	src := filepath.Join(dir, "winsrc")
	os.MkdirAll(filepath.Join(src, "Users", "kura"), 0o755)
	os.WriteFile(filepath.Join(src, "Users", "kura", "report.txt"), []byte("quarterly numbers\n"), 0o644)
	os.WriteFile(filepath.Join(src, "boot.ini"), []byte(strings.Repeat("[boot loader]\n", 500)), 0o644)
	win := filepath.Join(dir, "win.raw")
	if err := testvm.BuildWindowsDisk(ctx, win, src); err != nil {
		t.Fatal(err)
	}
	g, err := testvm.StartLibvirt(ctx, testvm.Options{Dir: dir, Disks: []testvm.DiskSpec{
		{FS: "ext4", Mount: "/data", SizeMiB: 256},
		{FS: "xfs", Mount: "/data2", SizeMiB: 512},
		{Source: win, Format: "raw"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Destroy(context.Background())
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	mustExec(ctx, t, g, "/usr/local/bin/kura-workload", "waitmount", "/data", "/data2")
	mustExec(ctx, t, g, "/usr/local/bin/kura-workload", "write", "/data/app", "5", "1")
	mustExec(ctx, t, g, "/usr/local/bin/kura-workload", "write", "/data2/db", "5", "2")
	mustExec(ctx, t, g, "/bin/sh", "-c", `set -e
cd /data/app
echo secret > key.pem && chown 1234:2345 key.pem && chmod 0640 key.pem
ln -s w1-00001.bin latest && ln w1-00002.bin hardlink.bin
touch -d '2024-01-02 03:04:05' key.pem
sync`)
	e := newEnv(t)
	e.ok("init")
	e.ok("backup", "vm", g.Name)
	snap := g.Name + "@latest"

	vols := e.ok("files", "ls", snap)
	for _, want := range []string{"vda   disk", "vdb   disk    ext4", "vdc   disk    xfs", "vdd   p1      vfat", "vdd   p2      ntfs"} {
		if !strings.Contains(strings.Join(strings.Fields(vols), " "), strings.Join(strings.Fields(want), " ")) {
			t.Errorf("volumes listing lacks %q:\n%s", want, vols)
		}
	}
	start := time.Now()
	etc := e.ok("files", "ls", snap, "/etc")
	t.Logf("listing /etc of the restore point took %s from the command", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(etc, " hostname\n") || !strings.Contains(etc, " fstab\n") {
		t.Fatalf("files ls /etc:\n%s", etc)
	}
	app := e.ok("files", "ls", snap, "--disk", "vdb", "/app")
	if !strings.Contains(app, "latest -> w1-00001.bin") || !strings.Contains(app, "-rw-r----- 1 1234 2345") {
		t.Fatalf("files ls /app:\n%s", app)
	}

	out := filepath.Join(dir, "out")
	e.ok("files", "get", snap, "--disk", "vdb", "/app", "--to", out)
	verifyManifest(t, filepath.Join(out, "app"))
	key, err := os.Lstat(filepath.Join(out, "app", "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	st := key.Sys().(*syscall.Stat_t)
	if key.Mode().Perm() != 0o640 || st.Uid != 1234 || st.Gid != 2345 || key.ModTime().Year() != 2024 {
		t.Errorf("key.pem restored as %v uid %d gid %d mtime %v", key.Mode(), st.Uid, st.Gid, key.ModTime())
	}
	if target, err := os.Readlink(filepath.Join(out, "app", "latest")); err != nil || target != "w1-00001.bin" {
		t.Errorf("symlink: %q %v", target, err)
	}
	a, _ := os.Stat(filepath.Join(out, "app", "w1-00002.bin"))
	b, _ := os.Stat(filepath.Join(out, "app", "hardlink.bin"))
	if !os.SameFile(a, b) {
		t.Error("the hard link was restored as a copy")
	}

	e.ok("files", "get", snap, "--disk", "vdc", "/db", "--to", out)
	verifyManifest(t, filepath.Join(out, "db"))
	for vol, want := range map[string]string{"p1": "quarterly numbers\n", "p2": "quarterly numbers\n"} {
		to := filepath.Join(dir, "win-"+vol)
		e.ok("files", "get", snap, "--disk", "vdd", "--volume", vol, "/Users/kura/report.txt", "/boot.ini", "--to", to)
		if got, _ := os.ReadFile(filepath.Join(to, "Users", "kura", "report.txt")); string(got) != want {
			t.Errorf("%s report.txt: %q", vol, got)
		}
		if got, _ := os.ReadFile(filepath.Join(to, "boot.ini")); len(got) != 500*len("[boot loader]\n") {
			t.Errorf("%s boot.ini: %d bytes", vol, len(got))
		}
	}

	// Bad input: clear one-line errors.
	e.fails("several filesystems", "files", "ls", snap, "--disk", "vdd", "/")
	e.fails("no volume \"p9\"", "files", "ls", snap, "--disk", "vdd", "--volume", "p9", "/")
	e.fails("no such file or directory", "files", "ls", snap, "/nope")
	e.fails("--to", "files", "get", snap, "/etc/hostname")
}

// verifyManifest checks the files of a kura-workload directory against
// its MANIFEST.sha256.
func verifyManifest(t *testing.T, dir string) {
	t.Helper()
	c := exec.Command("sha256sum", "--quiet", "-c", "MANIFEST.sha256")
	c.Dir = dir
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("restored files in %s do not match their manifest: %v\n%s", dir, err, out)
	}
}
