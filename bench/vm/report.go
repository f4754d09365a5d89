package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Results is results.json.
type Results struct {
	Meta    Meta           `json:"meta"`
	Layout  Layout         `json:"layout"`
	Tools   []*ToolRun     `json:"tools"`
	Ratios  []Ratio        `json:"ratios"`
	Targets []Target       `json:"targets"`
	IncFits map[string]Fit `json:"incremental_fits"` // per tool: wall s = intercept + slope × bytes read
	// OtherCores is how many cores the rest of the machine used on average
	// during the measured backups: above 0.1 the timings are disturbed.
	OtherCores float64 `json:"other_cores"`
	Error      string  `json:"error,omitempty"`
}

// Meta describes the run.
type Meta struct {
	Date           string  `json:"date"`
	Host           string  `json:"host"`
	Cores          int     `json:"cores"`
	CPU            string  `json:"cpu"`
	Kernel         string  `json:"kernel"`
	LoadAvgStart   string  `json:"loadavg_start"`
	LoadAvgEnd     string  `json:"loadavg_end"`
	TotalSeconds   float64 `json:"total_seconds"`
	KuraBinary     string  `json:"kura_binary"`
	KuraVersion    string  `json:"kura_version"`
	VNBVersion     string  `json:"virtnbdbackup_version"`
	QEMUVersion    string  `json:"qemu_version"`
	LibvirtVersion string  `json:"libvirt_version"`
	FioVersion     string  `json:"fio_version"`
	GuestImage     string  `json:"guest_image"`
	Accel          string  `json:"accel"`
	Config         config  `json:"config"`
}

// Ratio is peer / kura for one measure (above 1: kura is faster / smaller).
type Ratio struct {
	What  string  `json:"what"`
	Peer  string  `json:"peer"`
	Kura  float64 `json:"kura"`
	Other float64 `json:"other"`
	Ratio float64 `json:"ratio"`
}

// Target is one of the targets.
type Target struct {
	Name     string `json:"name"`
	Measured string `json:"measured"`
	Verdict  string `json:"verdict"` // PASS, FAIL, NOT MEASURED
}

func mb(n int64) string    { return fmt.Sprintf("%.1f", float64(n)/1e6) }
func mib(n int64) string   { return fmt.Sprintf("%.1f", float64(n)/MiB) }
func ms(x float64) string  { return fmt.Sprintf("%.2f", x) }
func sec(x float64) string { return fmt.Sprintf("%.2f", x) }

func (b *bench) computeRatios() {
	r := b.res
	r.Ratios = nil
	k := r.tool("kura")
	if k == nil {
		return
	}
	for _, peer := range []string{"vnb", "vnb-z"} {
		p := r.tool(peer)
		if p == nil {
			continue
		}
		add := func(what string, kv, pv float64) {
			if kv > 0 && pv > 0 {
				r.Ratios = append(r.Ratios, Ratio{What: what, Peer: peer, Kura: kv, Other: pv, Ratio: pv / kv})
			}
		}
		for _, step := range []string{"full", "inc"} {
			kr, pr := k.row(step), p.row(step)
			if kr == nil || pr == nil {
				continue
			}
			add(step+" wall s", kr.Seconds, pr.Seconds)
			add(step+" bytes read", float64(kr.BytesRead), float64(pr.BytesRead))
			add(step+" stored by the backup (du)", float64(kr.StoredDelta), float64(pr.StoredDelta))
			add(step+" disk data stored (virtnbdbackup: its .data files)", float64(kr.StoredDelta), float64(pr.DataFiles))
			add(step+" CPU s (user+sys)", kr.User+kr.Sys, pr.User+pr.Sys)
			add(step+" peak RSS", float64(kr.MaxRSSKB), float64(pr.MaxRSSKB))
			add(step+" freeze ms", kr.FreezeMS, pr.FreezeMS)
			if kr.Fio != nil && pr.Fio != nil {
				add(step+" guest write p99 ms", kr.Fio.LatencyMS.P99, pr.Fio.LatencyMS.P99)
			}
		}
		if kr, pr := k.row("inc"), p.row("inc"); kr != nil && pr != nil {
			add("stored after inc", float64(kr.Stored), float64(pr.Stored))
		}
	}
}

func (b *bench) computeTargets() {
	r := b.res
	r.Targets = nil
	k, z := r.tool("kura"), r.tool("vnb-z")
	t1 := Target{Name: "full backup ≥ 2.5× faster than virtnbdbackup -z, both while the guest writes", Verdict: "NOT MEASURED"}
	if kr, zr := k.row("full"), z.row("full"); kr != nil && zr != nil {
		ratio := zr.Seconds / kr.Seconds
		t1.Measured = fmt.Sprintf("kura %.2f s, virtnbdbackup -z %.2f s: %.2f×", kr.Seconds, zr.Seconds, ratio)
		t1.Verdict = verdict(ratio >= 2.5)
	}
	t2 := Target{Name: fmt.Sprintf("incremental after %d MiB changed on a %d GiB disk in under 1 s", b.cfg.IncMiB, b.cfg.DataGiB), Verdict: "NOT MEASURED"}
	if kr, kf := k.row("inc"), k.row("full"); kr != nil && kf != nil {
		t2.Measured = fmt.Sprintf("%.2f s (read %s MB; the full backup read %s MB in %.2f s: %.0f%% of the bytes in %.0f%% of the time)",
			kr.Seconds, mb(kr.BytesRead), mb(kf.BytesRead), kf.Seconds, 100*float64(kr.BytesRead)/float64(kf.BytesRead), 100*kr.Seconds/kf.Seconds)
		t2.Verdict = verdict(kr.Seconds < 1)
	}
	t3 := Target{Name: "freeze window p99 under 100 ms over 50 backups", Verdict: "NOT MEASURED"}
	if k != nil && k.Freeze != nil {
		f := k.Freeze
		t3.Measured = fmt.Sprintf("p99 %.1f ms over %d backups (p50 %.1f, p95 %.1f, max %.1f)", f.Freeze.P99, f.Freeze.N, f.Freeze.P50, f.Freeze.P95, f.Freeze.Max)
		switch {
		case f.Freeze.N < 50:
			t3.Verdict = fmt.Sprintf("NOT MEASURED (only %d backups)", f.Freeze.N)
		case !f.AllModeOK:
			t3.Verdict = "FAIL (not every backup was app-consistent)"
		default:
			t3.Verdict = verdict(f.Freeze.P99 < 100)
		}
	}
	r.Targets = []Target{t1, t2, t3}
}

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}

func (b *bench) writeReport() error {
	b.computeRatios()
	b.computeTargets()
	b.res.IncFits = map[string]Fit{}
	var other, wall float64
	for _, t := range b.res.Tools {
		b.res.IncFits[t.Tool] = incFit(t)
		rows := t.Rows
		if t.Freeze != nil {
			rows = append(append([]Row(nil), rows...), t.Freeze.Rows...)
		}
		for _, r := range rows {
			other, wall = other+r.OtherCPU, wall+r.Seconds
		}
	}
	if wall > 0 {
		b.res.OtherCores = other / wall
	}
	if err := writeJSON(filepath.Join(b.cfg.Out, "results.json"), b.res); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(b.cfg.Out, "results.md"), []byte(b.markdown()), 0o644); err != nil {
		return err
	}
	latest := filepath.Join(filepath.Dir(b.cfg.Out), "latest")
	os.Remove(latest)
	os.Symlink(b.cfg.Out, latest)
	return nil
}

func (b *bench) markdown() string {
	r, c := b.res, b.cfg
	var w strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&w, format, a...) }
	p("# Kura live-VM benchmark: `kura backup vm` vs virtnbdbackup\n\n")
	if r.Error != "" {
		p("**THE RUN FAILED:** %s\n\nThe tables below hold what was measured before the failure.\n\n", strings.ReplaceAll(r.Error, "\n", " "))
	}
	m := r.Meta
	p("%s, %s: %d cores (%s), kernel %s, guests under %s. Load average %s at the start, %s at the end; %.0f s in all.\n\n",
		m.Date, m.Host, m.Cores, m.CPU, m.Kernel, m.Accel, m.LoadAvgStart, m.LoadAvgEnd, m.TotalSeconds)
	if r.OtherCores > 0.1 {
		p("**NOISY RUN:** the rest of the machine used %.2f cores on average during the measured backups (column \"other CPU\"); the timings are disturbed.\n\n", r.OtherCores)
	} else {
		p("Quiet run: the rest of the machine used %.2f cores on average during the measured backups.\n\n", r.OtherCores)
	}
	p("kura %s (`%s`); virtnbdbackup %s; %s; %s; guest: %s, %s.\n\n", m.KuraVersion, m.KuraBinary, m.VNBVersion, m.QEMUVersion, m.LibvirtVersion, m.GuestImage, m.FioVersion)

	l := r.Layout
	p("## Guest\n\n")
	p("%d vCPUs, %d MiB. Every tool gets a fresh guest booted from the same image, with its own copy of the same data disk.\n\n", c.CPUs, c.MemoryMiB)
	p("| disk | virtual | allocated (data extents, MB) | contents |\n|---|---|---|---|\n")
	p("| vda (root) | %d MiB | %s | the test guest's Debian 12 root file system (ext4), qcow2 overlay over the cached image |\n", l.RootVirtual/MiB, mb(l.RootAllocated))
	p("| vdb (/data) | %d GiB | %s | ext4: %d seeded pseudo-random files (%s MiB) in /bulk and fio's file /fio.dat (%s MiB) |\n", l.DataVirtual/GiB, mb(l.DataAllocated), l.BulkFiles, mib(l.DataFiles-l.FioFile), mib(l.FioFile))
	p("| total | | %s | target %d MB |\n\n", mb(l.Total), c.AllocMB)

	p("## Backups\n\n")
	p("`full` runs while fio writes in the guest (%d IOPS of 4 KiB random writes); `inc0` is an incremental backup that takes up what fio wrote during the full one; then the guest writes %d MiB of new files and `inc` is the measured incremental backup. Bytes read: from the NBD export (kura: `stats.bytes_read`; virtnbdbackup: the sum of its \"bytes of data extents to backup\" log lines, i.e. the data extents it reads). Stored: apparent size of the repository / output directory (du -sb) after the backup, and its growth. Freeze: from the freeze call to the return of the thaw call.\n\n", c.FioIOPS, c.IncMiB)
	p("| tool | step | wall s | read from NBD MB | stored after MiB | stored by it MiB | peak RSS MiB | CPU s user+sys | QEMU + libvirtd CPU s | other CPU s | freeze ms |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, t := range r.Tools {
		for _, x := range t.Rows {
			extra := ""
			if x.DataFiles > 0 {
				extra = fmt.Sprintf(" (data files %s)", mib(x.DataFiles))
			}
			p("| %s | %s | %s | %s | %s | %s%s | %d | %.1f + %.1f | %.1f + %.1f | %.1f | %.1f |\n", toolDesc[t.Tool], x.Step, sec(x.Seconds), mb(x.BytesRead),
				mib(x.Stored), mib(x.StoredDelta), extra, x.MaxRSSKB>>10, x.User, x.Sys, x.QEMUCPU, x.VirtCPU, x.OtherCPU, x.FreezeMS)
		}
	}
	p("\nQEMU CPU is the guest's QEMU process during the backup (its vCPUs, which run fio, the NBD server, copy-before-write); libvirtd's is the backup job's API calls; other CPU is the rest of the machine (noise: other work on the host).\n")
	for _, t := range r.Tools {
		var parts []string
		for _, x := range t.Rows {
			if len(x.ReadPerDisk) > 0 {
				var d []string
				for _, k := range sortedKeys(x.ReadPerDisk) {
					d = append(d, fmt.Sprintf("%s %s MB", k, mb(x.ReadPerDisk[k])))
				}
				parts = append(parts, x.Step+": "+strings.Join(d, ", "))
			} else if x.DiskRead != "" {
				parts = append(parts, x.Step+": "+x.DiskRead)
			}
		}
		if len(parts) > 0 {
			p("- %s read: %s\n", toolDesc[t.Tool], strings.Join(parts, "; "))
		}
	}

	p("\n### Incremental backups: fixed cost and rate\n\n")
	p("A least-squares line through every incremental backup of the run (inc0, inc and the freeze series): wall seconds = fixed + bytes read / rate. The fixed part is what an incremental backup costs when nothing changed; the issue asks for time proportional to the data changed.\n\n")
	p("| tool | backups | bytes read, min–max MB | fixed s | rate MB/s |\n|---|---|---|---|---|\n")
	for _, t := range r.Tools {
		if f := incFit(t); f.N >= 3 {
			rate := "n/a"
			if f.Slope > 0 {
				rate = fmt.Sprintf("%.0f", 1/f.Slope/1e6)
			}
			p("| %s | %d | %.1f–%.1f | %.2f | %s |\n", toolDesc[t.Tool], f.N, f.MinX/1e6, f.MaxX/1e6, f.Intercept, rate)
		}
	}

	p("\n## The guest's write latency\n\n")
	p("fio in the guest: 4 KiB random writes, O_DIRECT, psync (queue depth 1), rate-limited to %d IOPS, into /data/fio.dat (%d MiB). Completion latency (clat) of the writes that completed inside the window: %d s with no backup (baseline), or from the start to the end of the full backup. The guest clock is mapped to the host's with guest-get-time.\n\n", c.FioIOPS, c.FioMiB, c.BaselineSec)
	p("| guest of | window | s | writes | IOPS | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |\n|---|---|---|---|---|---|---|---|---|---|\n")
	fioRow := func(who, what string, f *FioStats) {
		if f == nil {
			return
		}
		d := f.LatencyMS
		p("| %s | %s | %.1f | %d | %.0f | %s | %s | %s | %s | %s |\n", who, what, f.Seconds, f.Writes, f.IOPS, ms(d.P50), ms(d.P90), ms(d.P99), ms(d.P999), ms(d.Max))
	}
	for _, t := range r.Tools {
		fioRow(toolDesc[t.Tool], "idle (baseline)", t.Baseline)
		if x := t.row("full"); x != nil {
			fioRow(toolDesc[t.Tool], "during its full backup", x.Fio)
		}
	}

	if len(r.Ratios) > 0 {
		p("\n## Ratios\n\npeer / kura: above 1, kura is faster, reads less, stores less, uses less.\n\n")
		p("| measure | peer | kura | peer value | ratio |\n|---|---|---|---|---|\n")
		for _, x := range r.Ratios {
			kv, pv := fmt.Sprintf("%.2f", x.Kura), fmt.Sprintf("%.2f", x.Other)
			switch {
			case strings.Contains(x.What, "stored"):
				kv, pv = mib(int64(x.Kura))+" MiB", mib(int64(x.Other))+" MiB"
			case strings.Contains(x.What, "bytes"):
				kv, pv = mb(int64(x.Kura))+" MB", mb(int64(x.Other))+" MB"
			case strings.Contains(x.What, "RSS"):
				kv, pv = fmt.Sprintf("%.0f MiB", x.Kura/1024), fmt.Sprintf("%.0f MiB", x.Other/1024)
			}
			p("| %s | %s | %s | %s | **%.2f** |\n", x.What, toolDesc[x.Peer], kv, pv, x.Ratio)
		}
	}

	p("\n## Freeze window\n\nConsecutive incremental backups (app-consistent, guest agent freeze) while fio writes lightly in the guest; the guest's slowest write completed during each backup shows the freeze from inside.\n\n")
	p("| tool | backups | fio IOPS | freeze p50 ms | p95 | p99 | max | slowest guest write per backup: p50 ms | max ms | wall per backup p50 s | max s | read per backup p50 MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, t := range r.Tools {
		if f := t.Freeze; f != nil {
			p("| %s | %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f | %.1f |\n", toolDesc[t.Tool], f.Freeze.N, f.FioIOPS, f.Freeze.P50, f.Freeze.P95, f.Freeze.P99, f.Freeze.Max,
				f.Stall.P50, f.Stall.Max, f.WallS.P50, f.WallS.Max, f.ReadMB.P50)
		}
	}
	p("\nThe parts of the freeze window (p50 / p99 ms): the guest agent's freeze call (the guest syncs and freezes), what the tool does while the guest is frozen (start the backup job and its checkpoint), the thaw call.\n\n")
	p("| tool | freeze call | while frozen | thaw call |\n|---|---|---|---|\n")
	for _, t := range r.Tools {
		if f := t.Freeze; f != nil {
			if f.FreezeCall.N == 0 {
				p("| %s | not recorded | | |\n", toolDesc[t.Tool])
				continue
			}
			p("| %s | %.1f / %.1f | %.1f / %.1f | %.1f / %.1f |\n", toolDesc[t.Tool], f.FreezeCall.P50, f.FreezeCall.P99, f.Instant.P50, f.Instant.P99, f.ThawCall.P50, f.ThawCall.P99)
		}
	}
	p("\nPercentiles are nearest-rank: with 50 backups p99 is the largest value. virtnbdbackup's freeze is timed by bench/vm/vnb_freeze.py, which runs /usr/bin/virtnbdbackup unchanged with its fsFreeze/fsThaw calls timed.\n")

	p("\n## Correctness\n\n")
	for _, t := range r.Tools {
		if t.Restore != nil {
			p("- %s: restore of vdb after `inc`: %s — %s\n", toolDesc[t.Tool], map[bool]string{true: "OK", false: "FAILED"}[t.Restore.OK], t.Restore.Detail)
		}
		if t.Freeze != nil && !t.Freeze.AllModeOK {
			p("- %s: NOT every freeze-series backup was app-consistent\n", toolDesc[t.Tool])
		}
	}
	p("- every backup above was app-consistent (kura: snapshot mode `app`; virtnbdbackup: fsFreeze and fsThaw succeeded) and exited 0; the run stops at the first that is not.\n")

	p("\n## Targets\n\n| target | measured | verdict |\n|---|---|---|\n")
	for _, t := range r.Targets {
		p("| %s | %s | **%s** |\n", t.Name, t.Measured, t.Verdict)
	}
	return w.String()
}

// Fit is a least-squares line y = Intercept + Slope*x.
type Fit struct {
	N                int
	Intercept, Slope float64
	MinX, MaxX       float64
}

// incFit fits wall seconds against bytes read over a tool's incremental
// backups.
func incFit(t *ToolRun) Fit {
	var xs, ys []float64
	add := func(r Row) {
		if r.Kind == "incremental" {
			xs, ys = append(xs, float64(r.BytesRead)), append(ys, r.Seconds)
		}
	}
	for _, r := range t.Rows {
		add(r)
	}
	if t.Freeze != nil {
		for _, r := range t.Freeze.Rows {
			add(r)
		}
	}
	f := Fit{N: len(xs)}
	if f.N < 2 {
		return f
	}
	var sx, sy, sxx, sxy float64
	f.MinX, f.MaxX = xs[0], xs[0]
	for i := range xs {
		sx, sy, sxx, sxy = sx+xs[i], sy+ys[i], sxx+xs[i]*xs[i], sxy+xs[i]*ys[i]
		f.MinX, f.MaxX = min(f.MinX, xs[i]), max(f.MaxX, xs[i])
	}
	n := float64(f.N)
	if d := n*sxx - sx*sx; d != 0 {
		f.Slope = (n*sxy - sx*sy) / d
	}
	f.Intercept = (sy - f.Slope*sx) / n
	return f
}
