// Command restorevm is Kura's benchmark for getting VMs back: full restore
// of a VM's disks against restic and virtnbdrestore, instant recovery
// (`kura instant`) against a cold boot from local disks, and single-file
// listing (`kura files ls`), on one libvirt guest, on one host, in one run.
//
// Run it through bench/restore-vm.sh, which installs the peers, builds kura
// and this program, makes the scratch directory and passes the settings
// (BENCH_RESTORE_* and a few BENCH_* variables, see config below and
// docs/BENCHMARKS.md).
//
//  1. A guest is booted from the cached test image with a copy of a cached
//     data disk (ext4 on vdb, mounted on /data: seeded random files in a
//     tree of a few thousand files).
//  2. It is backed up live with `kura backup vm` and with virtnbdbackup
//     (`-l full`, uncompressed); then shut down cleanly, its disks are
//     converted to raw files (the reference) and backed up with restic.
//  3. Full restore of every disk, each tool BENCH_RESTORE_RUNS times, the
//     page cache dropped before and `sync` counted in the time; each
//     restored data disk is checked against the files written to it.
//  4. A local copy is restored and defined (`kura restore --define --format
//     qcow2`); its cold boot to the guest agent's first answer is set against
//     `kura instant`; in both, the guest reads its data disk with dd.
//  5. `kura files ls` of the root disk's /etc and of a data directory.
//
// Results go to BENCH_RESTORE_OUT: results.md, results.json, bench.log and
// logs/.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kura-backup/kura/bench/internal/benchutil"
	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/testvm"
)

const (
	MiB = 1 << 20
	GiB = 1 << 30
)

// config is read from the environment (bench/restore-vm.sh documents each
// variable).
type config struct {
	Out, Work   string
	RunID       string   // suffix of the domain names
	Kura        string   // kura binary (BENCH_KURA_BIN)
	Restic      string   // restic binary (BENCH_RESTIC_BIN)
	Tools       []string // restore rows: kura restic vnb
	DataMiB     int      // bytes of files on the data disk
	DataGiB     int      // virtual size of the data disk
	RestoreRuns int
	BootRuns    int
	LsRuns      int
	DDMiB       int // read by dd in the guests
	LsDir       string
	BootPing    string // api or virsh: how the cold boot's guest-ping is sent
	Seed        int64
	Nice        int
	Keep        bool
	MemoryMiB   int
	CPUs        int
	// S3 also backs the guest up into a repository on a local S3 server
	// (versitygw, as the tests start it) and times instant recovery from
	// there in each boot round.
	S3           bool
	KuraPassword string `json:"-"`
}

func envStr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func envInt(k string, def int) int {
	v := os.Getenv(k)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		fatalf("%s=%q: not an integer", k, v)
	}
	return n
}

func loadConfig() config {
	cache, err := testvm.CacheDir()
	if err != nil {
		fatalf("%v", err)
	}
	c := config{
		Out:          os.Getenv("BENCH_RESTORE_OUT"),
		Work:         os.Getenv("BENCH_RESTORE_SCRATCH"),
		RunID:        envStr("BENCH_RESTORE_RUNID", strconv.Itoa(os.Getpid())),
		Kura:         os.Getenv("BENCH_KURA_BIN"),
		Restic:       os.Getenv("BENCH_RESTIC_BIN"),
		Tools:        strings.Fields(envStr("BENCH_RESTORE_TOOLS", "kura restic vnb")),
		DataMiB:      envInt("BENCH_RESTORE_DATA_MIB", 1024),
		DataGiB:      envInt("BENCH_RESTORE_DATA_GIB", 8),
		RestoreRuns:  envInt("BENCH_RESTORE_RUNS", 2),
		BootRuns:     envInt("BENCH_BOOT_RUNS", 2),
		LsRuns:       envInt("BENCH_LS_RUNS", 3),
		DDMiB:        envInt("BENCH_RESTORE_DD_MIB", 1024),
		LsDir:        "/tree/d00",
		BootPing:     envStr("BENCH_BOOT_PING", "api"),
		Seed:         int64(envInt("BENCH_RESTORE_SEED", 42)),
		Nice:         envInt("BENCH_NICE", 0),
		Keep:         os.Getenv("BENCH_KEEP") == "1",
		MemoryMiB:    envInt("BENCH_RESTORE_MEMORY_MIB", 1024),
		CPUs:         envInt("BENCH_RESTORE_CPUS", 2),
		S3:           envStr("BENCH_RESTORE_S3", "1") == "1",
		KuraPassword: "kura-bench-password",
	}
	if c.Out == "" {
		c.Out = filepath.Join(cache, "bench", "restore-results", time.Now().Format("20060102-150405"))
	}
	for _, t := range c.Tools {
		if _, ok := toolDesc[t]; !ok {
			fatalf("BENCH_RESTORE_TOOLS: unknown tool %q (use kura, restic, vnb)", t)
		}
	}
	if c.Kura == "" {
		fatalf("BENCH_KURA_BIN is not set: run bench/restore-vm.sh, which builds kura")
	}
	if c.has("restic") && c.Restic == "" {
		fatalf("BENCH_RESTIC_BIN is not set: run bench/restore-vm.sh, which installs restic")
	}
	if c.BootPing != "api" && c.BootPing != "virsh" {
		fatalf("BENCH_BOOT_PING=%q: use api or virsh", c.BootPing)
	}
	if c.RestoreRuns < 1 || c.BootRuns < 1 || c.LsRuns < 1 {
		fatalf("BENCH_RESTORE_RUNS, BENCH_BOOT_RUNS and BENCH_LS_RUNS must be at least 1")
	}
	if c.DDMiB > c.DataGiB*1024 {
		fatalf("BENCH_RESTORE_DD_MIB=%d is more than the data disk (%d GiB)", c.DDMiB, c.DataGiB)
	}
	return c
}

func (c config) has(tool string) bool {
	for _, t := range c.Tools {
		if t == tool {
			return true
		}
	}
	return false
}

// toolDesc names the restore rows, backupDesc the backup rows.
var toolDesc = map[string]string{
	"kura":   "kura",
	"restic": "restic",
	"vnb":    "virtnbdrestore",
}

var backupDesc = map[string]string{
	"kura":   "kura",
	"restic": "restic",
	"vnb":    "virtnbdbackup",
}

// blog is the benchmark's progress log; logf and fatalf write to it.
var blog = benchutil.NewLog("restore-bench")

func logf(format string, a ...any)   { blog.Printf(format, a...) }
func fatalf(format string, a ...any) { blog.Fatalf(format, a...) }

func main() {
	cfg := loadConfig()
	defer blog.Setup(&cfg.Out, "libvirt, guests, drop_caches")()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()

	work := cfg.Work
	var err error
	if work == "" {
		if work, err = os.MkdirTemp(envStr("BENCH_WORK", os.TempDir()), "kura-restorebench."); err != nil {
			fatalf("scratch directory: %v", err)
		}
	} else if err := os.MkdirAll(work, 0o755); err != nil {
		fatalf("scratch directory: %v", err)
	}
	b := &bench{cfg: cfg, work: work, res: &Results{}}
	b.guestName = "kura-rvbench-" + cfg.RunID
	b.localName = "kura-rvbench-local-" + cfg.RunID
	b.irName = "kura-rvbench-ir-" + cfg.RunID
	logf("output: %s", cfg.Out)
	logf("scratch: %s", work)
	runErr := b.run(ctx)
	b.cleanup()
	if runErr != nil {
		b.res.Error = runErr.Error()
		logf("ERROR: %v", runErr)
	}
	b.res.Meta.TotalSeconds = time.Since(blog.Start).Seconds()
	b.res.Meta.LoadAvgEnd = benchutil.Loadavg()
	if err := b.writeReport(); err != nil {
		logf("ERROR: writing the report: %v", err)
		os.Exit(1)
	}
	if runErr != nil {
		logf("FAILED after %.0f s; partial report: %s", time.Since(blog.Start).Seconds(), filepath.Join(cfg.Out, "results.md"))
		os.Exit(1)
	}
	md, _ := os.ReadFile(filepath.Join(cfg.Out, "results.md"))
	os.Stdout.Write(md)
	logf("done in %.0f s: %s, %s", time.Since(blog.Start).Seconds(), filepath.Join(cfg.Out, "results.md"), filepath.Join(cfg.Out, "results.json"))
}

// bench holds the run's state.
type bench struct {
	cfg      config
	work     string
	img      testvm.Image
	vdb      string // cached data disk template
	manifest []ManifestEntry
	res      *Results

	guestName, localName, irName string
	guest                        *testvm.Guest
	s3                           *s3test.Server // with BENCH_RESTORE_S3
	s3Repo                       string
	disks                        []diskRef // the guest's disks and their raw references
	localDefined, irRunning      bool
}

// diskRef is one disk of the guest.
type diskRef struct {
	Target    string `json:"target"` // vda, vdb
	Image     string `json:"image"`  // the guest's image file
	Raw       string `json:"raw"`    // raw conversion of the shut-off guest's disk
	Virtual   int64  `json:"virtual"`
	Allocated int64  `json:"allocated"` // data extents of Raw
}

func (b *bench) kuraEnv() ([]string, []string) {
	return []string{"KURA_REPO=" + filepath.Join(b.work, "kura-repo"), "KURA_PASSWORD=" + b.cfg.KuraPassword,
			"XDG_CACHE_HOME=" + filepath.Join(b.work, "kura-cache")},
		[]string{"KURA_CACHE", "KURA_PASSWORD_FILE"}
}

// kuraS3Env is kuraEnv for the repository on the S3 server.
func (b *bench) kuraS3Env() ([]string, []string) {
	env, unset := b.kuraEnv()
	env = append(env[1:], "KURA_REPO="+b.s3Repo)
	return append(env, b.s3.Env()...), unset
}

func (b *bench) kura(ctx context.Context, args ...string) (string, error) {
	env, unset := b.kuraEnv()
	return runEnv(ctx, env, unset, b.cfg.Kura, args...)
}

// cleanup removes the guests and, unless BENCH_KEEP=1, the scratch
// directory. It runs after a failure or an interrupt too.
func (b *bench) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if b.irRunning {
		if out, err := b.kura(ctx, "instant", "--stop", b.irName); err != nil {
			logf("cleanup: kura instant --stop %s: %v %s", b.irName, err, out)
		}
		b.irRunning = false
	}
	if b.s3 != nil {
		b.s3.Stop()
	}
	if b.localDefined {
		if err := removeDomain(ctx, b.localName); err != nil {
			logf("cleanup: %v", err)
		}
		b.localDefined = false
	}
	if b.guest != nil {
		if err := b.guest.Destroy(ctx); err != nil {
			logf("cleanup: %v", err)
		}
		b.guest = nil
	}
	if b.cfg.Keep {
		logf("kept scratch directory %s (BENCH_KEEP=1)", b.work)
		return
	}
	if err := os.RemoveAll(b.work); err != nil {
		logf("cleanup: %v", err)
	}
}

// removeDomain stops a libvirt domain if it runs and undefines it.
func removeDomain(ctx context.Context, name string) error {
	state, err := benchutil.Run(ctx, "virsh", "domstate", name)
	if err != nil {
		if strings.Contains(state, "failed to get domain") {
			return nil
		}
		return err
	}
	if strings.TrimSpace(state) != "shut off" {
		if out, err := benchutil.Run(ctx, "virsh", "destroy", name); err != nil && !strings.Contains(out, "not running") {
			return err
		}
	}
	if out, err := benchutil.Run(ctx, "virsh", "undefine", "--checkpoints-metadata", "--snapshots-metadata", name); err != nil && !strings.Contains(out, "failed to get domain") {
		return err
	}
	return nil
}

func (b *bench) meta(ctx context.Context) {
	m := &b.res.Meta
	m.Date = time.Now().UTC().Format(time.RFC3339)
	m.Host, _ = os.Hostname()
	m.Cores = runtime.NumCPU()
	m.CPU = benchutil.CPUModel()
	m.Kernel = strings.TrimSpace(benchutil.ReadFile("/proc/sys/kernel/osrelease"))
	for _, line := range strings.Split(benchutil.ReadFile("/proc/meminfo"), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				m.MemTotal = fmt.Sprintf("%.1f GiB RAM", float64(kb)/(1<<20))
			}
		}
	}
	m.LoadAvgStart = benchutil.Loadavg()
	m.KuraBinary = b.cfg.Kura
	m.KuraVersion = strings.TrimSpace(os.Getenv("BENCH_KURA_VERSION"))
	if b.cfg.Restic != "" {
		m.ResticVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, b.cfg.Restic, "version"))
	}
	m.VNBVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, "virtnbdbackup", "-V"))
	m.QEMUVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, "qemu-system-x86_64", "--version"))
	m.LibvirtVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, "libvirtd", "--version"))
	m.Config = b.cfg
}
