package main

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// `kura mount` shows a restore point's filesystem read-only through FUSE
// and unmounts cleanly on Ctrl-C.
func TestMount(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 not installed (apt-get install e2fsprogs)")
	}
	e := newEnv(t)
	src := filepath.Join(e.dir, "src")
	os.MkdirAll(filepath.Join(src, "etc"), 0o755)
	os.WriteFile(filepath.Join(src, "etc", "hostname"), []byte("web01\n"), 0o644)
	os.Symlink("hostname", filepath.Join(src, "etc", "name"))
	img := filepath.Join(e.dir, "disk.img")
	if out, err := exec.Command("mkfs.ext4", "-q", "-d", src, img, "32M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	e.ok("init")
	e.ok("backup", "image", img, "--name", "web01")

	mnt := filepath.Join(e.dir, "mnt")
	os.Mkdir(mnt, 0o755)
	c := e.cmd("mount", "web01@latest", mnt)
	stdout, _ := c.StdoutPipe()
	var stderr syncBuffer
	c.Stderr = &stderr
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		c.Process.Kill()
		exec.Command("umount", "-l", mnt).Run()
	}()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || !strings.Contains(lines.Text(), "read-only at "+mnt) {
		t.Fatalf("kura mount: %q %s", lines.Text(), stderr.String())
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "etc", "hostname")); err != nil || string(got) != "web01\n" {
		t.Fatalf("reading through the mount: %q %v", got, err)
	}
	if target, err := os.Readlink(filepath.Join(mnt, "etc", "name")); err != nil || target != "hostname" {
		t.Errorf("symlink through the mount: %q %v", target, err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "etc", "new"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing into the mount: %v, want EROFS", err)
	}
	c.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("kura mount after Ctrl-C: %v %s", err, stderr.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("kura mount did not end within 15 s of Ctrl-C")
	}
	if info, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(info), " "+mnt+" ") {
		t.Fatalf("%s still mounted after Ctrl-C", mnt)
	}
}
