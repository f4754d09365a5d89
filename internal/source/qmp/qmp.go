// Package qmp is the source driver for a plain QEMU virtual machine (no
// libvirt) reached through its QMP unix socket.
//
// It captures all disks of a running VM at one instant with QEMU image
// fleecing: for each disk a temporary qcow2 image whose backing is the live
// disk, filled by a "blockdev-backup sync=none" job that copies every block
// the guest overwrites into it first (copy-before-write), so that the
// fleecing image shows the disk as it was at the instant. All jobs start
// in one QMP transaction, together with the persistent dirty bitmaps that
// track changes for the next incremental backup (bitmap "kura-CHECKPOINT"
// on each qcow2 disk). QEMU's own NBD server exports the fleecing images on
// a private unix socket, with the "base:allocation" meta context and, for
// an incremental capture, "qemu:dirty-bitmap:kura-SINCE"; the driver reads
// them with internal/nbd.
//
// This is the classic fleecing that QEMU 7.2 runs reliably: blockdev-backup
// is a transaction action, so all disks share one instant without pausing
// the guest. (The newer copy-before-write filter with a snapshot-access
// node needs the filter inserted above each disk's node, which no
// transaction action does in 7.2.) Its price: should the scratch directory
// fill up while a backup runs, the guest writes that the job cannot copy
// first fail with ENOSPC, and QEMU's default error policy (werror=enospc)
// pauses the VM. The capture watches for that: it ends itself at once
// (its reads and End fail with ErrScratchFull) and resumes the VM, which
// retries the writes; the pause lasts milliseconds. A disk configured with
// werror=report would pass the error to the guest instead. Put
// Options.ScratchDir on a filesystem with room for what the guest
// overwrites during a backup.
//
// A capture holds the VM's QMP connection from Capture to End (QEMU serves
// one QMP client at a time). If kura dies in between, QEMU keeps the
// fleecing jobs, nodes and exports; the next Capture removes them.
//
// The package also holds a small QMP client (Client). It owns only the
// capture's life cycle inside QEMU (nodes, jobs, exports, bitmaps,
// temporary files) and knows nothing about repositories or backups.
//
// One backup chain per VM: when a backup succeeds, End removes every
// "kura-*" bitmap except the newest one.
package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/source"
)

// ConfigType is the configType VM.Config returns: a JSON document (see
// Config).
const ConfigType = "qmp-json"

// Options tune OpenWith. The zero value is what Open uses.
type Options struct {
	// AgentSocket is the unix socket of the guest agent's chardev. Empty
	// means ask QEMU: the chardev behind the virtserialport named
	// org.qemu.guest_agent.0, if it is a unix socket server.
	AgentSocket string
	// ScratchDir receives each capture's private directory: the fleecing
	// images (they grow by what the guest writes while a backup runs) and
	// the NBD socket. Empty means os.TempDir(). QEMU must be able to
	// create files there.
	ScratchDir string
	// Agent bounds the guest agent's freeze, thaw and ping.
	Agent guest.Timeouts
	// WatchdogExecutable is the program run as the thaw watchdog in app
	// mode; empty means this program, whose main must then call
	// guest.WatchdogMain (see guest.WatchdogArg).
	WatchdogExecutable string
	// WatchdogDeadline is how long the guest may stay frozen before the
	// watchdog thaws it even though kura still runs; zero means the
	// guest package's default (30 s).
	WatchdogDeadline time.Duration
}

// vm is a QEMU process reached through its QMP socket. It holds no
// connection between calls: QEMU's QMP socket serves one client at a time.
type vm struct {
	socket string
	name   string
	opts   Options
}

// Open returns the VM whose QMP unix socket is socketPath. name is the
// VM's name for restore points; empty means the name QEMU was started with
// (-name), else the socket's base name. It checks that QEMU answers.
func Open(ctx context.Context, socketPath, name string) (source.VM, error) {
	return OpenWith(ctx, socketPath, name, Options{})
}

// OpenWith is Open with options.
func OpenWith(ctx context.Context, socketPath, name string, o Options) (source.VM, error) {
	if abs, err := filepath.Abs(socketPath); err == nil {
		socketPath = abs
	}
	if _, err := os.Stat(socketPath); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("QMP socket %s: %w: %w", socketPath, source.ErrNotFound, err)
		}
		return nil, fmt.Errorf("QMP socket %s: %w", socketPath, err)
	}
	c, err := Dial(ctx, socketPath)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if name == "" {
		var n struct {
			Name string `json:"name"`
		}
		if err := c.Execute(ctx, "query-name", nil, &n); err != nil {
			return nil, fmt.Errorf("asking QEMU at %s for the VM's name: %w", socketPath, err)
		}
		name = n.Name
		if name == "" {
			name = strings.TrimSuffix(filepath.Base(socketPath), filepath.Ext(socketPath))
		}
	}
	return &vm{socket: socketPath, name: name, opts: o}, nil
}

func (v *vm) Name() string { return v.name }

// vmConfig is the document Config returns.
type vmConfig struct {
	Name    string          `json:"name"`
	QEMU    string          `json:"qemu-version"`
	Package string          `json:"qemu-package,omitempty"`
	Machine string          `json:"machine,omitempty"`
	Status  string          `json:"status"`
	Cmdline []string        `json:"cmdline,omitempty"`
	Block   json.RawMessage `json:"query-block"`
	Nodes   json.RawMessage `json:"query-named-block-nodes"`
	CPUs    json.RawMessage `json:"query-cpus-fast,omitempty"`
	Memory  json.RawMessage `json:"query-memory-size-summary,omitempty"`
	Taken   time.Time       `json:"taken"`
}

// Config returns ConfigType and a JSON object with what is needed to
// recreate the VM: QEMU's command line (from /proc/PID/cmdline of the QMP
// peer, when kura can read it), the machine type, query-block and
// query-named-block-nodes (flat), CPUs and memory size.
func (v *vm) Config(ctx context.Context) (string, string, error) {
	c, err := Dial(ctx, v.socket)
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	g := c.Greeting()
	cfg := vmConfig{Name: v.name, QEMU: g.VersionString(), Package: g.Version.Package, Taken: time.Now().UTC()}
	st, err := queryStatus(ctx, c)
	if err != nil {
		return "", "", err
	}
	cfg.Status = st.Status
	if err := c.Execute(ctx, "query-block", nil, &cfg.Block); err != nil {
		return "", "", fmt.Errorf("reading the configuration of %s: %w", v.name, err)
	}
	if err := c.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &cfg.Nodes); err != nil {
		return "", "", fmt.Errorf("reading the configuration of %s: %w", v.name, err)
	}
	// Optional parts: older or stripped-down QEMUs may lack them.
	_ = c.Execute(ctx, "query-cpus-fast", nil, &cfg.CPUs)
	_ = c.Execute(ctx, "query-memory-size-summary", nil, &cfg.Memory)
	_ = c.Execute(ctx, "qom-get", map[string]any{"path": "/machine", "property": "type"}, &cfg.Machine)
	if pid := c.PeerPID(); pid > 0 {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && len(b) > 0 {
			cfg.Cmdline = strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
		}
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", "", fmt.Errorf("encoding the configuration of %s: %w", v.name, err)
	}
	return ConfigType, string(b), nil
}

// agentSocket finds the unix socket of the guest agent's chardev: the
// chardev of the virtserialport named org.qemu.guest_agent.0. It returns
// "" when there is none or it is not a unix socket server.
func agentSocket(ctx context.Context, c *Client) (string, error) {
	var label string
	for _, parent := range []string{"/machine/peripheral", "/machine/peripheral-anon"} {
		var props []qomProp
		if err := c.Execute(ctx, "qom-list", map[string]any{"path": parent}, &props); err != nil {
			if isNotFound(err) {
				continue
			}
			return "", fmt.Errorf("looking for the guest agent's port: %w", err)
		}
		for _, p := range props {
			if p.Type != "child<virtserialport>" {
				continue
			}
			path := parent + "/" + p.Name
			var name string
			if err := c.Execute(ctx, "qom-get", map[string]any{"path": path, "property": "name"}, &name); err != nil || name != "org.qemu.guest_agent.0" {
				continue
			}
			if err := c.Execute(ctx, "qom-get", map[string]any{"path": path, "property": "chardev"}, &label); err != nil {
				return "", fmt.Errorf("reading the chardev of the guest agent's port: %w", err)
			}
			break
		}
		if label != "" {
			break
		}
	}
	if label == "" {
		return "", nil
	}
	var chardevs []chardevInfo
	if err := c.Execute(ctx, "query-chardev", nil, &chardevs); err != nil {
		return "", fmt.Errorf("listing chardevs: %w", err)
	}
	for _, cd := range chardevs {
		if cd.Label == label {
			return unixServerPath(cd.Filename), nil
		}
	}
	return "", nil
}

// unixServerPath extracts PATH from the filename QEMU shows for a unix
// socket server chardev, "unix:PATH,server=on" (prefixed "disconnected:"
// while no client is connected); "" for any other chardev.
func unixServerPath(filename string) string {
	f := strings.TrimPrefix(filename, "disconnected:")
	rest, ok := strings.CutPrefix(f, "unix:")
	if !ok {
		return ""
	}
	path, ok := strings.CutSuffix(rest, ",server=on")
	if !ok {
		return ""
	}
	return path
}
