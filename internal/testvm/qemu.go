package testvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// qemuBinary is the emulator both StartQEMU and libvirt run.
const qemuBinary = "qemu-system-x86_64"

// qemuConfig is everything qemuArgs needs; kept apart from Guest so that the
// command line can be tested without starting anything.
type qemuConfig struct {
	name, accel       string
	memoryMiB, cpus   int
	kernel, initrd    string
	cmdline           string
	consoleLog        string
	qmpSocket, qgaSoc string
	disks             []Disk
	iothread          bool
}

// qemuArgs is the qemu-system-x86_64 command line of a plain QEMU guest.
func qemuArgs(c qemuConfig) []string {
	args := []string{
		"-name", "guest=" + c.name + ",debug-threads=on",
		"-machine", "pc",
		"-accel", c.accel,
		"-cpu", cpuModel(c.accel),
		"-m", fmt.Sprint(c.memoryMiB),
		"-smp", fmt.Sprint(c.cpus),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-serial", "file:" + c.consoleLog,
		"-kernel", c.kernel,
		"-initrd", c.initrd,
		"-append", c.cmdline,
		"-qmp", "unix:" + c.qmpSocket + ",server=on,wait=off",
		"-chardev", "socket,id=qga0,path=" + c.qgaSoc + ",server=on,wait=off",
		"-device", "virtio-serial-pci,id=virtio-serial0",
		"-device", "virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0",
	}
	io := ""
	if c.iothread {
		args = append(args, "-object", "iothread,id=io1")
		io = ",iothread=io1"
	}
	scsi := false
	for _, d := range c.disks {
		if d.Bus == BusSCSI && !scsi {
			args = append(args, "-device", "virtio-scsi-pci,id=scsi0"+io)
			scsi = true
		}
		args = append(args,
			"-blockdev", fmt.Sprintf("driver=file,filename=%s,node-name=%s-file,cache.direct=off,discard=unmap", qemuOptEscape(d.Path), d.NodeName),
			"-blockdev", fmt.Sprintf("driver=%s,file=%s-file,node-name=%s,discard=unmap", d.Format, d.NodeName, d.NodeName))
		switch d.Bus {
		case BusSCSI:
			args = append(args, "-device", fmt.Sprintf("scsi-hd,bus=scsi0.0,drive=%s,id=%s,serial=%s", d.NodeName, d.Target, d.Target))
		default:
			args = append(args, "-device", fmt.Sprintf("virtio-blk-pci,drive=%s,id=%s,serial=%s%s", d.NodeName, d.Target, d.Target, io))
		}
	}
	return args
}

// cpuModel: with KVM the host CPU; under TCG qemu64, which TCG emulates
// fully and fast.
func cpuModel(accel string) string {
	if accel == "kvm" {
		return "host"
	}
	return "qemu64"
}

// qemuOptEscape doubles commas, QEMU's escape inside option values.
func qemuOptEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// StartQEMU starts a guest as a qemu-system-x86_64 child process with a QMP
// socket and the guest agent on a unix socket. It returns once QEMU runs; call
// WaitAgent before using the guest, and Destroy in the end. QEMU is killed if
// the calling process dies.
func StartQEMU(ctx context.Context, o Options) (*Guest, error) {
	if _, err := exec.LookPath(qemuBinary); err != nil {
		return nil, fmt.Errorf("%s not found: apt-get install qemu-system-x86: %w", qemuBinary, err)
	}
	g, err := prepare(ctx, "qemu", &o)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			g.removeFiles()
		}
	}()
	for i := range g.Disks {
		g.Disks[i].NodeName = g.Disks[i].Target
	}
	// Unix socket paths must stay under 108 bytes; Dir may be long.
	if g.sockDir, err = os.MkdirTemp("", "kvm-"); err != nil {
		return nil, fmt.Errorf("creating the socket directory: %w", err)
	}
	g.QMPSocket = filepath.Join(g.sockDir, "qmp.sock")
	g.AgentSocket = filepath.Join(g.sockDir, "qga.sock")
	cmdline := Cmdline
	if o.ExtraCmdline != "" {
		cmdline += " " + o.ExtraCmdline
	}
	args := qemuArgs(qemuConfig{
		name: g.Name, accel: g.Accel, memoryMiB: o.MemoryMiB, cpus: o.CPUs,
		kernel: o.Image.Kernel, initrd: o.Image.Initrd, cmdline: cmdline,
		consoleLog: g.ConsoleLog, qmpSocket: g.QMPSocket, qgaSoc: g.AgentSocket,
		disks: g.Disks, iothread: o.IOThread,
	})

	var stderr bytes.Buffer
	cmd := exec.Command(qemuBinary, args...) // lives beyond ctx, until Destroy
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", qemuBinary, err)
	}
	g.Started = time.Now()
	g.PID = cmd.Process.Pid
	g.exited = make(chan struct{})
	go func() {
		err := cmd.Wait()
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			err = fmt.Errorf("%v: %s", err, lastLines(msg, 10))
		}
		g.exitErr = err
		close(g.exited)
	}()
	g.agent = &socketAgent{path: g.AgentSocket}

	// QEMU creates its sockets once the machine is set up; a bad option
	// ends it before that.
	for !allSockets(g.QMPSocket, g.AgentSocket) {
		select {
		case <-g.exited:
			return nil, fmt.Errorf("%s %s: %w", qemuBinary, strings.Join(args, " "), g.exitErr)
		case <-ctx.Done():
			g.stopQEMU(context.Background())
			return nil, fmt.Errorf("waiting for %s to start: %w", qemuBinary, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	ok = true
	return g, nil
}

// AttachQEMU returns a Guest for a plain QEMU VM that testvm did not
// start: process pid, its guest agent on the unix socket agentSocket, data
// disks mounted at mounts. Exec, Agent and WaitAgent work on it; Destroy
// kills the process and removes no files.
func AttachQEMU(name string, pid int, agentSocket, consoleLog string, mounts ...string) *Guest {
	if pid <= 0 {
		// kill(0) and kill(-1) reach far more than one QEMU.
		panic(fmt.Sprintf("testvm.AttachQEMU: pid %d", pid))
	}
	g := &Guest{Name: name, Kind: "qemu", PID: pid, AgentSocket: agentSocket, ConsoleLog: consoleLog,
		Started: time.Now(), agent: &socketAgent{path: agentSocket}}
	for _, m := range mounts {
		g.Disks = append(g.Disks, Disk{Mount: m})
	}
	g.exited = make(chan struct{})
	go func() {
		// Not a child: poll for its end.
		for syscall.Kill(pid, 0) == nil && !isZombie(pid) {
			time.Sleep(100 * time.Millisecond)
		}
		g.exitErr = fmt.Errorf("pid %d ended", pid)
		close(g.exited)
	}()
	return g
}

func isZombie(pid int) bool {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err != nil || strings.Contains(string(st), ") Z ")
}

func allSockets(paths ...string) bool {
	for _, p := range paths {
		if fi, err := os.Stat(p); err != nil || fi.Mode()&os.ModeSocket == 0 {
			return false
		}
	}
	return true
}

// stopQEMU kills the QEMU process and waits for it to end.
func (g *Guest) stopQEMU(ctx context.Context) error {
	if g.exited == nil {
		return nil
	}
	select {
	case <-g.exited:
		return nil
	default:
	}
	if g.PID <= 0 {
		return fmt.Errorf("guest %s has no QEMU pid (%d)", g.Name, g.PID)
	}
	if err := syscall.Kill(g.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("killing %s (pid %d): %w", qemuBinary, g.PID, err)
	}
	select {
	case <-g.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for %s (pid %d) to end: %w", qemuBinary, g.PID, ctx.Err())
	}
}
