package backup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
)

// VMOptions describe a backup of a live VM.
type VMOptions struct {
	Mode string // source.Mode*; "" or app = app if the agent answers, else crash with a warning
	// RequireApp fails the backup, without touching the VM, when the guest
	// agent does not answer (instead of falling back to crash).
	RequireApp bool
	Method     string // capture method, source.Method*; "" = fleece
	Full       bool   // ignore changed-block tracking once
	Source     string // "libvirt" or "qmp"
	Workers    int
	Progress   *Progress
	Options    Options // Logger, Tags
	// Stored, when set, is called once the restore point is in the
	// repository, before the capture is released (which may take a
	// while: the overlay method merges the guest's writes back then).
	Stored func(*repo.Snapshot)
}

// RunVM captures all disks of vm at one instant, backs them up (reading
// only changes since the VM's latest restore point when the driver tracks
// them), saves the VM's configuration with the snapshot, and releases the
// capture whatever happens.
func RunVM(ctx context.Context, r *repo.Repo, vm source.VM, o VMOptions) (snap *repo.Snapshot, err error) {
	return RunVMOpening(ctx, func(context.Context) (*repo.Repo, error) { return r, nil }, vm, o)
}

// RunVMOpening is RunVM into a repository that is still being unlocked:
// open is called (once) at the start, so that the key derivation overlaps
// the capture's preparation and, where the driver can guess the parent
// checkpoint (source.CaptureOptions.ParentReady), its instant. An error
// from open is returned as it is, and the VM is left as it was: a driver
// that took the instant before it undoes it.
func RunVMOpening(ctx context.Context, open func(context.Context) (*repo.Repo, error), vm source.VM, o VMOptions) (snap *repo.Snapshot, err error) {
	opts := o.Options
	opts.Name, opts.Source, opts.Workers, opts.Progress = vm.Name(), o.Source, o.Workers, o.Progress
	// Checked before the VM is touched, not after its capture in Run.
	if err := repo.ValidName(opts.Name); err != nil {
		return nil, err
	}
	if opts.Progress == nil {
		opts.Progress = &Progress{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	opts.Progress.Started = time.Now()
	var (
		r       *repo.Repo
		parent  *repo.Snapshot
		openErr error
		unlock  func()
	)
	// The repository is opened, and the VM's latest restore point found,
	// beside the capture's preparation; resolved is closed when that is
	// done, and the variables above are set by then.
	resolved := make(chan struct{})
	defer func() {
		<-resolved
		if unlock != nil {
			unlock()
		}
	}()
	log := opts.Logger
	openParent := func() error {
		var err error
		if r, err = open(ctx); err != nil {
			return err
		}
		// Reading the index (tens of milliseconds per hundred backups) can
		// then overlap the capture. The lock comes first and is held until
		// the backup ends, so that no prune runs between reading the index
		// and storing against it (see Run).
		if lock, err := r.Lock(ctx, repo.LockBackup); err == nil {
			loaded := make(chan struct{})
			go func() {
				defer close(loaded)
				r.LoadIndex(ctx) // Run reads it again if this failed
			}()
			unlock = func() {
				<-loaded
				lock.Unlock(context.WithoutCancel(ctx))
			}
		}
		start := time.Now()
		ss, err := r.Snapshots(ctx)
		log.Debug("restore points listed", "took", time.Since(start), "err", err)
		if err != nil {
			return err
		}
		for i := len(ss) - 1; i >= 0; i-- {
			if ss[i].Name == vm.Name() && ss[i].Source == o.Source {
				parent = ss[i]
				break
			}
		}
		return nil
	}
	go func() {
		defer close(resolved)
		openErr = openParent()
	}()
	// resolve waits until the repository is open and the parent known.
	resolve := func(ctx context.Context) error {
		select {
		case <-resolved:
			return openErr
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	wantApp := o.Mode == "" || o.Mode == source.ModeApp
	co := source.CaptureOptions{Mode: o.Mode, Method: o.Method, Full: o.Full, ParentReady: resolved, Logger: opts.Logger.With("vm", vm.Name())}
	if wantApp {
		// The drivers pick app when the agent answers and crash when it
		// does not; an explicit app makes them fail instead.
		co.Mode = ""
		if o.RequireApp {
			co.Mode = source.ModeApp
		}
	}
	co.Parent = func(ctx context.Context) (string, error) {
		if err := resolve(ctx); err != nil || parent == nil {
			return "", err
		}
		return parent.Checkpoint, nil
	}
	cfgType, cfg, err := vm.Config(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the configuration of %s: %w", vm.Name(), err)
	}
	captureStart := time.Now()
	capture, err := vm.Capture(ctx, co)
	opts.Logger.Debug("capture", "vm", vm.Name(), "took", time.Since(captureStart), "err", err)
	if err != nil {
		select {
		case <-resolved:
			if openErr != nil {
				return nil, openErr // the driver stopped at Parent
			}
		default:
		}
		return nil, fmt.Errorf("capturing %s: %w", vm.Name(), oneLine{err})
	}
	// A capture of a VM that is off need not ask for the parent.
	if err := resolve(ctx); err != nil {
		capture.End(context.WithoutCancel(ctx), false)
		return nil, err
	}
	defer func() {
		endCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		endStart := time.Now()
		endErr := capture.End(endCtx, err == nil)
		opts.Logger.Debug("capture released", "vm", vm.Name(), "took", time.Since(endStart), "err", endErr)
		if endErr != nil {
			if err == nil {
				err = fmt.Errorf("backup saved, but releasing the capture of %s failed: %w", vm.Name(), oneLine{endErr})
			} else {
				err = oneLine{errors.Join(err, endErr)}
			}
		}
	}()
	opts.Mode = capture.Mode()
	if wantApp && opts.Mode == source.ModeCrash {
		opts.Stats.Note = "guest agent did not answer: crash-consistent, not application-consistent (use --require-app to fail instead)"
		opts.Logger.Warn(opts.Stats.Note, "vm", vm.Name())
	}
	opts.Config = &repo.VMConfig{Type: cfgType, Data: cfg}
	opts.Checkpoint = capture.Checkpoint()
	opts.Stats.FreezeMillis = millis(capture.FreezeWindow())
	opts.Stats.PauseMillis = millis(capture.Pause())
	if fb, ok := capture.(source.FreezeBreakdown); ok && opts.Stats.FreezeMillis > 0 {
		p := fb.FreezeParts()
		opts.Stats.FreezeCallMillis = millis(p.Freeze)
		opts.Stats.InstantMillis = millis(p.Instant)
		opts.Stats.ThawCallMillis = millis(p.Thaw)
	}
	opts.Notes = map[string]string{}
	for _, n := range capture.Notes() {
		if n.Read != "changed" {
			reason := n.Reason
			if reason == "" {
				reason = "no change tracking"
			}
			opts.Notes[n.Disk] = reason
		}
	}
	if parent != nil && !o.Full && parent.Checkpoint != "" {
		opts.Parent = parent
	} else if o.Full {
		for _, d := range capture.Disks() {
			opts.Notes[d.Info().Name] = "--full"
		}
	} else {
		why := "first backup"
		if parent != nil {
			why = "previous restore point has no checkpoint"
		}
		for _, d := range capture.Disks() {
			if opts.Notes[d.Info().Name] == "" {
				opts.Notes[d.Info().Name] = why
			}
		}
	}
	runStart := time.Now()
	snap, err = Run(ctx, r, capture.Disks(), opts)
	opts.Logger.Debug("disks read and stored", "vm", vm.Name(), "took", time.Since(runStart), "err", err)
	if err == nil && o.Stored != nil {
		o.Stored(snap)
	}
	return snap, err
}

// millis is d in milliseconds, to the microsecond.
func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// oneLine is err with its message on one line: errors.Join puts each error
// on a line of its own, and Kura prints an error as one line.
type oneLine struct{ error }

func (e oneLine) Error() string { return strings.ReplaceAll(e.error.Error(), "\n", "; ") }
func (e oneLine) Unwrap() error { return e.error }
