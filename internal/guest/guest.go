// Package guest talks to the QEMU guest agent inside a virtual machine:
// it freezes and thaws the guest's filesystems around the instant of a
// backup (application-consistent captures) and pings the agent to see
// whether it is there at all.
//
// Two transports reach the agent: libvirt (for domains libvirt manages,
// through its RPC protocol, see NewLibvirt) and the agent's unix socket
// (for plain QEMU guests started with a chardev socket, see NewSocket).
// Every call has a hard timeout, so a hung agent costs seconds, never the
// whole backup.
//
// A guest must never stay frozen because Kura died or hung while it was
// frozen. StartWatchdog runs a separate process, in its own session, that
// thaws the guest when Kura's end of a pipe closes without a "done" line
// (Kura exited, crashed or was killed with SIGKILL) or when a deadline
// passes (Kura hangs). The program that uses this package must call
// WatchdogMain when it is started with WatchdogArg as its first argument.
//
// The package knows nothing about disks, backups or repositories.
package guest

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Sentinel errors callers can test with errors.Is.
var (
	// ErrUnresponsive is returned when the guest has no agent, the agent is
	// not running or not connected, or it does not answer a ping. Kura then
	// cannot freeze the guest; a crash-consistent capture is still possible.
	ErrUnresponsive = errors.New("guest agent not connected or not responding")
	// ErrTimeout is returned when the agent took a command but did not
	// answer it within the call's timeout. A freeze that timed out may still
	// take effect later; thaw (and let the watchdog thaw) after it.
	ErrTimeout = errors.New("guest agent did not answer in time")
	// ErrNotRunning is returned when the VM is not running (or no longer
	// exists), so there is no agent to talk to.
	ErrNotRunning = errors.New("VM not running")
)

// AgentError is an error the guest agent itself returned for a command,
// such as a filesystem that refused to freeze.
type AgentError struct {
	Command string // "guest-fsfreeze-freeze", ...
	Class   string // QMP error class, "GenericError", ...
	Desc    string // the agent's message
}

func (e *AgentError) Error() string {
	if e.Class == "" {
		return fmt.Sprintf("guest agent: %s failed: %s", e.Command, e.Desc)
	}
	return fmt.Sprintf("guest agent: %s failed: %s: %s", e.Command, e.Class, e.Desc)
}

// Filesystem freeze states reported by Status.
const (
	StatusThawed = "thawed"
	StatusFrozen = "frozen"
)

// Freezer freezes and thaws the filesystems of one guest through its agent.
//
// Each call returns within its timeout (Timeouts) or when ctx ends,
// whichever comes first; it never blocks on a hung agent. Freeze and Thaw
// return how many filesystems the agent froze or thawed. Thawing a guest
// that is not frozen succeeds and returns 0. A Freeze that failed or timed
// out may have frozen some filesystems, or may freeze them later: callers
// must Thaw after a failed Freeze too.
//
// Implementations are safe for concurrent use; the agent runs one command
// at a time.
type Freezer interface {
	Freeze(ctx context.Context) (int, error)
	Thaw(ctx context.Context) (int, error)
	// Ping reports whether the agent answers (ErrUnresponsive if not).
	Ping(ctx context.Context) error
	// Status is StatusThawed or StatusFrozen (guest-fsfreeze-status).
	Status(ctx context.Context) (string, error)
}

// Timeouts bound the agent commands. The zero value of each field means
// its default.
type Timeouts struct {
	Freeze time.Duration `json:"freeze,omitempty"` // default 10 s
	Thaw   time.Duration `json:"thaw,omitempty"`   // default 5 s; also used for Status
	Ping   time.Duration `json:"ping,omitempty"`   // default 2 s
}

// Default timeouts.
const (
	DefaultFreezeTimeout = 10 * time.Second
	DefaultThawTimeout   = 5 * time.Second
	DefaultPingTimeout   = 2 * time.Second
)

func (t Timeouts) withDefaults() Timeouts {
	if t.Freeze <= 0 {
		t.Freeze = DefaultFreezeTimeout
	}
	if t.Thaw <= 0 {
		t.Thaw = DefaultThawTimeout
	}
	if t.Ping <= 0 {
		t.Ping = DefaultPingTimeout
	}
	return t
}

// Agent commands.
const (
	cmdPing   = "guest-ping"
	cmdFreeze = "guest-fsfreeze-freeze"
	cmdThaw   = "guest-fsfreeze-thaw"
	cmdStatus = "guest-fsfreeze-status"
)

// timeoutFor is the timeout of one agent command.
func (t Timeouts) timeoutFor(cmd string) time.Duration {
	switch cmd {
	case cmdFreeze:
		return t.Freeze
	case cmdPing:
		return t.Ping
	default:
		return t.Thaw
	}
}
