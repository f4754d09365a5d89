package libvirt

import (
	"encoding/xml"
	"fmt"
	"strconv"
	"strings"
)

// domainDef is the part of libvirt's domain XML the driver reads.
type domainDef struct {
	Name    string `xml:"name"`
	UUID    string `xml:"uuid"`
	Devices struct {
		Disks       []diskDef    `xml:"disk"`
		Channels    []channelDef `xml:"channel"`
		Controllers []struct {
			Driver struct {
				IOThread string `xml:"iothread,attr"`
			} `xml:"driver"`
		} `xml:"controller"`
	} `xml:"devices"`
	SecLabels []struct {
		Model string `xml:"model,attr"`
		Label string `xml:"label"`
	} `xml:"seclabel"`
}

type diskDef struct {
	Type   string `xml:"type,attr"`   // file, block, network, volume
	Device string `xml:"device,attr"` // disk, cdrom, floppy, lun
	Driver struct {
		Type     string `xml:"type,attr"` // raw, qcow2, ...
		IOThread string `xml:"iothread,attr"`
	} `xml:"driver"`
	Source *struct {
		File     string `xml:"file,attr"`
		Dev      string `xml:"dev,attr"`
		Protocol string `xml:"protocol,attr"`
		Name     string `xml:"name,attr"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
	} `xml:"target"`
	ReadOnly *struct{} `xml:"readonly"`
	// Backing is the image below (live XML only).
	Backing *struct {
		Format struct {
			Type string `xml:"type,attr"`
		} `xml:"format"`
		Source *struct {
			File string `xml:"file,attr"`
			Dev  string `xml:"dev,attr"`
		} `xml:"source"`
	} `xml:"backingStore"`
}

type channelDef struct {
	Target struct {
		Type  string `xml:"type,attr"`
		Name  string `xml:"name,attr"`
		State string `xml:"state,attr"`
	} `xml:"target"`
}

func parseDomain(s string) (*domainDef, error) {
	var d domainDef
	if err := xml.Unmarshal([]byte(s), &d); err != nil {
		return nil, fmt.Errorf("parsing the domain XML: %w", err)
	}
	return &d, nil
}

// usesIOThreads reports whether QEMU serves any of the domain's disks in
// an I/O thread: a disk's own (driver iothread) or its controller's
// (virtio-scsi).
func (d *domainDef) usesIOThreads() bool {
	for _, disk := range d.Devices.Disks {
		if disk.Driver.IOThread != "" {
			return true
		}
	}
	for _, c := range d.Devices.Controllers {
		if c.Driver.IOThread != "" {
			return true
		}
	}
	return false
}

// path is where the disk's data lives on the host ("" if not a local file
// or device).
func (d diskDef) path() string {
	if d.Source == nil {
		return ""
	}
	switch d.Type {
	case "file":
		return d.Source.File
	case "block":
		return d.Source.Dev
	}
	return ""
}

// format is the disk's image format; libvirt's default is raw.
func (d diskDef) format() string {
	if d.Driver.Type == "" {
		return "raw"
	}
	return d.Driver.Type
}

// backupDisks are the disks a capture reads: writable disks with media.
// CD-ROMs, floppies and read-only disks are left out.
func (d *domainDef) backupDisks() []diskDef {
	var out []diskDef
	for _, disk := range d.Devices.Disks {
		if disk.Device != "" && disk.Device != "disk" {
			continue
		}
		if disk.ReadOnly != nil || disk.Source == nil || disk.Target.Dev == "" {
			continue
		}
		out = append(out, disk)
	}
	return out
}

// agentChannel reports whether the domain has a guest agent channel and
// whether libvirt sees the agent connected to it.
func (d *domainDef) agentChannel() (present, connected bool) {
	for _, c := range d.Devices.Channels {
		if c.Target.Type == "virtio" && c.Target.Name == "org.qemu.guest_agent.0" {
			return true, c.Target.State == "connected"
		}
	}
	return false, false
}

// qemuOwner is the uid and gid QEMU runs as (the DAC security label of a
// running domain, "+64055:+64055"); ok is false when the XML does not say.
func (d *domainDef) qemuOwner() (uid, gid int, ok bool) {
	for _, l := range d.SecLabels {
		if l.Model != "dac" || l.Label == "" {
			continue
		}
		u, g, found := strings.Cut(l.Label, ":")
		if !found {
			return 0, 0, false
		}
		uid, err1 := strconv.Atoi(strings.TrimPrefix(u, "+"))
		gid, err2 := strconv.Atoi(strings.TrimPrefix(g, "+"))
		if err1 != nil || err2 != nil {
			return 0, 0, false
		}
		return uid, gid, true
	}
	return 0, 0, false
}

// checkpointDef is libvirt's domaincheckpoint XML.
type checkpointDef struct {
	XMLName      xml.Name `xml:"domaincheckpoint"`
	Name         string   `xml:"name"`
	CreationTime int64    `xml:"creationTime,omitempty"`
	Parent       *struct {
		Name string `xml:"name"`
	} `xml:"parent,omitempty"`
	Disks []checkpointDisk `xml:"disks>disk"`
}

type checkpointDisk struct {
	Name       string `xml:"name,attr"`
	Checkpoint string `xml:"checkpoint,attr"` // "bitmap" or "no"
	Bitmap     string `xml:"bitmap,attr,omitempty"`
	// Size is the size of the changes since the checkpoint; libvirt fills it
	// in (VIR_DOMAIN_CHECKPOINT_XML_SIZE) only when the bitmap is usable.
	Size *int64 `xml:"size,attr,omitempty"`
}

func parseCheckpoint(s string) (*checkpointDef, error) {
	var c checkpointDef
	if err := xml.Unmarshal([]byte(s), &c); err != nil {
		return nil, fmt.Errorf("parsing the checkpoint XML: %w", err)
	}
	return &c, nil
}

func (c *checkpointDef) disk(name string) (checkpointDisk, bool) {
	for _, d := range c.Disks {
		if d.Name == name {
			return d, true
		}
	}
	return checkpointDisk{}, false
}

// checkpointXML is the checkpoint to create with a backup: a bitmap for the
// disks in bitmap, none for the other disks.
func checkpointXML(name string, disks []diskDef, bitmap map[string]bool) string {
	c := checkpointDef{Name: name}
	for _, d := range disks {
		cd := checkpointDisk{Name: d.Target.Dev, Checkpoint: "no"}
		if bitmap[d.Target.Dev] {
			cd.Checkpoint = "bitmap"
		}
		c.Disks = append(c.Disks, cd)
	}
	b, _ := xml.Marshal(c)
	return string(b)
}

// backupDef is libvirt's domainbackup XML (pull mode).
type backupDef struct {
	XMLName xml.Name `xml:"domainbackup"`
	Mode    string   `xml:"mode,attr"`
	Server  struct {
		Transport string `xml:"transport,attr"`
		Socket    string `xml:"socket,attr"`
	} `xml:"server"`
	Disks []backupDisk `xml:"disks>disk"`
}

type backupDisk struct {
	Name   string `xml:"name,attr"`
	Backup string `xml:"backup,attr"` // "yes" or "no"
	Type   string `xml:"type,attr,omitempty"`
	// BackupMode "full" or "incremental" (with Incremental naming the
	// checkpoint) overrides the backup's mode for this disk (libvirt 7.7+).
	BackupMode  string `xml:"backupmode,attr,omitempty"`
	Incremental string `xml:"incremental,attr,omitempty"`
	// ExportName and ExportBitmap are what libvirt chose; it reports them
	// in virDomainBackupGetXMLDesc.
	ExportName   string `xml:"exportname,attr,omitempty"`
	ExportBitmap string `xml:"exportbitmap,attr,omitempty"`
	Scratch      *struct {
		File string `xml:"file,attr"`
	} `xml:"scratch,omitempty"`
}

func parseBackup(s string) (*backupDef, error) {
	var b backupDef
	if err := xml.Unmarshal([]byte(s), &b); err != nil {
		return nil, fmt.Errorf("parsing the backup XML: %w", err)
	}
	return &b, nil
}

func (b backupDef) String() string {
	out, _ := xml.Marshal(b)
	return string(out)
}
