// Command schedbench is the benchmark that shows why Kura's scheduler
// exists: several test guests on one datastore whose I/O is limited, each
// running a latency-measuring fio workload, are all protected with three
// strategies in one run, and the guests' I/O latency during the backups and
// the time to protect every VM are compared:
//
//   - all-at-once: `kura backup vm A B C --parallel N`, no control;
//   - sequential: one `kura backup vm` after the other;
//   - scheduler: a `kura server` whose job selects the guests, with its
//     limits and adaptive latency control, started with `kura run-now`.
//
// The datastore: every guest's disks are opened with cache=none (the host's
// page cache would hide the contention) and their I/O is limited in one of
// two ways (BENCH_SCHED_DATASTORE):
//
//   - blkio: every guest's QEMU process is moved into one blkio cgroup (v1)
//     whose throttle limits the device holding the images;
//   - model: the images sit on a FUSE mount (bench/internal/slowfs) that
//     serves every request through a model of a small shared device: a few
//     channels, a fixed throughput, one queue.
//
// In pull mode the backup reads are done by QEMU itself (its NBD server), so
// the guests' I/O and their backups' reads share the one budget, as they
// share a real datastore.
//
// Run it through bench/sched.sh, which builds kura and this program and
// documents the settings (BENCH_SCHED_* and a few BENCH_* variables). Results
// go to BENCH_SCHED_OUT: results.md, results.json, latency-*.png, bench.log
// and logs/.
package main

import (
	"context"
	"errors"
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
	"github.com/kura-backup/kura/bench/internal/slowfs"
	"github.com/kura-backup/kura/internal/testvm"
)

const (
	MiB = 1 << 20
	GiB = 1 << 30
)

// config is read from the environment (bench/sched.sh documents each variable).
type config struct {
	Out, Work  string
	Kura       string   // kura binary (BENCH_KURA_BIN)
	KuraFlags  []string // extra global flags for every kura command
	Guests     int
	Strategies []string
	DataMiB    int // random files on each guest's data disk
	FioMiB     int // fio's file on the data disk
	DataGiB    int // virtual size of the data disk
	ReadIOPS   int // fio's random reads per second, per guest
	WriteIOPS  int // fio's random writes per second, per guest
	// The datastore's limit (blkio throttle of the device holding the
	// images), 0: none. Bytes in MiB/s.
	LimitReadMiBs, LimitWriteMiBs int
	LimitReadIOPS, LimitWriteIOPS int
	LimitScope                    string // shared (one cgroup for all guests) or per-vm
	Datastore                     string // blkio (cgroup throttle) or model (slowfs)
	Model                         slowfs.Model
	Cache                         string // cache mode of the guests' disks
	IOThread                      bool   // the guests' disks served in an I/O thread
	BaselineSec                   int    // idle lead-in of each phase
	WarmupSec                     int    // fio before the first phase, not measured
	SettleSec                     int
	PerHost, PerDatastore         int // scheduler limits
	ThresholdMS                   float64
	ThresholdX                    float64 // threshold = X × baseline p99 when ThresholdMS is 0
	MinRate, Increase             string  // latency.min_rate and latency.increase of the scheduler's config
	OffRate                       string  // --limit-read of the off-datastore strategy ("": none)
	OffWorkers                    int     // --workers of the off-/on-datastore strategies (0: kura's default)
	ReadWindow                    bool    // latency.read_window
	MaxReads                      int     // latency.max_reads
	ScratchOnDatastore            bool    // kura's scratch directory (CBW images, overlays) on the datastore
	ReadSize                      string  // latency.read_size ("": whole chunks)
	Bandwidth                     string  // limits.bandwidth, each backup's read rate ("": none)
	IntervalS                     float64
	Seed                          int64
	Keep                          bool
	MemoryMiB, CPUs               int
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

func envFloat(k string, def float64) float64 {
	v := os.Getenv(k)
	if v == "" {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		fatalf("%s=%q: not a number", k, v)
	}
	return f
}

func loadConfig() config {
	cache, err := testvm.CacheDir()
	if err != nil {
		fatalf("%v", err)
	}
	c := config{
		Out:                os.Getenv("BENCH_SCHED_OUT"),
		Work:               envStr("BENCH_WORK", "/var/tmp"),
		Kura:               os.Getenv("BENCH_KURA_BIN"),
		KuraFlags:          strings.Fields(os.Getenv("BENCH_SCHED_KURA_FLAGS")),
		Guests:             envInt("BENCH_SCHED_GUESTS", 3),
		MinRate:            envStr("BENCH_SCHED_MIN_RATE", "2MiB"),
		OffRate:            os.Getenv("BENCH_SCHED_OFF_RATE"),
		OffWorkers:         envInt("BENCH_SCHED_OFF_WORKERS", 0),
		Increase:           envStr("BENCH_SCHED_INCREASE", "4MiB"),
		ReadWindow:         os.Getenv("BENCH_SCHED_READ_WINDOW") == "1",
		MaxReads:           envInt("BENCH_SCHED_MAX_READS", 0),
		ScratchOnDatastore: os.Getenv("BENCH_SCHED_SCRATCH") == "datastore",
		ReadSize:           os.Getenv("BENCH_SCHED_READ_SIZE"),
		Bandwidth:          os.Getenv("BENCH_SCHED_BANDWIDTH"),
		Strategies:         strings.Fields(envStr("BENCH_SCHED_STRATEGIES", "all-at-once sequential scheduler")),
		DataMiB:            envInt("BENCH_SCHED_DATA_MIB", 256),
		FioMiB:             envInt("BENCH_SCHED_FIO_MIB", 64),
		DataGiB:            envInt("BENCH_SCHED_DATA_GIB", 2),
		ReadIOPS:           envInt("BENCH_SCHED_FIO_READ_IOPS", 40),
		WriteIOPS:          envInt("BENCH_SCHED_FIO_WRITE_IOPS", 40),
		LimitReadMiBs:      envInt("BENCH_SCHED_LIMIT_READ_MIBS", 32),
		LimitWriteMiBs:     envInt("BENCH_SCHED_LIMIT_WRITE_MIBS", 32),
		LimitReadIOPS:      envInt("BENCH_SCHED_LIMIT_READ_IOPS", 0),
		LimitWriteIOPS:     envInt("BENCH_SCHED_LIMIT_WRITE_IOPS", 0),
		LimitScope:         envStr("BENCH_SCHED_LIMIT_SCOPE", "shared"),
		Datastore:          envStr("BENCH_SCHED_DATASTORE", "blkio"),
		Model: slowfs.Model{
			Channels: envInt("BENCH_SCHED_MODEL_CHANNELS", 4),
			MiBs:     envFloat("BENCH_SCHED_MODEL_MIBS", 40),
			Overhead: time.Duration(envFloat("BENCH_SCHED_MODEL_OVERHEAD_MS", 0.5) * float64(time.Millisecond)),
		},
		Cache:        envStr("BENCH_SCHED_CACHE", "none"),
		IOThread:     os.Getenv("BENCH_SCHED_IOTHREAD") == "1",
		BaselineSec:  envInt("BENCH_SCHED_BASELINE_S", 20),
		WarmupSec:    envInt("BENCH_SCHED_WARMUP_S", 30),
		SettleSec:    envInt("BENCH_SCHED_SETTLE_S", 5),
		PerHost:      envInt("BENCH_SCHED_PER_HOST", 3),
		PerDatastore: envInt("BENCH_SCHED_PER_DATASTORE", 3),
		ThresholdMS:  envFloat("BENCH_SCHED_THRESHOLD_MS", 0),
		ThresholdX:   envFloat("BENCH_SCHED_THRESHOLD_X", 1.2),
		IntervalS:    envFloat("BENCH_SCHED_INTERVAL_S", 1),
		Seed:         int64(envInt("BENCH_SCHED_SEED", 42)),
		Keep:         os.Getenv("BENCH_KEEP") == "1",
		MemoryMiB:    envInt("BENCH_SCHED_MEMORY_MIB", 768),
		CPUs:         envInt("BENCH_SCHED_CPUS", 1),
	}
	if c.Out == "" {
		c.Out = filepath.Join(cache, "bench", "sched-results", time.Now().Format("20060102-150405"))
	}
	if c.Kura == "" {
		fatalf("BENCH_KURA_BIN is not set: run bench/sched.sh, which builds kura")
	}
	if c.Guests < 1 || c.Guests > 8 {
		fatalf("BENCH_SCHED_GUESTS=%d: use 1 to 8", c.Guests)
	}
	for _, s := range c.Strategies {
		if _, _, err := parseStrategy(s, c); err != nil {
			fatalf("BENCH_SCHED_STRATEGIES: %v", err)
		}
	}
	switch c.LimitScope {
	case "shared", "per-vm":
	default:
		fatalf("BENCH_SCHED_LIMIT_SCOPE=%q: use shared or per-vm", c.LimitScope)
	}
	switch c.Datastore {
	case "blkio", "model":
	default:
		fatalf("BENCH_SCHED_DATASTORE=%q: use blkio or model", c.Datastore)
	}
	switch c.Cache {
	case "none", "directsync", "writeback", "default":
	default:
		fatalf("BENCH_SCHED_CACHE=%q: use none, directsync, writeback or default", c.Cache)
	}
	if c.IOThread && c.Cache == "default" {
		fatalf("BENCH_SCHED_IOTHREAD=1 needs a BENCH_SCHED_CACHE other than default (the domain is redefined with both)")
	}
	return c
}

// blog is the benchmark's progress log; logf and fatalf write to it.
var blog = benchutil.NewLog("sched-bench")

func logf(format string, a ...any)   { blog.Printf(format, a...) }
func fatalf(format string, a ...any) { blog.Fatalf(format, a...) }

func main() {
	cfg := loadConfig()
	defer blog.Setup(&cfg.Out, "libvirt, guests, cgroups")()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if err := os.MkdirAll(cfg.Work, 0o755); err != nil {
		fatalf("BENCH_WORK: %v", err)
	}
	work, err := os.MkdirTemp(cfg.Work, "kura-schedbench.")
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
	logf("done in %.0f s: %s", time.Since(blog.Start).Seconds(), filepath.Join(cfg.Out, "results.md"))
}

// bench holds the run's state.
type bench struct {
	cfg    config
	work   string
	img    testvm.Image
	vdb    string // cached data disk template
	guests []*vmGuest
	ds     store
	disks  string // where the guests' directories go (on the model's mount)
	// backing is the model's backing directory, where files are put
	// without going through the model; "" with the blkio datastore.
	backing string
	pwFile  string
	res     *Results
	// rootSrc is the root image as a file off the datastore (the
	// off-datastore strategy reads it).
	rootSrc string
	nice    bool // the running phase runs kura at nice 19
}

func (b *bench) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, g := range b.guests {
		if err := g.g.Destroy(ctx); err != nil {
			logf("cleanup: %v", err)
		}
	}
	b.guests = nil
	if b.ds != nil {
		if err := b.ds.remove(); err != nil {
			logf("cleanup: %v", err)
		}
		b.ds = nil
	}
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
	dev, err := blockDeviceOf(b.work)
	if err != nil {
		return fmt.Errorf("BENCH_WORK=%s: %w", b.cfg.Work, err)
	}
	b.res.Meta.Device = dev
	logf("the guests' images go to %s, on block device %s (%s)", b.work, dev.Name, dev.MajMin)
	if err := testvm.EnsureLibvirtd(ctx); err != nil {
		return err
	}
	img, err := testvm.EnsureImage(ctx)
	if err != nil {
		return err
	}
	b.img = img
	b.rootSrc = img.RootQcow2
	b.res.Meta.GuestImage = img.Version
	if !strings.Contains(img.Version, "fio") {
		return fmt.Errorf("the guest image (%s) has no fio: rebuild it with scripts/mkguest.sh", img.Version)
	}
	b.disks = b.work
	if b.cfg.Datastore == "model" {
		if err := b.mountModel(ctx); err != nil {
			return err
		}
	} else if rdev, err := blockDeviceOf(img.RootQcow2); err != nil || rdev.MajMin != dev.MajMin {
		// The guests' root overlays are backed by the cached root image: it
		// must sit on the limited device too, or its reads escape the limit.
		return fmt.Errorf("the guest image %s is not on %s (%v): put KURA_CACHE and BENCH_WORK on one block device", img.RootQcow2, dev.Name, err)
	}
	if err := b.makeDataDisk(ctx); err != nil {
		return fmt.Errorf("making the data disk: %w", err)
	}
	if b.backing != "" {
		// The on-datastore strategy reads a copy of the data disk on the
		// model's mount (written beside it, not through the model).
		if _, err := benchutil.Run(ctx, "cp", "--sparse=always", b.vdb, filepath.Join(b.backing, "vdb-copy.qcow2")); err != nil {
			return err
		}
	}
	b.pwFile = filepath.Join(b.work, "password")
	if err := os.WriteFile(b.pwFile, []byte("kura-sched-bench\n"), 0o600); err != nil {
		return err
	}
	if err := b.bootGuests(ctx); err != nil {
		return err
	}
	if b.ds == nil {
		if b.ds, err = newDatastore(b.cfg, dev, b.guests); err != nil {
			return err
		}
	}
	b.res.Meta.Limit = b.ds.describe()
	logf("datastore: %s", b.res.Meta.Limit)
	if err := b.warmUp(ctx); err != nil {
		return err
	}
	for _, s := range b.cfg.Strategies {
		if err := b.runPhase(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return nil
}

// mountModel puts the guests on a slowfs mount: the cached root image is
// copied to its backing directory (the overlays must read it through the
// model too), and the guests' directories go under the mount.
func (b *bench) mountModel(ctx context.Context) error {
	b.backing = filepath.Join(b.work, "device")
	mnt := filepath.Join(b.work, "mnt")
	for _, d := range []string{b.backing, mnt} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if _, err := benchutil.Run(ctx, "cp", "--sparse=always", b.img.RootQcow2, filepath.Join(b.backing, "root.qcow2")); err != nil {
		return err
	}
	fsys, err := slowfs.Mount(b.backing, mnt, b.cfg.Model)
	if err != nil {
		return err
	}
	b.ds = &modelStore{fs: fsys}
	b.img.RootQcow2 = filepath.Join(mnt, "root.qcow2")
	b.disks = mnt
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
	m.QEMUVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, "qemu-system-x86_64", "--version"))
	m.LibvirtVersion = benchutil.FirstLine(benchutil.CmdOut(ctx, "libvirtd", "--version"))
	m.Config = b.cfg
}

// warmUp runs fio in every guest for WarmupSec and discards what it
// measured: the first minute after boot (the guests' own start-up work, the
// first touch of fio's file) is not the guests' rest.
func (b *bench) warmUp(ctx context.Context) error {
	if b.cfg.WarmupSec <= 0 {
		return nil
	}
	logf("warm-up: fio in every guest for %d s, not measured", b.cfg.WarmupSec)
	fios := make([]*fio, len(b.guests))
	err := b.eachGuest(func(i int, vg *vmGuest) error {
		f, err := b.startFio(ctx, vg, "warmup")
		fios[i] = f
		return err
	})
	if err == nil {
		err = settle(ctx, time.Duration(b.cfg.WarmupSec)*time.Second)
	}
	err2 := b.eachGuest(func(i int, vg *vmGuest) error {
		if fios[i] == nil {
			return nil
		}
		_, err := fios[i].stop(context.WithoutCancel(ctx))
		return err
	})
	return errors.Join(err, err2)
}
