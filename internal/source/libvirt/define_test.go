package libvirt

import (
	"encoding/xml"
	"strings"
	"testing"
)

const savedDomain = `<domain type='qemu' id='7'>
  <name>web01</name>
  <uuid>0b6c0c43-92fb-4ab0-8d6a-3fd1a1c1e1aa</uuid>
  <memory unit='KiB'>1048576</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>/var/cache/vmlinuz</kernel>
    <cmdline>root=/dev/vda rw console=ttyS0</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web01-overlay.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/cache/root.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web01-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
    <serial type='file'>
      <source path='/var/lib/vm/web01/console.log'/>
      <target type='isa-serial' port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='/run/vm/web01.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>`

type pathAttr struct {
	Path string `xml:"path,attr"`
}

// parsed is what the tests look at in a definition.
type parsed struct {
	ID    string `xml:"id,attr"`
	Name  string `xml:"name"`
	UUID  string `xml:"uuid"`
	Disks []struct {
		Type   string `xml:"type,attr"`
		Device string `xml:"device,attr"`
		Driver struct {
			Name  string `xml:"name,attr"`
			Type  string `xml:"type,attr"`
			Cache string `xml:"cache,attr"`
		} `xml:"driver"`
		Source struct {
			File string `xml:"file,attr"`
			Dev  string `xml:"dev,attr"`
		} `xml:"source"`
		Backing *struct{} `xml:"backingStore"`
		Target  struct {
			Dev string `xml:"dev,attr"`
		} `xml:"target"`
	} `xml:"devices>disk"`
	MACs    []string `xml:"devices>interface>mac"`
	Serial  pathAttr `xml:"devices>serial>source"`
	Channel pathAttr `xml:"devices>channel>source"`
	Kernel  string   `xml:"os>kernel"`
}

func TestRestoreDefinition(t *testing.T) {
	disks := map[string]RestoredDisk{
		"vda": {Path: "/restore/web01-vda.qcow2", Format: "qcow2"},
		"vdb": {Path: "/restore/web01-vdb.raw", Format: "raw"},
	}
	tests := []struct {
		name, as        string
		newIdentity     bool
		wantUUID        bool
		wantMAC         bool
		serial, channel string
	}{
		{"in place", "web01", false, true, true, "/var/lib/vm/web01/console.log", "/run/vm/web01.agent"},
		{"copy beside the original", "web01-restored", true, false, false, "/restore/web01-restored-console.log", "/restore/web01-restored-web01.agent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := RestoreDefinition(savedDomain, tt.as, tt.newIdentity, disks)
			if err != nil {
				t.Fatal(err)
			}
			var p parsed
			if err := xml.Unmarshal([]byte(out), &p); err != nil {
				t.Fatalf("output does not parse: %v\n%s", err, out)
			}
			if p.Name != tt.as || p.ID != "" || (p.UUID != "") != tt.wantUUID || (len(p.MACs) > 0) != tt.wantMAC {
				t.Errorf("name %q id %q uuid %q macs %v\n%s", p.Name, p.ID, p.UUID, p.MACs, out)
			}
			if p.Serial.Path != tt.serial || p.Channel.Path != tt.channel {
				t.Errorf("serial log %q, agent socket %q; want %q, %q", p.Serial.Path, p.Channel.Path, tt.serial, tt.channel)
			}
			if p.Kernel != "/var/cache/vmlinuz" || !strings.Contains(out, "root=/dev/vda rw console=ttyS0") {
				t.Errorf("the rest of the definition changed:\n%s", out)
			}
			if len(p.Disks) != 3 {
				t.Fatalf("%d disks:\n%s", len(p.Disks), out)
			}
			for _, d := range p.Disks[:2] {
				want := disks[d.Target.Dev]
				if d.Type != "file" || d.Source.File != want.Path || d.Source.Dev != "" || d.Driver.Type != want.Format || d.Driver.Name != "qemu" || d.Backing != nil {
					t.Errorf("disk %s: %+v; want file %s (%s), no backing chain", d.Target.Dev, d, want.Path, want.Format)
				}
			}
			if p.Disks[0].Driver.Cache != "none" {
				t.Errorf("the driver's other attributes were lost: %+v", p.Disks[0].Driver)
			}
			if cd := p.Disks[2]; cd.Source.File != "/iso/debian.iso" || cd.Device != "cdrom" {
				t.Errorf("the CD-ROM changed: %+v", cd)
			}
		})
	}
}

func TestRestoreDefinitionErrors(t *testing.T) {
	tests := []struct {
		name, saved string
		disks       map[string]RestoredDisk
		want        string
	}{
		{"not XML", "{json", nil, "does not parse"},
		{"not a domain", "<network><name>x</name></network>", nil, "not a libvirt <domain>"},
		{"no devices", "<domain><name>x</name></domain>", nil, "no <devices>"},
		{"disk not in the XML", savedDomain, map[string]RestoredDisk{"vdz": {Path: "/x", Format: "raw"}}, "no disk vdz"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := RestoreDefinition(tt.saved, "x", false, tt.disks)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v; want %q", err, tt.want)
			}
		})
	}
}
