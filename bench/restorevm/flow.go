package main

import (
	"context"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/testvm"
)

func (b *bench) run(ctx context.Context) error {
	b.meta(ctx)
	if err := testvm.EnsureLibvirtd(ctx); err != nil {
		return err
	}
	logf("guest image (scripts/mkguest.sh; waits while another process builds it)")
	img, err := testvm.EnsureImage(ctx)
	if err != nil {
		return err
	}
	b.img = img
	b.res.Meta.GuestImage = img.Version
	if err := b.makeDataDisk(ctx); err != nil {
		return fmt.Errorf("making the data disk: %w", err)
	}
	if err := b.bootGuest(ctx); err != nil {
		return err
	}
	if err := b.backups(ctx); err != nil {
		return err
	}
	if err := b.restores(ctx); err != nil {
		return err
	}
	if err := b.boots(ctx); err != nil {
		return err
	}
	return b.listings(ctx)
}

// bootGuest starts the benchmark's guest with a copy of the data disk.
func (b *bench) bootGuest(ctx context.Context) error {
	dir := filepath.Join(b.work, "guest")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	vdb := filepath.Join(dir, "vdb.qcow2")
	logf("copying the data disk")
	if _, err := benchutil.Run(ctx, "cp", "--sparse=always", b.vdb, vdb); err != nil {
		return err
	}
	g, err := testvm.StartLibvirt(ctx, testvm.Options{
		Name: b.guestName, Dir: dir, MemoryMiB: b.cfg.MemoryMiB, CPUs: b.cfg.CPUs,
		Disks: []testvm.DiskSpec{{Source: vdb, Format: "qcow2", FS: "ext4", Mount: "/data"}},
	})
	if err != nil {
		return err
	}
	b.guest = g
	boot, err := g.WaitAgent(ctx)
	if err != nil {
		return err
	}
	b.res.Meta.Accel = g.Accel
	b.res.GuestBootS = boot.Seconds()
	logf("guest %s (%s) answered after %.1f s", g.Name, g.Accel, boot.Seconds())
	wctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	st, _ := g.ExecFull(wctx, nil, "/bin/sh", "-c", "systemctl is-system-running --wait || true")
	cancel()
	logf("guest system state: %s", strings.TrimSpace(st.Stdout))
	lay := &b.res.Layout
	for _, d := range g.Disks {
		a, err := allocated(ctx, d.Path)
		if err != nil {
			return err
		}
		vs, err := benchutil.VirtualSize(ctx, d.Path)
		if err != nil {
			return err
		}
		switch d.Target {
		case "vda":
			lay.RootAllocated, lay.RootVirtual = a, vs
		case "vdb":
			lay.DataAllocated, lay.DataVirtual = a, vs
		}
		b.disks = append(b.disks, diskRef{Target: d.Target, Image: d.Path, Virtual: vs})
	}
	lay.Total = lay.RootAllocated + lay.DataAllocated
	logf("layout: vda %d MiB virtual, %.1f MB allocated; vdb %d GiB virtual, %.1f MB allocated (%d files, %.1f MB, in %d directories)",
		lay.RootVirtual/MiB, float64(lay.RootAllocated)/1e6, lay.DataVirtual/GiB, float64(lay.DataAllocated)/1e6, lay.Files, float64(lay.FileBytes)/1e6, lay.Dirs)
	return nil
}

// backups backs the guest up live with kura and virtnbdbackup, shuts it
// down, converts its disks to raw files and backs those up with restic.
func (b *bench) backups(ctx context.Context) error {
	// virtnbdbackup first: it refuses to start a chain while the domain has
	// checkpoints it did not make ("Foreign checkpoint found"), such as
	// kura's; kura does not mind virtnbdbackup's.
	if b.cfg.has("vnb") {
		out := filepath.Join(b.work, "vnb")
		m, o, err := b.measure(ctx, "backup-virtnbdbackup", false, nil, nil,
			"virtnbdbackup", "-d", b.guestName, "-l", "full", "-o", out, "-n")
		if err != nil {
			return err
		}
		if !strings.Contains(o, "Finished successfully") {
			return fmt.Errorf("virtnbdbackup did not say \"Finished successfully\"; see %s", m.Log)
		}
		bk := Backup{Tool: "vnb", Meas: m, What: "live, app-consistent (`virtnbdbackup -l full`, uncompressed)"}
		bk.Stored, _ = benchutil.DirBytes(out)
		b.res.Backups = append(b.res.Backups, bk)
	}

	if _, err := b.kura(ctx, "init"); err != nil {
		return err
	}
	env, unset := b.kuraEnv()
	m, _, err := b.measure(ctx, "backup-kura", false, env, unset, b.cfg.Kura, "-q", "backup", "vm", b.guestName, "--connect", "qemu:///system")
	if err != nil {
		return err
	}
	bk := Backup{Tool: "kura", Meas: m, What: "live, app-consistent (`kura backup vm`)"}
	bk.Stored, _ = benchutil.DirBytes(filepath.Join(b.work, "kura-repo"))
	if out, err := b.kura(ctx, "snapshots", "--name", b.guestName); err == nil {
		logf("kura snapshots:\n%s", strings.TrimSpace(out))
	}
	b.res.Backups = append(b.res.Backups, bk)

	if b.cfg.S3 {
		if err := b.backupS3(ctx); err != nil {
			return err
		}
	}

	if err := b.shutdown(ctx, b.guestName); err != nil {
		return err
	}
	refDir := filepath.Join(b.work, "ref")
	if err := os.MkdirAll(refDir, 0o755); err != nil {
		return err
	}
	var raws []string
	for i := range b.disks {
		d := &b.disks[i]
		d.Raw = filepath.Join(refDir, d.Target+".raw")
		logf("reference: qemu-img convert -O raw %s %s", d.Image, d.Raw)
		if _, err := benchutil.Run(ctx, "qemu-img", "convert", "-O", "raw", d.Image, d.Raw); err != nil {
			return err
		}
		if d.Allocated, err = allocated(ctx, d.Raw); err != nil {
			return err
		}
		b.res.RefAllocated += d.Allocated
		raws = append(raws, d.Raw)
	}
	b.res.Disks = b.disks
	logf("reference raw disks: %.1f MB allocated in all", float64(b.res.RefAllocated)/1e6)

	if b.cfg.has("restic") {
		if _, err := runEnv(ctx, b.resticEnv(), nil, b.cfg.Restic, "init"); err != nil {
			return err
		}
		m, _, err := b.measure(ctx, "backup-restic", false, b.resticEnv(), nil, append([]string{b.cfg.Restic, "backup", "--host", "bench"}, raws...)...)
		if err != nil {
			return err
		}
		bk := Backup{Tool: "restic", Meas: m, What: "the shut-off guest's disks as raw files (`restic backup`, compression auto)"}
		bk.Stored, _ = benchutil.DirBytes(filepath.Join(b.work, "restic-repo"))
		b.res.Backups = append(b.res.Backups, bk)
	}
	return nil
}

func (b *bench) resticEnv() []string {
	return []string{"RESTIC_REPOSITORY=" + filepath.Join(b.work, "restic-repo"), "RESTIC_PASSWORD=" + b.cfg.KuraPassword,
		"RESTIC_CACHE_DIR=" + filepath.Join(b.work, "restic-cache"), "RESTIC_PROGRESS_FPS=0.1"}
}

// shutdown shuts a domain down cleanly and waits until it is off:
// `systemctl poweroff` through the guest agent (the test guest's agent
// cannot run guest-shutdown, and it has no ACPI power-button handling),
// else virsh shutdown.
func (b *bench) shutdown(ctx context.Context, name string) error {
	logf("shutting %s down", name)
	g, err := testvm.AttachLibvirt(ctx, name) // not destroyed: that would undefine the domain
	if err != nil {
		return err
	}
	// Detached and delayed, so that the agent answers before it goes.
	if r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", "sync; (sleep 0.5; systemctl poweroff) </dev/null >/dev/null 2>&1 &"); err != nil || r.ExitCode != 0 {
		logf("systemctl poweroff in %s: %v %s; trying virsh shutdown", name, err, strings.TrimSpace(r.Stderr))
		if _, err := benchutil.Run(ctx, "virsh", "shutdown", name); err != nil {
			return err
		}
	}
	t := time.Now()
	for time.Since(t) < 3*time.Minute {
		st, _ := benchutil.Run(ctx, "virsh", "domstate", name)
		if strings.TrimSpace(st) == "shut off" {
			logf("%s is shut off after %.1f s", name, time.Since(t).Seconds())
			return nil
		}
		if err := sleep(ctx, 250*time.Millisecond); err != nil {
			return err
		}
	}
	return fmt.Errorf("%s did not shut down within 3 minutes", name)
}

// backupS3 starts a versitygw server on this host (its data in the scratch
// directory's file system: /tmp unless BENCH_WORK says otherwise) and backs
// the running guest up into a repository there, for instant recovery from
// S3.
func (b *bench) backupS3(ctx context.Context) error {
	srv, err := s3test.Start(ctx, s3test.VersityGW)
	if err != nil {
		return fmt.Errorf("starting versitygw for the S3 rows (BENCH_RESTORE_S3=0 leaves them out; scripts/s3servers.sh builds it): %w", err)
	}
	b.s3 = srv
	b.s3Repo = srv.Location(srv.Bucket, "bench")
	env, unset := b.kuraS3Env()
	if _, err := runEnv(ctx, env, unset, b.cfg.Kura, "init"); err != nil {
		return err
	}
	m, _, err := b.measure(ctx, "backup-kura-s3", false, env, unset, b.cfg.Kura, "-q", "backup", "vm", b.guestName, "--connect", "qemu:///system")
	if err != nil {
		return err
	}
	b.res.Backups = append(b.res.Backups, Backup{Tool: "kura-s3", Meas: m, What: "live, app-consistent (`kura backup vm`) into a repository on versitygw on this host (incremental: the guest's second backup)"})
	return nil
}
