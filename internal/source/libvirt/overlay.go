package libvirt

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/kura-backup/kura/internal/childenv"
	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/qsd"
	"github.com/kura-backup/kura/internal/source"
)

// The overlay method (source.MethodOverlay): at the instant, one libvirt
// call (an external disk-only snapshot, atomic across the disks) makes
// QEMU write each disk's changes into a new qcow2 overlay in the capture's
// private directory, so the image below stays as it was at the instant.
// Kura reads those images with a qemu-storage-daemon of its own (at its
// own CPU priority), changed blocks from the checkpoint bitmaps stored in
// them, and merges each overlay back (an active block commit into the
// image below, then a pivot) when the capture ends. The guest's QEMU then
// serves none of the backup's reads and copies nothing before the guest's
// writes: it only merges what the guest wrote during the backup.
//
// The new checkpoint is created before the instant, outside any freeze,
// so its bitmaps, which libvirt carries into the overlays and back (and
// which qemu-img commit keeps up to date when a shut-off VM's overlay is
// merged offline), cover every write after the instant, and the few
// between the two calls, which the next backup reads again. A Kura process that dies leaves the VM running on its overlay;
// the next capture, or ClearStale, merges it back (clearStaleOverlays).

// overlaySuffix ends the file name of every overlay Kura makes.
const overlaySuffix = ".overlay"

// overlayLock is a file in the directory of an overlay capture that the
// capture holds an flock on while it runs: a directory whose lock can be
// taken belongs to no running capture (its Kura died, or its End could
// not merge), and its overlays are merged back by the next capture.
const overlayLock = "capture.lock"

// mergeTimeout bounds the merge of one overlay back into its disk.
const mergeTimeout = 10 * time.Minute

func (c *capture) overlayPath(target string) string {
	return filepath.Join(c.dir, target+overlaySuffix)
}

// checkOverlayable refuses disks an overlay cannot be put on.
func (v *VM) checkOverlayable(disks []diskDef) error {
	for _, d := range disks {
		if d.path() == "" {
			return fmt.Errorf("VM %s: disk %s is a %s disk: the overlay capture method needs local file or block disks; use --capture fleece", v.dom.Name, d.Target.Dev, d.Type)
		}
	}
	return nil
}

// lockDir takes the capture's lock on its directory (overlayLock).
func (c *capture) lockDir() error {
	f, err := os.OpenFile(filepath.Join(c.dir, overlayLock), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("VM %s: %w", c.vm.dom.Name, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return fmt.Errorf("VM %s: locking %s: %w", c.vm.dom.Name, f.Name(), err)
	}
	c.lock = f
	return nil
}

// prepareOverlays makes the overlays before the instant (qemu-img create
// takes ~40 ms a disk): qcow2 images of each disk's size backed by its
// current image, owned by QEMU's user.
func (c *capture) prepareOverlays(ctx context.Context, plans []*diskPlan) error {
	for _, p := range plans {
		capacity, err := c.vm.capacity(ctx, p.disk.Target.Dev)
		if err != nil {
			return err
		}
		if err := c.makeOverlay(ctx, p.disk.Target.Dev, c.overlayPath(p.disk.Target.Dev), p.disk.path(), p.disk.format(), capacity); err != nil {
			return err
		}
	}
	return nil
}

// makeOverlay makes the overlay path of disk target, backed by the image
// backing (format format) and of its size.
func (c *capture) makeOverlay(ctx context.Context, target, path, backing, format string, capacity uint64) error {
	v := c.vm
	// -u: the backing image is open in the running VM; the size is given.
	// extended_l2: 2 KiB subclusters, so that a guest's small write to
	// a cluster not yet in the overlay does not first copy the rest of
	// the 64 KiB cluster up from the image below.
	cmd := childenv.CommandContext(ctx, "qemu-img", "create", "-q", "-u", "-f", "qcow2",
		"-o", "cluster_size=65536,extended_l2=on", "-F", format, "-b", backing, path, strconv.FormatUint(capacity, 10))
	if out, err := cmd.CombinedOutput(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return errors.New("qemu-img not found: install qemu-utils (apt-get install qemu-utils)")
		}
		return fmt.Errorf("VM %s: making the overlay of disk %s: %w: %s", v.dom.Name, target, err, strings.TrimSpace(string(out)))
	}
	if c.owner.ok && (c.owner.uid != os.Geteuid() || c.owner.gid != os.Getegid()) {
		if err := os.Chown(path, c.owner.uid, c.owner.gid); err != nil {
			return fmt.Errorf("VM %s: handing the overlay %s to QEMU's user: %w", v.dom.Name, path, err)
		}
	}
	return nil
}

// snapshotDef is libvirt's domainsnapshot XML for an external disk-only
// snapshot.
type snapshotDef struct {
	XMLName xml.Name       `xml:"domainsnapshot"`
	Disks   []snapshotDisk `xml:"disks>disk"`
}

type snapshotDisk struct {
	Name     string          `xml:"name,attr"`
	Snapshot string          `xml:"snapshot,attr"` // external or no
	Type     string          `xml:"type,attr,omitempty"`
	Driver   *snapshotDriver `xml:"driver"`
	Source   *snapshotSource `xml:"source"`
}

type snapshotDriver struct {
	Type string `xml:"type,attr"`
}

type snapshotSource struct {
	File string `xml:"file,attr"`
}

// overlayCheckpoint creates the new checkpoint of an overlay capture,
// before the instant (and outside any freeze): its bitmaps then cover
// every write after the instant, and the few before it, which the next
// backup reads again. End deletes it if the capture fails.
func (c *capture) overlayCheckpoint(ctx context.Context, def *domainDef, plans []*diskPlan) error {
	v := c.vm
	cpDisks := map[string]bool{}
	for _, p := range plans {
		cpDisks[p.disk.Target.Dev] = p.bitmap
	}
	if !slices.ContainsFunc(plans, func(p *diskPlan) bool { return p.bitmap }) {
		return nil
	}
	var all []diskDef
	for _, d := range def.Devices.Disks {
		if d.Target.Dev != "" {
			all = append(all, d)
		}
	}
	name := newCheckpointName()
	x := checkpointXML(name, all, cpDisks)
	if err := rpc0(ctx, v.c, func() error {
		_, err := v.c.l.DomainCheckpointCreateXML(v.dom, x, 0)
		return err
	}); err != nil {
		return v.errorf(err, "creating checkpoint %s", name)
	}
	c.checkpoint = name
	return nil
}

// overlayInstant is the instant of an overlay capture: one snapshot puts
// every selected disk on its overlay.
func (c *capture) overlayInstant(ctx context.Context, def *domainDef, plans []*diskPlan) error {
	v := c.vm
	began := time.Now()
	defer func() { c.beginTime += time.Since(began) }()
	files := map[string]string{}
	for _, p := range plans {
		files[p.disk.Target.Dev] = c.overlayPath(p.disk.Target.Dev)
	}
	err := v.snapshotOnto(ctx, def, files, func(ctx context.Context, f func() error) error { return rpc0(ctx, v.c, f) })
	// Even after an error (a call that timed out may have taken effect),
	// End looks for every disk on its overlay.
	for _, p := range plans {
		c.overlays = append(c.overlays, overlay{target: p.disk.Target.Dev, base: p.disk.path(), format: p.disk.format(), path: c.overlayPath(p.disk.Target.Dev)})
	}
	if err != nil {
		return v.errorf(err, "putting the disks on overlays (external snapshot)")
	}
	return nil
}

// snapshotOnto puts each disk of def named in files on the overlay file
// it names there (made beforehand), in one atomic external disk-only
// snapshot without metadata; the other disks are left as they are.
func (v *VM) snapshotOnto(ctx context.Context, def *domainDef, files map[string]string, call func(context.Context, func() error) error) error {
	snap := snapshotDef{}
	for _, d := range def.Devices.Disks {
		if d.Target.Dev == "" {
			continue
		}
		sd := snapshotDisk{Name: d.Target.Dev, Snapshot: "no"}
		if f, ok := files[d.Target.Dev]; ok {
			sd.Snapshot, sd.Type = "external", "file"
			sd.Driver = &snapshotDriver{Type: "qcow2"}
			sd.Source = &snapshotSource{File: f}
		}
		snap.Disks = append(snap.Disks, sd)
	}
	b, err := xml.Marshal(snap)
	if err != nil {
		return fmt.Errorf("VM %s: encoding the snapshot XML: %w", v.dom.Name, err)
	}
	flags := uint32(golibvirt.DomainSnapshotCreateDiskOnly | golibvirt.DomainSnapshotCreateNoMetadata |
		golibvirt.DomainSnapshotCreateAtomic | golibvirt.DomainSnapshotCreateReuseExt)
	return call(ctx, func() error {
		_, err := v.c.l.DomainSnapshotCreateXML(v.dom, string(b), flags)
		return err
	})
}

// overlay is a disk put on an overlay by a capture.
type overlay struct {
	target       string
	base, format string // the image below and its format
	path         string
}

// openOverlaid starts a qemu-storage-daemon on each disk's image below its
// overlay and connects to it; disks with a plan's since are read
// incrementally from that checkpoint's bitmap in the image.
func (c *capture) openOverlaid(ctx context.Context, plans []*diskPlan) error {
	v := c.vm
	for _, p := range plans {
		target := p.disk.Target.Dev
		opts := qsd.Options{Path: p.disk.path(), Format: p.disk.format(), ExportName: target}
		bitmap := ""
		if p.since != "" {
			bitmap = p.since
			if p.sinceBitmap != "" {
				bitmap = p.sinceBitmap
			}
			opts.Bitmaps = []string{bitmap}
		}
		daemon, err := qsd.Start(ctx, opts)
		if err != nil && p.since != "" {
			p.since, p.reason = "", fmt.Sprintf("the bitmap of checkpoint %s could not be read: %v", bitmap, err)
			opts.Bitmaps = nil
			daemon, err = qsd.Start(ctx, opts)
		}
		if err != nil {
			return fmt.Errorf("VM %s: reading disk %s below its overlay: %w", v.dom.Name, target, err)
		}
		metas := []string{nbd.MetaBaseAllocation}
		if p.since != "" {
			metas = append(metas, nbd.MetaDirtyBitmapPrefix+bitmap)
		}
		client, err := nbd.Dial(ctx, "unix", daemon.Socket(), nbd.Options{ExportName: daemon.ExportName(), MetaContexts: metas})
		if err != nil {
			daemon.Close()
			return fmt.Errorf("VM %s: connecting to the reader of disk %s: %w", v.dom.Name, target, err)
		}
		d := &exportDisk{
			info:    source.DiskInfo{Name: target, Size: client.Size(), Format: p.disk.format(), Path: p.disk.path()},
			client:  client,
			daemon:  daemon,
			explain: func(_ context.Context, err error) error { return err },
		}
		if p.since != "" {
			c.disks = append(c.disks, &trackedDisk{exportDisk: d, bitmap: nbd.MetaDirtyBitmapPrefix + bitmap})
			c.notes = append(c.notes, source.DiskNote{Disk: target, Read: readChanged, Reason: "changes since checkpoint " + p.since})
			continue
		}
		c.disks = append(c.disks, d)
		c.notes = append(c.notes, source.DiskNote{Disk: target, Read: readFull, Reason: p.reason})
	}
	return nil
}

// mergeOverlays merges every overlay of the capture back into its disk.
// It reports whether all are merged (their files may go).
//
// First, when the VM runs, the cheap way: one more snapshot puts each
// disk on a new overlay, above the one it ran on, and that one is
// committed into the image below while the guest writes to the new one.
// A commit of a layer that is not the active one copies only what the
// guest wrote (in 2 KiB subclusters), one request at a time; an active
// commit copies every 64 KiB cluster the guest touched, reading the rest
// of it from the image, many requests at once. While those commits take
// long (the new overlays then hold much), another round follows, up to
// mergeRounds; the active commits of mergeDown then merge only the last
// overlays, which hold the guest's writes of under a second. Whatever
// the cheap way leaves undone (a call that fails), they merge too.
func (c *capture) mergeOverlays(ctx context.Context) (bool, error) {
	v := c.vm
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), mergeTimeout)
	defer cancel()
	ev := v.watchBlockJobs(ctx)
	defer func() { c.jobWakes = ev.stop() }()
	below := map[string]string{} // the overlay each disk runs on
	for _, o := range c.overlays {
		below[o.target] = o.path
	}
	for round := 1; round <= mergeRounds; round++ {
		snapped := time.Now()
		tops, err := c.topOverlays(ctx, round, below)
		if err != nil {
			c.log.Debug("overlay merge: no new overlay, merging the last one", "round", round, "err", err)
			break
		}
		began := time.Now()
		var started []string
		for _, o := range c.overlays {
			err := c.endCall(ctx, func() error {
				return v.c.l.DomainBlockCommit(v.dom, o.target, nil, []string{below[o.target]}, 0, golibvirt.DomainBlockCommitShallow)
			})
			if err == nil {
				started = append(started, o.target)
			}
		}
		var ended []string
		for _, target := range started {
			if v.waitBlockJob(ctx, target, c.endCall, ev) == nil {
				ended = append(ended, target)
			}
		}
		// A commit that failed (the disk's image full, say) leaves the
		// overlay in the chain: one read of the definition tells.
		done := 0
		if len(ended) > 0 {
			var x string
			if err := c.endCall(ctx, func() (err error) { x, err = v.c.l.DomainGetXMLDesc(v.dom, 0); return err }); err == nil {
				for _, target := range ended {
					if !xmlNames(x, below[target]) {
						done++
					}
				}
			}
		}
		c.log.Debug("overlay merge round", "round", round, "snapshot", began.Sub(snapped), "commits", time.Since(began), "committed", done, "disks", len(c.overlays))
		if round == 1 {
			c.layered = done
		}
		c.rounds = round
		below = tops
		quick := quickCommit
		if c.quickCommit != 0 {
			quick = c.quickCommit
		}
		if done < len(c.overlays) || time.Since(began) < quick {
			break
		}
	}
	var errs []error
	merged := true
	for _, o := range c.overlays {
		began := time.Now()
		err := v.mergeDown(ctx, o, c.endCall, ev)
		c.log.Debug("overlay merge: active commit and pivot", "disk", o.target, "took", time.Since(began), "err", err)
		if err != nil {
			merged = false
			errs = append(errs, err)
		}
	}
	return merged, errors.Join(errs...)
}

// mergeRounds bounds the rounds of mergeOverlays' cheap way; a round whose
// commits took less than quickCommit is the last. A commit costs about a
// second however little it copies (libvirt reopens the image below
// read-write and back, and QEMU drains the disk for each step, holding the
// guest's I/O), so a round shorter than quickCommit left so little in the
// new overlays that their active commit costs less than another round.
const (
	mergeRounds = 3
	quickCommit = 2 * time.Second
)

// topOverlays puts every disk of the capture, which runs on the overlay
// below names, on a new one above it, in one snapshot (no freeze: any
// instant will do), and returns the new ones. The VM must be running.
func (c *capture) topOverlays(ctx context.Context, round int, below map[string]string) (map[string]string, error) {
	v := c.vm
	switch st, err := v.state(ctx); {
	case err != nil:
		return nil, err
	case st != golibvirt.DomainRunning && st != golibvirt.DomainPaused:
		return nil, errors.New("the VM does not run")
	}
	def, err := v.liveDef(ctx)
	if err != nil {
		return nil, err
	}
	files := map[string]string{}
	for _, o := range c.overlays {
		if !slices.ContainsFunc(def.Devices.Disks, func(d diskDef) bool { return d.Target.Dev == o.target && d.path() == below[o.target] }) {
			return nil, fmt.Errorf("disk %s is not on %s", o.target, below[o.target])
		}
		// The size from the image below (which the guest writes to, so
		// a resize shows there), not from QEMU: that query runs in the
		// main loop that serves the guest's I/O.
		info, err := qcow2Info(ctx, below[o.target])
		if err != nil {
			return nil, err
		}
		top := filepath.Join(c.dir, fmt.Sprintf("%s.top%d%s", o.target, round, overlaySuffix))
		if err := c.makeOverlay(ctx, o.target, top, below[o.target], "qcow2", info.size); err != nil {
			return nil, err
		}
		files[o.target] = top
	}
	return files, v.snapshotOnto(ctx, def, files, c.endCall)
}

// waitBlockJob waits until disk target has no block job, or ctx ends;
// ev (which may be nil) wakes it when a job changes.
func (v *VM) waitBlockJob(ctx context.Context, target string, call func(context.Context, func() error) error, ev *jobEvents) error {
	for {
		found, _, err := v.blockJob(ctx, target, call)
		if err != nil || !found {
			return err
		}
		if err := ev.wait(ctx); err != nil {
			return err
		}
	}
}

// maxOverlays bounds how many of Kura's overlays mergeDown expects on one
// disk (a capture makes two).
const maxOverlays = 4

// mergeDown merges the overlays of Kura's that disk o.target runs on back
// into the image below them, the active one first, until the disk is on
// that image again: a capture's End, or a dead Kura's, may leave it on
// its first overlay, on the second above the first (with a commit of the
// first running), or on the second alone. o names the capture's first
// overlay, for the messages.
func (v *VM) mergeDown(ctx context.Context, o overlay, call func(context.Context, func() error) error, ev *jobEvents) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), mergeTimeout)
	defer cancel()
	for range maxOverlays + 1 { // the last pass finds the disk on its image
		var x string
		err := call(ctx, func() (err error) { x, err = v.c.l.DomainGetXMLDesc(v.dom, 0); return err })
		if golibvirt.IsNotFound(err) {
			return nil // the VM took its overlays with it
		}
		if err != nil {
			return v.overlayErr(o, err, "reading the domain XML")
		}
		def, err := parseDomain(x)
		if err != nil {
			return v.overlayErr(o, err, "reading the domain XML")
		}
		i := slices.IndexFunc(def.Devices.Disks, func(d diskDef) bool { return d.Target.Dev == o.target })
		if i < 0 || !isOverlay(def.Devices.Disks[i].path()) {
			return nil
		}
		d := def.Devices.Disks[i]
		top := overlay{target: o.target, path: d.path()}
		if b := d.Backing; b != nil && b.Source != nil {
			top.base, top.format = b.Source.File+b.Source.Dev, b.Format.Type
		}
		// A commit of the overlay below (End's, or a dead Kura's) ends
		// first; the chain is then one shorter.
		if found, typ, err := v.blockJob(ctx, o.target, call); err == nil && found && typ == int32(golibvirt.DomainBlockJobTypeCommit) {
			if err := v.waitBlockJob(ctx, o.target, call, ev); err != nil {
				return v.overlayErr(top, err, "waiting for the merge of an overlay below disk %s's", o.target)
			}
			continue
		}
		if err := v.mergeOverlay(ctx, top, call, ev); err != nil {
			return err
		}
	}
	return v.overlayErr(o, errors.New("still on an overlay"), "merging %d overlays of disk %s back", maxOverlays, o.target)
}

// xmlNames reports whether the XML document x names path (in an
// attribute, as libvirt writes a file's path).
func xmlNames(x, path string) bool {
	var esc strings.Builder
	xml.EscapeText(&esc, []byte(path))
	return strings.Contains(x, "'"+esc.String()+"'") || strings.Contains(x, `"`+esc.String()+`"`)
}

// isOverlay reports whether path is an overlay Kura made.
func isOverlay(path string) bool {
	return strings.HasSuffix(path, overlaySuffix) && staleDirPattern.MatchString(filepath.Base(filepath.Dir(path)))
}

// mergeOverlay merges one overlay back into the image below it: an active
// commit of the overlay alone (shallow: never deeper into the backing
// chain), then a pivot onto that image. A commit already running (one a
// dead Kura started) is waited for; a disk no longer on the overlay needs
// nothing. If the VM is shut off, its definition still names the overlay:
// the overlay is committed offline and the definition pointed at the
// image again (mergeOffline). A VM that no longer exists took its overlay
// with it.
//
// The merge is not cut short by ctx's end (a Ctrl-C, the caller's
// deadline): until it is done the guest's latest writes are only in the
// overlay. mergeTimeout bounds it.
func (v *VM) mergeOverlay(ctx context.Context, o overlay, call func(context.Context, func() error) error, ev *jobEvents) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), mergeTimeout)
	defer cancel()
	shutOff := func() bool {
		st, err := v.state(ctx)
		return err == nil && st == golibvirt.DomainShutoff
	}
	var x string
	err := call(ctx, func() (err error) { x, err = v.c.l.DomainGetXMLDesc(v.dom, 0); return err })
	switch {
	case golibvirt.IsNotFound(err):
		return nil
	case err != nil:
		return v.overlayErr(o, err, "reading the domain XML")
	case shutOff():
		return v.mergeOffline(ctx, o)
	}
	def, err := parseDomain(x)
	if err != nil {
		return v.overlayErr(o, err, "reading the domain XML")
	}
	on := false
	for _, d := range def.Devices.Disks {
		on = on || (d.Target.Dev == o.target && d.path() == o.path)
	}
	if !on {
		return nil
	}
	found, _, err := v.blockJob(ctx, o.target, call)
	if err != nil {
		return v.overlayErr(o, err, "reading the block jobs of disk %s", o.target)
	}
	if !found {
		err := call(ctx, func() error {
			return v.c.l.DomainBlockCommit(v.dom, o.target, nil, nil, 0, golibvirt.DomainBlockCommitShallow|golibvirt.DomainBlockCommitActive)
		})
		if err != nil {
			if shutOff() {
				return v.mergeOffline(ctx, o)
			}
			return v.overlayErr(o, err, "merging the overlay of disk %s back", o.target)
		}
	}
	for {
		err := call(ctx, func() error { return v.c.l.DomainBlockJobAbort(v.dom, o.target, golibvirt.DomainBlockJobAbortPivot) })
		if err == nil {
			return nil
		}
		// Not ready yet: the commit still copies (the guest writes on).
		if libvirtCode(err) != golibvirt.ErrBlockCopyActive && !strings.Contains(err.Error(), "not ready") {
			if shutOff() {
				return v.mergeOffline(ctx, o)
			}
			return v.overlayErr(o, err, "switching disk %s back from its overlay", o.target)
		}
		if err := ev.wait(ctx); err != nil {
			return v.overlayErr(o, err, "merging the overlay of disk %s back", o.target)
		}
	}
}

// blockJob reports whether disk target has a block job, and its type.
func (v *VM) blockJob(ctx context.Context, target string, call func(context.Context, func() error) error) (bool, int32, error) {
	var found, typ int32
	err := call(ctx, func() (err error) {
		found, typ, _, _, _, err = v.c.l.DomainGetBlockJobInfo(v.dom, target, 0)
		return err
	})
	return found != 0, typ, err
}

// overlayErr says what failed while merging overlay o, and what to do.
func (v *VM) overlayErr(o overlay, err error, format string, a ...any) error {
	return fmt.Errorf("%w; disk %s still runs on Kura's overlay %s: merge it with `virsh blockcommit %s %s --active --shallow --pivot` until `virsh domblklist %s` names no %s file for it, then delete the file's directory", v.errorf(err, format, a...), o.target, o.path, v.dom.Name, o.target, v.dom.Name, overlaySuffix)
}

// mergeOffline merges the overlay of a VM that was shut off while it ran
// on it: qemu-img commits the overlay into the image below, and the VM's
// definition names that image again.
func (v *VM) mergeOffline(ctx context.Context, o overlay) error {
	x, err := rpc(ctx, v.c, func() (string, error) {
		return v.c.l.DomainGetXMLDesc(v.dom, golibvirt.DomainXMLSecure|golibvirt.DomainXMLInactive)
	})
	if err != nil {
		return v.overlayErr(o, err, "reading the definition")
	}
	if !xmlNames(x, o.path) {
		return nil // the definition does not use it (a transient VM, or fixed by hand)
	}
	if o.base == "" {
		// A shut-off VM's XML names no backing chain: the overlay does.
		if o.base, o.format, err = backingOf(ctx, o.path); err != nil {
			return v.overlayErr(o, err, "reading the image below the overlay of shut-off disk %s", o.target)
		}
	}
	if out, err := childenv.CommandContext(ctx, "qemu-img", "commit", "-q", "-f", "qcow2", o.path).CombinedOutput(); err != nil {
		return v.overlayErr(o, fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out))), "committing the overlay of shut-off disk %s", o.target)
	}
	fixed, err := pointDiskAt(x, o)
	if err != nil {
		return v.overlayErr(o, err, "pointing disk %s back at %s", o.target, o.base)
	}
	if err := rpc0(ctx, v.c, func() error { _, err := v.c.l.DomainDefineXML(fixed); return err }); err != nil {
		return v.overlayErr(o, err, "redefining the VM with disk %s on %s", o.target, o.base)
	}
	return nil
}

// backingOf reads the backing image of the qcow2 image path, and its
// format.
func backingOf(ctx context.Context, path string) (file, format string, err error) {
	info, err := qcow2Info(ctx, path)
	if err != nil {
		return "", "", err
	}
	if info.backing == "" || info.format == "" {
		return "", "", fmt.Errorf("%s names no backing image and format", path)
	}
	return info.backing, info.format, nil
}

// imageInfo is what qemu-img info tells of a qcow2 image.
type imageInfo struct {
	size            uint64 // virtual size, in bytes
	backing, format string // the backing image and its format
}

// qcow2Info reads the header of the qcow2 image path, which may be open in
// a running VM: qemu-img reads it without a lock, and without asking that
// VM's QEMU, whose main loop also serves the guest's I/O.
func qcow2Info(ctx context.Context, path string) (imageInfo, error) {
	out, err := childenv.CommandContext(ctx, "qemu-img", "info", "-U", "--output=json", "-f", "qcow2", path).Output()
	if err != nil {
		return imageInfo{}, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	var info struct {
		Size        uint64 `json:"virtual-size"`
		Backing     string `json:"backing-filename"`
		FullBacking string `json:"full-backing-filename"`
		Format      string `json:"backing-filename-format"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return imageInfo{}, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	file := info.FullBacking
	if file == "" {
		file = info.Backing
	}
	return imageInfo{size: info.Size, backing: file, format: info.Format}, nil
}

// clearStaleOverlays merges back the overlays of def's disks that no
// running capture holds (their Kura died, or their End could not merge
// them) and removes their directories; merged says whether there were
// any (def is then out of date). An overlay of a running capture is
// another backup running: an error.
func (v *VM) clearStaleOverlays(ctx context.Context, def *domainDef) (merged bool, err error) {
	call := func(ctx context.Context, f func() error) error { return rpc0(ctx, v.c, f) }
	var ev *jobEvents // subscribed at the first overlay: most VMs have none
	defer func() { ev.stop() }()
	dirs := map[string]bool{} // locked by this call
	var errs []error
	for _, d := range def.Devices.Disks {
		p := d.path()
		dir := filepath.Dir(p)
		if !isOverlay(p) {
			continue
		}
		if _, locked := dirs[dir]; !locked {
			if f, err := os.Open(filepath.Join(dir, overlayLock)); err == nil {
				err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
				defer f.Close() // holds the lock until the directory is gone
				if err != nil {
					return false, fmt.Errorf("VM %s runs on the overlay %s of a Kura backup that is still running: another backup is running; wait for it", v.dom.Name, p)
				}
			}
			dirs[dir] = true
		}
		if ev == nil {
			ev = v.watchBlockJobs(ctx)
		}
		if err := v.mergeDown(ctx, overlay{target: d.Target.Dev, path: p}, call, ev); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return true, errors.Join(errs...)
	}
	for dir := range dirs {
		os.RemoveAll(dir)
	}
	return len(dirs) > 0, nil
}

// holdsOverlay reports whether dir holds an overlay file: a VM may still
// run on it, so it must not be swept.
func holdsOverlay(dir string) bool {
	m, _ := filepath.Glob(filepath.Join(dir, "*"+overlaySuffix))
	return len(m) > 0
}

var (
	diskElem    = regexp.MustCompile(`(?s)<disk\b.*?</disk>`)
	backingElem = regexp.MustCompile(`(?s)<backingStore\b(/>|.*</backingStore>)`)
	driverType  = regexp.MustCompile(`(<driver\b[^>]*\btype=)(['"])qcow2(['"])`)
)

// pointDiskAt rewrites a domain definition whose disk o.target names the
// overlay o.path to name the image below it (o.base, format o.format)
// again, without a backing chain (libvirt finds it again).
func pointDiskAt(domXML string, o overlay) (string, error) {
	if o.base == "" || o.format == "" {
		return "", fmt.Errorf("the image below overlay %s is not known", o.path)
	}
	var esc strings.Builder
	xml.EscapeText(&esc, []byte(o.path))
	found := false
	out := diskElem.ReplaceAllStringFunc(domXML, func(d string) string {
		if found || !xmlNames(d, o.path) {
			return d
		}
		found = true
		var base strings.Builder
		xml.EscapeText(&base, []byte(o.base))
		d = strings.ReplaceAll(d, "'"+esc.String()+"'", "'"+base.String()+"'")
		d = strings.ReplaceAll(d, `"`+esc.String()+`"`, `"`+base.String()+`"`)
		d = backingElem.ReplaceAllString(d, "")
		return driverType.ReplaceAllString(d, "${1}${2}"+o.format+"${3}")
	})
	if !found {
		return "", fmt.Errorf("no disk of the definition names %s", o.path)
	}
	return out, nil
}
