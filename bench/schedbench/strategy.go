package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// parseStrategy checks a strategy name: all-at-once, sequential,
// scheduler (limits from BENCH_SCHED_PER_HOST/PER_DATASTORE),
// scheduler-pdN (at most N backups at once on the datastore) or
// off-datastore (a diagnostic, not a way to protect the guests: kura backs
// up, one after the other, copies of the guests' data held off the
// datastore, so that the guests feel only the backups' use of the host's
// CPU) or on-datastore (the same with copies on the model's mount: the
// backups' reads go through the datastore but not through the guests'
// QEMU). Any of them with the suffix -nice runs kura at nice 19; with
// -overlay (before -nice, if both) kura captures the VMs with the overlay
// method instead of QEMU's backup job. It returns the kind and, for the
// scheduler, per_datastore.
func parseStrategy(s string, c config) (kind string, perDatastore int, err error) {
	s = strings.TrimSuffix(strings.TrimSuffix(s, "-nice"), "-overlay")
	switch {
	case s == "all-at-once" || s == "sequential" || s == "off-datastore" || s == "on-datastore":
		return s, 0, nil
	case s == "scheduler":
		return s, c.PerDatastore, nil
	case strings.HasPrefix(s, "scheduler-pd"):
		n, err := strconv.Atoi(strings.TrimPrefix(s, "scheduler-pd"))
		if err != nil || n < 1 {
			return "", 0, fmt.Errorf("%q: scheduler-pdN needs a positive N", s)
		}
		return "scheduler", n, nil
	}
	return "", 0, fmt.Errorf("unknown strategy %q (use all-at-once, sequential, scheduler, scheduler-pdN, off-datastore, on-datastore, each optionally with -overlay and -nice)", s)
}

// runPhase measures one strategy: a fresh repository, fio in every guest,
// an idle lead-in (the baseline), then the backups of every guest, then fio
// is stopped and its samples are cut into the two windows.
func (b *bench) runPhase(ctx context.Context, strategy string) error {
	kind, perDS, _ := parseStrategy(strategy, b.cfg)
	ph := &Phase{Strategy: strategy, Kind: kind, Nice: strings.HasSuffix(strategy, "-nice"), Capture: "fleece"}
	if strings.HasSuffix(strings.TrimSuffix(strategy, "-nice"), "-overlay") {
		ph.Capture = "overlay"
	}
	b.nice = ph.Nice
	defer func() { b.nice = false }()
	b.res.Phases = append(b.res.Phases, ph)
	repoDir := filepath.Join(b.work, "repo-"+strategy)
	if _, err := b.kura(ctx, "init-"+strategy, "-r", repoDir, "init"); err != nil {
		return err
	}

	var srv *server
	if kind == "scheduler" {
		thr := b.cfg.ThresholdMS
		ph.ThresholdSource = "BENCH_SCHED_THRESHOLD_MS"
		if thr <= 0 {
			base := b.medianLeadInP99()
			if base <= 0 {
				// No earlier phase: this phase's own lead-in decides,
				// so the server starts after it (below).
				ph.ThresholdSource = ""
			} else {
				thr = b.cfg.ThresholdX * base
				ph.ThresholdSource = fmt.Sprintf("%.2f × the median over the earlier phases' idle lead-ins of the highest guest p99 there (%.2f ms)", b.cfg.ThresholdX, base)
			}
		}
		ph.ThresholdMS = thr
		ph.PerHost, ph.PerDatastore = b.cfg.PerHost, perDS
	}

	settle(ctx, time.Duration(b.cfg.SettleSec)*time.Second)
	fios := make([]*fio, len(b.guests))
	if err := b.eachGuest(func(i int, vg *vmGuest) error {
		f, err := b.startFio(ctx, vg, "sched"+strings.ReplaceAll(strategy, "-", ""))
		fios[i] = f
		return err
	}); err != nil {
		return err
	}
	stopFio := func() ([][]latSample, error) {
		out := make([][]latSample, len(fios))
		err := b.eachGuest(func(i int, vg *vmGuest) error {
			if fios[i] == nil {
				return nil
			}
			s, err := fios[i].stop(context.WithoutCancel(ctx))
			out[i] = s
			return err
		})
		return out, err
	}
	defer func() {
		if fios != nil {
			stopFio()
		}
	}()
	ph.FioStart = time.Now()
	settle(ctx, 2*time.Second) // fio's first I/O opens the file
	ph.IdleFrom = time.Now()
	if err := settle(ctx, time.Duration(b.cfg.BaselineSec)*time.Second); err != nil {
		return err
	}
	ph.IdleTo = time.Now()
	for _, f := range fios {
		if err := f.alive(ctx); err != nil {
			return err
		}
	}

	if kind == "scheduler" {
		if ph.ThresholdMS <= 0 {
			// Read this phase's lead-in so far without stopping fio: not
			// possible from the guest's in-memory log, so use a fixed
			// figure and say so.
			ph.ThresholdMS = 20
			ph.ThresholdSource = "kura's default (20 ms): no earlier phase measured a baseline; set BENCH_SCHED_THRESHOLD_MS or run the scheduler after another strategy"
		}
		var err error
		if srv, err = b.startServer(ctx, strategy, repoDir, ph); err != nil {
			return err
		}
		defer srv.stop()
	}

	sctx, stopSampling := context.WithCancel(ctx)
	ioc := sampleIO(sctx, b.ds)
	var metc <-chan []metricSample
	if srv != nil {
		metc = srv.sampleMetrics(sctx)
	}
	ph.Start = time.Now()
	var err error
	switch kind {
	case "all-at-once":
		args := []string{"-r", repoDir, "backup", "vm", "--capture", ph.Capture, "--scratch-dir", b.scratchDir(), "--parallel", strconv.Itoa(len(b.guests))}
		for _, vg := range b.guests {
			args = append(args, vg.name)
		}
		_, err = b.kura(ctx, strategy, args...)
	case "sequential":
		for _, vg := range b.guests {
			if _, err = b.kura(ctx, strategy+"-"+vg.name, "-r", repoDir, "backup", "vm", "--capture", ph.Capture, "--scratch-dir", b.scratchDir(), vg.name); err != nil {
				break
			}
		}
	case "scheduler":
		err = srv.runNow(ctx, ph)
	case "off-datastore", "on-datastore":
		// The guests' data as a backup of them reads it (the root image
		// and the data disk): off the datastore, the files the guests'
		// disks were copied from (neither on the model's mount nor in the
		// guests' cgroup); on it, the root image the guests boot from and
		// a copy of the data disk on the model's mount.
		args := []string{"-r", repoDir, "backup", "image"}
		if b.cfg.OffRate != "" {
			args = append(args, "--limit-read", b.cfg.OffRate)
		}
		if b.cfg.OffWorkers > 0 {
			args = append(args, "--workers", strconv.Itoa(b.cfg.OffWorkers))
		}
		root, vdb := b.rootSrc, b.vdb
		if kind == "on-datastore" {
			root, vdb = b.img.RootQcow2, filepath.Join(filepath.Dir(b.img.RootQcow2), "vdb-copy.qcow2")
		}
		for _, vg := range b.guests {
			if _, err = b.kura(ctx, strategy+"-"+vg.name, append(args, "--name", vg.name, root, vdb)...); err != nil {
				break
			}
		}
	}
	ph.End = time.Now()
	if kind == "scheduler" && !ph.RunEnded.IsZero() {
		ph.End = ph.RunEnded
	}
	ph.Seconds = ph.End.Sub(ph.Start).Seconds()
	stopSampling()
	ph.IO = <-ioc
	ph.DeviceIdle, ph.DeviceBackup = deviceWindow(b.ds, ph.IdleFrom, ph.IdleTo), deviceWindow(b.ds, ph.Start, ph.End)
	if metc != nil {
		ph.Metrics = <-metc
	}
	if err != nil {
		return err
	}
	logf("%s: every VM protected in %.1f s", strategy, ph.Seconds)
	settle(ctx, 2*time.Second) // the trailing samples of the plot
	ph.FioEnd = time.Now()
	samples, err := stopFio()
	fios = nil
	if err != nil {
		return err
	}
	if srv != nil {
		srv.stop()
		ph.Decisions = srv.decisions()
		ph.ServerLog = srv.logRel
	}
	if err := b.snapshots(ctx, strategy, repoDir, ph); err != nil {
		return err
	}
	for _, v := range ph.VMs {
		if v.End.After(ph.Stored) {
			ph.Stored = v.End
		}
	}
	ph.StoredSeconds = ph.Stored.Sub(ph.Start).Seconds()
	for i, vg := range b.guests {
		gp := GuestPhase{Guest: vg.name}
		gp.Idle = window(samples[i], ph.IdleFrom, ph.IdleTo)
		gp.Backup = window(samples[i], ph.Start, ph.End)
		gp.UntilStored = window(samples[i], ph.Start, ph.Stored)
		gp.series = samples[i]
		ph.Guests = append(ph.Guests, gp)
		logf("%s: %s idle p50 %.2f p99 %.2f ms; during the backups p50 %.2f p99 %.2f ms (%d I/Os)", strategy, vg.name,
			gp.Idle.All.P50, gp.Idle.All.P99, gp.Backup.All.P50, gp.Backup.All.P99, gp.Backup.All.N)
	}
	if srv != nil {
		ph.Steps = parseSteps(srv.logPath)
		ph.StepStats = stepStats(ph.Steps, ph.Guests, b.ds)
	}
	if !b.cfg.Keep {
		os.RemoveAll(repoDir)
	}
	return nil
}

// medianLeadInP99 is the median, over the phases so far, of the highest
// guest p99 in each phase's idle lead-in (the lower middle one for an even
// count: a lead-in disturbed by other work on the machine should not raise
// the threshold), 0 if none.
func (b *bench) medianLeadInP99() float64 {
	var v []float64
	for _, p := range b.res.Phases {
		var m float64
		for _, g := range p.Guests {
			m = max(m, g.Idle.All.P99)
		}
		if m > 0 {
			v = append(v, m)
		}
	}
	if len(v) == 0 {
		return 0
	}
	sort.Float64s(v)
	return v[(len(v)-1)/2]
}

// eachGuest runs f for every guest at once and returns the first error.
func (b *bench) eachGuest(f func(i int, vg *vmGuest) error) error {
	errs := make([]error, len(b.guests))
	var wg sync.WaitGroup
	for i, vg := range b.guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(i, vg)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func settle(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// kura runs the kura binary (password from the bench's file), its output
// in logs/NAME.log; a non-zero exit is an error with the end of it.
// bandwidthLine is the limits.bandwidth line of the server's config.
func bandwidthLine(rate string) string {
	if rate == "" {
		return ""
	}
	return "  bandwidth: " + rate + "\n"
}

// readSizeLine is the latency.read_size line of the server's config.
func readSizeLine(size string) string {
	if size == "" {
		return ""
	}
	return "  read_size: " + size + "\n"
}

// scratchDir is kura's scratch directory: /var/tmp, off the datastore,
// or with BENCH_SCHED_SCRATCH=datastore a directory on it (the fleece
// method's copy-before-write images and the overlay method's overlays,
// which take the guests' writes during a backup, then share its budget).
func (b *bench) scratchDir() string {
	if !b.cfg.ScratchOnDatastore {
		return "/var/tmp"
	}
	dir := filepath.Join(b.disks, "scratch")
	os.MkdirAll(dir, 0o755)
	return dir
}

func (b *bench) kura(ctx context.Context, name string, args ...string) (string, error) {
	full := append(append([]string{"--password-file", b.pwFile}, b.cfg.KuraFlags...), args...)
	logf("%s: kura %s", name, strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, b.cfg.Kura, full...)
	if b.nice {
		cmd = exec.CommandContext(ctx, "nice", append([]string{"-n", "19", b.cfg.Kura}, full...)...)
	}
	out, err := cmd.CombinedOutput()
	os.WriteFile(filepath.Join(b.cfg.Out, "logs", name+".log"), out, 0o644)
	if err != nil {
		return string(out), fmt.Errorf("kura %s: %v\n%s", strings.Join(args, " "), err, benchutil.LastLines(string(out), 15))
	}
	return string(out), nil
}

// snapshots records each VM's restore point of the phase (kura snapshots
// --json): when its backup ran, what it read, and that it was full.
func (b *bench) snapshots(ctx context.Context, strategy, repoDir string, ph *Phase) error {
	out, err := b.kura(ctx, "snapshots-"+strategy, "-r", repoDir, "snapshots", "--json")
	if err != nil {
		return err
	}
	var ss []struct {
		Name  string `json:"name"`
		Kind  string `json:"kind"`
		Mode  string `json:"mode"`
		Stats struct {
			Start     time.Time `json:"start"`
			End       time.Time `json:"end"`
			BytesRead int64     `json:"bytes_read"`
			Freeze    float64   `json:"freeze_ms"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(out), &ss); err != nil {
		return fmt.Errorf("kura snapshots --json: %w", err)
	}
	for _, vg := range b.guests {
		found := false
		for _, s := range ss {
			if s.Name != vg.name {
				continue
			}
			found = true
			ph.VMs = append(ph.VMs, VMBackup{VM: vg.name, Kind: s.Kind, Mode: s.Mode, Start: s.Stats.Start, End: s.Stats.End,
				Seconds: s.Stats.End.Sub(s.Stats.Start).Seconds(), BytesRead: s.Stats.BytesRead, FreezeMS: s.Stats.Freeze})
		}
		if !found {
			return fmt.Errorf("no restore point of %s in %s", vg.name, repoDir)
		}
	}
	return nil
}

// server is a `kura server` of the scheduler phase.
type server struct {
	b        *bench
	cfgPath  string
	listen   string
	cmd      *exec.Cmd
	logPath  string
	logRel   string
	done     chan struct{}
	stopOnce sync.Once
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startServer writes the daemon's configuration (one repository, one job
// selecting every guest, the limits and latency control of the phase) and
// starts it.
func (b *bench) startServer(ctx context.Context, strategy, repoDir string, ph *Phase) (*server, error) {
	listen, err := freePort()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(b.work, "server-"+strategy)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`# written by bench/schedbench for the %s phase
repositories:
  bench:
    path: %s
    password_file: %s
libvirt:
  connect: qemu:///system
  scratch_dir: %s
limits:
  per_host: %d
  per_datastore: %d
  per_repository: %d
%slatency:
  threshold: %s
  interval: %s
  min_rate: %s
  increase: %s
  read_window: %t
  max_reads: %d
%sjobs:
  - name: bench
    repository: bench
    vms: ["kura-sched-%d-g*"]
    capture: %s
    schedule: "0 3 * * *"
    retry: {attempts: 1}
server:
  listen: %s
  state_dir: %s
  log_format: text
`, strategy, repoDir, b.pwFile, b.scratchDir(), ph.PerHost, ph.PerDatastore, max(ph.PerHost, ph.PerDatastore), bandwidthLine(b.cfg.Bandwidth),
		time.Duration(ph.ThresholdMS*float64(time.Millisecond)).Round(10*time.Microsecond),
		time.Duration(b.cfg.IntervalS*float64(time.Second)), b.cfg.MinRate, b.cfg.Increase, b.cfg.ReadWindow, b.cfg.MaxReads, readSizeLine(b.cfg.ReadSize), os.Getpid(), ph.Capture, listen, filepath.Join(dir, "state"))
	s := &server{b: b, cfgPath: filepath.Join(dir, "kura.yaml"), listen: listen, done: make(chan struct{}),
		logRel: filepath.Join("logs", "server-"+strategy+".log")}
	s.logPath = filepath.Join(b.cfg.Out, s.logRel)
	if err := os.WriteFile(s.cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	os.WriteFile(filepath.Join(b.cfg.Out, "logs", "server-"+strategy+".yaml"), []byte(cfg), 0o644)
	ph.ServerConfig = cfg
	lf, err := os.Create(s.logPath)
	if err != nil {
		return nil, err
	}
	// -v: the merge steps are logged at debug level (parseSteps).
	args := append(append([]string{}, b.cfg.KuraFlags...), "-v", "server", "--config", s.cfgPath)
	s.cmd = exec.Command(b.cfg.Kura, args...)
	if b.nice {
		s.cmd = exec.Command("nice", append([]string{"-n", "19", b.cfg.Kura}, args...)...)
	}
	s.cmd.Stdout, s.cmd.Stderr = lf, lf
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	logf("%s: kura %s (threshold %.2f ms, per_host %d, per_datastore %d)", strategy, strings.Join(args, " "), ph.ThresholdMS, ph.PerHost, ph.PerDatastore)
	if err := s.cmd.Start(); err != nil {
		lf.Close()
		return nil, err
	}
	go func() {
		s.cmd.Wait()
		lf.Close()
		close(s.done)
	}()
	for end := time.Now().Add(60 * time.Second); ; {
		resp, err := http.Get("http://" + listen + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return s, nil
			}
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("kura server exited at start:\n%s", benchutil.LastLines(benchutil.ReadFile(s.logPath), 15))
		case <-ctx.Done():
			s.stop()
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(end) {
			s.stop()
			return nil, fmt.Errorf("kura server did not answer on %s within 60 s:\n%s", listen, benchutil.LastLines(benchutil.ReadFile(s.logPath), 15))
		}
	}
}

// stop ends the server (SIGTERM, then SIGKILL after 30 s).
func (s *server) stop() {
	s.stopOnce.Do(func() {
		select {
		case <-s.done:
			return
		default:
		}
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(30 * time.Second):
			s.cmd.Process.Kill()
			<-s.done
		}
	})
}

type catalogRun struct {
	ID      int64
	Status  string
	Summary string
	Started time.Time
	Ended   time.Time
}

func (s *server) runs(ctx context.Context) ([]catalogRun, error) {
	out, err := exec.CommandContext(ctx, s.b.cfg.Kura, "runs", "--config", s.cfgPath, "--json").Output()
	if err != nil {
		return nil, fmt.Errorf("kura runs: %w", err)
	}
	var r []catalogRun
	return r, json.Unmarshal(out, &r)
}

// runNow starts the job and waits until the catalog shows the run ended.
func (s *server) runNow(ctx context.Context, ph *Phase) error {
	before, _ := s.runs(ctx)
	out, err := exec.CommandContext(ctx, s.b.cfg.Kura, "run-now", "bench", "--config", s.cfgPath).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kura run-now: %v: %s", err, out)
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return fmt.Errorf("kura server exited during the run:\n%s", benchutil.LastLines(benchutil.ReadFile(s.logPath), 15))
		case <-time.After(500 * time.Millisecond):
		}
		runs, err := s.runs(ctx)
		if err != nil || len(runs) <= len(before) {
			continue
		}
		r := runs[0]
		if r.Status == "running" {
			continue
		}
		ph.RunStatus, ph.RunSummary, ph.RunEnded = r.Status, r.Summary, r.Ended
		logf("%s: run %d %s: %s", ph.Strategy, r.ID, r.Status, r.Summary)
		if r.Status != "succeeded" {
			return fmt.Errorf("the server's run ended %s: %s (see %s)", r.Status, r.Summary, s.logPath)
		}
		return nil
	}
}

// metricSample is the daemon's view of the datastore at one moment
// (from /metrics).
type metricSample struct {
	At        time.Time `json:"at"`
	LatencyMS float64   `json:"guest_latency_ms"` // the controller's smoothed signal
	RateMiBs  float64   `json:"rate_mib_s"`       // sum of the backups' read limits, 0: unlimited
	Paused    bool      `json:"paused"`
	Running   int       `json:"running"`
}

func (s *server) sampleMetrics(ctx context.Context) <-chan []metricSample {
	out := make(chan []metricSample, 1)
	go func() {
		var ms []metricSample
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				out <- ms
				return
			case now := <-tick.C:
				if m, ok := s.metrics(ctx); ok {
					m.At = now
					ms = append(ms, m)
				}
			}
		}
	}()
	return out
}

func (s *server) metrics(ctx context.Context) (metricSample, bool) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.listen+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return metricSample{}, false
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var m metricSample
	for _, line := range strings.Split(string(body), "\n") {
		name, val, ok := metricLine(line)
		if !ok {
			continue
		}
		switch name {
		case "kura_datastore_guest_latency_milliseconds":
			m.LatencyMS = max(m.LatencyMS, val)
		case "kura_datastore_backup_rate_bytes_per_second":
			m.RateMiBs += val / MiB
		case "kura_datastore_paused":
			m.Paused = m.Paused || val > 0
		case "kura_backups_running":
			m.Running = int(val)
		}
	}
	return m, true
}

// metricLine splits a Prometheus text line into its name (labels dropped)
// and value.
func metricLine(line string) (string, float64, bool) {
	if line == "" || line[0] == '#' {
		return "", 0, false
	}
	i := strings.LastIndexByte(line, ' ')
	if i < 0 {
		return "", 0, false
	}
	v, err := strconv.ParseFloat(line[i+1:], 64)
	if err != nil {
		return "", 0, false
	}
	name := line[:i]
	if j := strings.IndexByte(name, '{'); j >= 0 {
		name = name[:j]
	}
	return name, v, true
}

// decisions returns the daemon's "latency control" log lines.
func (s *server) decisions() []string {
	var out []string
	scanLog(s.logPath, func(line string) {
		if strings.Contains(line, `msg="latency control"`) {
			out = append(out, line)
		}
	})
	return out
}

// scanLog calls f with every line of the log file path (none if it cannot
// be read).
func scanLog(path string, f func(line string)) {
	file, err := os.Open(path)
	if err != nil {
		return
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f(sc.Text())
	}
}
