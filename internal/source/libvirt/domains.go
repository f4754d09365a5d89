package libvirt

import (
	"context"
	"encoding/xml"
	"fmt"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// TagsNamespace is the XML namespace of Kura's element in a domain's
// <metadata>: <kura:tags xmlns:kura="urn:kura:1">prod, db</kura:tags>
// puts the domain in every job that selects the tag "prod" or "db"
// (`virsh metadata DOMAIN urn:kura:1 --key kura --set '<tags>prod,db</tags>'`).
const TagsNamespace = "urn:kura:1"

// DomainInfo is what the daemon needs to know of a domain to schedule it.
type DomainInfo struct {
	Name   string
	Active bool
	Tags   []string
	// Disks are the host paths of its file and block disks (not CD-ROMs),
	// by target, in the definition's order.
	Disks []DiskPath
}

// DiskPath is one disk of a domain on the host.
type DiskPath struct {
	Target, Path string
}

// Domains lists every domain (running and defined) with its tags and disk
// paths.
func (c *Conn) Domains(ctx context.Context) ([]DomainInfo, error) {
	doms, err := rpc(ctx, c, func() ([]golibvirt.Domain, error) {
		d, _, err := c.l.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive|golibvirt.ConnectListDomainsInactive)
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("listing libvirt domains: %w", err)
	}
	var out []DomainInfo
	for _, d := range doms {
		x, err := rpc(ctx, c, func() (string, error) { return c.l.DomainGetXMLDesc(d, 0) })
		if err != nil {
			if golibvirt.IsNotFound(err) {
				continue // undefined meanwhile
			}
			return nil, fmt.Errorf("reading the definition of %s: %w", d.Name, err)
		}
		active, err := rpc(ctx, c, func() (int32, error) { return c.l.DomainIsActive(d) })
		if err != nil && !golibvirt.IsNotFound(err) {
			return nil, fmt.Errorf("checking whether %s runs: %w", d.Name, err)
		}
		info, err := domainInfo(x)
		if err != nil {
			return nil, fmt.Errorf("domain %s: %w", d.Name, err)
		}
		info.Name, info.Active = d.Name, active != 0
		out = append(out, info)
	}
	return out, nil
}

// domainInfo reads the tags and disk paths from a domain's XML.
func domainInfo(x string) (DomainInfo, error) {
	var d struct {
		Metadata struct {
			Any []struct {
				XMLName xml.Name
				Content string `xml:",chardata"`
			} `xml:",any"`
		} `xml:"metadata"`
	}
	if err := xml.Unmarshal([]byte(x), &d); err != nil {
		return DomainInfo{}, fmt.Errorf("parsing the domain XML: %w", err)
	}
	var info DomainInfo
	for _, m := range d.Metadata.Any {
		if m.XMLName.Space == TagsNamespace && m.XMLName.Local == "tags" {
			for _, t := range strings.FieldsFunc(m.Content, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' }) {
				info.Tags = append(info.Tags, t)
			}
		}
	}
	def, err := parseDomain(x)
	if err != nil {
		return DomainInfo{}, err
	}
	for _, dd := range def.Devices.Disks {
		if dd.Device != "" && dd.Device != "disk" {
			continue
		}
		if p := dd.path(); p != "" {
			info.Disks = append(info.Disks, DiskPath{Target: dd.Target.Dev, Path: p})
		}
	}
	return info, nil
}
