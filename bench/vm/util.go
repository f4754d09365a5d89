package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Meas is what one measured command cost.
type Meas struct {
	Seconds  float64   `json:"seconds"`
	MaxRSSKB int64     `json:"max_rss_kb"`
	User     float64   `json:"user_s"`
	Sys      float64   `json:"sys_s"`
	QEMUCPU  float64   `json:"qemu_cpu_s"`     // the guest's QEMU process (vCPUs, NBD server, fleecing)
	VirtCPU  float64   `json:"libvirtd_cpu_s"` // libvirtd (the backup job's API calls)
	OtherCPU float64   `json:"other_cpu_s"`    // the rest of the machine: noise
	Start    time.Time `json:"start"`
	End      time.Time `json:"end"`
	Log      string    `json:"log"` // output of the command, relative to the output directory
}

// measure runs argv under /usr/bin/time -v (and nice when BENCH_NICE is set)
// with env added to the environment (and unset the names in unset), writes its
// output to logs/NAME.log, and returns the measurement and the output. A
// non-zero exit is an error carrying the end of the output.
func (b *bench) measure(ctx context.Context, name string, qemuPID int, env, unset []string, argv ...string) (Meas, string, error) {
	logPath := filepath.Join(b.cfg.Out, "logs", name+".log")
	timePath := filepath.Join(b.cfg.Out, "logs", name+".time")
	full := []string{"/usr/bin/time", "-v", "-o", timePath}
	if b.cfg.Nice != 0 {
		full = append([]string{"nice", "-n", strconv.Itoa(b.cfg.Nice)}, full...)
	}
	full = append(full, argv...)
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	cmd.Env = benchutil.MergeEnv(env, unset)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	logf("%s: %s", name, strings.Join(argv, " "))
	lvPID, _ := strconv.Atoi(strings.TrimSpace(benchutil.ReadFile("/run/libvirtd.pid")))
	busy0, q0, l0 := benchutil.CPUBusy(), procCPU(qemuPID), procCPU(lvPID)
	m := Meas{Start: time.Now(), Log: filepath.Join("logs", name+".log")}
	err := cmd.Run()
	m.End = time.Now()
	busy1, q1, l1 := benchutil.CPUBusy(), procCPU(qemuPID), procCPU(lvPID)
	m.Seconds = m.End.Sub(m.Start).Seconds()
	os.WriteFile(logPath, out.Bytes(), 0o644)
	tv := benchutil.ParseTimeV(benchutil.ReadFile(timePath))
	m.MaxRSSKB = int64(tv["Maximum resident set size (kbytes)"])
	m.User, m.Sys = tv["User time (seconds)"], tv["System time (seconds)"]
	m.QEMUCPU, m.VirtCPU = q1-q0, l1-l0
	m.OtherCPU = max(0, busy1-busy0-m.User-m.Sys-m.QEMUCPU-m.VirtCPU)
	if err != nil {
		return m, out.String(), fmt.Errorf("%s failed (%v); see %s:\n%s", argv[0], err, logPath, benchutil.LastLines(out.String(), 15))
	}
	logf("%s: %.2f s, peak RSS %d MiB, CPU %.1f+%.1f s, QEMU %.1f s, libvirtd %.1f s, other %.1f CPU-s", name, m.Seconds, m.MaxRSSKB>>10, m.User, m.Sys, m.QEMUCPU, m.VirtCPU, m.OtherCPU)
	return m, out.String(), nil
}

var clkTck = 100.0 // USER_HZ on Linux

// procCPU is the CPU seconds process pid has used (0 if it is gone).
func procCPU(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	s := benchutil.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	fl := strings.Fields(s[i+1:]) // fl[0] is field 3 (state); utime is field 14
	if len(fl) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(fl[11], 64)
	st, _ := strconv.ParseFloat(fl[12], 64)
	return (u + st) / clkTck
}

// fileSizes maps each regular file under dir (relative path) to its size.
func fileSizes(dir string) map[string]int64 {
	m := map[string]int64{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				rel, _ := filepath.Rel(dir, p)
				m[rel] = fi.Size()
			}
		}
		return nil
	})
	return m
}

// allocated is the number of bytes qemu-img map reports as data in image
// (through its backing chain): what an NBD export's base:allocation context
// calls data.
func allocated(ctx context.Context, image string) (int64, error) {
	out, err := benchutil.Run(ctx, "qemu-img", "map", "-U", "--output=json", image)
	if err != nil {
		return 0, err
	}
	var ext []struct {
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &ext); err != nil {
		return 0, fmt.Errorf("qemu-img map %s: %w", image, err)
	}
	var n int64
	for _, e := range ext {
		if e.Data {
			n += e.Length
		}
	}
	return n, nil
}

// precache reads files into the page cache, as bench/run.sh does before each
// measured step, so that the host's disk is not what is measured.
func precache(paths ...string) {
	buf := make([]byte, 4*MiB)
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		for {
			if _, err := f.Read(buf); err != nil {
				break
			}
		}
		f.Close()
	}
}

// Dist summarises a sample.
type Dist struct {
	N    int     `json:"n"`
	Min  float64 `json:"min"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P95  float64 `json:"p95"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// dist uses the nearest-rank percentile (the value below which at least p%
// of the sample lies), so that p99 of 50 values is the 50th smallest, i.e.
// the largest: with 50 samples p99 is the maximum.
func dist(v []float64) Dist {
	if len(v) == 0 {
		return Dist{}
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	rank := func(p float64) float64 {
		i := int(p/100*float64(len(s))+0.999999999) - 1
		return s[min(max(i, 0), len(s)-1)]
	}
	var sum float64
	for _, x := range s {
		sum += x
	}
	return Dist{N: len(s), Min: s[0], P50: rank(50), P90: rank(90), P95: rank(95), P99: rank(99), P999: rank(99.9), Max: s[len(s)-1], Mean: sum / float64(len(s))}
}
