package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kura-backup/kura/internal/backend/location"
	"github.com/kura-backup/kura/internal/catalog"
	"github.com/kura-backup/kura/internal/config"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/repocopy"
	"github.com/kura-backup/kura/internal/retention"
	"github.com/kura-backup/kura/internal/schedule"
	"github.com/kura-backup/kura/internal/units"
)

// Copy jobs copy restore points from one repository of the configuration
// to another, as `kura copy` does, after each run of a backup job or on a
// schedule of their own.
//
// They run beside the scheduler, not in it. The scheduler's tasks are VM
// backups and its limits are about them: per_host and per_datastore bound
// the reads from the guests' storage, which a copy never touches, and
// latency control watches the guests. per_repository bounds the backups
// writing into one repository; a copy writes too, but counting it there
// would let a long offsite copy (hours over a slow link) hold a slot that
// the nightly backups need, and backups must not wait for copies. So a
// copy takes no slot: instead at most one copy runs into a repository at
// once (a second copy job to the same target waits for the first), which
// adds at most one writer to what per_repository allows, and its upload
// can be limited (bandwidth). A copy job never runs twice at once: a
// trigger that comes while it runs (a backup run ended, its schedule fell
// due) is kept, and the copy runs again once it is done, so that restore
// points made meanwhile are copied too.

// copyState is what the daemon keeps about one copy job.
type copyState struct {
	spec    string       // the schedule next was computed from
	next    time.Time    // its next occurrence; zero for a job run after a backup job
	queued  *copyTrigger // a run that waits to start
	running bool
	vms     map[string]bool // the VMs whose gauges are set
	// status is the sequence number of the reading the gauges show: a
	// reading that started before it is not shown.
	status uint64
}

// copyTrigger is why a copy job is to run.
type copyTrigger struct {
	due    time.Time
	manual bool
	why    string
}

// reconcileCopiesLocked brings the copy jobs' states in line with cfg at
// now: new jobs get a state (and, on a schedule, their next occurrence),
// jobs whose schedule changed get a new occurrence, removed jobs lose
// their state and gauges (a running copy of a removed job finishes).
func (d *Daemon) reconcileCopiesLocked(cfg *config.Config, now time.Time) {
	seen := map[string]bool{}
	for _, j := range cfg.Copies {
		seen[j.Name] = true
		st := d.copies[j.Name]
		if st == nil {
			st = &copyState{vms: map[string]bool{}}
			d.copies[j.Name] = st
		}
		if j.Schedule != st.spec || (j.Schedule != "" && st.next.IsZero()) {
			st.spec, st.next = j.Schedule, time.Time{}
			if j.Schedule != "" {
				next, err := schedule.NextAfter(j.Schedule, now)
				if err != nil { // config.Load checked it
					d.log.Error("copy job schedule", "copy", j.Name, "err", err)
				}
				st.next = next
			}
		}
	}
	for name, st := range d.copies {
		if seen[name] {
			continue
		}
		d.deleteCopyGauges(name, st)
		if !st.running {
			delete(d.copies, name)
		}
		st.queued, st.next, st.spec = nil, time.Time{}, ""
	}
}

func (d *Daemon) deleteCopyGauges(name string, st *copyState) {
	for vm := range st.vms {
		d.m.copyPending.Delete(name, vm)
		d.m.copyNewest.Delete(name, vm)
	}
	st.vms = map[string]bool{}
}

// triggerCopyLocked asks for a run of copy job name; a run already
// waiting stays the one that runs.
func (d *Daemon) triggerCopyLocked(name string, t copyTrigger) {
	if st := d.copies[name]; st != nil && st.queued == nil {
		st.queued = &t
	}
}

// runCopyNow starts a run of copy job name now (kura run-now). Like a
// backup job's, it is refused while a run of the job is open (running or
// waiting for its target).
func (d *Daemon) runCopyNow(name string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.copies[name]
	switch {
	case st == nil:
		return fmt.Errorf("run-now %q: %w", name, schedule.ErrUnknownJob)
	case st.running || st.queued != nil:
		return fmt.Errorf("run-now %q: a copy is running or waiting: %w", name, schedule.ErrRunOpen)
	}
	st.queued = &copyTrigger{due: time.Now(), manual: true, why: "run-now"}
	return nil
}

// copiesAfter asks for a run of every copy job that follows backup job
// job, whose run just ended.
func (d *Daemon) copiesAfter(job string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, j := range d.cfg.Copies {
		if j.After == job {
			d.triggerCopyLocked(j.Name, copyTrigger{due: time.Now(), why: "after " + job})
		}
	}
}

// nextCopy returns when a copy job's schedule next falls due (zero if
// none does).
func (d *Daemon) nextCopy() time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	var next time.Time
	for _, st := range d.copies {
		if !st.next.IsZero() && (next.IsZero() || st.next.Before(next)) {
			next = st.next
		}
	}
	return next
}

// startCopies queues the copy jobs whose schedule fell due and starts the
// queued ones whose target has no copy running.
func (d *Daemon) startCopies(ctx context.Context) {
	d.mu.Lock()
	defer d.mu.Unlock()
	cfg := d.cfg
	now := time.Now()
	for _, j := range cfg.Copies {
		st := d.copies[j.Name]
		if st == nil || st.next.IsZero() || now.Before(st.next) {
			continue
		}
		// Occurrences missed (the daemon was busy or stopped) are caught
		// up as one run.
		d.triggerCopyLocked(j.Name, copyTrigger{due: st.next, why: "schedule"})
		next, _ := schedule.NextAfter(j.Schedule, now)
		st.next = next
	}
	for _, j := range cfg.Copies {
		st := d.copies[j.Name]
		if st == nil || st.queued == nil || st.running || d.copyBusy[j.To] != "" {
			continue
		}
		t := *st.queued
		st.queued, st.running = nil, true
		d.copyBusy[j.To] = j.Name
		cctx, cancel := context.WithCancel(ctx)
		key := "copy\x00" + j.Name
		d.cancel[key] = cancel
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			defer cancel()
			d.runCopy(cctx, cfg, j, t)
			d.mu.Lock()
			delete(d.cancel, key)
			delete(d.copyBusy, j.To)
			st.running = false
			if d.cfg.CopyJob(j.Name) == nil && d.copies[j.Name] == st {
				delete(d.copies, j.Name) // removed by a reload meanwhile
			}
			d.mu.Unlock()
			d.poke()
		}()
	}
}

// copyOutcome is what one run of a copy job did.
type copyOutcome struct {
	res       repocopy.Result
	present   int // selected restore points the target had before
	held      int // left out: the job's retention would forget them at once
	perPoint  map[string][2]int64
	forgotten []snapSum
	err       error // of the copy
	retErr    error // of the retention
}

// runCopy runs copy job j once and records it in the catalog and the
// metrics.
func (d *Daemon) runCopy(ctx context.Context, cfg *config.Config, j *config.CopyJob, t copyTrigger) {
	// The run is recorded even when the daemon stops during it.
	rec := context.WithoutCancel(ctx)
	started := time.Now()
	id, err := d.store.StartRun(rec, catalog.Run{Job: j.Name, Kind: catalog.KindCopy, Manual: t.manual, Due: t.due, Started: started})
	if err != nil {
		d.log.Error("recording a run in the catalog", "copy", j.Name, "err", err)
		d.m.errs.Inc("catalog")
	}
	d.log.Info("copy started", "copy", j.Name, "from", j.From, "to", j.To, "why", t.why)
	o := d.copyOnce(ctx, cfg, j)
	ended := time.Now()
	res := o.res
	status := catalog.StatusSucceeded
	switch {
	case o.err != nil && (errors.Is(o.err, context.Canceled) || ctx.Err() != nil):
		status = catalog.StatusInterrupted
	case o.err != nil && len(res.Copied) > 0:
		status = catalog.StatusPartial
	case o.err != nil:
		status = catalog.StatusFailed
	case o.retErr != nil:
		status = catalog.StatusPartial
	}
	summary := copySummary(o)
	for _, c := range res.Copied {
		b := o.perPoint[pointLabel(c.Name, c.Time)]
		d.addCopyResult(rec, catalog.VMResult{RunID: id, VM: c.Name, Outcome: catalog.OutcomeCopied, Attempts: 1, Snapshot: c.Target,
			BytesRead: b[0], BytesStored: b[1]})
	}
	for _, f := range res.Failed {
		d.addCopyResult(rec, catalog.VMResult{RunID: id, VM: f.Name, Outcome: catalog.OutcomeNotCopied, Attempts: 1, Snapshot: f.Source, Reason: f.Error})
	}
	for _, s := range o.forgotten {
		d.addCopyResult(rec, catalog.VMResult{RunID: id, VM: s.Name, Outcome: catalog.OutcomeForgotten, Snapshot: s.ID, Reason: "retention of the copy job"})
	}
	if id != 0 {
		if err := d.store.FinishRun(rec, id, ended, status, summary); err != nil {
			d.log.Error("recording a run in the catalog", "copy", j.Name, "err", err)
		}
	}
	d.m.copyRuns.Inc(j.Name, status)
	d.m.copyBytes.Add(float64(res.BytesSent), j.Name)
	d.m.copyDuration.Set(ended.Sub(started).Seconds(), j.Name)
	if status == catalog.StatusSucceeded {
		d.m.copyLastSuccess.Set(float64(started.Unix()), j.Name)
	} else if status != catalog.StatusInterrupted {
		d.m.errs.Inc("copy")
	}
	level := d.log.Info
	if status != catalog.StatusSucceeded {
		level = d.log.Error
	}
	level("copy finished", "copy", j.Name, "status", status, "summary", summary, "took", ended.Sub(started).Round(time.Millisecond))
	if status != catalog.StatusSucceeded && status != catalog.StatusInterrupted {
		d.notify(rec, j.Name, id, status, summary)
	}
	if ctx.Err() == nil {
		d.copyStatus(ctx, cfg, j)
	}
}

func (d *Daemon) addCopyResult(ctx context.Context, r catalog.VMResult) {
	if r.RunID == 0 {
		return
	}
	if err := d.store.AddVMResult(ctx, r); err != nil {
		d.log.Error("recording a copied restore point in the catalog", "name", r.VM, "err", err)
	}
}

// copySummary is the catalog's one-line account of a copy run.
func copySummary(o copyOutcome) string {
	res := o.res
	if o.err != nil && len(res.Copied) == 0 && len(res.Failed) == 0 {
		return "not copied: " + o.err.Error()
	}
	var parts []string
	parts = append(parts, fmt.Sprintf("%d copied (%s sent), %d already in the target", len(res.Copied), units.FormatSize(res.BytesSent), o.present+len(res.Skipped)))
	if o.held > 0 {
		parts = append(parts, fmt.Sprintf("%d left out (the retention would forget them at once)", o.held))
	}
	if len(res.Failed) > 0 {
		f := res.Failed[0]
		parts = append(parts, fmt.Sprintf("%d not copied; the first: %s", len(res.Failed), f.Error))
	} else if o.err != nil && len(res.Copied) > 0 {
		parts = append(parts, "then: "+o.err.Error())
	}
	if len(o.forgotten) > 0 {
		parts = append(parts, fmt.Sprintf("retention forgot %d in the target", len(o.forgotten)))
	}
	if o.retErr != nil {
		parts = append(parts, "retention: "+o.retErr.Error())
	}
	return strings.Join(parts, "; ")
}

// copyOnce plans and makes one copy of job j, then applies its retention
// to the target.
func (d *Daemon) copyOnce(ctx context.Context, cfg *config.Config, j *config.CopyJob) (o copyOutcome) {
	// Listing goes through the daemon's shared repositories (and its
	// cache of snapshot summaries); the copy itself through repositories
	// of its own, so that its counters, index and upload limit are its
	// alone while backups write to the same repositories.
	src, err := d.openRepo(ctx, cfg, j.From)
	if err != nil {
		o.err = err
		return o
	}
	dst, err := d.openRepo(ctx, cfg, j.To)
	if err != nil {
		o.err = err
		return o
	}
	p, err := d.planFor(ctx, cfg, j, src, dst)
	if err != nil {
		o.err = err
		return o
	}
	o.present, o.held = p.present, p.held
	o.res.Copied, o.res.Skipped = []repocopy.Copied{}, []repocopy.Copied{}
	if len(p.copy) > 0 {
		o.res, o.perPoint, o.err = d.copyPoints(ctx, cfg, j, p.copy)
		if o.err != nil && !errors.Is(o.err, repocopy.ErrNotCopied) {
			return o
		}
	}
	if o.err != nil {
		return o // retention only after a successful copy
	}
	o.forgotten, o.retErr = d.copyRetention(ctx, cfg, j, dst)
	return o
}

// copyPoints copies the restore points ss of j's source to its target.
func (d *Daemon) copyPoints(ctx context.Context, cfg *config.Config, j *config.CopyJob, ss []snapSum) (repocopy.Result, map[string][2]int64, error) {
	src, err := d.dialRepo(ctx, cfg, j.From, 0)
	if err != nil {
		return repocopy.Result{}, nil, err
	}
	dst, err := d.dialRepo(ctx, cfg, j.To, float64(j.BandwidthBytes))
	if err != nil {
		return repocopy.Result{}, nil, err
	}
	refs := make([]string, len(ss))
	for i, s := range ss {
		refs[i] = s.ID
	}
	// What each restore point read and sent: the counters' growth
	// between its start and its end (the copy reports both, one restore
	// point after the other).
	per := map[string][2]int64{}
	var mu sync.Mutex
	var cur string
	var base [2]int64
	progress := func(p repocopy.Progress) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case p.Current != "" && p.Current != cur:
			cur, base = p.Current, [2]int64{p.BytesRead, p.BytesSent}
		case p.Current == "" && cur != "":
			per[cur] = [2]int64{p.BytesRead - base[0], p.BytesSent - base[1]}
			cur = ""
		}
	}
	res, err := repocopy.Copy(ctx, src, dst, repocopy.Options{Refs: refs, Verify: j.Verify, Logger: d.log.With("copy", j.Name), Progress: progress})
	mu.Lock()
	defer mu.Unlock()
	return res, per, err
}

// pointLabel is how repocopy.Progress.Current names a restore point.
func pointLabel(name string, t time.Time) string {
	return name + "@" + t.Local().Format("2006-01-02T15:04:05")
}

// copyRetention forgets the restore points of j's VMs in the target that
// its policy does not keep, and returns them.
func (d *Daemon) copyRetention(ctx context.Context, cfg *config.Config, j *config.CopyJob, dst *repo.Repo) ([]snapSum, error) {
	policy := j.Retention.Policy()
	if policy.Empty() {
		return nil, nil
	}
	ss, err := d.listSnapshots(ctx, cfg, j.To, dst)
	if err != nil {
		return nil, fmt.Errorf("listing the target's restore points: %w", err)
	}
	byVM := map[string][]retention.Item{}
	byID := map[string]snapSum{}
	for _, s := range ss {
		if j.Selects(s.Name) {
			byVM[s.Name] = append(byVM[s.Name], retention.Item{ID: s.ID, Time: s.Time})
			byID[s.ID] = s
		}
	}
	var gone []snapSum
	for _, vm := range sortedKeys(byVM) {
		for _, dec := range retention.Apply(byVM[vm], policy, time.Local) {
			if dec.Keep {
				continue
			}
			if err := dst.RemoveSnapshot(ctx, dec.ID); err != nil {
				return gone, fmt.Errorf("forgetting %s (%s): %w", shortID(dec.ID), vm, err)
			}
			d.log.Info("copy retention: forgot a snapshot in the target", "copy", j.Name, "repository", j.To, "vm", vm, "snapshot", shortID(dec.ID), "time", dec.Time)
			gone = append(gone, byID[dec.ID])
		}
	}
	return gone, nil
}

// copyStatus sets the gauges of copy job j from the two repositories'
// restore points: per VM, how many selected restore points the target
// lacks, and when the newest one it has was taken.
func (d *Daemon) copyStatus(ctx context.Context, cfg *config.Config, j *config.CopyJob) {
	d.mu.Lock()
	d.statusSeq++
	seq := d.statusSeq
	d.mu.Unlock()
	err := func() error {
		src, err := d.openRepo(ctx, cfg, j.From)
		if err != nil {
			return err
		}
		dst, err := d.openRepo(ctx, cfg, j.To)
		if err != nil {
			return err
		}
		p, err := d.planFor(ctx, cfg, j, src, dst)
		if err != nil {
			return err
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		st := d.copies[j.Name]
		if st == nil || d.cfg.CopyJob(j.Name) == nil || st.status > seq {
			return nil // removed, or read anew, meanwhile
		}
		st.status = seq
		for vm := range st.vms {
			if p.vms[vm] == nil {
				d.m.copyPending.Delete(j.Name, vm)
				d.m.copyNewest.Delete(j.Name, vm)
				delete(st.vms, vm)
			}
		}
		for vm, v := range p.vms {
			st.vms[vm] = true
			d.m.copyPending.Set(float64(v.pending), j.Name, vm)
			newest := 0.0
			if !v.newest.IsZero() {
				newest = float64(v.newest.Unix())
			}
			d.m.copyNewest.Set(newest, j.Name, vm)
		}
		return nil
	}()
	if err != nil && ctx.Err() == nil {
		d.log.Warn("copy job: reading what the target lacks", "copy", j.Name, "err", err)
	}
}

// refreshCopies updates, in the background, the gauges of the copy jobs
// whose source is repository (every copy job if it is ""), except those
// running (which update them when they end) and those that follow job
// (which are about to run).
func (d *Daemon) refreshCopies(ctx context.Context, repository, job string) {
	d.mu.Lock()
	cfg := d.cfg
	var js []*config.CopyJob
	for _, j := range cfg.Copies {
		if st := d.copies[j.Name]; st != nil && !st.running && st.queued == nil && (repository == "" || j.From == repository) && (job == "" || j.After != job) {
			js = append(js, j)
		}
	}
	d.mu.Unlock()
	if len(js) == 0 {
		return
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for _, j := range js {
			d.copyStatus(ctx, cfg, j)
		}
	}()
}

// snapSum is what copy jobs need of a restore point.
type snapSum struct {
	ID, Name string
	Time     time.Time
	From     []repo.Origin // CopiedFrom
}

// listSnapshots returns the summaries of repository name's restore
// points. Snapshots never change once written: only those not seen before
// are read, the rest come from the daemon's memory.
func (d *Daemon) listSnapshots(ctx context.Context, cfg *config.Config, name string, r *repo.Repo) ([]snapSum, error) {
	ids, err := r.SnapshotIDs(ctx)
	if err != nil {
		return nil, err
	}
	key := r.Config().ID
	d.mu.Lock()
	cached := d.snapCache[key]
	d.mu.Unlock()
	fresh := make(map[string]snapSum, len(ids))
	out := make([]snapSum, 0, len(ids))
	for _, id := range ids {
		s, ok := cached[id]
		if !ok {
			full, err := r.LoadSnapshot(ctx, id)
			switch {
			case errors.Is(err, repo.ErrNoSnapshot):
				continue // forgotten meanwhile
			case errors.Is(err, repo.ErrDamaged):
				d.log.Warn("a snapshot of the repository is damaged: kura check tells more", "repository", name, "snapshot", id, "err", err)
				continue
			case err != nil:
				return nil, err
			}
			s = snapSum{ID: id, Name: full.Name, Time: full.Time, From: full.CopiedFrom}
		}
		fresh[id] = s
		out = append(out, s)
	}
	d.mu.Lock()
	d.snapCache[key] = fresh
	d.mu.Unlock()
	return out, nil
}

// planFor lists both repositories of j and plans its copy.
func (d *Daemon) planFor(ctx context.Context, cfg *config.Config, j *config.CopyJob, src, dst *repo.Repo) (copyPlan, error) {
	ss, err := d.listSnapshots(ctx, cfg, j.From, src)
	if err != nil {
		return copyPlan{}, fmt.Errorf("listing the source's restore points: %w", err)
	}
	ds, err := d.listSnapshots(ctx, cfg, j.To, dst)
	if err != nil {
		return copyPlan{}, fmt.Errorf("listing the target's restore points: %w", err)
	}
	return planCopy(j, src.Config().ID, dst.Config().ID, ss, ds), nil
}

// copyPlan is what a copy job is to copy, and where each VM stands.
type copyPlan struct {
	copy    []snapSum // the source's restore points to copy, oldest first
	present int       // selected restore points the target has
	held    int       // selected restore points the retention would forget at once
	vms     map[string]*vmCopy
}

// vmCopy is where one VM stands in a copy job.
type vmCopy struct {
	pending int       // selected restore points the target lacks
	newest  time.Time // the newest restore point of the VM in the target
}

type origin struct{ repo, snap string }

// planCopy decides what copy job j copies from src (restore points of the
// repository srcID) to dst (of dstID). A source restore point is selected
// when its VM is one of j's and it is among the Latest newest of its VM;
// the target has it when a target restore point is it or a copy of the
// same original (the identities repocopy matches). With a retention, a
// selected restore point that the retention would forget as soon as it
// landed (the target has newer ones it keeps instead) is left out: copied
// and forgotten, it would be copied again at every run.
func planCopy(j *config.CopyJob, srcID, dstID string, src, dst []snapSum) copyPlan {
	p := copyPlan{vms: map[string]*vmCopy{}}
	vm := func(name string) *vmCopy {
		v := p.vms[name]
		if v == nil {
			v = &vmCopy{}
			p.vms[name] = v
		}
		return v
	}
	has := map[origin]bool{}
	inTarget := map[string][]retention.Item{}
	for _, t := range dst {
		has[origin{dstID, t.ID}] = true
		for _, o := range t.From {
			has[origin{o.Repo, o.Snapshot}] = true
		}
		if j.Selects(t.Name) {
			v := vm(t.Name)
			if t.Time.After(v.newest) {
				v.newest = t.Time
			}
			inTarget[t.Name] = append(inTarget[t.Name], retention.Item{ID: "target:" + t.ID, Time: t.Time})
		}
	}
	byVM := map[string][]snapSum{}
	for _, s := range src {
		if j.Selects(s.Name) {
			byVM[s.Name] = append(byVM[s.Name], s)
		}
	}
	policy := j.Retention.Policy()
	for _, name := range sortedKeys(byVM) {
		ss := byVM[name]
		v := vm(name)
		slices.SortFunc(ss, func(a, b snapSum) int { return cmp.Or(a.Time.Compare(b.Time), cmp.Compare(a.ID, b.ID)) })
		if j.Latest > 0 && len(ss) > j.Latest {
			ss = ss[len(ss)-j.Latest:]
		}
		var missing []snapSum
		for _, s := range ss {
			present := has[origin{srcID, s.ID}]
			for _, o := range s.From {
				present = present || has[origin{o.Repo, o.Snapshot}]
			}
			if present {
				p.present++
			} else {
				missing = append(missing, s)
			}
		}
		if !policy.Empty() && len(missing) > 0 {
			items := slices.Clone(inTarget[name])
			for _, s := range missing {
				items = append(items, retention.Item{ID: s.ID, Time: s.Time})
			}
			keep := map[string]bool{}
			for _, dec := range retention.Apply(items, policy, time.Local) {
				keep[dec.ID] = dec.Keep
			}
			kept := missing[:0]
			for _, s := range missing {
				if keep[s.ID] {
					kept = append(kept, s)
				} else {
					p.held++
				}
			}
			missing = kept
		}
		v.pending = len(missing)
		p.copy = append(p.copy, missing...)
	}
	slices.SortFunc(p.copy, func(a, b snapSum) int { return cmp.Or(a.Time.Compare(b.Time), cmp.Compare(a.ID, b.ID)) })
	return p
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func shortID(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}

// dialRepo opens repository name of cfg anew (not the daemon's shared
// one), uploading at most uploadLimit bytes per second (0: no limit).
func (d *Daemon) dialRepo(ctx context.Context, cfg *config.Config, name string, uploadLimit float64) (*repo.Repo, error) {
	rc := cfg.Repositories[name]
	if rc == nil {
		return nil, fmt.Errorf("repository %s is not in the configuration", name)
	}
	pw, err := repo.ReadPassword(rc.PasswordFile)
	if errors.Is(err, repo.ErrNoPassword) {
		return nil, fmt.Errorf("repository %s: no password: set password_file in the configuration", name)
	} else if err != nil {
		return nil, fmt.Errorf("repository %s: %w", name, err)
	}
	be, err := location.Open(ctx, rc.Location(), location.Options{Logger: d.log, Getenv: rc.Getenv(os.Getenv), UploadLimit: uploadLimit})
	if err != nil {
		return nil, fmt.Errorf("repository %s: %w", name, err)
	}
	r, err := repo.Open(ctx, be, pw)
	if err != nil {
		return nil, fmt.Errorf("repository %s (%s): %w", name, be.Location(), err)
	}
	return r, nil
}
