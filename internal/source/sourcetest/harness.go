package sourcetest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// SparseRaw writes a sparse raw image of size bytes (at least 8 MiB) at
// path, for a known disk: random data in a few runs, one of them straddling
// the middle, 1 MiB of explicitly written zeros, holes elsewhere. It
// returns the content.
func SparseRaw(t *testing.T, path string, size int64) []byte {
	t.Helper()
	if size < 8<<20 {
		t.Fatalf("SparseRaw: %d bytes is too small", size)
	}
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(uint64(size), 7))
	runs := []span{{512, 4096}, {2<<20 + 3, 300000}, {size/2 - 70000, 140000}, {size - 1<<20, 1 << 20}}
	for _, r := range runs {
		for i := r.off; i < r.off+r.n; i++ {
			data[i] = byte(1 + rng.IntN(255))
		}
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(size)
	for _, r := range append(runs, span{4 << 20, 1 << 20}) {
		if err == nil {
			_, err = f.WriteAt(data[r.off:r.off+r.n], r.off)
		}
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("writing %s: %v", path, err)
	}
	return data
}

var diskNamePattern = regexp.MustCompile(`^[a-z]+$`)

// GuestWriter is a Harness.Write for a testvm guest and its virtio disks:
// one shell script in the guest writes each pattern with seq and dd through
// the disk's block device (found by its serial, which testvm sets to the
// disk's target name) and fsyncs it.
//
// A plain QEMU guest's agent socket serves one client at a time, so
// GuestWriter then makes testvm drop its connection (it reconnects by
// itself), leaving the agent to the driver's freeze.
func GuestWriter(g *testvm.Guest) func(ctx context.Context, ws []Write) error {
	return func(ctx context.Context, ws []Write) error {
		if g.Kind == "qemu" {
			defer releaseAgent(g)
		}
		var b strings.Builder
		b.WriteString(`set -e
w() {
	dev=/dev/disk/by-id/virtio-$1
	[ -b "$dev" ] || dev=/dev/$1
	seq -f %015.0f "$2" "$3" | dd of="$dev" bs=64K iflag=fullblock,count_bytes count="$4" oflag=seek_bytes seek="$5" conv=notrunc,fsync status=none
}
`)
		for _, w := range ws {
			if !diskNamePattern.MatchString(w.Disk) || w.Off < 0 || w.N <= 0 || w.Seed < 0 || w.Seed >= 1e5 {
				return fmt.Errorf("write %+v: not a virtio disk, a range and a seed GuestWriter can do", w)
			}
			first := w.Seed * 1e9
			fmt.Fprintf(&b, "w %s %d %d %d %d\n", w.Disk, first, first+w.N/16+1, w.N, w.Off)
		}
		r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", b.String())
		if err == nil && r.ExitCode != 0 {
			err = fmt.Errorf("exit status %d: %s", r.ExitCode, strings.TrimSpace(r.Stderr))
		}
		if err != nil {
			return fmt.Errorf("writing %d ranges with dd in guest %s: %w", len(ws), g.Name, err)
		}
		return nil
	}
}

// releaseAgent makes testvm close its agent connection: a command whose
// context has already ended fails, and testvm drops the connection of a
// failed command.
func releaseAgent(g *testvm.Guest) {
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	g.Agent(ctx, "guest-ping", nil, nil)
}
