package main

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestLimitRead(t *testing.T) {
	e := newEnv(t)
	e.ok("init")
	img := filepath.Join(e.dir, "disk.raw")
	data := make([]byte, 6<<20)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct{ cmd, value, want string }{
		{"image", "fast", `--limit-read: "fast" is not a rate`},
		{"image", "-5MiB", `--limit-read: "-5MiB" is not a rate`},
		{"image", "0MiB", `--limit-read: "0MiB" is not a rate`},
		{"vm", "10 furlongs", `--limit-read: "10 furlongs" is not a rate`},
	} {
		t.Run(tc.cmd+" "+tc.value, func(t *testing.T) {
			args := []string{"backup", tc.cmd, "--limit-read", tc.value}
			if tc.cmd == "image" {
				args = append(args, img)
			} else {
				args = append(args, "--connect", "/nonexistent/libvirt-sock", "some-vm")
			}
			e.fails(tc.want, args...)
		})
	}
	if n := len(e.snapshots()); n != 0 {
		t.Fatalf("%d restore points after refused backups, want 0", n)
	}

	// 6 MiB at 2 MiB/s: the bucket starts with one chunk's burst, so the
	// reads take at least (6 MiB - 256 KiB) / 2 MiB/s.
	start := time.Now()
	e.ok("-q", "backup", "image", "--limit-read", "2MiB/s", img)
	if took, least := time.Since(start), 2800*time.Millisecond; took < least {
		t.Fatalf("backup of 6 MiB at --limit-read 2MiB took %v, want at least %v", took, least)
	}
	snaps := e.snapshots()
	if len(snaps) != 1 || snaps[0].Stats.BytesRead != int64(len(data)) {
		t.Fatalf("restore points %+v: want one that read %d bytes", snaps, len(data))
	}
}
