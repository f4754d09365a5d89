package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/backup"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/restore"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/source/image"
	"github.com/kura-backup/kura/internal/termsafe"
)

func (a *app) backupCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "backup", Short: "Back up disk images or virtual machines"}
	var name, limitRead string
	var workers int
	img := &cobra.Command{
		Use:   "image PATH...",
		Short: "Back up disk images (raw, qcow2, vmdk, vhdx, vdi) or block devices as one restore point",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if name == "" {
				name = strings.TrimSuffix(filepath.Base(args[0]), filepath.Ext(args[0]))
			}
			if err := repo.ValidName(name); err != nil {
				return err
			}
			gate, err := readGate(limitRead)
			if err != nil {
				return err
			}
			r, err := a.open(ctx)
			if err != nil {
				return err
			}
			var disks []source.Disk
			defer func() {
				for _, d := range disks {
					d.Close()
				}
			}()
			seen := map[string]bool{}
			for _, p := range args {
				d, err := image.Open(ctx, p, image.Options{})
				if err != nil {
					return err
				}
				disks = append(disks, d)
				if seen[d.Info().Name] {
					return fmt.Errorf("two disks are named %q: give images distinct file names", d.Info().Name)
				}
				seen[d.Info().Name] = true
			}
			prog := &backup.Progress{Started: time.Now()}
			stop := progressLine(a.stderr, a.progressOn(), func() string {
				return rateLine("backup", prog.Done.Load(), prog.Total.Load(), prog.Started)
			})
			snap, err := backup.Run(ctx, r, disks, backup.Options{Name: name, Source: "image", Workers: workers, Progress: prog, Logger: a.log, ReadGate: gate})
			stop()
			if err != nil {
				return err
			}
			a.printBackup(snap)
			return nil
		},
	}
	img.Flags().StringVar(&name, "name", "", "restore point `name` (default: the first image's base name)")
	img.Flags().IntVar(&workers, "workers", 0, "parallel workers (default 2 per CPU)")
	numRange(img.Flags(), "workers", 1, maxWorkers, "leave it out for 2 per CPU")
	limitReadFlag(img.Flags(), &limitRead)
	cmd.AddCommand(img, a.vmBackupCmd(), a.qmpBackupCmd())
	return cmd
}

func (a *app) printBackup(s *repo.Snapshot) {
	el := s.Stats.End.Sub(s.Stats.Start)
	fmt.Fprintf(a.stdout, "snapshot %s saved: %s, %d disks, %s, %s backup", s.ID[:8], show(s.Name), len(s.Disks), humanBytes(s.LogicalSize()), show(s.Kind))
	if s.Mode != "" {
		fmt.Fprintf(a.stdout, ", mode %s", show(s.Mode))
		if s.Stats.FreezeMillis > 0 {
			fmt.Fprintf(a.stdout, " (guest frozen %.0f ms", s.Stats.FreezeMillis)
			if st := s.Stats; st.InstantMillis > 0 {
				fmt.Fprintf(a.stdout, ": agent freeze %.0f, instant %.0f, thaw %.0f", st.FreezeCallMillis, st.InstantMillis, st.ThawCallMillis)
			}
			fmt.Fprint(a.stdout, ")")
		}
		if s.Stats.PauseMillis > 0 {
			fmt.Fprintf(a.stdout, " (VM %s %.0f ms)", pausedOrDown(s.Mode), s.Stats.PauseMillis)
		}
	}
	fmt.Fprintln(a.stdout)
	if s.Stats.Note != "" {
		fmt.Fprintf(a.stdout, "  warning: %s\n", termsafe.Line(s.Stats.Note))
	}
	for _, d := range s.Disks {
		fmt.Fprintf(a.stdout, "  disk %-10s %s %s, %s of data, read: %s\n", show(d.Name), show(d.Format), humanBytes(d.Size), humanBytes(d.DataBytes), termsafe.Line(d.Read))
	}
	rate := 0.0
	if el > 0 {
		rate = float64(s.Stats.BytesRead) / el.Seconds()
	}
	fmt.Fprintf(a.stdout, "  read %s in %s (%s/s); %d new chunks (%s, %s stored), %d reused\n",
		humanBytes(s.Stats.BytesRead), el.Round(10*time.Millisecond), humanBytes(int64(rate)),
		s.Stats.ChunksNew, humanBytes(s.Stats.BytesNew), humanBytes(s.Stats.BytesStored), s.Stats.ChunksReused)
}

func (a *app) restoreCmd() *cobra.Command {
	var to, format, disk, as, connect string
	var overwrite, define, start, ignoreDamage bool
	var workers int
	cmd := &cobra.Command{
		Use:   "restore SNAPSHOT --to DIR | --define [--as NAME] [--start]",
		Short: "Restore the disks of a restore point (id, id prefix, NAME@latest or latest), or the whole VM",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			switch {
			case define && disk != "":
				return fmt.Errorf("--define restores every disk of the VM: leave out --disk")
			case !define && (as != "" || start):
				return fmt.Errorf("--as and --start go with --define")
			case define && to == "":
				to = defaultImageDir
			case to == "":
				return fmt.Errorf("say where to restore to with --to DIR")
			}
			if format != "raw" && format != "qcow2" {
				return fmt.Errorf("--format %q: use raw or qcow2", format)
			}
			r, snap, err := a.openSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			disks, err := selectDisks(snap, disk)
			if err != nil {
				return err
			}
			// --to is a file when it names one disk with an image extension.
			toFile := !define && len(disks) == 1 && (strings.HasSuffix(to, ".raw") || strings.HasSuffix(to, ".img") || strings.HasSuffix(to, ".qcow2"))
			if toFile && strings.HasSuffix(to, ".qcow2") {
				format = "qcow2"
			}
			pathOf := func(d repo.Disk) string {
				if toFile {
					return to
				}
				return filepath.Join(to, d.Name+"."+format)
			}
			var vm *vmRestore
			if define {
				if vm, err = a.prepareDefine(ctx, snap, as, to, format, connect, overwrite); err != nil {
					return err
				}
				defer vm.close()
				pathOf = vm.path
			}
			prog := &restore.Progress{Started: time.Now()}
			stop := progressLine(a.stderr, a.progressOn(), func() string {
				return rateLine("restore", prog.Done.Load(), prog.Total.Load(), prog.Started)
			})
			defer stop()
			var damaged []diskDamage
			for _, d := range disks {
				path := pathOf(d)
				var t restore.Target
				if format == "qcow2" {
					t, err = restore.NewQcow2(ctx, path, d.Size, overwrite)
				} else {
					t, err = restore.NewRawFile(path, d.Size, overwrite)
				}
				if err != nil {
					return err
				}
				start := time.Now()
				dmg := &restore.DamageReport{}
				if err := restore.Disk(ctx, r, d, t, restore.Options{Workers: workers, Progress: prog, IgnoreDamage: ignoreDamage, Damage: dmg}); err != nil {
					if !ignoreDamage && (errors.Is(err, repo.ErrDamaged) || errors.Is(err, repo.ErrBlobMissing)) {
						err = fmt.Errorf("%w; `kura restore --ignore-damage` restores the rest with the damaged ranges as zeros", err)
					}
					return err
				}
				if rs := dmg.Ranges(); len(rs) > 0 {
					stop()
					damaged = append(damaged, diskDamage{d.Name, rs})
					fmt.Fprintf(a.stdout, "restored disk %s to %s with %s in %d damaged ranges filled with zeros (%s):\n", show(d.Name), show(path), humanBytes(rangeBytes(rs)), len(rs), termsafe.Line(fmt.Sprint(dmg.Err())))
					for _, rg := range rs {
						fmt.Fprintf(a.stdout, "  damaged: disk %s bytes %d-%d (%s)\n", show(d.Name), rg.Offset, rg.Offset+rg.Length-1, humanBytes(rg.Length))
					}
					continue
				}
				fmt.Fprintf(a.stdout, "restored disk %s (%s, %s of data) to %s in %s, every chunk verified\n", show(d.Name), humanBytes(d.Size), humanBytes(d.DataBytes), show(path), time.Since(start).Round(10*time.Millisecond))
			}
			if vm != nil {
				stop()
				if err := vm.finish(ctx, a, start); err != nil {
					return err
				}
			}
			if len(damaged) > 0 {
				return restoredWithDamage(damaged)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&define, "define", false, "restore the whole VM: every disk, and define the libvirt domain from the saved configuration (default --to "+defaultImageDir+")")
	cmd.Flags().StringVar(&as, "as", "", "with --define: the restored VM's `name` (a copy beside the original: new UUID and MAC addresses)")
	cmd.Flags().BoolVar(&start, "start", false, "with --define: start the restored VM")
	cmd.Flags().StringVarP(&connect, "connect", "c", "qemu:///system", "with --define: libvirt `URI` or socket path")
	cmd.Flags().StringVar(&to, "to", "", "target `directory` (or a file name when restoring one disk)")
	cmd.Flags().StringVar(&format, "format", "raw", "image `format`: raw (sparse) or qcow2")
	cmd.Flags().StringVar(&disk, "disk", "", "restore only this disk (`name or index`)")
	cmd.Flags().BoolVar(&overwrite, "overwrite", false, "replace existing files")
	cmd.Flags().IntVar(&workers, "workers", 0, "parallel workers (default 2 per CPU)")
	cmd.Flags().BoolVar(&ignoreDamage, "ignore-damage", false, "restore every intact range, fill chunks that are damaged or missing with zeros and list their byte ranges (exit status 3)")
	numRange(cmd.Flags(), "workers", 1, maxWorkers, "leave it out for 2 per CPU")
	return cmd
}

// diskDamage is what a restore with --ignore-damage filled with zeros.
type diskDamage struct {
	disk   string
	ranges []repo.Range
}

// restoredWithDamage is the outcome of a restore that completed with
// damaged ranges filled with zeros.
type restoredWithDamage []diskDamage

func (d restoredWithDamage) Error() string {
	var n int64
	for _, dd := range d {
		n += rangeBytes(dd.ranges)
	}
	return fmt.Sprintf("restored, but %s in %d disks could not be read and are zeros (listed above); a backup of the same VM heals damaged chunks in the repository", humanBytes(n), len(d))
}

func rangeBytes(rs []repo.Range) int64 {
	var n int64
	for _, r := range rs {
		n += r.Length
	}
	return n
}

// pausedOrDown says what a snapshot's pause time was: the VM paused
// (suspend mode) or down (shutdown mode).
func pausedOrDown(mode string) string {
	if mode == source.ModeShutdown {
		return "down"
	}
	return "paused"
}

// findSnapshot resolves a snapshot argument (id, id prefix, NAME@latest,
// latest) in r.
func findSnapshot(ctx context.Context, r *repo.Repo, arg string) (*repo.Snapshot, error) {
	ss, damaged, err := r.SnapshotsLenient(ctx)
	if err != nil {
		return nil, err
	}
	snap, err := repo.FindSnapshot(ss, arg)
	if err != nil && len(damaged) > 0 {
		err = fmt.Errorf("%w (%d damaged snapshots could not be read: run `kura verify`): %w", err, len(damaged), repo.ErrDamaged)
	}
	return snap, err
}

// selectDisks returns the disks of snap a --disk flag names (a name or
// an index), or all of them for "".
func selectDisks(snap *repo.Snapshot, disk string) ([]repo.Disk, error) {
	if disk == "" {
		return snap.Disks, nil
	}
	var disks []repo.Disk
	for i, d := range snap.Disks {
		if d.Name == disk || strconv.Itoa(i) == disk {
			disks = append(disks, d)
		}
	}
	if len(disks) == 0 {
		var names []string
		for i, d := range snap.Disks {
			names = append(names, fmt.Sprintf("%d=%s", i, show(d.Name)))
		}
		return nil, fmt.Errorf("snapshot %s has no disk %q (disks: %s)", snap.ID[:8], disk, strings.Join(names, ", "))
	}
	return disks, nil
}
