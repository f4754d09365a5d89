package testvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Buses a data disk can sit on.
const (
	BusVirtio = "virtio" // virtio-blk: /dev/vdb, /dev/vdc, … in the guest
	BusSCSI   = "scsi"   // scsi-hd on a virtio-scsi controller: /dev/sda, …
)

// DiskSpec asks for one data disk. The zero value of each field picks the
// default.
type DiskSpec struct {
	// SizeMiB is the virtual size: default 256 for ext4 and unformatted
	// disks, 512 for xfs (xfs needs at least 300).
	SizeMiB int
	// FS is "ext4", "xfs" or "" (unformatted). Formatted disks are made on
	// the host once per (FS, size, label) and copied from a cached template.
	FS string
	// Mount is where the guest mounts the filesystem at boot: "/data",
	// "/data2", "/data3" or "/data4" (the guest's fstab finds them by the
	// labels kuradata…kuradata4), or "" to leave it unmounted.
	Mount string
	// Bus is BusVirtio (default) or BusSCSI.
	Bus string
	// Source attaches an existing image instead of making one (FS, SizeMiB
	// and Mount then only describe it). Destroy leaves it in place.
	Source string
	// Format of Source: "qcow2" (default) or "raw".
	Format string
}

// Disk is one disk of a running guest.
type Disk struct {
	Target string // the guest's name for it without /dev: "vda" (root), "vdb", "sda", …
	Bus    string // BusVirtio or BusSCSI
	Path   string // the image file on the host
	Format string // "qcow2" or "raw"
	FS     string // "ext4", "xfs" or "" as asked; the root disk is "ext4"
	Mount  string // the guest's mount point, "" if none
	// NodeName is the block node of the format driver in a plain QEMU guest
	// (StartQEMU), for QMP commands such as block-dirty-bitmap-add; the
	// protocol node under it is NodeName+"-file". Empty under libvirt.
	NodeName string
	owned    bool // made by testvm, removed by Destroy
}

// mountLabel maps a supported guest mount point to the label the guest's
// fstab looks for.
var mountLabels = map[string]string{
	"/data":  "kuradata",
	"/data2": "kuradata2",
	"/data3": "kuradata3",
	"/data4": "kuradata4",
}

// planDisks validates specs and names the disks: the root disk is vda; data
// disks on virtio-blk follow as vdb, vdc, … and those on SCSI are sda, sdb, ….
// It fills in the default SizeMiB of each spec.
func planDisks(specs []DiskSpec) ([]Disk, error) {
	disks := make([]Disk, 0, len(specs))
	nextVirtio, nextSCSI := 'b', 'a'
	mounts := map[string]bool{}
	for i, s := range specs {
		d := Disk{Bus: s.Bus, FS: s.FS, Mount: s.Mount, Path: s.Source, Format: s.Format}
		if d.Bus == "" {
			d.Bus = BusVirtio
		}
		switch d.Bus {
		case BusVirtio:
			if nextVirtio > 'z' {
				return nil, fmt.Errorf("disk %d: too many virtio disks", i)
			}
			d.Target = "vd" + string(nextVirtio)
			nextVirtio++
		case BusSCSI:
			if nextSCSI > 'z' {
				return nil, fmt.Errorf("disk %d: too many scsi disks", i)
			}
			d.Target = "sd" + string(nextSCSI)
			nextSCSI++
		default:
			return nil, fmt.Errorf("disk %d: unknown bus %q: use %q or %q", i, s.Bus, BusVirtio, BusSCSI)
		}
		switch s.FS {
		case "", "ext4", "xfs":
		default:
			return nil, fmt.Errorf("disk %d: unsupported filesystem %q: use \"ext4\", \"xfs\" or \"\"", i, s.FS)
		}
		if s.Mount != "" {
			if _, ok := mountLabels[s.Mount]; !ok {
				return nil, fmt.Errorf("disk %d: the guest cannot mount at %q: use /data, /data2, /data3 or /data4", i, s.Mount)
			}
			if s.FS == "" {
				return nil, fmt.Errorf("disk %d: mount %s needs a filesystem (FS \"ext4\" or \"xfs\")", i, s.Mount)
			}
			if mounts[s.Mount] {
				return nil, fmt.Errorf("disk %d: two disks mounted at %s", i, s.Mount)
			}
			mounts[s.Mount] = true
		}
		if s.Source != "" {
			if d.Format == "" {
				d.Format = "qcow2"
			}
			if d.Format != "qcow2" && d.Format != "raw" {
				return nil, fmt.Errorf("disk %d: unsupported format %q of %s: use \"qcow2\" or \"raw\"", i, s.Format, s.Source)
			}
			disks = append(disks, d)
			continue
		}
		d.Format = "qcow2"
		d.owned = true
		size := s.SizeMiB
		if size == 0 {
			size = 256
			if s.FS == "xfs" {
				size = 512
			}
		}
		minSize := 16
		if s.FS == "xfs" {
			minSize = 300
		}
		if size < minSize {
			return nil, fmt.Errorf("disk %d: %d MiB is too small for %q: at least %d MiB", i, size, s.FS, minSize)
		}
		specs[i].SizeMiB = size
		disks = append(disks, d)
	}
	return disks, nil
}

// makeDisks creates the root overlay and the data disks in dir and returns all
// disks, root first.
func makeDisks(ctx context.Context, img Image, dir string, specs []DiskSpec) ([]Disk, error) {
	specs = append([]DiskSpec(nil), specs...)
	data, err := planDisks(specs)
	if err != nil {
		return nil, err
	}
	root := Disk{Target: "vda", Bus: BusVirtio, Path: filepath.Join(dir, "root.qcow2"), Format: "qcow2", FS: "ext4", Mount: "/", owned: true}
	if _, err := runCmd(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", img.RootQcow2, root.Path); err != nil {
		return nil, fmt.Errorf("creating the root overlay over %s: %w", img.RootQcow2, err)
	}
	disks := []Disk{root}
	for i, d := range data {
		if d.owned {
			d.Path = filepath.Join(dir, d.Target+".qcow2")
			if err := newDataDisk(ctx, d.Path, specs[i]); err != nil {
				return disks, err
			}
		}
		disks = append(disks, d)
	}
	return disks, nil
}

// newDataDisk writes a qcow2 data disk at path, copied from a cached template
// that was formatted on the host.
func newDataDisk(ctx context.Context, path string, s DiskSpec) error {
	if s.FS == "" {
		if _, err := runCmd(ctx, "qemu-img", "create", "-q", "-f", "qcow2", path, fmt.Sprintf("%dM", s.SizeMiB)); err != nil {
			return fmt.Errorf("creating data disk %s: %w", path, err)
		}
		return nil
	}
	tmpl, err := diskTemplate(ctx, s.FS, mountLabelOrNone(s.Mount), s.SizeMiB)
	if err != nil {
		return err
	}
	return copyFile(tmpl, path)
}

func mountLabelOrNone(mount string) string {
	if l, ok := mountLabels[mount]; ok {
		return l
	}
	return "kuranone"
}

// diskTemplate returns the cached qcow2 image of a fresh filesystem, making it
// when missing: mkfs on a sparse raw file, then qemu-img convert. ext4 is made
// with its inode tables and journal initialised, so that the guest does not
// write them lazily behind a test's back.
func diskTemplate(ctx context.Context, fs, label string, sizeMiB int) (string, error) {
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "disks")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating disk template directory: %w", err)
	}
	path := filepath.Join(dir, fmt.Sprintf("%s-%s-%dM.qcow2", fs, label, sizeMiB))
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	var mkfs []string
	switch fs {
	case "ext4":
		mkfs = []string{"mkfs.ext4", "-q", "-F", "-L", label, "-E", "lazy_itable_init=0,lazy_journal_init=0"}
	case "xfs":
		mkfs = []string{"mkfs.xfs", "-q", "-f", "-L", label}
	default:
		return "", fmt.Errorf("no template for filesystem %q", fs)
	}
	if _, err := exec.LookPath(mkfs[0]); err != nil {
		pkg := map[string]string{"ext4": "e2fsprogs", "xfs": "xfsprogs"}[fs]
		return "", fmt.Errorf("formatting a %s data disk needs %s on the host: apt-get install %s: %w", fs, mkfs[0], pkg, err)
	}
	raw, err := os.CreateTemp(dir, ".tmpl-*.raw")
	if err != nil {
		return "", fmt.Errorf("creating disk template: %w", err)
	}
	defer os.Remove(raw.Name())
	err = raw.Truncate(int64(sizeMiB) << 20)
	if cerr := raw.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("creating disk template %s: %w", raw.Name(), err)
	}
	if _, err := runCmd(ctx, mkfs[0], append(mkfs[1:], raw.Name())...); err != nil {
		return "", fmt.Errorf("formatting disk template: %w", err)
	}
	tmp := strings.TrimSuffix(raw.Name(), ".raw") + ".qcow2"
	defer os.Remove(tmp)
	if _, err := runCmd(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw.Name(), tmp); err != nil {
		return "", fmt.Errorf("converting disk template: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("storing disk template: %w", err)
	}
	return path, nil
}

func copyFile(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copying disk template: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("creating data disk: %w", err)
	}
	defer func() {
		if cerr := out.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("writing data disk %s: %w", dst, cerr)
		}
	}()
	if _, err := io.Copy(out, in); err != nil {
		return fmt.Errorf("writing data disk %s: %w", dst, err)
	}
	return nil
}

// removeOwned removes the image files testvm made for disks.
func removeOwned(disks []Disk) error {
	var errs []error
	for _, d := range disks {
		if d.owned {
			if err := os.Remove(d.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
