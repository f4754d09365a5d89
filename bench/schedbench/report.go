package main

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Results is everything the run measured (results.json).
type Results struct {
	Meta    Meta                    `json:"meta"`
	Phases  []*Phase                `json:"phases"`
	Summary []SummaryRow            `json:"summary"`
	Base    map[string]WindowStats  `json:"baseline"` // per guest: every phase's idle lead-in pooled
	Targets map[string]TargetResult `json:"targets,omitempty"`
	Error   string                  `json:"error,omitempty"`
}

// Meta describes the machine and the settings.
type Meta struct {
	Date           string  `json:"date"`
	Host           string  `json:"host"`
	Cores          int     `json:"cores"`
	CPU            string  `json:"cpu"`
	Kernel         string  `json:"kernel"`
	Accel          string  `json:"accel"`
	LoadAvgStart   string  `json:"loadavg_start"`
	LoadAvgEnd     string  `json:"loadavg_end"`
	KuraBinary     string  `json:"kura_binary"`
	KuraVersion    string  `json:"kura_version"`
	QEMUVersion    string  `json:"qemu_version"`
	LibvirtVersion string  `json:"libvirt_version"`
	FioVersion     string  `json:"fio_version"`
	GuestImage     string  `json:"guest_image"`
	Device         Device  `json:"device"`
	Limit          string  `json:"limit"`
	TotalSeconds   float64 `json:"total_seconds"`
	Config         config  `json:"config"`
}

// Phase is one strategy's measurement.
type Phase struct {
	Strategy string `json:"strategy"`
	Kind     string `json:"kind"`
	Nice     bool   `json:"nice,omitempty"` // kura ran at nice 19
	Capture  string `json:"capture"`        // kura's capture method: fleece or overlay
	// FioStart..FioEnd is the plotted span; IdleFrom..IdleTo the idle
	// lead-in; Start..End the backups (from the first start to the moment
	// every VM was protected).
	FioStart time.Time `json:"fio_start"`
	IdleFrom time.Time `json:"idle_from"`
	IdleTo   time.Time `json:"idle_to"`
	Start    time.Time `json:"start"`
	End      time.Time `json:"end"`
	FioEnd   time.Time `json:"fio_end"`
	Seconds  float64   `json:"seconds"` // time to protect every VM
	// Stored is when the last restore point was written to the
	// repository: the backups' End (the overlay method's merges, the
	// backup jobs' teardown) comes after it.
	Stored        time.Time    `json:"stored"`
	StoredSeconds float64      `json:"stored_seconds"`
	VMs           []VMBackup   `json:"vms"`
	Guests        []GuestPhase `json:"guests"`
	IO            []ioSample   `json:"datastore_io"` // the limited cgroups' throughput, per second
	// What the modelled device served (BENCH_SCHED_DATASTORE=model only).
	DeviceIdle   *DeviceWindow  `json:"device_idle,omitempty"`
	DeviceBackup *DeviceWindow  `json:"device_backup,omitempty"`
	Metrics      []metricSample `json:"daemon_metrics,omitempty"`
	// The scheduler's settings and run.
	ThresholdMS     float64   `json:"threshold_ms,omitempty"`
	ThresholdSource string    `json:"threshold_source,omitempty"`
	PerHost         int       `json:"per_host,omitempty"`
	PerDatastore    int       `json:"per_datastore,omitempty"`
	ServerConfig    string    `json:"server_config,omitempty"`
	ServerLog       string    `json:"server_log,omitempty"`
	RunStatus       string    `json:"run_status,omitempty"`
	RunSummary      string    `json:"run_summary,omitempty"`
	RunEnded        time.Time `json:"run_ended,omitzero"`
	Decisions       []string  `json:"latency_control,omitempty"` // the daemon's "latency control" log lines
	// The overlay method's merge steps (from the server's debug log) and
	// the guests' latency while they ran.
	Steps     []Step      `json:"steps,omitempty"`
	StepStats []StepStats `json:"step_stats,omitempty"`
}

// VMBackup is one VM's restore point in a phase.
type VMBackup struct {
	VM        string    `json:"vm"`
	Kind      string    `json:"kind"`
	Mode      string    `json:"mode"`
	Start     time.Time `json:"start"`
	End       time.Time `json:"end"`
	Seconds   float64   `json:"seconds"`
	BytesRead int64     `json:"bytes_read"`
	FreezeMS  float64   `json:"freeze_ms"`
}

// GuestPhase is one guest's I/O latency in a phase.
type GuestPhase struct {
	Guest  string      `json:"guest"`
	Idle   WindowStats `json:"idle"`   // the lead-in, no backup running
	Backup WindowStats `json:"backup"` // while the phase's backups ran
	// From the first backup's start until every restore point was stored.
	UntilStored WindowStats `json:"until_stored"`
	series      []latSample
}

// WindowStats are fio's completion latencies in a window, in ms.
type WindowStats struct {
	Seconds float64 `json:"seconds"`
	All     Dist    `json:"all"`
	Read    Dist    `json:"read"`
	Write   Dist    `json:"write"`
	IOPS    float64 `json:"iops"`
}

func window(s []latSample, from, to time.Time) WindowStats {
	var all, rd, wr []float64
	for _, x := range s {
		if x.at.Before(from) || x.at.After(to) {
			continue
		}
		ms := x.lat.Seconds() * 1000
		all = append(all, ms)
		if x.write {
			wr = append(wr, ms)
		} else {
			rd = append(rd, ms)
		}
	}
	w := WindowStats{Seconds: to.Sub(from).Seconds(), All: dist(all), Read: dist(rd), Write: dist(wr)}
	if w.Seconds > 0 {
		w.IOPS = float64(len(all)) / w.Seconds
	}
	return w
}

// baseline pools a guest's idle samples over every phase so far.
func (r *Results) baseline(guest string) WindowStats {
	var s []latSample
	var sec float64
	for _, p := range r.Phases {
		for _, g := range p.Guests {
			if g.Guest != guest {
				continue
			}
			for _, x := range g.series {
				if !x.at.Before(p.IdleFrom) && !x.at.After(p.IdleTo) {
					s = append(s, x)
				}
			}
			sec += p.IdleTo.Sub(p.IdleFrom).Seconds()
		}
	}
	if len(s) == 0 {
		return WindowStats{}
	}
	w := window(s, s[0].at.Add(-time.Hour), s[len(s)-1].at.Add(time.Hour))
	w.Seconds = sec
	if sec > 0 {
		w.IOPS = float64(w.All.N) / sec
	}
	return w
}

// SummaryRow is one guest in one phase, against the baseline.
type SummaryRow struct {
	Strategy      string  `json:"strategy"`
	Guest         string  `json:"guest"`
	BaseP50       float64 `json:"baseline_p50_ms"`
	BaseP99       float64 `json:"baseline_p99_ms"`
	P50           float64 `json:"p50_ms"`
	P99           float64 `json:"p99_ms"`
	RiseP99       float64 `json:"p99_rise_pct"` // over the pooled baseline
	LeadP99       float64 `json:"lead_in_p99_ms"`
	RiseP99Lead   float64 `json:"p99_rise_over_lead_in_pct"` // over this phase's own lead-in
	ReadP99       float64 `json:"read_p99_ms"`
	WriteP99      float64 `json:"write_p99_ms"`
	Max           float64 `json:"max_ms"`
	P99Stored     float64 `json:"p99_until_stored_ms"`
	RiseP99Stored float64 `json:"p99_rise_until_stored_pct"`
	IOPS          float64 `json:"iops"`
	PhaseSeconds  float64 `json:"phase_seconds"`
	TimeVsAllOnce float64 `json:"time_vs_all_at_once"`
}

// TargetResult is one of the targets for one strategy.
type TargetResult struct {
	LatencyTarget string  `json:"latency_target"`
	WorstRiseP99  float64 `json:"worst_p99_rise_pct"`
	LatencyPass   bool    `json:"latency_pass"`
	TimeTarget    string  `json:"time_target"`
	TimeRatio     float64 `json:"time_vs_all_at_once"`
	TimePass      bool    `json:"time_pass"`
}

func pct(x, base float64) float64 {
	if base <= 0 {
		return 0
	}
	return (x/base - 1) * 100
}

func (b *bench) summarize() {
	r := b.res
	r.Base = map[string]WindowStats{}
	for _, g := range b.guestNames() {
		r.Base[g] = r.baseline(g)
	}
	var allOnce float64
	for _, p := range r.Phases {
		if p.Kind == "all-at-once" && len(p.Guests) > 0 {
			allOnce = p.Seconds
		}
	}
	r.Summary = nil
	r.Targets = map[string]TargetResult{}
	for _, p := range r.Phases {
		if len(p.Guests) == 0 {
			continue
		}
		worst := -1e9
		for _, g := range p.Guests {
			base := r.Base[g.Guest]
			row := SummaryRow{Strategy: p.Strategy, Guest: g.Guest, BaseP50: base.All.P50, BaseP99: base.All.P99,
				P50: g.Backup.All.P50, P99: g.Backup.All.P99, RiseP99: pct(g.Backup.All.P99, base.All.P99),
				LeadP99: g.Idle.All.P99, RiseP99Lead: pct(g.Backup.All.P99, g.Idle.All.P99),
				ReadP99: g.Backup.Read.P99, WriteP99: g.Backup.Write.P99, Max: g.Backup.All.Max, IOPS: g.Backup.IOPS,
				P99Stored: g.UntilStored.All.P99, RiseP99Stored: pct(g.UntilStored.All.P99, base.All.P99),
				PhaseSeconds: p.Seconds}
			if allOnce > 0 {
				row.TimeVsAllOnce = p.Seconds / allOnce
			}
			worst = max(worst, row.RiseP99)
			r.Summary = append(r.Summary, row)
		}
		if p.Kind == "scheduler" {
			t := TargetResult{LatencyTarget: "every guest's p99 rises < 20% over its baseline", WorstRiseP99: worst, LatencyPass: worst < 20,
				TimeTarget: "≤ 1.5× the time of all-at-once"}
			if allOnce > 0 {
				t.TimeRatio = p.Seconds / allOnce
				t.TimePass = t.TimeRatio <= 1.5
			}
			r.Targets[p.Strategy] = t
		}
	}
}

func (b *bench) guestNames() []string {
	var n []string
	seen := map[string]bool{}
	for _, p := range b.res.Phases {
		for _, g := range p.Guests {
			if !seen[g.Guest] {
				seen[g.Guest] = true
				n = append(n, g.Guest)
			}
		}
	}
	return n
}

func (b *bench) writeReport() error {
	b.summarize()
	var pngs []string
	for _, p := range b.res.Phases {
		if len(p.Guests) == 0 {
			continue
		}
		name := "latency-" + p.Strategy + ".png"
		if err := b.plotPhase(p, filepath.Join(b.cfg.Out, name)); err != nil {
			logf("plot %s: %v", name, err)
			continue
		}
		pngs = append(pngs, name)
		if err := writeSamples(p, filepath.Join(b.cfg.Out, "fio-"+p.Strategy+".csv.gz")); err != nil {
			logf("samples of %s: %v", p.Strategy, err)
		}
	}
	if err := writeJSON(filepath.Join(b.cfg.Out, "results.json"), b.res); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(b.cfg.Out, "results.md"), []byte(b.markdown(pngs)), 0o644)
}

func writeJSON(path string, v any) error {
	bs, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(bs, '\n'), 0o644)
}

func passMiss(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

func (b *bench) markdown(pngs []string) string {
	r, c := b.res, b.cfg
	var w strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&w, format, a...) }
	m := r.Meta
	p("# Protecting every VM at once: the scheduler under I/O contention\n\n")
	p("%s on %s (%d cores, %s, kernel %s), guests under %s; kura %s; %s; %s; fio %s.\n\n",
		m.Date, m.Host, m.Cores, m.CPU, m.Kernel, strings.ToUpper(m.Accel), m.KuraVersion, m.QEMUVersion, m.LibvirtVersion, m.FioVersion)
	p("Load average at start %s, at end %s (other work on the machine shows here).\n\n", m.LoadAvgStart, m.LoadAvgEnd)
	if r.Error != "" {
		p("**The run FAILED:** %s\n\n", r.Error)
	}
	p("**Setup.** %d guests (%d vCPU, %d MiB), each with a %d GiB data disk holding %d MiB of random files and fio's %d MiB file; "+
		"disks opened with cache=%s. Datastore limit: %s. "+
		"In every guest fio does %d random 4 KiB reads and %d random 4 KiB writes per second (O_DIRECT, queue depth 1) and logs every completion latency. "+
		"After a %d s warm-up (fio running, not measured), each strategy starts from a fresh repository (a full backup of the same data), after a %d s idle lead-in with fio running and no backup. "+
		"Baseline = each guest's idle lead-ins of all phases pooled; \"during\" = the I/Os completed between the first backup's start and the moment every VM was protected.\n\n",
		c.Guests, c.CPUs, c.MemoryMiB, c.DataGiB, c.DataMiB, c.FioMiB, c.Cache, m.Limit, c.ReadIOPS, c.WriteIOPS, c.WarmupSec, c.BaselineSec)

	p("## Targets\n\n")
	if len(r.Targets) == 0 {
		p("No scheduler phase finished.\n\n")
	}
	for _, ph := range r.Phases {
		t, ok := r.Targets[ph.Strategy]
		if !ok {
			continue
		}
		p("- **%s**: worst guest p99 rise %+.0f%% (target < +20%%): **%s**; time %.2f× all-at-once (target ≤ 1.5×): **%s**\n",
			ph.Strategy, t.WorstRiseP99, passMiss(t.LatencyPass), t.TimeRatio, passMiss(t.TimePass))
	}
	for _, ph := range r.Phases {
		if ph.Kind == "all-at-once" && len(ph.Guests) > 0 {
			worst := -1e9
			for _, s := range r.Summary {
				if s.Strategy == ph.Strategy {
					worst = max(worst, s.RiseP99)
				}
			}
			p("- all-at-once (no target, for comparison): worst guest p99 rise %+.0f%%\n", worst)
		}
	}
	p("\n## Time to protect every VM\n\nTime: from the first backup's start until every backup ended (for the scheduler, the run's end in the catalog); stored: until the last restore point was written to the repository (the overlay method's merges come after it).\n\n| strategy | time (s) | × all-at-once | stored (s) | × all-at-once | read (MB) | per VM: backup time (s) |\n|---|---:|---:|---:|---:|---:|---|\n")
	var allOnce float64
	for _, ph := range r.Phases {
		if ph.Kind == "all-at-once" && len(ph.Guests) > 0 {
			allOnce = ph.Seconds
		}
	}
	for _, ph := range r.Phases {
		if len(ph.Guests) == 0 {
			continue
		}
		var read int64
		var per []string
		for _, v := range ph.VMs {
			read += v.BytesRead
			per = append(per, fmt.Sprintf("%.0f (%s)", v.Seconds, v.Kind))
		}
		ratio, sratio := "-", "-"
		if allOnce > 0 {
			ratio = fmt.Sprintf("%.2f", ph.Seconds/allOnce)
			sratio = fmt.Sprintf("%.2f", ph.StoredSeconds/allOnce)
		}
		p("| %s | %.1f | %s | %.1f | %s | %.0f | %s |\n", ph.Strategy, ph.Seconds, ratio, ph.StoredSeconds, sratio, float64(read)/1e6, strings.Join(per, ", "))
	}
	p("\n## Guest I/O latency during the backups (fio completion latency, ms)\n\n")
	p("| strategy | guest | baseline p50 | baseline p99 | p50 | p99 | p99 rise | lead-in p99 | rise over lead-in | read p99 | write p99 | max | p99 until stored | its rise |\n")
	p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range r.Summary {
		p("| %s | %s | %.2f | %.2f | %.2f | %.2f | %+.0f%% | %.2f | %+.0f%% | %.2f | %.2f | %.1f | %.2f | %+.0f%% |\n", s.Strategy, shortName(s.Guest),
			s.BaseP50, s.BaseP99, s.P50, s.P99, s.RiseP99, s.LeadP99, s.RiseP99Lead, s.ReadP99, s.WriteP99, s.Max, s.P99Stored, s.RiseP99Stored)
	}
	p("\n## Datastore throughput (through the limit, MiB/s per second)\n\n| strategy | mean read during the backups | max read (1 s) | mean write |\n|---|---:|---:|---:|\n")
	for _, ph := range r.Phases {
		if len(ph.IO) == 0 {
			continue
		}
		var sr, sw, mr float64
		for _, s := range ph.IO {
			sr += s.ReadMiBs
			sw += s.WriteMiBs
			mr = max(mr, s.ReadMiBs)
		}
		n := float64(len(ph.IO))
		p("| %s | %.1f | %.1f | %.1f |\n", ph.Strategy, sr/n, mr, sw/n)
	}
	if len(r.Phases) > 0 && r.Phases[0].DeviceBackup != nil {
		p("\n## On the modelled device\n\nRequests of at most %d KiB (the guests' own I/O) apart from the larger ones (the backups' reads, copy-before-write), as the model served them: time queued for a channel, and queued plus served, in ms; channels: how many they held on average.\n\n", smallIO>>10)
		p("| strategy | window | small: n | wait p50 | wait p99 | latency p99 | channels | larger: n | mean KiB | wait p99 | channels |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, ph := range r.Phases {
			for _, x := range []struct {
				name string
				w    *DeviceWindow
			}{{"idle", ph.DeviceIdle}, {"backups", ph.DeviceBackup}} {
				if x.w == nil {
					continue
				}
				w := x.w
				p("| %s | %s | %d | %.2f | %.2f | %.2f | %.2f | %d | %.0f | %.2f | %.2f |\n", ph.Strategy, x.name, w.SmallN, w.SmallWait.P50, w.SmallWait.P99, w.SmallLatency.P99, w.SmallChannels, w.LargeN, w.LargeMeanKiB, w.LargeWait.P99, w.LargeChannels)
			}
		}
	}
	for _, ph := range r.Phases {
		if ph.Kind != "scheduler" {
			continue
		}
		p("\n## What the scheduler did (%s)\n\n", ph.Strategy)
		p("Limits per_host %d, per_datastore %d; latency threshold %.2f ms (%s), interval %gs, min_rate %s, increase %s, read_window %t, max_reads %d, read_size %s, each backup's bandwidth %s; the server at its default limits.nice (19). Run: %s, %s.\n\n",
			ph.PerHost, ph.PerDatastore, ph.ThresholdMS, ph.ThresholdSource, c.IntervalS, c.MinRate, c.Increase, c.ReadWindow, c.MaxReads, orDefault(c.ReadSize, "whole chunks"), orDefault(c.Bandwidth, "unlimited"), ph.RunStatus, ph.RunSummary)
		var paused, samples int
		var maxLat float64
		for _, m := range ph.Metrics {
			samples++
			if m.Paused {
				paused++
			}
			maxLat = max(maxLat, m.LatencyMS)
		}
		p("From /metrics every second: paused for new backups in %d of %d samples; the controller's smoothed guest latency peaked at %.2f ms.\n\n", paused, samples, maxLat)
		p("The daemon's latency control decisions (%d; all in %s):\n\n```\n", len(ph.Decisions), ph.ServerLog)
		for i, d := range ph.Decisions {
			if i == 40 {
				p("… %d more\n", len(ph.Decisions)-40)
				break
			}
			p("%s\n", d)
		}
		p("```\n")
		p("\nStart and end of each VM's backup (seconds after the run-now):\n\n")
		for _, v := range ph.VMs {
			p("- %s: %.1f → %.1f s (%s, read %.0f MB)\n", shortName(v.VM), v.Start.Sub(ph.Start).Seconds(), v.End.Sub(ph.Start).Seconds(), v.Kind, float64(v.BytesRead)/1e6)
		}
		if len(ph.StepStats) > 0 {
			p("\nThe overlay method's merges, step by step (from the server's debug log): the guests' fio latency (ms) while steps of each kind ran, each guest during its own VM's steps (own) and every guest during any VM's (all), and the modelled device's small requests' wait and the larger requests' channels in those windows.\n\n")
			p("| step | count | seconds | own: n | p50 | p99 | max | all: p99 | device small wait p99 | larger channels |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
			for _, st := range ph.StepStats {
				var wait, ch float64
				if d := st.Device; d != nil {
					wait, ch = d.SmallWait.P99, d.LargeChannels
				}
				p("| %s | %d | %.1f | %d | %.2f | %.2f | %.1f | %.2f | %.2f | %.2f |\n", st.Kind, st.Count, st.Seconds, st.Own.N, st.Own.P50, st.Own.P99, st.Own.Max, st.All.P99, wait, ch)
			}
			p("\nEvery step (seconds after the run-now):\n\n")
			for _, s := range ph.Steps {
				p("- %s: %s %.2f → %.2f s\n", shortName(s.VM), s.Kind, s.From.Sub(ph.Start).Seconds(), s.To.Sub(ph.Start).Seconds())
			}
		}
	}
	if len(pngs) > 0 {
		p("\n## Plots\n\nEach guest's p99 I/O latency per 1 s (log scale), the idle lead-in shaded, the backup window between the dashed lines; below, the datastore's read throughput.\n\n")
		for _, f := range pngs {
			p("![%s](%s)\n\n", f, f)
		}
	}
	p("\nLogs: bench.log, logs/ (kura's output of every command, the server's configuration and log). Raw figures: results.json.\n")
	return w.String()
}

// shortName drops the "kura-sched-PID-" prefix of a guest name.
func shortName(n string) string {
	if i := strings.LastIndexByte(n, '-'); i >= 0 {
		return n[i+1:]
	}
	return n
}

// orDefault is s, or def when s is empty.
func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// writeSamples writes every fio completion of the phase's guests, as
// guest,seconds after the phase's start,latency in ms,r or w (gzipped
// CSV), for analyses the report does not make.
func writeSamples(p *Phase, path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	z := gzip.NewWriter(f)
	w := bufio.NewWriter(z)
	fmt.Fprintln(w, "guest,t,ms,op")
	for _, g := range p.Guests {
		for _, x := range g.series {
			op := "r"
			if x.write {
				op = "w"
			}
			fmt.Fprintf(w, "%s,%.4f,%.3f,%s\n", shortName(g.Guest), x.at.Sub(p.Start).Seconds(), x.lat.Seconds()*1000, op)
		}
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if err := z.Close(); err != nil {
		return err
	}
	return f.Close()
}
