package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// vmGuest is one test guest of the benchmark.
type vmGuest struct {
	g    *testvm.Guest
	name string
	dir  string
	pid  int // QEMU, after the restart with the cache mode set
}

// makeDataDisk builds (once, cached under $KURA_CACHE/bench/sched-disk) the
// data disk every guest gets a copy of: an ext4 file system labelled
// kuradata (the guest mounts it on /data) of DataGiB GiB holding DataMiB MiB
// of seeded pseudo-random files (incompressible, so every backup reads and
// stores the same bytes) and fio's file /data/fio.dat.
func (b *bench) makeDataDisk(ctx context.Context) error {
	cache, err := testvm.CacheDir()
	if err != nil {
		return err
	}
	dir := filepath.Join(cache, "bench", "sched-disk")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	name := fmt.Sprintf("vdb-ext4-%dg-data%dm-fio%dm-seed%d-v1.qcow2", b.cfg.DataGiB, b.cfg.DataMiB, b.cfg.FioMiB, b.cfg.Seed)
	b.vdb = filepath.Join(dir, name)
	if _, err := os.Stat(b.vdb); err == nil {
		return nil
	}
	logf("building the data disk %s", name)
	stage := filepath.Join(b.work, "vdb-stage")
	if err := os.MkdirAll(filepath.Join(stage, "bulk"), 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(stage)
	if err := writeRandom(filepath.Join(stage, "fio.dat"), int64(b.cfg.FioMiB)*MiB, b.cfg.Seed, 0); err != nil {
		return err
	}
	const fileSize = 4 * MiB
	left := int64(b.cfg.DataMiB) * MiB
	for i := 0; left > 0; i++ {
		n := min(int64(fileSize), left)
		if err := writeRandom(filepath.Join(stage, "bulk", fmt.Sprintf("f%04d.bin", i)), n, b.cfg.Seed, uint64(i+1)); err != nil {
			return err
		}
		left -= n
	}
	raw, q := filepath.Join(b.work, "vdb.raw"), filepath.Join(b.work, "vdb.qcow2")
	f, err := os.Create(raw)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(b.cfg.DataGiB) * GiB)
	f.Close()
	if err != nil {
		return err
	}
	defer os.Remove(raw)
	if _, err := benchutil.Run(ctx, "mkfs.ext4", "-q", "-F", "-L", "kuradata",
		"-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", stage, raw); err != nil {
		return err
	}
	if _, err := benchutil.Run(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q); err != nil {
		return err
	}
	if _, err := benchutil.Run(ctx, "cp", q, b.vdb+".tmp"); err != nil {
		return err
	}
	os.Remove(q)
	return os.Rename(b.vdb+".tmp", b.vdb)
}

// writeRandom writes n pseudo-random bytes (ChaCha8 keyed by seed and stream)
// to path.
func writeRandom(path string, n int64, seed int64, stream uint64) error {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[0:], uint64(seed))
	binary.LittleEndian.PutUint64(key[8:], stream)
	copy(key[16:], "kura-sched-bench")
	rng := rand.NewChaCha8(key)
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, MiB)
	for n > 0 {
		k := min(int64(len(buf)), n)
		rng.Read(buf[:k])
		if _, err := f.Write(buf[:k]); err != nil {
			f.Close()
			return err
		}
		n -= k
	}
	return f.Close()
}

// bootGuests starts the guests, each with a copy of the data disk, and
// restarts each with its disks opened in the configured cache mode:
// testvm writes no cache attribute (QEMU's default is writeback, through
// the host's page cache), so the domain is redefined from its own XML with
// cache and io set, and started again.
func (b *bench) bootGuests(ctx context.Context) error {
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make([]error, b.cfg.Guests)
	for i := 0; i < b.cfg.Guests; i++ {
		name := fmt.Sprintf("kura-sched-%d-g%d", os.Getpid(), i+1)
		dir := filepath.Join(b.disks, fmt.Sprintf("g%d", i+1))
		// Files are made where they will not go through the model.
		made := dir
		if b.backing != "" {
			made = filepath.Join(b.backing, fmt.Sprintf("g%d", i+1))
		}
		if err := os.MkdirAll(made, 0o755); err != nil {
			return err
		}
		vdb := filepath.Join(dir, "vdb.qcow2")
		if _, err := benchutil.Run(ctx, "cp", "--sparse=always", b.vdb, filepath.Join(made, "vdb.qcow2")); err != nil {
			return err
		}
		g, err := testvm.StartLibvirt(ctx, testvm.Options{
			Name: name, Dir: dir, MemoryMiB: b.cfg.MemoryMiB, CPUs: b.cfg.CPUs, Image: b.img,
			Disks: []testvm.DiskSpec{{Source: vdb, Format: "qcow2", FS: "ext4", Mount: "/data"}},
		})
		if err != nil {
			return err
		}
		vg := &vmGuest{g: g, name: name, dir: dir, pid: g.PID}
		b.guests = append(b.guests, vg)
		if b.cfg.Cache != "default" {
			aio := "native"
			if b.backing != "" {
				aio = "threads"
			}
			if err := vg.setCache(ctx, b.cfg.Cache, aio, b.cfg.IOThread); err != nil {
				return err
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			boot, err := g.WaitAgent(ctx)
			if err == nil {
				wctx, cancel := context.WithTimeout(ctx, 90*time.Second)
				benchutil.Sh(wctx, g, "systemctl is-system-running --wait || true")
				cancel()
			}
			mu.Lock()
			errs[i] = err
			if err == nil {
				logf("%s: booted (%s) in %.1f s, QEMU pid %d", name, g.Accel, boot.Seconds(), vg.pid)
				b.res.Meta.Accel = g.Accel
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	v, _ := benchutil.Sh(ctx, b.guests[0].g, "fio --version")
	b.res.Meta.FioVersion = strings.TrimSpace(v)
	for _, vg := range b.guests {
		if err := vg.checkCache(ctx, b.cfg.Cache, b.cfg.IOThread); err != nil {
			return err
		}
	}
	return nil
}

var (
	driverQEMU = regexp.MustCompile(`<driver name='qemu'`)
	vcpuEnd    = regexp.MustCompile(`</vcpu>`)
)

// setCache restarts the domain with every disk's cache mode set, and the
// AIO mode aio with cache=none or directsync; with iothread, the domain
// gets one I/O thread and every disk is served in it (QEMU's NBD export
// of the disk for a pull-mode backup too), not in QEMU's main loop.
//
// aio is "native", or "threads" on the model's FUSE mount, where a Linux
// AIO submission of direct I/O blocks until the request is served (go-fuse
// does not offer the kernel asynchronous direct I/O), which would stall
// QEMU's main loop on every request.
func (vg *vmGuest) setCache(ctx context.Context, mode, aio string, iothread bool) error {
	if _, err := virsh(ctx, "destroy", vg.name); err != nil {
		return err
	}
	x, err := virsh(ctx, "dumpxml", "--inactive", vg.name)
	if err != nil {
		return err
	}
	attrs := fmt.Sprintf("<driver name='qemu' cache='%s'", mode)
	if mode == "none" || mode == "directsync" {
		attrs += " io='" + aio + "'"
	}
	if iothread {
		attrs += " iothread='1'"
		x = vcpuEnd.ReplaceAllString(x, "</vcpu>\n  <iothreads>1</iothreads>")
	}
	x = driverQEMU.ReplaceAllString(x, attrs)
	p := filepath.Join(vg.dir, "domain-cache.xml")
	if err := os.WriteFile(p, []byte(x), 0o644); err != nil {
		return err
	}
	if _, err := virsh(ctx, "define", p); err != nil {
		return err
	}
	vg.g.Started = time.Now()
	if _, err := virsh(ctx, "start", vg.name); err != nil {
		return err
	}
	vg.pid, _ = strconv.Atoi(strings.TrimSpace(benchutil.ReadFile(filepath.Join("/run/libvirt/qemu", vg.name+".pid"))))
	vg.g.PID = vg.pid
	return nil
}

// checkCache verifies in the running domain's XML and QEMU's command line
// that every disk has the cache mode (and the I/O thread).
func (vg *vmGuest) checkCache(ctx context.Context, mode string, iothread bool) error {
	if mode == "default" {
		return nil
	}
	x, err := virsh(ctx, "dumpxml", vg.name)
	if err != nil {
		return err
	}
	n := strings.Count(x, "<disk ")
	if m := strings.Count(x, "cache='"+mode+"'"); m < n {
		return fmt.Errorf("%s: %d of %d disks have cache='%s' in the live XML", vg.name, m, n, mode)
	}
	if m := strings.Count(x, "iothread='1'"); iothread && m < n {
		return fmt.Errorf("%s: %d of %d disks are served in I/O thread 1 in the live XML", vg.name, m, n)
	}
	if mode == "none" || mode == "directsync" {
		cmdline := strings.ReplaceAll(benchutil.ReadFile(fmt.Sprintf("/proc/%d/cmdline", vg.pid)), "\x00", " ")
		if !strings.Contains(cmdline, `"direct":true`) {
			return fmt.Errorf("%s: QEMU (pid %d) does not open its images with O_DIRECT (no \"direct\":true in its -blockdev options)", vg.name, vg.pid)
		}
	}
	return nil
}

// fio is a background fio job in the guest: 4 KiB random reads and writes
// with O_DIRECT (psync, queue depth 1) in /data/fio.dat, each direction
// rate limited, logging every I/O's completion latency with a Unix-epoch
// timestamp (guest clock).
type fio struct {
	g      *testvm.Guest
	name   string
	pid    int
	offset time.Duration // guest clock minus host clock
}

func (b *bench) startFio(ctx context.Context, vg *vmGuest, name string) (*fio, error) {
	g := vg.g
	f := &fio{g: g, name: name}
	off, rtt, err := benchutil.ClockOffset(ctx, g)
	if err != nil {
		return nil, err
	}
	f.offset = off
	// Reads and writes at their rates; with one of them at 0, only the
	// other (a guest that only reads takes no copy-before-write).
	mix := fmt.Sprintf("--rw=randrw --rwmixread=50 --rate_iops=%d,%d", b.cfg.ReadIOPS, b.cfg.WriteIOPS)
	switch {
	case b.cfg.WriteIOPS == 0:
		mix = fmt.Sprintf("--rw=randread --rate_iops=%d", b.cfg.ReadIOPS)
	case b.cfg.ReadIOPS == 0:
		mix = fmt.Sprintf("--rw=randwrite --rate_iops=%d", b.cfg.WriteIOPS)
	}
	script := fmt.Sprintf("rm -f /tmp/%[1]s*; "+
		"fio --name=%[1]s --filename=/data/fio.dat --size=%[2]dM %[3]s --bs=4k --direct=1 --ioengine=psync "+
		"--time_based --runtime=7200 --write_lat_log=/tmp/%[1]s --log_unix_epoch=1 "+
		"--output-format=json --output=/tmp/%[1]s.json >/tmp/%[1]s.out 2>&1 </dev/null & echo $!", name, b.cfg.FioMiB, mix)
	out, err := benchutil.Sh(ctx, g, script)
	if err != nil {
		return nil, err
	}
	if f.pid, err = strconv.Atoi(strings.TrimSpace(out)); err != nil {
		return nil, fmt.Errorf("starting fio: pid %q", out)
	}
	logf("%s: fio %s started (pid %d; %d reads + %d writes/s of 4 KiB, random; guest clock %+.1f ms from the host's, ±%.1f ms)",
		g.Name, name, f.pid, b.cfg.ReadIOPS, b.cfg.WriteIOPS, off.Seconds()*1000, rtt.Seconds()*500)
	return f, nil
}

func (f *fio) alive(ctx context.Context) error {
	if _, err := benchutil.Sh(ctx, f.g, fmt.Sprintf("kill -0 %d", f.pid)); err != nil {
		o, _ := benchutil.Sh(ctx, f.g, fmt.Sprintf("cat /tmp/%s.out", f.name))
		return fmt.Errorf("%s: fio ended early: %s", f.g.Name, o)
	}
	return nil
}

// latSample is one I/O: completion time (host clock), latency, direction.
type latSample struct {
	at    time.Time
	lat   time.Duration
	write bool
}

// stop ends the job (SIGINT: fio finishes and writes its logs) and returns
// every I/O it logged.
func (f *fio) stop(ctx context.Context) ([]latSample, error) {
	script := fmt.Sprintf("kill -INT %[1]d; i=0; while kill -0 %[1]d 2>/dev/null; do i=$((i+1)); [ $i -lt 600 ] || exit 9; sleep 0.1; done; "+
		"cat /tmp/%[2]s_clat.1.log", f.pid, f.name)
	out, err := benchutil.Sh(ctx, f.g, script)
	if err != nil {
		return nil, fmt.Errorf("stopping fio: %w", err)
	}
	var s []latSample
	for _, line := range strings.Split(out, "\n") {
		fl := strings.Split(line, ",")
		if len(fl) < 3 {
			continue
		}
		ms, err1 := strconv.ParseInt(strings.TrimSpace(fl[0]), 10, 64)
		ns, err2 := strconv.ParseInt(strings.TrimSpace(fl[1]), 10, 64)
		dir, err3 := strconv.Atoi(strings.TrimSpace(fl[2]))
		if err1 != nil || err2 != nil || err3 != nil {
			continue
		}
		s = append(s, latSample{at: time.UnixMilli(ms).Add(-f.offset), lat: time.Duration(ns), write: dir == 1})
	}
	if len(s) == 0 {
		o, _ := benchutil.Sh(ctx, f.g, fmt.Sprintf("cat /tmp/%s.out; ls -l /tmp", f.name))
		return nil, fmt.Errorf("%s: fio logged no I/O: %s", f.g.Name, o)
	}
	benchutil.Sh(ctx, f.g, fmt.Sprintf("rm -f /tmp/%s*", f.name))
	return s, nil
}
