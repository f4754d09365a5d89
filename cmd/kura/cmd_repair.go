package main

import (
	"fmt"
	"sort"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/termsafe"
)

func (a *app) repairCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "repair",
		Short: "Rebuild the index from the packs, or mark what restore points lost for good",
	}
	var asJSON bool
	index := &cobra.Command{
		Use:   "index",
		Short: "Rebuild the index from the pack headers (replaces every index file)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			res, err := r.RepairIndex(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return a.printJSON(res)
			}
			fmt.Fprintf(a.stdout, "read %d pack headers: %d chunks indexed in %d new index files; %d old index files removed\n", res.Packs, res.Blobs, res.FilesWritten, res.FilesRemoved)
			if res.FromOldIndex > 0 {
				fmt.Fprintf(a.stdout, "%d packs have an unreadable header: their entries were kept from the old index\n", res.FromOldIndex)
			}
			ids := make([]string, 0, len(res.Unreadable))
			for id := range res.Unreadable {
				ids = append(ids, id)
			}
			sort.Strings(ids)
			for _, id := range ids {
				fmt.Fprintf(a.stdout, "UNREADABLE pack %s: %s (no index lists it: its chunks cannot be found; `kura repair snapshots` marks what is lost)\n", id[:8], termsafe.Line(res.Unreadable[id]))
			}
			if len(ids) > 0 {
				return damageFound{len(ids)}
			}
			return nil
		},
	}
	index.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")

	var rewrite, snapJSON bool
	snapshots := &cobra.Command{
		Use:   "snapshots [SNAPSHOT...]",
		Short: "Report restore points that reference chunks lost for good; --rewrite replaces them by ones that restore (lost ranges as zeros)",
		Long: "repair snapshots lists, per restore point and disk, the byte ranges whose chunks no pack holds intact.\n" +
			"Back up the same VMs first: a backup that reads the same data stores damaged chunks again, which heals every\n" +
			"restore point that uses them. --rewrite then replaces each affected restore point by a new one whose lost\n" +
			"ranges read as zeros (listed in the new restore point) and removes the original.",
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := a.open(ctx)
			if err != nil {
				return err
			}
			var ids []string
			for _, ref := range args {
				s, err := findSnapshot(ctx, r, ref)
				if err != nil {
					return err
				}
				ids = append(ids, s.ID)
			}
			lost, err := r.RepairSnapshots(ctx, repo.RepairSnapshotsOptions{Rewrite: rewrite, IDs: ids})
			if err != nil {
				return err
			}
			if snapJSON {
				if lost == nil {
					lost = []repo.LostSnapshot{}
				}
				return a.printJSON(lost)
			}
			for _, ls := range lost {
				for _, d := range ls.Disks {
					fmt.Fprintf(a.stdout, "snapshot %s (%s) disk %s: %d chunks missing, %d damaged, %s lost in %d ranges\n", ls.ID[:8], show(ls.Name), show(d.Name), d.Missing, d.Damaged, humanBytes(rangeBytes(d.Ranges)), len(d.Ranges))
					for _, rg := range d.Ranges {
						fmt.Fprintf(a.stdout, "  lost: bytes %d-%d (%s)\n", rg.Offset, rg.Offset+rg.Length-1, humanBytes(rg.Length))
					}
				}
				if ls.Repaired != "" {
					fmt.Fprintf(a.stdout, "snapshot %s rewritten as %s (lost ranges read as zeros); %s removed\n", ls.ID[:8], ls.Repaired[:8], ls.ID[:8])
				}
			}
			switch {
			case len(lost) == 0:
				fmt.Fprintln(a.stdout, "every restore point's chunks are there")
			case !rewrite:
				fmt.Fprintf(a.stdout, "%d restore points lost data; `kura repair snapshots --rewrite` replaces them by ones that restore\n", len(lost))
			}
			return nil
		},
	}
	snapshots.Flags().BoolVar(&rewrite, "rewrite", false, "replace each affected restore point by one whose lost ranges read as zeros, and remove the original")
	snapshots.Flags().BoolVar(&snapJSON, "json", false, "machine-readable output")
	cmd.AddCommand(index, snapshots)
	return cmd
}
