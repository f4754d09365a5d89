package libvirt

import (
	"context"
	"fmt"
	"strings"

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
	all, err := c.blockStats(ctx, []golibvirt.Domain{dom}, 0)
	if err != nil {
		return nil, fmt.Errorf("block stats of %s: %w", name, err)
	}
	return all[name], nil
}

// AllBlockStats returns the I/O counters of every disk (by target) of every
// running domain (by name), in one call to libvirt that does not wait for
// domains busy with a job (a backup).
func (c *Conn) AllBlockStats(ctx context.Context) (map[string]map[string]BlockCounters, error) {
	all, err := c.blockStats(ctx, nil, golibvirt.ConnectGetAllDomainsStatsActive)
	if err != nil {
		return nil, fmt.Errorf("block stats of the running domains: %w", err)
	}
	return all, nil
}

// blockStats asks libvirt's bulk stats for the block counters of doms
// (all domains matching flags when doms is empty) and sorts them by
// domain and disk target.
func (c *Conn) blockStats(ctx context.Context, doms []golibvirt.Domain, flags golibvirt.ConnectGetAllDomainStatsFlags) (map[string]map[string]BlockCounters, error) {
	recs, err := rpc(ctx, c, func() ([]golibvirt.DomainStatsRecord, error) {
		return c.l.ConnectGetAllDomainStats(doms, uint32(golibvirt.DomainStatsBlock), uint32(flags|golibvirt.ConnectGetAllDomainsStatsNowait))
	})
	if err != nil {
		return nil, err
	}
	out := map[string]map[string]BlockCounters{}
	for _, rec := range recs {
		out[rec.Dom.Name] = parseBlockStats(rec.Params)
	}
	return out, nil
}

// parseBlockStats reads libvirt's bulk block fields ("block.N.name",
// "block.N.rd.reqs", ...) into counters by disk target.
func parseBlockStats(params []golibvirt.TypedParam) map[string]BlockCounters {
	names := map[string]string{}
	vals := map[string]map[string]int64{}
	for _, p := range params {
		rest, ok := strings.CutPrefix(p.Field, "block.")
		if !ok {
			continue
		}
		idx, field, ok := strings.Cut(rest, ".")
		if !ok {
			continue
		}
		if field == "name" {
			if s, ok := p.Value.I.(string); ok {
				names[idx] = s
			}
			continue
		}
		var v int64
		switch x := p.Value.I.(type) {
		case int64:
			v = x
		case uint64:
			v = int64(x)
		case int32:
			v = int64(x)
		case uint32:
			v = int64(x)
		default:
			continue
		}
		if vals[idx] == nil {
			vals[idx] = map[string]int64{}
		}
		vals[idx][field] = v
	}
	out := map[string]BlockCounters{}
	for idx, name := range names {
		v := vals[idx]
		out[name] = BlockCounters{
			ReadOps: v["rd.reqs"], ReadBytes: v["rd.bytes"], ReadTimeNs: v["rd.times"],
			WriteOps: v["wr.reqs"], WriteBytes: v["wr.bytes"], WriteTimeNs: v["wr.times"],
			FlushOps: v["fl.reqs"], FlushTimeNs: v["fl.times"],
		}
	}
	return out
}
