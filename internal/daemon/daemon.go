// Package daemon is `kura server`: it protects every VM its configuration
// names, on schedule, under the host's limits, while watching the I/O
// latency the guests see and slowing backups down when they hurt it.
//
// The pieces are elsewhere and small: internal/config reads the file,
// internal/schedule decides what runs when, internal/throttle turns
// latency samples into read rates, internal/catalog keeps the history,
// internal/metrics serves /metrics. The daemon wires them to libvirt and
// the repositories, and runs the backups, and the copy jobs that copy
// restore points between repositories with internal/repocopy (copy.go).
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kura-backup/kura/internal/backup"
	"github.com/kura-backup/kura/internal/catalog"
	"github.com/kura-backup/kura/internal/config"
	"github.com/kura-backup/kura/internal/metrics"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/retention"
	"github.com/kura-backup/kura/internal/schedule"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/source/libvirt"
	"github.com/kura-backup/kura/internal/throttle"
)

// Options tune a Daemon.
type Options struct {
	ConfigPath string
	Logger     *slog.Logger
	// LockDir holds the per-VM lock files that keep two daemons (or a
	// daemon and `kura backup vm`) from backing up one VM at once.
	// Default /run/kura/vm.
	LockDir string
}

// Daemon is a running `kura server`.
type Daemon struct {
	opts Options
	log  *slog.Logger
	reg  *metrics.Registry
	m    daemonMetrics

	mu            sync.Mutex
	cfg           *config.Config
	store         catalog.Store
	sched         *schedule.Scheduler
	conn          *libvirt.Conn
	repos         map[string]*repo.Repo
	domains       map[string]libvirt.DomainInfo // by name
	vmStore       map[string]string             // VM -> datastore
	devOf         map[string]string             // datastore -> /proc/diskstats device ("" if none)
	ctrls         map[string]*throttle.Controller
	windows       map[string]*throttle.Window    // per datastore, with its controller
	windowChanges map[string]uint64              // last logged Window changes
	prevBlk       map[string]throttle.BlockStats // "vm/target" -> last counters
	lastSample    map[string]time.Time           // per datastore: when its guests were last sampled
	prevDev       map[string]throttle.DiskStats
	active        map[string]int          // datastore -> running backups
	hold          map[string]time.Time    // datastore -> no new backup before (latency control)
	runIDs        map[string]int64        // job + due -> catalog run id
	outcomes      map[string]*taskOutcome // job + due + vm -> the latest attempt's details
	cancel        map[string]context.CancelFunc
	copies        map[string]*copyState         // by copy job
	copyBusy      map[string]string             // target repository -> the copy job writing to it
	snapCache     map[string]map[string]snapSum // repository id -> snapshot id -> summary (copy jobs)
	statusSeq     uint64                        // readings of copy jobs' status, counted
	wake          chan struct{}
	wg            sync.WaitGroup
}

type taskOutcome struct {
	snapshot       string
	started, ended time.Time
	read, stored   int64
	freezeMs       float64
	err            error
}

type daemonMetrics struct {
	lastSuccess, duration, bytesRead, bytesStored, freeze *metrics.Vec
	runs, errs, decisions                                 *metrics.Vec
	latency, rate, paused, queue, running                 *metrics.Vec
	window                                                *metrics.Vec
	copyPending, copyNewest, copyRuns, copyBytes          *metrics.Vec
	copyDuration, copyLastSuccess                         *metrics.Vec
}

// New prepares a daemon from the configuration file; Run starts it.
func New(opts Options) (*Daemon, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.LockDir == "" {
		opts.LockDir = "/run/kura/vm"
	}
	cfg, err := config.Load(opts.ConfigPath)
	if err != nil {
		return nil, err
	}
	reg := metrics.New()
	d := &Daemon{
		opts: opts, log: opts.Logger, reg: reg, cfg: cfg,
		repos: map[string]*repo.Repo{}, ctrls: map[string]*throttle.Controller{}, windows: map[string]*throttle.Window{}, windowChanges: map[string]uint64{}, lastSample: map[string]time.Time{},
		prevBlk: map[string]throttle.BlockStats{}, prevDev: map[string]throttle.DiskStats{},
		active: map[string]int{}, hold: map[string]time.Time{}, runIDs: map[string]int64{}, outcomes: map[string]*taskOutcome{},
		cancel: map[string]context.CancelFunc{}, wake: make(chan struct{}, 1),
		copies: map[string]*copyState{}, copyBusy: map[string]string{}, snapCache: map[string]map[string]snapSum{},
		m: daemonMetrics{
			lastSuccess: reg.Gauge("kura_backup_last_success_timestamp_seconds", "When the VM's last successful backup started (Unix time).", "vm"),
			duration:    reg.Gauge("kura_backup_duration_seconds", "How long the VM's last backup took.", "vm"),
			bytesRead:   reg.Gauge("kura_backup_bytes_read", "Bytes the VM's last backup read.", "vm"),
			bytesStored: reg.Gauge("kura_backup_bytes_stored", "Bytes the VM's last backup stored (new, compressed, encrypted).", "vm"),
			freeze:      reg.Gauge("kura_backup_freeze_window_milliseconds", "The freeze window of the VM's last backup.", "vm"),
			runs:        reg.Counter("kura_backups_total", "Backups attempted, by VM and result.", "vm", "result"),
			errs:        reg.Counter("kura_errors_total", "Errors by kind.", "kind"),
			decisions:   reg.Counter("kura_throttle_decisions_total", "Latency control decisions, by datastore and action.", "datastore", "action"),
			latency:     reg.Gauge("kura_datastore_guest_latency_milliseconds", "Smoothed I/O latency the guests on the datastore see.", "datastore"),
			rate:        reg.Gauge("kura_datastore_backup_rate_bytes_per_second", "Sum of the read rate limits of the backups on the datastore (0: unlimited).", "datastore"),
			paused:      reg.Gauge("kura_datastore_paused", "1 while latency control holds new backups on the datastore.", "datastore"),
			window:      reg.Gauge("kura_datastore_backup_reads_limit", "Backup reads allowed in flight on the datastore at once (adapted to stay below its queueing point).", "datastore"),
			queue:       reg.Gauge("kura_queue_length", "VMs due and waiting to start."),
			running:     reg.Gauge("kura_backups_running", "Backups running now."),

			// Copy jobs' series are labelled copy_job, not job: Prometheus
			// gives every series it scrapes a job label of its own (the
			// scrape job's), and renames an exposed job label exported_job.
			copyPending:     reg.Gauge("kura_copy_pending_restore_points", "Restore points of the VM that the copy job selects in its source and its target lacks.", "copy_job", "vm"),
			copyNewest:      reg.Gauge("kura_copy_newest_timestamp_seconds", "When the newest restore point of the VM in the copy job's target was taken (Unix time; 0: none).", "copy_job", "vm"),
			copyRuns:        reg.Counter("kura_copy_runs_total", "Runs of the copy job, by status (succeeded, partial, failed, interrupted).", "copy_job", "status"),
			copyBytes:       reg.Counter("kura_copy_bytes_sent_total", "Bytes the copy job sent to its target (stored size: compressed, encrypted).", "copy_job"),
			copyDuration:    reg.Gauge("kura_copy_duration_seconds", "How long the copy job's last run took.", "copy_job"),
			copyLastSuccess: reg.Gauge("kura_copy_last_success_timestamp_seconds", "When the copy job's last successful run started (Unix time).", "copy_job"),
		},
	}
	return d, nil
}

// Metrics is the daemon's metrics registry.
func (d *Daemon) Metrics() *metrics.Registry { return d.reg }

// Run serves until ctx ends: it records runs the last daemon left as
// interrupted, cleans up what dead backups left in libvirt, starts the
// HTTP endpoint, and runs the schedule. When ctx ends it cancels the
// running backups (each releases its VM) and returns.
func (d *Daemon) Run(ctx context.Context) error {
	cfg := d.cfg
	if err := setNice(*cfg.Limits.Nice); err != nil {
		return fmt.Errorf("%w: run kura server as root or raise limits.nice", err)
	}
	if err := os.MkdirAll(cfg.Server.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	store, err := catalog.Open(ctx, cfg.Server.Catalog)
	if err != nil {
		return err
	}
	defer store.Close()
	d.store = store
	if n, err := store.MarkInterrupted(ctx, time.Now()); err != nil {
		return err
	} else if n > 0 {
		d.log.Warn("runs of the previous daemon were interrupted", "runs", n)
	}
	defer func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.conn != nil {
			d.conn.Close()
		}
	}()
	jobs, err := d.resolve(ctx, cfg)
	if err != nil {
		return err
	}
	for name := range d.domains {
		if v, err := d.conn.VM(ctx, name); err == nil {
			if err := v.(*libvirt.VM).ClearStale(ctx); err != nil {
				d.log.Warn("could not clear a stale backup job", "vm", name, "err", err)
			}
		}
	}
	sched, err := schedule.New(jobs, limits(cfg), schedule.SystemClock{})
	if err != nil {
		return fmt.Errorf("%s: %w", d.opts.ConfigPath, err)
	}
	d.sched = sched
	d.mu.Lock()
	d.reconcileCopiesLocked(cfg, time.Now())
	d.mu.Unlock()
	if !cfg.Latency.Disabled && cfg.Latency.Threshold.Duration > 0 {
		// Backups start on a datastore one at a time, each after the
		// controller has seen what the previous one did (see holdAfterStart).
		sched.SetStagger(1)
	}

	l, err := net.Listen("tcp", cfg.Server.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s (server.listen): %w", cfg.Server.Listen, err)
	}
	srv := &http.Server{Handler: d.handler(), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	defer srv.Close()
	d.log.Info("kura server started", "config", d.opts.ConfigPath, "jobs", len(jobs), "copies", len(cfg.Copies), "listen", l.Addr().String(), "catalog", cfg.Server.Catalog)
	d.refreshCopies(ctx, "", "")

	tick := time.NewTicker(cfg.Latency.Interval.Duration)
	defer tick.Stop()
	refresh := time.NewTicker(5 * time.Minute)
	defer refresh.Stop()
	for {
		d.startReady(ctx)
		d.collectReports(ctx)
		d.startCopies(ctx)
		next := d.sched.Next()
		if c := d.nextCopy(); !c.IsZero() && (next.IsZero() || c.Before(next)) {
			next = c
		}
		wait := time.Until(next)
		if wait > time.Hour || next.IsZero() {
			wait = time.Hour
		}
		timer := time.NewTimer(max(wait, 10*time.Millisecond))
		select {
		case <-ctx.Done():
			timer.Stop()
			d.shutdown()
			return nil
		case <-timer.C:
		case <-d.wake:
		case <-tick.C:
			d.sampleLatency(ctx)
		case <-refresh.C:
			d.Reload(ctx, false)
		}
		timer.Stop()
	}
}

// poke wakes the main loop.
func (d *Daemon) poke() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

func limits(c *config.Config) schedule.Limits {
	return schedule.Limits{PerHost: c.Limits.PerHost, PerDatastore: c.Limits.PerDatastore, PerRepository: c.Limits.PerRepository}
}

// connect connects to libvirt, the first time it is needed: a
// configuration with copy jobs only (a host that keeps copies of
// repositories) needs no libvirtd.
func (d *Daemon) connect(ctx context.Context, cfg *config.Config) (*libvirt.Conn, error) {
	d.mu.Lock()
	conn := d.conn
	d.mu.Unlock()
	if conn != nil {
		return conn, nil
	}
	conn, err := libvirt.ConnectWithOptions(ctx, cfg.Libvirt.Connect, libvirt.Options{ScratchDir: cfg.Libvirt.ScratchDir})
	if err != nil {
		return nil, err
	}
	for _, p := range libvirt.SweepScratch(cfg.Libvirt.ScratchDir) {
		d.log.Info("removed a scratch directory of a dead kura process", "dir", p)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.conn != nil { // two reloads at once
		conn.Close()
		return d.conn, nil
	}
	d.conn = conn
	return conn, nil
}

// resolve lists libvirt's domains and turns the configuration's jobs into
// scheduler jobs: which VMs each selects, where their disks are, and when
// each was last backed up (from the repositories, the source of truth).
func (d *Daemon) resolve(ctx context.Context, cfg *config.Config) ([]schedule.Job, error) {
	if len(cfg.Jobs) == 0 {
		d.mu.Lock()
		d.domains, d.vmStore, d.devOf = map[string]libvirt.DomainInfo{}, map[string]string{}, map[string]string{}
		d.mu.Unlock()
		return nil, nil
	}
	conn, err := d.connect(ctx, cfg)
	if err != nil {
		return nil, err
	}
	doms, err := conn.Domains(ctx)
	if err != nil {
		return nil, err
	}
	byName := map[string]libvirt.DomainInfo{}
	vmStore := map[string]string{}
	devOf := map[string]string{}
	for _, dom := range doms {
		byName[dom.Name] = dom
		ds, dev := "none", ""
		if len(dom.Disks) > 0 {
			ds, dev = datastoreOf(dom.Disks[0].Path)
		}
		vmStore[dom.Name] = ds
		devOf[ds] = dev
	}
	var jobs []schedule.Job
	for _, j := range cfg.Jobs {
		r, err := d.openRepo(ctx, cfg, j.Repository)
		if err != nil {
			return nil, err
		}
		last, err := d.lastSnapshots(ctx, j.Repository, r)
		if err != nil {
			return nil, err
		}
		sj := schedule.Job{Name: j.Name, Repository: j.Repository, Mode: j.Mode, Schedule: j.Schedule, RPO: j.RPO.Duration,
			Retry: schedule.RetryPolicy{MaxAttempts: j.Retry.Attempts, InitialDelay: j.Retry.Backoff.Duration}}
		if j.Window != nil {
			sj.Window = &schedule.Window{Start: j.Window.StartOfDay, Duration: j.Window.Duration.Duration}
		}
		for _, dom := range doms {
			if selects(j, dom) {
				sj.VMs = append(sj.VMs, schedule.VM{Name: dom.Name, Datastore: vmStore[dom.Name], LastSuccess: last[dom.Name]})
			}
		}
		if len(sj.VMs) == 0 {
			d.log.Warn("job selects no VM", "job", j.Name)
		}
		jobs = append(jobs, sj)
	}
	d.mu.Lock()
	d.domains, d.vmStore, d.devOf = byName, vmStore, devOf
	d.mu.Unlock()
	return jobs, nil
}

// selects reports whether job j backs up domain dom.
func selects(j *config.Job, dom libvirt.DomainInfo) bool {
	if j.All {
		return true
	}
	for _, g := range j.VMs {
		if ok, _ := path.Match(g, dom.Name); ok {
			return true
		}
	}
	for _, t := range j.Tags {
		if slices.Contains(dom.Tags, t) {
			return true
		}
	}
	return false
}

// lastSnapshots returns the time of each VM's newest restore point in
// repository name. The repository stays the source of truth: its snapshot
// ids are listed every time, but only the snapshots the catalog's cache
// does not hold yet are read and decrypted (a snapshot never changes once
// written), and the cache is then brought up to date.
func (d *Daemon) lastSnapshots(ctx context.Context, name string, r *repo.Repo) (map[string]time.Time, error) {
	ids, err := r.SnapshotIDs(ctx)
	if err != nil {
		return nil, err
	}
	cached, err := d.store.Snapshots(ctx, name)
	if err != nil {
		d.log.Warn("reading the catalog's snapshot cache; reading the repository's", "repository", name, "err", err)
	}
	byID := map[string]catalog.SnapshotInfo{}
	for _, s := range cached {
		byID[s.ID] = s
	}
	list := make([]catalog.SnapshotInfo, 0, len(ids))
	changed := len(cached) != len(ids)
	for _, id := range ids {
		if s, ok := byID[id]; ok {
			list = append(list, s)
			continue
		}
		changed = true
		s, err := r.LoadSnapshot(ctx, id)
		switch {
		case errors.Is(err, repo.ErrNoSnapshot):
			continue // forgotten meanwhile
		case errors.Is(err, repo.ErrDamaged):
			d.log.Warn("a snapshot of the repository is damaged: kura check tells more", "repository", name, "snapshot", id, "err", err)
			continue
		case err != nil:
			return nil, err
		}
		list = append(list, catalog.SnapshotInfo{Repository: name, ID: id, Name: s.Name, Time: s.Time, Kind: s.Kind, Mode: s.Mode, Bytes: s.Stats.BytesStored})
	}
	if changed {
		if err := d.store.ReplaceSnapshots(ctx, name, list); err != nil {
			d.log.Warn("updating the catalog's snapshot cache", "repository", name, "err", err)
		}
	}
	out := map[string]time.Time{}
	for _, s := range list {
		if s.Time.After(out[s.Name]) {
			out[s.Name] = s.Time
		}
	}
	return out, nil
}

func (d *Daemon) openRepo(ctx context.Context, cfg *config.Config, name string) (*repo.Repo, error) {
	d.mu.Lock()
	r := d.repos[name]
	d.mu.Unlock()
	if r != nil {
		return r, nil
	}
	r, err := d.dialRepo(ctx, cfg, name, 0)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.repos[name] = r
	d.mu.Unlock()
	return r, nil
}

// Reload rereads the configuration and the list of domains. Running
// backups go on; a configuration with errors is refused and the old one
// kept (the error is logged and returned).
func (d *Daemon) Reload(ctx context.Context, rereadConfig bool) error {
	cfg := d.cfg
	if rereadConfig {
		c, err := config.Load(d.opts.ConfigPath)
		if err != nil {
			d.log.Error("configuration not reloaded; the old one stays in force", "err", err)
			d.m.errs.Inc("config")
			return err
		}
		cfg = c
	}
	jobs, err := d.resolve(ctx, cfg)
	if err == nil {
		err = d.sched.Update(jobs)
	}
	if err != nil {
		d.log.Error("configuration not reloaded; the old one stays in force", "err", err)
		d.m.errs.Inc("config")
		return err
	}
	if *cfg.Limits.Nice != *d.cfg.Limits.Nice {
		if err := setNice(*cfg.Limits.Nice); err != nil {
			d.log.Error("the reloaded limits.nice is not in effect", "err", err)
		}
	}
	d.mu.Lock()
	d.cfg = cfg
	d.reconfigureControllers()
	d.reconcileCopiesLocked(cfg, time.Now())
	d.mu.Unlock()
	if rereadConfig {
		d.log.Info("configuration reloaded", "jobs", len(jobs))
	}
	d.poke()
	return nil
}

// RunNow starts a run of job, a backup job or a copy job, at once (kura
// run-now).
func (d *Daemon) RunNow(job string) error {
	d.mu.Lock()
	isCopy := d.cfg.CopyJob(job) != nil
	d.mu.Unlock()
	if isCopy {
		if err := d.runCopyNow(job); err != nil {
			return err
		}
		d.poke()
		return nil
	}
	if err := d.sched.RunNow(job); err != nil {
		return err
	}
	d.poke()
	return nil
}

func runKey(job string, due time.Time) string {
	return job + "\x00" + due.UTC().Format(time.RFC3339Nano)
}

// startReady starts the tasks the scheduler hands out.
func (d *Daemon) startReady(ctx context.Context) {
	tasks := d.sched.Ready()
	for _, t := range tasks {
		key := runKey(t.Job, t.Due)
		d.mu.Lock()
		id, ok := d.runIDs[key]
		d.mu.Unlock()
		if !ok {
			var err error
			id, err = d.store.StartRun(ctx, catalog.Run{Job: t.Job, Manual: t.Manual, Due: t.Due, Started: time.Now()})
			if err != nil {
				d.log.Error("recording a run in the catalog", "job", t.Job, "err", err)
				d.m.errs.Inc("catalog")
			}
			d.mu.Lock()
			d.runIDs[key] = id
			d.mu.Unlock()
		}
		d.holdAfterStart(t.Datastore)
		tctx, cancel := context.WithCancel(ctx)
		d.mu.Lock()
		d.cancel[t.VM+"\x00"+t.Job] = cancel
		d.active[t.Datastore]++
		d.m.running.Set(float64(d.runningLocked()))
		d.mu.Unlock()
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			defer cancel()
			d.runTask(tctx, t)
		}()
	}
}

func (d *Daemon) runningLocked() int {
	n := 0
	for _, c := range d.active {
		n += c
	}
	return n
}

// runTask backs up one VM and tells the scheduler how it went.
func (d *Daemon) runTask(ctx context.Context, t schedule.Task) {
	o := &taskOutcome{started: time.Now()}
	snap, notFound, err := d.backupVM(ctx, t)
	o.ended, o.err = time.Now(), err
	result := "ok"
	if err != nil {
		result = "error"
		d.m.errs.Inc(errorKind(err, notFound))
		d.log.Error("backup failed", "vm", t.VM, "job", t.Job, "attempt", t.Attempt, "err", err)
	} else {
		o.snapshot, o.read, o.stored, o.freezeMs = snap.ID, snap.Stats.BytesRead, snap.Stats.BytesStored, snap.Stats.FreezeMillis
		d.m.lastSuccess.Set(float64(t.Started.Unix()), t.VM)
		d.m.duration.Set(o.ended.Sub(o.started).Seconds(), t.VM)
		d.m.bytesRead.Set(float64(o.read), t.VM)
		d.m.bytesStored.Set(float64(o.stored), t.VM)
		d.m.freeze.Set(o.freezeMs, t.VM)
		d.log.Info("backup done", "vm", t.VM, "job", t.Job, "snapshot", snap.ID[:8], "kind", snap.Kind, "read", snap.Stats.BytesRead,
			"stored", snap.Stats.BytesStored, "took", o.ended.Sub(o.started).Round(time.Millisecond))
	}
	d.m.runs.Inc(t.VM, result)
	d.mu.Lock()
	d.outcomes[runKey(t.Job, t.Due)+"\x00"+t.VM] = o
	d.active[t.Datastore]--
	delete(d.cancel, t.VM+"\x00"+t.Job)
	d.m.running.Set(float64(d.runningLocked()))
	d.mu.Unlock()
	if err := d.sched.Done(t, err, notFound); err != nil {
		d.log.Error("scheduler refused a result", "vm", t.VM, "err", err)
	}
	d.poke()
}

func errorKind(err error, notFound bool) string {
	switch {
	case notFound:
		return "vm_not_found"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	case errors.Is(err, repo.ErrLocked):
		return "repository_locked"
	case errors.Is(err, errVMBusy):
		return "vm_busy"
	}
	return "backup"
}

var errVMBusy = errors.New("another kura process is backing up this VM")

func (d *Daemon) backupVM(ctx context.Context, t schedule.Task) (*repo.Snapshot, bool, error) {
	unlock, err := lockVM(d.opts.LockDir, t.VM)
	if err != nil {
		return nil, false, err
	}
	defer unlock()
	d.mu.Lock()
	cfg := d.cfg
	d.mu.Unlock()
	r, err := d.openRepo(ctx, cfg, t.Repository)
	if err != nil {
		return nil, false, err
	}
	d.mu.Lock()
	conn := d.conn
	d.mu.Unlock()
	vm, err := conn.VM(ctx, t.VM)
	if err != nil {
		return nil, errors.Is(err, source.ErrNotFound), err
	}
	lim := throttle.NewLimiter(float64(cfg.Limits.BandwidthBytes), nil)
	id := t.VM + "/" + t.Job
	var win *throttle.Window
	ctrl := d.controller(t.Datastore)
	if ctrl != nil {
		ctrl.Attach(id, lim)
		defer ctrl.Detach(id)
	}
	if (ctrl != nil && cfg.Latency.ReadWindow) || cfg.Latency.MaxReads > 0 {
		win = d.window(t.Datastore)
	}
	mode := t.Mode
	if mode == source.ModeApp {
		mode = "" // app when the agent answers, crash with a warning otherwise
	}
	method := ""
	if j := cfg.Job(t.Job); j != nil {
		method = j.Capture
	}
	// Once the restore point is stored, the next VM may start while this
	// one releases its capture (the overlay method's merge).
	stored := func(snap *repo.Snapshot) {
		if err := d.sched.Stored(t); err != nil {
			d.log.Error("scheduler refused a stored restore point", "vm", t.VM, "err", err)
			return
		}
		d.log.Debug("restore point stored; releasing the capture", "vm", t.VM, "job", t.Job, "snapshot", snap.ID[:8])
		d.poke()
	}
	snap, err := backup.RunVM(ctx, r, vm, backup.VMOptions{Mode: mode, Method: method, Source: "libvirt", Stored: stored,
		Options: backup.Options{Logger: d.log, ReadGate: throttle.ReadGate(lim, win), ReadSize: int(cfg.Latency.ReadSizeBytes), Tags: map[string]string{"job": t.Job}}})
	if err != nil {
		return nil, false, err
	}
	d.applyRetention(ctx, cfg, r, t)
	return snap, false, nil
}

// applyRetention forgets the VM's restore points the job's policy does not
// keep (prune, which frees space, is left to `kura prune`).
func (d *Daemon) applyRetention(ctx context.Context, cfg *config.Config, r *repo.Repo, t schedule.Task) {
	var policy retention.Policy
	if j := cfg.Job(t.Job); j != nil {
		policy = j.Retention.Policy()
	}
	if policy.Empty() {
		return
	}
	ss, _, err := r.SnapshotsLenient(ctx)
	if err != nil {
		d.log.Error("retention: listing snapshots", "vm", t.VM, "err", err)
		return
	}
	var items []retention.Item
	for _, s := range ss {
		if s.Name == t.VM {
			items = append(items, retention.Item{ID: s.ID, Time: s.Time})
		}
	}
	for _, dec := range retention.Apply(items, policy, time.Local) {
		if dec.Keep {
			continue
		}
		if err := r.RemoveSnapshot(ctx, dec.ID); err != nil {
			d.log.Error("retention: forgetting a snapshot", "vm", t.VM, "snapshot", dec.ID[:8], "err", err)
			return
		}
		d.log.Info("retention: forgot a snapshot", "vm", t.VM, "snapshot", dec.ID[:8], "time", dec.Time)
	}
}

// lockVM takes the host-wide lock of one VM's backups, failing at once if
// another process holds it.
func lockVM(dir, vm string) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, vm+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("VM %s: %w (lock %s)", vm, errVMBusy, f.Name())
	}
	return func() { f.Close() }, nil
}

// collectReports records finished runs in the catalog and notifies about
// failed ones.
func (d *Daemon) collectReports(ctx context.Context) {
	for _, rep := range d.sched.Reports() {
		key := runKey(rep.Job, rep.Due)
		d.mu.Lock()
		id, ok := d.runIDs[key]
		delete(d.runIDs, key)
		d.mu.Unlock()
		if !ok { // nothing ever started: record the run now
			var err error
			if id, err = d.store.StartRun(ctx, catalog.Run{Job: rep.Job, Manual: rep.Manual, Due: rep.Due, Started: rep.Due}); err != nil {
				d.log.Error("recording a run in the catalog", "job", rep.Job, "err", err)
				continue
			}
		}
		ok2, total := 0, len(rep.VMs)
		var notes []string
		for _, v := range rep.VMs {
			o := d.takeOutcome(key + "\x00" + v.VM)
			r := catalog.VMResult{RunID: id, VM: v.VM, Datastore: v.Datastore, Outcome: strings.ReplaceAll(v.Outcome.String(), " ", "-"),
				Attempts: v.Attempts, Reason: v.Reason}
			if o != nil {
				r.Started, r.Ended = o.started, o.ended
				if v.Outcome == schedule.Succeeded {
					r.Snapshot, r.BytesRead, r.BytesStored, r.FreezeMs = o.snapshot, o.read, o.stored, o.freezeMs
				}
			}
			if v.Outcome == schedule.Succeeded {
				ok2++
			} else {
				notes = append(notes, v.VM+": "+v.Reason)
			}
			if err := d.store.AddVMResult(ctx, r); err != nil {
				d.log.Error("recording a VM result in the catalog", "vm", v.VM, "err", err)
			}
		}
		status := catalog.StatusSucceeded
		switch {
		case total > 0 && ok2 == 0:
			status = catalog.StatusFailed
		case ok2 < total:
			status = catalog.StatusPartial
		}
		summary := fmt.Sprintf("%d of %d VMs backed up", ok2, total)
		if len(notes) > 0 {
			summary += "; " + strings.Join(notes, "; ")
		}
		if err := d.store.FinishRun(ctx, id, rep.Finished, status, summary); err != nil {
			d.log.Error("recording a run in the catalog", "job", rep.Job, "err", err)
		}
		d.log.Info("run finished", "job", rep.Job, "status", status, "summary", summary)
		if status != catalog.StatusSucceeded {
			d.notify(ctx, rep.Job, id, status, summary)
		}
		// Copy jobs that follow this job run now, whatever its status:
		// the restore points it did make are worth copying, and copying
		// is idempotent. Those of its repository that run on their own
		// schedule get their pending counts updated.
		d.copiesAfter(rep.Job)
		d.mu.Lock()
		repository := ""
		if j := d.cfg.Job(rep.Job); j != nil {
			repository = j.Repository
		}
		d.mu.Unlock()
		if repository != "" {
			d.refreshCopies(ctx, repository, rep.Job)
		}
	}
	d.m.queue.Set(float64(d.sched.Waiting()))
}

func (d *Daemon) takeOutcome(key string) *taskOutcome {
	d.mu.Lock()
	defer d.mu.Unlock()
	o := d.outcomes[key]
	delete(d.outcomes, key)
	return o
}

// shutdown cancels the running backups and waits for them to release
// their VMs.
func (d *Daemon) shutdown() {
	d.mu.Lock()
	for _, c := range d.cancel {
		c()
	}
	d.mu.Unlock()
	d.wg.Wait()
	d.log.Info("kura server stopped")
}
