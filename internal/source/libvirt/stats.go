package libvirt

import (
	"context"
	"fmt"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// BlockCounters are a disk's cumulative I/O counters as QEMU keeps them
// (libvirt's block stats): operations, bytes and the total time spent in
// them. Latency over an interval is the difference of two samples.
type BlockCounters struct {
	ReadOps, ReadBytes, ReadTimeNs    int64
	WriteOps, WriteBytes, WriteTimeNs int64
	FlushOps, FlushTimeNs             int64
}

// DiskStats returns the I/O counters of the disks targets of the running
// domain name, one libvirt call per disk (virDomainBlockStatsFlags), which
// libvirt answers with QEMU's query-blockstats alone. libvirt's bulk stats
// (virConnectGetAllDomainStats) also make QEMU list its block nodes with their image
// details (query-named-block-nodes: a read of each qcow2's header and
// bitmap directory), in the loop that serves the guest's I/O; a sampler
// that runs every second should not. A call waits while libvirt runs
// another job on the domain (a snapshot, the start of a block commit).
func (c *Conn) DiskStats(ctx context.Context, name string, targets []string) (map[string]BlockCounters, error) {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return nil, err
	}
	out := make(map[string]BlockCounters, len(targets))
	for _, target := range targets {
		params, err := rpc(ctx, c, func() ([]golibvirt.TypedParam, error) {
			// 16: the most the remote protocol returns; libvirt fills
			// what it has.
			params, _, err := c.l.DomainBlockStatsFlags(dom, target, 16, 0)
			return params, err
		})
		if err != nil {
			return nil, fmt.Errorf("block stats of disk %s of %s: %w", target, name, err)
		}
		out[target] = parseDiskStats(params)
	}
	return out, nil
}

// parseDiskStats reads virDomainBlockStatsFlags' fields ("rd_operations",
// "rd_total_times", ...).
func parseDiskStats(params []golibvirt.TypedParam) BlockCounters {
	var b BlockCounters
	fields := map[string]*int64{
		"rd_operations": &b.ReadOps, "rd_bytes": &b.ReadBytes, "rd_total_times": &b.ReadTimeNs,
		"wr_operations": &b.WriteOps, "wr_bytes": &b.WriteBytes, "wr_total_times": &b.WriteTimeNs,
		"flush_operations": &b.FlushOps, "flush_total_times": &b.FlushTimeNs,
	}
	for _, p := range params {
		if dst := fields[p.Field]; dst != nil {
			if v, ok := typedInt(p.Value.I); ok {
				*dst = v
			}
		}
	}
	return b
}

// typedInt is a typed parameter's integer value.
func typedInt(x any) (int64, bool) {
	switch x := x.(type) {
	case int64:
		return x, true
	case uint64:
		return int64(x), true
	case int32:
		return int64(x), true
	case uint32:
		return int64(x), true
	}
	return 0, false
}
