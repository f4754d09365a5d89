// Package slowfs mounts a directory again through FUSE, with a model of a
// small shared storage device in front of every read and write: the
// benchmarks' stand-in for a datastore whose I/O is the bottleneck.
//
// The model is a device that serves at most Channels requests at once,
// in arrival order, each for Overhead plus its size at the bandwidth of
// one channel (MiBs / Channels). Requests beyond Channels wait in one
// queue, so a guest's 4 KiB read that arrives behind a backup's reads
// waits for them, as on a real array whose queue is full; while channels
// are free it is served at once. (A blkio cgroup throttle, the other way
// to limit a device here, dispatches in 100 ms slices: any request over
// budget waits for the next slice, which sets every tail at ~100 ms.)
//
// The real I/O goes to the backing directory's files (without O_DIRECT,
// through the host's page cache) and is then held until its modelled
// service time has passed; files are opened with FOPEN_DIRECT_IO, so the
// kernel caches nothing above the model.
package slowfs

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Model describes the device.
type Model struct {
	Channels int           // requests served at once
	MiBs     float64       // throughput of the whole device
	Overhead time.Duration // fixed cost of every request
}

func (m Model) String() string {
	return fmt.Sprintf("%d channels, %g MiB/s in all, %s per request", m.Channels, m.MiBs, m.Overhead)
}

// service is how long the device takes for a request of n bytes.
func (m Model) service(n int) time.Duration {
	perChannel := m.MiBs * (1 << 20) / float64(m.Channels)
	return m.Overhead + time.Duration(float64(n)/perChannel*float64(time.Second))
}

// Stats are the device's counters since the mount.
type Stats struct {
	ReadBytes, WriteBytes uint64
	Requests              uint64
	Waited                time.Duration // summed time requests queued for a channel
}

// Record is one request the device served.
type Record struct {
	At      time.Time     // arrival
	Wait    time.Duration // queued for a channel
	Service time.Duration // on its channel (at least the modelled time)
	Size    int           // bytes
	Write   bool
	Ahead   int // requests on a channel or queued when it arrived
}

// FS is a mounted slowfs.
type FS struct {
	Mountpoint string
	model      Model
	slots      chan struct{}
	server     *fuse.Server
	read       atomic.Uint64
	written    atomic.Uint64
	requests   atomic.Uint64
	waited     atomic.Int64
	inside     atomic.Int64 // requests on a channel or queued

	mu      sync.Mutex
	records []Record
}

// Mount serves backing at mountpoint (which must exist) through model.
func Mount(backing, mountpoint string, model Model) (*FS, error) {
	if model.Channels < 1 || model.MiBs <= 0 {
		return nil, fmt.Errorf("slowfs: model %v: need at least one channel and a positive throughput", model)
	}
	f := &FS{Mountpoint: mountpoint, model: model, slots: make(chan struct{}, model.Channels)}
	root := &fs.LoopbackRoot{Path: backing}
	var st syscall.Stat_t
	if err := syscall.Stat(backing, &st); err != nil {
		return nil, fmt.Errorf("slowfs: %w", err)
	}
	root.Dev = uint64(st.Dev)
	root.NewNode = func(r *fs.LoopbackRoot, _ *fs.Inode, _ string, _ *syscall.Stat_t) fs.InodeEmbedder {
		return &node{LoopbackNode: fs.LoopbackNode{RootData: r}, fs: f}
	}
	root.RootNode = root.NewNode(root, nil, "", &st)
	timeout := time.Second
	srv, err := fs.Mount(mountpoint, root.RootNode, &fs.Options{
		AttrTimeout:  &timeout,
		EntryTimeout: &timeout,
		MountOptions: fuse.MountOptions{
			AllowOther: true, // QEMU may run as another user
			FsName:     "slowfs",
			Name:       "slowfs",
			MaxWrite:   1 << 20,
			// Let the model, not the kernel, queue the requests.
			MaxBackground: 64,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("slowfs: mounting %s: %w", mountpoint, err)
	}
	f.server = srv
	return f, nil
}

// Unmount ends the mount.
func (f *FS) Unmount() error { return f.server.Unmount() }

// Model is the device's model.
func (f *FS) Model() Model { return f.model }

// Stats returns the counters.
func (f *FS) Stats() Stats {
	return Stats{ReadBytes: f.read.Load(), WriteBytes: f.written.Load(), Requests: f.requests.Load(), Waited: time.Duration(f.waited.Load())}
}

// Records returns the requests that arrived from from to to, in order of
// completion.
func (f *FS) Records(from, to time.Time) []Record {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Record
	for _, r := range f.records {
		if !r.At.Before(from) && !r.At.After(to) {
			out = append(out, r)
		}
	}
	return out
}

// do runs io, a request of n bytes, on a channel of the device and
// returns once its modelled service time has passed.
func (f *FS) do(n int, write bool, io func()) {
	queued := time.Now()
	ahead := f.inside.Add(1) - 1
	f.slots <- struct{}{} // blocked senders are woken in arrival order
	start := time.Now()
	f.waited.Add(int64(start.Sub(queued)))
	f.requests.Add(1)
	io()
	if d := f.model.service(n) - time.Since(start); d > 0 {
		time.Sleep(d)
	}
	end := time.Now()
	<-f.slots
	f.inside.Add(-1)
	f.mu.Lock()
	f.records = append(f.records, Record{At: queued, Wait: start.Sub(queued), Service: end.Sub(start), Size: n, Write: write, Ahead: int(ahead)})
	f.mu.Unlock()
}

// node is a loopback node whose files go through the model.
type node struct {
	fs.LoopbackNode
	fs *FS
}

var _ = (fs.NodeOpener)((*node)(nil))
var _ = (fs.NodeCreater)((*node)(nil))

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, _, errno := n.LoopbackNode.Open(ctx, flags&^syscall.O_DIRECT)
	if errno != 0 {
		return nil, 0, errno
	}
	return &file{LoopbackFile: fh.(*fs.LoopbackFile), fs: n.fs}, fuse.FOPEN_DIRECT_IO, 0
}

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	ino, fh, _, errno := n.LoopbackNode.Create(ctx, name, flags&^syscall.O_DIRECT, mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	return ino, &file{LoopbackFile: fh.(*fs.LoopbackFile), fs: n.fs}, fuse.FOPEN_DIRECT_IO, 0
}

// file is a loopback file whose reads, writes and syncs take the model's
// time.
type file struct {
	*fs.LoopbackFile
	fs *FS
}

var _ = (fs.FileReader)((*file)(nil))
var _ = (fs.FileWriter)((*file)(nil))
var _ = (fs.FileFsyncer)((*file)(nil))

func (f *file) Read(ctx context.Context, buf []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	var res fuse.ReadResult
	var errno syscall.Errno
	f.fs.do(len(buf), false, func() {
		// Read now (not at reply time, as a loopback's fd result would),
		// so that the bytes are there when the service time ends.
		var r fuse.ReadResult
		if r, errno = f.LoopbackFile.Read(ctx, buf, off); errno == 0 {
			var b []byte
			var st fuse.Status
			if b, st = r.Bytes(buf); !st.Ok() {
				errno = syscall.EIO
				return
			}
			res = fuse.ReadResultData(b)
			f.fs.read.Add(uint64(len(b)))
		}
	})
	return res, errno
}

func (f *file) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	var n uint32
	var errno syscall.Errno
	f.fs.do(len(data), true, func() {
		n, errno = f.LoopbackFile.Write(ctx, data, off)
		f.fs.written.Add(uint64(n))
	})
	return n, errno
}

// Fsync costs one request; the backing files are scratch, so it does not
// reach the host's disk (whose own flushes would add noise to the model).
func (f *file) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	f.fs.do(0, true, func() {})
	return 0
}
