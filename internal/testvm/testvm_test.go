package testvm

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestFindRepoRoot(t *testing.T) {
	root := t.TempDir()
	deep := filepath.Join(root, "internal", "testvm", "x")
	if err := os.MkdirAll(deep, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "go.mod"), []byte("module m\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{root, deep, filepath.Dir(deep)} {
		got, err := findRepoRoot(dir)
		if err != nil || got != root {
			t.Errorf("findRepoRoot(%s) = %q, %v; want %q", dir, got, err, root)
		}
	}
	if _, err := findRepoRoot(t.TempDir()); err == nil {
		t.Error("findRepoRoot found a go.mod above a fresh temporary directory")
	}
}

func TestPlanDisks(t *testing.T) {
	tests := []struct {
		name    string
		specs   []DiskSpec
		targets []string
		wantErr string
	}{
		{"none", nil, []string{}, ""},
		{"virtio disks follow the root disk", []DiskSpec{{FS: "ext4"}, {FS: "xfs"}}, []string{"vdb", "vdc"}, ""},
		{"scsi disks are sdX", []DiskSpec{{FS: "ext4", Bus: BusSCSI}, {}, {FS: "xfs", Bus: BusSCSI}}, []string{"sda", "vdb", "sdb"}, ""},
		{"existing image", []DiskSpec{{Source: "/x.raw", Format: "raw"}}, []string{"vdb"}, ""},
		{"unknown bus", []DiskSpec{{Bus: "ide"}}, nil, "unknown bus"},
		{"unknown filesystem", []DiskSpec{{FS: "btrfs"}}, nil, "unsupported filesystem"},
		{"xfs too small", []DiskSpec{{FS: "xfs", SizeMiB: 100}}, nil, "at least 300 MiB"},
		{"mount needs a filesystem", []DiskSpec{{Mount: "/data"}}, nil, "needs a filesystem"},
		{"mount point unknown to the guest", []DiskSpec{{FS: "ext4", Mount: "/srv"}}, nil, "cannot mount"},
		{"one mount point twice", []DiskSpec{{FS: "ext4", Mount: "/data"}, {FS: "xfs", Mount: "/data"}}, nil, "two disks"},
		{"bad source format", []DiskSpec{{Source: "/x", Format: "vmdk"}}, nil, "unsupported format"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			disks, err := planDisks(tt.specs)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := targets(disks); !slices.Equal(got, tt.targets) && !(len(got) == 0 && len(tt.targets) == 0) {
				t.Errorf("targets %v, want %v", got, tt.targets)
			}
		})
	}
}

func TestQemuArgs(t *testing.T) {
	c := qemuConfig{
		name: "g1", accel: "tcg", memoryMiB: 1024, cpus: 2,
		kernel: "/c/vmlinuz", initrd: "/c/initrd.img", cmdline: Cmdline,
		consoleLog: "/d/console.log", qmpSocket: "/s/qmp.sock", qgaSoc: "/s/qga.sock",
		disks: []Disk{
			{Target: "vda", Bus: BusVirtio, Path: "/d/root.qcow2", Format: "qcow2", NodeName: "vda"},
			{Target: "sda", Bus: BusSCSI, Path: "/d/a,b.qcow2", Format: "qcow2", NodeName: "sda"},
		},
	}
	args := strings.Join(qemuArgs(c), " ")
	for _, want := range []string{
		"-accel tcg -cpu qemu64",
		"-nodefaults", "-display none",
		"-serial file:/d/console.log",
		"-kernel /c/vmlinuz -initrd /c/initrd.img -append " + Cmdline,
		"-qmp unix:/s/qmp.sock,server=on,wait=off",
		"path=/s/qga.sock,server=on,wait=off",
		"name=org.qemu.guest_agent.0",
		"driver=file,filename=/d/root.qcow2,node-name=vda-file",
		"driver=qcow2,file=vda-file,node-name=vda",
		"virtio-blk-pci,drive=vda",
		"-device virtio-scsi-pci,id=scsi0",
		"filename=/d/a,,b.qcow2", // commas escaped
		"scsi-hd,bus=scsi0.0,drive=sda",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu arguments lack %q:\n%s", want, args)
		}
	}
	c.accel = "kvm"
	if args := strings.Join(qemuArgs(c), " "); !strings.Contains(args, "-accel kvm -cpu host") {
		t.Errorf("kvm guest: %s", args)
	}
}

func TestDomainDefinition(t *testing.T) {
	tests := []struct {
		name, accel, domType, cpuMode, cpuModel string
		disks                                   []Disk
		scsiController                          bool
	}{
		{"tcg with virtio disks", "tcg", "qemu", "custom", "qemu64",
			[]Disk{{Target: "vda", Bus: BusVirtio, Path: "/d/root.qcow2", Format: "qcow2"}, {Target: "vdb", Bus: BusVirtio, Path: "/d/vdb.qcow2", Format: "qcow2"}}, false},
		{"kvm with a scsi disk", "kvm", "kvm", "host-passthrough", "",
			[]Disk{{Target: "vda", Bus: BusVirtio, Path: "/d/root.qcow2", Format: "qcow2"}, {Target: "sda", Bus: BusSCSI, Path: "/d/sda.raw", Format: "raw"}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := domainDefinition(domainConfig{
				name: "kura-test-1", accel: tt.accel, memoryMiB: 1024, cpus: 2,
				kernel: "/c/vmlinuz", initrd: "/c/initrd.img", cmdline: Cmdline,
				consoleLog: "/d/console.log", disks: tt.disks, ownerPID: 42,
			})
			if err != nil {
				t.Fatal(err)
			}
			var d domainXML
			if err := xml.Unmarshal(b, &d); err != nil {
				t.Fatalf("%v\n%s", err, b)
			}
			if d.Type != tt.domType || d.CPU.Mode != tt.cpuMode {
				t.Errorf("type %q cpu mode %q, want %q %q", d.Type, d.CPU.Mode, tt.domType, tt.cpuMode)
			}
			if tt.cpuModel != "" && (d.CPU.Model == nil || d.CPU.Model.Value != tt.cpuModel) {
				t.Errorf("cpu model %+v, want %s", d.CPU.Model, tt.cpuModel)
			}
			if d.Features.ACPI == nil {
				t.Error("no <acpi/>: disk hot-plug would not work")
			}
			if d.OS.Kernel != "/c/vmlinuz" || d.OS.Initrd != "/c/initrd.img" || d.OS.Cmdline != Cmdline {
				t.Errorf("os %+v", d.OS)
			}
			if d.Memory.Value != 1024 || d.Memory.Unit != "MiB" || d.VCPU != 2 {
				t.Errorf("memory %+v vcpu %d", d.Memory, d.VCPU)
			}
			if len(d.Devices.Disks) != len(tt.disks) {
				t.Fatalf("%d disks, want %d", len(d.Devices.Disks), len(tt.disks))
			}
			for i, x := range d.Devices.Disks {
				want := tt.disks[i]
				if x.Source.File != want.Path || x.Target.Dev != want.Target || x.Target.Bus != want.Bus || x.Driver.Type != want.Format {
					t.Errorf("disk %d: %+v, want %+v", i, x, want)
				}
			}
			if got := len(d.Devices.Controllers) == 1 && d.Devices.Controllers[0].Model == "virtio-scsi"; got != tt.scsiController {
				t.Errorf("virtio-scsi controller %v, want %v", got, tt.scsiController)
			}
			if d.Devices.Channel.Target.Name != "org.qemu.guest_agent.0" || d.Devices.Serial.Source.Path != "/d/console.log" {
				t.Errorf("channel %+v serial %+v", d.Devices.Channel, d.Devices.Serial)
			}
			if m := ownerPIDPattern.FindStringSubmatch(d.Description); m == nil || m[1] != "42" {
				t.Errorf("description %q does not name owner pid 42", d.Description)
			}
		})
	}
}

func TestSetQemuConfRoot(t *testing.T) {
	tests := []struct {
		name, in, want string
		changed        bool
	}{
		{"commented defaults", "#user = \"libvirt-qemu\"\n#group = \"libvirt-qemu\"\n",
			"#user = \"libvirt-qemu\"\n#group = \"libvirt-qemu\"\n# Set by kura's internal/testvm: test images are root-owned.\nuser = \"root\"\ngroup = \"root\"\n", true},
		{"already root", "user = \"root\"\ngroup = \"root\"\n", "user = \"root\"\ngroup = \"root\"\n", false},
		{"other user", "user = \"qemu\"\ngroup=\"root\"\n", "user = \"root\"\ngroup = \"root\"\n", true},
		{"no final newline", "x = 1", "x = 1\n# Set by kura's internal/testvm: test images are root-owned.\nuser = \"root\"\ngroup = \"root\"\n", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, changed := setQemuConfRoot(tt.in)
			if got != tt.want || changed != tt.changed {
				t.Errorf("got %q, %v; want %q, %v", got, changed, tt.want, tt.changed)
			}
		})
	}
}

func TestCPUInfo(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpuinfo")
	data := "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 vmx avx\n\nprocessor\t: 1\nmodel name\t: Other\n"
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	model, virt, err := cpuInfo(path)
	if err != nil || model != "Test CPU" || virt != "vmx" {
		t.Errorf("cpuInfo = %q, %q, %v", model, virt, err)
	}
}

// fakeAgent is a guest agent on a unix socket, enough for testvm's protocol:
// it writes a stale reply and garbage first, resynchronises on
// guest-sync-delimited, runs "programs" whose output is their first argument,
// and stays silent when asked to.
type fakeAgent struct {
	path   string
	ln     net.Listener
	wg     sync.WaitGroup
	mu     sync.Mutex
	silent bool
	polls  int
}

func startFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	dir, err := os.MkdirTemp("", "qga") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	a := &fakeAgent{path: filepath.Join(dir, "qga.sock")}
	if a.ln, err = net.Listen("unix", a.path); err != nil {
		t.Fatal(err)
	}
	a.wg.Add(1)
	go a.serve()
	t.Cleanup(func() { a.ln.Close(); a.wg.Wait() })
	return a
}

func (a *fakeAgent) serve() {
	defer a.wg.Done()
	for {
		c, err := a.ln.Accept()
		if err != nil {
			return
		}
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			defer c.Close()
			a.handle(c)
		}()
	}
}

func (a *fakeAgent) handle(c net.Conn) {
	// Left over from an earlier client, as after a timed-out command.
	fmt.Fprintf(c, "{\"return\": {\"pid\": 1}}\n\xff{\"return\": 7}\n")
	rd := bufio.NewReader(c)
	for {
		line, err := rd.ReadBytes('\n')
		if err != nil {
			return
		}
		line = []byte(strings.TrimLeft(string(line), "\xff"))
		var req struct {
			Execute   string          `json:"execute"`
			Arguments json.RawMessage `json:"arguments"`
		}
		if err := json.Unmarshal(line, &req); err != nil {
			fmt.Fprintf(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"bad json\"}}\n")
			continue
		}
		a.mu.Lock()
		silent := a.silent
		a.mu.Unlock()
		if silent {
			continue
		}
		switch req.Execute {
		case "guest-sync-delimited":
			var args struct {
				ID uint64 `json:"id"`
			}
			json.Unmarshal(req.Arguments, &args)
			fmt.Fprintf(c, "\xff{\"return\": %d}\n", args.ID)
		case "guest-ping":
			fmt.Fprintf(c, "{\"return\": {}}\n")
		case "guest-exec":
			var args struct {
				Path string   `json:"path"`
				Arg  []string `json:"arg"`
				In   string   `json:"input-data"`
			}
			json.Unmarshal(req.Arguments, &args)
			if args.Path == "/missing" {
				fmt.Fprintf(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent command failed, error was 'Failed to execute child process'\"}}\n")
				continue
			}
			a.mu.Lock()
			a.polls = 0
			a.mu.Unlock()
			fmt.Fprintf(c, "{\"return\": {\"pid\": 4242}}\n")
		case "guest-exec-status":
			a.mu.Lock()
			a.polls++
			done := a.polls >= 3
			a.mu.Unlock()
			if !done {
				fmt.Fprintf(c, "{\"return\": {\"exited\": false}}\n")
				continue
			}
			out := base64.StdEncoding.EncodeToString([]byte("hello\n"))
			errOut := base64.StdEncoding.EncodeToString([]byte("warn\n"))
			fmt.Fprintf(c, "{\"return\": {\"exited\": true, \"exitcode\": 2, \"out-data\": %q, \"err-data\": %q}}\n", out, errOut)
		default:
			fmt.Fprintf(c, "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"unknown %s\"}}\n", req.Execute)
		}
	}
}

func TestSocketAgentExec(t *testing.T) {
	a := startFakeAgent(t)
	g := &Guest{Name: "fake", Kind: "qemu", agent: &socketAgent{path: a.path}, Started: time.Now(), exited: make(chan struct{})}
	defer g.agent.close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatalf("WaitAgent: %v", err)
	}
	if g.BootTime <= 0 {
		t.Errorf("BootTime %s not set", g.BootTime)
	}
	r, err := g.ExecFull(ctx, []byte("in"), "/bin/prog", "a")
	if err != nil {
		t.Fatal(err)
	}
	if r.Stdout != "hello\n" || r.Stderr != "warn\n" || r.ExitCode != 2 {
		t.Errorf("ExecFull = %+v", r)
	}
	out, code, err := g.Exec(ctx, "/bin/prog")
	if err != nil || out != "hello\n" || code != 2 {
		t.Errorf("Exec = %q, %d, %v", out, code, err)
	}
	_, _, err = g.Exec(ctx, "/missing")
	if !errors.Is(err, ErrAgent) || !strings.Contains(err.Error(), "Failed to execute") {
		t.Errorf("Exec of a missing program: %v, want ErrAgent with the agent's message", err)
	}
	if err := g.Agent(ctx, "guest-nonsense", nil, nil); !errors.Is(err, ErrAgent) || !strings.Contains(err.Error(), "CommandNotFound") {
		t.Errorf("unknown command: %v", err)
	}
}

func TestSocketAgentSilentAgentTimesOut(t *testing.T) {
	a := startFakeAgent(t)
	a.silent = true
	g := &Guest{Name: "fake", Kind: "qemu", agent: &socketAgent{path: a.path}, Started: time.Now(), exited: make(chan struct{}),
		ConsoleLog: filepath.Join(t.TempDir(), "console.log")}
	defer g.agent.close()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := g.WaitAgent(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitAgent on a silent agent: %v, want a deadline error", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("WaitAgent returned %s after its deadline", took)
	}
	if !strings.Contains(err.Error(), "console log") {
		t.Errorf("error does not point at the console log: %v", err)
	}
}

func TestWaitAgentNoticesQEMUExit(t *testing.T) {
	g := &Guest{Name: "dead", Kind: "qemu", agent: &socketAgent{path: "/nonexistent/qga.sock"}, Started: time.Now(),
		exited: make(chan struct{}), exitErr: errors.New("exit status 1: failed to set MSR 0x10a"),
		ConsoleLog: filepath.Join(t.TempDir(), "console.log")}
	close(g.exited)
	_, err := g.WaitAgent(context.Background())
	if err == nil || !strings.Contains(err.Error(), "MSR") {
		t.Errorf("WaitAgent after QEMU ended: %v, want QEMU's error", err)
	}
}
