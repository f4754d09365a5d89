// Command vm is Kura's live-VM benchmark: `kura backup vm` against
// virtnbdbackup (Debian package; `-l full` then `-l inc`, with and without
// `-z`) on the same libvirt guest, on the same host, in one run.
//
// Run it through bench/vm.sh, which installs virtnbdbackup, builds kura and
// this program, and passes the settings (BENCH_VM_* and a few BENCH_*
// variables, see config below and docs/BENCHMARKS.md).
//
// For every tool a fresh guest is booted from the same cached root image and a
// copy of the same cached data disk, so that no tool sees another's
// checkpoints and every tool backs up the same bytes:
//
//  1. baseline: fio writes in the guest (4 KiB random writes, rate limited,
//     O_DIRECT) with no backup running: the guest's write latency at rest;
//  2. full backup while the same fio job runs: wall time, bytes read from
//     the NBD export, bytes stored, peak RSS, CPU, the guest's write latency
//     during the backup, and the freeze window;
//  3. an incremental backup without fio ("inc0"): it takes up the blocks fio
//     wrote during the full backup, so that the next one sees only step 4;
//  4. the guest writes INC_MIB MiB of new random files (kura-workload) and
//     syncs; then the measured incremental backup ("inc");
//  5. restore of the data disk (vdb) and fsck of it, plus a check of the
//     files written in step 4 against the guest's own sha256 manifest
//     (for the rows in BENCH_VM_RESTORE_CHECK);
//  6. the freeze window over many consecutive incremental backups while fio
//     writes lightly (kura: BENCH_VM_FREEZE_RUNS, virtnbdbackup:
//     BENCH_VM_VNB_FREEZE_RUNS, on the plain `vnb` guest only).
//
// Results go to BENCH_VM_OUT: results.md, results.json, bench.log and logs/.
package main

import (
	"context"
	"encoding/json"
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
	"github.com/kura-backup/kura/internal/testvm"
)

const (
	MiB = 1 << 20
	GiB = 1 << 30
)

// config is read from the environment (bench/vm.sh documents each variable).
type config struct {
	Out, Work     string
	Kura          string   // kura binary (BENCH_KURA_BIN)
	KuraFlags     []string // extra global flags for kura backup vm, e.g. -v (BENCH_VM_KURA_FLAGS)
	VNBWrapper    string   // bench/vm/vnb_freeze.py
	Tools         []string // kura vnb vnb-z
	AllocMB       int      // target allocated bytes of the whole guest, 10^6
	DataGiB       int      // virtual size of the data disk
	IncMiB        int      // written between the full and the measured incremental
	FioIOPS       int      // background writer during baseline and full backups
	FioLightIOPS  int      // background writer during the freeze runs
	FioMiB        int      // size of the file fio writes into
	BaselineSec   int      // length of the idle fio baseline
	FreezeRuns    int      // kura incremental backups for the freeze window
	VNBFreezeRuns int      // virtnbdbackup incremental backups for its freeze window
	RestoreCheck  []string // rows whose data disk is restored and checked
	Seed          int64
	Nice          int
	Keep          bool
	MemoryMiB     int
	CPUs          int
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
		Out:           os.Getenv("BENCH_VM_OUT"),
		Work:          envStr("BENCH_WORK", os.TempDir()),
		Kura:          os.Getenv("BENCH_KURA_BIN"),
		VNBWrapper:    os.Getenv("BENCH_VM_VNB_WRAPPER"),
		KuraFlags:     strings.Fields(os.Getenv("BENCH_VM_KURA_FLAGS")),
		Tools:         strings.Fields(envStr("BENCH_VM_TOOLS", "kura vnb vnb-z")),
		AllocMB:       envInt("BENCH_VM_ALLOC_MB", 1280),
		DataGiB:       envInt("BENCH_VM_DATA_GIB", 8),
		IncMiB:        envInt("BENCH_VM_INC_MIB", 100),
		FioIOPS:       envInt("BENCH_VM_FIO_IOPS", 512),
		FioLightIOPS:  envInt("BENCH_VM_FIO_LIGHT_IOPS", 64),
		FioMiB:        envInt("BENCH_VM_FIO_MIB", 256),
		BaselineSec:   envInt("BENCH_VM_BASELINE_S", 15),
		FreezeRuns:    envInt("BENCH_VM_FREEZE_RUNS", 50),
		VNBFreezeRuns: envInt("BENCH_VM_VNB_FREEZE_RUNS", 10),
		RestoreCheck:  strings.Fields(envStr("BENCH_VM_RESTORE_CHECK", "kura vnb-z")),
		Seed:          int64(envInt("BENCH_VM_SEED", 42)),
		Nice:          envInt("BENCH_NICE", 0),
		Keep:          os.Getenv("BENCH_KEEP") == "1",
		MemoryMiB:     envInt("BENCH_VM_MEMORY_MIB", 1024),
		CPUs:          envInt("BENCH_VM_CPUS", 2),
	}
	if c.Out == "" {
		c.Out = filepath.Join(cache, "bench", "vm-results", time.Now().Format("20060102-150405"))
	}
	for _, t := range c.Tools {
		if _, ok := toolDesc[t]; !ok {
			fatalf("BENCH_VM_TOOLS: unknown tool %q (use kura, vnb, vnb-z)", t)
		}
	}
	if c.Kura == "" && c.has("kura") {
		fatalf("BENCH_KURA_BIN is not set: run bench/vm.sh, which builds kura")
	}
	if c.VNBWrapper == "" {
		fatalf("BENCH_VM_VNB_WRAPPER is not set: run bench/vm.sh")
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

func (c config) restoreCheck(tool string) bool {
	for _, t := range c.RestoreCheck {
		if t == tool {
			return true
		}
	}
	return false
}

// toolDesc names the rows.
var toolDesc = map[string]string{
	"kura":  "kura",
	"vnb":   "virtnbdbackup",
	"vnb-z": "virtnbdbackup -z",
}

// blog is the benchmark's progress log; logf and fatalf write to it.
var blog = benchutil.NewLog("vm-bench")

func logf(format string, a ...any)   { blog.Printf(format, a...) }
func fatalf(format string, a ...any) { blog.Fatalf(format, a...) }

func main() {
	cfg := loadConfig()
	defer blog.Setup(&cfg.Out, "libvirt, guests, fsck of restored images")()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	work, err := os.MkdirTemp(cfg.Work, "kura-vmbench.")
	if err != nil {
		fatalf("scratch directory: %v", err)
	}
	b := &bench{cfg: cfg, work: work, res: &Results{}}
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
	cfg    config
	work   string
	img    testvm.Image
	vdb    string // cached data disk template
	guests []*testvm.Guest
	res    *Results
}

func (b *bench) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, g := range b.guests {
		if err := g.Destroy(ctx); err != nil {
			logf("cleanup: %v", err)
		}
	}
	b.guests = nil
	if b.cfg.Keep {
		logf("kept scratch directory %s (BENCH_KEEP=1)", b.work)
		return
	}
	if err := os.RemoveAll(b.work); err != nil {
		logf("cleanup: %v", err)
	}
}

func (b *bench) run(ctx context.Context) error {
	b.meta(ctx)
	if err := testvm.EnsureLibvirtd(ctx); err != nil {
		return err
	}
	logf("guest image (scripts/mkguest.sh; waits while another process builds it)")
	img, err := testvm.EnsureImage(ctx)
	if err != nil {
		return err
	}
	b.img = img
	b.res.Meta.GuestImage = img.Version
	if !strings.Contains(img.Version, "fio") {
		return fmt.Errorf("the guest image (%s) has no fio: rebuild it with scripts/mkguest.sh", img.Version)
	}
	if err := b.makeDataDisk(ctx); err != nil {
		return fmt.Errorf("making the data disk: %w", err)
	}
	for _, tool := range b.cfg.Tools {
		if err := b.runTool(ctx, tool); err != nil {
			return fmt.Errorf("%s: %w", tool, err)
		}
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
	m.LoadAvgStart = benchutil.Loadavg()
	m.KuraBinary = b.cfg.Kura
	m.KuraVersion = strings.TrimSpace(os.Getenv("BENCH_KURA_VERSION"))
	m.VNBVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, "virtnbdbackup", "-V"))
	m.QEMUVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, "qemu-system-x86_64", "--version"))
	m.LibvirtVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, "libvirtd", "--version"))
	m.FioVersion = "" // filled in from the guest
	m.Config = b.cfg
}

// writeJSON is a helper for logs.
func writeJSON(path string, v any) error {
	bs, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(bs, '\n'), 0o644)
}
