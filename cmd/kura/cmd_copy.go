package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/repocopy"
	"github.com/kura-backup/kura/internal/termsafe"
)

// copySide is one repository of kura copy: where it is, and where its
// password comes from.
type copySide struct {
	role   string // "source" or "target"
	loc    string
	isRepo bool   // named by --repo / KURA_REPO: the repository password
	pwFile string // --from-password-file or --to-password-file
	pwEnv  string // KURA_FROM_PASSWORD or KURA_TO_PASSWORD
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// flag is the side's flag: --from or --to.
func (s copySide) flag() string {
	if s.role == "source" {
		return "--from"
	}
	return "--to"
}

func (a *app) copyCmd() *cobra.Command {
	var from, to, fromPw, toPw, name string
	var latest, workers int
	var verify, asJSON bool
	cmd := &cobra.Command{
		Use:   "copy [SNAPSHOT...] --from SRC | --to DST",
		Short: "Copy restore points to another repository, sending only what it lacks",
		Long: "copy copies restore points from one repository to another (an offsite copy): all of them, those of --name,\n" +
			"the --latest N of each name, or the ones named. Only chunks the target lacks are sent; restore points the target\n" +
			"has are skipped, so a copy run again sends nothing, and an interrupted copy resumes where it stopped.\n" +
			"--repo (KURA_REPO) stands for the side not given: `kura copy --to s3:…` copies the repository to S3.\n" +
			"Passwords: the --repo side's is the repository password (--password-file, KURA_PASSWORD_FILE, KURA_PASSWORD);\n" +
			"--from's comes from --from-password-file, KURA_FROM_PASSWORD_FILE or KURA_FROM_PASSWORD, --to's likewise\n" +
			"(TO), else the repository password, else a prompt. A target made with `kura init --copy-key-from SRC` shares\n" +
			"the source's key and gets blobs sealed as they are; any other is re-encrypted under its own key. docs/COPY.md.",
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			src := copySide{role: "source", loc: from, pwFile: fromPw, pwEnv: "KURA_FROM_PASSWORD"}
			dst := copySide{role: "target", loc: to, pwFile: toPw, pwEnv: "KURA_TO_PASSWORD"}
			switch {
			case from == "" && to == "":
				return errors.New("give --from SRC or --to DST (or both); --repo / KURA_REPO stands for the other")
			case from == "":
				src.loc, src.isRepo = a.repoPath, true
			case to == "":
				dst.loc, dst.isRepo = a.repoPath, true
			}
			for _, s := range []copySide{src, dst} {
				if s.loc == "" {
					return fmt.Errorf("no %s repository: give %s, or set KURA_REPO or --repo", s.role, s.flag())
				}
			}
			rs, err := a.openSides(ctx, src, dst)
			if err != nil {
				return err
			}
			sr, dr := rs[0], rs[1]
			var mu sync.Mutex
			var last repocopy.Progress
			started := time.Now()
			stop := progressLine(a.stderr, a.progressOn(), func() string {
				mu.Lock()
				p := last
				mu.Unlock()
				rate := float64(p.BytesSent) / max(time.Since(started).Seconds(), 0.001)
				return fmt.Sprintf("copy %d/%d %s  %d/%d new chunks  %d sent, %d present  %s sent (%s/s)", min(p.Done+1, p.Snapshots), p.Snapshots, termsafe.Line(p.Current),
					p.ChunksChecked, p.ChunksToCheck, p.ChunksSent, p.ChunksPresent, humanBytes(p.BytesSent), humanBytes(int64(rate)))
			})
			res, err := repocopy.Copy(ctx, sr, dr, repocopy.Options{Name: name, Latest: latest, Refs: args, Verify: verify, Workers: workers, Logger: a.log,
				Progress: func(p repocopy.Progress) {
					mu.Lock()
					last = p
					mu.Unlock()
				}})
			stop()
			if errors.Is(err, context.Canceled) {
				fmt.Fprintln(a.stderr, "kura: copy interrupted: the target holds whole restore points only; run the same copy again to resume without sending again what landed")
			}
			if err != nil && !errors.Is(err, repocopy.ErrNotCopied) && res.Selected == 0 {
				return err
			}
			if asJSON {
				if perr := a.printJSON(struct {
					From string `json:"from"`
					To   string `json:"to"`
					repocopy.Result
				}{sr.Backend().Location(), dr.Backend().Location(), res}); perr != nil {
					return perr
				}
				return err
			}
			a.printCopy(res)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&from, "from", "", "the source repository's `location` (default: --repo)")
	f.StringVar(&to, "to", "", "the target repository's `location` (default: --repo)")
	f.StringVar(&fromPw, "from-password-file", os.Getenv("KURA_FROM_PASSWORD_FILE"), "read the source's password from `file` (env KURA_FROM_PASSWORD_FILE; or set KURA_FROM_PASSWORD)")
	f.StringVar(&toPw, "to-password-file", os.Getenv("KURA_TO_PASSWORD_FILE"), "read the target's password from `file` (env KURA_TO_PASSWORD_FILE; or set KURA_TO_PASSWORD)")
	f.StringVar(&name, "name", "", "only restore points of this `name`")
	f.IntVar(&latest, "latest", 0, "only the newest `N` restore points of each name")
	numRange(f, "latest", 1, 1e6, "leave it out to copy all")
	f.BoolVar(&verify, "verify", false, "read back and authenticate everything written before saving each restore point")
	f.IntVar(&workers, "workers", 0, "parallel workers (default 2 per CPU, at least 4)")
	numRange(f, "workers", 1, maxWorkers, "leave it out for the default")
	f.BoolVar(&asJSON, "json", false, "one machine-readable summary")
	return cmd
}

// openSides reads both repositories' configs, then their passwords (which
// may prompt), then unlocks both at once.
func (a *app) openSides(ctx context.Context, sides ...copySide) ([]*repo.Repo, error) {
	var pws [][]byte
	var bes []backend.Backend
	for _, s := range sides {
		be, err := a.backendAt(ctx, s.loc)
		if err != nil {
			return nil, fmt.Errorf("the %s: %w", s.role, err)
		}
		if _, err := repo.ReadConfig(ctx, be); err != nil {
			return nil, fmt.Errorf("the %s: %w", s.role, err)
		}
		var pw []byte
		if s.isRepo {
			pw, err = a.password(s.role+" repository password: ", false)
		} else {
			pw, err = a.sidePassword(s.pwFile, s.pwEnv, s.role+" repository password: ")
		}
		if err != nil {
			return nil, err
		}
		pws, bes = append(pws, pw), append(bes, be)
	}
	out := make([]*repo.Repo, len(sides))
	errs := make([]error, len(sides))
	var wg sync.WaitGroup
	for i := range sides {
		wg.Go(func() {
			out[i], errs[i] = repo.Open(ctx, bes[i], pws[i])
		})
	}
	wg.Wait()
	for i, s := range sides {
		if errs[i] != nil {
			if errors.Is(errs[i], repo.ErrWrongPassword) && !s.isRepo {
				return nil, fmt.Errorf("the %s %s: %w: its password comes from %s-password-file, %s_FILE or %s, else from the repository password", s.role, s.loc, errs[i], s.flag(), s.pwEnv, s.pwEnv)
			}
			return nil, fmt.Errorf("the %s %s: %w", s.role, s.loc, errs[i])
		}
		out[i].SetLogger(a.log)
	}
	return out, nil
}

// openSide opens one repository as openSides does.
func (a *app) openSide(ctx context.Context, s copySide) (*repo.Repo, error) {
	rs, err := a.openSides(ctx, s)
	if err != nil {
		return nil, err
	}
	return rs[0], nil
}

func (a *app) printCopy(res repocopy.Result) {
	tw := tabwriter.NewWriter(a.stdout, 0, 2, 2, ' ', 0)
	row := func(what string, c repocopy.Copied, note string) {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", what, show(short(c.Source)), show(c.Name), c.Time.Local().Format(time.DateTime), note)
	}
	for _, c := range res.Copied {
		row("copied", c, "as "+short(c.Target))
	}
	for _, c := range res.Skipped {
		row("skipped", c, "in the target as "+short(c.Target))
	}
	for _, f := range res.Failed {
		when := "-"
		if !f.Time.IsZero() {
			when = f.Time.Local().Format(time.DateTime)
		}
		fmt.Fprintf(tw, "FAILED\t%s\t%s\t%s\t%s\n", show(short(f.Source)), show(f.Name), when, termsafe.Line(f.Error))
	}
	tw.Flush()
	keys := "independent keys: chunks re-encrypted for the target"
	if res.SharedKey {
		keys = "shared key: blobs copied sealed as they are"
	}
	n := len(res.Copied) + len(res.Skipped) + len(res.Failed)
	fmt.Fprintf(a.stdout, "%d %s: %d copied, %d already in the target, %d failed\n", n, plural(n, "restore point", "restore points"), len(res.Copied), len(res.Skipped), len(res.Failed))
	fmt.Fprintf(a.stdout, "chunks: %d sent, %d already present; %d map blobs sent (%s)\n", res.ChunksSent, res.ChunksPresent, res.MapsSent, keys)
	rate := "-"
	if res.Seconds > 0 {
		rate = humanBytes(int64(float64(res.BytesSent)/res.Seconds)) + "/s"
	}
	fmt.Fprintf(a.stdout, "sent %s (read %s) in %s, %s\n", humanBytes(res.BytesSent), humanBytes(res.BytesRead), res.Duration.Round(10*time.Millisecond), rate)
	if res.PacksIndexed > 0 {
		fmt.Fprintf(a.stdout, "%d packs an interrupted run left in the target were indexed and reused\n", res.PacksIndexed)
	}
	if res.BlobsVerified > 0 {
		fmt.Fprintf(a.stdout, "%d blobs read back from the target and verified\n", res.BlobsVerified)
	}
}
