// Command kura-demo shows Kura's main job end to end on a real virtual
// machine: it boots a small Debian guest under libvirt (building the guest
// image first if it is not cached), writes data in it, backs it up live
// and application-consistent, writes more, backs it up again
// incrementally, restores the latest restore point to disk images and
// checks them. Run it through `make demo`.
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("\n\033[1m== "+format+"\033[0m\n", args...)
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	kura, err := filepath.Abs("bin/kura")
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "kura-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	env := append(os.Environ(), "KURA_REPO="+filepath.Join(work, "repo"), "KURA_PASSWORD=demo-password")
	kuraRun := func(args ...string) error {
		fmt.Printf("$ kura %s\n", strings.Join(args, " "))
		c := exec.CommandContext(ctx, kura, args...)
		c.Env, c.Stdout, c.Stderr = env, os.Stdout, os.Stderr
		start := time.Now()
		err := c.Run()
		fmt.Printf("  (%s)\n", time.Since(start).Round(10*time.Millisecond))
		return err
	}

	step("preparing the test guest image (built once with debootstrap, then cached)")
	start := time.Now()
	img, err := testvm.EnsureImage(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("guest image ready in %s: %s\n", time.Since(start).Round(time.Second), img.RootQcow2)
	if err := testvm.EnsureLibvirtd(ctx); err != nil {
		return err
	}

	step("booting a VM under libvirt: root disk vda, ext4 data disk vdb mounted at /data")
	g, err := testvm.StartLibvirt(ctx, testvm.Options{Image: img, Name: "kura-demo", Dir: work,
		Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data", SizeMiB: 512}}})
	if err != nil {
		return err
	}
	defer func() {
		step("removing the demo VM")
		g.Destroy(context.Background())
	}()
	boot, err := g.WaitAgent(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("VM %s booted, guest agent answered after %s (accelerator: %s)\n", g.Name, boot.Round(100*time.Millisecond), g.Accel)
	workload := func(args ...string) error {
		out, code, err := g.Exec(ctx, "/usr/local/bin/kura-workload", args...)
		if err == nil && code != 0 {
			err = fmt.Errorf("kura-workload %v exited %d: %s", args, code, out)
		}
		if out = strings.TrimSpace(out); out != "" {
			fmt.Println("guest:", out)
		}
		return err
	}

	step("the guest writes 40 files of 1 MiB to /data and records their checksums")
	if err := workload("write", "/data/day1", "40", "1"); err != nil {
		return err
	}
	step("kura init")
	if err := kuraRun("init"); err != nil {
		return err
	}
	step("live backup, application-consistent (guest filesystems frozen only around the snapshot instant)")
	if err := kuraRun("backup", "vm", g.Name); err != nil {
		return err
	}
	step("the guest keeps running and writes 16 more files")
	if err := workload("write", "/data/day2", "16", "2"); err != nil {
		return err
	}
	step("second live backup: incremental, reads only the blocks the guest changed (dirty bitmaps)")
	if err := kuraRun("backup", "vm", g.Name); err != nil {
		return err
	}
	step("restore points")
	if err := kuraRun("snapshots", "--name", g.Name); err != nil {
		return err
	}
	step("restore the latest restore point: every disk, as qcow2")
	out := filepath.Join(work, "restored")
	if err := kuraRun("restore", g.Name+"@latest", "--to", out, "--format", "qcow2"); err != nil {
		return err
	}
	step("checking the restored data disk: filesystem clean, files present")
	raw := filepath.Join(work, "vdb.raw")
	if b, err := exec.CommandContext(ctx, "qemu-img", "convert", "-O", "raw", filepath.Join(out, "vdb.qcow2"), raw).CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img convert: %v: %s", err, b)
	}
	if b, err := exec.CommandContext(ctx, "fsck.ext4", "-fn", raw).CombinedOutput(); err != nil {
		return fmt.Errorf("restored filesystem is not clean: %v\n%s", err, b)
	}
	fmt.Println("fsck.ext4: clean")
	for _, d := range []string{"/day1", "/day2"} {
		b, err := exec.CommandContext(ctx, "debugfs", "-R", "ls "+d, raw).Output()
		if err != nil || !strings.Contains(string(b), "MANIFEST.sha256") {
			return fmt.Errorf("restored disk lacks %s", d)
		}
		fmt.Printf("%s: present with its checksum manifest\n", d)
	}
	step("kura verify --read-data")
	if err := kuraRun("verify", "--read-data"); err != nil {
		return err
	}
	step("kura stats")
	if err := kuraRun("stats"); err != nil {
		return err
	}
	fmt.Printf("\n\033[1mdemo finished: booted a VM, backed it up live twice (full, then incremental), restored and checked it\033[0m\n")
	return nil
}
