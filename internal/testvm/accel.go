package testvm

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// kvmProbeTimeout bounds the KVM trial boot. A guest that works under KVM
// answers in a few seconds; on machines without nested virtualisation it
// hangs, so the verdict there costs the whole timeout, once.
const kvmProbeTimeout = 25 * time.Second

// accelVerdict is what ProbeAccel caches in CacheDir()/accel.json.
type accelVerdict struct {
	Accel  string    `json:"accel"`
	Key    string    `json:"key"` // machineKey when probed
	Reason string    `json:"reason"`
	Probed time.Time `json:"probed"`
}

// ProbeAccel decides whether guests run under "kvm" or "tcg" on this machine.
// /dev/kvm existing proves nothing (on nested machines without VMX a guest
// hangs under KVM), so it boots img under KVM and takes "kvm" only if the
// guest agent answers within 25 s. The verdict is cached in CacheDir() per
// machine (CPU model, virtualisation flags, kernel release); KURA_ACCEL=kvm or
// tcg overrides it.
func ProbeAccel(ctx context.Context, img Image) (string, error) {
	switch a := os.Getenv("KURA_ACCEL"); a {
	case "":
	case "kvm", "tcg":
		return a, nil
	default:
		return "", fmt.Errorf("KURA_ACCEL=%q: use kvm or tcg", a)
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		return "tcg", nil
	} else {
		f.Close()
	}
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", fmt.Errorf("creating cache directory: %w", err)
	}
	path := filepath.Join(cache, "accel.json")
	key := machineKey()
	if v, ok := readVerdict(path, key); ok {
		return v.Accel, nil
	}
	unlock, err := lockFile(ctx, path+".lock")
	if err != nil {
		return "", err
	}
	defer unlock()
	if v, ok := readVerdict(path, key); ok { // probed meanwhile by another process
		return v.Accel, nil
	}

	v := accelVerdict{Accel: "tcg", Key: key, Probed: time.Now().UTC()}
	g, err := StartQEMU(ctx, Options{Image: img, Name: "kura-probe-" + randomSuffix(), Accel: "kvm", MemoryMiB: 512, CPUs: 1})
	if err != nil {
		if ctx.Err() != nil {
			return "", err
		}
		v.Reason = fmt.Sprintf("qemu under kvm did not start: %v", err)
	} else {
		pctx, cancel := context.WithTimeout(ctx, kvmProbeTimeout)
		boot, werr := g.WaitAgent(pctx)
		cancel()
		if derr := g.Destroy(context.WithoutCancel(ctx)); derr != nil {
			return "", derr
		}
		switch {
		case werr == nil:
			v.Accel, v.Reason = "kvm", fmt.Sprintf("guest agent answered %s after start under kvm", boot.Round(time.Millisecond))
		case ctx.Err() != nil:
			return "", werr
		default:
			v.Reason = fmt.Sprintf("no guest agent within %s under kvm", kvmProbeTimeout)
		}
	}
	b, _ := json.MarshalIndent(v, "", "  ")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return "", fmt.Errorf("caching the accelerator verdict: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("caching the accelerator verdict: %w", err)
	}
	return v.Accel, nil
}

func readVerdict(path, key string) (accelVerdict, bool) {
	var v accelVerdict
	b, err := os.ReadFile(path)
	if err != nil || json.Unmarshal(b, &v) != nil {
		return v, false
	}
	return v, v.Key == key && (v.Accel == "kvm" || v.Accel == "tcg")
}

// machineKey identifies what the verdict depends on: the CPU, whether it
// offers hardware virtualisation, and the host kernel.
func machineKey() string {
	h := sha256.New()
	var uts syscall.Utsname
	if syscall.Uname(&uts) == nil {
		for _, c := range uts.Release {
			if c == 0 {
				break
			}
			h.Write([]byte{byte(c)})
		}
	}
	h.Write([]byte{0})
	model, virt, _ := cpuInfo("/proc/cpuinfo")
	fmt.Fprintf(h, "%s\x00%s", model, virt)
	return hex.EncodeToString(h.Sum(nil)[:12])
}

// cpuInfo returns the first CPU's model name and its hardware virtualisation
// flag ("vmx", "svm" or "").
func cpuInfo(path string) (model, virt string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "model name":
			if model == "" {
				model = strings.TrimSpace(v)
			}
		case "flags":
			for _, fl := range strings.Fields(v) {
				if fl == "vmx" || fl == "svm" {
					virt = fl
				}
			}
			return model, virt, nil
		}
	}
	if err := sc.Err(); err != nil {
		return model, virt, err
	}
	return model, virt, errors.New("no flags line in " + path)
}
