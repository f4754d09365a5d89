package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/kura-backup/kura/bench/internal/benchutil"
	"github.com/kura-backup/kura/internal/testvm"
)

// fio is a background fio job in the guest: 4 KiB random writes with O_DIRECT
// (psync, queue depth 1) into /data/fio.dat, rate limited, logging every
// write's completion latency with a Unix-epoch timestamp (guest clock).
type fio struct {
	g    *testvm.Guest
	name string
	pid  int
	iops int
	// offset is guest clock minus host clock, measured when the job started.
	offset time.Duration
}

// startFio starts the job and returns once it has written for a second.
func (b *bench) startFio(ctx context.Context, g *testvm.Guest, name string, iops int) (*fio, error) {
	f := &fio{g: g, name: name, iops: iops}
	off, rtt, err := benchutil.ClockOffset(ctx, g)
	if err != nil {
		return nil, err
	}
	f.offset = off
	script := fmt.Sprintf("rm -f /tmp/%[1]s*; "+
		"fio --name=%[1]s --filename=/data/fio.dat --size=%[2]dM --rw=randwrite --bs=4k --direct=1 --ioengine=psync "+
		"--rate_iops=%[3]d --time_based --runtime=7200 --write_lat_log=/tmp/%[1]s --log_unix_epoch=1 "+
		"--output-format=json --output=/tmp/%[1]s.json >/tmp/%[1]s.out 2>&1 </dev/null & echo $!", name, b.cfg.FioMiB, iops)
	out, err := benchutil.Sh(ctx, g, script)
	if err != nil {
		return nil, err
	}
	if f.pid, err = strconv.Atoi(strings.TrimSpace(out)); err != nil {
		return nil, fmt.Errorf("starting fio: pid %q", out)
	}
	logf("%s: fio %s started in the guest (pid %d, %d IOPS of 4 KiB random writes; guest clock %+.1f ms from the host's, ±%.1f ms)",
		g.Name, name, f.pid, iops, off.Seconds()*1000, rtt.Seconds()*500)
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-time.After(1500 * time.Millisecond):
	}
	if _, err := benchutil.Sh(ctx, g, fmt.Sprintf("kill -0 %d", f.pid)); err != nil {
		o, _ := benchutil.Sh(ctx, g, fmt.Sprintf("cat /tmp/%s.out", name))
		return nil, fmt.Errorf("fio ended at once: %s", o)
	}
	return f, nil
}

// latSample is one write: completion time (host clock) and latency.
type latSample struct {
	at  time.Time
	lat time.Duration
}

// stop ends the job (SIGINT: fio finishes and writes its logs) and returns
// every write it logged.
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
		if err1 != nil || err2 != nil {
			continue
		}
		at := time.UnixMilli(ms).Add(-f.offset)
		s = append(s, latSample{at: at, lat: time.Duration(ns)})
	}
	if len(s) == 0 {
		o, _ := benchutil.Sh(ctx, f.g, fmt.Sprintf("cat /tmp/%s.out; ls -l /tmp", f.name))
		return nil, fmt.Errorf("fio logged no writes: %s", o)
	}
	benchutil.Sh(ctx, f.g, fmt.Sprintf("rm -f /tmp/%s*", f.name))
	return s, nil
}

// FioStats describe the guest's writes in a window.
type FioStats struct {
	Seconds    float64 `json:"seconds"`
	Writes     int     `json:"writes"`
	IOPS       float64 `json:"iops"`
	TargetIOPS int     `json:"target_iops"`
	LatencyMS  Dist    `json:"latency_ms"` // completion latency (fio clat) of the writes completed in the window
}

func window(s []latSample, from, to time.Time, target int) FioStats {
	var v []float64
	for _, x := range s {
		if !x.at.Before(from) && !x.at.After(to) {
			v = append(v, x.lat.Seconds()*1000)
		}
	}
	sec := to.Sub(from).Seconds()
	st := FioStats{Seconds: sec, Writes: len(v), TargetIOPS: target, LatencyMS: dist(v)}
	if sec > 0 {
		st.IOPS = float64(len(v)) / sec
	}
	return st
}
