// Package qsd runs qemu-storage-daemon to export one disk image over NBD on
// a private unix socket, so that image formats QEMU understands (qcow2,
// vmdk, vhdx, vdi, ...) can be read with the NBD client in internal/nbd.
//
// The package owns the daemon's lifetime: its command line, its socket
// directory, waiting for it to accept connections, and stopping and reaping
// it. It knows nothing about NBD beyond the socket, nor about backups.
package qsd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kura-backup/kura/internal/childenv"
)

// ErrNotInstalled is returned by Start when qemu-storage-daemon is not in
// $PATH.
var ErrNotInstalled = errors.New("qemu-storage-daemon not found: install qemu-utils (apt-get install qemu-utils)")

// Binary is the program Start runs, looked up in $PATH.
const Binary = "qemu-storage-daemon"

const (
	defaultStartTimeout = 10 * time.Second
	defaultExportName   = "disk"
	// stopGrace is how long Close waits after SIGTERM before SIGKILL.
	stopGrace = 5 * time.Second
	// maxSocketPath is the longest unix socket path Linux accepts.
	maxSocketPath = 107
)

// Options describe the image to export.
type Options struct {
	// Path is the image file or block device.
	Path string
	// Format is the image format ("raw", "qcow2", "vmdk", ...). Empty
	// means ProbeFormat(Path); callers who know the format should say so,
	// since probing trusts bytes a guest may have written to a raw disk.
	Format string
	// Writable exports the image read-write. Otherwise both the file and
	// the format layer are opened read-only.
	Writable bool
	// ExportName is the NBD export name; empty means "disk".
	ExportName string
	// ForceShare opens a read-only image even while another process (a
	// running VM) holds it open for writing. What is read may then be
	// inconsistent; use it only for images known to be quiescent.
	ForceShare bool
	// Bitmaps are persistent dirty bitmaps of a qcow2 image to expose as
	// "qemu:dirty-bitmap:NAME" meta contexts.
	Bitmaps []string
	// StartTimeout bounds the wait for the daemon to accept connections;
	// zero means 10 seconds.
	StartTimeout time.Duration
}

// Daemon is a running qemu-storage-daemon exporting one image.
type Daemon struct {
	cmd    *exec.Cmd
	cancel context.CancelFunc
	dir    string
	socket string
	export string
	format string
	stderr *tailBuffer

	exited  chan struct{} // closed once the process has been reaped
	waitErr error         // valid after exited is closed

	closeOnce sync.Once
	closeErr  error
}

// Start runs qemu-storage-daemon exporting opts.Path on a unix socket in a
// new private (0700) directory, and returns once the socket accepts
// connections. ctx bounds the startup only: the daemon runs until Close. It
// also dies with the calling process (SIGKILL on parent death).
func Start(ctx context.Context, opts Options) (*Daemon, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("exporting %s: %w", opts.Path, err)
	}
	bin, err := exec.LookPath(Binary)
	if err != nil {
		return nil, ErrNotInstalled
	}
	if opts.Writable && opts.ForceShare {
		return nil, fmt.Errorf("exporting %s: ForceShare needs a read-only export", opts.Path)
	}
	st, err := os.Stat(opts.Path)
	if err != nil {
		return nil, fmt.Errorf("exporting image: %w", err)
	}
	if st.IsDir() {
		return nil, fmt.Errorf("exporting image %s: is a directory, not a disk image", opts.Path)
	}
	format := opts.Format
	if format == "" {
		if format, err = ProbeFormat(opts.Path); err != nil {
			return nil, err
		}
	}
	export := opts.ExportName
	if export == "" {
		export = defaultExportName
	}

	dir, err := os.MkdirTemp("", "kura-qsd-")
	if err != nil {
		return nil, fmt.Errorf("creating a socket directory for qemu-storage-daemon: %w", err)
	}
	socket := filepath.Join(dir, "nbd.sock")
	if len(socket) > maxSocketPath {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("socket path %s is longer than %d bytes: set TMPDIR to a shorter directory", socket, maxSocketPath)
	}
	args, err := commandLine(opts, st, format, socket, export)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}

	life, cancel := context.WithCancel(context.Background())
	cmd := childenv.CommandContext(life, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Die with kura. (Linux sends this when the thread that started
		// the daemon exits; Go only retires threads that a goroutine left
		// locked, which this package never does.)
		Pdeathsig: syscall.SIGKILL,
		// Keep a terminal's Ctrl-C away from the daemon: kura decides when
		// it stops.
		Setpgid: true,
	}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = stopGrace
	stderr := &tailBuffer{max: 16 << 10}
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		cancel()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("starting qemu-storage-daemon: %w", err)
	}
	d := &Daemon{
		cmd: cmd, cancel: cancel, dir: dir, socket: socket, export: export,
		format: format, stderr: stderr, exited: make(chan struct{}),
	}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.exited)
	}()
	if err := d.waitReady(ctx, opts); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// commandLine builds the daemon's arguments. Every option is JSON, so
// paths with commas or other QemuOpts syntax need no escaping.
func commandLine(opts Options, st fs.FileInfo, format, socket, export string) ([]string, error) {
	readOnly := !opts.Writable
	protocol := "file"
	if st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0 {
		protocol = "host_device"
	}
	file := map[string]any{
		"driver":    protocol,
		"node-name": "kura-file",
		"filename":  opts.Path,
		"read-only": readOnly,
		"cache":     map[string]any{"direct": false},
		"aio":       "threads",
	}
	node := map[string]any{
		"driver":    format,
		"node-name": "kura-fmt",
		"file":      "kura-file",
		"read-only": readOnly,
	}
	if opts.ForceShare {
		file["force-share"] = true
		node["force-share"] = true
	}
	exp := map[string]any{
		"type":      "nbd",
		"id":        "kura-export",
		"node-name": "kura-fmt",
		"name":      export,
		"writable":  opts.Writable,
	}
	if len(opts.Bitmaps) > 0 {
		exp["bitmaps"] = opts.Bitmaps
	}
	server := map[string]any{"addr": map[string]any{"type": "unix", "path": socket}}
	var args []string
	for _, o := range []struct {
		flag string
		v    any
	}{{"--blockdev", file}, {"--blockdev", node}, {"--nbd-server", server}, {"--export", exp}} {
		b, err := json.Marshal(o.v)
		if err != nil {
			return nil, fmt.Errorf("encoding qemu-storage-daemon %s: %w", o.flag, err)
		}
		args = append(args, o.flag, string(b))
	}
	return args, nil
}

// waitReady polls the socket until it accepts a connection, the daemon
// exits, the timeout passes or ctx is done.
func (d *Daemon) waitReady(ctx context.Context, opts Options) error {
	timeout := opts.StartTimeout
	if timeout <= 0 {
		timeout = defaultStartTimeout
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := net.DialTimeout("unix", d.socket, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-d.exited:
			return fmt.Errorf("qemu-storage-daemon failed to export %s (%s): %v%s", opts.Path, d.format, d.waitErr, d.stderrHint())
		case <-timer.C:
			return fmt.Errorf("qemu-storage-daemon did not accept connections on %s within %v%s", d.socket, timeout, d.stderrHint())
		case <-ctx.Done():
			return fmt.Errorf("waiting for qemu-storage-daemon to export %s: %w", opts.Path, ctx.Err())
		case <-tick.C:
		}
	}
}

// stderrHint returns what the daemon printed, with advice for the common
// failures, formatted to follow an error message.
func (d *Daemon) stderrHint() string {
	s := strings.TrimSpace(d.stderr.String())
	if s == "" {
		return ""
	}
	hint := ""
	switch {
	case strings.Contains(s, "Failed to get") && strings.Contains(s, "lock"):
		hint = " (the image is in use by another process, such as a running VM: shut it down, back it up through the hypervisor, or force sharing to read it anyway at the risk of an inconsistent copy)"
	case strings.Contains(s, "Permission denied"):
		hint = " (run kura as a user who can read the image)"
	}
	return ": " + s + hint
}

// Socket is the path of the unix socket the export is served on.
func (d *Daemon) Socket() string { return d.socket }

// ExportName is the NBD export name to dial.
func (d *Daemon) ExportName() string { return d.export }

// Format is the image format the daemon opened the image as.
func (d *Daemon) Format() string { return d.format }

// Stderr returns the end of what the daemon printed, for error messages.
func (d *Daemon) Stderr() string { return d.stderr.String() }

// Exited is closed when the daemon process has exited.
func (d *Daemon) Exited() <-chan struct{} { return d.exited }

// Close stops the daemon (SIGTERM, then SIGKILL after 5 seconds), reaps
// it and removes its socket directory. It is safe to call more than once.
func (d *Daemon) Close() error {
	d.closeOnce.Do(func() {
		d.cancel()
		<-d.exited
		if err := os.RemoveAll(d.dir); err != nil {
			d.closeErr = fmt.Errorf("removing qemu-storage-daemon socket directory: %w", err)
		}
	})
	return d.closeErr
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = append(t.b[:0], t.b[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
