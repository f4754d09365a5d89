package qemuargs

import (
	"encoding/json"
	"regexp"
	"strings"
	"testing"
)

func TestParseKV(t *testing.T) {
	tests := []struct {
		in, implied string
		get         map[string]string
	}{
		{"driver=file,filename=/a,,b,node-name=n", "", map[string]string{"driver": "file", "filename": "/a,b", "node-name": "n"}},
		{"virtio-blk-pci,drive=d0,id=vda", "driver", map[string]string{"driver": "virtio-blk-pci", "drive": "d0", "id": "vda"}},
		{"/run/x.sock,server,nowait", "path", map[string]string{"path": "/run/x.sock", "server": ""}},
		{"vm1,debug-threads=on", "guest", map[string]string{"guest": "vm1", "debug-threads": "on"}},
	}
	for _, tt := range tests {
		kv := parseKV(tt.in, tt.implied)
		for k, want := range tt.get {
			if got := kv.get(k); got != want {
				t.Errorf("parseKV(%q).get(%q) = %q, want %q", tt.in, k, got, want)
			}
		}
		if s := kv.String(); s != tt.in {
			t.Errorf("parseKV(%q).String() = %q", tt.in, s)
		}
	}
}

// testvmArgs is the command line internal/testvm starts plain QEMU guests
// with (key=value -blockdev pairs, a qcow2 root and a raw data disk).
var testvmArgs = []string{
	"qemu-system-x86_64", "-name", "guest=vm7,debug-threads=on", "-machine", "pc", "-accel", "tcg",
	"-m", "1024", "-smp", "2", "-nodefaults", "-no-user-config", "-display", "none",
	"-serial", "file:/tmp/g/console.log", "-kernel", "/img/vmlinuz", "-initrd", "/img/initrd",
	"-append", "root=/dev/vda console=ttyS0",
	"-qmp", "unix:/tmp/kvm-1/qmp.sock,server=on,wait=off",
	"-chardev", "socket,id=qga0,path=/tmp/kvm-1/qga.sock,server=on,wait=off",
	"-device", "virtio-serial-pci,id=virtio-serial0",
	"-device", "virtserialport,bus=virtio-serial0.0,chardev=qga0,name=org.qemu.guest_agent.0",
	"-blockdev", "driver=file,filename=/tmp/g/root.qcow2,node-name=vda-file,cache.direct=off,discard=unmap",
	"-blockdev", "driver=qcow2,file=vda-file,node-name=vda,discard=unmap",
	"-device", "virtio-blk-pci,drive=vda,id=vda,serial=vda",
	"-blockdev", "driver=file,filename=/tmp/g/data,,1.raw,node-name=vdb-file,cache.direct=off,discard=unmap",
	"-blockdev", "driver=raw,file=vdb-file,node-name=vdb,discard=unmap",
	"-device", "virtio-blk-pci,drive=vdb,id=vdb,serial=vdb",
	"-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
	"-uuid", "11111111-2222-3333-4444-555555555555",
	"-pidfile", "/tmp/g/qemu.pid", "-daemonize",
}

func TestRewriteTestvmCommandLine(t *testing.T) {
	p := Plan{
		Disks: map[string]Image{
			"/tmp/g/root.qcow2": {Path: "/ir/vda.qcow2", Format: "qcow2"},
			"/tmp/g/data,1.raw": {Path: "/ir/vdb.qcow2", Format: "qcow2"},
		},
		RunDir: "/ir", Name: "vm7-ir", NewIdentity: true,
	}
	r, err := Rewrite(testvmArgs, p)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Join(r.Args, " ")
	for _, want := range []string{
		"-name guest=vm7-ir,debug-threads=on",
		"driver=file,filename=/ir/vda.qcow2,node-name=vda-file,cache.direct=off,discard=unmap",
		"driver=qcow2,file=vda-file,node-name=vda,discard=unmap",
		"driver=file,filename=/ir/vdb.qcow2,node-name=vdb-file",
		"driver=qcow2,file=vdb-file,node-name=vdb,discard=unmap",
		"-chardev socket,id=qga0,path=/ir/qga0.sock,server=on,wait=off",
		"-qmp unix:/ir/qmp.sock,server=on,wait=off",
		"-qmp unix:/ir/kura-qmp.sock,server=on,wait=off",
		"-serial file:/ir/serial-1.log",
		"-append root=/dev/vda console=ttyS0",
		"-kernel /img/vmlinuz",
	} {
		if !strings.Contains(line, want) {
			t.Errorf("rewritten command line lacks %q:\n%s", want, line)
		}
	}
	for _, gone := range []string{"/tmp/g/root.qcow2", "data,,1.raw", "/tmp/kvm-1", "-daemonize", "-pidfile", "52:54:00:12:34:56", "11111111-2222"} {
		if strings.Contains(line, gone) {
			t.Errorf("rewritten command line still has %q:\n%s", gone, line)
		}
	}
	if !regexp.MustCompile(`mac=52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}`).MatchString(line) {
		t.Errorf("no new MAC address:\n%s", line)
	}
	if r.AgentSocket != "/ir/qga0.sock" || r.QMPSocket != "/ir/kura-qmp.sock" {
		t.Errorf("agent %q, qmp %q", r.AgentSocket, r.QMPSocket)
	}
	if r.Args[0] != "qemu-system-x86_64" {
		t.Errorf("emulator %q", r.Args[0])
	}

	// Without a new identity the name, UUID and MAC stay.
	r, err = Rewrite(testvmArgs, Plan{Disks: p.Disks, RunDir: "/ir"})
	if err != nil {
		t.Fatal(err)
	}
	line = strings.Join(r.Args, " ")
	for _, want := range []string{"guest=vm7,", "mac=52:54:00:12:34:56", "-uuid 11111111-2222-3333-4444-555555555555"} {
		if !strings.Contains(line, want) {
			t.Errorf("kept identity lacks %q:\n%s", want, line)
		}
	}
}

func TestRewriteJSONBlockdevAndDrive(t *testing.T) {
	args := []string{
		"/usr/bin/qemu-system-x86_64",
		"-blockdev", `{"driver":"file","filename":"/var/lib/libvirt/images/a.qcow2","node-name":"libvirt-2-storage","auto-read-only":true}`,
		"-blockdev", `{"node-name":"libvirt-2-format","read-only":false,"driver":"qcow2","file":"libvirt-2-storage","backing":null}`,
		"-blockdev", `{"driver":"raw","file":{"driver":"host_device","filename":"/dev/vg/b"},"node-name":"b"}`,
		"-drive", "file=/srv/c.img,format=raw,if=virtio",
		"-hda", "/srv/d.img",
		"-monitor", "stdio",
	}
	p := Plan{Disks: map[string]Image{
		"/var/lib/libvirt/images/a.qcow2": {Path: "/ir/a.qcow2", Format: "qcow2"},
		"/dev/vg/b":                       {Path: "/ir/b.qcow2", Format: "qcow2"},
		"/srv/c.img":                      {Path: "/ir/c.raw", Format: "raw"},
		"/srv/d.img":                      {Path: "/ir/d.qcow2", Format: "qcow2"},
	}, RunDir: "/ir"}
	r, err := Rewrite(args, p)
	if err != nil {
		t.Fatal(err)
	}
	var storage, format, inline map[string]any
	json.Unmarshal([]byte(r.Args[2]), &storage)
	json.Unmarshal([]byte(r.Args[4]), &format)
	json.Unmarshal([]byte(r.Args[6]), &inline)
	if storage["filename"] != "/ir/a.qcow2" || storage["driver"] != "file" {
		t.Errorf("storage node: %s", r.Args[2])
	}
	if _, ok := format["backing"]; ok || format["driver"] != "qcow2" {
		t.Errorf("format node keeps backing:null (the overlay would not read its backing file): %s", r.Args[4])
	}
	if f, _ := inline["file"].(map[string]any); f["filename"] != "/ir/b.qcow2" || f["driver"] != "file" || inline["driver"] != "qcow2" {
		t.Errorf("inline node: %s", r.Args[6])
	}
	if r.Args[8] != "file=/ir/c.raw,format=raw,if=virtio" || r.Args[10] != "/ir/d.qcow2" || r.Args[12] != "stdio" {
		t.Errorf("drive %q, hda %q, monitor %q", r.Args[8], r.Args[10], r.Args[12])
	}
	if r.AgentSocket != "" {
		t.Errorf("agent socket %q for a VM without an agent port", r.AgentSocket)
	}
}

func TestRewriteErrors(t *testing.T) {
	base := []string{"qemu-system-x86_64", "-drive", "file=/a.img,format=raw"}
	tests := []struct {
		name string
		args []string
		plan Plan
		want string
	}{
		{"empty", nil, Plan{RunDir: "/ir"}, "empty"},
		{"disk not on the command line", base, Plan{RunDir: "/ir", Disks: map[string]Image{"/b.img": {Path: "/ir/b", Format: "qcow2"}}}, "/b.img"},
		{"option without argument", append(base, "-m"), Plan{RunDir: "/ir"}, "-m has no argument"},
		{"run dir too long", base, Plan{RunDir: "/" + strings.Repeat("d", 120)}, "longer than"},
		{"partial image", []string{"q", "-blockdev", "driver=file,filename=/a,node-name=f", "-blockdev", "driver=raw,file=f,offset=512"},
			Plan{RunDir: "/ir", Disks: map[string]Image{"/a": {Path: "/ir/a", Format: "qcow2"}}}, "offset/size"},
		{"bad json", []string{"q", "-blockdev", "{nope"}, Plan{RunDir: "/ir"}, "-blockdev"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Rewrite(tt.args, tt.plan)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Rewrite: %v, want an error with %q", err, tt.want)
			}
		})
	}
}

// With no RunDir the command line only changes its disks: what starts the
// same VM again from other images.
func TestRewriteDisksOnly(t *testing.T) {
	r, err := Rewrite(testvmArgs, Plan{Disks: map[string]Image{
		"/tmp/g/root.qcow2": {Path: "/local/vda.raw", Format: "raw"},
		"/tmp/g/data,1.raw": {Path: "/local/vdb.qcow2", Format: "qcow2"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Join(r.Args, " ")
	for _, want := range []string{
		"driver=raw,file=vda-file,node-name=vda", "driver=qcow2,file=vdb-file,node-name=vdb",
		"filename=/local/vda.raw,", "-qmp unix:/tmp/kvm-1/qmp.sock,server=on,wait=off",
		"path=/tmp/kvm-1/qga.sock", "-serial file:/tmp/g/console.log",
	} {
		if !strings.Contains(line, want) {
			t.Errorf("lacks %q:\n%s", want, line)
		}
	}
	if strings.Contains(line, "kura-qmp") || r.QMPSocket != "" {
		t.Errorf("a monitor was added:\n%s", line)
	}
}
