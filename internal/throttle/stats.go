package throttle

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Latency is what one disk saw during one sampling interval: the number of
// operations completed and their average latency, per kind.
type Latency struct {
	// Disk names the disk for logs, e.g. "vm-101/vda" or "sdb"; the
	// controller does not interpret it.
	Disk                        string
	ReadOps, WriteOps, FlushOps uint64
	// Average latency of the interval's operations; zero when there were
	// none of that kind.
	Read, Write, Flush time.Duration
}

// Busy is the interval's reads, writes and flushes times their latency:
// divided by the interval's length, the average number of the disk's
// requests in flight (Little's law).
func (l Latency) Busy() time.Duration {
	return time.Duration(l.ReadOps)*l.Read + time.Duration(l.WriteOps)*l.Write + time.Duration(l.FlushOps)*l.Flush
}

// Ops is the number of reads and writes in the interval (flushes are not
// counted: see [Latency.Mean]).
func (l Latency) Ops() uint64 { return l.ReadOps + l.WriteOps }

// Mean is the average latency of the interval's reads and writes together,
// weighted by their counts: the latency an average guest request saw.
// Flushes are left out: their latency is that of writing back a cache, tens
// of milliseconds on a healthy disk, and would drown the signal.
func (l Latency) Mean() time.Duration {
	ops := l.Ops()
	if ops == 0 {
		return 0
	}
	total := float64(l.Read)*float64(l.ReadOps) + float64(l.Write)*float64(l.WriteOps)
	return time.Duration(math.Round(total / float64(ops)))
}

// BlockStats is a snapshot of a guest disk's cumulative counters as QEMU
// keeps them: QMP query-blockstats "stats" (the JSON names below, so the
// object can be decoded into it) or libvirt's block stats parameters
// (rd_operations, rd_total_times, ..., times in nanoseconds).
type BlockStats struct {
	RdOperations     uint64 `json:"rd_operations"`
	WrOperations     uint64 `json:"wr_operations"`
	FlushOperations  uint64 `json:"flush_operations"`
	RdTotalTimeNs    uint64 `json:"rd_total_time_ns"`
	WrTotalTimeNs    uint64 `json:"wr_total_time_ns"`
	FlushTotalTimeNs uint64 `json:"flush_total_time_ns"`
}

// BlockLatency returns the latency of the interval between two snapshots of
// the same disk, prev taken before cur. It returns ok == false when a
// counter went backwards: QEMU started again (the VM was restarted or
// migrated) or the disk was replaced, and the interval says nothing; the
// caller keeps cur as the next prev.
func BlockLatency(disk string, prev, cur BlockStats) (l Latency, ok bool) {
	if cur.RdOperations < prev.RdOperations || cur.WrOperations < prev.WrOperations ||
		cur.FlushOperations < prev.FlushOperations || cur.RdTotalTimeNs < prev.RdTotalTimeNs ||
		cur.WrTotalTimeNs < prev.WrTotalTimeNs || cur.FlushTotalTimeNs < prev.FlushTotalTimeNs {
		return Latency{Disk: disk}, false
	}
	l = Latency{Disk: disk,
		ReadOps:  cur.RdOperations - prev.RdOperations,
		WriteOps: cur.WrOperations - prev.WrOperations,
		FlushOps: cur.FlushOperations - prev.FlushOperations,
	}
	l.Read = average(cur.RdTotalTimeNs-prev.RdTotalTimeNs, time.Nanosecond, l.ReadOps)
	l.Write = average(cur.WrTotalTimeNs-prev.WrTotalTimeNs, time.Nanosecond, l.WriteOps)
	l.Flush = average(cur.FlushTotalTimeNs-prev.FlushTotalTimeNs, time.Nanosecond, l.FlushOps)
	return l, true
}

func average(total uint64, unit time.Duration, ops uint64) time.Duration {
	if ops == 0 {
		return 0
	}
	return time.Duration(math.Round(float64(total) * float64(unit) / float64(ops)))
}

// DiskStats is a snapshot of a host block device's cumulative counters from
// one line of /proc/diskstats (see the kernel's iostats documentation):
// fields 4, 7, 8 and 11, and 19 and 20 where the kernel has them (5.5+).
type DiskStats struct {
	ReadsCompleted, ReadTimeMs    uint64
	WritesCompleted, WriteTimeMs  uint64
	FlushesCompleted, FlushTimeMs uint64
}

// ParseDiskStats parses one line of /proc/diskstats and returns the device
// name and its counters.
func ParseDiskStats(line string) (name string, s DiskStats, err error) {
	f := strings.Fields(line)
	if len(f) < 14 {
		return "", DiskStats{}, fmt.Errorf("diskstats line has %d fields, want at least 14: %q", len(f), line)
	}
	name = f[2]
	// 1-based field numbers as in the kernel documentation.
	want := []struct {
		field int
		dst   *uint64
	}{{4, &s.ReadsCompleted}, {7, &s.ReadTimeMs}, {8, &s.WritesCompleted}, {11, &s.WriteTimeMs},
		{19, &s.FlushesCompleted}, {20, &s.FlushTimeMs}}
	for _, w := range want {
		if w.field > len(f) {
			break
		}
		v, err := strconv.ParseUint(f[w.field-1], 10, 64)
		if err != nil {
			return "", DiskStats{}, fmt.Errorf("diskstats %s field %d: %w", name, w.field, err)
		}
		*w.dst = v
	}
	return name, s, nil
}

// DiskLatencyFromDiskStats returns the latency of a host device over the
// interval between two snapshots, prev taken before cur. The kernel prints
// the time fields as 32-bit millisecond counts, which wrap (after 49.7 days
// of summed request time, which a busy device reaches in days); a time that
// went backwards while the operation count did not is taken as such a wrap.
// It returns ok == false when an operation count went backwards (the device
// went away and came back), as the interval says nothing.
//
// The device figures include the backups' own reads, which are large and
// slow per request: see [Config.DeviceThreshold].
func DiskLatencyFromDiskStats(disk string, prev, cur DiskStats) (l Latency, ok bool) {
	if cur.ReadsCompleted < prev.ReadsCompleted || cur.WritesCompleted < prev.WritesCompleted ||
		cur.FlushesCompleted < prev.FlushesCompleted {
		return Latency{Disk: disk}, false
	}
	rt, ok1 := delta32(prev.ReadTimeMs, cur.ReadTimeMs)
	wt, ok2 := delta32(prev.WriteTimeMs, cur.WriteTimeMs)
	ft, ok3 := delta32(prev.FlushTimeMs, cur.FlushTimeMs)
	if !ok1 || !ok2 || !ok3 {
		return Latency{Disk: disk}, false
	}
	l = Latency{Disk: disk,
		ReadOps:  cur.ReadsCompleted - prev.ReadsCompleted,
		WriteOps: cur.WritesCompleted - prev.WritesCompleted,
		FlushOps: cur.FlushesCompleted - prev.FlushesCompleted,
	}
	l.Read = average(rt, time.Millisecond, l.ReadOps)
	l.Write = average(wt, time.Millisecond, l.WriteOps)
	l.Flush = average(ft, time.Millisecond, l.FlushOps)
	return l, true
}

// delta32 is cur-prev for a counter that may have wrapped at 2^32.
func delta32(prev, cur uint64) (uint64, bool) {
	switch {
	case cur >= prev:
		return cur - prev, true
	case prev <= math.MaxUint32:
		return cur + (1 << 32) - prev, true
	default:
		return 0, false
	}
}
