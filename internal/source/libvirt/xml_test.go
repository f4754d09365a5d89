package libvirt

import (
	"strings"
	"testing"

	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/source"
)

func TestResolveURI(t *testing.T) {
	tests := []struct {
		uri, socket, driver, err string
	}{
		{"", defaultSocket, "qemu:///system", ""},
		{"qemu:///system", defaultSocket, "qemu:///system", ""},
		{"qemu+unix:///system", defaultSocket, "qemu:///system", ""},
		{"qemu:///system?socket=/run/x/sock", "/run/x/sock", "qemu:///system", ""},
		{"/run/libvirt/libvirt-sock", "/run/libvirt/libvirt-sock", "qemu:///system", ""},
		{"qemu:///session", "", "", "only qemu:///system"},
		{"qemu+ssh://host/system", "", "", "only the local QEMU driver"},
		{"xen:///system", "", "", "only the local QEMU driver"},
	}
	for _, tt := range tests {
		t.Run(tt.uri, func(t *testing.T) {
			socket, driver, err := resolveURI(tt.uri)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("resolveURI(%q) = %v; want error %q", tt.uri, err, tt.err)
				}
				return
			}
			if err != nil || socket != tt.socket || driver != tt.driver {
				t.Fatalf("resolveURI(%q) = %q, %q, %v; want %q, %q", tt.uri, socket, driver, err, tt.socket, tt.driver)
			}
		})
	}
}

const testDomainXML = `<domain type='qemu' id='3'>
  <name>web</name>
  <uuid>a0827e4c-55bf-4bfd-bb66-938a83e1f202</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.qcow2' index='3'/>
      <backingStore type='file' index='4'><format type='qcow2'/><source file='/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/web-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/plain.img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/shared-ro.img'/>
      <target dev='vdd' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vde' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-a0827e4c</label></seclabel>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+108</label><imagelabel>+64055:+108</imagelabel></seclabel>
</domain>`

func TestParseDomain(t *testing.T) {
	d, err := parseDomain(testDomainXML)
	if err != nil {
		t.Fatal(err)
	}
	type row struct{ target, path, format string }
	var got []row
	for _, disk := range d.backupDisks() {
		got = append(got, row{disk.Target.Dev, disk.path(), disk.format()})
	}
	want := []row{
		{"vda", "/var/lib/libvirt/images/web.qcow2", "qcow2"},
		{"vdb", "/dev/vg/web-data", "raw"},
		{"vdc", "/srv/plain.img", "raw"},
		{"vde", "", "raw"}, // network disks are read live only
	}
	if len(got) != len(want) {
		t.Fatalf("backupDisks = %v; want %v (no CD-ROM, no read-only disk)", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("disk %d = %v; want %v", i, got[i], want[i])
		}
	}
	if present, connected := d.agentChannel(); !present || !connected {
		t.Errorf("agentChannel = %v, %v; want true, true", present, connected)
	}
	if uid, gid, ok := d.qemuOwner(); !ok || uid != 64055 || gid != 108 {
		t.Errorf("qemuOwner = %d, %d, %v; want 64055, 108", uid, gid, ok)
	}
}

func TestCheckpointXML(t *testing.T) {
	d, err := parseDomain(testDomainXML)
	if err != nil {
		t.Fatal(err)
	}
	x := checkpointXML("kura-1", d.backupDisks(), map[string]bool{"vda": true})
	cp, err := parseCheckpoint(x)
	if err != nil {
		t.Fatal(err)
	}
	if cp.Name != "kura-1" || len(cp.Disks) != 4 {
		t.Fatalf("checkpoint %s", x)
	}
	for _, disk := range cp.Disks {
		want := "no"
		if disk.Name == "vda" {
			want = "bitmap"
		}
		if disk.Checkpoint != want {
			t.Errorf("disk %s checkpoint=%q; want %q in %s", disk.Name, disk.Checkpoint, want, x)
		}
	}
}

// What libvirt 9.0 says about a checkpoint with VIR_DOMAIN_CHECKPOINT_XML_SIZE
// when the bitmap of vdb was removed behind its back.
const testCheckpointSizeXML = `<domaincheckpoint>
  <name>kura-2</name>
  <parent><name>kura-1</name></parent>
  <creationTime>1795642453</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='kura-2' size='0'/>
    <disk name='vdb' checkpoint='bitmap' bitmap='kura-2'/>
    <disk name='vdc' checkpoint='no'/>
  </disks>
</domaincheckpoint>`

func TestParseCheckpointSize(t *testing.T) {
	cp, err := parseCheckpoint(testCheckpointSizeXML)
	if err != nil {
		t.Fatal(err)
	}
	if cp.CreationTime != 1795642453 || cp.Parent == nil || cp.Parent.Name != "kura-1" {
		t.Errorf("parsed %+v", cp)
	}
	tests := []struct {
		disk       string
		checkpoint string
		hasSize    bool
	}{
		{"vda", "bitmap", true},
		{"vdb", "bitmap", false},
		{"vdc", "no", false},
	}
	for _, tt := range tests {
		d, ok := cp.disk(tt.disk)
		if !ok || d.Checkpoint != tt.checkpoint || (d.Size != nil) != tt.hasSize {
			t.Errorf("disk %s = %+v, %v; want checkpoint=%s, size given %v", tt.disk, d, ok, tt.checkpoint, tt.hasSize)
		}
	}
}

// The backup XML libvirt 9.0 reports for a running pull-mode job.
const testBackupXML = `<domainbackup mode='pull'>
  <server transport='unix' socket='/var/tmp/kura-1-ab/nbd.sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='kura-1' exportname='vda' exportbitmap='backup-vda' index='7'>
      <driver type='qcow2'/>
      <scratch file='/var/tmp/kura-1-ab/vda.1.scratch'/>
    </disk>
    <disk name='vdc' backup='yes' type='file' backupmode='full' exportname='vdc' index='9'>
      <driver type='qcow2'/>
      <scratch file='/var/tmp/kura-1-ab/vdc.1.scratch'/>
    </disk>
    <disk name='sda' backup='no'/>
  </disks>
</domainbackup>`

func TestParseBackup(t *testing.T) {
	b, err := parseBackup(testBackupXML)
	if err != nil {
		t.Fatal(err)
	}
	if b.Server.Socket != "/var/tmp/kura-1-ab/nbd.sock" || len(b.Disks) != 3 {
		t.Fatalf("parsed %+v", b)
	}
	if d := b.Disks[0]; d.ExportName != "vda" || d.ExportBitmap != "backup-vda" || d.BackupMode != "incremental" || d.Incremental != "kura-1" {
		t.Errorf("vda: %+v", d)
	}
	if d := b.Disks[1]; d.ExportBitmap != "" || d.BackupMode != "full" {
		t.Errorf("vdc: %+v", d)
	}
	if m := staleDirPattern.FindStringSubmatch("kura-1-ab"); m == nil || m[1] != "1" {
		t.Errorf("staleDirPattern does not match the private directory: %v", m)
	}
}

func ne(off, length int64, flags uint32) nbd.Extent {
	return nbd.Extent{Offset: off, Length: length, Flags: flags}
}

func se(off, length int64, zero bool) source.Extent {
	return source.Extent{Offset: off, Length: length, Zero: zero}
}

func TestToExtents(t *testing.T) {
	zero := func(f uint32) bool { return f&nbd.StateZero != 0 }
	tests := []struct {
		name string
		in   []nbd.Extent
		want []source.Extent
	}{
		{"empty", nil, []source.Extent{}},
		{
			"hole without zero is read",
			[]nbd.Extent{ne(0, 10, nbd.StateHole), ne(10, 10, nbd.StateHole|nbd.StateZero), ne(20, 5, 0)},
			[]source.Extent{se(0, 10, false), se(10, 10, true), se(20, 5, false)},
		},
		{
			"neighbours of one kind merge",
			[]nbd.Extent{ne(0, 10, 0), ne(10, 10, 0), ne(20, 5, nbd.StateZero), ne(25, 5, nbd.StateZero|nbd.StateHole)},
			[]source.Extent{se(0, 20, false), se(20, 10, true)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := toExtents(tt.in, zero)
			if len(got) != len(tt.want) {
				t.Fatalf("got %v; want %v", got, tt.want)
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Fatalf("got %v; want %v", got, tt.want)
				}
			}
		})
	}
}

func TestDomainInfo(t *testing.T) {
	x := `<domain type='qemu'><name>web01</name>
  <metadata>
    <kura:tags xmlns:kura="urn:kura:1">prod, web
      frontend</kura:tags>
    <other:tags xmlns:other="urn:other">not-ours</other:tags>
  </metadata>
  <devices>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/web01.qcow2'/><target dev='vda'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/debian.iso'/><target dev='sda'/></disk>
    <disk type='block' device='disk'><source dev='/dev/vg0/web01-data'/><target dev='vdb'/></disk>
  </devices></domain>`
	info, err := domainInfo(x)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(info.Tags, "|") != "prod|web|frontend" {
		t.Errorf("tags %q", info.Tags)
	}
	if len(info.Disks) != 2 || info.Disks[0] != (DiskPath{"vda", "/var/lib/libvirt/images/web01.qcow2"}) || info.Disks[1] != (DiskPath{"vdb", "/dev/vg0/web01-data"}) {
		t.Errorf("disks %+v", info.Disks)
	}
	if _, err := domainInfo("<domain"); err == nil {
		t.Error("bad XML accepted")
	}
}

// The capture ends the job before it closes its NBD connections when QEMU
// serves a disk in an I/O thread (see capture.iothreads); which domains
// that is.
func TestUsesIOThreads(t *testing.T) {
	tests := []struct {
		name, devices string
		want          bool
	}{
		{"no I/O threads", `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/><target dev='vda' bus='virtio'/></disk>`, false},
		{"a virtio-blk disk in one", `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
			<disk type='file' device='disk'><driver name='qemu' type='raw' iothread='2'/><source file='/b.raw'/><target dev='vdb' bus='virtio'/></disk>`, true},
		{"a virtio-scsi controller in one", `<controller type='scsi' index='0' model='virtio-scsi'><driver iothread='1'/></controller>
			<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/><target dev='sda' bus='scsi'/></disk>`, true},
		{"a controller without one", `<controller type='scsi' index='0' model='virtio-scsi'><driver queues='4'/></controller>`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := parseDomain("<domain><name>vm</name><iothreads>2</iothreads><devices>" + tt.devices + "</devices></domain>")
			if err != nil {
				t.Fatal(err)
			}
			if got := d.usesIOThreads(); got != tt.want {
				t.Fatalf("usesIOThreads() = %v, want %v", got, tt.want)
			}
		})
	}
}
