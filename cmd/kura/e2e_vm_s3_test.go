package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/testvm"
)

// TestVMFromS3: a live libvirt guest backed up into a repository on a
// real S3 server (versitygw), and every way of getting it back straight
// from there: file-level restore, an NBD export read by qemu-img, a
// restore of the data disk that fscks clean and holds the guest's data,
// and instant recovery, whose guest reads its backed-up data and writes.
// The kura processes that instant recovery starts get the S3 credentials
// from kura, never on their command lines.
func TestVMFromS3(t *testing.T) {
	needVM(t, "e2fsck")
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	srv := s3servers.Get(t, s3test.VersityGW)
	dir := t.TempDir()
	g := dataGuest(ctx, t, dir, 10, 17)
	mustExec(ctx, t, g, "/bin/sync")
	e := newEnv(t)
	e.repo = srv.Location(srv.Bucket, "vm/"+crypt.RandomID().Short())
	e.vars = srv.Env()
	e.ok("init")
	e.ok("backup", "vm", g.Name)
	snap := g.Name + "@latest"

	// Files.
	if etc := e.ok("files", "ls", snap, "/etc"); !strings.Contains(etc, " hostname\n") {
		t.Fatalf("files ls /etc from S3:\n%s", etc)
	}
	out := filepath.Join(dir, "files")
	e.ok("files", "get", snap, "--disk", "vdb", "/", "--to", out)
	verifyManifest(t, out)

	// An export, read by qemu-img.
	uri, _, stop := e.startExport(snap, "--socket", filepath.Join(dir, "nbd.sock"), "--disk", "vdb")
	info, err := exec.CommandContext(ctx, "qemu-img", "info", uri).CombinedOutput()
	if err != nil || !strings.Contains(string(info), "256 MiB") {
		t.Errorf("qemu-img info of the export from S3: %v\n%s", err, info)
	}
	if code := stop(); code != 0 {
		t.Errorf("export exited %d", code)
	}

	// A restore of the data disk.
	to := filepath.Join(dir, "restored")
	e.ok("restore", snap, "--disk", "vdb", "--to", to)
	disks, _ := filepath.Glob(filepath.Join(to, "*vdb*"))
	if len(disks) != 1 {
		t.Fatalf("restored disks: %v", disks)
	}
	if o, err := exec.CommandContext(ctx, "e2fsck", "-fn", disks[0]).CombinedOutput(); err != nil {
		t.Errorf("e2fsck of the data disk restored from S3: %v\n%s", err, o)
	}

	// Instant recovery from S3.
	irName := g.Name + "-s3"
	start := time.Now()
	o := e.ok("instant", snap, "--as", irName, "--dir", filepath.Join(dir, "overlays"))
	t.Logf("instant recovery from S3: guest agent answered %s after the command started", time.Since(start).Round(100*time.Millisecond))
	if !strings.Contains(o, "runs from restore point") || !strings.Contains(o, "guest agent answered") {
		t.Fatalf("kura instant from S3:\n%s", o)
	}
	ir, err := testvm.AttachLibvirt(ctx, irName, "/data")
	if err != nil {
		t.Fatal(err)
	}
	defer ir.Destroy(context.Background())
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "verify", "/data")
	mustExec(ctx, t, ir, "/usr/local/bin/kura-workload", "write", "/data/new", "3", "5")
	s, err := loadSession(irName)
	if err != nil {
		t.Fatal(err)
	}
	if s.ServerPID <= 0 {
		t.Errorf("session without the export's pid: %+v", s)
	} else if cmdline, err := os.ReadFile("/proc/" + itoa(s.ServerPID) + "/cmdline"); err != nil || strings.Contains(string(cmdline), srv.SecretKey) || !strings.Contains(string(cmdline), "s3:") {
		t.Errorf("the export serving instant recovery from S3: %v %q", err, cmdline)
	}
	if o := e.ok("instant", "--stop", irName); !strings.Contains(o, "stopped instant VM "+irName) {
		t.Errorf("instant --stop: %s", o)
	}
}
