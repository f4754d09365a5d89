package main

import (
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/export"
	"github.com/kura-backup/kura/internal/repo"
)

// runDir holds kura's sockets and instant-recovery sessions.
const runDir = "/run/kura"

func (a *app) exportCmd() *cobra.Command {
	var disk, socket string
	var cacheMiB int64
	cmd := &cobra.Command{
		Use:   "export SNAPSHOT [--disk NAME] [--socket PATH]",
		Short: "Serve the disks of a restore point read-only over NBD until interrupted",
		Long: "export serves each disk of a restore point (or the one --disk names) as a read-only NBD export named after the disk,\n" +
			"straight from the repository. Any NBD client can read it: qemu-img, nbdcopy, nbdinfo, QEMU.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, snap, err := a.openSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			disks, err := selectDisks(snap, disk)
			if err != nil {
				return err
			}
			if socket == "" {
				// A name saved before names were checked may hold a "/".
				name := snap.Name
				if repo.ValidName(name) != nil {
					name = "snapshot"
				}
				socket = filepath.Join(runDir, fmt.Sprintf("%s-%s.sock", name, snap.ID[:8]))
			}
			srv, err := export.Start(ctx, r, snap, disks, socket, export.Options{CacheBytes: cacheMiB << 20, Logger: a.log})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "serving snapshot %s (%s, %s) read-only on %s:\n", snap.ID[:8], show(snap.Name), snap.Time.Local().Format("2006-01-02 15:04:05"), show(socket))
			for _, d := range disks {
				fmt.Fprintf(a.stdout, "  %s  %s\n", show(srv.URI(d.Name)), humanBytes(d.Size))
			}
			fmt.Fprintln(a.stdout, "press Ctrl-C to stop")
			<-ctx.Done()
			return srv.Close()
		},
	}
	cmd.Flags().StringVar(&disk, "disk", "", "serve only this disk (`name or index`)")
	cmd.Flags().StringVar(&socket, "socket", "", "unix socket `path` (default "+runDir+"/NAME-ID.sock)")
	cmd.Flags().Int64Var(&cacheMiB, "cache", 64, "chunk cache per disk in `MiB`")
	numRange(cmd.Flags(), "cache", 1, 1<<20, "MiB per disk")
	return cmd
}
