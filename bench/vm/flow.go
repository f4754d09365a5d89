package main

import (
	"context"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// ToolRun is everything measured on one tool's guest.
type ToolRun struct {
	Tool       string        `json:"tool"`
	Guest      string        `json:"guest"`
	BootS      float64       `json:"boot_s"`
	Baseline   *FioStats     `json:"baseline"`              // fio with no backup running
	WriteS     float64       `json:"write_s"`               // kura-workload writing IncMiB
	Rows       []Row         `json:"rows"`                  // full, inc0, inc
	Restore    *Check        `json:"restore,omitempty"`     // restore of vdb after inc
	Freeze     *FreezeSeries `json:"freeze,omitempty"`      // consecutive incremental backups
	LayoutSeen *Layout       `json:"layout_seen,omitempty"` // this guest's disks before the first backup
}

// Check is a correctness check.
type Check struct {
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// FreezeSeries is the freeze window over consecutive incremental backups.
type FreezeSeries struct {
	Runs       int       `json:"runs"`
	FioIOPS    int       `json:"fio_iops"`
	FreezeMS   []float64 `json:"freeze_ms"`
	Freeze     Dist      `json:"freeze_dist"`
	WallS      Dist      `json:"wall_s"`
	ReadMB     Dist      `json:"read_mb"`
	FreezeCall Dist      `json:"freeze_call_ms"` // the parts of the freeze window (see Row)
	Instant    Dist      `json:"instant_ms"`
	ThawCall   Dist      `json:"thaw_call_ms"`
	StallMS    []float64 `json:"guest_stall_ms"` // the slowest guest write completed during each backup
	Stall      Dist      `json:"guest_stall_dist"`
	Rows       []Row     `json:"rows"`
	AllModeOK  bool      `json:"all_app"`
}

func (r *Results) tool(name string) *ToolRun {
	for _, t := range r.Tools {
		if t.Tool == name {
			return t
		}
	}
	return nil
}

func (t *ToolRun) row(step string) *Row {
	if t == nil {
		return nil
	}
	for i := range t.Rows {
		if t.Rows[i].Step == step {
			return &t.Rows[i]
		}
	}
	return nil
}

// runTool boots a fresh guest with a copy of the data disk and runs every
// measured step of one tool on it.
func (b *bench) runTool(ctx context.Context, tool string) error {
	tr := &ToolRun{Tool: tool}
	b.res.Tools = append(b.res.Tools, tr)
	dir := filepath.Join(b.work, tool)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	vdb := filepath.Join(dir, "vdb.qcow2")
	logf("%s: copying the data disk", tool)
	if _, err := benchutil.Run(ctx, "cp", b.vdb, vdb); err != nil {
		return err
	}
	name := fmt.Sprintf("kura-vmbench-%s-%d", tool, os.Getpid())
	g, err := testvm.StartLibvirt(ctx, testvm.Options{
		Name: name, Dir: dir, MemoryMiB: b.cfg.MemoryMiB, CPUs: b.cfg.CPUs,
		Disks: []testvm.DiskSpec{{Source: vdb, Format: "qcow2", FS: "ext4", Mount: "/data"}},
	})
	if err != nil {
		return err
	}
	b.guests = append(b.guests, g)
	tr.Guest = name
	boot, err := g.WaitAgent(ctx)
	if err != nil {
		return err
	}
	tr.BootS = boot.Seconds()
	b.res.Meta.Accel = g.Accel
	logf("%s: guest %s (%s) answered after %.1f s", tool, name, g.Accel, boot.Seconds())
	// Let the boot finish (units still starting would disturb the baseline).
	wctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	st, _ := benchutil.Sh(wctx, g, "systemctl is-system-running --wait || true")
	cancel()
	logf("%s: guest system state: %s", tool, strings.TrimSpace(st))
	if b.res.Meta.FioVersion == "" {
		v, _ := benchutil.Sh(ctx, g, "fio --version")
		b.res.Meta.FioVersion = strings.TrimSpace(v)
	}
	lay := &Layout{}
	for _, d := range g.Disks {
		a, err := allocated(ctx, d.Path)
		if err != nil {
			return err
		}
		vs, _ := benchutil.VirtualSize(ctx, d.Path)
		switch d.Target {
		case "vda":
			lay.RootAllocated, lay.RootVirtual = a, vs
		case "vdb":
			lay.DataAllocated, lay.DataVirtual = a, vs
		}
	}
	lay.Total = lay.RootAllocated + lay.DataAllocated
	tr.LayoutSeen = lay
	images := []string{b.img.RootQcow2, g.Disks[0].Path, vdb}

	drv := b.newDriver(tool, dir, g)
	if err := drv.init(ctx); err != nil {
		return err
	}

	// 1. Baseline: the guest's writes with no backup running.
	f, err := b.startFio(ctx, g, "baseline", b.cfg.FioIOPS)
	if err != nil {
		return err
	}
	from := time.Now()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Duration(b.cfg.BaselineSec) * time.Second):
	}
	to := time.Now()
	lat, err := f.stop(ctx)
	if err != nil {
		return err
	}
	bl := window(lat, from, to, b.cfg.FioIOPS)
	tr.Baseline = &bl
	logf("%s: baseline guest write latency p50 %.2f ms, p99 %.2f ms, max %.1f ms, %.0f IOPS", tool, bl.LatencyMS.P50, bl.LatencyMS.P99, bl.LatencyMS.Max, bl.IOPS)

	// 2. Full backup while the guest writes.
	precache(images...)
	if f, err = b.startFio(ctx, g, "full", b.cfg.FioIOPS); err != nil {
		return err
	}
	full, err := drv.backup(ctx, "full", "full")
	if err != nil {
		f.stop(ctx)
		return err
	}
	if lat, err = f.stop(ctx); err != nil {
		return err
	}
	fs := window(lat, full.Start, full.End, b.cfg.FioIOPS)
	full.Fio = &fs
	tr.Rows = append(tr.Rows, full)
	logf("%s: guest write latency during the full backup p50 %.2f ms, p99 %.2f ms, max %.1f ms, %.0f IOPS", tool, fs.LatencyMS.P50, fs.LatencyMS.P99, fs.LatencyMS.Max, fs.IOPS)

	// 3. inc0 takes up what fio wrote during the full backup.
	inc0, err := drv.backup(ctx, "inc0", "inc")
	if err != nil {
		return err
	}
	tr.Rows = append(tr.Rows, inc0)

	// 4. The guest writes IncMiB of new files; the measured incremental.
	t := time.Now()
	if _, err := benchutil.Sh(ctx, g, fmt.Sprintf("/usr/local/bin/kura-workload write /data/inc %d %d", b.cfg.IncMiB, b.cfg.Seed)); err != nil {
		return err
	}
	tr.WriteS = time.Since(t).Seconds()
	logf("%s: the guest wrote %d MiB in %.1f s", tool, b.cfg.IncMiB, tr.WriteS)
	precache(images...)
	inc, err := drv.backup(ctx, "inc", "inc")
	if err != nil {
		return err
	}
	tr.Rows = append(tr.Rows, inc)

	// 5. Restore of the data disk, fsck, contents.
	if b.cfg.restoreCheck(tool) {
		dest := filepath.Join(dir, "restore")
		if err := os.MkdirAll(dest, 0o755); err != nil {
			return err
		}
		raw, err := drv.restore(ctx, dest)
		if err != nil {
			return fmt.Errorf("restore: %w", err)
		}
		detail, err := checkRestored(ctx, raw, dest)
		if err != nil {
			tr.Restore = &Check{OK: false, Detail: err.Error()}
			return fmt.Errorf("restore check: %w", err)
		}
		tr.Restore = &Check{OK: true, Detail: detail}
		logf("%s: restore of vdb checked: %s", tool, detail)
		os.RemoveAll(dest)
	}

	// 6. Freeze window over consecutive incremental backups, the guest
	// writing lightly.
	runs := 0
	switch tool {
	case "kura":
		runs = b.cfg.FreezeRuns
	case "vnb":
		runs = b.cfg.VNBFreezeRuns
	}
	if runs > 0 {
		fsr := &FreezeSeries{Runs: runs, FioIOPS: b.cfg.FioLightIOPS, AllModeOK: true}
		tr.Freeze = fsr
		if f, err = b.startFio(ctx, g, "freeze", b.cfg.FioLightIOPS); err != nil {
			return err
		}
		for i := 1; i <= runs; i++ {
			r, err := drv.backup(ctx, fmt.Sprintf("freeze-%02d", i), "inc")
			if err != nil {
				f.stop(ctx)
				return err
			}
			fsr.Rows = append(fsr.Rows, r)
			fsr.FreezeMS = append(fsr.FreezeMS, r.FreezeMS)
			fsr.AllModeOK = fsr.AllModeOK && r.Mode == "app"
		}
		if lat, err = f.stop(ctx); err != nil {
			return err
		}
		var wall, read, fc, in, tc []float64
		for i := range fsr.Rows {
			r := &fsr.Rows[i]
			w := window(lat, r.Start, r.End, b.cfg.FioLightIOPS)
			r.Fio = &w
			fsr.StallMS = append(fsr.StallMS, w.LatencyMS.Max)
			wall = append(wall, r.Seconds)
			read = append(read, float64(r.BytesRead)/1e6)
			if r.FreezeCallMS > 0 {
				fc, in, tc = append(fc, r.FreezeCallMS), append(in, r.InstantMS), append(tc, r.ThawCallMS)
			}
		}
		fsr.FreezeCall, fsr.Instant, fsr.ThawCall = dist(fc), dist(in), dist(tc)
		fsr.Freeze, fsr.Stall, fsr.WallS, fsr.ReadMB = dist(fsr.FreezeMS), dist(fsr.StallMS), dist(wall), dist(read)
		logf("%s: freeze window over %d backups: p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, max %.1f ms; slowest guest write per backup p50 %.1f ms, max %.1f ms",
			tool, runs, fsr.Freeze.P50, fsr.Freeze.P95, fsr.Freeze.P99, fsr.Freeze.Max, fsr.Stall.P50, fsr.Stall.Max)
	}

	// Done with this guest: remove it before the next tool's guest boots.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	if err := g.Destroy(dctx); err != nil {
		return err
	}
	b.guests = b.guests[:len(b.guests)-1]
	if !b.cfg.Keep {
		os.RemoveAll(dir)
	}
	return nil
}
