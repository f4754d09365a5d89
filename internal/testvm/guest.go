package testvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Options describe a guest to start. The zero value of each field picks the
// default.
type Options struct {
	// Image to boot; the zero Image means EnsureImage.
	Image Image
	// Name of the libvirt domain or QEMU process: [A-Za-z0-9_.-]+. Default
	// "kura-test-" and 8 random hex digits.
	Name string
	// Accel is "kvm" or "tcg"; "" asks ProbeAccel.
	Accel string
	// MemoryMiB defaults to 1024, CPUs to 2.
	MemoryMiB int
	CPUs      int
	// Dir receives the guest's files (root overlay, data disks, console
	// log), for example t.TempDir(). Default: a new temporary directory that
	// Destroy removes.
	Dir string
	// Disks are the data disks, after the root disk vda.
	Disks []DiskSpec
	// Transient makes a libvirt domain that exists only while it runs
	// (virsh create) instead of a defined one (virsh define + start).
	Transient bool
	// ExtraCmdline is appended to the kernel command line.
	ExtraCmdline string
	// IOThread serves every disk in one I/O thread of QEMU: virtio-blk
	// disks in it, and the virtio-scsi controller.
	IOThread bool
}

// Guest is a running test guest. Exec, ExecFull and Agent may be called from
// several goroutines at once; Destroy must be called once, when the guest is
// no longer needed.
type Guest struct {
	Name       string
	Kind       string // "libvirt" or "qemu"
	Accel      string // "kvm" or "tcg"
	Dir        string // the guest's files
	ConsoleLog string // the serial console (kernel and systemd messages, login prompt)
	Disks      []Disk // Disks[0] is the root disk vda
	// QMPSocket and AgentSocket are the unix sockets of a plain QEMU guest
	// (empty under libvirt, which owns both). QMP accepts one client at a
	// time; testvm does not use it. testvm keeps a connection to the agent.
	QMPSocket   string
	AgentSocket string
	// PID is the QEMU process.
	PID int
	// Started is when the guest was started; BootTime, set by WaitAgent, is
	// how long after that its agent first answered.
	Started  time.Time
	BootTime time.Duration

	agent     agentTransport
	ownDir    bool          // Dir was made by testvm
	sockDir   string        // short directory for unix sockets (plain QEMU)
	exited    chan struct{} // closed when a plain QEMU process ended
	exitErr   error         // how it ended, valid after exited is closed
	persisted bool          // libvirt domain is defined (not transient)
	destroyed bool
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)

// prepare fills in defaults, creates the guest's directory and disks, and
// returns a Guest without a running VM. On error everything it made is gone.
func prepare(ctx context.Context, kind string, o *Options) (g *Guest, err error) {
	if o.Image == (Image{}) {
		if o.Image, err = EnsureImage(ctx); err != nil {
			return nil, err
		}
	}
	if o.Name == "" {
		o.Name = "kura-test-" + randomSuffix()
	}
	if !namePattern.MatchString(o.Name) {
		return nil, fmt.Errorf("guest name %q: use letters, digits, '_', '.' and '-'", o.Name)
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 1024
	}
	if o.CPUs == 0 {
		o.CPUs = 2
	}
	if o.Accel == "" {
		if o.Accel, err = ProbeAccel(ctx, o.Image); err != nil {
			return nil, err
		}
	}
	if o.Accel != "kvm" && o.Accel != "tcg" {
		return nil, fmt.Errorf("accelerator %q: use \"kvm\" or \"tcg\"", o.Accel)
	}
	if _, err := planDisks(append([]DiskSpec(nil), o.Disks...)); err != nil {
		return nil, err
	}

	g = &Guest{Name: o.Name, Kind: kind, Accel: o.Accel, Dir: o.Dir}
	if g.Dir == "" {
		if g.Dir, err = os.MkdirTemp("", o.Name+"-"); err != nil {
			return nil, fmt.Errorf("creating the guest directory: %w", err)
		}
		g.ownDir = true
	}
	if g.Dir, err = filepath.Abs(g.Dir); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			g.removeFiles()
		}
	}()
	g.ConsoleLog = filepath.Join(g.Dir, "console.log")
	if err := os.Remove(g.ConsoleLog); err != nil && !errors.Is(err, os.ErrNotExist) {
		return g, fmt.Errorf("removing an old console log: %w", err) // libvirt would append to it
	}
	if g.Disks, err = makeDisks(ctx, o.Image, g.Dir, o.Disks); err != nil {
		return g, err
	}
	return g, nil
}

// removeFiles removes what prepare made.
func (g *Guest) removeFiles() error {
	var errs []error
	if g.sockDir != "" {
		errs = append(errs, os.RemoveAll(g.sockDir))
	}
	if g.ownDir {
		errs = append(errs, os.RemoveAll(g.Dir))
	} else {
		errs = append(errs, removeOwned(g.Disks))
	}
	return errors.Join(errs...)
}

// WaitAgent waits until the guest agent answers guest-ping and every data
// disk with a Mount is mounted, sets BootTime and returns it. Without a
// deadline in ctx it gives up after 3 minutes. It fails early, with the end of
// the console log, when the guest stops.
func (g *Guest) WaitAgent(ctx context.Context) (time.Duration, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 3*time.Minute)
		defer cancel()
	}
	var lastErr error
	for attempt := 0; ; attempt++ {
		if err := g.checkRunning(ctx, attempt); err != nil {
			return 0, err
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		lastErr = g.Agent(pctx, "guest-ping", nil, nil)
		cancel()
		if lastErr == nil {
			break
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("guest %s: the agent did not answer within %s: %w (last: %v)\n%s",
				g.Name, time.Since(g.Started).Round(time.Millisecond), ctx.Err(), lastErr, consoleTail(g.ConsoleLog))
		case <-time.After(250 * time.Millisecond):
		}
	}
	g.BootTime = time.Since(g.Started)

	var mounts []string
	for _, d := range g.Disks {
		if d.Mount != "" && d.Mount != "/" {
			mounts = append(mounts, d.Mount)
		}
	}
	if len(mounts) > 0 {
		sort.Strings(mounts)
		args := append([]string{"waitmount", "-t", "60"}, mounts...)
		r, err := g.ExecFull(ctx, nil, "/usr/local/bin/kura-workload", args...)
		if err == nil && r.ExitCode != 0 {
			err = fmt.Errorf("exit status %d: %s", r.ExitCode, strings.TrimSpace(r.Stdout+r.Stderr))
		}
		if err != nil {
			return g.BootTime, fmt.Errorf("guest %s: waiting for %s to be mounted: %w\n%s", g.Name, strings.Join(mounts, ", "), err, consoleTail(g.ConsoleLog))
		}
	}
	return g.BootTime, nil
}

// checkRunning fails when the guest is known to have stopped.
func (g *Guest) checkRunning(ctx context.Context, attempt int) error {
	switch g.Kind {
	case "qemu":
		select {
		case <-g.exited:
			return fmt.Errorf("guest %s: qemu-system-x86_64 ended before the agent answered: %v\n%s", g.Name, g.exitErr, consoleTail(g.ConsoleLog))
		default:
		}
	case "libvirt":
		if attempt%8 != 7 {
			return nil // virsh is not free; look now and then
		}
		state, err := virsh(ctx, "domstate", g.Name)
		if err != nil {
			return fmt.Errorf("guest %s: %w", g.Name, err)
		}
		if s := strings.TrimSpace(state); s != "running" {
			return fmt.Errorf("guest %s is %s, not running: see %s and /var/log/libvirt/qemu/%s.log\n%s", g.Name, s, g.ConsoleLog, g.Name, consoleTail(g.ConsoleLog))
		}
	}
	return nil
}

// Destroy stops the guest at once (no shutdown), removes the libvirt domain
// with its checkpoint and snapshot metadata, and removes the files testvm made
// (all of Dir if testvm made it, else the disks it made). Calling it again
// does nothing.
func (g *Guest) Destroy(ctx context.Context) error {
	if g.destroyed {
		return nil
	}
	var errs []error
	if g.agent != nil {
		errs = append(errs, g.agent.close())
	}
	switch g.Kind {
	case "qemu":
		errs = append(errs, g.stopQEMU(ctx))
	case "libvirt":
		errs = append(errs, g.removeDomain(ctx))
	}
	errs = append(errs, g.removeFiles())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("destroying guest %s: %w", g.Name, err)
	}
	g.destroyed = true
	return nil
}
