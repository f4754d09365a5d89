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

// BlockStats returns the I/O counters of every disk (by target) of the
// running domain name.
func (c *Conn) BlockStats(ctx context.Context, name string) (map[string]BlockCounters, error) {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return nil, err
	}
	srcs, err := c.DiskSources(ctx, name)
	if err != nil {
		return nil, err
	}
	out := map[string]BlockCounters{}
	for target := range srcs {
		var params []golibvirt.TypedParam
		err := rpc0(ctx, c, func() error {
			// The first call tells how many parameters there are.
			_, n, err := c.l.DomainBlockStatsFlags(dom, target, 0, 0)
			if err != nil {
				return err
			}
			params, _, err = c.l.DomainBlockStatsFlags(dom, target, n, 0)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("block stats of %s disk %s: %w", name, target, err)
		}
		var bc BlockCounters
		for _, p := range params {
			v, ok := p.Value.I.(int64)
			if !ok {
				if u, isU := p.Value.I.(uint64); isU {
					v, ok = int64(u), true
				}
			}
			if !ok {
				continue
			}
			switch p.Field {
			case "rd_operations":
				bc.ReadOps = v
			case "rd_bytes":
				bc.ReadBytes = v
			case "rd_total_times":
				bc.ReadTimeNs = v
			case "wr_operations":
				bc.WriteOps = v
			case "wr_bytes":
				bc.WriteBytes = v
			case "wr_total_times":
				bc.WriteTimeNs = v
			case "flush_operations":
				bc.FlushOps = v
			case "flush_total_times":
				bc.FlushTimeNs = v
			}
		}
		out[target] = bc
	}
	return out, nil
}
