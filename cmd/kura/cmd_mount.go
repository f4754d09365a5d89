package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/guestfuse"
)

func (a *app) mountCmd() *cobra.Command {
	var sel volumeSelection
	var allowOther bool
	cmd := &cobra.Command{
		Use:   "mount SNAPSHOT MOUNTPOINT [--disk NAME] [--volume p2]",
		Short: "Browse a filesystem of a restore point read-only (FUSE) until interrupted",
		Long: "mount serves one guest filesystem of a restore point at MOUNTPOINT, read-only, nosuid, nodev and noexec, through FUSE.\n" +
			"The guest filesystem is read by kura's own user-space parsers: the host kernel only sees the FUSE view.\n" +
			"Ctrl-C (or `fusermount -u MOUNTPOINT`) unmounts.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, snap, err := a.openSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			f, where, err := sel.open(ctx, r, snap, a)
			if err != nil {
				return err
			}
			m, err := guestfuse.Mount(ctx, f, args[1], guestfuse.Options{
				FSName: fmt.Sprintf("kura:%s@%s:%s", snap.Name, snap.ID[:8], where), Logger: a.log, AllowOther: allowOther})
			if err != nil {
				return fmt.Errorf("mounting %s of %s at %s: %w", where, snap.ID[:8], args[1], err)
			}
			fmt.Fprintf(a.stdout, "mounted %s of restore point %s (%s) read-only at %s; press Ctrl-C to unmount\n", show(where), snap.ID[:8], show(snap.Name), show(args[1]))
			done := make(chan error, 1)
			go func() { done <- m.Wait() }()
			select {
			case err := <-done:
				fmt.Fprintf(a.stdout, "%s was unmounted\n", show(args[1]))
				return err
			case <-ctx.Done():
			}
			if err := m.Unmount(); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "unmounted %s\n", show(args[1]))
			return nil
		},
	}
	cmd.Flags().StringVar(&sel.disk, "disk", "", "the `disk` (name or index; default the first)")
	cmd.Flags().StringVar(&sel.volume, "volume", "", "the `volume` on the disk: p1, p2… for partitions, vg/lv for LVM (default its only filesystem)")
	cmd.Flags().BoolVar(&allowOther, "allow-other", false, "let other users than the one mounting see the files (their guest modes still apply)")
	return cmd
}
