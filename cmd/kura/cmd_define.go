package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source/libvirt"
	"github.com/kura-backup/kura/internal/source/qmp"
	"github.com/kura-backup/kura/internal/termsafe"
)

// defaultImageDir is where `kura restore --define` puts a VM's disks.
const defaultImageDir = "/var/lib/libvirt/images"

// vmRestore is a whole-VM restore (`kura restore --define`): where its
// disks go, and the domain to define once they are written.
type vmRestore struct {
	snap      *repo.Snapshot
	name      string // the restored VM's name
	dir       string
	format    string
	overwrite bool
	conn      *libvirt.Conn // nil for a restore point of plain QEMU
	def       string        // the libvirt domain definition
}

// prepareDefine checks, before any disk is written, that the restore
// point holds a VM whose configuration Kura can bring back and that its
// name is free.
func (a *app) prepareDefine(ctx context.Context, snap *repo.Snapshot, as, dir, format, connect string, overwrite bool) (*vmRestore, error) {
	if snap.Config == nil {
		return nil, fmt.Errorf("restore point %s (%s) holds disk images, not a VM: restore its disks with --to DIR instead of --define", snap.ID[:8], snap.Name)
	}
	v := &vmRestore{snap: snap, name: snap.Name, dir: dir, format: format, overwrite: overwrite}
	if as != "" {
		v.name = as
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("making the directory for the restored disks: %w", err)
	}
	switch snap.Config.Type {
	case "libvirt-xml":
		disks := map[string]libvirt.RestoredDisk{}
		for _, d := range snap.Disks {
			disks[d.Name] = libvirt.RestoredDisk{Path: v.path(d), Format: format}
		}
		def, err := libvirt.RestoreDefinition(snap.Config.Data, v.name, as != "", disks)
		if err != nil {
			return nil, fmt.Errorf("restore point %s: %w", snap.ID[:8], err)
		}
		conn, err := libvirt.Connect(ctx, connect)
		if err != nil {
			return nil, err
		}
		if err := conn.CanDefine(ctx, v.name, overwrite); err != nil {
			conn.Close()
			return nil, err
		}
		v.conn, v.def = conn, def
	case qmp.ConfigType:
		// Plain QEMU: the disks are written and the command line printed.
	default:
		return nil, fmt.Errorf("restore point %s has a %q configuration, which --define does not know: restore its disks with --to DIR", snap.ID[:8], snap.Config.Type)
	}
	return v, nil
}

// path is where disk d of the VM is restored.
func (v *vmRestore) path(d repo.Disk) string {
	return filepath.Join(v.dir, v.name+"-"+d.Name+"."+v.format)
}

func (v *vmRestore) close() {
	if v.conn != nil {
		v.conn.Close()
	}
}

// finish defines (and starts) the restored VM once its disks are written.
func (v *vmRestore) finish(ctx context.Context, a *app, start bool) error {
	if v.conn == nil {
		var cfg struct {
			Cmdline []string `json:"cmdline"`
		}
		json.Unmarshal([]byte(v.snap.Config.Data), &cfg)
		fmt.Fprintf(a.stdout, "restored the disks of plain-QEMU VM %s into %s; start QEMU with its options and these disk files:\n", show(v.snap.Name), show(v.dir))
		for _, d := range v.snap.Disks {
			fmt.Fprintf(a.stdout, "  %s: %s (%s)\n", show(d.Name), show(v.path(d)), v.format)
		}
		if len(cfg.Cmdline) > 0 {
			fmt.Fprintf(a.stdout, "its command line when backed up was:\n  %s\n", termsafe.Line(strings.Join(cfg.Cmdline, " ")))
		}
		return nil
	}
	if err := v.conn.Define(ctx, v.name, v.def, v.overwrite); err != nil {
		return fmt.Errorf("%w (the restored disks are in %s)", err, v.dir)
	}
	fmt.Fprintf(a.stdout, "defined VM %s from restore point %s (%d disks in %s); the original's checkpoints are not carried over\n", show(v.name), v.snap.ID[:8], len(v.snap.Disks), show(v.dir))
	if start {
		if err := v.conn.Start(ctx, v.name); err != nil {
			return err
		}
		fmt.Fprintf(a.stdout, "started VM %s\n", show(v.name))
	}
	return nil
}
