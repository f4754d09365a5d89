package main

import (
	"context"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// restores restores every disk of the VM with each tool, RestoreRuns times
// (the tools take turns), and checks what each wrote.
func (b *bench) restores(ctx context.Context) error {
	for run := 1; run <= b.cfg.RestoreRuns; run++ {
		for _, tool := range b.cfg.Tools {
			r, err := b.restoreOnce(ctx, tool, run)
			if r != nil {
				b.res.Restores = append(b.res.Restores, *r)
			}
			if err != nil {
				return fmt.Errorf("%s restore #%d: %w", toolDesc[tool], run, err)
			}
		}
	}
	return nil
}

func (b *bench) restoreOnce(ctx context.Context, tool string, run int) (*RestoreRun, error) {
	dest := filepath.Join(b.work, "restore-"+tool)
	os.RemoveAll(dest)
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dest)
	var env, unset, argv []string
	switch tool {
	case "kura":
		env, unset = b.kuraEnv()
		argv = []string{b.cfg.Kura, "-q", "restore", b.guestName + "@latest", "--to", dest}
	case "restic":
		env = b.resticEnv()
		argv = []string{b.cfg.Restic, "restore", "latest", "--target", dest, "--sparse"}
	case "vnb":
		argv = []string{"virtnbdrestore", "-i", filepath.Join(b.work, "vnb"), "-o", dest, "-n",
			"-L", filepath.Join(b.cfg.Out, "logs", fmt.Sprintf("virtnbdrestore-%d.debug.log", run))}
	}
	if err := dropCaches(ctx); err != nil {
		return nil, fmt.Errorf("dropping the page cache: %w", err)
	}
	others := b.otherGuests(ctx)
	m, _, err := b.measure(ctx, fmt.Sprintf("restore-%s-%d", tool, run), true, env, unset, argv...)
	r := &RestoreRun{Tool: tool, Run: run, Meas: m, OtherGuests: others}
	if err != nil {
		return r, err
	}
	r.Written = diskUsage(dest)
	if m.Seconds > 0 {
		r.MBps = float64(b.res.RefAllocated) / 1e6 / m.Seconds
	}
	logf("%s restore #%d: %.2f s (sync %.2f s), %.0f MB/s of allocated data, %.1f MB written",
		toolDesc[tool], run, m.Seconds, m.SyncS, r.MBps, float64(r.Written)/1e6)

	detail, err := b.checkRestore(ctx, tool, dest, r)
	r.Check = detail
	if err != nil {
		r.Check = "FAILED: " + err.Error()
		return r, err
	}
	r.OK = true
	logf("%s restore #%d checked: %s", toolDesc[tool], run, detail)
	return r, nil
}

// checkRestore finds the restored image of every disk, checks its size,
// compares it with the shut-off guest's disk, and checks the data disk's
// files and (for a live backup) the root file system.
func (b *bench) checkRestore(ctx context.Context, tool, dest string, r *RestoreRun) (string, error) {
	var notes []string
	for _, d := range b.disks {
		img, format, err := findRestored(tool, dest, d)
		if err != nil {
			return "", err
		}
		vs, err := benchutil.VirtualSize(ctx, img)
		if err != nil {
			return "", err
		}
		if vs != d.Virtual {
			return "", fmt.Errorf("%s: virtual size %d, the guest's disk has %d", img, vs, d.Virtual)
		}
		raw := img
		if format != "raw" {
			raw = filepath.Join(dest, "check-"+d.Target+".raw")
			if err := convertWhenFree(ctx, img, raw); err != nil {
				return "", err
			}
		}
		same, diff, err := compareImages(ctx, d.Raw, raw)
		if err != nil {
			return "", err
		}
		if d.Target == "vdb" {
			r.DataIdentical = same
		}
		switch {
		case same:
			notes = append(notes, d.Target+" byte-identical to the shut-off guest's disk")
		case tool == "restic":
			// restic backed up exactly these raw files.
			return "", fmt.Errorf("%s differs from the raw file restic backed up: %s", d.Target, diff)
		default:
			notes = append(notes, fmt.Sprintf("%s differs from the shut-off guest's disk (%s; expected of a live backup: the guest ran on and then shut down)", d.Target, diff))
		}
		switch {
		case d.Target == "vdb":
			detail, err := b.checkFiles(ctx, raw, dest)
			if err != nil {
				return "", err
			}
			notes = append(notes, "vdb: "+detail)
		case !same:
			if _, err := benchutil.Run(ctx, "e2fsck", "-fn", raw); err != nil {
				return "", fmt.Errorf("the restored %s does not fsck clean: %w", d.Target, err)
			}
			notes = append(notes, d.Target+": e2fsck -fn clean")
		}
		if raw != img {
			os.Remove(raw)
		}
	}
	return strings.Join(notes, "; "), nil
}

// findRestored returns the image a tool restored disk d to, and its format.
func findRestored(tool, dest string, d diskRef) (string, string, error) {
	var found []string
	switch tool {
	case "kura":
		found = findFiles(dest, func(n string) bool { return n == d.Target+".raw" })
	case "restic":
		found = findFiles(dest, func(n string) bool { return n == filepath.Base(d.Raw) })
	case "vnb":
		// virtnbdrestore names the image after the original's file name.
		base := filepath.Base(d.Image)
		found = findFiles(dest, func(n string) bool {
			return n == base || (strings.HasPrefix(n, d.Target) && !strings.HasSuffix(n, ".xml") && !strings.HasSuffix(n, ".log") && !strings.HasSuffix(n, ".json"))
		})
	}
	if len(found) != 1 {
		all := findFiles(dest, func(string) bool { return true })
		return "", "", fmt.Errorf("%s: expected one restored image of %s in %s, found %v (all files: %v)", toolDesc[tool], d.Target, dest, found, all)
	}
	if tool == "vnb" {
		return found[0], "qcow2", nil
	}
	return found[0], "raw", nil
}

// convertWhenFree converts img to a raw file, waiting while another process
// (virtnbdrestore's qemu-nbd, which exits on its own after the restore)
// still holds the image's lock.
func convertWhenFree(ctx context.Context, img, raw string) error {
	for i := 0; ; i++ {
		out, err := benchutil.Run(ctx, "qemu-img", "convert", "-O", "raw", img, raw)
		if err == nil {
			return nil
		}
		if !strings.Contains(out, "lock") || i == 60 {
			return err
		}
		if err := sleep(ctx, time.Second); err != nil {
			return err
		}
	}
}

// compareImages runs qemu-img compare on two raw images: identical, or
// where they first differ.
func compareImages(ctx context.Context, a, b string) (bool, string, error) {
	out, err := exec.CommandContext(ctx, "qemu-img", "compare", "-f", "raw", "-F", "raw", a, b).CombinedOutput()
	if err == nil {
		return true, "", nil
	}
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 1 {
		return false, strings.TrimSpace(string(out)), nil
	}
	return false, "", fmt.Errorf("qemu-img compare %s %s: %v: %s", a, b, err, strings.TrimSpace(string(out)))
}

// diskUsage is the space the files under dir take on disk (du).
func diskUsage(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				if st, ok := fi.Sys().(*syscall.Stat_t); ok {
					n += st.Blocks * 512
				}
			}
		}
		return nil
	})
	return n
}
