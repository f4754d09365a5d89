package slowfs

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

func mount(t *testing.T, m Model) (*FS, string, string) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		t.Skip("needs /dev/fuse and root")
	}
	backing, mnt := t.TempDir(), t.TempDir()
	f, err := Mount(backing, mnt, m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Unmount() })
	return f, backing, mnt
}

func TestModel(t *testing.T) {
	tests := []struct {
		m    Model
		n    int
		want time.Duration
	}{
		{Model{Channels: 1, MiBs: 1, Overhead: time.Millisecond}, 1 << 20, time.Second + time.Millisecond},
		{Model{Channels: 4, MiBs: 40, Overhead: 500 * time.Microsecond}, 256 << 10, 500*time.Microsecond + 25*time.Millisecond},
		{Model{Channels: 4, MiBs: 40, Overhead: 500 * time.Microsecond}, 0, 500 * time.Microsecond},
	}
	for _, tt := range tests {
		if got := tt.m.service(tt.n); got != tt.want {
			t.Errorf("%v: %d bytes take %s, want %s", tt.m, tt.n, got, tt.want)
		}
	}
}

func TestReadWriteThroughModel(t *testing.T) {
	f, backing, mnt := mount(t, Model{Channels: 1, MiBs: 8, Overhead: time.Millisecond})
	data := bytes.Repeat([]byte("slowfs "), 1<<17) // 896 KiB
	start := time.Now()
	if err := os.WriteFile(filepath.Join(mnt, "a"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	// Through the mount, the bytes land in the backing directory...
	if got, err := os.ReadFile(filepath.Join(backing, "a")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("backing file: %v, %d bytes", err, len(got))
	}
	// ...and come back, also with O_DIRECT (as QEMU opens with cache=none).
	fd, err := syscall.Open(filepath.Join(mnt, "a"), syscall.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatalf("O_DIRECT open: %v", err)
	}
	buf := make([]byte, len(data))
	n, err := syscall.Pread(fd, buf, 0)
	syscall.Close(fd)
	if err != nil || n != len(data) || !bytes.Equal(buf, data) {
		t.Fatalf("O_DIRECT read: %d bytes, %v", n, err)
	}
	// 2 × 896 KiB at 8 MiB/s on one channel: at least 219 ms.
	if d := time.Since(start); d < 2*f.model.service(len(data))-10*time.Millisecond {
		t.Errorf("write and read took %s: faster than the model", d)
	}
	if s := f.Stats(); s.ReadBytes < uint64(len(data)) || s.WriteBytes != uint64(len(data)) {
		t.Errorf("stats %+v", s)
	}
}

// Small requests queue behind large ones once every channel is busy.
func TestQueueing(t *testing.T) {
	f, backing, mnt := mount(t, Model{Channels: 1, MiBs: 4, Overhead: 0})
	big := make([]byte, 256<<10) // 62.5 ms on the one channel
	if err := os.WriteFile(filepath.Join(backing, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(backing, "small"), big[:4096], 0o644); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { os.ReadFile(filepath.Join(mnt, "big")) })
	time.Sleep(10 * time.Millisecond)
	start := time.Now()
	if _, err := os.ReadFile(filepath.Join(mnt, "small")); err != nil {
		t.Fatal(err)
	}
	waited := time.Since(start)
	wg.Wait()
	if waited < 30*time.Millisecond {
		t.Errorf("a 4 KiB read behind a 256 KiB one took %s: it did not queue", waited)
	}
	// The device's records say so too.
	var small *Record
	for _, r := range f.Records(start.Add(-time.Second), time.Now()) {
		if r.Size < 64<<10 && !r.Write && (small == nil || r.At.Before(small.At)) {
			small = &r // the first: later ones read at the end of the file
		}
	}
	if small == nil {
		t.Fatal("no record of the 4 KiB read")
	}
	if small.Wait < 30*time.Millisecond || small.Ahead < 1 || small.Service < f.model.service(4096) {
		t.Errorf("record of the 4 KiB read %+v: want a wait of 30 ms or more behind at least one request", *small)
	}
}
