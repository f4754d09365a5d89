package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
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
	cmd.Env = mergeEnv(env, unset)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	logf("%s: %s", name, strings.Join(argv, " "))
	lvPID, _ := strconv.Atoi(strings.TrimSpace(readFile("/run/libvirtd.pid")))
	busy0, q0, l0 := cpuBusy(), procCPU(qemuPID), procCPU(lvPID)
	m := Meas{Start: time.Now(), Log: filepath.Join("logs", name+".log")}
	err := cmd.Run()
	m.End = time.Now()
	busy1, q1, l1 := cpuBusy(), procCPU(qemuPID), procCPU(lvPID)
	m.Seconds = m.End.Sub(m.Start).Seconds()
	os.WriteFile(logPath, out.Bytes(), 0o644)
	tv := parseTimeV(readFile(timePath))
	m.MaxRSSKB = int64(tv["Maximum resident set size (kbytes)"])
	m.User, m.Sys = tv["User time (seconds)"], tv["System time (seconds)"]
	m.QEMUCPU, m.VirtCPU = q1-q0, l1-l0
	m.OtherCPU = max(0, busy1-busy0-m.User-m.Sys-m.QEMUCPU-m.VirtCPU)
	if err != nil {
		return m, out.String(), fmt.Errorf("%s failed (%v); see %s:\n%s", argv[0], err, logPath, lastLines(out.String(), 15))
	}
	logf("%s: %.2f s, peak RSS %d MiB, CPU %.1f+%.1f s, QEMU %.1f s, libvirtd %.1f s, other %.1f CPU-s", name, m.Seconds, m.MaxRSSKB>>10, m.User, m.Sys, m.QEMUCPU, m.VirtCPU, m.OtherCPU)
	return m, out.String(), nil
}

func mergeEnv(env, unset []string) []string {
	drop := map[string]bool{}
	for _, k := range unset {
		drop[k] = true
	}
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		drop[k] = true
	}
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !drop[k] {
			out = append(out, kv)
		}
	}
	return append(out, env...)
}

// run runs an untimed helper command and fails with its output.
func run(ctx context.Context, name string, args ...string) (string, error) {
	return runWith(ctx, nil, name, args...)
}

// runWith is run with the environment env (nil: this process's).
func runWith(ctx context.Context, env []string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, lastLines(out.String(), 15))
	}
	return out.String(), nil
}

func cmdOut(ctx context.Context, name string, args ...string) string {
	out, _ := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out)
}

func parseTimeV(s string) map[string]float64 {
	m := map[string]float64{}
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ": ")
		if !ok {
			continue
		}
		if f, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
			m[k] = f
		}
	}
	return m
}

var clkTck = 100.0 // USER_HZ on Linux

// cpuBusy is the CPU seconds the whole machine has been busy.
func cpuBusy() float64 {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0
	}
	fl := strings.Fields(sc.Text()) // cpu user nice system idle iowait irq softirq steal
	var busy float64
	for i, v := range fl[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i > 7 { // guest, guest_nice are included in user
			break
		}
		n, _ := strconv.ParseFloat(v, 64)
		busy += n
	}
	return busy / clkTck
}

// procCPU is the CPU seconds process pid has used (0 if it is gone).
func procCPU(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	s := readFile(fmt.Sprintf("/proc/%d/stat", pid))
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

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}

func loadavg() string {
	f := strings.Fields(readFile("/proc/loadavg"))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func cpuModel() string {
	for _, line := range strings.Split(readFile("/proc/cpuinfo"), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// dirBytes is the apparent size of every file under dir (du -sb).
func dirBytes(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			n += fi.Size()
		}
		return nil
	})
	return n, err
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
	out, err := run(ctx, "qemu-img", "map", "-U", "--output=json", image)
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

func virtualSize(ctx context.Context, image string) (int64, error) {
	out, err := run(ctx, "qemu-img", "info", "-U", "--output=json", image)
	if err != nil {
		return 0, err
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		return 0, err
	}
	return info.VirtualSize, nil
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
