package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/catalog"
	"github.com/kura-backup/kura/internal/config"
	"github.com/kura-backup/kura/internal/daemon"
	"github.com/kura-backup/kura/internal/termsafe"
)

const defaultConfig = "/etc/kura/kura.yaml"

func (a *app) serverCmd() *cobra.Command {
	var cfgPath string
	cmd := &cobra.Command{
		Use:   "server [--config FILE]",
		Short: "Run the kura daemon: every job of the configuration on schedule, under limits and latency control",
		Long: "server runs the jobs of its configuration file on their schedules, at most as many backups at once as the limits allow,\n" +
			"slowing backups down (and starting no new ones on a datastore) while the guests' I/O latency is above the threshold.\n" +
			"SIGHUP rereads the configuration without interrupting running backups. Metrics are on http://LISTEN/metrics.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cfg, err := config.Load(cfgPath)
			if err != nil {
				return err
			}
			log := a.log
			level := slog.LevelInfo
			if a.verbose {
				level = slog.LevelDebug
			}
			if cfg.Server.LogFormat == "json" {
				log = slog.New(slog.NewJSONHandler(a.stderr, &slog.HandlerOptions{Level: level}))
			} else {
				log = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
			}
			d, err := daemon.New(daemon.Options{ConfigPath: cfgPath, Logger: log})
			if err != nil {
				return err
			}
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			go func() {
				for {
					select {
					case <-hup:
						d.Reload(ctx, true)
					case <-ctx.Done():
						return
					}
				}
			}()
			return d.Run(ctx)
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", defaultConfig, "configuration `file`")
	return cmd
}

func (a *app) runNowCmd() *cobra.Command {
	var cfgPath string
	var wait bool
	cmd := &cobra.Command{
		Use:   "run-now JOB [--wait] [--config FILE]",
		Short: "Ask the running kura server to start a run of JOB now",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cfg, err := config.Load(cfgPath)
			if err != nil {
				return err
			}
			asked := time.Now()
			msg, err := post(ctx, cfg.Server.Listen, "/run-now?job="+url.QueryEscape(args[0]))
			if err != nil {
				return err
			}
			fmt.Fprintln(a.stdout, termsafe.Line(strings.TrimRight(msg, "\n")))
			if !wait {
				return nil
			}
			r, err := waitForRun(ctx, cfg.Server.Catalog, args[0], asked)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "run %d of job %s: %s in %s: %s\n", r.ID, show(r.Job), show(r.Status), r.Ended.Sub(r.Started).Round(time.Millisecond), termsafe.Line(r.Summary))
			if r.Status != catalog.StatusSucceeded {
				return fmt.Errorf("run %d of job %s %s: see `kura runs --run %d`", r.ID, show(r.Job), show(r.Status), r.ID)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", defaultConfig, "configuration `file`")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the run ends; exit non-zero unless every VM was backed up")
	return cmd
}

// waitForRun waits until the catalog at path has the run of job that
// run-now started (manual, due at or after asked, less a second of clock
// rounding) and that run has ended, and returns it.
func waitForRun(ctx context.Context, path, job string, asked time.Time) (catalog.Run, error) {
	// stopped is the error of a wait cut short, not wrapping ctx's: an
	// interrupted wait is not an interrupted backup.
	stopped := func() (catalog.Run, error) {
		return catalog.Run{}, fmt.Errorf("stopped waiting for the run of job %s (%v): it goes on in the server: see `kura runs --job %s`", job, ctx.Err(), job)
	}
	var st catalog.Store
	defer func() {
		if st != nil {
			st.Close()
		}
	}()
	for pause := 50 * time.Millisecond; ; pause = min(2*pause, time.Second) {
		if st == nil {
			if _, err := os.Stat(path); err == nil {
				s, err := catalog.Open(ctx, path)
				if ctx.Err() != nil {
					return stopped()
				}
				if err != nil {
					return catalog.Run{}, err
				}
				st = s
			}
		}
		if st != nil {
			runs, err := st.Runs(ctx, catalog.RunFilter{Job: job, Since: asked.Add(-time.Second), Limit: 10})
			if ctx.Err() != nil {
				return stopped()
			}
			if err != nil {
				return catalog.Run{}, err
			}
			for _, r := range runs {
				// Since bounds when runs started; an earlier run-now's
				// run may start late, so its due time is checked too.
				if r.Manual && !r.Due.Before(asked.Add(-time.Second)) && r.Status != catalog.StatusRunning && !r.Ended.IsZero() {
					return r, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return stopped()
		case <-time.After(pause):
		}
	}
}

// post sends a request to the daemon's HTTP endpoint.
func post(ctx context.Context, listen, path string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+listen+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("the kura server does not answer on %s (is `kura server` running?): %w", listen, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		return "", errors.New(strings.TrimSpace(string(body)))
	}
	return string(body), nil
}

func (a *app) runsCmd() *cobra.Command {
	var cfgPath, job string
	var run int64
	var asJSON, throttled bool
	var limit int
	var since time.Duration
	cmd := &cobra.Command{
		Use:   "runs [--job JOB] [--run ID] [--throttle] [--json]",
		Short: "What the kura server ran and how it went (from its catalog): backup and copy runs",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cfg, err := config.Load(cfgPath)
			if err != nil {
				return err
			}
			if _, err := os.Stat(cfg.Server.Catalog); err != nil {
				return fmt.Errorf("no catalog at %s yet: the server has not run", cfg.Server.Catalog)
			}
			st, err := catalog.Open(ctx, cfg.Server.Catalog)
			if err != nil {
				return err
			}
			defer st.Close()
			if throttled {
				evs, err := st.ThrottleEvents(ctx, time.Now().Add(-since))
				if err != nil {
					return err
				}
				if asJSON {
					if evs == nil {
						evs = []catalog.ThrottleEvent{}
					}
					return a.printJSON(evs)
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
				fmt.Fprintln(tw, "TIME\tDATASTORE\tACTION\tLATENCY\tRATES")
				for _, e := range evs {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%.1fms\t%s\n", e.Time.Local().Format("2006-01-02 15:04:05.000"), show(e.Datastore), show(e.Action), e.SignalMs, termsafe.Line(e.Detail))
				}
				return tw.Flush()
			}
			if run > 0 {
				r, err := st.Run(ctx, run)
				if err != nil {
					return err
				}
				res, err := st.VMResults(ctx, run)
				if err != nil {
					return err
				}
				if asJSON {
					return a.printJSON(res)
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
				if r.Kind == catalog.KindCopy {
					// One line per restore point copied, not copied, or
					// forgotten in the target by the copy job's retention.
					fmt.Fprintln(tw, "RESTORE POINT\tOUTCOME\tSNAPSHOT\tREAD\tSENT\tREASON")
					for _, v := range res {
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", show(v.VM), show(v.Outcome), show(short(v.Snapshot)), humanBytes(v.BytesRead), humanBytes(v.BytesStored), termsafe.Line(v.Reason))
					}
					return tw.Flush()
				}
				fmt.Fprintln(tw, "VM\tOUTCOME\tATTEMPTS\tSNAPSHOT\tREAD\tSTORED\tFREEZE\tREASON")
				for _, v := range res {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%.0fms\t%s\n", show(v.VM), show(v.Outcome), v.Attempts, show(short(v.Snapshot)), humanBytes(v.BytesRead), humanBytes(v.BytesStored), v.FreezeMs, termsafe.Line(v.Reason))
				}
				return tw.Flush()
			}
			runs, err := st.Runs(ctx, catalog.RunFilter{Job: job, Limit: limit})
			if err != nil {
				return err
			}
			if asJSON {
				if runs == nil {
					runs = []catalog.Run{}
				}
				return a.printJSON(runs)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
			fmt.Fprintln(tw, "RUN\tKIND\tJOB\tSTARTED\tDURATION\tSTATUS\tSUMMARY")
			for _, r := range runs {
				dur := "-"
				if !r.Ended.IsZero() {
					dur = r.Ended.Sub(r.Started).Round(time.Second).String()
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", r.ID, show(cmp.Or(r.Kind, catalog.KindBackup)), show(r.Job), r.Started.Local().Format("2006-01-02 15:04:05"), dur, show(r.Status), termsafe.Line(r.Summary))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", defaultConfig, "configuration `file`")
	cmd.Flags().StringVar(&job, "job", "", "only runs of this job")
	cmd.Flags().Int64Var(&run, "run", 0, "show the VMs of this run (of a copy run: its restore points)")
	cmd.Flags().IntVar(&limit, "limit", 50, "at most this many runs, newest first")
	numRange(cmd.Flags(), "run", 1, 1e12, "a run number from `kura runs`")
	numRange(cmd.Flags(), "limit", 1, 1e6, "")
	cmd.Flags().BoolVar(&throttled, "throttle", false, "show latency control decisions instead of runs")
	cmd.Flags().DurationVar(&since, "since", 24*time.Hour, "with --throttle: decisions of this last `duration`")
	durRange(cmd.Flags(), "since", time.Second, 100*365*24*time.Hour, "")
	cmd.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	return cmd
}

func (a *app) jobsCmd() *cobra.Command {
	var cfgPath string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "jobs [--json]",
		Short: "The jobs of the configuration (backup and copy jobs) and how each last ran",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			cfg, err := config.Load(cfgPath)
			if err != nil {
				return err
			}
			last := map[string]catalog.Run{}
			if _, err := os.Stat(cfg.Server.Catalog); err == nil {
				st, err := catalog.Open(ctx, cfg.Server.Catalog)
				if err != nil {
					return err
				}
				defer st.Close()
				runs, err := st.Runs(ctx, catalog.RunFilter{Limit: 1000})
				if err != nil {
					return err
				}
				for i := len(runs) - 1; i >= 0; i-- {
					last[runs[i].Job] = runs[i]
				}
			}
			type jobView struct {
				Name, Kind, Repository, Mode, Schedule, Selects string
				From                                            string       `json:",omitempty"` // a copy job's source; Repository is its target
				LastRun                                         *catalog.Run `json:",omitempty"`
			}
			var out []jobView
			for _, j := range cfg.Jobs {
				sel := strings.Join(j.VMs, ",")
				if len(j.Tags) > 0 {
					sel = strings.TrimPrefix(sel+",tags:"+strings.Join(j.Tags, ","), ",")
				}
				if j.All {
					sel = "all"
				}
				v := jobView{Name: j.Name, Kind: catalog.KindBackup, Repository: j.Repository, Mode: j.Mode, Schedule: j.Schedule, Selects: sel}
				if r, ok := last[j.Name]; ok {
					v.LastRun = &r
				}
				out = append(out, v)
			}
			for _, j := range cfg.Copies {
				sel := "all"
				if len(j.VMs) > 0 {
					sel = strings.Join(j.VMs, ",")
				}
				if j.Latest > 0 {
					sel += fmt.Sprintf(" (latest %d)", j.Latest)
				}
				when := j.Schedule
				if j.After != "" {
					when = "after " + j.After
				}
				v := jobView{Name: j.Name, Kind: catalog.KindCopy, Repository: j.To, From: j.From, Mode: "copy", Schedule: when, Selects: sel}
				if r, ok := last[j.Name]; ok {
					v.LastRun = &r
				}
				out = append(out, v)
			}
			if asJSON {
				return a.printJSON(out)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
			fmt.Fprintln(tw, "JOB\tSCHEDULE\tVMS\tMODE\tREPOSITORY\tLAST RUN")
			for _, v := range out {
				lr := "never"
				if v.LastRun != nil {
					lr = fmt.Sprintf("%s %s", v.LastRun.Started.Local().Format("2006-01-02 15:04"), show(v.LastRun.Status))
				}
				repository := v.Repository
				if v.From != "" {
					repository = v.From + " -> " + v.Repository
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", show(v.Name), show(v.Schedule), show(v.Selects), show(v.Mode), show(repository), lr)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", defaultConfig, "configuration `file`")
	cmd.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	return cmd
}
