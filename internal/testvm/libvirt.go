package testvm

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// LibvirtURI is the libvirt connection testvm uses.
const LibvirtURI = "qemu:///system"

const (
	libvirtSocket  = "/var/run/libvirt/libvirt-sock"
	qemuConfPath   = "/etc/libvirt/qemu.conf"
	libvirtdPID    = "/run/libvirtd.pid"
	virtlogdPID    = "/run/virtlogd.pid"
	libvirtTimeout = 30 * time.Second
)

// virsh runs virsh against LibvirtURI.
func virsh(ctx context.Context, args ...string) (string, error) {
	return runCmd(ctx, "virsh", append([]string{"-q", "-c", LibvirtURI}, args...)...)
}

// EnsureLibvirtd makes libvirtd usable for test guests: it sets user and
// group "root" in /etc/libvirt/qemu.conf (libvirt's QEMU must open root-owned
// images in test directories), starts virtlogd and libvirtd when they are not
// running (through systemd where it is init; else as daemons), restarts
// libvirtd when the configuration changed, and waits until virsh connects.
// While another process holds LockLibvirtdExclusive it waits for it.
func EnsureLibvirtd(ctx context.Context) error {
	for _, bin := range []string{"virsh", "libvirtd", "virtlogd"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%s not found: apt-get install libvirt-daemon-system libvirt-clients: %w", bin, err)
		}
	}
	// Never while another test restarts libvirtd (LockLibvirtdExclusive):
	// that test starts it again itself.
	release, err := LockLibvirtdShared(ctx)
	if err != nil {
		return err
	}
	defer release()
	cache, err := CacheDir()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return fmt.Errorf("creating cache directory: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(cache, "libvirtd.lock"))
	if err != nil {
		return err
	}
	defer unlock()

	conf, err := os.ReadFile(qemuConfPath)
	if err != nil {
		return fmt.Errorf("reading %s: %w", qemuConfPath, err)
	}
	newConf, changed := setQemuConfRoot(string(conf))
	if changed {
		if err := os.WriteFile(qemuConfPath+".kura-tmp", []byte(newConf), 0o644); err != nil {
			return fmt.Errorf("updating %s: %w", qemuConfPath, err)
		}
		if err := os.Rename(qemuConfPath+".kura-tmp", qemuConfPath); err != nil {
			return fmt.Errorf("updating %s: %w", qemuConfPath, err)
		}
	}

	systemd := isDir("/run/systemd/system")
	running := socketAnswers(libvirtSocket)
	switch {
	case systemd && (!running || changed):
		for _, unit := range []string{"virtlogd", "libvirtd"} {
			verb := "start"
			if unit == "libvirtd" && changed {
				verb = "restart"
			}
			if _, err := runCmd(ctx, "systemctl", verb, unit); err != nil {
				return fmt.Errorf("starting libvirt: %w", err)
			}
		}
	case !systemd:
		if running && changed {
			if err := stopDaemon(ctx, libvirtdPID, "libvirtd"); err != nil {
				return err
			}
			running = false
		}
		if !running {
			if err := os.MkdirAll("/run/libvirt", 0o755); err != nil {
				return fmt.Errorf("creating /run/libvirt: %w", err)
			}
			if !pidFileAlive(virtlogdPID) {
				if _, err := runCmd(ctx, "virtlogd", "-d"); err != nil {
					return fmt.Errorf("starting virtlogd: %w", err)
				}
			}
			if !pidFileAlive(libvirtdPID) {
				if _, err := runCmd(ctx, "libvirtd", "-d"); err != nil {
					return fmt.Errorf("starting libvirtd: %w", err)
				}
			}
		}
	}

	wctx, cancel := context.WithTimeout(ctx, libvirtTimeout)
	defer cancel()
	for {
		_, err := virsh(wctx, "version")
		if err == nil {
			return nil
		}
		select {
		case <-wctx.Done():
			return fmt.Errorf("libvirtd did not answer on %s within %s: %w (see /var/log/libvirt/ or run libvirtd in the foreground)", libvirtSocket, libvirtTimeout, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

var qemuConfUserGroup = regexp.MustCompile(`(?m)^[ \t]*(user|group)[ \t]*=.*$`)

// setQemuConfRoot returns qemu.conf with user = "root" and group = "root",
// and whether that changed it.
func setQemuConfRoot(conf string) (string, bool) {
	seen := map[string]bool{}
	out := qemuConfUserGroup.ReplaceAllStringFunc(conf, func(line string) string {
		key := qemuConfUserGroup.FindStringSubmatch(line)[1]
		seen[key] = true
		return fmt.Sprintf("%s = \"root\"", key)
	})
	var add []string
	for _, k := range []string{"user", "group"} {
		if !seen[k] {
			add = append(add, fmt.Sprintf("%s = \"root\"", k))
		}
	}
	if len(add) > 0 {
		if out != "" && !strings.HasSuffix(out, "\n") {
			out += "\n"
		}
		out += "# Set by kura's internal/testvm: test images are root-owned.\n" + strings.Join(add, "\n") + "\n"
	}
	return out, out != conf
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

func socketAnswers(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func readPIDFile(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

func pidFileAlive(path string) bool { return processAlive(readPIDFile(path)) }

// stopDaemon ends the daemon whose pid file is path, so that it can be
// started with a new configuration.
func stopDaemon(ctx context.Context, path, name string) error {
	pid := readPIDFile(path)
	if !processAlive(pid) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stopping %s (pid %d) to reload its configuration: %w", name, pid, err)
	}
	deadline := time.Now().Add(libvirtTimeout)
	for processAlive(pid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s (pid %d) did not stop within %s after SIGTERM", name, pid, libvirtTimeout)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s to stop: %w", name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// domainXML is the part of libvirt's domain format testvm writes.
type domainXML struct {
	XMLName     xml.Name `xml:"domain"`
	Type        string   `xml:"type,attr"`
	Name        string   `xml:"name"`
	Description string   `xml:"description"`
	Memory      struct {
		Unit  string `xml:"unit,attr"`
		Value int    `xml:",chardata"`
	} `xml:"memory"`
	VCPU      int `xml:"vcpu"`
	IOThreads int `xml:"iothreads,omitempty"`
	OS        struct {
		Type struct {
			Arch    string `xml:"arch,attr"`
			Machine string `xml:"machine,attr"`
			Value   string `xml:",chardata"`
		} `xml:"type"`
		Kernel  string `xml:"kernel"`
		Initrd  string `xml:"initrd"`
		Cmdline string `xml:"cmdline"`
	} `xml:"os"`
	Features struct {
		ACPI *struct{} `xml:"acpi"`
	} `xml:"features"`
	CPU struct {
		Mode  string `xml:"mode,attr"`
		Match string `xml:"match,attr,omitempty"`
		Check string `xml:"check,attr,omitempty"`
		Model *struct {
			Fallback string `xml:"fallback,attr"`
			Value    string `xml:",chardata"`
		} `xml:"model"`
	} `xml:"cpu"`
	OnPoweroff string `xml:"on_poweroff"`
	OnReboot   string `xml:"on_reboot"`
	OnCrash    string `xml:"on_crash"`
	Devices    struct {
		Emulator    string          `xml:"emulator"`
		Disks       []diskXML       `xml:"disk"`
		Controllers []controllerXML `xml:"controller"`
		Channel     struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Mode string `xml:"mode,attr"`
			} `xml:"source"`
			Target struct {
				Type string `xml:"type,attr"`
				Name string `xml:"name,attr"`
			} `xml:"target"`
		} `xml:"channel"`
		Serial struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Path string `xml:"path,attr"`
			} `xml:"source"`
			Target struct {
				Port int `xml:"port,attr"`
			} `xml:"target"`
		} `xml:"serial"`
		MemBalloon struct {
			Model string `xml:"model,attr"`
		} `xml:"memballoon"`
	} `xml:"devices"`
}

type diskXML struct {
	Type   string `xml:"type,attr"`
	Device string `xml:"device,attr"`
	Driver struct {
		Name     string `xml:"name,attr"`
		Type     string `xml:"type,attr"`
		Discard  string `xml:"discard,attr,omitempty"`
		IOThread int    `xml:"iothread,attr,omitempty"`
	} `xml:"driver"`
	Source struct {
		File string `xml:"file,attr"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
		Bus string `xml:"bus,attr"`
	} `xml:"target"`
	Serial string `xml:"serial,omitempty"`
}

type controllerXML struct {
	Type   string            `xml:"type,attr"`
	Index  int               `xml:"index,attr"`
	Model  string            `xml:"model,attr"`
	Driver *controllerDriver `xml:"driver"`
}

type controllerDriver struct {
	IOThread int `xml:"iothread,attr"`
}

// domainConfig is everything domainDefinition needs.
type domainConfig struct {
	name, accel     string
	memoryMiB, cpus int
	kernel, initrd  string
	cmdline         string
	consoleLog      string
	disks           []Disk
	ownerPID        int
	iothread        bool
}

// domainDefinition is the libvirt domain XML of a test guest.
func domainDefinition(c domainConfig) ([]byte, error) {
	var d domainXML
	d.Type = "qemu"
	if c.accel == "kvm" {
		d.Type = "kvm"
	}
	d.Name = c.name
	d.Description = fmt.Sprintf("kura testvm guest; owner pid=%d", c.ownerPID)
	d.Memory.Unit, d.Memory.Value = "MiB", c.memoryMiB
	d.VCPU = c.cpus
	d.OS.Type.Arch, d.OS.Type.Machine, d.OS.Type.Value = "x86_64", "pc", "hvm"
	d.OS.Kernel, d.OS.Initrd, d.OS.Cmdline = c.kernel, c.initrd, c.cmdline
	d.Features.ACPI = &struct{}{} // PCI hot-plug of disks needs it
	if c.accel == "kvm" {
		d.CPU.Mode = "host-passthrough"
	} else {
		d.CPU.Mode, d.CPU.Match, d.CPU.Check = "custom", "exact", "none"
		d.CPU.Model = &struct {
			Fallback string `xml:"fallback,attr"`
			Value    string `xml:",chardata"`
		}{"allow", "qemu64"}
	}
	d.OnPoweroff, d.OnReboot, d.OnCrash = "destroy", "restart", "destroy"
	d.Devices.Emulator = "/usr/bin/" + qemuBinary
	if p, err := exec.LookPath(qemuBinary); err == nil {
		d.Devices.Emulator = p
	}
	scsi := false
	for _, disk := range c.disks {
		var x diskXML
		x.Type, x.Device = "file", "disk"
		x.Driver.Name, x.Driver.Type, x.Driver.Discard = "qemu", disk.Format, "unmap"
		x.Source.File = disk.Path
		x.Target.Dev, x.Target.Bus = disk.Target, disk.Bus
		x.Serial = disk.Target
		if disk.Bus == BusSCSI {
			scsi = true
		} else if c.iothread {
			x.Driver.IOThread = 1
		}
		d.Devices.Disks = append(d.Devices.Disks, x)
	}
	if scsi {
		ctl := controllerXML{Type: "scsi", Index: 0, Model: "virtio-scsi"}
		if c.iothread {
			ctl.Driver = &controllerDriver{IOThread: 1}
		}
		d.Devices.Controllers = append(d.Devices.Controllers, ctl)
	}
	if c.iothread {
		d.IOThreads = 1
	}
	d.Devices.Channel.Type = "unix"
	d.Devices.Channel.Source.Mode = "bind" // libvirt picks the socket path
	d.Devices.Channel.Target.Type, d.Devices.Channel.Target.Name = "virtio", "org.qemu.guest_agent.0"
	d.Devices.Serial.Type = "file"
	d.Devices.Serial.Source.Path = c.consoleLog
	d.Devices.MemBalloon.Model = "none"
	return xml.MarshalIndent(d, "", "  ")
}

// StartLibvirt defines and starts a libvirt domain (or creates a transient
// one, Options.Transient) booting the test guest: domain type qemu (TCG, CPU
// qemu64) or kvm as ProbeAccel decides, direct kernel boot, the root overlay
// on virtio-blk vda, the data disks, the guest agent channel and the serial
// console in ConsoleLog. It starts libvirtd if needed (EnsureLibvirtd) and
// removes domains of earlier test processes that died without Destroy. Call
// WaitAgent before using the guest, and Destroy in the end. The guest holds
// LockLibvirtdShared until Destroy.
func StartLibvirt(ctx context.Context, o Options) (*Guest, error) {
	// Held until Destroy, so that no test restarts libvirtd under the guest.
	release, err := LockLibvirtdShared(ctx)
	if err != nil {
		return nil, err
	}
	locked := false
	defer func() {
		if !locked {
			release()
		}
	}()
	if err := EnsureLibvirtd(ctx); err != nil {
		return nil, err
	}
	sweepStaleDomains(ctx)
	g, err := prepare(ctx, "libvirt", &o)
	if err != nil {
		return nil, err
	}
	holdLibvirtdFor(g, release)
	locked = true
	ok := false
	defer func() {
		if !ok {
			g.removeDomain(context.WithoutCancel(ctx))
			g.removeFiles()
		}
	}()
	cmdline := Cmdline
	if o.ExtraCmdline != "" {
		cmdline += " " + o.ExtraCmdline
	}
	def, err := domainDefinition(domainConfig{
		name: g.Name, accel: g.Accel, memoryMiB: o.MemoryMiB, cpus: o.CPUs,
		kernel: o.Image.Kernel, initrd: o.Image.Initrd, cmdline: cmdline,
		consoleLog: g.ConsoleLog, disks: g.Disks, ownerPID: os.Getpid(), iothread: o.IOThread,
	})
	if err != nil {
		return nil, fmt.Errorf("writing the domain XML: %w", err)
	}
	xmlPath := filepath.Join(g.Dir, "domain.xml")
	if err := os.WriteFile(xmlPath, def, 0o644); err != nil {
		return nil, fmt.Errorf("writing the domain XML: %w", err)
	}
	g.agent = &virshAgent{domain: g.Name}
	if o.Transient {
		g.Started = time.Now()
		if _, err := virsh(ctx, "create", xmlPath); err != nil {
			return nil, fmt.Errorf("starting guest %s: %w", g.Name, err)
		}
	} else {
		if _, err := virsh(ctx, "define", xmlPath); err != nil {
			return nil, fmt.Errorf("defining guest %s: %w", g.Name, err)
		}
		g.persisted = true
		g.Started = time.Now()
		if _, err := virsh(ctx, "start", g.Name); err != nil {
			return nil, fmt.Errorf("starting guest %s: %w", g.Name, err)
		}
	}
	g.PID = readPIDFile(filepath.Join("/run/libvirt/qemu", g.Name+".pid"))
	ok = true
	return g, nil
}

// removeDomain destroys the domain if it runs and undefines it with its
// checkpoint and snapshot metadata.
func (g *Guest) removeDomain(ctx context.Context) error {
	defer releaseGuestLock(g)
	return removeDomain(ctx, g.Name, g.PID)
}

func removeDomain(ctx context.Context, name string, pid int) error {
	state, err := virsh(ctx, "domstate", name)
	if err != nil {
		if strings.Contains(err.Error(), "failed to get domain") {
			return nil // never defined, or transient and gone
		}
		return err
	}
	if strings.TrimSpace(state) != "shut off" {
		if _, err := virsh(ctx, "destroy", name); err != nil && !strings.Contains(err.Error(), "not running") {
			return err
		}
	}
	if _, err := virsh(ctx, "undefine", "--checkpoints-metadata", "--snapshots-metadata", name); err != nil &&
		!strings.Contains(err.Error(), "failed to get domain") && !strings.Contains(err.Error(), "transient domain") {
		return err
	}
	// virsh destroy returns once QEMU is signalled; wait for it to be gone.
	for deadline := time.Now().Add(10 * time.Second); processAlive(pid) && pidIsQEMU(pid); {
		if time.Now().After(deadline) {
			return fmt.Errorf("QEMU of domain %s (pid %d) still runs 10 s after virsh destroy", name, pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// pidIsQEMU guards against a reused pid.
func pidIsQEMU(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), "qemu-system")
}

var ownerPIDPattern = regexp.MustCompile(`^kura testvm guest; owner pid=(\d+)$`)

// sweepStaleDomains removes the domains that testvm made for processes that
// no longer exist (a test binary killed before Destroy). Failures are left
// for the next sweep: a stale domain only costs memory.
func sweepStaleDomains(ctx context.Context) {
	out, err := virsh(ctx, "list", "--all", "--name")
	if err != nil {
		return
	}
	for _, name := range strings.Fields(out) {
		desc, err := virsh(ctx, "desc", name)
		if err != nil {
			continue
		}
		m := ownerPIDPattern.FindStringSubmatch(strings.TrimSpace(desc))
		if m == nil {
			continue
		}
		if pid, _ := strconv.Atoi(m[1]); processAlive(pid) {
			continue
		}
		removeDomain(ctx, name, readPIDFile(filepath.Join("/run/libvirt/qemu", name+".pid")))
	}
}

// AttachLibvirt returns a Guest for a running libvirt domain that testvm
// did not start (a VM that kura restored, for example), to reach its agent
// and to remove the domain with Destroy; its files are left alone. mounts
// are the guest's data mount points that WaitAgent waits for.
func AttachLibvirt(ctx context.Context, name string, mounts ...string) (*Guest, error) {
	release, err := LockLibvirtdShared(ctx)
	if err != nil {
		return nil, err
	}
	g := &Guest{Name: name, Kind: "libvirt", Started: time.Now(), persisted: true, agent: &virshAgent{domain: name}}
	g.ConsoleLog = filepath.Join("/var/log/libvirt/qemu", name+".log")
	for _, m := range mounts {
		g.Disks = append(g.Disks, Disk{Mount: m})
	}
	holdLibvirtdFor(g, release)
	g.PID = readPIDFile(filepath.Join("/run/libvirt/qemu", name+".pid"))
	return g, nil
}
