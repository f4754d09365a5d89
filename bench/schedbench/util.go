package main

import (
	"context"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"sort"
)

// virsh runs virsh against the system libvirtd.
func virsh(ctx context.Context, args ...string) (string, error) {
	return benchutil.Run(ctx, "virsh", append([]string{"-q", "-c", "qemu:///system"}, args...)...)
}

// Dist summarises a sample.
type Dist struct {
	N    int     `json:"n"`
	Min  float64 `json:"min"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// dist uses the nearest-rank percentile (the value below which at least p%
// of the sample lies).
func dist(v []float64) Dist {
	if len(v) == 0 {
		return Dist{}
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	var sum float64
	for _, x := range s {
		sum += x
	}
	return Dist{N: len(s), Min: s[0], P50: rank(s, 50), P90: rank(s, 90), P99: rank(s, 99), P999: rank(s, 99.9), Max: s[len(s)-1], Mean: sum / float64(len(s))}
}

// rank is the nearest-rank p-th percentile of sorted s.
func rank(s []float64, p float64) float64 {
	i := int(p/100*float64(len(s))+0.999999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}
