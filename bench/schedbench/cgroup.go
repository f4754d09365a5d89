package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"github.com/kura-backup/kura/bench/internal/slowfs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const blkioRoot = "/sys/fs/cgroup/blkio"

// Device is the block device holding the guests' images.
type Device struct {
	Name   string `json:"name"`    // as in /proc/diskstats, e.g. vda
	MajMin string `json:"maj_min"` // e.g. 254:0
}

// blockDeviceOf finds the whole-disk block device holding path's file
// system and checks that /proc/diskstats lists it (tmpfs and overlay file
// systems have none, and a blkio limit would do nothing there).
func blockDeviceOf(path string) (Device, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return Device{}, err
	}
	major, minor := unix.Major(st.Dev), unix.Minor(st.Dev)
	mm := fmt.Sprintf("%d:%d", major, minor)
	link, err := os.Readlink("/sys/dev/block/" + mm)
	if err != nil {
		return Device{}, fmt.Errorf("its file system (device %s) is not on a block device (tmpfs?): a blkio limit cannot apply; set BENCH_WORK to a directory on a disk", mm)
	}
	name := filepath.Base(link)
	// A partition: throttle the whole disk it is part of (blkio takes
	// whole-disk MAJ:MIN).
	if _, err := os.Stat(filepath.Join("/sys/class/block", name, "partition")); err == nil {
		parent := filepath.Base(filepath.Dir(filepath.Join("/sys/dev/block", link)))
		if dev := strings.TrimSpace(benchutil.ReadFile(filepath.Join("/sys/class/block", parent, "dev"))); dev != "" {
			name, mm = parent, dev
		}
	}
	if !strings.Contains(benchutil.ReadFile("/proc/diskstats"), " "+name+" ") {
		return Device{}, fmt.Errorf("device %s (%s) is not in /proc/diskstats", name, mm)
	}
	return Device{Name: name, MajMin: mm}, nil
}

// datastore is the blkio (cgroup v1) throttle that makes the device a
// limited datastore for the guests' QEMU processes: one cgroup that all of
// them are moved into (scope shared: they and their backups' reads share
// one budget, as on a real datastore), or a limit in each QEMU's own
// libvirt cgroup (scope per-vm).
type datastore struct {
	cfg    config
	dev    Device
	shared string            // the shared cgroup's directory
	groups []string          // cgroup directories whose counters are summed
	orig   map[int]string    // QEMU pid -> its blkio cgroup before (shared)
	limits map[string]uint64 // throttle file -> value
}

func newDatastore(cfg config, dev Device, guests []*vmGuest) (*datastore, error) {
	if _, err := os.Stat(filepath.Join(blkioRoot, "blkio.throttle.read_bps_device")); err != nil {
		return nil, fmt.Errorf("no cgroup v1 blkio throttle at %s: %w", blkioRoot, err)
	}
	d := &datastore{cfg: cfg, dev: dev, orig: map[int]string{}, limits: map[string]uint64{}}
	set := func(file string, v uint64) {
		if v > 0 {
			d.limits[file] = v
		}
	}
	set("blkio.throttle.read_bps_device", uint64(cfg.LimitReadMiBs)*MiB)
	set("blkio.throttle.write_bps_device", uint64(cfg.LimitWriteMiBs)*MiB)
	set("blkio.throttle.read_iops_device", uint64(cfg.LimitReadIOPS))
	set("blkio.throttle.write_iops_device", uint64(cfg.LimitWriteIOPS))
	switch cfg.LimitScope {
	case "shared":
		d.shared = filepath.Join(blkioRoot, fmt.Sprintf("kura-sched-bench-%d", os.Getpid()))
		if err := os.Mkdir(d.shared, 0o755); err != nil {
			return nil, err
		}
		d.groups = []string{d.shared}
		if err := d.apply(d.shared); err != nil {
			d.remove()
			return nil, err
		}
		for _, vg := range guests {
			d.orig[vg.pid] = blkioCgroupOf(vg.pid)
			if err := os.WriteFile(filepath.Join(d.shared, "cgroup.procs"), []byte(strconv.Itoa(vg.pid)), 0o644); err != nil {
				d.remove()
				return nil, fmt.Errorf("moving QEMU of %s (pid %d) into %s: %w", vg.name, vg.pid, d.shared, err)
			}
		}
	case "per-vm":
		for _, vg := range guests {
			cg := filepath.Join(blkioRoot, blkioCgroupOf(vg.pid))
			d.groups = append(d.groups, cg)
			if err := d.apply(cg); err != nil {
				d.remove()
				return nil, err
			}
		}
	}
	if err := d.check(guests); err != nil {
		d.remove()
		return nil, err
	}
	return d, nil
}

func (d *datastore) apply(cg string) error {
	for f, v := range d.limits {
		if err := os.WriteFile(filepath.Join(cg, f), []byte(fmt.Sprintf("%s %d", d.dev.MajMin, v)), 0o644); err != nil {
			return fmt.Errorf("setting %s in %s: %w", f, cg, err)
		}
	}
	return nil
}

// check verifies that every thread of every QEMU is in a limited cgroup.
func (d *datastore) check(guests []*vmGuest) error {
	want := map[string]bool{}
	for _, g := range d.groups {
		rel, _ := filepath.Rel(blkioRoot, g)
		want["/"+strings.TrimPrefix(rel, "/")] = true
	}
	for _, vg := range guests {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", vg.pid))
		if len(tasks) == 0 {
			return fmt.Errorf("%s: QEMU pid %d has no threads (gone?)", vg.name, vg.pid)
		}
		for _, t := range tasks {
			cg := cgroupLine(benchutil.ReadFile(fmt.Sprintf("/proc/%d/task/%s/cgroup", vg.pid, t.Name())))
			if !want[cg] {
				return fmt.Errorf("%s: QEMU thread %s is in blkio cgroup %s, not in a limited one (%v)", vg.name, t.Name(), cg, want)
			}
		}
	}
	return nil
}

// describe is the limit in words, for the report.
func (d *datastore) describe() string {
	var p []string
	if v := d.limits["blkio.throttle.read_bps_device"]; v > 0 {
		p = append(p, fmt.Sprintf("reads %d MiB/s", v/MiB))
	}
	if v := d.limits["blkio.throttle.write_bps_device"]; v > 0 {
		p = append(p, fmt.Sprintf("writes %d MiB/s", v/MiB))
	}
	if v := d.limits["blkio.throttle.read_iops_device"]; v > 0 {
		p = append(p, fmt.Sprintf("%d read IOPS", v))
	}
	if v := d.limits["blkio.throttle.write_iops_device"]; v > 0 {
		p = append(p, fmt.Sprintf("%d write IOPS", v))
	}
	if len(p) == 0 {
		p = append(p, "no limit")
	}
	scope := "shared by all guests (one blkio cgroup holding every QEMU)"
	if d.cfg.LimitScope == "per-vm" {
		scope = "per guest (each QEMU's own libvirt blkio cgroup)"
	}
	return fmt.Sprintf("%s on %s (%s), %s", strings.Join(p, ", "), d.dev.Name, d.dev.MajMin, scope)
}

// counters returns the bytes read and written through the limited cgroups
// on the device so far.
func (d *datastore) counters() (read, write uint64) {
	for _, g := range d.groups {
		for _, line := range strings.Split(benchutil.ReadFile(filepath.Join(g, "blkio.throttle.io_service_bytes")), "\n") {
			f := strings.Fields(line)
			if len(f) != 3 || f[0] != d.dev.MajMin {
				continue
			}
			n, _ := strconv.ParseUint(f[2], 10, 64)
			switch f[1] {
			case "Read":
				read += n
			case "Write":
				write += n
			}
		}
	}
	return read, write
}

// remove lifts the limits: QEMU processes still alive go back to their
// cgroups, the shared cgroup is removed.
func (d *datastore) remove() error {
	var errs []error
	if d.shared == "" {
		for _, g := range d.groups {
			for f := range d.limits {
				os.WriteFile(filepath.Join(g, f), []byte(d.dev.MajMin+" 0"), 0o644) // gone with its guest: fine
			}
		}
		return nil
	}
	for pid, cg := range d.orig {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			continue
		}
		if err := os.WriteFile(filepath.Join(blkioRoot, cg, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
			os.WriteFile(filepath.Join(blkioRoot, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644)
		}
	}
	for i := 0; ; i++ {
		err := syscall.Rmdir(d.shared)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			break
		}
		if i == 50 {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d.shared, err))
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.Join(errs...)
}

// blkioCgroupOf is the blkio cgroup of pid, relative to blkioRoot.
func blkioCgroupOf(pid int) string {
	return cgroupLine(benchutil.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid)))
}

func cgroupLine(s string) string {
	for _, line := range strings.Split(s, "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && strings.Contains(","+f[1]+",", ",blkio,") {
			return f[2]
		}
	}
	return ""
}

// ioSample is the limited cgroups' throughput over one second.
type ioSample struct {
	At        time.Time `json:"at"`
	ReadMiBs  float64   `json:"read_mib_s"`
	WriteMiBs float64   `json:"write_mib_s"`
}

// store is how the datastore's I/O is limited.
type store interface {
	describe() string               // the limit in words, for the report
	counters() (read, write uint64) // bytes through the limit so far
	remove() error                  // lifts the limit
}

// modelStore is the slowfs device model.
type modelStore struct{ fs *slowfs.FS }

func (m *modelStore) describe() string {
	return fmt.Sprintf("a model of a shared device (bench/internal/slowfs: %v, one queue) under the guests' images, mounted at %s", m.fs.Model(), m.fs.Mountpoint)
}

func (m *modelStore) counters() (read, write uint64) {
	s := m.fs.Stats()
	return s.ReadBytes, s.WriteBytes
}

func (m *modelStore) remove() error { return m.fs.Unmount() }

// sampleIO records the datastore's throughput every second until ctx ends.
func sampleIO(ctx context.Context, d store) <-chan []ioSample {
	out := make(chan []ioSample, 1)
	go func() {
		var s []ioSample
		r0, w0 := d.counters()
		t0 := time.Now()
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				out <- s
				return
			case now := <-tick.C:
				r, w := d.counters()
				dt := now.Sub(t0).Seconds()
				s = append(s, ioSample{At: now, ReadMiBs: float64(r-r0) / MiB / dt, WriteMiBs: float64(w-w0) / MiB / dt})
				r0, w0, t0 = r, w, now
			}
		}
	}()
	return out
}

// DeviceWindow is what the modelled device served in a window: the
// guests' own I/O (requests of at most smallIO bytes: fio's 4 KiB, the
// guests' other small writes) apart from the backups' reads and the
// copy-before-write (the larger ones), so that a guest's tail can be told
// apart as time queued on the device or time elsewhere (QEMU, CPU).
type DeviceWindow struct {
	SmallN        int     `json:"small_n"`
	SmallWait     Dist    `json:"small_wait_ms"`    // queued for a channel
	SmallLatency  Dist    `json:"small_latency_ms"` // queued and served
	SmallChannels float64 `json:"small_channels"`   // channels they held, on average
	LargeN        int     `json:"large_n"`
	LargeMeanKiB  float64 `json:"large_mean_kib"`
	LargeWait     Dist    `json:"large_wait_ms"`
	LargeChannels float64 `json:"large_channels"`
}

const smallIO = 16 << 10

// deviceWindow sums up the model's records from from to to; nil when the
// datastore is not the model.
func deviceWindow(d store, from, to time.Time) *DeviceWindow {
	return deviceWindows(d, []Step{{From: from, To: to}})
}

// deviceWindows sums up the model's records in the windows ws (which do
// not overlap); nil when the datastore is not the model.
func deviceWindows(d store, ws []Step) *DeviceWindow {
	m, ok := d.(*modelStore)
	if !ok {
		return nil
	}
	var w DeviceWindow
	var sw, sl, lw []float64
	var smallHeld, largeHeld time.Duration
	var largeBytes int
	var span float64
	for _, win := range ws {
		if !win.To.After(win.From) {
			continue
		}
		span += win.To.Sub(win.From).Seconds()
		for _, r := range m.fs.Records(win.From, win.To) {
			ms := func(d time.Duration) float64 { return d.Seconds() * 1000 }
			if r.Size <= smallIO {
				sw = append(sw, ms(r.Wait))
				sl = append(sl, ms(r.Wait+r.Service))
				smallHeld += r.Service
			} else {
				lw = append(lw, ms(r.Wait))
				largeHeld += r.Service
				largeBytes += r.Size
			}
		}
	}
	if span == 0 {
		return nil
	}
	w.SmallN, w.SmallWait, w.SmallLatency, w.SmallChannels = len(sw), dist(sw), dist(sl), smallHeld.Seconds()/span
	w.LargeN, w.LargeWait, w.LargeChannels = len(lw), dist(lw), largeHeld.Seconds()/span
	if len(lw) > 0 {
		w.LargeMeanKiB = float64(largeBytes) / float64(len(lw)) / 1024
	}
	return &w
}
