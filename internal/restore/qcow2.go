package restore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/kura-backup/kura/internal/childenv"
	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/qsd"
)

// qcow2Target writes a new qcow2 image through a writable NBD export of
// qemu-storage-daemon: only data chunks are written, so the image stays as
// small as the data.
type qcow2Target struct {
	tmp, final string
	daemon     *qsd.Daemon
	client     *nbd.Client
}

// NewQcow2 creates a qcow2 restore target at path for a disk of size bytes.
func NewQcow2(ctx context.Context, path string, size int64, overwrite bool) (Target, error) {
	f, err := newPartial(path, overwrite)
	if err != nil {
		return nil, err
	}
	tmp := f.Name()
	f.Close()
	out, err := childenv.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", tmp, strconv.FormatInt(size, 10)).CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		if errors.Is(err, exec.ErrNotFound) {
			return nil, errors.New("qemu-img not found: install qemu-utils (apt-get install qemu-utils), or restore with --format raw")
		}
		return nil, fmt.Errorf("qemu-img create: %v: %s", err, strings.TrimSpace(string(out)))
	}
	d, err := qsd.Start(ctx, qsd.Options{Path: tmp, Format: "qcow2", Writable: true, ExportName: "restore"})
	if err != nil {
		os.Remove(tmp)
		return nil, err
	}
	c, err := nbd.Dial(ctx, "unix", d.Socket(), nbd.Options{ExportName: d.ExportName()})
	if err != nil {
		d.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("connecting to the qcow2 writer: %w", err)
	}
	return &qcow2Target{tmp: tmp, final: path, daemon: d, client: c}, nil
}

func (t *qcow2Target) WriteAt(ctx context.Context, p []byte, off int64) error {
	// qcow2 clusters are 64 KiB: writing zeros would allocate them.
	return writeSparse(p, off, 65536, func(p []byte, off int64) error {
		return t.client.WriteAt(ctx, p, off)
	})
}

func (t *qcow2Target) NeedsZeroes() bool { return false }

func (t *qcow2Target) Commit(ctx context.Context) error {
	err := t.client.Flush(ctx)
	if cerr := t.client.Close(); err == nil {
		err = cerr
	}
	if cerr := t.daemon.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("finishing qcow2 image: %w", err)
	}
	if err := os.Rename(t.tmp, t.final); err != nil {
		os.Remove(t.tmp)
		return fmt.Errorf("moving restored disk into place: %w", err)
	}
	return nil
}

func (t *qcow2Target) Abort() {
	t.client.Close()
	t.daemon.Close()
	os.Remove(t.tmp)
}
