// Package libvirt is the source driver for virtual machines that libvirt
// manages (QEMU/KVM domains on qemu:///system).
//
// It talks to libvirtd over its RPC protocol (github.com/digitalocean/go-libvirt;
// no virsh, no libvirt C library) and captures a running VM with libvirt's
// pull-mode backup: at one instant libvirt points every disk's writes at a
// scratch overlay (image fleecing) and exports each disk's point-in-time view
// over NBD on a private unix socket, which this package reads with
// internal/nbd. A checkpoint created at the same instant makes the next
// capture incremental: QEMU's dirty bitmaps then say which blocks changed.
//
// Consistency modes: app freezes the guest's filesystems through its agent
// (internal/guest, guarded by a watchdog process) around the instant; crash
// takes the instant as is; suspend pauses the VM around it; shutdown shuts
// the guest down cleanly, starts it again paused, takes the instant and
// resumes it (the disks are read while the guest boots). A shut-off VM's
// disk files are read offline, in full.
//
// The package owns the backup job, the checkpoints named "kura-…" and its
// private directory of scratch files; it knows nothing about repositories.
package libvirt

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/source"
)

// DefaultURI is the libvirt connection of system-wide QEMU/KVM domains.
const DefaultURI = "qemu:///system"

// defaultSocket is libvirtd's socket for qemu:///system.
const defaultSocket = "/var/run/libvirt/libvirt-sock"

// Options tune a connection. The zero value of each field means its default.
type Options struct {
	// ScratchDir receives each capture's private directory (NBD socket and
	// scratch overlays, which grow with what the guest writes while a backup
	// runs). Default /var/tmp.
	ScratchDir string
	// Agent bounds the guest agent calls (freeze 10 s, thaw 5 s, ping 2 s).
	Agent guest.Timeouts
	// WatchdogDeadline is how long the guest may stay frozen (or paused)
	// before the watchdog process thaws it even though Kura still runs.
	// Default 30 s.
	WatchdogDeadline time.Duration
	// ShutdownTimeout bounds the wait for a clean guest shutdown in
	// shutdown mode. Default 3 minutes.
	ShutdownTimeout time.Duration
	// CallTimeout bounds one libvirt call. Default 60 s.
	CallTimeout time.Duration
}

func (o Options) withDefaults() Options {
	if o.ScratchDir == "" {
		o.ScratchDir = "/var/tmp"
	}
	if o.WatchdogDeadline <= 0 {
		o.WatchdogDeadline = guest.DefaultWatchdogDeadline
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 3 * time.Minute
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = 60 * time.Second
	}
	return o
}

// Conn is a connection to libvirtd. It is safe for concurrent use.
type Conn struct {
	l      *golibvirt.Libvirt
	socket string // libvirtd's unix socket
	uri    string // the driver URI opened on it
	opts   Options
}

// Connect connects to libvirtd. uri is a libvirt URI of the local QEMU
// driver ("qemu:///system", also with "?socket=PATH", or
// "qemu+unix:///system"), or the path of libvirtd's unix socket.
func Connect(ctx context.Context, uri string) (*Conn, error) {
	return ConnectWithOptions(ctx, uri, Options{})
}

// ConnectWithOptions is Connect with options.
func ConnectWithOptions(ctx context.Context, uri string, opts Options) (*Conn, error) {
	socket, driver, err := resolveURI(uri)
	if err != nil {
		return nil, err
	}
	c := &Conn{socket: socket, uri: driver, opts: opts.withDefaults()}
	timeout := 15 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = max(time.Millisecond, min(timeout, time.Until(dl)))
	}
	l := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(timeout)))
	done := make(chan error, 1)
	go func() { done <- l.ConnectToURI(golibvirt.ConnectURI(driver)) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		go func() {
			if <-done == nil {
				l.Disconnect()
			}
		}()
		err = ctx.Err()
	}
	if err != nil {
		return nil, fmt.Errorf("connecting to libvirt %s at %s: %w (is libvirtd running? start it with `systemctl start libvirtd`, or `libvirtd -d`)", driver, socket, err)
	}
	c.l = l
	return c, nil
}

// resolveURI maps a URI or socket path to libvirtd's socket and the driver
// URI to open on it.
func resolveURI(uri string) (socket, driver string, err error) {
	if uri == "" {
		uri = DefaultURI
	}
	if strings.HasPrefix(uri, "/") {
		return filepath.Clean(uri), DefaultURI, nil
	}
	u, err := url.Parse(uri)
	if err != nil {
		return "", "", fmt.Errorf("libvirt URI %q: %w", uri, err)
	}
	scheme, transport, _ := strings.Cut(u.Scheme, "+")
	if scheme != "qemu" || (transport != "" && transport != "unix") || u.Host != "" {
		return "", "", fmt.Errorf("libvirt URI %q: only the local QEMU driver is supported (qemu:///system, or the path of libvirtd's socket)", uri)
	}
	if u.Path != "/system" {
		return "", "", fmt.Errorf("libvirt URI %q: only qemu:///system is supported (session daemons run unprivileged and cannot read other users' disks)", uri)
	}
	socket = defaultSocket
	if s := u.Query().Get("socket"); s != "" {
		socket = s
	}
	return socket, "qemu:///system", nil
}

// Close ends the connection. Captures must have ended first.
func (c *Conn) Close() error {
	done := make(chan error, 1)
	go func() { done <- c.l.Disconnect() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("disconnecting from libvirt: %w", err)
		}
		return nil
	case <-time.After(5 * time.Second):
		return errors.New("disconnecting from libvirt: libvirtd did not answer within 5s")
	}
}

// List returns the names of all domains, running and defined, sorted.
func (c *Conn) List(ctx context.Context) ([]string, error) {
	doms, err := rpc(ctx, c, func() ([]golibvirt.Domain, error) {
		d, _, err := c.l.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive|golibvirt.ConnectListDomainsInactive)
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("listing libvirt domains: %w", err)
	}
	names := make([]string, 0, len(doms))
	for _, d := range doms {
		names = append(names, d.Name)
	}
	slices.Sort(names)
	return names, nil
}

// VM looks up the domain called name. A domain that does not exist gives
// an error wrapping source.ErrNotFound.
func (c *Conn) VM(ctx context.Context, name string) (source.VM, error) {
	dom, err := rpc(ctx, c, func() (golibvirt.Domain, error) { return c.l.DomainLookupByName(name) })
	if err != nil {
		if golibvirt.IsNotFound(err) {
			return nil, fmt.Errorf("libvirt domain %q: %w (see `kura vm list`, or `virsh list --all`)", name, source.ErrNotFound)
		}
		return nil, fmt.Errorf("looking up libvirt domain %q: %w", name, err)
	}
	return &VM{c: c, dom: dom}, nil
}

// VM is a libvirt domain. It implements source.VM.
type VM struct {
	c   *Conn
	dom golibvirt.Domain
}

// Name is the domain's name.
func (v *VM) Name() string { return v.dom.Name }

// UUID is the domain's UUID.
func (v *VM) UUID() string { return guest.FormatUUID(v.dom.UUID) }

// Config returns the domain XML ("libvirt-xml"): for a running domain its
// live definition in the form libvirt accepts for defining it elsewhere
// (VIR_DOMAIN_XML_MIGRATABLE), else its persistent definition.
func (v *VM) Config(ctx context.Context) (string, string, error) {
	x, err := rpc(ctx, v.c, func() (string, error) {
		return v.c.l.DomainGetXMLDesc(v.dom, golibvirt.DomainXMLMigratable)
	})
	if err != nil {
		return "", "", v.errorf(err, "reading the domain XML")
	}
	return "libvirt-xml", x, nil
}

// errorf wraps err with what the driver was doing to the VM, mapping a
// vanished domain to source.ErrNotFound.
func (v *VM) errorf(err error, format string, a ...any) error {
	what := fmt.Sprintf(format, a...)
	if golibvirt.IsNotFound(err) {
		return fmt.Errorf("VM %s: %s: the domain no longer exists: %w: %w", v.dom.Name, what, source.ErrNotFound, err)
	}
	return fmt.Errorf("VM %s: %s: %w", v.dom.Name, what, err)
}

// state is the domain's state (running, paused, shut off, ...).
func (v *VM) state(ctx context.Context) (golibvirt.DomainState, error) {
	st, _, err := v.stateReason(ctx)
	return st, err
}

// stateReason returns the VM's state and libvirt's reason for it (a
// golibvirt.DomainShutoffReason when it is shut off, and so on).
func (v *VM) stateReason(ctx context.Context) (golibvirt.DomainState, int32, error) {
	type sr struct{ s, r int32 }
	st, err := rpc(ctx, v.c, func() (sr, error) {
		s, r, err := v.c.l.DomainGetState(v.dom, 0)
		return sr{s, r}, err
	})
	if err != nil {
		return 0, 0, v.errorf(err, "reading its state")
	}
	return golibvirt.DomainState(st.s), st.r, nil
}

// rpc runs f, a go-libvirt call that cannot be cancelled, bounded by ctx
// and the connection's call timeout. When it gives up, f still runs until
// libvirtd answers or the connection closes.
func rpc[T any](ctx context.Context, c *Conn, f func() (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.CallTimeout)
	defer cancel()
	v, err := guest.Call(ctx, f)
	if err != nil && ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		if !c.l.IsConnected() {
			return v, fmt.Errorf("the connection to libvirtd was lost: %w", err)
		}
		return v, fmt.Errorf("libvirtd did not answer: %w", err)
	}
	return v, err
}

// rpc0 is rpc for calls that return only an error.
func rpc0(ctx context.Context, c *Conn, f func() error) error {
	_, err := rpc(ctx, c, func() (struct{}, error) { return struct{}{}, f() })
	return err
}

// libvirtCode is libvirt's error number of err, or -1.
func libvirtCode(err error) golibvirt.ErrorNumber {
	var le golibvirt.Error
	if errors.As(err, &le) {
		return golibvirt.ErrorNumber(le.Code)
	}
	return -1
}

var _ source.VM = (*VM)(nil)
