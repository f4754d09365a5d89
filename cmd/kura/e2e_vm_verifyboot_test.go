package main

import (
	"bytes"
	"context"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// `kura verify --boot` boots a restore point isolated, runs a check in the
// guest, saves a PNG of the console, tears everything down and records
// pass or fail in the repository; the source VM is not touched. Restore
// points of every consistency mode boot and hold the guest's data.
func TestVerifyBoot(t *testing.T) {
	needVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g := dataGuest(ctx, t, dir, 4, 5)
	e := newEnv(t)
	e.ok("init")
	// A restore point of every consistency mode boots and holds the data
	// (app last, so that it is g.Name@latest below).
	for _, mode := range []string{"crash", "suspend", "shutdown", "app"} {
		if mode == "shutdown" {
			// The test guest has no D-Bus, so qemu-ga's guest-shutdown
			// (shutdown -P +0) cannot reach systemd: power off directly.
			mustExec(ctx, t, g, "/bin/sh", "-c", `rm -f /sbin/shutdown && printf '#!/bin/sh\nexec /bin/systemctl poweroff\n' >/sbin/shutdown && chmod 755 /sbin/shutdown`)
		}
		e.ok("backup", "vm", g.Name, "--mode", mode)
		if mode == "shutdown" {
			if _, err := g.WaitAgent(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if mode == "app" {
			break // booted below, with a screenshot
		}
		out := e.ok("verify", "--boot", g.Name+"@latest", "--check", "/usr/local/bin/kura-workload waitmount /data && /usr/local/bin/kura-workload verify /data",
			"--screenshot", filepath.Join(dir, mode+".png"))
		if !strings.Contains(out, "PASS") {
			t.Fatalf("%s-mode restore point: verify --boot:\n%s", mode, out)
		}
	}
	before, _ := exec.Command("virsh", "dumpxml", g.Name).Output()

	shot := filepath.Join(os.Getenv("KURA_TEST_KEEP"), "console.png")
	if os.Getenv("KURA_TEST_KEEP") == "" {
		shot = filepath.Join(dir, "console.png")
	}
	out := e.ok("verify", "--boot", g.Name+"@latest", "--check", "/usr/local/bin/kura-workload waitmount /data && /usr/local/bin/kura-workload verify /data", "--screenshot", shot)
	if !strings.Contains(out, "PASS") || !strings.Contains(out, "guest agent answered") {
		t.Fatalf("verify --boot output:\n%s", out)
	}
	data, err := os.ReadFile(shot)
	if err != nil {
		t.Fatalf("%v; verify --boot said:\n%s", err, out)
	}
	img, err := png.Decode(bytes.NewReader(data))
	if err != nil || img.Bounds().Dx() < 100 || img.Bounds().Dy() < 100 {
		t.Fatalf("screenshot is not a real PNG of the console: %v", err)
	}

	// A failing check fails the verification (exit 3) and is recorded.
	r := e.run("verify", "--boot", g.Name+"@latest", "--check", "exit 7", "--screenshot", filepath.Join(dir, "fail.png"))
	if r.code != 3 || !strings.Contains(r.stderr, "exited with status 7") {
		t.Fatalf("failing check: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	list := e.ok("snapshots", "--name", g.Name)
	if !strings.Contains(list, "FAIL ") {
		t.Fatalf("snapshots does not show the last boot check:\n%s", list)
	}

	// Nothing is left behind and the source VM runs as before.
	if x, _ := exec.Command("virsh", "list", "--all", "--name").Output(); strings.Contains(string(x), "kura-verify-") {
		t.Errorf("verification domains left:\n%s", x)
	}
	if left, _ := filepath.Glob("/var/tmp/kura-verify-*"); len(left) > 0 {
		t.Errorf("verification files left: %v", left)
	}
	after, _ := exec.Command("virsh", "dumpxml", g.Name).Output()
	if !bytes.Equal(before, after) {
		t.Errorf("the source VM's definition changed during verification")
	}
	mustExec(ctx, t, g, "/usr/local/bin/kura-workload", "verify", "/data")
	e.fails("no snapshot named", "verify", "--boot", "nosuch@latest")
	os.WriteFile(filepath.Join(dir, "plain.raw"), make([]byte, 1<<20), 0o600)
	e.ok("backup", "image", filepath.Join(dir, "plain.raw"), "--name", "plain")
	e.fails("not of a libvirt VM", "verify", "--boot", "plain@latest")
}
