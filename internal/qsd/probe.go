package qsd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
)

// ProbeFormat detects the format of the image at path from its magic
// bytes: "qcow2" (or "qcow" for version 1), "vmdk" (sparse extent or text
// descriptor), "vhdx", "vdi", "vpc", "qed", and otherwise "raw". Block
// devices are always "raw".
//
// Probing trusts the image's first bytes. A guest that owns a raw disk can
// write a qcow2 header to it, so callers that know a disk is raw should say
// so instead of probing.
func ProbeFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("probing image format: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("probing image format of %s: %w", path, err)
	}
	if st.Mode()&fs.ModeDevice != 0 {
		return "raw", nil
	}
	if st.IsDir() {
		return "", fmt.Errorf("probing image format of %s: is a directory", path)
	}
	var head [512]byte
	n, err := f.ReadAt(head[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("probing image format of %s: %w", path, err)
	}
	return probe(head[:n]), nil
}

// probe names the format whose magic starts b (the first sector).
func probe(b []byte) string {
	switch {
	case bytes.HasPrefix(b, []byte("QFI\xfb")):
		if len(b) >= 8 && binary.BigEndian.Uint32(b[4:]) == 1 {
			return "qcow"
		}
		return "qcow2"
	case bytes.HasPrefix(b, []byte("KDMV")), bytes.HasPrefix(b, []byte("COWD")),
		bytes.HasPrefix(b, []byte("# Disk DescriptorFile")):
		return "vmdk"
	case bytes.HasPrefix(b, []byte("vhdxfile")):
		return "vhdx"
	case len(b) >= 0x44 && binary.LittleEndian.Uint32(b[0x40:]) == 0xbeda107f:
		return "vdi"
	case bytes.HasPrefix(b, []byte("conectix")):
		return "vpc"
	case bytes.HasPrefix(b, []byte("QED\x00")):
		return "qed"
	}
	return "raw"
}
