package libvirt

import (
	"testing"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// parseDiskStats reads the fields of virDomainBlockStatsFlags (long long
// values from libvirtd 9.0), ignoring unknown ones.
func TestParseDiskStats(t *testing.T) {
	p := func(field string, v any) golibvirt.TypedParam {
		return golibvirt.TypedParam{Field: field, Value: golibvirt.TypedParamValue{I: v}}
	}
	tests := []struct {
		name   string
		params []golibvirt.TypedParam
		want   BlockCounters
	}{
		{"every field", []golibvirt.TypedParam{
			p("rd_bytes", int64(4096)), p("rd_operations", int64(10)), p("rd_total_times", int64(5000)),
			p("wr_bytes", int64(8192)), p("wr_operations", int64(2)), p("wr_total_times", int64(900)),
			p("flush_operations", int64(1)), p("flush_total_times", int64(70)), p("errs", int64(-1)),
		}, BlockCounters{ReadOps: 10, ReadBytes: 4096, ReadTimeNs: 5000, WriteOps: 2, WriteBytes: 8192, WriteTimeNs: 900, FlushOps: 1, FlushTimeNs: 70}},
		{"other integer types", []golibvirt.TypedParam{p("rd_operations", uint64(3)), p("wr_operations", int32(4)), p("flush_operations", uint32(5))},
			BlockCounters{ReadOps: 3, WriteOps: 4, FlushOps: 5}},
		{"none", nil, BlockCounters{}},
		{"not a number", []golibvirt.TypedParam{p("rd_operations", "x")}, BlockCounters{}},
	}
	for _, tt := range tests {
		if got := parseDiskStats(tt.params); got != tt.want {
			t.Errorf("%s: parseDiskStats = %+v, want %+v", tt.name, got, tt.want)
		}
	}
}
