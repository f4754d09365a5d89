// Package benchutil holds the small helpers the benchmark programs
// (bench/vm, bench/restorevm, bench/schedbench) share: the progress log,
// running helper commands and guest shell commands, the guest clock's
// offset, reading /proc, sizes of files and images.
package benchutil

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
	"strconv"
	"strings"
)

// clkTck is USER_HZ on Linux.
const clkTck = 100.0

// MergeEnv is shared by the benchmark programs.
func MergeEnv(env, unset []string) []string {
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

// Run runs an untimed helper command and fails with its output.
func Run(ctx context.Context, name string, args ...string) (string, error) {
	return RunWith(ctx, nil, name, args...)
}

// RunWith is run with the environment env (nil: this process's).
func RunWith(ctx context.Context, env []string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, LastLines(out.String(), 15))
	}
	return out.String(), nil
}

// CmdOut is shared by the benchmark programs.
func CmdOut(ctx context.Context, name string, args ...string) string {
	out, _ := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out)
}

// ParseTimeV is shared by the benchmark programs.
func ParseTimeV(s string) map[string]float64 {
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

// CPUBusy is the CPU seconds the whole machine has been busy.
func CPUBusy() float64 {
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

// ReadFile is shared by the benchmark programs.
func ReadFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

// FirstLine is shared by the benchmark programs.
func FirstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// LastLines is shared by the benchmark programs.
func LastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}

// Loadavg is shared by the benchmark programs.
func Loadavg() string {
	f := strings.Fields(ReadFile("/proc/loadavg"))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// CPUModel is shared by the benchmark programs.
func CPUModel() string {
	for _, line := range strings.Split(ReadFile("/proc/cpuinfo"), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// DirBytes is the apparent size of every file under dir (du -sb).
func DirBytes(dir string) (int64, error) {
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

// VirtualSize is shared by the benchmark programs.
func VirtualSize(ctx context.Context, image string) (int64, error) {
	out, err := Run(ctx, "qemu-img", "info", "-U", "--output=json", image)
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
