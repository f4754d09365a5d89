package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/retention"
	"github.com/kura-backup/kura/internal/termsafe"
	"github.com/kura-backup/kura/internal/units"
)

func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (a *app) initCmd() *cobra.Command {
	var (
		chunkSize, packSize, copyKeyFrom, fromPw string
		lockMode                                 string
		lockDays, maintenanceDays                int
	)
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create an encrypted repository",
		Long: "init creates an encrypted repository at --repo (KURA_REPO) under a new password.\n" +
			"With --copy-key-from SRC it shares SRC's master key and chunk size, under its own password, so that `kura copy`\n" +
			"between the two sends blobs sealed as they are (SRC's password: --from-password-file, KURA_FROM_PASSWORD_FILE or\n" +
			"KURA_FROM_PASSWORD, else the repository password; see docs/COPY.md).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cs, err := parseChunkSize(chunkSize)
			if err != nil {
				return err
			}
			ps := 0 // the default for the storage, below
			if packSize != "" {
				if ps, err = parsePackSize(packSize); err != nil {
					return err
				}
			}
			var lock *repo.LockConfig
			if lockMode != "" {
				lock = &repo.LockConfig{Mode: lockMode, Days: lockDays, MaintenanceDays: maintenanceDays}
				if err := lock.Validate(); err != nil {
					return err
				}
			} else if cmd.Flags().Changed("lock-days") || cmd.Flags().Changed("lock-maintenance-days") {
				return errors.New("--lock-days and --lock-maintenance-days go with --lock compliance|governance")
			}
			be, err := a.backend(ctx)
			if err != nil {
				return err
			}
			if ps == 0 {
				ps = defaultPackSize(be.Location())
			}
			opts := repo.InitOptions{ChunkSize: cs, PackSize: ps}
			if copyKeyFrom != "" {
				src := copySide{role: "source", loc: copyKeyFrom, pwFile: fromPw, pwEnv: "KURA_FROM_PASSWORD"}
				sr, err := a.openSide(ctx, src)
				if err != nil {
					return err
				}
				cfg := sr.Config()
				if cmd.Flags().Changed("chunk-size") && cs != cfg.ChunkSize {
					return fmt.Errorf("--chunk-size %s: --copy-key-from takes the chunk size of %s (%s); leave --chunk-size out", chunkSize, copyKeyFrom, humanBytes(int64(cfg.ChunkSize)))
				}
				opts = repo.InitOptions{ChunkSize: cfg.ChunkSize, PackSize: ps, Key: sr.Key()}
			}
			pw, err := a.password("new repository password: ", true)
			if err != nil {
				return err
			}
			opts.Lock = lock
			r, err := repo.Init(ctx, be, pw, opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "created repository %s at %s (chunk size %s, pack size %s)\n", r.Config().ID[:8], be.Location(),
				humanBytes(int64(r.Config().ChunkSize)), humanBytes(int64(r.Config().PackSize)))
			if lc := r.ObjectLock(); lc != nil {
				fmt.Fprintf(a.stdout, "object lock: %s mode, every object locked for %d days; prune at least every %d days to keep what restore points need locked\n", strings.ToLower(lc.Mode), lc.Days, lc.MaintenanceDays)
			}
			if copyKeyFrom != "" {
				fmt.Fprintf(a.stdout, "it shares the master key of %s: `kura copy` between them copies blobs as they are\n", copyKeyFrom)
			}
			fmt.Fprintln(a.stdout, "keep the password safe: without it the data cannot be read")
			return nil
		},
	}
	cmd.Flags().StringVar(&chunkSize, "chunk-size", "256K", "chunk `size`, a power of two from 64K to 16M")
	cmd.Flags().StringVar(&packSize, "pack-size", "", "target `size` of the pack files chunks are stored in, from 4M to 128M (default 16M in a directory, 24M on S3: fewer requests, still one PUT each)")
	cmd.Flags().StringVar(&lockMode, "lock", "", "lock every object against deletion and overwrite (S3 object lock): `compliance` or governance")
	cmd.Flags().IntVar(&lockDays, "lock-days", 30, "with --lock: `days` every object stays locked, moved forward by prune while restore points need it")
	cmd.Flags().IntVar(&maintenanceDays, "lock-maintenance-days", repo.DefaultMaintenanceDays, "with --lock: the longest time in `days` between two prunes (the lock must outlast it by a day)")
	cmd.Flags().StringVar(&copyKeyFrom, "copy-key-from", "", "share the master key and chunk size of the repository at `location` (for kura copy)")
	cmd.Flags().StringVar(&fromPw, "from-password-file", os.Getenv("KURA_FROM_PASSWORD_FILE"), "with --copy-key-from: read its password from `file` (env KURA_FROM_PASSWORD_FILE; or set KURA_FROM_PASSWORD)")
	return cmd
}

// parseChunkSize reads --chunk-size and checks it before any password is
// asked for.
func parseChunkSize(s string) (int, error) {
	n, err := units.ParseSize(s)
	if err != nil {
		return 0, fmt.Errorf("--chunk-size: %w", err)
	}
	if n < repo.MinChunkSize || n > repo.MaxChunkSize || n&(n-1) != 0 {
		return 0, fmt.Errorf("--chunk-size %s: use a power of two from 64KiB to 16MiB, like 256K or 1MiB", s)
	}
	return int(n), nil
}

// Pack sizes kura init accepts. Below 4 MiB a repository on S3 pays a
// request per few chunks; above 128 MiB a pack buffer per upload in
// flight costs more memory than it saves requests.
const (
	minPackSize = 4 << 20
	maxPackSize = 128 << 20
)

// defaultPackSize is the pack size of a new repository at loc: 16 MiB in
// a directory; 24 MiB on S3, where every pack costs a request and 24 MiB
// still goes up in one PUT (docs/BENCHMARKS.md, pack sizes on S3).
func defaultPackSize(loc string) int {
	if strings.HasPrefix(loc, "s3:") {
		return 24 << 20
	}
	return 16 << 20
}

// parsePackSize reads --pack-size and checks it before any password is
// asked for. It need not be a power of two.
func parsePackSize(s string) (int, error) {
	n, err := units.ParseSize(s)
	if err != nil {
		return 0, fmt.Errorf("--pack-size: %w", err)
	}
	if n < minPackSize || n > maxPackSize {
		return 0, fmt.Errorf("--pack-size %s: use a size from 4MiB to 128MiB, like 16M or 48MiB", s)
	}
	return int(n), nil
}

func (a *app) snapshotsCmd() *cobra.Command {
	var name string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "snapshots",
		Short: "List restore points, newest last",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			ss, damaged, err := r.SnapshotsLenient(cmd.Context())
			if err != nil {
				return err
			}
			for _, id := range damaged {
				fmt.Fprintf(a.stderr, "kura: warning: snapshot %s is damaged and not listed; run `kura verify`\n", show(short(id)))
			}
			var out []*repo.Snapshot
			for _, s := range ss {
				if name == "" || s.Name == name {
					out = append(out, s)
				}
			}
			if asJSON {
				type js struct {
					ID string `json:"id"`
					*repo.Snapshot
				}
				list := make([]js, 0, len(out))
				for _, s := range out {
					list = append(list, js{s.ID, s})
				}
				return a.printJSON(list)
			}
			checks, err := r.LastBootChecks(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tTIME\tNAME\tSOURCE\tKIND\tMODE\tDISKS\tSIZE\tREAD\tNEW\tDURATION\tBOOT")
			for _, s := range out {
				mode := show(s.Mode)
				if mode == "" {
					mode = "-"
				}
				if s.Stats.FreezeMillis > 0 {
					mode += fmt.Sprintf(" (frozen %.0fms)", s.Stats.FreezeMillis)
				} else if s.Stats.PauseMillis > 0 {
					mode += fmt.Sprintf(" (%s %.0fms)", pausedOrDown(s.Mode), s.Stats.PauseMillis)
				}
				boot := "-"
				if c := checks[s.ID]; c != nil {
					boot = "FAIL"
					if c.Passed {
						boot = "pass"
					}
					boot += " " + c.Time.Local().Format("01-02 15:04")
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", show(short(s.ID)), s.Time.Local().Format("2006-01-02 15:04:05"), show(s.Name), show(s.Source), show(s.Kind), mode,
					len(s.Disks), humanBytes(s.LogicalSize()), humanBytes(s.Stats.BytesRead), humanBytes(s.Stats.BytesNew), s.Stats.End.Sub(s.Stats.Start).Round(10*time.Millisecond), boot)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "%d snapshots\n", len(out))
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "only restore points of this `name`")
	cmd.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	return cmd
}

func (a *app) verifyCmd() *cobra.Command {
	var readData, asJSON, boot bool
	var bo bootOptions
	cmd := &cobra.Command{
		Use:   "verify [--read-data] | --boot SNAPSHOT [--check CMD]",
		Short: "Check the repository's structure; --read-data authenticates every chunk; --boot boots a restore point",
		Long: "verify checks the repository's structure; --read-data also reads and authenticates every chunk.\n" +
			"verify --boot SNAPSHOT boots the restore point isolated (no network, on throwaway overlays over an NBD export of the\n" +
			"repository; nothing of the source VM is touched), waits for its guest agent, runs --check in the guest if given,\n" +
			"saves a screenshot of the console, tears everything down and records pass or fail in the repository.",
		Args: func(cmd *cobra.Command, args []string) error {
			if boot {
				return cobra.ExactArgs(1)(cmd, args)
			}
			return cobra.NoArgs(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if boot {
				return a.verifyBoot(cmd.Context(), args[0], bo)
			}
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			var packs atomic.Int64
			started := time.Now()
			stop := progressLine(a.stderr, readData && a.progressOn(), func() string {
				return fmt.Sprintf("verify: %d packs read in %s", packs.Load(), time.Since(started).Round(time.Second))
			})
			res, err := r.Check(cmd.Context(), repo.CheckOptions{ReadData: readData, PacksDone: &packs})
			stop()
			if err != nil {
				return err
			}
			if asJSON {
				if err := a.printJSON(res); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(a.stdout, "%d snapshots, %d packs, %d chunks", res.Snapshots, res.Packs, res.Blobs)
				if readData {
					fmt.Fprintf(a.stdout, ", %d packs read and authenticated", res.PacksRead)
				}
				fmt.Fprintln(a.stdout)
				if res.UnindexedPacks > 0 {
					fmt.Fprintf(a.stdout, "%d packs no index lists hold nothing a restore point needs (left by interrupted backups; `kura prune` removes them)\n", res.UnindexedPacks)
				}
				if res.Healed > 0 {
					fmt.Fprintf(a.stdout, "%d damaged chunk copies are healed (an intact copy was stored since; `kura prune` removes the damaged ones)\n", res.Healed)
				}
				for _, p := range res.Problems {
					fmt.Fprintf(a.stdout, "PROBLEM %s: %s", show(p.Object), termsafe.Line(p.Error))
					if len(p.Snapshots) > 0 {
						fmt.Fprintf(a.stdout, " [affects snapshots: %s]", strings.Join(termsafe.Quotes(p.Snapshots), ", "))
					}
					fmt.Fprintln(a.stdout)
				}
				if res.OK() {
					fmt.Fprintln(a.stdout, "no problems found")
				}
			}
			if !res.OK() {
				return damageFound{len(res.Problems)}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&readData, "read-data", false, "read and authenticate every chunk")
	cmd.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	cmd.Flags().BoolVar(&boot, "boot", false, "boot the restore point isolated and check that it comes up")
	cmd.Flags().StringVar(&bo.check, "check", "", "with --boot: a shell `command` run in the guest through its agent; it must exit 0")
	cmd.Flags().StringVar(&bo.screenshot, "screenshot", "", "with --boot: where to save the console screenshot (`PNG file`; default kura-verify-ID.png)")
	cmd.Flags().StringVarP(&bo.connect, "connect", "c", "qemu:///system", "with --boot: libvirt `URI` or socket path")
	cmd.Flags().DurationVar(&bo.timeout, "timeout", 5*time.Minute, "with --boot: how long the guest may take to answer")
	durRange(cmd.Flags(), "timeout", time.Second, 24*time.Hour, "")
	return cmd
}

func (a *app) forgetCmd() *cobra.Command {
	var p retention.Policy
	var name string
	var prune, dryRun, asJSON bool
	cmd := &cobra.Command{
		Use:   "forget [SNAPSHOT...]",
		Short: "Remove restore points by id or by a retention policy",
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if len(args) == 0 && p.Empty() {
				return fmt.Errorf("nothing to forget: name snapshots, or give a policy such as --keep-last 3")
			}
			r, err := a.open(ctx)
			if err != nil {
				return err
			}
			ss, damaged, err := r.SnapshotsLenient(ctx)
			if err != nil {
				return err
			}
			type verdict struct {
				ID      string   `json:"id"`
				Name    string   `json:"name"`
				Time    string   `json:"time"`
				Keep    bool     `json:"keep"`
				Reasons []string `json:"reasons,omitempty"`
			}
			var verdicts []verdict
			var remove []*repo.Snapshot
			for _, ref := range args {
				s, err := repo.FindSnapshot(ss, ref)
				if err != nil {
					// A damaged snapshot can still be forgotten by its id.
					var hits []string
					for _, id := range damaged {
						if strings.HasPrefix(id, ref) {
							hits = append(hits, id)
						}
					}
					if len(hits) != 1 {
						return err
					}
					s = &repo.Snapshot{ID: hits[0], Name: "(damaged)"}
				}
				remove = append(remove, s)
				verdicts = append(verdicts, verdict{ID: s.ID[:8], Name: s.Name, Time: s.Time.Local().Format(time.DateTime)})
			}
			if !p.Empty() {
				groups := map[string][]*repo.Snapshot{}
				for _, s := range ss {
					if name == "" || s.Name == name {
						groups[s.Name] = append(groups[s.Name], s)
					}
				}
				names := make([]string, 0, len(groups))
				for n := range groups {
					names = append(names, n)
				}
				sort.Strings(names)
				for _, n := range names {
					byID := map[string]*repo.Snapshot{}
					var items []retention.Item
					for _, s := range groups[n] {
						byID[s.ID] = s
						items = append(items, retention.Item{ID: s.ID, Time: s.Time})
					}
					for _, d := range retention.Apply(items, p, time.Local) {
						verdicts = append(verdicts, verdict{ID: d.ID[:8], Name: n, Time: d.Time.Local().Format(time.DateTime), Keep: d.Keep, Reasons: d.Reasons})
						if !d.Keep {
							remove = append(remove, byID[d.ID])
						}
					}
				}
			}
			if !dryRun {
				for _, s := range remove {
					if err := r.RemoveSnapshot(ctx, s.ID); err != nil {
						return err
					}
				}
			}
			var pres *repo.PruneResult
			if prune && !dryRun {
				res, err := r.Prune(ctx, repo.PruneOptions{RepackBelow: 0.5})
				if err != nil {
					return fmt.Errorf("snapshots forgotten, but prune failed: %w", err)
				}
				pres = &res
			}
			if asJSON {
				return a.printJSON(map[string]any{"snapshots": verdicts, "removed": len(remove), "dry_run": dryRun, "prune": pres})
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tTIME\tNAME\tACTION\tREASONS")
			for _, v := range verdicts {
				act := "forget"
				if v.Keep {
					act = "keep"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", show(v.ID), v.Time, show(v.Name), act, strings.Join(v.Reasons, ", "))
			}
			tw.Flush()
			verb := "removed"
			if dryRun {
				verb = "would remove"
			}
			fmt.Fprintf(a.stdout, "%s %d snapshots\n", verb, len(remove))
			if pres != nil {
				a.printPrune(*pres)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&name, "name", "", "apply the policy only to restore points of this `name`")
	f.IntVar(&p.Last, "keep-last", 0, "keep the last `n` restore points")
	f.IntVar(&p.Hourly, "keep-hourly", 0, "keep the newest of each of the last `n` hours")
	f.IntVar(&p.Daily, "keep-daily", 0, "keep the newest of each of the last `n` days")
	f.IntVar(&p.Weekly, "keep-weekly", 0, "keep the newest of each of the last `n` weeks")
	f.IntVar(&p.Monthly, "keep-monthly", 0, "keep the newest of each of the last `n` months")
	f.IntVar(&p.Yearly, "keep-yearly", 0, "keep the newest of each of the last `n` years")
	for _, k := range []string{"keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly"} {
		numRange(f, k, 1, 1e6, "leave it out to keep none by this rule")
	}
	f.BoolVar(&prune, "prune", false, "prune afterwards")
	f.BoolVarP(&dryRun, "dry-run", "n", false, "only show what would be removed")
	f.BoolVar(&asJSON, "json", false, "machine-readable output")
	return cmd
}

func (a *app) printPrune(res repo.PruneResult) {
	if l := res.Lock; l != nil {
		fmt.Fprintf(a.stdout, "prune: %d packs removed (%s), %d repacked; on a locked repository their bytes are freed once their lock ends\n", res.PacksDeleted, humanBytes(res.BytesFreed), res.PacksRepacked)
		if l.Extended > 0 {
			fmt.Fprintf(a.stdout, "prune: object lock of %d objects restore points need moved forward to %s\n", l.Extended, l.ExtendedUntil.Local().Format(time.DateTime))
		}
		fmt.Fprintf(a.stdout, "prune: %d locked versions of removed objects deleted (%s freed)", l.Purged, humanBytes(l.PurgedBytes))
		if l.Waiting > 0 {
			fmt.Fprintf(a.stdout, "; %d (%s) still locked, until %s at the latest: a later prune deletes them", l.Waiting, humanBytes(l.WaitingBytes), l.WaitingUntil.Local().Format(time.DateTime))
		}
		fmt.Fprintln(a.stdout)
		if len(l.Hidden) > 0 {
			fmt.Fprintf(a.stderr, "WARNING: %d objects the repository needs are hidden by delete markers (first: %s): someone deleted them; their locked versions are intact: see \"Recovery after an attack\" in docs/S3.md\n", len(l.Hidden), show(l.Hidden[0]))
		}
		if len(l.Overwritten) > 0 {
			fmt.Fprintf(a.stderr, "WARNING: %d objects were overwritten (first: %s), which kura never does; their earlier, locked versions are intact: see \"Recovery after an attack\" in docs/S3.md\n", len(l.Overwritten), show(l.Overwritten[0]))
		}
	} else {
		fmt.Fprintf(a.stdout, "prune: %d packs deleted (%s freed), %d repacked\n", res.PacksDeleted, humanBytes(res.BytesFreed), res.PacksRepacked)
	}
	if res.TempRemoved > 0 {
		fmt.Fprintf(a.stdout, "prune: %d temporary files left by processes that died removed (%s)\n", res.TempRemoved, humanBytes(res.TempBytes))
	}
	if res.PacksPending > 0 {
		fmt.Fprintf(a.stdout, "prune: %d packs (%s) marked for deletion wait for %d running backups or readers; the next prune after they finish deletes them\n", res.PacksPending, humanBytes(res.BytesPending), len(res.WaitingFor))
	}
	if res.PacksKept > 0 {
		fmt.Fprintf(a.stdout, "prune: kept %d packs whose header is unreadable and that no index lists; see `kura verify`\n", res.PacksKept)
	}
}

func (a *app) pruneCmd() *cobra.Command {
	var dryRun, asJSON bool
	var repack float64
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Delete data that no restore point references (safe while backups run)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			res, err := r.Prune(cmd.Context(), repo.PruneOptions{RepackBelow: repack, DryRun: dryRun})
			if err != nil {
				return err
			}
			if asJSON {
				return a.printJSON(res)
			}
			if dryRun {
				fmt.Fprintf(a.stdout, "would delete %d packs (%s freed), %d of them after repacking their live chunks\n", res.PacksDeleted, humanBytes(res.BytesFreed), res.PacksRepacked)
				if res.PacksPending > 0 {
					fmt.Fprintf(a.stdout, "would mark %d packs (%s) for deletion; %d running backups or readers must finish first\n", res.PacksPending, humanBytes(res.BytesPending), len(res.WaitingFor))
				}
				return nil
			}
			a.printPrune(res)
			return nil
		},
	}
	cmd.Flags().BoolVarP(&dryRun, "dry-run", "n", false, "only show what would be deleted")
	cmd.Flags().Float64Var(&repack, "repack-below", 0.5, "repack packs whose live fraction is below this")
	numRange(cmd.Flags(), "repack-below", 0, 1, "a fraction; 0 repacks nothing")
	cmd.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	return cmd
}

func (a *app) statsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "stats",
		Short: "Logical size, stored size, dedup and compression ratios",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			st, err := r.Stats(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return a.printJSON(st)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
			fmt.Fprintf(tw, "snapshots\t%d\n", st.Snapshots)
			fmt.Fprintf(tw, "logical size (disks)\t%s\n", humanBytes(st.LogicalBytes))
			fmt.Fprintf(tw, "data (non-zero)\t%s\n", humanBytes(st.DataBytes))
			fmt.Fprintf(tw, "unique data\t%s in %d chunks\n", humanBytes(st.UniqueBytes), st.Chunks)
			fmt.Fprintf(tw, "stored\t%s in %d packs\n", humanBytes(st.StoredBytes), st.Packs)
			fmt.Fprintf(tw, "dedup ratio\t%.2fx\n", st.DedupRatio)
			fmt.Fprintf(tw, "compression ratio\t%.2fx\n", st.CompressionRatio)
			fmt.Fprintf(tw, "data / stored\t%.2fx\n", st.TotalRatio)
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	return cmd
}

func (a *app) keyCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "key", Short: "Manage the passwords that unlock the repository"}
	var newPwFile string
	add := &cobra.Command{
		Use:   "add",
		Short: "Add a password (from --new-password-file, KURA_NEW_PASSWORD or a prompt)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			var pw []byte
			switch {
			case newPwFile != "":
				data, err := os.ReadFile(newPwFile)
				if err != nil {
					return err
				}
				pw = []byte(strings.TrimRight(string(data), "\r\n"))
			case os.Getenv("KURA_NEW_PASSWORD") != "":
				pw = []byte(os.Getenv("KURA_NEW_PASSWORD"))
			default:
				saved, had := os.LookupEnv("KURA_PASSWORD")
				os.Unsetenv("KURA_PASSWORD")
				pf := a.passwordFile
				a.passwordFile = ""
				pw, err = a.password("new password: ", true)
				a.passwordFile = pf
				if had {
					os.Setenv("KURA_PASSWORD", saved)
				}
				if err != nil {
					return err
				}
			}
			id, err := r.AddKey(cmd.Context(), pw)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "added key %s\n", id[:8])
			return nil
		},
	}
	add.Flags().StringVar(&newPwFile, "new-password-file", "", "read the new password from `file`")
	var asJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List keys",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			keys, err := r.ListKeys(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return a.printJSON(keys)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
			fmt.Fprintln(tw, " ID\tCREATED\tUSER\tHOST")
			for _, k := range keys {
				cur := " "
				if k.Current {
					cur = "*"
				}
				if k.Damaged != "" {
					fmt.Fprintf(tw, "%s%s\tDAMAGED (%s)\t\t\n", cur, show(short(k.ID)), termsafe.Line(k.Damaged))
					continue
				}
				fmt.Fprintf(tw, "%s%s\t%s\t%s\t%s\n", cur, show(short(k.ID)), k.Created.Local().Format(time.DateTime), show(k.Username), show(k.Hostname))
			}
			return tw.Flush()
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	remove := &cobra.Command{
		Use:   "remove ID",
		Short: "Remove a key (not the one in use, not the last)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			if err := r.RemoveKey(cmd.Context(), args[0]); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "removed key %s\n", show(args[0]))
			return nil
		},
	}
	cmd.AddCommand(add, list, remove)
	return cmd
}

func (a *app) unlockCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "unlock",
		Short: "Remove locks left by processes that died",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := a.open(cmd.Context())
			if err != nil {
				return err
			}
			removed, err := r.RemoveStaleLocks(cmd.Context())
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "removed %d stale locks\n", len(removed))
			return nil
		},
	}
}
