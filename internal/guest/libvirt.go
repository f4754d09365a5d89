package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// libvirtFreezer reaches the agent of a libvirt domain through libvirtd
// (virDomainQemuAgentCommand), which owns the agent's channel.
//
// It sends the guest-fsfreeze-* commands itself rather than calling
// virDomainFSFreeze: that call waits for the agent as long as the domain's
// agent timeout says, which by default is forever, and holds the domain's
// agent job meanwhile, so a thaw would wait behind a hung freeze. The
// explicit timeout of virDomainQemuAgentCommand bounds every call. The
// price is that libvirt logs the domain as tainted (custom-ga-command)
// once per run of the domain.
type libvirtFreezer struct {
	l   *golibvirt.Libvirt
	dom golibvirt.Domain
	t   Timeouts
}

// NewLibvirt returns a Freezer for the agent of domain dom on the libvirt
// connection l. The connection stays the caller's.
func NewLibvirt(l *golibvirt.Libvirt, dom golibvirt.Domain, t Timeouts) Freezer {
	return &libvirtFreezer{l: l, dom: dom, t: t.withDefaults()}
}

func (f *libvirtFreezer) Freeze(ctx context.Context) (int, error) {
	var n int
	err := f.command(ctx, cmdFreeze, &n)
	return n, err
}

func (f *libvirtFreezer) Thaw(ctx context.Context) (int, error) {
	var n int
	err := f.command(ctx, cmdThaw, &n)
	return n, err
}

func (f *libvirtFreezer) Ping(ctx context.Context) error {
	return f.command(ctx, cmdPing, nil)
}

func (f *libvirtFreezer) Status(ctx context.Context) (string, error) {
	var s string
	err := f.command(ctx, cmdStatus, &s)
	return s, err
}

// rpcSlack is how much longer than the agent timeout Kura waits for
// libvirtd to answer before it gives up on the RPC itself.
const rpcSlack = 3 * time.Second

func (f *libvirtFreezer) command(ctx context.Context, cmd string, result any) error {
	timeout := f.t.timeoutFor(cmd)
	secs := int32(max(1, (timeout+time.Second-1)/time.Second))
	ctx, cancel := context.WithTimeout(ctx, timeout+rpcSlack)
	defer cancel()
	req, _ := json.Marshal(map[string]string{"execute": cmd})
	reply, err := Call(ctx, func() (golibvirt.OptString, error) {
		return f.l.QEMUDomainAgentCommand(f.dom, string(req), secs, 0)
	})
	if err != nil {
		return fmt.Errorf("%s in VM %s: %w", cmd, f.dom.Name, libvirtAgentError(cmd, err))
	}
	if len(reply) == 0 {
		return fmt.Errorf("%s in VM %s: libvirt returned no reply", cmd, f.dom.Name)
	}
	if err := decodeReply(cmd, []byte(reply[0]), result); err != nil {
		return fmt.Errorf("%s in VM %s: %w", cmd, f.dom.Name, err)
	}
	return nil
}

// libvirtAgentError maps libvirt's error codes to the package's errors.
func libvirtAgentError(cmd string, err error) error {
	var le golibvirt.Error
	if !errors.As(err, &le) {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%w: libvirtd did not answer: %w", ErrTimeout, err)
		}
		return err
	}
	switch golibvirt.ErrorNumber(le.Code) {
	case golibvirt.ErrAgentUnresponsive, golibvirt.ErrAgentUnsynced:
		// libvirt says "not responding" both when no agent is connected and
		// when a connected agent does not answer in time.
		if strings.Contains(le.Message, "not connected") {
			return fmt.Errorf("%w: %w (is qemu-guest-agent installed and running in the guest, with an org.qemu.guest_agent.0 channel in the domain?)", ErrUnresponsive, err)
		}
		return fmt.Errorf("%w: %w (no answer within the timeout: the agent may be stuck, or busy freezing)", ErrUnresponsive, err)
	case golibvirt.ErrAgentCommandTimeout, golibvirt.ErrOperationTimeout:
		return fmt.Errorf("%w: %w", ErrTimeout, err)
	case golibvirt.ErrAgentCommandFailed:
		return &AgentError{Command: cmd, Desc: le.Message}
	case golibvirt.ErrNoDomain:
		return fmt.Errorf("%w: %w", ErrNotRunning, err)
	case golibvirt.ErrOperationInvalid:
		// "domain is not running"; also used for other invalid requests.
		return fmt.Errorf("%w: %w", ErrNotRunning, err)
	case golibvirt.ErrArgumentUnsupported, golibvirt.ErrNoSupport, golibvirt.ErrConfigUnsupported:
		return fmt.Errorf("%w: %w", ErrUnresponsive, err)
	}
	return err
}

// Call runs f, a go-libvirt call that cannot be cancelled, and stops
// waiting for it when ctx ends. f then still runs until libvirtd answers or
// the connection is closed; closing the connection ends it.
func Call[T any](ctx context.Context, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

// dialLibvirt connects to libvirtd's unix socket and opens the driver uri.
func dialLibvirt(ctx context.Context, socket, uri string) (*golibvirt.Libvirt, error) {
	timeout := 15 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = max(time.Millisecond, min(timeout, time.Until(dl)))
	}
	l := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(timeout)))
	done := make(chan error, 1)
	go func() { done <- l.ConnectToURI(golibvirt.ConnectURI(uri)) }()
	select {
	case err := <-done:
		if err != nil {
			return nil, fmt.Errorf("connecting to libvirtd at %s (%s): %w", socket, uri, err)
		}
		return l, nil
	case <-ctx.Done():
		// Close the connection once the handshake ends, whenever that is.
		go func() {
			if <-done == nil {
				l.Disconnect()
			}
		}()
		return nil, fmt.Errorf("connecting to libvirtd at %s (%s): %w", socket, uri, ctx.Err())
	}
}
