package qcow2

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// TestCreateMatchesQemuImg compares Create's images with qemu-img's, byte
// for byte but for qemu-img's feature name table (an optional header
// extension), and has qemu-img check them and write into one.
func TestCreateMatchesQemuImg(t *testing.T) {
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Skip("qemu-img not installed")
	}
	dir := t.TempDir()
	for _, size := range []uint64{0, 1, 512, 1 << 20, 3000000000, 8 << 30, 8<<30 + 4096, 1 << 40, 5 << 40} {
		name := strconv.FormatUint(size, 10)
		t.Run(name, func(t *testing.T) {
			ours, theirs := filepath.Join(dir, name+".ours"), filepath.Join(dir, name+".qemu")
			if err := Create(ours, size, 0o600); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command(qemuImg, "create", "-q", "-f", "qcow2", theirs, name).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img create: %v: %s", err, out)
			}
			a, _ := os.ReadFile(ours)
			b, _ := os.ReadFile(theirs)
			if len(b) > headerLength {
				clear(b[headerLength:min(len(b), clusterSize)]) // the feature name table
			}
			if !bytes.Equal(a, b) {
				t.Errorf("%d bytes; qemu-img wrote %d, or other bytes", len(a), len(b))
			}
			if out, err := exec.Command(qemuImg, "check", "-f", "qcow2", ours).CombinedOutput(); err != nil {
				t.Errorf("qemu-img check: %v: %s", err, out)
			}
			if size >= 1<<20 {
				if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "read -P 7 0 64k", ours).CombinedOutput(); err != nil {
					t.Errorf("qemu-io: %v: %s", err, out)
				}
				if out, err := exec.Command(qemuImg, "check", "-f", "qcow2", ours).CombinedOutput(); err != nil {
					t.Errorf("qemu-img check after a write: %v: %s", err, out)
				}
			}
		})
	}
	if err := Create(filepath.Join(dir, "0.ours"), 1, 0o600); err == nil {
		t.Error("Create over an existing file succeeded")
	}
}
