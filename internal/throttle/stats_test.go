package throttle

import (
	"encoding/json"
	"math"
	"testing"
	"time"
)

func TestBlockLatency(t *testing.T) {
	prev := BlockStats{RdOperations: 1000, WrOperations: 500, FlushOperations: 10,
		RdTotalTimeNs: 2e9, WrTotalTimeNs: 3e9, FlushTotalTimeNs: 1e8}
	cases := []struct {
		name   string
		cur    BlockStats
		want   Latency
		wantOK bool
	}{
		{"reads and writes",
			BlockStats{RdOperations: 1100, WrOperations: 550, FlushOperations: 12,
				RdTotalTimeNs: 2e9 + 200e6, WrTotalTimeNs: 3e9 + 250e6, FlushTotalTimeNs: 1e8 + 30e6},
			Latency{ReadOps: 100, WriteOps: 50, FlushOps: 2,
				Read: 2 * time.Millisecond, Write: 5 * time.Millisecond, Flush: 15 * time.Millisecond}, true},
		{"idle interval has no latency", prev, Latency{}, true},
		{"writes only",
			BlockStats{RdOperations: 1000, WrOperations: 540, FlushOperations: 10,
				RdTotalTimeNs: 2e9, WrTotalTimeNs: 3e9 + 1600e6, FlushTotalTimeNs: 1e8},
			Latency{WriteOps: 40, Write: 40 * time.Millisecond}, true},
		{"VM restarted: counters start again",
			BlockStats{RdOperations: 1200, WrOperations: 20, RdTotalTimeNs: 1e6, WrTotalTimeNs: 1e6},
			Latency{}, false},
		{"time went back alone", func() BlockStats { c := prev; c.RdOperations++; c.RdTotalTimeNs--; return c }(),
			Latency{}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.want.Disk = "vm1/vda"
			got, ok := BlockLatency("vm1/vda", prev, tc.cur)
			if ok != tc.wantOK || got != tc.want {
				t.Errorf("BlockLatency = %+v, %v; want %+v, %v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

func TestBlockStatsDecodesQMP(t *testing.T) {
	// The "stats" object of one query-blockstats entry (abridged).
	const qmp = `{"flush_total_time_ns": 130436557, "wr_highest_offset": 21474770944,
		"wr_total_time_ns": 6254290110, "failed_wr_operations": 0, "rd_bytes": 330199040,
		"wr_operations": 4170, "rd_total_time_ns": 1519374585, "flush_operations": 943,
		"rd_operations": 12075, "wr_bytes": 96133120, "idle_time_ns": 1409062838}`
	var s BlockStats
	if err := json.Unmarshal([]byte(qmp), &s); err != nil {
		t.Fatal(err)
	}
	want := BlockStats{RdOperations: 12075, WrOperations: 4170, FlushOperations: 943,
		RdTotalTimeNs: 1519374585, WrTotalTimeNs: 6254290110, FlushTotalTimeNs: 130436557}
	if s != want {
		t.Errorf("decoded %+v, want %+v", s, want)
	}
}

func TestDiskLatencyFromDiskStats(t *testing.T) {
	prev := DiskStats{ReadsCompleted: 5000, ReadTimeMs: 20000, WritesCompleted: 8000, WriteTimeMs: 40000}
	cases := []struct {
		name   string
		prev   DiskStats
		cur    DiskStats
		want   Latency
		wantOK bool
	}{
		{"reads and writes", prev,
			DiskStats{ReadsCompleted: 5400, ReadTimeMs: 21200, WritesCompleted: 8100, WriteTimeMs: 40500},
			Latency{ReadOps: 400, WriteOps: 100, Read: 3 * time.Millisecond, Write: 5 * time.Millisecond}, true},
		{"idle", prev, prev, Latency{}, true},
		{"32-bit time field wrapped",
			DiskStats{ReadsCompleted: 5000, ReadTimeMs: math.MaxUint32 - 99},
			DiskStats{ReadsCompleted: 5050, ReadTimeMs: 400},
			Latency{ReadOps: 50, Read: 10 * time.Millisecond}, true},
		{"device came back: counts reset", prev,
			DiskStats{ReadsCompleted: 10, ReadTimeMs: 5, WritesCompleted: 9000, WriteTimeMs: 41000},
			Latency{}, false},
		{"time beyond 32 bits went back",
			DiskStats{ReadsCompleted: 1, ReadTimeMs: 1 << 40},
			DiskStats{ReadsCompleted: 2, ReadTimeMs: 1},
			Latency{}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.want.Disk = "sdb"
			got, ok := DiskLatencyFromDiskStats("sdb", tc.prev, tc.cur)
			if ok != tc.wantOK || got != tc.want {
				t.Errorf("DiskLatencyFromDiskStats = %+v, %v; want %+v, %v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

func TestParseDiskStats(t *testing.T) {
	cases := []struct {
		name, line string
		wantName   string
		want       DiskStats
		wantErr    bool
	}{
		{"kernel 5.5+ with flush fields",
			"   8      16 sdb 183459 2081 20489130 95013 477215 219322 35622432 1313569 0 561340 1424367 0 0 0 0 58201 15784",
			"sdb", DiskStats{ReadsCompleted: 183459, ReadTimeMs: 95013, WritesCompleted: 477215, WriteTimeMs: 1313569,
				FlushesCompleted: 58201, FlushTimeMs: 15784}, false},
		{"old kernel, 14 fields",
			" 253       0 dm-0 1200 0 9600 340 800 0 6400 910 0 1000 1250",
			"dm-0", DiskStats{ReadsCompleted: 1200, ReadTimeMs: 340, WritesCompleted: 800, WriteTimeMs: 910}, false},
		{"truncated", "8 16 sdb 1 2 3", "", DiskStats{}, true},
		{"not a number", "8 16 sdb x 0 0 0 0 0 0 0 0 0 0", "", DiskStats{}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			name, got, err := ParseDiskStats(tc.line)
			if (err != nil) != tc.wantErr || name != tc.wantName || got != tc.want {
				t.Errorf("ParseDiskStats = %q, %+v, %v; want %q, %+v, error %v", name, got, err, tc.wantName, tc.want, tc.wantErr)
			}
		})
	}
}

func TestLatencyMeanWeighsByOps(t *testing.T) {
	l := Latency{ReadOps: 90, Read: 2 * time.Millisecond, WriteOps: 10, Write: 22 * time.Millisecond,
		FlushOps: 5, Flush: time.Second}
	if got, want := l.Mean(), 4*time.Millisecond; got != want {
		t.Errorf("Mean() = %v, want %v (flushes left out)", got, want)
	}
	if got := (Latency{}).Mean(); got != 0 {
		t.Errorf("Mean() of an idle interval = %v, want 0", got)
	}
}

func TestLatencyBusy(t *testing.T) {
	for _, tc := range []struct {
		name string
		l    Latency
		want time.Duration
	}{
		{"idle", Latency{}, 0},
		{"reads only", Latency{ReadOps: 100, Read: 2 * time.Millisecond}, 200 * time.Millisecond},
		{"all kinds", Latency{ReadOps: 10, Read: time.Millisecond, WriteOps: 20, Write: 3 * time.Millisecond, FlushOps: 2, Flush: 5 * time.Millisecond}, 80 * time.Millisecond},
	} {
		if got := tc.l.Busy(); got != tc.want {
			t.Errorf("%s: Busy() = %s; want %s", tc.name, got, tc.want)
		}
	}
}
