package libvirt

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	golibvirt "github.com/digitalocean/go-libvirt"
)

func TestPointDiskAt(t *testing.T) {
	const dom = `<domain type='qemu'>
  <name>web1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/tmp/kura-1-ab/vda.overlay'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/srv/vm/web1 &amp; co.qcow2'/>
        <backingStore type='file'>
          <format type='qcow2'/>
          <source file='/srv/vm/base.qcow2'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/tmp/kura-1-ab/vdb.overlay'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/vm/other.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
  </devices>
</domain>`
	tests := []struct {
		name    string
		o       overlay
		want    []string // in the result
		notWant []string
		err     string
	}{
		{
			name: "qcow2 with a chain",
			o:    overlay{target: "vda", path: "/var/tmp/kura-1-ab/vda.overlay", base: "/srv/vm/web1 & co.qcow2", format: "qcow2"},
			want: []string{"<source file='/srv/vm/web1 &amp; co.qcow2'/>\n      \n      <target dev='vda'",
				"<source file='/var/tmp/kura-1-ab/vdb.overlay'/>\n      <backingStore/>", "/srv/vm/other.qcow2"},
			notWant: []string{"vda.overlay", "base.qcow2"},
		},
		{
			name:    "raw below",
			o:       overlay{target: "vdb", path: "/var/tmp/kura-1-ab/vdb.overlay", base: "/srv/vm/data.raw", format: "raw"},
			want:    []string{"<driver name='qemu' type='raw' cache='none'/>\n      <source file='/srv/vm/data.raw'/>\n      \n      <target dev='vdb'", "vda.overlay"},
			notWant: []string{"vdb.overlay"},
		},
		{name: "not in the definition", o: overlay{target: "vdd", path: "/var/tmp/kura-1-ab/vdd.overlay", base: "/x", format: "raw"}, err: "no disk of the definition names"},
		{name: "image below unknown", o: overlay{target: "vda", path: "/var/tmp/kura-1-ab/vda.overlay"}, err: "not known"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := pointDiskAt(dom, tt.o)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("result lacks %q:\n%s", w, got)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(got, w) {
					t.Errorf("result still has %q:\n%s", w, got)
				}
			}
			if _, err := parseDomain(got); err != nil {
				t.Errorf("result does not parse: %v", err)
			}
		})
	}
}

// A dead Kura's scratch directory that holds an overlay stays (a VM may
// run on it); one without goes.
func TestSweepScratchKeepsOverlays(t *testing.T) {
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Skip(err)
	}
	pid := dead.Process.Pid
	dir := t.TempDir()
	plain := filepath.Join(dir, "kura-"+strconv.Itoa(pid)+"-aa")
	held := filepath.Join(dir, "kura-"+strconv.Itoa(pid)+"-bb")
	for _, d := range []string{plain, held} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(d, "vda.1.scratch"), nil, 0o600)
	}
	os.WriteFile(filepath.Join(held, "vdb"+overlaySuffix), nil, 0o600)
	got := SweepScratch(dir)
	if !slices.Equal(got, []string{plain}) {
		t.Errorf("swept %v, want only %s", got, plain)
	}
	if !exists(held) {
		t.Errorf("%s, which holds an overlay, was removed", held)
	}
}

func TestCheckOverlayable(t *testing.T) {
	v := &VM{dom: golibvirt.Domain{Name: "web1"}}
	file := diskDef{Type: "file"}
	file.Source = &struct {
		File     string `xml:"file,attr"`
		Dev      string `xml:"dev,attr"`
		Protocol string `xml:"protocol,attr"`
		Name     string `xml:"name,attr"`
	}{File: "/srv/web1.qcow2"}
	file.Target.Dev = "vda"
	network := diskDef{Type: "network", Source: file.Source}
	network.Target.Dev = "vdb"
	if err := v.checkOverlayable([]diskDef{file}); err != nil {
		t.Errorf("a file disk: %v", err)
	}
	err := v.checkOverlayable([]diskDef{file, network})
	if err == nil || !strings.Contains(err.Error(), "disk vdb is a network disk") || !strings.Contains(err.Error(), "--capture fleece") {
		t.Errorf("a network disk: %v", err)
	}
}

func TestXMLNames(t *testing.T) {
	tests := []struct {
		x, path string
		want    bool
	}{
		{`<source file='/var/tmp/kura-1-a/vdb.overlay'/>`, "/var/tmp/kura-1-a/vdb.overlay", true},
		{`<source file="/var/tmp/kura-1-a/vdb.overlay"/>`, "/var/tmp/kura-1-a/vdb.overlay", true},
		// The second overlay's name holds the first's directory, not its name.
		{`<source file='/var/tmp/kura-1-a/vdb.top1.overlay'/>`, "/var/tmp/kura-1-a/vdb.overlay", false},
		// A prefix of a path is not the path.
		{`<source file='/var/tmp/kura-1-a/vdb.overlay2'/>`, "/var/tmp/kura-1-a/vdb.overlay", false},
		{`<source file='/srv/a&amp;b/vdb.overlay'/>`, "/srv/a&b/vdb.overlay", true},
		{`<source file='/srv/a&b/vdb.overlay'/>`, "/srv/a&b/vdb.overlay", false}, // not as libvirt writes it
	}
	for _, tt := range tests {
		if got := xmlNames(tt.x, tt.path); got != tt.want {
			t.Errorf("xmlNames(%s, %s) = %t, want %t", tt.x, tt.path, got, tt.want)
		}
	}
}
