package main

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kura-backup/kura/internal/backup"
	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/source/libvirt"
	"github.com/kura-backup/kura/internal/source/qmp"
	"github.com/kura-backup/kura/internal/termsafe"
)

// modes are the consistency modes a user may ask for.
var modes = []string{source.ModeApp, source.ModeCrash, source.ModeSuspend, source.ModeShutdown}

func checkMode(m string) error {
	if m == "" {
		return nil
	}
	for _, x := range modes {
		if m == x {
			return nil
		}
	}
	return fmt.Errorf("--mode %q: use one of %s", m, strings.Join(modes, ", "))
}

func (a *app) vmBackupCmd() *cobra.Command {
	var connect, mode, method, scratch, limitRead string
	var all, full, requireApp bool
	var parallel, workers int
	var freezeTimeout time.Duration
	cmd := &cobra.Command{
		Use:   "vm [NAME...]",
		Short: "Back up running or defined libvirt domains live (app-consistent when the guest agent answers)",
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if err := checkMode(mode); err != nil {
				return err
			}
			if method != source.MethodFleece && method != source.MethodOverlay {
				return fmt.Errorf("--capture %q: use %s or %s", method, source.MethodFleece, source.MethodOverlay)
			}
			if len(args) == 0 && !all {
				return errors.New("name the VMs to back up, or pass --all")
			}
			gate, err := readGate(limitRead)
			if err != nil {
				return err
			}
			r, err := a.openLater(ctx)
			if err != nil {
				return err
			}
			conn, err := libvirt.ConnectWithOptions(ctx, connect, libvirt.Options{Agent: guest.Timeouts{Freeze: freezeTimeout}, ScratchDir: scratch})
			if err != nil {
				return err
			}
			defer conn.Close()
			names := args
			if all {
				if names, err = conn.List(ctx); err != nil {
					return err
				}
				sort.Strings(names)
			}
			if parallel < 1 {
				parallel = 1
			}
			return a.backupVMs(ctx, r, names, parallel, func(ctx context.Context, name string) (source.VM, error) {
				return conn.VM(ctx, name)
			}, backup.VMOptions{Mode: mode, Method: method, RequireApp: requireApp, Full: full, Source: "libvirt", Workers: workers, Options: backup.Options{ReadGate: gate}})
		},
	}
	f := cmd.Flags()
	f.StringVarP(&connect, "connect", "c", "qemu:///system", "libvirt `URI` or socket path")
	f.StringVar(&mode, "mode", "", "consistency: app (default when the guest agent answers), crash, suspend or shutdown")
	f.StringVar(&method, "capture", source.MethodFleece, "capture method: fleece (QEMU's backup job serves the reads) or overlay (the guest writes to an overlay, kura reads the disk images itself, the overlay is merged back)")
	f.StringVar(&scratch, "scratch-dir", "/var/tmp", "`DIR` for the capture's temporary images (fleece: copy-before-write data; overlay: the guest's writes during the backup)")
	f.BoolVar(&all, "all", false, "every running and defined domain")
	f.BoolVar(&requireApp, "require-app", false, "fail, without touching the VM, when the guest agent does not answer (default: fall back to crash-consistent with a warning)")
	f.BoolVar(&full, "full", false, "read every disk in full once, ignoring changed-block tracking")
	f.IntVar(&parallel, "parallel", 1, "back up this many VMs at once")
	numRange(f, "parallel", 1, 256, "")
	f.IntVar(&workers, "workers", 0, "parallel workers per VM (default 2 per CPU)")
	numRange(f, "workers", 1, maxWorkers, "leave it out for 2 per CPU")
	limitReadFlag(f, &limitRead)
	freezeTimeoutFlag(f, &freezeTimeout)
	return cmd
}

// freezeTimeoutFlag adds --freeze-timeout: how long the guest agent may
// take to freeze (its fsfreeze hooks included) before kura gives up, thaws
// and fails (or falls back to crash mode).
func freezeTimeoutFlag(f *pflag.FlagSet, d *time.Duration) {
	f.DurationVar(d, "freeze-timeout", guest.DefaultFreezeTimeout, "how long the guest agent may take to freeze filesystems (fsfreeze hooks included)")
	durRange(f, "freeze-timeout", time.Second, time.Hour, "")
}

func (a *app) qmpBackupCmd() *cobra.Command {
	var socket, name, mode, limitRead string
	var full, requireApp bool
	var workers int
	var freezeTimeout time.Duration
	cmd := &cobra.Command{
		Use:   "qmp --socket PATH --name NAME",
		Short: "Back up a plain QEMU VM (no libvirt) through its QMP socket",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if socket == "" || name == "" {
				return errors.New("give the VM's QMP socket with --socket and a name with --name")
			}
			if err := repo.ValidName(name); err != nil {
				return err
			}
			if err := checkMode(mode); err != nil {
				return err
			}
			gate, err := readGate(limitRead)
			if err != nil {
				return err
			}
			r, err := a.openLater(ctx)
			if err != nil {
				return err
			}
			return a.backupVMs(ctx, r, []string{name}, 1, func(ctx context.Context, name string) (source.VM, error) {
				return qmp.OpenWith(ctx, socket, name, qmp.Options{Agent: guest.Timeouts{Freeze: freezeTimeout}})
			}, backup.VMOptions{Mode: mode, RequireApp: requireApp, Full: full, Source: "qmp", Workers: workers, Options: backup.Options{ReadGate: gate}})
		},
	}
	f := cmd.Flags()
	f.StringVar(&socket, "socket", "", "the VM's QMP unix socket `path`")
	f.StringVar(&name, "name", "", "restore point `name` for the VM")
	f.StringVar(&mode, "mode", "", "consistency: app (default when the guest agent answers), crash or suspend")
	f.BoolVar(&requireApp, "require-app", false, "fail, without touching the VM, when the guest agent does not answer")
	f.BoolVar(&full, "full", false, "read every disk in full once, ignoring changed-block tracking")
	f.IntVar(&workers, "workers", 0, "parallel workers (default 2 per CPU)")
	numRange(f, "workers", 1, maxWorkers, "leave it out for 2 per CPU")
	limitReadFlag(f, &limitRead)
	freezeTimeoutFlag(f, &freezeTimeout)
	return cmd
}

// backupVMs backs up each named VM, up to parallel at once, into the
// repository r returns (once it is unlocked), printing each result; it
// fails if any VM failed, after trying them all.
func (a *app) backupVMs(ctx context.Context, r func(context.Context) (*repo.Repo, error), names []string, parallel int, open func(context.Context, string) (source.VM, error), o backup.VMOptions) error {
	var mu sync.Mutex
	var failed []string
	var lastErr error
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	prog := &backup.Progress{Started: time.Now()}
	stop := progressLine(a.stderr, a.progressOn(), func() string {
		return rateLine("backup", prog.Done.Load(), prog.Total.Load(), prog.Started)
	})
	for _, name := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			opts := o
			opts.Progress = prog
			opts.Options.Logger = a.log
			snap, err := func() (*repo.Snapshot, error) {
				vm, err := open(ctx, name)
				if err != nil {
					return nil, err
				}
				return backup.RunVMOpening(ctx, r, vm, opts)
			}()
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed = append(failed, name)
				lastErr = fmt.Errorf("%s: %w", name, err)
				if len(names) > 1 {
					fmt.Fprintf(a.stderr, "kura: %s: %s\n", show(name), termsafe.Line(explain(err)))
				}
				return
			}
			a.printBackup(snap)
		}()
	}
	wg.Wait()
	stop()
	if len(names) == 1 && lastErr != nil {
		return lastErr // one VM: its error is the one line to print
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d VMs failed: %s", len(failed), len(names), strings.Join(termsafe.Quotes(failed), ", "))
	}
	return nil
}
