package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/backend/location"
	"github.com/kura-backup/kura/internal/childenv"
	"github.com/kura-backup/kura/internal/export"
	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/qemuargs"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source/libvirt"
	"github.com/kura-backup/kura/internal/source/qmp"
	"github.com/kura-backup/kura/internal/termsafe"
)

// defaultInstantDir holds the overlays of instant-recovered VMs: what
// the guest writes until it is migrated.
const defaultInstantDir = "/var/lib/kura/instant"

// instantSession is a VM running from a restore point: what `kura instant`
// started and what --migrate and --stop undo. It is kept as
// runDir/instant/NAME/session.json.
type instantSession struct {
	Name      string            `json:"name"`
	Snapshot  string            `json:"snapshot"`
	Repo      string            `json:"repo"`
	Connect   string            `json:"connect"`
	Socket    string            `json:"socket"`
	ServerPID int               `json:"server_pid"`
	Overlays  map[string]string `json:"overlays"` // disk target -> overlay file
	// OverlayDir holds the overlays and the VM's own files (console log;
	// for plain QEMU also its sockets).
	OverlayDir string    `json:"overlay_dir"`
	Started    time.Time `json:"started"`

	// Kind is "libvirt" (a transient libvirt domain) or "qemu" (a QEMU
	// process started from the command line saved with the backup).
	Kind string `json:"kind"`
	// Plain QEMU: the process, its QMP monitor for kura, the guest agent's
	// socket and the command line it runs.
	QEMUPID     int      `json:"qemu_pid,omitempty"`
	QMPSocket   string   `json:"qmp_socket,omitempty"`
	AgentSocket string   `json:"agent_socket,omitempty"`
	Cmdline     []string `json:"cmdline,omitempty"`
}

func sessionDir(name string) string { return filepath.Join(runDir, "instant", name) }

func loadSession(name string) (*instantSession, error) {
	data, err := os.ReadFile(filepath.Join(sessionDir(name), "session.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no instant recovery of %s is running (none in %s): list them with `kura instant --list`", name, sessionDir(""))
	}
	if err != nil {
		return nil, err
	}
	var s instantSession
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(sessionDir(name), "session.json"), err)
	}
	return &s, nil
}

func (s *instantSession) save() error {
	data, _ := json.MarshalIndent(s, "", "  ")
	return os.WriteFile(filepath.Join(sessionDir(s.Name), "session.json"), data, 0o600)
}

func (a *app) instantCmd() *cobra.Command {
	var as, connect, dir, migrate, stop, to, format string
	var list, noWait bool
	var waitAgent time.Duration
	cmd := &cobra.Command{
		Use:   "instant SNAPSHOT [--as NAME] | --migrate NAME --to DIR | --stop NAME | --list",
		Short: "Run a VM straight from a restore point, then move it to local disks while it runs",
		Long: "instant starts a VM from a restore point within seconds: its disks are local qcow2 overlays over a read-only NBD export\n" +
			"of the restore point, served by a kura process in the background, so the restore point is never modified.\n" +
			"A libvirt VM runs as a libvirt domain; a plain-QEMU VM (kura backup qmp) runs as a QEMU process started from the\n" +
			"command line saved with the backup, its sockets and logs in the overlay directory.\n" +
			"--migrate copies the running VM's disks to local files and switches it onto them with no downtime; afterwards\n" +
			"the VM no longer depends on kura (a defined libvirt domain, or a QEMU process with a start.sh for its local disks).\n" +
			"--stop discards an instant VM and what it wrote.",
		Args: func(cmd *cobra.Command, args []string) error {
			if migrate != "" || stop != "" || list {
				return cobra.NoArgs(cmd, args)
			}
			return cobra.ExactArgs(1)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			switch {
			case list:
				return a.instantList()
			case migrate != "":
				if to == "" {
					return errors.New("say where the disks go with --to DIR")
				}
				if format != "qcow2" && format != "raw" {
					return fmt.Errorf("--format %q: use qcow2 or raw", format)
				}
				return a.instantMigrate(ctx, migrate, to, format)
			case stop != "":
				return a.instantStop(ctx, stop)
			}
			return a.instantStart(ctx, args[0], as, connect, dir, !noWait, waitAgent)
		},
	}
	cmd.Flags().StringVar(&as, "as", "", "the VM's `name` (a copy beside the original: new UUID and MAC addresses); default the original's name, which must be free")
	cmd.Flags().StringVarP(&connect, "connect", "c", "qemu:///system", "libvirt `URI` or socket path (libvirt VMs)")
	cmd.Flags().StringVar(&dir, "dir", defaultInstantDir, "`directory` for the overlays that take the guest's writes")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the VM starts, without waiting for its guest agent")
	cmd.Flags().DurationVar(&waitAgent, "wait-agent", 5*time.Minute, "how long to wait for the guest agent")
	durRange(cmd.Flags(), "wait-agent", time.Second, 24*time.Hour, "or --no-wait")
	cmd.Flags().StringVar(&migrate, "migrate", "", "move instant VM `NAME` onto local disks (with --to) while it runs")
	cmd.Flags().StringVar(&to, "to", "", "with --migrate: `directory` for the VM's disks")
	cmd.Flags().StringVar(&format, "format", "qcow2", "with --migrate: image `format` of the local disks (qcow2 or raw)")
	cmd.Flags().StringVar(&stop, "stop", "", "stop instant VM `NAME` and discard what it wrote")
	cmd.Flags().BoolVar(&list, "list", false, "list the VMs running from restore points")
	return cmd
}

func (a *app) instantStart(ctx context.Context, arg, as, connect, dir string, wait bool, waitAgent time.Duration) (err error) {
	began := time.Now()
	r, err := a.open(ctx)
	if err != nil {
		return err
	}
	snap, err := findSnapshot(ctx, r, arg)
	if err != nil {
		return err
	}
	kind := ""
	if snap.Config != nil {
		switch snap.Config.Type {
		case "libvirt-xml":
			kind = "libvirt"
		case qmp.ConfigType:
			kind = "qemu"
		}
	}
	if kind == "" {
		return fmt.Errorf("restore point %s (%s) is not of a VM: serve its disks with `kura export %s` and attach them to a VM yourself", snap.ID[:8], snap.Name, snap.ID[:8])
	}
	name := snap.Name
	if as != "" {
		name = as
	}
	var conn *libvirt.Conn
	var cmdline []string
	if kind == "libvirt" {
		if conn, err = libvirt.Connect(ctx, connect); err != nil {
			return err
		}
		defer conn.Close()
		if err := conn.CanDefine(ctx, name, false); err != nil {
			return err
		}
	} else if cmdline, err = qmp.SavedCommandLine(snap.Config.Data); err != nil {
		return fmt.Errorf("restore point %s: %w: serve its disks with `kura export %s` and start QEMU on them yourself", snap.ID[:8], err, snap.ID[:8])
	}
	sdir := sessionDir(name)
	if _, err := os.Stat(filepath.Join(sdir, "session.json")); err == nil {
		return fmt.Errorf("an instant recovery of %s is already running: stop it with `kura instant --stop %s`", name, name)
	}
	odir := filepath.Join(dir, name)
	if err := os.MkdirAll(sdir, 0o700); err != nil {
		return err
	}
	if err := os.MkdirAll(odir, 0o755); err != nil {
		return fmt.Errorf("making the overlay directory: %w", err)
	}
	repoPath, err := location.Canonical(a.repoPath)
	if err != nil {
		return err
	}
	s := &instantSession{Name: name, Snapshot: snap.ID, Repo: repoPath, Connect: connect, Kind: kind,
		Socket: filepath.Join(sdir, "nbd.sock"), Overlays: map[string]string{}, OverlayDir: odir, Started: began}
	defer func() {
		if err != nil {
			a.instantCleanup(context.WithoutCancel(ctx), s, true)
		}
	}()
	if err := a.startServer(ctx, s, r); err != nil {
		return err
	}
	disks := map[string]libvirt.RestoredDisk{}
	for _, d := range snap.Disks {
		ov := filepath.Join(odir, d.Name+".qcow2")
		if _, err := os.Stat(ov); err == nil {
			return fmt.Errorf("%s exists (left by an earlier instant recovery?): remove it or choose another --dir", ov)
		}
		rd, err := newOverlay(ctx, s.Socket, d, ov)
		if err != nil {
			return err
		}
		s.Overlays[d.Name] = ov
		disks[d.Name] = rd
	}
	if err := s.save(); err != nil {
		return err
	}
	if kind == "libvirt" {
		def, err := libvirt.RestoreDefinition(snap.Config.Data, name, as != "", disks)
		if err != nil {
			return fmt.Errorf("restore point %s: %w", snap.ID[:8], err)
		}
		if err := conn.CreateTransient(ctx, name, def); err != nil {
			return err
		}
	} else if err := a.startQEMU(ctx, s, snap, cmdline, as != ""); err != nil {
		return err
	}
	started := time.Since(began)
	fmt.Fprintf(a.stdout, "VM %s runs from restore point %s (%s, %s), started in %s; its writes go to %s\n",
		show(name), snap.ID[:8], show(snap.Name), snap.Time.Local().Format("2006-01-02 15:04:05"), started.Round(10*time.Millisecond), show(odir))
	if kind == "qemu" {
		fmt.Fprintf(a.stdout, "QEMU pid %d, QMP socket %s, console and logs in %s\n", s.QEMUPID, show(s.QMPSocket), show(odir))
	}
	if wait {
		wctx, cancel := context.WithTimeout(ctx, waitAgent)
		defer cancel()
		var err error
		if kind == "libvirt" {
			err = conn.WaitAgent(wctx, name)
		} else {
			err = waitSocketAgent(wctx, s)
		}
		if err != nil {
			// The VM runs; the user decides what to do with it.
			fmt.Fprintf(a.stdout, "warning: %s\n", termsafe.Line(err.Error()))
		} else {
			fmt.Fprintf(a.stdout, "guest agent answered %s after the command started\n", time.Since(began).Round(10*time.Millisecond))
		}
	}
	fmt.Fprintf(a.stdout, "keep it: kura instant --migrate %s --to DIR   discard it: kura instant --stop %s\n", show(shellQuote(name)), show(shellQuote(name)))
	return nil
}

// startQEMU starts a plain QEMU VM from the command line saved with snap,
// every backed-up disk replaced by its overlay, and records it in s.
func (a *app) startQEMU(ctx context.Context, s *instantSession, snap *repo.Snapshot, cmdline []string, newIdentity bool) error {
	plan := qemuargs.Plan{Disks: map[string]qemuargs.Image{}, RunDir: s.OverlayDir, NewIdentity: newIdentity}
	if newIdentity {
		plan.Name = s.Name
	}
	for _, d := range snap.Disks {
		if d.SourcePath == "" {
			return fmt.Errorf("restore point %s does not say which image disk %s was read from", snap.ID[:8], d.Name)
		}
		plan.Disks[d.SourcePath] = qemuargs.Image{Path: s.Overlays[d.Name], Format: "qcow2"}
	}
	rw, err := qemuargs.Rewrite(cmdline, plan)
	if err != nil {
		return fmt.Errorf("restore point %s: %w", snap.ID[:8], err)
	}
	s.QMPSocket, s.AgentSocket, s.Cmdline = rw.QMPSocket, rw.AgentSocket, rw.Args
	pid, err := qmp.Start(ctx, rw.Args, filepath.Join(s.OverlayDir, "qemu.log"), rw.QMPSocket)
	if err != nil {
		return err
	}
	s.QEMUPID = pid
	return s.save()
}

// waitSocketAgent waits until the guest agent of a plain QEMU session
// answers, or QEMU ends.
func waitSocketAgent(ctx context.Context, s *instantSession) error {
	if s.AgentSocket == "" {
		return errors.New("the VM has no guest agent port on a unix socket: not waiting for its agent")
	}
	ag := guest.NewSocket(s.AgentSocket, guest.Timeouts{Ping: 2 * time.Second})
	for {
		if !processAlive(s.QEMUPID) {
			log, _ := os.ReadFile(filepath.Join(s.OverlayDir, "qemu.log"))
			return fmt.Errorf("QEMU ended before the guest agent answered: %s", lastLine(string(log)))
		}
		if err := ag.Ping(ctx); err == nil {
			return nil
		} else if ctx.Err() != nil {
			return fmt.Errorf("the guest agent did not answer: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the guest agent did not answer: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// processAlive reports whether pid runs (and is not a zombie).
func processAlive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err == nil && !strings.Contains(string(st), ") Z ")
}

// newOverlay creates path, a qcow2 overlay over disk d's NBD export on
// socket, and describes it for the domain definition.
func newOverlay(ctx context.Context, socket string, d repo.Disk, path string) (libvirt.RestoredDisk, error) {
	out, err := childenv.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", export.URI(socket, d.Name),
		path, strconv.FormatInt(d.Size, 10)).CombinedOutput()
	if err != nil {
		return libvirt.RestoredDisk{}, fmt.Errorf("creating the overlay of disk %s: %v: %s", d.Name, err, strings.TrimSpace(string(out)))
	}
	return libvirt.RestoredDisk{Path: path, Format: "qcow2", Backing: &libvirt.NBDBacking{Socket: socket, Export: d.Name}}, nil
}

// startServer starts `kura export` of the session's restore point as a
// process of its own, so that the VM keeps its disks when this command
// ends, and waits until it serves.
func (a *app) startServer(ctx context.Context, s *instantSession, r *repo.Repo) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(sessionDir(s.Name), "server.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	// The export gets the master key this process unlocked through a
	// pipe (fd 3): no second key derivation on the way to the boot, and
	// no password in its environment.
	keyPipe, err := passKey(r)
	if err != nil {
		return err
	}
	defer keyPipe.Close()
	args := []string{"--repo", s.Repo, "--key-fd", "3"}
	if a.noCache {
		args = append(args, "--no-cache")
	}
	c := childenv.Command(exe, append(args, "export", s.Snapshot, "--socket", s.Socket, "--cache", "64")...)
	c.Env = childenv.ForKura() // an S3 repository's credentials, not the password
	c.ExtraFiles = []*os.File{keyPipe}
	c.Stdout, c.Stderr = logf, logf
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		return fmt.Errorf("starting the NBD server: %w", err)
	}
	s.ServerPID = c.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- c.Wait() }()
	deadline := time.After(60 * time.Second)
	for {
		if conn, err := net.Dial("unix", s.Socket); err == nil {
			conn.Close()
			c.Process.Release()
			return nil
		}
		select {
		case err := <-exited:
			log, _ := os.ReadFile(filepath.Join(sessionDir(s.Name), "server.log"))
			return fmt.Errorf("the NBD server ended (%v): %s", err, strings.TrimSpace(lastLine(string(log))))
		case <-deadline:
			return errors.New("the NBD server did not start within 60 s")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// stopServer ends the session's NBD server, if it is still the kura
// process that serves the session's socket.
func stopServer(s *instantSession) {
	if s.ServerPID <= 0 {
		return
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", s.ServerPID))
	if err != nil || !strings.Contains(string(cmdline), s.Socket) {
		return
	}
	p, err := os.FindProcess(s.ServerPID)
	if err != nil {
		return
	}
	p.Signal(syscall.SIGTERM)
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if p.Signal(syscall.Signal(0)) != nil {
			return
		}
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.ServerPID)); err != nil || strings.Contains(string(st), ") Z ") {
			return
		}
	}
	p.Kill()
}

// instantCleanup undoes a session: the VM (when destroy is set), the
// server, the overlays.
func (a *app) instantCleanup(ctx context.Context, s *instantSession, destroy bool) error {
	var errs []error
	if destroy {
		errs = append(errs, destroyInstantVM(ctx, s))
	}
	stopServer(s)
	for _, ov := range s.Overlays {
		if err := os.Remove(ov); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if destroy && s.OverlayDir != "" {
		// The VM is gone: its console log and sockets beside the
		// overlays go too.
		os.RemoveAll(s.OverlayDir)
	}
	os.RemoveAll(sessionDir(s.Name))
	return errors.Join(errs...)
}

// destroyInstantVM stops the session's VM at once.
func destroyInstantVM(ctx context.Context, s *instantSession) error {
	if s.Kind == "qemu" {
		if !processAlive(s.QEMUPID) {
			return nil
		}
		if err := qmp.Quit(ctx, s.QMPSocket); err == nil {
			return nil
		}
		// No answer on its monitor: kill it, if it is still the QEMU
		// that runs on the session's overlays.
		if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", s.QEMUPID)); err == nil && strings.Contains(string(cmd), s.OverlayDir) {
			syscall.Kill(s.QEMUPID, syscall.SIGKILL)
			for end := time.Now().Add(10 * time.Second); processAlive(s.QEMUPID) && time.Now().Before(end); {
				time.Sleep(20 * time.Millisecond)
			}
		}
		return nil
	}
	conn, err := libvirt.Connect(ctx, s.Connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Destroy(ctx, s.Name)
}

func (a *app) instantStop(ctx context.Context, name string) error {
	s, err := loadSession(name)
	if err != nil {
		return err
	}
	if err := a.instantCleanup(ctx, s, true); err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "stopped instant VM %s and discarded its writes\n", show(name))
	return nil
}

func (a *app) instantMigrate(ctx context.Context, name, to, format string) error {
	s, err := loadSession(name)
	if err != nil {
		return err
	}
	var conn *libvirt.Conn
	if s.Kind != "qemu" {
		if conn, err = libvirt.Connect(ctx, s.Connect); err != nil {
			return err
		}
		defer conn.Close()
	} else if !processAlive(s.QEMUPID) {
		return fmt.Errorf("the QEMU of instant VM %s (pid %d) is not running: nothing to migrate; clean up with `kura instant --stop %s`", name, s.QEMUPID, name)
	}
	if err := os.MkdirAll(to, 0o755); err != nil {
		return fmt.Errorf("making %s: %w", to, err)
	}
	var targets []string
	for t := range s.Overlays {
		targets = append(targets, t)
	}
	sort.Strings(targets)
	dests := map[string]string{}
	for _, t := range targets {
		dests[t] = filepath.Join(to, name+"-"+t+"."+format)
		if _, err := os.Stat(dests[t]); err == nil {
			return fmt.Errorf("%s exists: move it away or choose another --to", dests[t])
		}
	}
	began := time.Now()
	for _, t := range targets {
		start := time.Now()
		var cur, total atomic.Uint64
		stop := progressLine(a.stderr, a.progressOn(), func() string {
			return rateLine("migrate "+t, int64(cur.Load()), int64(total.Load()), start)
		})
		progress := func(c, end uint64) { cur.Store(c); total.Store(end) }
		var err error
		if conn != nil {
			err = conn.MoveDisk(ctx, name, t, dests[t], format, progress)
		} else {
			err = qmp.MoveDisk(ctx, s.QMPSocket, s.Overlays[t], dests[t], format, progress)
		}
		stop()
		if err != nil {
			return fmt.Errorf("%w; the VM keeps running from the restore point", err)
		}
		fmt.Fprintf(a.stdout, "moved disk %s of %s (%s) to %s in %s\n", show(t), show(name), humanBytes(int64(total.Load())), show(dests[t]), time.Since(start).Round(10*time.Millisecond))
	}
	if conn == nil {
		return a.finishQEMUMigrate(ctx, s, dests, format, to, began)
	}
	if err := conn.Persist(ctx, name); err != nil {
		return err
	}
	// Every disk now reads its local copy: the overlays and the server
	// are no longer used.
	srcs, err := conn.DiskSources(ctx, name)
	if err != nil {
		return err
	}
	for _, t := range targets {
		if srcs[t] != dests[t] {
			return fmt.Errorf("disk %s of %s reads %s after the move, not %s: the server keeps running; look at `virsh dumpxml %s`", t, name, srcs[t], dests[t], name)
		}
	}
	if err := a.instantCleanup(ctx, s, false); err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "VM %s now runs from local disks in %s and no longer depends on kura (%s); it is defined in libvirt\n", show(name), show(to), time.Since(began).Round(10*time.Millisecond))
	return nil
}

// finishQEMUMigrate ends the session of a plain QEMU VM whose disks all
// moved to dests (qmp.MoveDisk checked each reads its file alone), and
// writes the command line that starts the VM again from them.
func (a *app) finishQEMUMigrate(ctx context.Context, s *instantSession, dests map[string]string, format, to string, began time.Time) error {
	plan := qemuargs.Plan{Disks: map[string]qemuargs.Image{}}
	for t, ov := range s.Overlays {
		plan.Disks[ov] = qemuargs.Image{Path: dests[t], Format: format}
	}
	rw, err := qemuargs.Rewrite(s.Cmdline, plan)
	if err != nil {
		return fmt.Errorf("the VM runs from %s, but its command line could not be rewritten: %w", to, err)
	}
	script := filepath.Join(s.OverlayDir, "start.sh")
	quoted := make([]string, len(rw.Args))
	for i, arg := range rw.Args {
		quoted[i] = shellQuote(arg)
	}
	if err := os.WriteFile(script, []byte("#!/bin/sh\n# starts "+s.Name+" again from its local disks in "+to+"\nexec "+strings.Join(quoted, " ")+"\n"), 0o755); err != nil {
		return err
	}
	if err := a.instantCleanup(ctx, s, false); err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "VM %s now runs from local disks in %s and no longer depends on kura (%s); QEMU pid %d, QMP socket %s\n", show(s.Name), show(to), time.Since(began).Round(10*time.Millisecond), s.QEMUPID, show(s.QMPSocket))
	fmt.Fprintf(a.stdout, "to start it again once it stops: sh %s\n", show(shellQuote(script)))
	return nil
}

// shellQuote quotes s for sh when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./=:,+@%", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func (a *app) instantList() error {
	entries, _ := os.ReadDir(sessionDir(""))
	n := 0
	for _, e := range entries {
		s, err := loadSession(e.Name())
		if err != nil {
			continue
		}
		alive := "server running"
		if p, err := os.FindProcess(s.ServerPID); err != nil || p.Signal(syscall.Signal(0)) != nil {
			alive = "SERVER GONE"
		}
		fmt.Fprintf(a.stdout, "%-20s snapshot %s  since %s  %s  (%s)\n", show(s.Name), show(short(s.Snapshot)), s.Started.Local().Format("2006-01-02 15:04:05"), alive, show(s.Socket))
		n++
	}
	if n == 0 {
		fmt.Fprintln(a.stdout, "no VM runs from a restore point")
	}
	return nil
}
