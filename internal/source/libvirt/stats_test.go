package libvirt

import (
	"testing"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// parseBlockStats reads the fields of libvirt's bulk stats as libvirtd 9.0
// sends them for a domain with two disks (unsigned long long values, the
// disk names as strings), ignoring other groups and unknown fields.
func TestParseBlockStats(t *testing.T) {
	p := func(field string, v any) golibvirt.TypedParam {
		return golibvirt.TypedParam{Field: field, Value: golibvirt.TypedParamValue{I: v}}
	}
	params := []golibvirt.TypedParam{
		p("block.count", uint32(2)),
		p("block.0.name", "vda"), p("block.0.rd.reqs", uint64(10)), p("block.0.rd.bytes", uint64(4096)), p("block.0.rd.times", uint64(5000)),
		p("block.0.wr.reqs", uint64(3)), p("block.0.wr.times", uint64(900)), p("block.0.fl.reqs", uint64(1)), p("block.0.fl.times", uint64(70)),
		p("block.0.allocation", uint64(1<<20)), p("block.0.path", "/var/lib/libvirt/images/a.qcow2"),
		p("block.1.name", "vdb"), p("block.1.wr.reqs", int64(64)), p("block.1.wr.bytes", uint64(64<<16)), p("block.1.wr.times", uint64(123456)),
		p("state.state", int32(1)),
	}
	got := parseBlockStats(params)
	want := map[string]BlockCounters{
		"vda": {ReadOps: 10, ReadBytes: 4096, ReadTimeNs: 5000, WriteOps: 3, WriteTimeNs: 900, FlushOps: 1, FlushTimeNs: 70},
		"vdb": {WriteOps: 64, WriteBytes: 64 << 16, WriteTimeNs: 123456},
	}
	if len(got) != len(want) {
		t.Fatalf("parseBlockStats = %+v, want %+v", got, want)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("disk %s: %+v, want %+v", k, got[k], w)
		}
	}
}
