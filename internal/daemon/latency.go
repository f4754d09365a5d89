package daemon

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kura-backup/kura/internal/catalog"
	"github.com/kura-backup/kura/internal/config"
	"github.com/kura-backup/kura/internal/source/libvirt"
	"github.com/kura-backup/kura/internal/throttle"
)

// datastoreOf names the datastore a disk path lives on: the block device
// of its file system (or the device itself for a block disk), and that
// device's name in /proc/diskstats ("" when it has none, e.g. tmpfs).
func datastoreOf(p string) (name, diskstatsDev string) {
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		return "unknown", ""
	}
	dev := st.Dev
	if st.Mode&syscall.S_IFMT == syscall.S_IFBLK {
		dev = st.Rdev
	}
	major, minor := unix.Major(dev), unix.Minor(dev)
	if link, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", major, minor)); err == nil {
		n := filepath.Base(link)
		return n, n
	}
	return fmt.Sprintf("dev-%d:%d", major, minor), ""
}

// controller returns the latency controller of a datastore, making it on
// first use; nil when latency control is disabled.
func (d *Daemon) controller(ds string) *throttle.Controller {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cfg.Latency.Disabled || d.cfg.Latency.Threshold.Duration <= 0 {
		return nil
	}
	if c := d.ctrls[ds]; c != nil {
		return c
	}
	c, err := throttle.NewController(latencyConfig(d.cfg))
	if err != nil {
		d.log.Error("latency control", "datastore", ds, "err", err)
		return nil
	}
	d.ctrls[ds] = c
	return c
}

// window returns the datastore's window of backup reads in flight, shared
// by every backup on it, making it on first use.
func (d *Daemon) window(ds string) *throttle.Window {
	d.mu.Lock()
	defer d.mu.Unlock()
	w := d.windows[ds]
	if w == nil {
		w = throttle.NewWindow(windowConfig(d.cfg))
		d.windows[ds] = w
	}
	return w
}

// windowConfig is the read windows' configuration in cfg: adaptive
// (latency.read_window) up to latency.max_reads, or fixed at max_reads.
func windowConfig(cfg *config.Config) throttle.WindowConfig {
	return throttle.WindowConfig{Max: cfg.Latency.MaxReads, Fixed: !cfg.Latency.ReadWindow}
}

// latencyConfig is the controllers' configuration in cfg.
func latencyConfig(cfg *config.Config) throttle.Config {
	return throttle.Config{Threshold: cfg.Latency.Threshold.Duration,
		MinRate: float64(cfg.Latency.MinRateBytes), Increase: float64(cfg.Latency.IncreaseBytes)}
}

// reconfigureControllers puts a reloaded configuration's latency settings
// in effect on the datastores' controllers. d.mu is held.
func (d *Daemon) reconfigureControllers() {
	// Backups that start from now on share a window of the new settings
	// (running ones keep theirs).
	for ds, w := range d.windows {
		if w.Config() != windowConfig(d.cfg) {
			delete(d.windows, ds)
		}
	}
	for ds, c := range d.ctrls {
		if err := c.SetConfig(latencyConfig(d.cfg)); err != nil {
			d.log.Error("latency control: the reloaded settings are not in effect", "datastore", ds, "err", err)
		}
	}
}

// sampleLatency feeds every datastore's controller with the interval's
// guest latencies (QEMU block stats of the running VMs on it) and device
// latency, applies its decision, and logs, counts and records the
// decisions that change something.
func (d *Daemon) sampleLatency(ctx context.Context) {
	d.mu.Lock()
	vms := map[string][]string{}
	for name, dom := range d.domains {
		if dom.Active {
			vms[d.vmStore[name]] = append(vms[d.vmStore[name]], name)
		}
	}
	devOf := d.devOf
	conn := d.conn
	d.mu.Unlock()
	// Every datastore with running guests is watched, backups or not, so
	// that a datastore already over the threshold gets no new backup.
	ctrls := map[string]*throttle.Controller{}
	for ds := range vms {
		if c := d.controller(ds); c != nil {
			ctrls[ds] = c
		}
	}
	disk := readDiskstats()
	var all map[string]map[string]libvirt.BlockCounters
	if len(ctrls) > 0 {
		var err error
		if all, err = conn.AllBlockStats(ctx); err != nil {
			d.log.Warn("reading the guests' block statistics", "err", err)
		}
	}
	now := time.Now()
	for ds, ctrl := range ctrls {
		var s throttle.Sample
		var busy time.Duration // the guests' requests' time in the interval
		for _, vm := range vms[ds] {
			for target, bc := range all[vm] { // none when stopped or gone meanwhile
				cur := throttle.BlockStats{RdOperations: uint64(bc.ReadOps), WrOperations: uint64(bc.WriteOps), FlushOperations: uint64(bc.FlushOps),
					RdTotalTimeNs: uint64(bc.ReadTimeNs), WrTotalTimeNs: uint64(bc.WriteTimeNs), FlushTotalTimeNs: uint64(bc.FlushTimeNs)}
				key := vm + "/" + target
				d.mu.Lock()
				prev, had := d.prevBlk[key]
				d.prevBlk[key] = cur
				d.mu.Unlock()
				if had {
					if l, ok := throttle.BlockLatency(key, prev, cur); ok {
						s.Disks = append(s.Disks, l)
						busy += l.Busy()
					}
				}
			}
		}
		if dev := devOf[ds]; dev != "" {
			if cur, ok := disk[dev]; ok {
				d.mu.Lock()
				prev, had := d.prevDev[dev]
				d.prevDev[dev] = cur
				d.mu.Unlock()
				if had {
					if l, ok := throttle.DiskLatencyFromDiskStats(dev, prev, cur); ok {
						s.Device = &l
					}
				}
			}
		}
		ctrl.Observe(now, s)
		dec := ctrl.Tick(now)
		d.mu.Lock()
		held := now.Before(d.hold[ds])
		d.mu.Unlock()
		d.sched.PauseDatastore(ds, dec.PauseNewBackups || held)
		d.m.latency.Set(float64(dec.Guest.Microseconds())/1000, ds)
		paused := 0.0
		if dec.PauseNewBackups {
			paused = 1
		}
		d.m.paused.Set(paused, ds)
		var sum float64
		for _, r := range dec.Rates {
			if r.New <= 0 { // one unlimited backup: the datastore is unlimited
				sum = 0
				break
			}
			sum += r.New
		}
		d.m.rate.Set(sum, ds)
		d.mu.Lock()
		last, sampled := d.lastSample[ds]
		d.lastSample[ds] = now
		if win := d.windows[ds]; win != nil {
			if sampled && now.After(last) {
				// The guests' requests in flight: the read window counts
				// them among what the datastore serves.
				win.SetOthers(float64(busy) / float64(now.Sub(last)))
			}
			st := win.State()
			d.m.window.Set(float64(st.Limit), ds)
			if st.Changes != d.windowChanges[ds] {
				d.windowChanges[ds] = st.Changes
				d.log.Info("backup reads in flight", "datastore", ds, "limit", st.Limit, "serves", st.Serves)
			}
		}
		d.mu.Unlock()
		if dec.Actions == 0 {
			continue
		}
		d.log.Info("latency control", "datastore", ds, "decision", dec)
		for _, a := range strings.Split(dec.Actions.String(), "+") {
			d.m.decisions.Inc(ds, a)
		}
		var detail []string
		for _, r := range dec.Rates {
			detail = append(detail, fmt.Sprintf("%s %.0f->%.0f B/s", r.ID, r.Old, r.New))
		}
		if err := d.store.AddThrottleEvent(ctx, catalog.ThrottleEvent{Time: now, Datastore: ds, Action: dec.Actions.String(),
			SignalMs: float64(dec.Guest.Microseconds()) / 1000, Detail: strings.Join(detail, ", ")}); err != nil {
			d.log.Error("recording a throttle event", "err", err)
		}
	}
	// A datastore without running guests has no latency to watch: its
	// hold after a start ends with the hold's time.
	d.mu.Lock()
	var release []string
	for ds, until := range d.hold {
		if ctrls[ds] == nil && !now.Before(until) {
			release = append(release, ds)
			delete(d.hold, ds)
		}
	}
	d.mu.Unlock()
	for _, ds := range release {
		d.sched.PauseDatastore(ds, false)
	}
}

// readDiskstats reads /proc/diskstats by device name.
func readDiskstats() map[string]throttle.DiskStats {
	out := map[string]throttle.DiskStats{}
	f, err := os.Open("/proc/diskstats")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if name, s, err := throttle.ParseDiskStats(sc.Text()); err == nil {
			out[name] = s
		}
	}
	return out
}

// holdAfterStart keeps new backups off a datastore for two sampling
// intervals after one started there, so that the next one starts only
// once the controller has seen what this one does to the guests'
// latency. Without latency control it does nothing.
func (d *Daemon) holdAfterStart(ds string) {
	if d.controller(ds) == nil {
		return
	}
	d.mu.Lock()
	d.hold[ds] = time.Now().Add(2 * d.cfg.Latency.Interval.Duration)
	d.mu.Unlock()
	d.sched.PauseDatastore(ds, true)
}
