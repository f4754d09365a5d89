package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/guestfs"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/snapdisk"
	"github.com/kura-backup/kura/internal/termsafe"
)

// Files in a restore point are read by Kura's own user-space parsers
// (internal/guestfs) straight from the repository: the host kernel never
// mounts guest data.

func (a *app) filesCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "files",
		Short: "List and restore single files from a restore point, without restoring its disks",
		Long: "files reads the guest filesystems of a restore point (ext2/3/4, xfs, vfat, ntfs on MBR or GPT partitions or LVM)\n" +
			"with kura's own user-space parsers, straight from the repository: the host kernel never mounts guest data.",
	}
	var sel volumeSelection
	ls := &cobra.Command{
		Use:   "ls SNAPSHOT [PATH]",
		Short: "List a directory of a restore point (without PATH: the disks' volumes)",
		Args:  cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, snap, err := a.openSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			if len(args) == 1 {
				return a.listVolumes(ctx, r, snap, sel)
			}
			f, _, err := sel.open(ctx, r, snap, a)
			if err != nil {
				return err
			}
			return a.listPath(ctx, f, args[1])
		},
	}
	var to string
	var overwrite, noOwners bool
	get := &cobra.Command{
		Use:   "get SNAPSHOT PATH... --to DIR",
		Short: "Restore files or directory trees of a restore point into DIR (keeping modes, owners, times, links)",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return errors.New("say where the files go with --to DIR")
			}
			ctx := cmd.Context()
			r, snap, err := a.openSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			f, where, err := sel.open(ctx, r, snap, a)
			if err != nil {
				return err
			}
			start := time.Now()
			st, err := guestfs.Extract(ctx, f, args[1:], to, guestfs.ExtractOptions{Overwrite: overwrite, NoOwners: noOwners})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "restored %d files (%s), %d directories, %d symlinks, %d hard links from %s of %s into %s in %s",
				st.Files, humanBytes(st.Bytes), st.Dirs, st.Symlinks, st.HardLinks, show(where), snap.ID[:8], show(to), time.Since(start).Round(10*time.Millisecond))
			if st.Skipped > 0 {
				fmt.Fprintf(a.stdout, "; skipped %d device nodes, FIFOs or sockets", st.Skipped)
			}
			fmt.Fprintln(a.stdout)
			return nil
		},
	}
	get.Flags().StringVar(&to, "to", "", "target `directory`; guest paths are kept below it")
	get.Flags().BoolVar(&overwrite, "overwrite", false, "replace existing files")
	get.Flags().BoolVar(&noOwners, "no-owners", false, "do not set the guest's owners (they are set only when running as root)")
	for _, c := range []*cobra.Command{ls, get} {
		c.Flags().StringVar(&sel.disk, "disk", "", "the `disk` (name or index; default the first)")
		c.Flags().StringVar(&sel.volume, "volume", "", "the `volume` on the disk: p1, p2… for partitions, vg/lv for LVM (default its only filesystem)")
		cmd.AddCommand(c)
	}
	return cmd
}

func (a *app) openSnapshot(ctx context.Context, arg string) (*repo.Repo, *repo.Snapshot, error) {
	r, err := a.open(ctx)
	if err != nil {
		return nil, nil, err
	}
	snap, err := findSnapshot(ctx, r, arg)
	if err != nil {
		return nil, nil, err
	}
	return r, snap, nil
}

// volumeSelection picks one filesystem of a restore point.
type volumeSelection struct {
	disk, volume string
}

// open finds the selected filesystem and opens it; where names it
// ("vdb p2").
func (s volumeSelection) open(ctx context.Context, r *repo.Repo, snap *repo.Snapshot, a *app) (f guestfs.FS, where string, err error) {
	disks, err := selectDisks(snap, s.disk)
	if err != nil {
		return nil, "", err
	}
	d := disks[0]
	k, err := snapdisk.Open(ctx, r, snap.ID, d, snapdisk.Options{Logger: a.log})
	if err != nil {
		return nil, "", err
	}
	disk := k.ReaderAt(ctx)
	vols, err := guestfs.Probe(ctx, disk, k.Size())
	if err != nil {
		return nil, "", fmt.Errorf("disk %s of snapshot %s: %w", d.Name, snap.ID[:8], err)
	}
	var found []guestfs.Volume
	var names []string
	for _, v := range vols {
		if v.FSType == "" {
			continue
		}
		names = append(names, fmt.Sprintf("%s (%s)", volName(v), v.FSType))
		if s.volume == "" || v.Name == s.volume || (s.volume == "disk" && v.Name == "") || (v.Label != "" && v.Label == s.volume) {
			found = append(found, v)
		}
	}
	switch {
	case len(names) == 0:
		return nil, "", fmt.Errorf("disk %s of snapshot %s holds no filesystem kura can read (ext2/3/4, xfs, vfat, ntfs): see `kura files ls %s`", d.Name, snap.ID[:8], snap.ID[:8])
	case len(found) == 0:
		return nil, "", fmt.Errorf("disk %s has no volume %q: it has %s", d.Name, s.volume, strings.Join(names, ", "))
	case len(found) > 1:
		return nil, "", fmt.Errorf("disk %s has several filesystems: %s; pick one with --volume", d.Name, strings.Join(names, ", "))
	}
	f, err = guestfs.Open(ctx, disk, k.Size(), found[0])
	if err != nil {
		return nil, "", fmt.Errorf("disk %s of snapshot %s: %w", d.Name, snap.ID[:8], err)
	}
	return f, d.Name + " " + volName(found[0]), nil
}

func volName(v guestfs.Volume) string {
	if v.Name == "" {
		return "disk"
	}
	return v.Name
}

func (a *app) listVolumes(ctx context.Context, r *repo.Repo, snap *repo.Snapshot, sel volumeSelection) error {
	disks, err := selectDisks(snap, sel.disk)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
	fmt.Fprintln(tw, "DISK\tVOLUME\tFS\tLABEL\tSIZE\tNOTE")
	for _, d := range disks {
		k, err := snapdisk.Open(ctx, r, snap.ID, d, snapdisk.Options{Logger: a.log})
		if err != nil {
			return err
		}
		vols, err := guestfs.Probe(ctx, k.ReaderAt(ctx), k.Size())
		if err != nil {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t%s\t%s\n", show(d.Name), humanBytes(d.Size), termsafe.Line(err.Error()))
			continue
		}
		for _, v := range vols {
			fsType, note := v.FSType, ""
			if fsType == "" {
				fsType, note = "-", termsafe.Line(fmt.Sprint(v.Err))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", show(d.Name), show(volName(v)), show(fsType), show(v.Label), humanBytes(v.Size), note)
		}
	}
	return tw.Flush()
}

func (a *app) listPath(ctx context.Context, f guestfs.FS, p string) error {
	e, err := f.Lstat(ctx, p)
	if err != nil {
		return err
	}
	entries := []guestfs.Entry{e}
	dir := path.Dir(p)
	if e.Mode.IsDir() {
		if entries, err = f.ReadDir(ctx, p); err != nil {
			return err
		}
		dir = p
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 2, 1, ' ', tabwriter.AlignRight)
	for _, e := range entries {
		name := show(e.Name)
		if e.Mode&fs.ModeSymlink != 0 {
			if target, err := f.Readlink(ctx, path.Join(dir, e.Name)); err == nil {
				name += " -> " + show(target)
			}
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t %s\t %s\n", e.Mode, e.Nlink, e.UID, e.GID, e.Size, e.ModTime.Local().Format("2006-01-02 15:04"), name)
	}
	return tw.Flush()
}
