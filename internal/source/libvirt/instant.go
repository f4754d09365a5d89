package libvirt

import (
	"context"
	"fmt"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/kura-backup/kura/internal/guest"
)

// Instant recovery runs a VM whose disks are local qcow2 overlays over
// Kura's NBD export of a restore point. The domain is transient while it
// depends on Kura; MoveDisk copies each disk to local storage and pivots
// onto it, and Persist then defines the domain for good.

// CreateTransient starts a transient domain called name from definition x
// (RestoreDefinition's output), after checking that the name is free.
func (c *Conn) CreateTransient(ctx context.Context, name, x string) error {
	if err := c.CanDefine(ctx, name, false); err != nil {
		return err
	}
	if _, err := rpc(ctx, c, func() (golibvirt.Domain, error) { return c.l.DomainCreateXML(x, 0) }); err != nil {
		return fmt.Errorf("starting domain %s: %w", name, err)
	}
	return nil
}

func (c *Conn) lookup(ctx context.Context, name string) (golibvirt.Domain, error) {
	dom, err := rpc(ctx, c, func() (golibvirt.Domain, error) { return c.l.DomainLookupByName(name) })
	if err != nil {
		if golibvirt.IsNotFound(err) {
			return dom, fmt.Errorf("no domain named %s: %w", name, err)
		}
		return dom, fmt.Errorf("looking up domain %s: %w", name, err)
	}
	return dom, nil
}

// WaitAgent waits until the guest agent of domain name answers a ping.
func (c *Conn) WaitAgent(ctx context.Context, name string) error {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return err
	}
	ag := guest.NewLibvirt(c.l, dom, guest.Timeouts{Ping: 2 * time.Second})
	for {
		err := ag.Ping(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the guest agent of %s did not answer: %w (last: %v)", name, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// AgentPing asks the guest agent of domain name once whether it answers.
func (c *Conn) AgentPing(ctx context.Context, name string) error {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return err
	}
	return guest.NewLibvirt(c.l, dom, guest.Timeouts{}).Ping(ctx)
}

// MoveDisk copies disk target of the running domain name, with its whole
// backing chain, into a new local image dest of format (qcow2 or raw)
// while the guest runs, then pivots the guest onto it: afterwards the disk
// no longer depends on its old backing. progress, when set, is called
// with the copied and total bytes as the copy runs.
func (c *Conn) MoveDisk(ctx context.Context, name, target, dest, format string, progress func(cur, end uint64)) error {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return err
	}
	destXML := fmt.Sprintf("<disk type='file'><driver type='%s'/><source file='%s'/></disk>", format, xmlEscape(dest))
	if err := rpc0(ctx, c, func() error { return c.l.DomainBlockCopy(dom, target, destXML, nil, 0) }); err != nil {
		return fmt.Errorf("copying disk %s of %s to %s: %w", target, name, dest, err)
	}
	abort := func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		rpc0(ctx, c, func() error { return c.l.DomainBlockJobAbort(dom, target, 0) })
	}
	for {
		found, _, _, cur, end, err := c.blockJob(ctx, dom, target)
		if err != nil {
			abort()
			return fmt.Errorf("copying disk %s of %s: %w", target, name, err)
		}
		if found == 0 {
			return fmt.Errorf("copying disk %s of %s: the copy job ended before it was pivoted (see the libvirt log)", target, name)
		}
		if progress != nil {
			progress(cur, end)
		}
		if end > 0 && cur == end {
			// Ready: pivot. libvirt refuses while the mirror is not yet in
			// sync; then try again.
			err := rpc0(ctx, c, func() error { return c.l.DomainBlockJobAbort(dom, target, golibvirt.DomainBlockJobAbortPivot) })
			if err == nil {
				return c.waitJobGone(ctx, dom, target)
			}
			if !strings.Contains(err.Error(), "not ready") && !strings.Contains(err.Error(), "not yet ready") {
				abort()
				return fmt.Errorf("switching disk %s of %s to %s: %w", target, name, dest, err)
			}
		}
		select {
		case <-ctx.Done():
			abort()
			return fmt.Errorf("copying disk %s of %s: %w (the copy was cancelled; the VM still runs on its old disk)", target, name, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (c *Conn) blockJob(ctx context.Context, dom golibvirt.Domain, target string) (found int32, typ int32, bw, cur, end uint64, err error) {
	err = rpc0(ctx, c, func() error {
		var e error
		found, typ, bw, cur, end, e = c.l.DomainGetBlockJobInfo(dom, target, 0)
		return e
	})
	return
}

func (c *Conn) waitJobGone(ctx context.Context, dom golibvirt.Domain, target string) error {
	for {
		found, _, _, _, _, err := c.blockJob(ctx, dom, target)
		if err != nil {
			return err
		}
		if found == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Persist defines the running domain name from its live definition, so
// that it outlives this run (a transient instant-recovery domain becomes
// an ordinary one).
func (c *Conn) Persist(ctx context.Context, name string) error {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return err
	}
	x, err := rpc(ctx, c, func() (string, error) { return c.l.DomainGetXMLDesc(dom, golibvirt.DomainXMLSecure) })
	if err != nil {
		return fmt.Errorf("reading the definition of %s: %w", name, err)
	}
	if _, err := rpc(ctx, c, func() (golibvirt.Domain, error) { return c.l.DomainDefineXML(x) }); err != nil {
		return fmt.Errorf("defining domain %s: %w", name, err)
	}
	return nil
}

// DiskSources returns the image file (or network source) each disk of the
// running domain name reads first, by target.
func (c *Conn) DiskSources(ctx context.Context, name string) (map[string]string, error) {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return nil, err
	}
	x, err := rpc(ctx, c, func() (string, error) { return c.l.DomainGetXMLDesc(dom, 0) })
	if err != nil {
		return nil, fmt.Errorf("reading the definition of %s: %w", name, err)
	}
	def, err := parseDomain(x)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, d := range def.Devices.Disks {
		out[d.Target.Dev] = d.path()
	}
	return out, nil
}

// Destroy stops domain name at once (a transient domain disappears); a
// domain that does not exist is not an error.
func (c *Conn) Destroy(ctx context.Context, name string) error {
	dom, err := rpc(ctx, c, func() (golibvirt.Domain, error) { return c.l.DomainLookupByName(name) })
	if golibvirt.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("looking up domain %s: %w", name, err)
	}
	err = rpc0(ctx, c, func() error { return c.l.DomainDestroy(dom) })
	if err != nil && !golibvirt.IsNotFound(err) && libvirtCode(err) != golibvirt.ErrOperationInvalid {
		return fmt.Errorf("stopping domain %s: %w", name, err)
	}
	return nil
}

func xmlEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch r {
		case '&':
			b.WriteString("&amp;")
		case '<':
			b.WriteString("&lt;")
		case '>':
			b.WriteString("&gt;")
		case '\'':
			b.WriteString("&apos;")
		case '"':
			b.WriteString("&quot;")
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
