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

// Meas is what one measured command cost. Seconds includes SyncS when the
// command was followed by a sync (restores: the data must be on disk).
type Meas struct {
	Seconds  float64   `json:"seconds"`
	SyncS    float64   `json:"sync_s,omitempty"`
	MaxRSSKB int64     `json:"max_rss_kb"`
	User     float64   `json:"user_s"`
	Sys      float64   `json:"sys_s"`
	OtherCPU float64   `json:"other_cpu_s"` // CPU the rest of the machine used meanwhile: noise
	Start    time.Time `json:"start"`
	End      time.Time `json:"end"`
	Log      string    `json:"log"` // output of the command, relative to the output directory
}

// measure runs argv under /usr/bin/time -v (and nice when BENCH_NICE is set)
// with env added to the environment (and the names in unset removed), then
// `sync` when withSync is set (counted in Seconds), writes its output to
// logs/NAME.log, and returns the measurement and the output. A non-zero exit
// is an error carrying the end of the output.
func (b *bench) measure(ctx context.Context, name string, withSync bool, env, unset []string, argv ...string) (Meas, string, error) {
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
	busy0 := benchutil.CPUBusy()
	m := Meas{Start: time.Now(), Log: filepath.Join("logs", name+".log")}
	err := cmd.Run()
	if err == nil && withSync {
		s := time.Now()
		_, err = benchutil.Run(ctx, "sync")
		m.SyncS = time.Since(s).Seconds()
	}
	m.End = time.Now()
	busy1 := benchutil.CPUBusy()
	m.Seconds = m.End.Sub(m.Start).Seconds()
	os.WriteFile(logPath, out.Bytes(), 0o644)
	tv := benchutil.ParseTimeV(benchutil.ReadFile(timePath))
	m.MaxRSSKB = int64(tv["Maximum resident set size (kbytes)"])
	m.User, m.Sys = tv["User time (seconds)"], tv["System time (seconds)"]
	m.OtherCPU = max(0, busy1-busy0-m.User-m.Sys)
	if err != nil {
		return m, out.String(), fmt.Errorf("%s failed (%v); see %s:\n%s", argv[0], err, logPath, benchutil.LastLines(out.String(), 15))
	}
	logf("%s: %.2f s (sync %.2f s), peak RSS %d MiB, CPU %.1f+%.1f s, other %.1f CPU-s", name, m.Seconds, m.SyncS, m.MaxRSSKB>>10, m.User, m.Sys, m.OtherCPU)
	return m, out.String(), nil
}

// dropCaches writes dirty pages back and empties the host's page cache, so
// that the next step reads from disk.
func dropCaches(ctx context.Context) error {
	if _, err := benchutil.Run(ctx, "sync"); err != nil {
		return err
	}
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200)
}

func runEnv(ctx context.Context, env, unset []string, name string, args ...string) (string, error) {
	return benchutil.RunWith(ctx, benchutil.MergeEnv(env, unset), name, args...)
}

// findFiles lists the regular files under dir whose base name satisfies ok.
func findFiles(dir string, ok func(string) bool) []string {
	var out []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && ok(d.Name()) {
			out = append(out, p)
		}
		return nil
	})
	sort.Strings(out)
	return out
}

// allocated is the number of bytes qemu-img map reports as data in image
// (through its backing chain; for a raw file, its data extents).
func allocated(ctx context.Context, image string) (int64, error) {
	out, err := benchutil.Run(ctx, "qemu-img", "map", "-U", "--output=json", image)
	if err != nil {
		return 0, err
	}
	var ext []struct {
		Start  int64 `json:"start"`
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

// allocatedIn is the number of data bytes of image in [0, end).
func allocatedIn(ctx context.Context, image string, end int64) (int64, error) {
	out, err := benchutil.Run(ctx, "qemu-img", "map", "-U", "--output=json", image)
	if err != nil {
		return 0, err
	}
	var ext []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &ext); err != nil {
		return 0, fmt.Errorf("qemu-img map %s: %w", image, err)
	}
	var n int64
	for _, e := range ext {
		if e.Data && e.Start < end {
			n += min(e.Start+e.Length, end) - e.Start
		}
	}
	return n, nil
}

func writeJSON(path string, v any) error {
	bs, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(bs, '\n'), 0o644)
}

// median of a sample (the mean of the two middle values for an even count).
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// otherGuests lists the running libvirt domains that are not this run's:
// on a shared machine, other work that competes for the CPU.
func (b *bench) otherGuests(ctx context.Context) []string {
	out, err := benchutil.Run(ctx, "virsh", "list", "--name")
	if err != nil {
		return nil
	}
	var o []string
	for _, n := range strings.Fields(out) {
		if n != b.guestName && n != b.localName && n != b.irName {
			o = append(o, n)
		}
	}
	return o
}
