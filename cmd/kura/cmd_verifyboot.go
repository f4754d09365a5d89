package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/export"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source/libvirt"
)

// bootOptions are the flags of `kura verify --boot`.
type bootOptions struct {
	check      string
	screenshot string
	connect    string
	timeout    time.Duration
}

// errBootFailed is returned when a verification boot ran and failed.
var errBootFailed = errors.New("the restore point did not pass its boot check")

// verifyBoot boots restore point arg isolated (no network, on throwaway
// overlays over an NBD export of the repository), waits for the guest
// agent and runs the check command, saves a screenshot of the console,
// tears everything down and records the result in the repository.
func (a *app) verifyBoot(ctx context.Context, arg string, o bootOptions) error {
	r, err := a.open(ctx)
	if err != nil {
		return err
	}
	snap, err := findSnapshot(ctx, r, arg)
	if err != nil {
		return err
	}
	if snap.Config == nil || snap.Config.Type != "libvirt-xml" {
		return fmt.Errorf("restore point %s (%s) is not of a libvirt VM: --boot needs the VM's saved configuration", snap.ID[:8], snap.Name)
	}
	conn, err := libvirt.Connect(ctx, o.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	name := fmt.Sprintf("kura-verify-%s-%s", snap.ID[:8], crypt.RandomID().String()[:6])
	work, err := os.MkdirTemp("/var/tmp", name+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	srv, err := export.Start(ctx, r, snap, snap.Disks, filepath.Join(work, "nbd.sock"), export.Options{CacheBytes: 64 << 20, Logger: a.log})
	if err != nil {
		return err
	}
	defer srv.Close()
	disks := map[string]libvirt.RestoredDisk{}
	for _, d := range snap.Disks {
		rd, err := newOverlay(ctx, srv.Socket(), d, filepath.Join(work, d.Name+".qcow2"))
		if err != nil {
			return err
		}
		disks[d.Name] = rd
	}
	def, err := libvirt.RestoreDefinition(snap.Config.Data, name, true, disks)
	if err == nil {
		def, err = libvirt.IsolatedDefinition(def)
	}
	if err != nil {
		return fmt.Errorf("restore point %s: %w", snap.ID[:8], err)
	}

	res := &repo.BootCheck{Snapshot: snap.ID, Time: time.Now().UTC(), Check: o.check}
	began := time.Now()
	if err := conn.CreateTransient(ctx, name, def); err != nil {
		return err
	}
	defer conn.Destroy(context.WithoutCancel(ctx), name)
	fmt.Fprintf(a.stdout, "booting restore point %s (%s, %s) as %s, without network\n", snap.ID[:8], show(snap.Name), snap.Time.Local().Format("2006-01-02 15:04:05"), show(name))
	bctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	if err := conn.WaitAgent(bctx, name); err != nil {
		res.Error = fmt.Sprintf("the guest agent did not answer within %s", o.timeout)
	} else {
		res.AgentMillis = float64(time.Since(began).Microseconds()) / 1000
		fmt.Fprintf(a.stdout, "guest agent answered after %s\n", time.Since(began).Round(10*time.Millisecond))
		res.Passed = true
		if o.check != "" {
			er, err := conn.GuestExec(bctx, name, o.check)
			switch {
			case err != nil:
				res.Passed, res.Error = false, err.Error()
			case er.Exit != 0:
				res.Passed, res.Error = false, fmt.Sprintf("the check command exited with status %d", er.Exit)
			}
			res.CheckExit, res.CheckOutput = er.Exit, truncate(er.Output, 4096)
			fmt.Fprintf(a.stdout, "check %q exited %d\n", o.check, er.Exit)
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if png, err := conn.Screenshot(ctx, name, work); err != nil {
		fmt.Fprintf(a.stdout, "warning: no screenshot: %v\n", err)
	} else {
		res.Screenshot = png
		path := o.screenshot
		if path == "" {
			path = fmt.Sprintf("kura-verify-%s.png", snap.ID[:8])
		}
		if err := os.WriteFile(path, png, 0o644); err != nil {
			return fmt.Errorf("saving the screenshot: %w", err)
		}
		fmt.Fprintf(a.stdout, "console screenshot saved to %s\n", path)
	}
	if err := conn.Destroy(context.WithoutCancel(ctx), name); err != nil {
		return err
	}
	if err := r.SaveBootCheck(ctx, res); err != nil {
		return err
	}
	if !res.Passed {
		return fmt.Errorf("restore point %s: %s: %w", snap.ID[:8], res.Error, errBootFailed)
	}
	fmt.Fprintf(a.stdout, "restore point %s boots: PASS (recorded in the repository)\n", snap.ID[:8])
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
