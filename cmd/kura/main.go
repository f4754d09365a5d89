// Command kura backs up and restores virtual machine disks into an
// encrypted, deduplicating repository.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/location"
	"github.com/kura-backup/kura/internal/crypt"
	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/restore"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/termsafe"
	"github.com/kura-backup/kura/internal/units"
)

// app holds the global flags and I/O of one invocation.
type app struct {
	repoPath     string
	passwordFile string
	limitUpload  string // --limit-upload
	limitDown    string // --limit-download
	noCache      bool   // --no-cache
	quiet        bool
	verbose      bool
	cpuProfile   string
	keyFD        int // the master key comes as JSON on this file descriptor (kura instant's export)
	stdout       io.Writer
	stderr       io.Writer
	log          *slog.Logger
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "__thaw-watchdog" {
		// A separate process that thaws a frozen guest if kura dies.
		os.Exit(guest.WatchdogMain(os.Args[2:]))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a := &app{stdout: os.Stdout, stderr: os.Stderr}
	root := a.rootCmd()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "kura: "+termsafe.Line(explain(err)))
		os.Exit(exitCode(ctx, err))
	}
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "kura",
		Short: "Back up and restore virtual machines",
		Long: "kura backs up virtual machine disks (live through libvirt or QMP, or image files) into an encrypted, deduplicating repository, and restores them.\n\n" +
			"Exit status: 0 success, 1 error, 2 bad command line, 3 done but with damage (restore --ignore-damage, verify, a boot check), " +
			"10 no repository (or S3 bucket) there, 11 repository locked, 12 wrong password, 130 interrupted. See docs/EXIT-CODES.md.",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPostRun: func(cmd *cobra.Command, args []string) {
			pprof.StopCPUProfile()
		},
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if err := checkRanges(cmd); err != nil {
				return usageError{err}
			}
			if a.cpuProfile != "" {
				f, err := os.Create(a.cpuProfile)
				if err != nil {
					return err
				}
				if err := pprof.StartCPUProfile(f); err != nil {
					return err
				}
			}
			level := slog.LevelWarn
			if a.verbose {
				level = slog.LevelDebug
			}
			a.log = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
			return nil
		},
	}
	root.PersistentFlags().StringVarP(&a.repoPath, "repo", "r", os.Getenv("KURA_REPO"), "repository `location`: a directory, or s3:https://HOST/BUCKET[/PREFIX] (env KURA_REPO; S3 credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
	root.PersistentFlags().StringVar(&a.limitUpload, "limit-upload", "", "send at most `RATE` per second to the repository (e.g. 20MiB; default: unlimited)")
	root.PersistentFlags().StringVar(&a.limitDown, "limit-download", "", "receive at most `RATE` per second from the repository (default: unlimited)")
	root.PersistentFlags().BoolVar(&a.noCache, "no-cache", false, "do not use the local metadata cache of a repository on S3 (see kura cache --help)")
	root.PersistentFlags().StringVar(&a.passwordFile, "password-file", os.Getenv("KURA_PASSWORD_FILE"), "read the password from `file` (env KURA_PASSWORD_FILE; or set KURA_PASSWORD)")
	root.PersistentFlags().BoolVarP(&a.quiet, "quiet", "q", false, "no progress output")
	root.PersistentFlags().BoolVarP(&a.verbose, "verbose", "v", false, "debug logging")
	root.PersistentFlags().StringVar(&a.cpuProfile, "cpuprofile", "", "write a CPU profile to `file`")
	_ = root.PersistentFlags().MarkHidden("cpuprofile")
	root.PersistentFlags().IntVar(&a.keyFD, "key-fd", 0, "read the unlocked master key from file descriptor `N` instead of deriving it from the password")
	_ = root.PersistentFlags().MarkHidden("key-fd")
	numRange(root.PersistentFlags(), "key-fd", 3, 1<<20, "an inherited file descriptor")
	root.AddCommand(a.initCmd(), a.backupCmd(), a.snapshotsCmd(), a.restoreCmd(), a.verifyCmd(),
		a.forgetCmd(), a.pruneCmd(), a.statsCmd(), a.keyCmd(), a.unlockCmd(), a.exportCmd(), a.instantCmd(), a.filesCmd(), a.mountCmd(),
		a.serverCmd(), a.runNowCmd(), a.runsCmd(), a.jobsCmd(), a.repairCmd(), a.copyCmd(), a.cacheCmd())
	a.addVersion(root)
	markRunErrors(root)
	return root
}

// backend opens the repository's storage through the location registry:
// a local directory or an S3 bucket (with retries and, unless --no-cache,
// the local metadata cache), within the bandwidth limits of
// --limit-upload and --limit-download.
func (a *app) backend(ctx context.Context) (backend.Backend, error) {
	if a.repoPath == "" {
		return nil, errors.New("no repository given: set KURA_REPO or pass --repo")
	}
	return a.backendAt(ctx, a.repoPath)
}

// backendAt opens the storage at loc as backend does the repository's
// (a second repository: kura copy's --from and --to, init's
// --copy-key-from).
func (a *app) backendAt(ctx context.Context, loc string) (backend.Backend, error) {
	opts := location.Options{Logger: a.log, NoCache: a.noCache}
	for _, l := range []struct {
		flag, val string
		to        *float64
	}{{"--limit-upload", a.limitUpload, &opts.UploadLimit}, {"--limit-download", a.limitDown, &opts.DownloadLimit}} {
		if l.val == "" {
			continue
		}
		r, err := units.ParseRate(l.val)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", l.flag, err)
		}
		*l.to = float64(r)
	}
	return location.Open(ctx, loc, opts)
}

// password returns the repository password from KURA_PASSWORD, the
// password file, or a terminal prompt.
func (a *app) password(prompt string, confirm bool) ([]byte, error) {
	if p, err := repo.ReadPassword(a.passwordFile); !errors.Is(err, repo.ErrNoPassword) {
		return p, err
	}
	if !term.IsTerminal(int(os.Stdin.Fd())) {
		return nil, errors.New("no password: set KURA_PASSWORD or pass --password-file")
	}
	fmt.Fprint(a.stderr, prompt)
	p, err := term.ReadPassword(int(os.Stdin.Fd()))
	fmt.Fprintln(a.stderr)
	if err != nil {
		return nil, err
	}
	if confirm {
		fmt.Fprint(a.stderr, "enter the password again: ")
		q, err := term.ReadPassword(int(os.Stdin.Fd()))
		fmt.Fprintln(a.stderr)
		if err != nil {
			return nil, err
		}
		if string(p) != string(q) {
			return nil, errors.New("the passwords do not match")
		}
	}
	return p, nil
}

// sidePassword returns the password of a second repository (kura copy's
// --from or --to, init's --copy-key-from): from its own password file
// (file), else from the environment variable env, else the repository
// password (--password-file, KURA_PASSWORD_FILE, KURA_PASSWORD: one
// password for both), else a prompt on the terminal. Never from the
// command line.
func (a *app) sidePassword(file, env, prompt string) ([]byte, error) {
	if file != "" {
		return repo.ReadPassword(file)
	}
	if p, ok := os.LookupEnv(env); ok {
		return []byte(p), nil
	}
	if p, err := repo.ReadPassword(a.passwordFile); !errors.Is(err, repo.ErrNoPassword) {
		return p, err
	}
	if !term.IsTerminal(int(os.Stdin.Fd())) {
		return nil, fmt.Errorf("no password for %s: set %s_FILE or %s, or KURA_PASSWORD for both repositories", strings.TrimSuffix(prompt, " password: "), env, env)
	}
	fmt.Fprint(a.stderr, prompt)
	p, err := term.ReadPassword(int(os.Stdin.Fd()))
	fmt.Fprintln(a.stderr)
	return p, err
}

func (a *app) open(ctx context.Context) (*repo.Repo, error) {
	wait, err := a.openLater(ctx)
	if err != nil {
		return nil, err
	}
	return wait(ctx)
}

// openLater reads the password (which may prompt) and then unlocks the
// repository in the background: the key derivation takes a quarter of a
// second, which a backup spends preparing the VM's capture. The function
// it returns waits for the result.
func (a *app) openLater(ctx context.Context) (func(context.Context) (*repo.Repo, error), error) {
	be, err := a.backend(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := repo.ReadConfig(ctx, be); err != nil {
		return nil, err
	}
	if a.keyFD > 0 {
		r, err := openWithKeyFD(ctx, be, a.keyFD)
		if err == nil {
			r.SetLogger(a.log)
		}
		return func(context.Context) (*repo.Repo, error) { return r, err }, nil
	}
	pw, err := a.password("repository password: ", false)
	if err != nil {
		return nil, err
	}
	type opened struct {
		r   *repo.Repo
		err error
	}
	done := make(chan opened, 1)
	go func() {
		start := time.Now()
		r, err := repo.Open(ctx, be, pw)
		if err == nil {
			r.SetLogger(a.log)
		}
		a.log.Debug("repository opened (key derivation)", "took", time.Since(start), "err", err)
		done <- opened{r, err}
	}()
	var once sync.Once
	var res opened
	return func(ctx context.Context) (*repo.Repo, error) {
		once.Do(func() {
			select {
			case res = <-done:
			case <-ctx.Done():
				res.err = ctx.Err()
			}
		})
		return res.r, res.err
	}, nil
}

// passedKey is what --key-fd reads: a master key unlocked by the parent
// process.
type passedKey struct {
	Key   crypt.Key `json:"key"`
	KeyID string    `json:"key_id"`
}

func openWithKeyFD(ctx context.Context, be backend.Backend, fd int) (*repo.Repo, error) {
	f := os.NewFile(uintptr(fd), "key")
	if f == nil {
		return nil, fmt.Errorf("--key-fd %d: not an open file descriptor", fd)
	}
	defer f.Close()
	var pk passedKey
	if err := json.NewDecoder(io.LimitReader(f, 4096)).Decode(&pk); err != nil {
		return nil, fmt.Errorf("--key-fd %d: reading the key: %w", fd, err)
	}
	return repo.OpenWithKey(ctx, be, &pk.Key, pk.KeyID)
}

// passKey returns a pipe whose read end a child gets as --key-fd, and
// writes r's master key into it.
func passKey(r *repo.Repo) (*os.File, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	data, err := json.Marshal(passedKey{Key: *r.Key(), KeyID: r.KeyID()})
	if err != nil {
		pr.Close()
		pw.Close()
		return nil, err
	}
	// A pipe buffers 64 KiB: the key fits, the write does not block.
	_, err = pw.Write(data)
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, err
	}
	return pr, nil
}

// progressOn reports whether progress should be drawn.
func (a *app) progressOn() bool {
	if a.quiet {
		return false
	}
	f, ok := a.stderr.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// explain turns an error into one line a user can act on.
func explain(err error) string {
	switch {
	case errors.Is(err, repo.ErrWrongPassword):
		if strings.Contains(err.Error(), "-password-file") {
			return err.Error() // says already where the password comes from
		}
		return err.Error() + ": try another password or --password-file, or see `kura key list`"
	case errors.Is(err, backend.ErrNoSpace):
		return err.Error() + ": free space on the repository's disk; the repository is unchanged except for unreferenced data that `kura prune` removes"
	case errors.Is(err, repo.ErrDamaged):
		s := err.Error()
		if !strings.Contains(s, "kura verify") {
			s += ": run `kura verify --read-data` to see what is affected"
		}
		return s
	case errors.Is(err, context.Canceled):
		return "interrupted; the repository is consistent (run `kura prune` to remove partial data)"
	case errors.Is(err, source.ErrNotFound):
		return err.Error()
	case errors.Is(err, restore.ErrExists):
		return err.Error()
	}
	return err.Error()
}

type damageFound struct{ n int }

func (d damageFound) Error() string {
	return fmt.Sprintf("verify found %d problems", d.n)
}
