package benchutil

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// ClockOffset measures the guest clock against the host's (guest-get-time,
// best of three round trips); the error is at most half a round trip. It
// returns the offset (guest minus host) and that round trip.
func ClockOffset(ctx context.Context, g *testvm.Guest) (time.Duration, time.Duration, error) {
	best, bestRTT := time.Duration(0), time.Duration(-1)
	for i := 0; i < 3; i++ {
		var ns int64
		t1 := time.Now()
		if err := g.Agent(ctx, "guest-get-time", nil, &ns); err != nil {
			return 0, 0, err
		}
		t2 := time.Now()
		rtt := t2.Sub(t1)
		mid := t1.Add(rtt / 2)
		if bestRTT < 0 || rtt < bestRTT {
			best, bestRTT = time.Duration(ns-mid.UnixNano()), rtt
		}
	}
	return best, bestRTT, nil
}

// Sh runs a shell command in the guest and fails on a non-zero exit.
func Sh(ctx context.Context, g *testvm.Guest, script string) (string, error) {
	r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", script)
	if err != nil {
		return r.Stdout, err
	}
	if r.ExitCode != 0 {
		return r.Stdout, fmt.Errorf("guest %s: sh -c %q: exit %d: %s", g.Name, script, r.ExitCode, strings.TrimSpace(r.Stdout+r.Stderr))
	}
	return r.Stdout, nil
}
