package qmp

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kura-backup/kura/internal/source"
)

func TestBlockName(t *testing.T) {
	tests := []struct {
		name string
		b    blockInfo
		want string
	}{
		{"qdev id of a -device", blockInfo{QDev: "/machine/peripheral/vdb/virtio-backend"}, "vdb"},
		{"scsi qdev id", blockInfo{QDev: "/machine/peripheral/sda"}, "sda"},
		{"bare qdev id", blockInfo{QDev: "disk0"}, "disk0"},
		{"anonymous device falls back to the drive", blockInfo{QDev: "/machine/peripheral-anon/device[1]/virtio-backend", Device: "drive-virtio-disk0"}, "drive-virtio-disk0"},
		{"anonymous device and drive falls back to the node", blockInfo{QDev: "/machine/peripheral-anon/device[1]/virtio-backend", Inserted: &blockInserted{NodeName: "root"}}, "root"},
		{"generated node names are not names", blockInfo{Inserted: &blockInserted{NodeName: "#block123"}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := blockName(tt.b); got != tt.want {
				t.Errorf("blockName = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestUnixServerPath(t *testing.T) {
	tests := []struct{ filename, want string }{
		{"unix:/tmp/kvm-1/qga.sock,server=on", "/tmp/kvm-1/qga.sock"},
		{"disconnected:unix:/tmp/kvm-1/qga.sock,server=on", "/tmp/kvm-1/qga.sock"},
		{"unix:/tmp/a,b/qga.sock,server=on", "/tmp/a,b/qga.sock"},
		{"unix:/tmp/client.sock", ""}, // QEMU is the client: nobody can connect
		{"pty:/dev/pts/3", ""},
		{"", ""},
	}
	for _, tt := range tests {
		if got := unixServerPath(tt.filename); got != tt.want {
			t.Errorf("unixServerPath(%q) = %q, want %q", tt.filename, got, tt.want)
		}
	}
}

func TestCheckpointNames(t *testing.T) {
	a, b := newCheckpointName(), newCheckpointName()
	if a == b {
		t.Errorf("two checkpoints named %q", a)
	}
	for _, tt := range []struct {
		name string
		ok   bool
	}{
		{a, true},
		{"20250101T000000Z-abcdef", true},
		{"", false},
		{"has space", false},
		{"semi;colon", false},
		{string(make([]byte, 300)), false},
	} {
		if got := validCheckpoint(tt.name); got != tt.ok {
			t.Errorf("validCheckpoint(%q) = %v, want %v", tt.name, got, tt.ok)
		}
	}
}

func TestOpenMissingSocket(t *testing.T) {
	_, err := Open(context.Background(), filepath.Join(t.TempDir(), "none.sock"), "x")
	if !errors.Is(err, source.ErrNotFound) {
		t.Fatalf("Open of a missing socket: %v, want ErrNotFound", err)
	}
}

func TestCaptureModes(t *testing.T) {
	v := &vm{socket: filepath.Join(t.TempDir(), "none.sock"), name: "x"}
	tests := []struct {
		mode string
		want error
	}{
		{source.ModeShutdown, ErrShutdownMode},
		{"bogus", nil},
	}
	for _, tt := range tests {
		_, err := v.Capture(context.Background(), source.CaptureOptions{Mode: tt.mode})
		if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
			t.Errorf("Capture(mode %q): %v, want %v", tt.mode, err, tt.want)
		}
	}
	if _, err := v.Capture(context.Background(), source.CaptureOptions{Mode: source.ModeCrash, Since: "bad name"}); err == nil {
		t.Error("Capture with a malformed Since succeeded")
	}
}

// The qmp driver captures only with QEMU's backup job (fleecing): it
// refuses the overlay method before touching the VM.
func TestCaptureRefusesOverlay(t *testing.T) {
	v := &vm{name: "vm7", socket: "/nonexistent/vm7.qmp"}
	_, err := v.Capture(context.Background(), source.CaptureOptions{Method: source.MethodOverlay})
	if err == nil || !strings.Contains(err.Error(), "use the libvirt driver for overlay") {
		t.Errorf("err = %v", err)
	}
}
