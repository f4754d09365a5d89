package libvirt

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sort"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// RestoredDisk is where a restored disk of a VM now lives.
type RestoredDisk struct {
	Path   string // the new image file
	Format string // "raw" or "qcow2"
	// Backing, when set, is the raw NBD export the image is an overlay
	// of (instant recovery): it is named in the definition so that
	// libvirt and QEMU open it without probing.
	Backing *NBDBacking
}

// NBDBacking is an NBD export on a unix socket.
type NBDBacking struct {
	Socket, Export string
}

// RestoreDefinition turns the domain XML saved with a restore point into
// the definition of the restored VM: named name, each disk whose target
// is in disks pointing at its restored file (a plain file of that format,
// with no backing chain), and, when newIdentity is set (a copy beside the
// original), without the original's UUID and MAC addresses so that
// libvirt makes new ones, and with the files and sockets of its character
// devices (serial console logs, channels) moved beside the restored disks
// under the new name, which the original holds open. Everything else,
// including disks that were not backed up (CD-ROMs), stays as it was.
func RestoreDefinition(saved, name string, newIdentity bool, disks map[string]RestoredDisk) (string, error) {
	var root xmlNode
	if err := xml.Unmarshal([]byte(saved), &root); err != nil {
		return "", fmt.Errorf("the saved domain XML does not parse: %w", err)
	}
	if root.XMLName.Local != "domain" {
		return "", fmt.Errorf("the saved configuration is a <%s>, not a libvirt <domain>", root.XMLName.Local)
	}
	root.attrDel("id")
	root.child("name", true).Content = name
	if newIdentity {
		root.removeChildren("uuid")
	}
	devices := root.child("devices", false)
	if devices == nil {
		return "", errors.New("the saved domain XML has no <devices>")
	}
	found := map[string]bool{}
	for i := range devices.Nodes {
		dev := &devices.Nodes[i]
		switch dev.XMLName.Local {
		case "disk":
			t := dev.child("target", false)
			if t == nil {
				continue
			}
			rd, ok := disks[t.attr("dev")]
			if !ok {
				continue
			}
			found[t.attr("dev")] = true
			dev.attrSet("type", "file")
			dev.removeChildren("source", "backingStore", "auth", "mirror")
			src := xmlNode{XMLName: xml.Name{Local: "source"}}
			src.attrSet("file", rd.Path)
			// <source> goes where libvirt writes it: after <driver>.
			at := 0
			for j, n := range dev.Nodes {
				if n.XMLName.Local == "driver" {
					at = j + 1
				}
			}
			dev.Nodes = append(dev.Nodes[:at], append([]xmlNode{src}, dev.Nodes[at:]...)...)
			if rd.Backing != nil {
				dev.Nodes = append(dev.Nodes[:at+1], append([]xmlNode{nbdBackingStore(rd.Backing)}, dev.Nodes[at+1:]...)...)
			}
			drv := dev.child("driver", true)
			if drv.attr("name") == "" {
				drv.attrSet("name", "qemu")
			}
			drv.attrSet("type", rd.Format)
		case "interface":
			if newIdentity {
				dev.removeChildren("mac")
			}
		case "serial", "console", "channel", "parallel":
			if newIdentity {
				for j := range dev.Nodes {
					c := &dev.Nodes[j]
					for _, attr := range []string{"path", "file"} {
						if p := c.attr(attr); p != "" && (c.XMLName.Local == "source" || c.XMLName.Local == "log") {
							c.attrSet(attr, filepath.Join(sideDir(disks), name+"-"+filepath.Base(p)))
						}
					}
				}
			}
		}
	}
	for dev := range disks {
		if !found[dev] {
			return "", fmt.Errorf("the saved domain XML has no disk %s", dev)
		}
	}
	out, err := xml.MarshalIndent(&root, "", "  ")
	if err != nil {
		return "", err
	}
	return string(out) + "\n", nil
}

// nbdBackingStore is the <backingStore> element of a raw image read
// from an NBD export on a unix socket.
func nbdBackingStore(b *NBDBacking) xmlNode {
	el := func(name string, attrs ...string) xmlNode {
		n := xmlNode{XMLName: xml.Name{Local: name}}
		for i := 0; i+1 < len(attrs); i += 2 {
			n.attrSet(attrs[i], attrs[i+1])
		}
		return n
	}
	host := el("host", "transport", "unix", "socket", b.Socket)
	src := el("source", "protocol", "nbd", "name", b.Export)
	src.Nodes = []xmlNode{host}
	bs := el("backingStore", "type", "network")
	bs.Nodes = []xmlNode{el("format", "type", "raw"), src, el("backingStore")}
	return bs
}

// sideDir is where a copy's own files go: the directory of its first
// restored disk (by target name).
func sideDir(disks map[string]RestoredDisk) string {
	var devs []string
	for d := range disks {
		devs = append(devs, d)
	}
	if len(devs) == 0 {
		return "."
	}
	sort.Strings(devs)
	return filepath.Dir(disks[devs[0]].Path)
}

// xmlNode is any XML element, kept whole so that a rewrite changes only
// what it means to.
type xmlNode struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
	Content string     `xml:",chardata"`
	Nodes   []xmlNode  `xml:",any"`
}

func (n *xmlNode) UnmarshalXML(d *xml.Decoder, start xml.StartElement) error {
	type plain xmlNode
	if err := d.DecodeElement((*plain)(n), &start); err != nil {
		return err
	}
	if len(n.Nodes) > 0 {
		n.Content = "" // indentation between child elements
	}
	return nil
}

func (n *xmlNode) attr(name string) string {
	for _, a := range n.Attrs {
		if a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

func (n *xmlNode) attrSet(name, value string) {
	for i, a := range n.Attrs {
		if a.Name.Local == name {
			n.Attrs[i].Value = value
			return
		}
	}
	n.Attrs = append(n.Attrs, xml.Attr{Name: xml.Name{Local: name}, Value: value})
}

func (n *xmlNode) attrDel(name string) {
	n.Attrs = slices.DeleteFunc(n.Attrs, func(a xml.Attr) bool { return a.Name.Local == name })
}

// child returns the first child element called name, adding it when make
// is set and there is none.
func (n *xmlNode) child(name string, make bool) *xmlNode {
	for i := range n.Nodes {
		if n.Nodes[i].XMLName.Local == name {
			return &n.Nodes[i]
		}
	}
	if !make {
		return nil
	}
	n.Nodes = append(n.Nodes, xmlNode{XMLName: xml.Name{Local: name}})
	return &n.Nodes[len(n.Nodes)-1]
}

func (n *xmlNode) removeChildren(names ...string) {
	n.Nodes = slices.DeleteFunc(n.Nodes, func(c xmlNode) bool {
		for _, name := range names {
			if c.XMLName.Local == name {
				return true
			}
		}
		return false
	})
}

// ErrDomainExists is returned (wrapped) by Define when a domain of that
// name exists and may not be replaced.
var ErrDomainExists = errors.New("domain exists")

// CanDefine checks that a domain called name may be defined: there is
// none, or overwrite is set and it is not running.
func (c *Conn) CanDefine(ctx context.Context, name string, overwrite bool) error {
	dom, err := rpc(ctx, c, func() (golibvirt.Domain, error) { return c.l.DomainLookupByName(name) })
	switch {
	case golibvirt.IsNotFound(err):
		return nil
	case err != nil:
		return fmt.Errorf("looking up domain %s: %w", name, err)
	case !overwrite:
		return fmt.Errorf("a domain named %s exists: %w: restore it under another name with --as, or replace it with --overwrite", name, ErrDomainExists)
	}
	active, err := rpc(ctx, c, func() (int32, error) { return c.l.DomainIsActive(dom) })
	if err != nil {
		return fmt.Errorf("checking whether domain %s runs: %w", name, err)
	}
	if active != 0 {
		return fmt.Errorf("domain %s is running: %w: shut it down before replacing it, or restore it under another name with --as", name, ErrDomainExists)
	}
	return nil
}

// Define defines domain name from definition x (RestoreDefinition's
// output), after CanDefine.
func (c *Conn) Define(ctx context.Context, name, x string, overwrite bool) error {
	if err := c.CanDefine(ctx, name, overwrite); err != nil {
		return err
	}
	if _, err := rpc(ctx, c, func() (golibvirt.Domain, error) { return c.l.DomainDefineXML(x) }); err != nil {
		return fmt.Errorf("defining domain %s: %w", name, err)
	}
	return nil
}

// Start starts the defined domain name.
func (c *Conn) Start(ctx context.Context, name string) error {
	dom, err := rpc(ctx, c, func() (golibvirt.Domain, error) { return c.l.DomainLookupByName(name) })
	if err != nil {
		return fmt.Errorf("looking up domain %s: %w", name, err)
	}
	if err := rpc0(ctx, c, func() error { return c.l.DomainCreate(dom) }); err != nil {
		return fmt.Errorf("starting domain %s: %w: look at its definition with `virsh dumpxml %s`", name, err, name)
	}
	return nil
}
