package libvirt

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/qcow2"
	"github.com/kura-backup/kura/internal/source"
	"github.com/kura-backup/kura/internal/source/image"
)

// CheckpointPrefix starts the name of every checkpoint Kura creates. Kura
// deletes only checkpoints with this prefix.
const CheckpointPrefix = "kura-"

// Reasons given in source.DiskNote.
const (
	readChanged = "changed"
	readFull    = "full"
)

// endCallTimeout bounds each libvirt call while a capture ends, so that End
// returns even when libvirtd or the VM is in trouble.
const endCallTimeout = 15 * time.Second

// capture is a point-in-time view of a VM's disks: a pull-mode backup job
// (live) or the disk files of a shut-down VM (offline).
type capture struct {
	vm     *VM
	mode   string
	method string // source.MethodFleece or MethodOverlay (live captures)
	log    *slog.Logger

	dir        string // private directory: NBD socket and scratch files
	disks      []source.Disk
	notes      []source.DiskNote
	checkpoint string // created with the backup job; "" if none
	jobStarted bool
	// overlays are the disks the overlay method put on overlays; End
	// merges them back.
	overlays []overlay
	// For tests: how many overlays End's first round merged the cheap way
	// and how many rounds it made (mergeOverlays); quickCommit replaces
	// the constant.
	layered, rounds int
	quickCommit     time.Duration
	jobWakes        int      // waits for a block job that libvirt's events ended
	lock            *os.File // held while an overlay capture runs (overlayLock)
	// iothreads: QEMU serves some of the VM's disks in an I/O thread, and
	// so the backup's NBD exports too. QEMU 7.2 (Debian 12) then aborts,
	// killing the VM, when an NBD client of the export disconnects
	// (nbd_blockdev_client_closed asserts it runs in the main loop); when
	// libvirt stops the NBD server at the end of the job, QEMU closes the
	// connections itself from the main loop. So End ends the job and
	// waits for it to be gone before it closes the connections.
	iothreads bool
	// clients are NBD connections that End closes but that are not among
	// the disks (a disk refused after it connected).
	clients []*nbd.Client

	freeze time.Duration
	// How long the backup job took to begin (for tests and diagnostics).
	beginTime            time.Duration
	freezeCall, thawCall time.Duration // parts of the freeze window (FreezeParts)
	owner                struct {
		uid, gid int
		ok       bool
	}

	mu    sync.Mutex
	pause time.Duration
	ended bool

	// End's own connection to libvirtd: set when the capture's was lost
	// (libvirtd restarted), conn0 is the capture's; lost says why libvirtd
	// could not be reached again.
	conn0 *Conn
	lost  error
}

var _ source.Capture = (*capture)(nil)

func (c *capture) Disks() []source.Disk        { return c.disks }
func (c *capture) Checkpoint() string          { return c.checkpoint }
func (c *capture) Notes() []source.DiskNote    { return c.notes }
func (c *capture) Mode() string                { return c.mode }
func (c *capture) FreezeWindow() time.Duration { return c.freeze }

// FreezeParts implements source.FreezeBreakdown.
func (c *capture) FreezeParts() source.FreezeParts {
	if c.freeze == 0 {
		return source.FreezeParts{}
	}
	return source.FreezeParts{Freeze: c.freezeCall, Instant: c.beginTime, Thaw: c.thawCall}
}

// Pause is how long the VM was paused (suspend mode) or down (shutdown
// mode: from the shutdown request until it ran again).
func (c *capture) Pause() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pause
}

// Capture takes a point-in-time view of all the VM's disks (see the
// package doc for the modes). opts.Since names the checkpoint of the
// previous backup: disks whose bitmap for it is intact are then read
// incrementally; the others, and raw disks (which cannot hold a bitmap),
// are read in full, and Notes says why. A capture of a running VM always
// creates a new checkpoint (when at least one disk is qcow2), which End
// keeps or drops.
//
// If the guest cannot be frozen in app mode, Capture fails, thaws the
// guest and leaves the VM running without a backup job or new checkpoint.
func (v *VM) Capture(ctx context.Context, opts source.CaptureOptions) (source.Capture, error) {
	switch opts.Mode {
	case "", source.ModeApp, source.ModeCrash, source.ModeSuspend, source.ModeShutdown:
	default:
		return nil, fmt.Errorf("VM %s: unknown capture mode %q: use %s, %s, %s or %s", v.dom.Name, opts.Mode,
			source.ModeApp, source.ModeCrash, source.ModeSuspend, source.ModeShutdown)
	}
	switch opts.Method {
	case "", source.MethodFleece, source.MethodOverlay:
	default:
		return nil, fmt.Errorf("VM %s: unknown capture method %q: use %s or %s", v.dom.Name, opts.Method, source.MethodFleece, source.MethodOverlay)
	}
	state, reason, err := v.stateReason(ctx)
	if err != nil {
		return nil, err
	}
	def, err := v.liveDef(ctx)
	if err != nil {
		return nil, err
	}
	// Overlays a dead Kura left go first: the disks are then the VM's own.
	if merged, err := v.clearStaleOverlays(ctx, def); err != nil {
		return nil, err
	} else if merged {
		if def, err = v.liveDef(ctx); err != nil {
			return nil, err
		}
	}
	disks := def.backupDisks()
	if len(disks) == 0 {
		return nil, fmt.Errorf("VM %s has no disks to back up (CD-ROMs and read-only disks are left out)", v.dom.Name)
	}

	switch state {
	case golibvirt.DomainRunning, golibvirt.DomainPaused, golibvirt.DomainBlocked, golibvirt.DomainPmsuspended:
	default:
		// Shut off, crashed or shutting down: its files are at rest.
		if state == golibvirt.DomainShutdown {
			return nil, fmt.Errorf("VM %s is shutting down: wait until it is off, then back it up", v.dom.Name)
		}
		if err := v.offlineAllowed(state, reason); err != nil {
			return nil, err
		}
		why := "the VM is shut off: read offline"
		if state == golibvirt.DomainShutoff && golibvirt.DomainShutoffReason(reason) == golibvirt.DomainShutoffSaved {
			why = "the VM is saved (managed save): read offline, as at a power cut (its saved memory is not backed up)"
		}
		return v.captureOffline(ctx, disks, why)
	}
	mode := opts.Mode
	switch mode {
	case source.ModeShutdown:
		return v.captureShutdown(ctx, opts)
	case "":
		mode = source.ModeCrash
		if present, _ := def.agentChannel(); present && state == golibvirt.DomainRunning {
			if v.freezer().Ping(ctx) == nil {
				mode = source.ModeApp
			}
		}
	case source.ModeApp:
		if state != golibvirt.DomainRunning {
			return nil, fmt.Errorf("VM %s is paused: its guest agent cannot freeze filesystems; resume it, or use crash mode", v.dom.Name)
		}
		if present, _ := def.agentChannel(); !present {
			return nil, fmt.Errorf("VM %s: app-consistent capture needs the guest agent, but the domain has no org.qemu.guest_agent.0 channel: add one and install qemu-guest-agent in the guest, or use crash mode", v.dom.Name)
		}
		if err := v.freezer().Ping(ctx); err != nil {
			return nil, fmt.Errorf("VM %s: app-consistent capture needs the guest agent: %w; install and start qemu-guest-agent in the guest, or use crash mode", v.dom.Name, err)
		}
	}
	return v.captureLive(ctx, def, disks, mode, state == golibvirt.DomainPaused, opts)
}

// liveDef reads and parses the domain's live XML.
func (v *VM) liveDef(ctx context.Context) (*domainDef, error) {
	x, err := rpc(ctx, v.c, func() (string, error) { return v.c.l.DomainGetXMLDesc(v.dom, 0) })
	if err != nil {
		return nil, v.errorf(err, "reading the domain XML")
	}
	def, err := parseDomain(x)
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", v.dom.Name, err)
	}
	return def, nil
}

func (v *VM) freezer() guest.Freezer {
	return guest.NewLibvirt(v.c.l, v.dom, v.c.opts.Agent)
}

// diskPlan is how one disk is read: incrementally from since, or in full.
type diskPlan struct {
	disk  diskDef
	since string // checkpoint to read changes from; "" reads in full
	// sinceBitmap is the bitmap of since for this disk, if the checkpoint
	// names one other than since.
	sinceBitmap string
	bitmap      bool   // the new checkpoint gets a bitmap for this disk
	reason      string // why the disk is read in full
}

func (v *VM) captureLive(ctx context.Context, def *domainDef, disks []diskDef, mode string, paused bool, opts source.CaptureOptions) (_ source.Capture, err error) {
	c := &capture{vm: v, mode: mode, method: opts.Method, iothreads: def.usesIOThreads(), log: opts.Logger}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.method == "" {
		c.method = source.MethodFleece
	}
	overlaid := c.method == source.MethodOverlay
	if overlaid {
		if err := v.checkOverlayable(disks); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil {
			c.End(context.WithoutCancel(ctx), false)
		}
	}()
	if err := v.clearStaleJob(ctx); err != nil {
		return nil, err
	}
	if c.dir, err = v.privateDir(def); err != nil {
		return nil, err
	}
	if overlaid {
		if err := c.lockDir(); err != nil {
			return nil, err
		}
	}
	c.owner.uid, c.owner.gid, c.owner.ok = def.qemuOwner()
	ahead := v.readNewestCheckpoint(ctx)
	// The watchdog that undoes a freeze or pause if Kura dies takes ~50 ms
	// to start: it starts now, beside the preparation, and is disarmed
	// unused if the capture fails before its instant.
	var wdc <-chan watchdogStart
	switch {
	case mode == source.ModeApp:
		wdc = v.watchdogAhead(ctx, true, false)
	case mode == source.ModeSuspend && !paused:
		wdc = v.watchdogAhead(ctx, false, true)
	}
	defer func() {
		if wdc != nil {
			if w := <-wdc; w.err == nil {
				w.wd.Disarm(context.WithoutCancel(ctx))
			}
		}
	}()
	// Creating the scratch images now, rather than letting libvirt create
	// them when the job begins, halves the time the guest stays frozen.
	if !overlaid {
		if err := c.prepareScratch(ctx, disks, 1); err != nil {
			return nil, err
		}
	}
	// Waited for in any case: its QEMU transactions must not run inside
	// the freeze.
	newest := <-ahead
	since, guessed := guessSince(opts, newest)
	if !guessed {
		if since, err = opts.SinceCheckpoint(ctx); err != nil {
			return nil, err
		}
	}
	plans, err := v.plan(ctx, disks, since, opts.Full, newest)
	if err != nil {
		return nil, err
	}
	if overlaid {
		if err := c.prepareOverlays(ctx, plans); err != nil {
			return nil, err
		}
		if err := c.overlayCheckpoint(ctx, def, plans); err != nil {
			return nil, err
		}
	}
	switch mode {
	case source.ModeApp:
		w := <-wdc
		wdc = nil
		err = c.frozen(ctx, def, plans, w)
	case source.ModeSuspend:
		if paused {
			// Someone else paused it: the instant is consistent as it is,
			// and it stays paused.
			err = c.instant(ctx, def, plans)
			break
		}
		w := <-wdc
		wdc = nil
		err = c.paused(ctx, def, plans, w)
	default:
		err = c.instant(ctx, def, plans)
	}
	if err != nil {
		return nil, err
	}
	if guessed {
		if err := v.checkGuess(ctx, disks, since, opts, newest, plans, overlaid); err != nil {
			return nil, err
		}
	}
	if overlaid {
		err = c.openOverlaid(ctx, plans)
	} else {
		err = c.openExports(ctx, plans)
	}
	if err != nil {
		return nil, err
	}
	return c, nil
}

// instant takes the point-in-time view by the capture's method.
func (c *capture) instant(ctx context.Context, def *domainDef, plans []*diskPlan) error {
	if c.method == source.MethodOverlay {
		return c.overlayInstant(ctx, def, plans)
	}
	return c.begin(ctx, def, plans)
}

// checkpointRead is a checkpoint's XML, with the sizes of its bitmaps.
type checkpointRead struct {
	name, xml string
	err       error
	kura      int // how many checkpoints of Kura's the VM has
}

// guessSince returns the checkpoint to start from, and true, when it is
// known before Parent answers and Parent would keep the capture waiting
// (source.CaptureOptions.ParentReady): Since, or none for a full read,
// or else the VM's only checkpoint of Kura's (none if it has none), which
// is its latest restore point's when that has a checkpoint the VM still
// has. checkGuess then checks it after the instant.
func guessSince(opts source.CaptureOptions, newest checkpointRead) (string, bool) {
	if opts.Parent == nil || opts.ParentReady == nil {
		return "", false
	}
	select {
	case <-opts.ParentReady:
		return "", false // as fast to ask
	default:
	}
	switch {
	case opts.Full:
		return "", true
	case opts.Since != "":
		return opts.Since, true
	case newest.err == nil && newest.kura <= 1:
		return newest.name, true
	}
	return "", false
}

// checkGuess asks Parent, once the instant is taken from the guessed
// checkpoint since (guessSince), and fixes plans if Parent names another:
// each disk is then read as it would have been had the capture waited,
// except that one the job tracks from a checkpoint other than Parent's is
// read in full. An error from Parent fails the capture, which its End
// undoes.
//
// An overlay capture (overlaid) reads any checkpoint's bitmap from the
// images below the overlays, so it simply reads as Parent says.
func (v *VM) checkGuess(ctx context.Context, disks []diskDef, since string, opts source.CaptureOptions, newest checkpointRead, plans []*diskPlan, overlaid bool) error {
	parent, err := opts.SinceCheckpoint(ctx)
	if err != nil || parent == since {
		return err
	}
	want, err := v.plan(ctx, disks, parent, opts.Full, newest)
	if err != nil {
		return err
	}
	for i, p := range plans {
		p.since, p.sinceBitmap, p.reason = want[i].since, want[i].sinceBitmap, want[i].reason
		if p.since != "" && !overlaid {
			// Not the checkpoint the job started from: its bitmap is not
			// the one exported.
			p.since = ""
			p.reason = fmt.Sprintf("the backup job started from checkpoint %s, not the latest restore point's %s", since, parent)
		}
	}
	return nil
}

// readNewestCheckpoint reads, in the background, the XML of the VM's
// newest Kura checkpoint: the one the capture most likely starts from.
// Which one it starts from is known only once the repository is open,
// after the password's key derivation, which outlasts everything else
// before the instant; reading ahead takes the 30-40 ms of this read (two
// QEMU transactions) off the critical path. The channel yields a zero
// checkpointRead when the VM has no Kura checkpoint.
func (v *VM) readNewestCheckpoint(ctx context.Context) <-chan checkpointRead {
	ch := make(chan checkpointRead, 1)
	go func() {
		var r checkpointRead
		defer func() { ch <- r }()
		cps, err := rpc(ctx, v.c, func() ([]golibvirt.DomainCheckpoint, error) {
			cps, _, err := v.c.l.DomainListAllCheckpoints(v.dom, 1, 0)
			return cps, err
		})
		if err != nil {
			r.err = err
			return
		}
		for _, cp := range cps {
			if !strings.HasPrefix(cp.Name, CheckpointPrefix) {
				continue
			}
			r.kura++
			// Kura's names sort by creation time.
			if cp.Name > r.name {
				r.name = cp.Name
			}
		}
		if r.name != "" {
			r.xml, r.err = v.checkpointXML(ctx, r.name)
		}
	}()
	return ch
}

// checkpointXML returns the XML of checkpoint name with the sizes of its
// bitmaps: XML_SIZE makes libvirt ask QEMU for each bitmap, and a disk
// whose bitmap is missing or broken gets no size.
func (v *VM) checkpointXML(ctx context.Context, name string) (string, error) {
	return rpc(ctx, v.c, func() (string, error) {
		c, err := v.c.l.DomainCheckpointLookupByName(v.dom, name, 0)
		if err != nil {
			return "", err
		}
		return v.c.l.DomainCheckpointGetXMLDesc(c, uint32(golibvirt.DomainCheckpointXMLNoDomain|golibvirt.DomainCheckpointXMLSize))
	})
}

// plan decides per disk whether it can be read incrementally. pre is a
// checkpoint read ahead (readNewestCheckpoint), used if it is since.
func (v *VM) plan(ctx context.Context, disks []diskDef, since string, full bool, pre checkpointRead) ([]*diskPlan, error) {
	plans := make([]*diskPlan, len(disks))
	for i, d := range disks {
		plans[i] = &diskPlan{disk: d, bitmap: d.format() == "qcow2"}
	}
	var cp *checkpointDef
	reason := ""
	switch {
	case full:
		reason = "full backup requested"
	case since == "":
		reason = "no checkpoint to start from (first backup)"
	default:
		var x string
		var err error
		if pre.name == since && pre.err == nil {
			x = pre.xml
		} else {
			x, err = v.checkpointXML(ctx, since)
		}
		switch {
		case libvirtCode(err) == golibvirt.ErrNoDomainCheckpoint:
			reason = fmt.Sprintf("checkpoint %s missing (VM recreated, or checkpoint deleted)", since)
		case err != nil:
			return nil, v.errorf(err, "reading checkpoint %s", since)
		default:
			if cp, err = parseCheckpoint(x); err != nil {
				return nil, fmt.Errorf("VM %s: checkpoint %s: %w", v.dom.Name, since, err)
			}
		}
	}
	for _, p := range plans {
		switch {
		case !p.bitmap:
			p.reason = fmt.Sprintf("%s disk: no persistent bitmap, so no change tracking", p.disk.format())
		case cp == nil:
			p.reason = reason
		default:
			cd, ok := cp.disk(p.disk.Target.Dev)
			switch {
			case !ok:
				p.reason = fmt.Sprintf("disk not in checkpoint %s (added since)", since)
			case cd.Checkpoint != "bitmap":
				p.reason = fmt.Sprintf("checkpoint %s has no bitmap for this disk", since)
			case cd.Size == nil:
				p.reason = fmt.Sprintf("the bitmap of checkpoint %s is missing or broken (VM killed, or disk replaced?)", since)
			default:
				p.since, p.sinceBitmap = since, cd.Bitmap
			}
		}
	}
	return plans, nil
}

// privateDir makes the capture's directory, owned by the user QEMU runs as
// (it creates the NBD socket and the scratch files there) and closed to
// everyone else. The name carries Kura's pid so that a later run can tell
// a job whose Kura died (clearStaleJob).
func (v *VM) privateDir(def *domainDef) (string, error) {
	var rnd [4]byte
	rand.Read(rnd[:])
	dir := filepath.Join(v.c.opts.ScratchDir, fmt.Sprintf("kura-%d-%s", os.Getpid(), hex.EncodeToString(rnd[:])))
	if n := len(filepath.Join(dir, "nbd.sock")); n > 100 {
		return "", fmt.Errorf("scratch directory %s: path too long for a unix socket (%d bytes): choose a shorter one", v.c.opts.ScratchDir, n)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", fmt.Errorf("creating the scratch directory for VM %s: %w (choose another one with enough space)", v.dom.Name, err)
	}
	if uid, gid, ok := def.qemuOwner(); ok && (uid != os.Geteuid() || gid != os.Getegid()) {
		if err := os.Chown(dir, uid, gid); err != nil {
			os.Remove(dir)
			return "", fmt.Errorf("handing the scratch directory %s to QEMU's user %d:%d: %w (run kura as root)", dir, uid, gid, err)
		}
	}
	return dir, nil
}

var staleDirPattern = regexp.MustCompile(`^kura-(\d+)-[0-9a-f]+$`)

// clearStaleJob ends a backup job a Kura process left behind when it died
// (its private directory names its pid), and refuses to run beside any
// other backup job.
func (v *VM) clearStaleJob(ctx context.Context) error {
	x, err := rpc(ctx, v.c, func() (string, error) { return v.c.l.DomainBackupGetXMLDesc(v.dom, 0) })
	if libvirtCode(err) == golibvirt.ErrNoDomainBackup {
		return nil
	}
	if err != nil {
		return nil // the begin will say what is wrong
	}
	b, err := parseBackup(x)
	if err != nil {
		return fmt.Errorf("VM %s: %w", v.dom.Name, err)
	}
	dir := filepath.Dir(b.Server.Socket)
	m := staleDirPattern.FindStringSubmatch(filepath.Base(dir))
	if m != nil && !exists(dir) {
		// The job of a capture that ended (End removes the directory right
		// after the abort) while libvirt still tears it down, or one whose
		// files are gone: either way nobody reads it any more. Aborting
		// again does no harm.
		_ = rpc0(ctx, v.c, func() error { return v.c.l.DomainAbortJob(v.dom) })
		c := &capture{vm: v}
		return c.waitJobGone(ctx)
	}
	if m != nil {
		pid, _ := strconv.Atoi(m[1])
		if pid != os.Getpid() && syscall.Kill(pid, 0) == syscall.ESRCH {
			if err := rpc0(ctx, v.c, func() error { return v.c.l.DomainAbortJob(v.dom) }); err != nil {
				return v.errorf(err, "ending the backup job of a Kura process (pid %d) that died", pid)
			}
			os.RemoveAll(dir)
			return nil
		}
	}
	return fmt.Errorf("VM %s already has a backup job (NBD socket %s): another backup is running; wait for it, or end it with `virsh domjobabort %s`", v.dom.Name, b.Server.Socket, v.dom.Name)
}

// newCheckpointName is "kura-" and the UTC time, so that names sort by age.
func newCheckpointName() string {
	return CheckpointPrefix + time.Now().UTC().Format("20060102T150405.000000Z")
}

// refusesIncremental reports whether libvirt refused a backup because of
// its incremental part.
func refusesIncremental(err error) bool {
	switch libvirtCode(err) {
	case golibvirt.ErrCheckpointInconsistent, golibvirt.ErrNoDomainCheckpoint, golibvirt.ErrInvalidDomainCheckpoint:
		return true
	}
	return false
}

var diskInMessage = regexp.MustCompile(`disk '([^']+)'`)

// begin starts the pull-mode backup job and the new checkpoint. When
// libvirt refuses to read a disk incrementally it reads that disk (or all,
// if it does not say which) in full instead.
func (c *capture) begin(ctx context.Context, def *domainDef, plans []*diskPlan) error {
	v := c.vm
	socket := filepath.Join(c.dir, "nbd.sock")
	for attempt := 1; ; attempt++ {
		b := backupDef{Mode: "pull"}
		b.Server.Transport, b.Server.Socket = "unix", socket
		cpDisks := map[string]bool{}
		selected := map[string]*diskPlan{}
		for _, p := range plans {
			selected[p.disk.Target.Dev] = p
		}
		for _, d := range def.Devices.Disks {
			p := selected[d.Target.Dev]
			if p == nil {
				if d.Target.Dev != "" {
					b.Disks = append(b.Disks, backupDisk{Name: d.Target.Dev, Backup: "no"})
				}
				continue
			}
			bd := backupDisk{Name: d.Target.Dev, Backup: "yes", Type: "file", BackupMode: "full"}
			if p.since != "" {
				bd.BackupMode, bd.Incremental = "incremental", p.since
			}
			bd.Scratch = &struct {
				File string `xml:"file,attr"`
			}{c.scratchPath(d.Target.Dev, attempt)}
			b.Disks = append(b.Disks, bd)
			cpDisks[d.Target.Dev] = p.bitmap
		}
		var cpXML golibvirt.OptString
		name := ""
		if slices.ContainsFunc(plans, func(p *diskPlan) bool { return p.bitmap }) {
			name = newCheckpointName()
			var all []diskDef
			for _, d := range def.Devices.Disks {
				if d.Target.Dev != "" {
					all = append(all, d)
				}
			}
			cpXML = golibvirt.OptString{checkpointXML(name, all, cpDisks)}
		}
		if attempt > 1 {
			// Retrying after a refusal, inside the freeze: new scratch
			// images.
			disks := make([]diskDef, len(plans))
			for i, p := range plans {
				disks[i] = p.disk
			}
			if err := c.prepareScratch(ctx, disks, attempt); err != nil {
				return err
			}
		}
		// Kura made the scratch images (prepareScratch) before the freeze.
		flags := golibvirt.DomainBackupBeginReuseExternal
		began := time.Now()
		err := rpc0(ctx, v.c, func() error { return v.c.l.DomainBackupBegin(v.dom, b.String(), cpXML, flags) })
		c.beginTime += time.Since(began)
		if err == nil {
			c.jobStarted, c.checkpoint = true, name
			return nil
		}
		incremental := slices.ContainsFunc(plans, func(p *diskPlan) bool { return p.since != "" })
		if !incremental || !refusesIncremental(err) {
			return v.errorf(err, "starting the backup job")
		}
		why := "libvirt refused to read it incrementally: " + err.Error()
		if m := diskInMessage.FindStringSubmatch(err.Error()); m != nil && selected[m[1]] != nil && selected[m[1]].since != "" {
			selected[m[1]].since, selected[m[1]].reason = "", why
			continue
		}
		for _, p := range plans {
			if p.since != "" {
				p.since, p.reason = "", why
			}
		}
	}
}

func (c *capture) scratchPath(target string, attempt int) string {
	return filepath.Join(c.dir, fmt.Sprintf("%s.%d.scratch", target, attempt))
}

// prepareScratch makes empty qcow2 scratch images of each disk's size for
// the given attempt to begin the job (libvirt would make them itself while
// the guest is frozen).
func (c *capture) prepareScratch(ctx context.Context, disks []diskDef, attempt int) error {
	errs := make([]error, len(disks))
	var wg sync.WaitGroup
	for i, d := range disks {
		target := d.Target.Dev
		wg.Go(func() { errs[i] = c.makeScratch(ctx, target, attempt) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// makeScratch makes the scratch image of one disk.
func (c *capture) makeScratch(ctx context.Context, target string, attempt int) error {
	v := c.vm
	capacity, err := v.capacity(ctx, target)
	if err != nil {
		return err
	}
	path := c.scratchPath(target, attempt)
	if err := qcow2.Create(path, capacity, 0o600); err != nil {
		return fmt.Errorf("VM %s: making the scratch image of disk %s: %w", v.dom.Name, target, err)
	}
	if c.owner.ok && (c.owner.uid != os.Geteuid() || c.owner.gid != os.Getegid()) {
		if err := os.Chown(path, c.owner.uid, c.owner.gid); err != nil {
			return fmt.Errorf("VM %s: handing the scratch image %s to QEMU's user: %w", v.dom.Name, path, err)
		}
	}
	return nil
}

// capacity is the virtual size of disk target, in bytes.
func (v *VM) capacity(ctx context.Context, target string) (uint64, error) {
	var capacity uint64
	err := rpc0(ctx, v.c, func() (err error) {
		_, capacity, _, err = v.c.l.DomainGetBlockInfo(v.dom, target, 0)
		return err
	})
	if err != nil {
		return 0, v.errorf(err, "reading the size of disk %s", target)
	}
	return capacity, nil
}

// watchdogStart is a thaw watchdog started, or why it did not start.
type watchdogStart struct {
	wd  *guest.Watchdog
	err error
}

// watchdogAhead starts the thaw watchdog of an app (thaw) or suspend
// (resume) capture in the background.
func (v *VM) watchdogAhead(ctx context.Context, thaw, resume bool) <-chan watchdogStart {
	ch := make(chan watchdogStart, 1)
	go func() {
		wd, err := guest.StartWatchdog(ctx, v.watchdogSpec(thaw, resume))
		ch <- watchdogStart{wd, err}
	}()
	return ch
}

// frozen begins the backup with the guest's filesystems frozen, guarded by
// the thaw watchdog w.
func (c *capture) frozen(ctx context.Context, def *domainDef, plans []*diskPlan, w watchdogStart) error {
	v := c.vm
	wd, err := w.wd, w.err
	if err != nil {
		return fmt.Errorf("VM %s: app-consistent capture: %w (the guest was not frozen)", v.dom.Name, err)
	}
	f := v.freezer()
	start := time.Now()
	_, ferr := f.Freeze(ctx)
	c.freezeCall = time.Since(start)
	if ferr != nil {
		// A freeze that failed or timed out may still take effect: thaw, and
		// have the watchdog make sure the agent says "thawed".
		f.Thaw(context.WithoutCancel(ctx))
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if werr := wd.Fire(wctx); werr != nil {
			return fmt.Errorf("VM %s: freezing the guest's filesystems: %w; making sure it is thawed: %w", v.dom.Name, ferr, werr)
		}
		return fmt.Errorf("VM %s: freezing the guest's filesystems: %w; the guest was thawed and runs on, nothing was captured: retry, or use crash mode", v.dom.Name, ferr)
	}
	berr := c.instant(ctx, def, plans)
	thawStart := time.Now()
	_, terr := f.Thaw(context.WithoutCancel(ctx))
	c.freeze = time.Since(start)
	c.thawCall = time.Since(thawStart)
	if terr != nil {
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if werr := wd.Fire(wctx); werr != nil {
			return fmt.Errorf("VM %s: thawing the guest's filesystems: %w; the watchdog could not thaw them either: %w: the guest may still be frozen: run `virsh domfsthaw %s`", v.dom.Name, terr, werr, v.dom.Name)
		}
	} else if derr := wd.Disarm(context.WithoutCancel(ctx)); errors.Is(derr, guest.ErrWatchdogFired) {
		return errors.Join(berr, fmt.Errorf("VM %s: %w: the capture is not application-consistent; retry, or raise the watchdog deadline", v.dom.Name, derr))
	}
	// Other Disarm failures do not matter: Kura thawed the guest itself.
	return berr
}

// paused begins the backup with the VM paused, guarded by the watchdog w,
// which resumes it if Kura dies.
func (c *capture) paused(ctx context.Context, def *domainDef, plans []*diskPlan, w watchdogStart) error {
	v := c.vm
	wd, err := w.wd, w.err
	if err != nil {
		return fmt.Errorf("VM %s: suspend-mode capture: %w (the VM was not paused)", v.dom.Name, err)
	}
	start := time.Now()
	if err := rpc0(ctx, v.c, func() error { return v.c.l.DomainSuspend(v.dom) }); err != nil {
		wd.Disarm(context.WithoutCancel(ctx))
		return v.errorf(err, "pausing")
	}
	berr := c.instant(ctx, def, plans)
	rerr := rpc0(context.WithoutCancel(ctx), v.c, func() error { return v.c.l.DomainResume(v.dom) })
	c.mu.Lock()
	c.pause = time.Since(start)
	c.mu.Unlock()
	if rerr != nil {
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if werr := wd.Fire(wctx); werr != nil {
			return errors.Join(berr, v.errorf(rerr, "resuming after the capture (the watchdog failed too: %v): the VM may still be paused: run `virsh resume %s`", werr, v.dom.Name))
		}
	} else if derr := wd.Disarm(context.WithoutCancel(ctx)); errors.Is(derr, guest.ErrWatchdogFired) {
		return errors.Join(berr, fmt.Errorf("VM %s: %w: the watchdog resumed the VM before the backup began; retry, or raise the watchdog deadline", v.dom.Name, derr))
	}
	return berr
}

func (v *VM) watchdogSpec(thaw, resume bool) guest.WatchdogSpec {
	return guest.WatchdogSpec{
		Libvirt: &guest.LibvirtTarget{
			Socket: v.c.socket,
			URI:    v.c.uri,
			Domain: v.dom.Name,
			UUID:   v.UUID(),
		},
		Thaw:     thaw,
		Resume:   resume,
		Deadline: v.c.opts.WatchdogDeadline,
		Timeouts: v.c.opts.Agent,
	}
}

// openExports connects to the job's NBD export of each disk.
func (c *capture) openExports(ctx context.Context, plans []*diskPlan) error {
	v := c.vm
	x, err := rpc(ctx, v.c, func() (string, error) { return v.c.l.DomainBackupGetXMLDesc(v.dom, 0) })
	if err != nil {
		return v.errorf(err, "reading the backup job's description")
	}
	job, err := parseBackup(x)
	if err != nil {
		return fmt.Errorf("VM %s: %w", v.dom.Name, err)
	}
	socket := job.Server.Socket
	for _, p := range plans {
		target := p.disk.Target.Dev
		export, bitmap := target, "backup-"+target
		for _, d := range job.Disks {
			if d.Name == target {
				if d.ExportName != "" {
					export = d.ExportName
				}
				if d.ExportBitmap != "" {
					bitmap = d.ExportBitmap
				}
			}
		}
		metas := []string{nbd.MetaBaseAllocation}
		if p.since != "" {
			metas = append(metas, nbd.MetaDirtyBitmapPrefix+bitmap)
		}
		client, err := nbd.Dial(ctx, "unix", socket, nbd.Options{ExportName: export, MetaContexts: metas})
		if err != nil {
			return fmt.Errorf("VM %s: connecting to the backup export of disk %s: %w", v.dom.Name, target, err)
		}
		granted := map[string]bool{}
		for _, mc := range client.MetaContexts() {
			granted[mc.Name] = true
		}
		if !granted[nbd.MetaBaseAllocation] {
			c.clients = append(c.clients, client) // End closes it, after the job
			return fmt.Errorf("VM %s: the backup export of disk %s offers no %s", v.dom.Name, target, nbd.MetaBaseAllocation)
		}
		d := &exportDisk{
			info: source.DiskInfo{
				Name:   target,
				Size:   client.Size(),
				Format: p.disk.format(),
				Path:   p.disk.path(),
			},
			client:  client,
			explain: c.explain,
		}
		note := source.DiskNote{Disk: target, Read: readFull, Reason: p.reason}
		switch {
		case p.since != "" && granted[nbd.MetaDirtyBitmapPrefix+bitmap]:
			c.disks = append(c.disks, &trackedDisk{exportDisk: d, bitmap: nbd.MetaDirtyBitmapPrefix + bitmap})
			note = source.DiskNote{Disk: target, Read: readChanged, Reason: "changes since checkpoint " + p.since}
		case p.since != "":
			note.Reason = fmt.Sprintf("libvirt did not export the bitmap %s", bitmap)
			fallthrough
		default:
			c.disks = append(c.disks, d)
		}
		c.notes = append(c.notes, note)
	}
	return nil
}

// explain adds to a failed read what became of the VM.
func (c *capture) explain(ctx context.Context, err error) error {
	v := c.vm
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	st, serr := v.state(ctx)
	running := func() bool { return serr == nil && (st == golibvirt.DomainRunning || st == golibvirt.DomainPaused) }
	if running() && c.jobStarted && serverClosed(err) && c.jobEnds(ctx) {
		// The job also ends when the VM stops: look again.
		if st, serr = v.state(ctx); running() {
			return fmt.Errorf("VM %s: its backup job was ended outside Kura (`virsh domjobabort`?) while Kura read it: %w: run the backup again", v.dom.Name, err)
		}
	}
	switch {
	case errors.Is(serr, source.ErrNotFound):
		return fmt.Errorf("VM %s no longer exists: %w", v.dom.Name, err)
	case serr == nil && !running():
		return fmt.Errorf("VM %s is no longer running (%s): %w: run the backup again", v.dom.Name, stateName(st), err)
	}
	return fmt.Errorf("VM %s: %w", v.dom.Name, err)
}

// serverClosed reports whether err says the NBD server closed the connection.
func serverClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// jobEnds reports whether the VM's backup job ends within ctx. libvirt stops
// the job's NBD server a moment before it drops the job itself.
func (c *capture) jobEnds(ctx context.Context) bool {
	v := c.vm
	for {
		_, err := rpc(ctx, v.c, func() (string, error) { return v.c.l.DomainBackupGetXMLDesc(v.dom, 0) })
		if libvirtCode(err) == golibvirt.ErrNoDomainBackup {
			return true
		}
		if err != nil {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func stateName(s golibvirt.DomainState) string {
	switch s {
	case golibvirt.DomainRunning:
		return "running"
	case golibvirt.DomainBlocked:
		return "blocked"
	case golibvirt.DomainPaused:
		return "paused"
	case golibvirt.DomainShutdown:
		return "shutting down"
	case golibvirt.DomainShutoff:
		return "shut off"
	case golibvirt.DomainCrashed:
		return "crashed"
	case golibvirt.DomainPmsuspended:
		return "suspended by guest power management"
	}
	return fmt.Sprintf("state %d", s)
}

// offlineAllowed refuses to read the disks of a VM that is shut off here
// because it was migrated to another host: with shared storage, the
// definition left behind (a migration without --undefinesource) names the
// disks the VM is writing there, and reading them would make a torn copy
// that looks like a clean offline one.
func (v *VM) offlineAllowed(state golibvirt.DomainState, reason int32) error {
	if state == golibvirt.DomainShutoff && golibvirt.DomainShutoffReason(reason) == golibvirt.DomainShutoffMigrated {
		return fmt.Errorf("VM %s was migrated to another host (this host keeps only its definition): back it up on the host it runs on, or remove the definition here with `virsh undefine %s`", v.dom.Name, v.dom.Name)
	}
	return nil
}

// captureOffline reads the disk files of a VM that is shut off, in full
// (checkpoints need a running VM); why is each disk's note.
func (v *VM) captureOffline(ctx context.Context, disks []diskDef, why string) (_ source.Capture, err error) {
	c := &capture{vm: v, mode: source.ModeShutdown}
	for _, d := range disks {
		if d.path() == "" {
			return nil, fmt.Errorf("VM %s: disk %s is a %s disk, not a local file or device: it can only be read while the VM runs (use app, crash or suspend mode)", v.dom.Name, d.Target.Dev, d.Type)
		}
	}
	defer func() {
		if err != nil {
			c.End(context.WithoutCancel(ctx), false)
		}
	}()
	for _, d := range disks {
		disk, err := image.Open(ctx, d.path(), image.Options{Format: d.format()})
		if err != nil {
			return nil, fmt.Errorf("VM %s: opening disk %s offline: %w", v.dom.Name, d.Target.Dev, err)
		}
		c.disks = append(c.disks, &offlineDisk{Disk: disk, name: d.Target.Dev})
		c.notes = append(c.notes, source.DiskNote{Disk: d.Target.Dev, Read: readFull, Reason: why})
	}
	return c, nil
}

// captureShutdown is shutdown mode: the guest shuts down cleanly, the VM
// is started again paused, the backup job takes its instant before the
// guest runs a single instruction, and the VM resumes. The disks are read
// from the job's export while the guest boots, so the downtime is the
// shutdown and the boot, not the copy; and the capture keeps the
// checkpoint chain, so only blocks changed since the last backup are read.
// A watchdog resumes the VM if kura dies while it is paused.
func (v *VM) captureShutdown(ctx context.Context, opts source.CaptureOptions) (_ source.Capture, err error) {
	// An offline capture reads in full; Parent is asked only so that its
	// error stops the capture before the VM goes down.
	if _, err := opts.SinceCheckpoint(ctx); err != nil {
		return nil, err
	}
	requested := time.Now()
	if err := v.shutdown(ctx); err != nil {
		return nil, err
	}
	wd, err := guest.StartWatchdog(ctx, v.watchdogSpec(false, true))
	if err != nil {
		// The VM is off: start it again without a backup rather than leave it down.
		serr := rpc0(context.WithoutCancel(ctx), v.c, func() error { return v.c.l.DomainCreate(v.dom) })
		if serr != nil {
			return nil, fmt.Errorf("VM %s: shutdown-mode capture: %w; starting it again failed too: %w: start it with `virsh start %s`", v.dom.Name, err, serr, v.dom.Name)
		}
		return nil, fmt.Errorf("VM %s: shutdown-mode capture: %w (the VM was started again, nothing was captured)", v.dom.Name, err)
	}
	resumed := false
	resume := func() error {
		if resumed {
			return nil
		}
		err := rpc0(context.WithoutCancel(ctx), v.c, func() error { return v.c.l.DomainResume(v.dom) })
		if err != nil {
			wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			if werr := wd.Fire(wctx); werr != nil {
				return v.errorf(err, "resuming it after the shutdown-mode capture (the watchdog failed too: %v): run `virsh resume %s`", werr, v.dom.Name)
			}
		} else {
			wd.Disarm(context.WithoutCancel(ctx))
		}
		resumed = true
		return nil
	}
	_, err = rpc(ctx, v.c, func() (golibvirt.Domain, error) {
		return v.c.l.DomainCreateWithFlags(v.dom, uint32(golibvirt.DomainStartPaused))
	})
	if err != nil {
		wd.Disarm(context.WithoutCancel(ctx))
		return nil, v.errorf(err, "starting it again (paused) after shutting it down for the backup: it is off now: start it with `virsh start %s`", v.dom.Name)
	}
	defer func() {
		if rerr := resume(); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()
	liveXML, err := rpc(ctx, v.c, func() (string, error) { return v.c.l.DomainGetXMLDesc(v.dom, 0) })
	if err != nil {
		return nil, v.errorf(err, "reading the domain XML after starting it again")
	}
	def, err := parseDomain(liveXML)
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", v.dom.Name, err)
	}
	sc, err := v.captureLive(ctx, def, def.backupDisks(), source.ModeShutdown, true, opts)
	if err != nil {
		return nil, err
	}
	c := sc.(*capture)
	if rerr := resume(); rerr != nil {
		c.End(context.WithoutCancel(ctx), false)
		return nil, rerr
	}
	c.mu.Lock()
	c.pause = time.Since(requested)
	c.mu.Unlock()
	return c, nil
}

// shutdown asks the guest to shut down and waits until it is off.
func (v *VM) shutdown(ctx context.Context) error {
	persistent, err := rpc(ctx, v.c, func() (int32, error) { return v.c.l.DomainIsPersistent(v.dom) })
	if err != nil {
		return v.errorf(err, "checking that it is defined")
	}
	if persistent == 0 {
		return fmt.Errorf("VM %s is transient (not defined): shutdown mode could not start it again; define it, or use another mode", v.dom.Name)
	}
	start := time.Now()
	// Through the guest agent when it answers, else the ACPI power button.
	// The agent's shutdown command often "fails" because the guest kills
	// the agent while it shuts down: an error only shortens the wait.
	reqErr := rpc0(ctx, v.c, func() error {
		return v.c.l.DomainShutdownFlags(v.dom, golibvirt.DomainShutdownGuestAgent|golibvirt.DomainShutdownAcpiPowerBtn)
	})
	timeout := v.c.opts.ShutdownTimeout
	if reqErr != nil {
		timeout = min(timeout, 30*time.Second)
	}
	for {
		st, err := v.state(ctx)
		if err != nil {
			return err
		}
		if st == golibvirt.DomainShutoff {
			return nil
		}
		if time.Since(start) > timeout {
			why := ""
			if reqErr != nil {
				why = fmt.Sprintf(" (the request failed: %v)", reqErr)
			}
			return fmt.Errorf("VM %s did not shut down within %s%s; it is %s, nothing was captured, and the guest may still act on the request and shut down (start it with `virsh start %s`): check that it runs qemu-guest-agent or handles the ACPI power button, or use another mode", v.dom.Name, timeout, why, stateName(st), v.dom.Name)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("VM %s: waiting for the guest to shut down: %w (the shutdown request stands)", v.dom.Name, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// End releases the capture: it disconnects from the exports, ends the
// backup job, keeps or drops checkpoints (ok: the new checkpoint stays and
// Kura's older ones go; not ok: the new one goes, so the previous one still
// covers every change since it) and removes the private directory. It
// does what it can when the VM is gone, and each libvirt call is bounded, so it never hangs.
func (c *capture) End(ctx context.Context, ok bool) error {
	c.mu.Lock()
	if c.ended {
		c.mu.Unlock()
		return nil
	}
	c.ended = true
	c.mu.Unlock()
	v := c.vm
	var errs []error
	closeDisks := func() {
		for _, d := range c.disks {
			if err := d.Close(); err != nil && !errors.Is(err, nbd.ErrClosed) {
				errs = append(errs, fmt.Errorf("VM %s: closing disk %s: %w", v.dom.Name, d.Info().Name, err))
			}
		}
		for _, cl := range c.clients {
			cl.Close()
		}
	}
	// See capture.iothreads: then the connections close after the job.
	closeLate := c.iothreads && c.jobStarted
	if !closeLate {
		closeDisks()
	}
	gone := false
	dropped := false
	// Overlays are merged back before anything else; until they are, their
	// files hold the guest's latest writes and the checkpoints stay.
	merged := true
	if len(c.overlays) > 0 {
		var err error
		if merged, err = c.mergeOverlays(ctx); err != nil {
			errs = append(errs, err)
		}
		// A VM that was shut off (its overlays merged offline) or is gone
		// has no checkpoint libvirt lets Kura delete now; the next good
		// backup drops the older ones.
		if st, err := v.state(ctx); errors.Is(err, source.ErrNotFound) || (err == nil && st == golibvirt.DomainShutoff) {
			gone = true
		}
	}
	if ok && c.jobStarted && c.checkpoint != "" {
		// Older checkpoints go while the job still runs: deleting one
		// needs libvirt's job lock, which the job's teardown holds for a
		// while after the abort below.
		if err := c.dropOlderCheckpoints(ctx); err != nil && !c.vmGone(ctx, err) {
			errs = append(errs, err)
		}
		dropped = true
	}
	if c.jobStarted {
		err := c.endCall(ctx, func() error { return v.c.l.DomainAbortJob(v.dom) })
		switch {
		case err == nil:
		case golibvirt.IsNotFound(err):
			gone = true
		case libvirtCode(err) == golibvirt.ErrOperationInvalid:
			// "domain is not running" or "no job is active": nothing to end.
			if st, serr := v.state(ctx); serr != nil || st == golibvirt.DomainShutoff {
				gone = true
			}
		default:
			errs = append(errs, v.errorf(err, "ending the backup job (end it with `virsh domjobabort %s`)", v.dom.Name))
		}
		// After a good backup libvirt finishes tearing the job down on its
		// own (about 80 ms: the NBD server and the scratch nodes); the next
		// capture of this VM waits for it (clearStaleJob). A failed one
		// waits here, to delete its checkpoint, and so does one whose
		// NBD connections must outlive the NBD server (c.iothreads).
		if !gone && err == nil && (!ok || c.iothreads) {
			if err := c.waitJobGone(ctx); err != nil {
				errs = append(errs, err)
			}
		}
		if closeLate {
			closeDisks()
		}
	}
	if c.checkpoint != "" && !gone && c.lost == nil && !dropped && merged {
		var err error
		if ok {
			err = c.dropOlderCheckpoints(ctx)
		} else {
			err = c.deleteCheckpoint(ctx, c.checkpoint)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	if c.dir != "" && merged {
		if err := os.RemoveAll(c.dir); err != nil {
			errs = append(errs, fmt.Errorf("VM %s: removing the scratch directory: %w", v.dom.Name, err))
		}
	}
	if c.lock != nil {
		c.lock.Close()
	}
	if c.conn0 != nil {
		v.c.Close()
		v.c = c.conn0
	}
	return errors.Join(errs...)
}

// vmGone reports whether err, from a call during End, came from the VM
// being gone or shut off: then it has no job and no checkpoints to settle.
func (c *capture) vmGone(ctx context.Context, err error) bool {
	if errors.Is(err, source.ErrNotFound) {
		return true
	}
	if c.lost != nil {
		return false
	}
	st, serr := c.vm.state(ctx)
	return errors.Is(serr, source.ErrNotFound) || (serr == nil && st == golibvirt.DomainShutoff)
}

// waitJobGone waits until libvirt has torn the aborted backup job down
// (virDomainAbortJob only starts that: QEMU cancels the block jobs
// asynchronously).
func (c *capture) waitJobGone(ctx context.Context) error {
	v := c.vm
	pause := 2 * time.Millisecond
	for deadline := time.Now().Add(endCallTimeout); ; {
		err := c.endCall(ctx, func() error {
			_, err := v.c.l.DomainBackupGetXMLDesc(v.dom, 0)
			return err
		})
		switch {
		case libvirtCode(err) == golibvirt.ErrNoDomainBackup, golibvirt.IsNotFound(err), libvirtCode(err) == golibvirt.ErrOperationInvalid:
			return nil
		case time.Now().After(deadline) || ctx.Err() != nil:
			return fmt.Errorf("VM %s: the backup job was still ending %s after it was aborted: %v", v.dom.Name, endCallTimeout, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(pause):
		}
		// QEMU usually tears the job down within a few milliseconds.
		pause = min(2*pause, 50*time.Millisecond)
	}
}

// endCall runs one libvirt call during End with its own bound. When the
// connection to libvirtd was lost (libvirtd restarted while Kura read the
// disks: it keeps the backup job and the checkpoints), it reconnects and
// calls again.
func (c *capture) endCall(ctx context.Context, f func() error) error {
	if c.lost != nil {
		return c.lost
	}
	call := func() error {
		ctx, cancel := context.WithTimeout(ctx, endCallTimeout)
		defer cancel()
		return rpc0(ctx, c.vm.c, f)
	}
	err := call()
	// go-libvirt fails calls on a closed connection with EINVAL.
	if err == nil || (!errors.Is(err, syscall.EINVAL) && c.vm.c.l.IsConnected()) {
		return err
	}
	if c.lost = c.reconnect(ctx); c.lost != nil {
		return c.lost
	}
	return call()
}

// reconnect gives the capture's VM a new connection to libvirtd for the
// rest of End (End puts the old one back), waiting up to endCallTimeout
// for libvirtd to answer again.
func (c *capture) reconnect(ctx context.Context) error {
	v := c.vm
	ctx, cancel := context.WithTimeout(ctx, endCallTimeout)
	defer cancel()
	for {
		nc, err := ConnectWithOptions(ctx, v.c.socket, v.c.opts)
		if err == nil {
			if c.conn0 == nil {
				c.conn0 = v.c
			} else {
				v.c.Close()
			}
			v.c = nc
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the connection to libvirtd was lost, and libvirtd did not answer again within %s: %w", endCallTimeout, err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// deleteCheckpoint deletes one checkpoint; libvirt merges its bitmap into
// its parent's as needed. A checkpoint whose bitmap is gone from a disk
// cannot be deleted that way: then only its metadata is.
func (c *capture) deleteCheckpoint(ctx context.Context, name string) error {
	v := c.vm
	cp := golibvirt.DomainCheckpoint{Name: name, Dom: v.dom}
	var err error
	// Right after the job ends libvirt may still hold the domain's job lock.
	for deadline := time.Now().Add(10 * time.Second); ; {
		err = c.endCall(ctx, func() error { return v.c.l.DomainCheckpointDelete(cp, 0) })
		if err == nil || libvirtCode(err) == golibvirt.ErrNoDomainCheckpoint || golibvirt.IsNotFound(err) {
			return nil
		}
		if libvirtCode(err) != golibvirt.ErrOperationInvalid && libvirtCode(err) != golibvirt.ErrOperationTimeout || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if code := libvirtCode(err); code == golibvirt.ErrCheckpointInconsistent ||
		(code == golibvirt.ErrInternalError && strings.Contains(err.Error(), "bitmap")) {
		merr := c.endCall(ctx, func() error {
			return v.c.l.DomainCheckpointDelete(cp, golibvirt.DomainCheckpointDeleteMetadataOnly)
		})
		if merr == nil {
			return nil
		}
		err = errors.Join(err, merr)
	}
	return v.errorf(err, "deleting checkpoint %s", name)
}

// dropOlderCheckpoints deletes Kura's checkpoints created before the new
// one, oldest first.
func (c *capture) dropOlderCheckpoints(ctx context.Context) error {
	v := c.vm
	var cps []golibvirt.DomainCheckpoint
	err := c.endCall(ctx, func() (err error) {
		cps, _, err = v.c.l.DomainListAllCheckpoints(v.dom, 1, 0)
		return err
	})
	if err != nil {
		return v.errorf(err, "listing checkpoints")
	}
	type aged struct {
		name string
		time int64
	}
	var mine *aged
	var kura []aged
	for _, cp := range cps {
		if !strings.HasPrefix(cp.Name, CheckpointPrefix) {
			continue
		}
		var x string
		err := c.endCall(ctx, func() (err error) {
			x, err = v.c.l.DomainCheckpointGetXMLDesc(cp, uint32(golibvirt.DomainCheckpointXMLNoDomain))
			return err
		})
		if err != nil {
			return v.errorf(err, "reading checkpoint %s", cp.Name)
		}
		def, err := parseCheckpoint(x)
		if err != nil {
			return fmt.Errorf("VM %s: checkpoint %s: %w", v.dom.Name, cp.Name, err)
		}
		a := aged{cp.Name, def.CreationTime}
		if cp.Name == c.checkpoint {
			mine = &a
			continue
		}
		kura = append(kura, a)
	}
	if mine == nil {
		return fmt.Errorf("VM %s: the new checkpoint %s is gone", v.dom.Name, c.checkpoint)
	}
	older := func(a aged) bool {
		return a.time < mine.time || (a.time == mine.time && a.name < mine.name)
	}
	slices.SortFunc(kura, func(a, b aged) int {
		if a.time != b.time {
			return int(a.time - b.time)
		}
		return strings.Compare(a.name, b.name)
	})
	var errs []error
	for _, a := range kura {
		if older(a) {
			if err := c.deleteCheckpoint(ctx, a.name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// ClearStale ends backup jobs that dead Kura processes left on the VM,
// merges back the overlays they left it running on, and removes their
// scratch directories (the daemon calls it when it starts, after a
// crash). A backup of a live process is left alone.
func (v *VM) ClearStale(ctx context.Context) error {
	running := func(err error) bool { return err != nil && strings.Contains(err.Error(), "another backup is running") }
	// A domain XML that cannot be read leaves nothing to merge here; the
	// next capture says what is wrong.
	if def, err := v.liveDef(ctx); err == nil {
		if _, err := v.clearStaleOverlays(ctx, def); err != nil && !running(err) {
			return err
		}
	}
	if err := v.clearStaleJob(ctx); err != nil && !running(err) {
		return err
	}
	return nil
}

// SweepScratch removes scratch directories in dir left by Kura processes
// that no longer run, and returns them. A directory holding an overlay
// stays: a VM may still run on it, and clearing that VM (ClearStale, or
// its next capture) merges it back and removes the directory.
func SweepScratch(dir string) []string {
	if dir == "" {
		dir = "/var/tmp"
	}
	ents, _ := os.ReadDir(dir)
	var removed []string
	for _, e := range ents {
		m := staleDirPattern.FindStringSubmatch(e.Name())
		if m == nil || !e.IsDir() {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		p := filepath.Join(dir, e.Name())
		if pid != os.Getpid() && syscall.Kill(pid, 0) == syscall.ESRCH && !holdsOverlay(p) {
			if os.RemoveAll(p) == nil {
				removed = append(removed, p)
			}
		}
	}
	return removed
}

// exists reports whether path exists.
func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
