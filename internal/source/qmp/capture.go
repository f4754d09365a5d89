package qmp

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kura-backup/kura/internal/guest"
	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/qcow2"
	"github.com/kura-backup/kura/internal/source"
	"golang.org/x/sys/unix"
)

// ErrShutdownMode is returned by Capture for source.ModeShutdown: shutting
// a plain QEMU guest down and starting it again needs its command line and
// a process manager, which only libvirt has.
var ErrShutdownMode = errors.New("shutdown mode needs libvirt: a plain QEMU process cannot be restarted by kura; use app, crash or suspend")

// Names of what a capture creates inside QEMU. Leftovers with these
// prefixes (from a kura that died mid-backup) are removed by the next
// Capture; nothing else in QEMU is touched.
const (
	bitmapPrefix = "kura-"    // persistent dirty bitmaps: kura-CHECKPOINT
	nodePrefix   = "kura-fl"  // fleecing nodes: kura-fl0, with file child kura-fl0-file
	filterPrefix = "kura-cbw" // the jobs' copy-before-write filters
	jobPrefix    = "kura-job" // blockdev-backup jobs
	exportPrefix = "kura-exp" // NBD exports
	dirPrefix    = "kura-qmp-"
)

// Timeouts of the steps of a capture.
const (
	// instantTimeout bounds the transaction (and stop or cont around it).
	instantTimeout = 30 * time.Second
	// endTimeout bounds End when its context has no deadline.
	endTimeout = 2 * time.Minute
	// settleTimeout bounds the wait for a cancelled job or deleted export
	// to go away.
	settleTimeout = 15 * time.Second
	pollInterval  = 20 * time.Millisecond
)

// capture is a point-in-time view of a VM's disks, exported by QEMU.
type capture struct {
	c          *Client
	vmName     string
	dir        string // private scratch directory
	nbdSocket  string
	checkpoint string // "" when no disk tracks changes
	since      string // the checkpoint whose bitmap is read, if any
	mode       string
	freeze     time.Duration
	parts      source.FreezeParts // of freeze
	pause      time.Duration
	disks      []*disk
	notes      []source.DiskNote

	committed     bool // the transaction ran: bitmaps and jobs exist
	serverStarted bool

	// The watcher ends the capture early when the scratch directory fills
	// up (see watch).
	stopWatch chan struct{}
	watchDone chan struct{}
	mu        sync.Mutex
	broken    error // why the capture was ended early, nil if it was not

	endOnce sync.Once
	endErr  error
}

// disk is one disk of a capture: its plan inside QEMU and its reader.
type disk struct {
	cp   *capture
	info source.DiskInfo
	node string // the disk's format node, source of the backup job
	idx  int

	fleeceNode, fleeceFile, filter, job, export, imagePath string

	track     bool     // a new bitmap kura-CHECKPOINT is added (qcow2)
	readSince bool     // changes are read from bitmap kura-SINCE
	stale     []string // other kura-* bitmaps, removed once a backup succeeds
	repair    []string // enabled kura-* bitmaps merged into a disabled SINCE first

	client *nbd.Client
}

// trackedDisk is a disk whose changes since the base checkpoint are
// known; only such disks implement source.ChangeTracker.
type trackedDisk struct{ *disk }

func (v *vm) Capture(ctx context.Context, opts source.CaptureOptions) (_ source.Capture, err error) {
	switch opts.Mode {
	case "", source.ModeApp, source.ModeCrash, source.ModeSuspend:
	case source.ModeShutdown:
		return nil, fmt.Errorf("capturing %s: %w", v.name, ErrShutdownMode)
	default:
		return nil, fmt.Errorf("capturing %s: unknown mode %q: use app, crash or suspend", v.name, opts.Mode)
	}
	if opts.Method != "" && opts.Method != source.MethodFleece {
		return nil, fmt.Errorf("capturing %s: the qmp driver captures only with method %s, not %q: use the libvirt driver for %s", v.name, source.MethodFleece, opts.Method, source.MethodOverlay)
	}
	since, err := opts.SinceCheckpoint(ctx)
	if err != nil {
		return nil, err
	}
	if since != "" && !validCheckpoint(since) {
		return nil, fmt.Errorf("capturing %s: checkpoint name %q is not one kura makes", v.name, since)
	}
	c, err := Dial(ctx, v.socket)
	if err != nil {
		return nil, fmt.Errorf("capturing %s: %w", v.name, err)
	}
	cp := &capture{c: c, vmName: v.name, checkpoint: newCheckpointName()}
	ok := false
	defer func() {
		if !ok {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), endTimeout)
			defer cancel()
			if rerr := cp.release(rctx, false); rerr != nil {
				err = fmt.Errorf("%w\n(and undoing the capture failed, so parts of it may remain in QEMU until the next capture removes them: %v)", err, rerr)
			}
			c.Close()
		}
	}()
	if err := cp.setup(ctx, v, opts, since); err != nil {
		return nil, fmt.Errorf("capturing %s: %w", v.name, err)
	}
	ok = true
	return cp, nil
}

// setup does the work of Capture.
func (cp *capture) setup(ctx context.Context, v *vm, opts source.CaptureOptions, since string) error {
	c := cp.c
	if v := c.Greeting().Version.QEMU; v.Major < 5 || v.Major == 5 && v.Minor < 2 {
		return fmt.Errorf("QEMU %s is too old: live capture needs QEMU 5.2 or later (block-export-add)", c.Greeting().VersionString())
	}
	st, err := queryStatus(ctx, c)
	if err != nil {
		return err
	}
	switch st.Status {
	case "inmigrate", "postmigrate", "finish-migrate", "save-vm", "restore-vm":
		// The disks are inactive: another QEMU owns them, or will.
		return fmt.Errorf("the VM is %s: its disks are not active here; back it up where it runs", st.Status)
	}
	if err := cleanStale(ctx, c); err != nil {
		return fmt.Errorf("removing what an earlier, interrupted capture left in QEMU: %w", err)
	}
	if err := cp.discover(ctx, opts, since); err != nil {
		return err
	}
	if len(cp.disks) == 0 {
		return fmt.Errorf("the VM has no writable disk with an image inserted")
	}

	// Consistency mode: app if the agent answers (unless crash or
	// suspend was asked for).
	var freezer guest.Freezer
	var agentPath string
	cp.mode = opts.Mode
	if !st.Running && cp.mode == source.ModeApp {
		return fmt.Errorf("app mode: the VM is %s, so its guest agent cannot freeze anything; use crash mode", st.Status)
	}
	if !st.Running && cp.mode == "" {
		cp.mode = source.ModeCrash
	}
	if cp.mode == "" || cp.mode == source.ModeApp {
		agentPath = v.opts.AgentSocket
		if agentPath == "" {
			if agentPath, err = agentSocket(ctx, c); err != nil {
				return err
			}
		}
		switch {
		case agentPath == "" && cp.mode == source.ModeApp:
			return fmt.Errorf("app mode needs the guest agent: the VM has no virtserialport org.qemu.guest_agent.0 on a unix socket chardev (pass its socket in Options.AgentSocket, or use crash mode)")
		case agentPath == "":
			cp.mode = source.ModeCrash
		default:
			freezer = guest.NewSocket(agentPath, v.opts.Agent)
			if err := freezer.Ping(ctx); err != nil {
				if cp.mode == source.ModeApp {
					return fmt.Errorf("app mode: %w (is qemu-guest-agent running in the guest? or use crash mode)", err)
				}
				cp.mode = source.ModeCrash
			} else {
				cp.mode = source.ModeApp
			}
		}
	}

	if err := cp.makeScratch(ctx, v.opts.ScratchDir); err != nil {
		return err
	}
	for _, d := range cp.disks {
		if err := d.addFleeceNode(ctx); err != nil {
			return err
		}
	}
	for _, d := range cp.disks {
		if err := d.repairSince(ctx); err != nil {
			return err
		}
	}

	actions := cp.transactionActions()
	c.Events() // only events from the instant on matter
	switch cp.mode {
	case source.ModeCrash:
		err = cp.transaction(ctx, actions)
	case source.ModeSuspend:
		err = cp.suspended(ctx, v, st.Running, actions)
	case source.ModeApp:
		err = cp.frozen(ctx, freezer, agentPath, v.opts, actions)
	}
	if err != nil {
		return err
	}
	cp.stopWatch, cp.watchDone = make(chan struct{}), make(chan struct{})
	go cp.watch()
	return cp.export(ctx)
}

// discover lists the VM's disks and decides for each how it is read.
func (cp *capture) discover(ctx context.Context, opts source.CaptureOptions, since string) error {
	blocks, err := queryBlock(ctx, cp.c)
	if err != nil {
		return err
	}
	used := map[string]bool{}
	for _, b := range blocks {
		in := b.Inserted
		if in == nil || in.RO {
			continue // empty drive, or a read-only medium (CD-ROM image)
		}
		if in.Drv == "copy-before-write" || in.Drv == "backup-top" {
			return fmt.Errorf("disk %s is already being backed up by another block job (%s filter %s); end that job first", blockName(b), in.Drv, in.NodeName)
		}
		if in.NodeName == "" {
			return fmt.Errorf("disk %s has no block node name; QEMU too old (kura needs 2.9 or later)", blockName(b))
		}
		name := blockName(b)
		if name == "" || used[name] {
			name = fmt.Sprintf("disk%d", len(cp.disks))
		}
		used[name] = true
		i := len(cp.disks)
		d := &disk{
			cp:         cp,
			idx:        i,
			node:       in.NodeName,
			fleeceNode: nodePrefix + strconv.Itoa(i),
			fleeceFile: nodePrefix + strconv.Itoa(i) + "-file",
			filter:     filterPrefix + strconv.Itoa(i),
			job:        jobPrefix + strconv.Itoa(i),
			export:     exportPrefix + strconv.Itoa(i),
			info: source.DiskInfo{
				Name:   name,
				Size:   in.Image.VirtualSize,
				Format: in.Drv,
				Path:   in.Image.Filename,
			},
		}
		if d.info.Path == "" {
			d.info.Path = in.File
		}
		note := source.DiskNote{Disk: name, Read: "full"}
		switch {
		case in.Drv == "raw":
			note.Reason = "raw image: no persistent dirty bitmap"
		case in.Drv != "qcow2":
			note.Reason = fmt.Sprintf("%s node: persistent dirty bitmaps need a qcow2 image", in.Drv)
		case in.Image.qcow2v2():
			note.Reason = "qcow2 version 2 image (compat=0.10): no persistent dirty bitmap; upgrade with qemu-img amend -o compat=1.1 while the VM is off"
		default:
			d.track = true
			var sinceBM *dirtyBitmapInfo
			for j, bm := range in.DirtyBitmaps {
				if !strings.HasPrefix(bm.Name, bitmapPrefix) {
					continue
				}
				if since != "" && bm.Name == bitmapPrefix+since {
					sinceBM = &in.DirtyBitmaps[j]
					continue
				}
				d.stale = append(d.stale, bm.Name)
			}
			switch {
			case opts.Full:
				note.Reason = "full backup requested"
			case since == "":
				note.Reason = "no checkpoint"
			case sinceBM == nil:
				note.Reason = fmt.Sprintf("checkpoint %s missing (no bitmap %s%s on node %s: VM restarted without it, or disk replaced)", since, bitmapPrefix, since, in.NodeName)
			case sinceBM.Inconsistent:
				note.Reason = fmt.Sprintf("checkpoint %s unusable: bitmap %s%s is inconsistent (QEMU stopped without saving it)", since, bitmapPrefix, since)
				d.stale = append(d.stale, sinceBM.Name)
			case sinceBM.Busy:
				note.Reason = fmt.Sprintf("checkpoint %s unusable: bitmap %s%s is in use by another operation", since, bitmapPrefix, since)
			case !sinceBM.Recording:
				// Left disabled by a capture that never ended: the
				// enabled kura bitmaps hold the changes since then.
				for _, bm := range in.DirtyBitmaps {
					if strings.HasPrefix(bm.Name, bitmapPrefix) && bm.Name != sinceBM.Name && bm.Recording && !bm.Inconsistent && !bm.Busy {
						d.repair = append(d.repair, bm.Name)
					}
				}
				if len(d.repair) == 0 {
					note.Reason = fmt.Sprintf("checkpoint %s unusable: bitmap %s%s was disabled and no kura bitmap recorded the changes since", since, bitmapPrefix, since)
					d.stale = append(d.stale, sinceBM.Name)
					break
				}
				fallthrough
			default:
				d.readSince = true
				note = source.DiskNote{Disk: name, Read: "changed"}
			}
		}
		cp.notes = append(cp.notes, note)
		cp.disks = append(cp.disks, d)
	}
	anyTrack := false
	for _, d := range cp.disks {
		if d.track {
			anyTrack = true
		}
		if d.readSince {
			cp.since = since
		}
	}
	if !anyTrack {
		cp.checkpoint = ""
	}
	return nil
}

// blockName names a disk after its device's qdev id ("vda" for -device
// virtio-blk-pci,id=vda), else the drive's name (-drive id=...), else its
// node name; "" when it has none of them.
func blockName(b blockInfo) string {
	if q := b.QDev; q != "" {
		if rest, ok := strings.CutPrefix(q, "/machine/peripheral/"); ok {
			if id, _, _ := strings.Cut(rest, "/"); id != "" {
				return id
			}
		} else if !strings.HasPrefix(q, "/") {
			return q
		}
	}
	if b.Device != "" {
		return b.Device
	}
	if b.Inserted != nil && !strings.HasPrefix(b.Inserted.NodeName, "#") {
		return b.Inserted.NodeName
	}
	return ""
}

// newCheckpointName is a new checkpoint's name: the UTC time and a random
// suffix, so that names sort by time and never repeat.
func newCheckpointName() string {
	var b [3]byte
	rand.Read(b[:])
	return time.Now().UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(b[:])
}

// validCheckpoint accepts names of the shape newCheckpointName makes, and
// other short names of safe characters.
func validCheckpoint(s string) bool {
	if s == "" || len(s) > 200 {
		return false
	}
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.', r == ':':
		default:
			return false
		}
	}
	return true
}

// makeScratch creates the capture's private directory and one empty qcow2
// fleecing image per disk, owned by QEMU's user so that QEMU can write them.
func (cp *capture) makeScratch(ctx context.Context, parent string) error {
	if parent == "" {
		parent = os.TempDir()
	}
	dir, err := os.MkdirTemp(parent, dirPrefix)
	if err != nil {
		return fmt.Errorf("creating the scratch directory for fleecing images: %w", err)
	}
	cp.dir = dir
	cp.nbdSocket = filepath.Join(dir, "nbd.sock")
	if len(cp.nbdSocket) > 107 {
		return fmt.Errorf("scratch directory %s: the NBD socket path %s is longer than unix sockets allow (107 bytes): choose a shorter scratch directory", parent, cp.nbdSocket)
	}
	uid, gid := cp.c.peerUID, cp.c.peerGID
	chown := cp.c.peerPID > 0 && uid != os.Geteuid()
	if chown {
		if err := os.Chown(dir, uid, gid); err != nil {
			return fmt.Errorf("giving the scratch directory %s to QEMU's user %d: %w", dir, uid, err)
		}
	}
	for _, d := range cp.disks {
		d.imagePath = filepath.Join(dir, fmt.Sprintf("fleece-%d.qcow2", d.idx))
		if err := qcow2.Create(d.imagePath, uint64(d.info.Size), 0o600); err != nil {
			return fmt.Errorf("creating the fleecing image for disk %s: %w", d.info.Name, err)
		}
		if chown {
			if err := os.Chown(d.imagePath, uid, gid); err != nil {
				return fmt.Errorf("giving the fleecing image %s to QEMU's user %d: %w", d.imagePath, uid, err)
			}
		}
	}
	return nil
}

// addFleeceNode opens the disk's fleecing image in QEMU, backed by the
// live disk.
func (d *disk) addFleeceNode(ctx context.Context) error {
	args := map[string]any{
		"driver":    "qcow2",
		"node-name": d.fleeceNode,
		"file": map[string]any{
			"driver":    "file",
			"filename":  d.imagePath,
			"node-name": d.fleeceFile,
		},
		"backing": d.node,
	}
	if err := d.cp.c.Execute(ctx, "blockdev-add", args, nil); err != nil {
		return fmt.Errorf("opening the fleecing image of disk %s in QEMU: %w", d.info.Name, err)
	}
	return nil
}

// repairSince re-enables a SINCE bitmap that an interrupted capture left
// disabled, merging into it the bitmaps that recorded the changes since.
func (d *disk) repairSince(ctx context.Context) error {
	if !d.readSince || len(d.repair) == 0 {
		return nil
	}
	name := bitmapPrefix + d.cp.since
	actions := []map[string]any{
		{"type": "block-dirty-bitmap-enable", "data": map[string]any{"node": d.node, "name": name}},
		{"type": "block-dirty-bitmap-merge", "data": map[string]any{"node": d.node, "target": name, "bitmaps": d.repair}},
	}
	if err := d.cp.c.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil); err != nil {
		return fmt.Errorf("repairing checkpoint bitmap %s of disk %s: %w", name, d.info.Name, err)
	}
	return nil
}

// transactionActions are the actions of the one transaction that is the
// capture's instant: per disk, the new bitmap, the old one frozen, and the
// fleecing job.
func (cp *capture) transactionActions() []map[string]any {
	var actions []map[string]any
	for _, d := range cp.disks {
		if d.track {
			actions = append(actions, map[string]any{"type": "block-dirty-bitmap-add", "data": map[string]any{
				"node": d.node, "name": bitmapPrefix + cp.checkpoint, "persistent": true,
			}})
		}
		if d.readSince {
			actions = append(actions, map[string]any{"type": "block-dirty-bitmap-disable", "data": map[string]any{
				"node": d.node, "name": bitmapPrefix + cp.since,
			}})
		}
		actions = append(actions, map[string]any{"type": "blockdev-backup", "data": map[string]any{
			"job-id": d.job, "device": d.node, "target": d.fleeceNode, "sync": "none",
			"auto-finalize": true, "auto-dismiss": false, "filter-node-name": d.filter,
		}})
	}
	return actions
}

// transaction runs the capture's instant.
func (cp *capture) transaction(ctx context.Context, actions []map[string]any) error {
	tctx, cancel := context.WithTimeout(ctx, instantTimeout)
	defer cancel()
	err := cp.c.Execute(tctx, "transaction", map[string]any{"actions": actions}, nil)
	if err != nil {
		var qe *Error
		if !errors.As(err, &qe) {
			// No answer: the transaction may or may not have run; End
			// must clean up either way.
			cp.committed = true
		}
		return fmt.Errorf("starting the point-in-time capture (one transaction for all disks): %w", err)
	}
	cp.committed = true
	return nil
}

// suspended pauses the VM around the transaction, guarded by a watchdog
// process that resumes it if kura dies meanwhile.
func (cp *capture) suspended(ctx context.Context, v *vm, running bool, actions []map[string]any) error {
	if !running {
		return cp.transaction(ctx, actions) // already paused: nothing to do around it
	}
	wd, err := guest.StartWatchdog(ctx, guest.WatchdogSpec{
		QMPSocket:  v.socket,
		Resume:     true,
		Deadline:   v.opts.WatchdogDeadline,
		Executable: v.opts.WatchdogExecutable,
	})
	if err != nil {
		return fmt.Errorf("suspend mode: %w (the VM was not paused)", err)
	}
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, instantTimeout)
	defer cancel()
	terr := cp.c.Execute(sctx, "stop", nil, nil)
	if terr != nil {
		terr = fmt.Errorf("pausing the VM: %w", terr)
	} else {
		terr = cp.transaction(ctx, actions)
	}
	rerr := cp.resume()
	cp.pause = time.Since(start)
	wctx, wcancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer wcancel()
	if rerr != nil {
		// The watchdog reaches QEMU only once this connection is closed;
		// the capture has failed anyway.
		cp.c.Close()
		if werr := wd.Fire(wctx); werr != nil {
			return errors.Join(terr, rerr, fmt.Errorf("the watchdog could not resume the VM either: %w", werr))
		}
		return errors.Join(terr, fmt.Errorf("resuming the VM after the capture failed (%w); the watchdog resumed it", rerr))
	}
	if derr := wd.Disarm(wctx); errors.Is(derr, guest.ErrWatchdogFired) {
		return errors.Join(terr, fmt.Errorf("suspend mode: %w: the watchdog resumed the VM before the capture's instant was taken; retry, or raise the watchdog deadline", derr))
	}
	return terr
}

// resume runs cont, even when the capture's context has ended.
func (cp *capture) resume() error {
	ctx, cancel := context.WithTimeout(context.Background(), instantTimeout)
	defer cancel()
	if err := cp.c.Execute(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("resuming the VM after the capture: %w: resume it by hand (QMP cont)", err)
	}
	return nil
}

// frozen freezes the guest's filesystems around the transaction, guarded
// by a watchdog process that thaws them if kura dies meanwhile.
func (cp *capture) frozen(ctx context.Context, f guest.Freezer, agentPath string, o Options, actions []map[string]any) error {
	wd, err := guest.StartWatchdog(ctx, guest.WatchdogSpec{
		AgentSocket: agentPath,
		Thaw:        true,
		Deadline:    o.WatchdogDeadline,
		Timeouts:    o.Agent,
		Executable:  o.WatchdogExecutable,
	})
	if err != nil {
		return fmt.Errorf("app mode: %w", err)
	}
	start := time.Now()
	_, ferr := f.Freeze(ctx)
	frozen := time.Now()
	var terr error
	if ferr == nil {
		terr = cp.transaction(ctx, actions)
	}
	// Thaw whatever happened, even when ctx has ended; if that fails, let
	// the watchdog try.
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), instantTimeout)
	defer cancel()
	thawStart := time.Now()
	_, therr := f.Thaw(tctx)
	cp.freeze = time.Since(start)
	cp.parts = source.FreezeParts{Freeze: frozen.Sub(start), Instant: thawStart.Sub(frozen), Thaw: time.Since(thawStart)}
	var werr error
	if therr != nil {
		if err := wd.Fire(tctx); err != nil {
			werr = fmt.Errorf("thawing the guest failed (%w) and so did the watchdog: %w", therr, err)
		}
	} else {
		werr = wd.Disarm(tctx)
	}
	switch {
	case ferr != nil:
		return errors.Join(fmt.Errorf("app mode: freezing the guest's filesystems: %w (use crash mode if the guest cannot freeze)", ferr), werr)
	case terr != nil:
		return errors.Join(terr, werr)
	case werr != nil:
		// Thawed by the watchdog after its deadline: the capture's instant
		// may have been outside the frozen window.
		return fmt.Errorf("app mode: %w", werr)
	}
	return nil
}

// export starts QEMU's NBD server on the private socket, exports each
// fleecing node (with the base checkpoint's bitmap) and connects to it.
func (cp *capture) export(ctx context.Context) error {
	c := cp.c
	err := c.Execute(ctx, "nbd-server-start", map[string]any{
		"addr": map[string]any{"type": "unix", "data": map[string]any{"path": cp.nbdSocket}},
	}, nil)
	if err != nil {
		var qe *Error
		if errors.As(err, &qe) && strings.Contains(strings.ToLower(qe.Desc), "already") {
			return fmt.Errorf("QEMU already runs an NBD server that kura did not start (another backup tool?); kura needs its own: stop it with QMP nbd-server-stop: %w", err)
		}
		return fmt.Errorf("starting QEMU's NBD server on %s: %w", cp.nbdSocket, err)
	}
	cp.serverStarted = true
	for _, d := range cp.disks {
		args := map[string]any{
			"type": "nbd", "id": d.export, "node-name": d.fleeceNode,
			"name": d.info.Name, "writable": false,
		}
		if d.readSince {
			args["bitmaps"] = []string{bitmapPrefix + cp.since}
		}
		if err := c.Execute(ctx, "block-export-add", args, nil); err != nil {
			return fmt.Errorf("exporting disk %s over NBD: %w", d.info.Name, err)
		}
	}
	for _, d := range cp.disks {
		metas := []string{nbd.MetaBaseAllocation}
		if d.readSince {
			metas = append(metas, nbd.MetaDirtyBitmapPrefix+bitmapPrefix+cp.since)
		}
		cl, err := nbd.Dial(ctx, "unix", cp.nbdSocket, nbd.Options{ExportName: d.info.Name, MetaContexts: metas})
		if err != nil {
			return fmt.Errorf("connecting to the NBD export of disk %s: %w", d.info.Name, err)
		}
		d.client = cl
		if cl.Size() != d.info.Size {
			return fmt.Errorf("NBD export of disk %s is %d bytes, the disk %d", d.info.Name, cl.Size(), d.info.Size)
		}
		granted := map[string]bool{}
		for _, mc := range cl.MetaContexts() {
			granted[mc.Name] = true
		}
		for _, m := range metas {
			if !granted[m] {
				return fmt.Errorf("QEMU's NBD export of disk %s does not offer meta context %s", d.info.Name, m)
			}
		}
	}
	// The watcher may have ended the capture while the exports were made.
	return cp.brokenErr()
}

func (cp *capture) Disks() []source.Disk {
	out := make([]source.Disk, len(cp.disks))
	for i, d := range cp.disks {
		if d.readSince {
			out[i] = trackedDisk{d}
		} else {
			out[i] = d
		}
	}
	return out
}

func (cp *capture) Checkpoint() string          { return cp.checkpoint }
func (cp *capture) Notes() []source.DiskNote    { return append([]source.DiskNote(nil), cp.notes...) }
func (cp *capture) Mode() string                { return cp.mode }
func (cp *capture) FreezeWindow() time.Duration { return cp.freeze }

// FreezeParts implements source.FreezeBreakdown.
func (cp *capture) FreezeParts() source.FreezeParts { return cp.parts }
func (cp *capture) Pause() time.Duration            { return cp.pause }

// End releases the capture: it closes the NBD connections, removes the
// exports and the NBD server, cancels the fleecing jobs, deletes the
// fleecing nodes and files, and settles the dirty bitmaps. If ok, only the
// new checkpoint's bitmap stays on each disk; if not, the new bitmap is
// merged back into the base checkpoint's (re-enabled), so that the next
// backup from the base checkpoint still reads every change. End is
// idempotent; later calls return the first call's result.
func (cp *capture) End(ctx context.Context, ok bool) error {
	cp.endOnce.Do(func() {
		if _, has := ctx.Deadline(); !has {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, endTimeout)
			defer cancel()
		}
		cp.endErr = cp.release(ctx, ok)
		cp.c.Close()
		if broken := cp.brokenErr(); broken != nil {
			cp.endErr = errors.Join(broken, cp.endErr)
		}
		if cp.endErr != nil {
			cp.endErr = fmt.Errorf("ending the capture of %s: %w", cp.vmName, cp.endErr)
		}
	})
	return cp.endErr
}

// release undoes whatever setup did, as far as it got.
func (cp *capture) release(ctx context.Context, ok bool) error {
	if cp.stopWatch != nil {
		close(cp.stopWatch)
		<-cp.watchDone
		cp.stopWatch = nil
	}
	// The NBD connections close after QEMU removed the exports: QEMU 7.2
	// (Debian 12) aborts, killing the VM, when a client of an export of
	// a disk served in an I/O thread disconnects on its own; exports
	// removed with mode hard close their clients from QEMU's main loop.
	err := cp.releaseQEMU(ctx, ok)
	for _, d := range cp.disks {
		d.Close()
	}
	if errors.Is(err, ErrClosed) {
		err = fmt.Errorf("QEMU is gone (the VM exited or closed its QMP socket), so nothing is left inside it to clean up: %w", err)
	}
	if cp.dir != "" {
		if rerr := os.RemoveAll(cp.dir); rerr != nil {
			err = errors.Join(err, fmt.Errorf("removing the scratch directory: %w", rerr))
		}
	}
	return err
}

// releaseQEMU removes the capture's exports, server, jobs and nodes from
// QEMU and settles the bitmaps. It goes on after an error, except when the
// QMP connection is lost: then it returns that error alone.
func (cp *capture) releaseQEMU(ctx context.Context, ok bool) error {
	c := cp.c
	var errs []error
	step := func(err error) bool {
		if err == nil {
			return true
		}
		if errors.Is(err, ErrClosed) {
			errs = []error{err}
			return false
		}
		errs = append(errs, err)
		return true
	}
	if err := c.Err(); err != nil {
		return err
	}
	for _, d := range cp.disks {
		err := c.Execute(ctx, "block-export-del", map[string]any{"id": d.export, "mode": "hard"}, nil)
		if err != nil && !isNotFound(err) && !step(fmt.Errorf("removing the NBD export of disk %s: %w", d.info.Name, err)) {
			return errs[0]
		}
	}
	if cp.serverStarted {
		err := c.Execute(ctx, "nbd-server-stop", nil, nil)
		if err != nil && !isNotFound(err) && !step(fmt.Errorf("stopping QEMU's NBD server: %w", err)) {
			return errs[0]
		}
	}
	if !step(waitExportsGone(ctx, c)) {
		return errs[0]
	}
	for _, d := range cp.disks {
		if err := endJob(ctx, c, d.job); err != nil && !step(fmt.Errorf("disk %s: %w", d.info.Name, err)) {
			return errs[0]
		}
	}
	for _, d := range cp.disks {
		for _, node := range []string{d.fleeceNode, d.fleeceFile} {
			if err := deleteNode(ctx, c, node); err != nil && !step(fmt.Errorf("disk %s: %w", d.info.Name, err)) {
				return errs[0]
			}
		}
	}
	if cp.committed {
		for _, d := range cp.disks {
			actions := d.settleBitmaps(ok)
			if len(actions) == 0 {
				continue
			}
			err := c.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil)
			if err != nil && !step(fmt.Errorf("disk %s: settling the checkpoint bitmaps: %w", d.info.Name, err)) {
				return errs[0]
			}
		}
	}
	return errors.Join(errs...)
}

// settleBitmaps is the transaction that leaves the disk's bitmaps as the
// outcome of the backup needs them. If ok, only the new checkpoint's
// bitmap stays. If not, the new bitmap is merged into the base
// checkpoint's, which records again, and removed.
func (d *disk) settleBitmaps(ok bool) []map[string]any {
	if !d.track {
		return nil
	}
	newBM := bitmapPrefix + d.cp.checkpoint
	bm := func(typ string, data map[string]any) map[string]any {
		data["node"] = d.node
		return map[string]any{"type": typ, "data": data}
	}
	var actions []map[string]any
	if ok {
		remove := append([]string(nil), d.stale...)
		if d.readSince {
			remove = append(remove, bitmapPrefix+d.cp.since)
		}
		for _, name := range remove {
			actions = append(actions, bm("block-dirty-bitmap-remove", map[string]any{"name": name}))
		}
		return actions
	}
	if d.readSince {
		old := bitmapPrefix + d.cp.since
		actions = append(actions,
			bm("block-dirty-bitmap-enable", map[string]any{"name": old}),
			bm("block-dirty-bitmap-merge", map[string]any{"target": old, "bitmaps": []string{newBM}}))
	}
	return append(actions, bm("block-dirty-bitmap-remove", map[string]any{"name": newBM}))
}

// waitExportsGone waits until QEMU lists no kura export: a deleted export
// lingers until its clients are gone, and keeps its bitmap busy.
func waitExportsGone(ctx context.Context, c *Client) error {
	ctx, cancel := context.WithTimeout(ctx, settleTimeout)
	defer cancel()
	for {
		es, err := queryExports(ctx, c)
		if err != nil {
			return err
		}
		left := 0
		for _, e := range es {
			if strings.HasPrefix(e.ID, exportPrefix) {
				left++
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d NBD exports still shutting down: %w", left, ctx.Err())
		case <-time.After(pollInterval):
		}
	}
}

// endJob cancels the fleecing job id, waits for it to conclude and
// dismisses it. A job that does not exist is fine.
func endJob(ctx context.Context, c *Client, id string) error {
	ctx, cancel := context.WithTimeout(ctx, settleTimeout)
	defer cancel()
	cancelled := false
	for {
		js, err := queryJobs(ctx, c)
		if err != nil {
			return err
		}
		var job *jobInfo
		for i := range js {
			if js[i].ID == id {
				job = &js[i]
			}
		}
		switch {
		case job == nil:
			return nil
		case job.Status == "concluded":
			if err := c.Execute(ctx, "job-dismiss", map[string]any{"id": id}, nil); err != nil && !isNotFound(err) {
				return fmt.Errorf("dismissing fleecing job %s: %w", id, err)
			}
			continue
		case job.Status == "null":
			return nil
		case !cancelled && job.Status != "aborting":
			if err := c.Execute(ctx, "job-cancel", map[string]any{"id": id}, nil); err != nil && !isNotFound(err) {
				return fmt.Errorf("cancelling fleecing job %s (%s): %w", id, job.Status, err)
			}
			cancelled = true
			continue
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("fleecing job %s still %s: %w", id, job.Status, ctx.Err())
		case <-time.After(pollInterval):
		}
	}
}

// deleteNode removes block node name; one that does not exist is fine.
func deleteNode(ctx context.Context, c *Client, name string) error {
	ctx, cancel := context.WithTimeout(ctx, settleTimeout)
	defer cancel()
	for {
		err := c.Execute(ctx, "blockdev-del", map[string]any{"node-name": name}, nil)
		if err == nil || isNotFound(err) {
			return nil
		}
		var qe *Error
		if !errors.As(err, &qe) || !strings.Contains(qe.Desc, "in use") {
			return fmt.Errorf("removing fleecing node %s: %w", name, err)
		}
		// Still held by a job that is going away.
		select {
		case <-ctx.Done():
			return fmt.Errorf("removing fleecing node %s: %w (%w)", name, err, ctx.Err())
		case <-time.After(pollInterval):
		}
	}
}

// cleanStale removes the exports, jobs and nodes a kura capture that never
// ended left in QEMU. Kura holds the QMP connection for the whole capture,
// and QEMU serves one QMP client at a time, so whoever made them is gone.
func cleanStale(ctx context.Context, c *Client) error {
	es, err := queryExports(ctx, c)
	if err != nil {
		return err
	}
	ours := false
	for _, e := range es {
		if strings.HasPrefix(e.ID, exportPrefix) {
			ours = true
			if err := c.Execute(ctx, "block-export-del", map[string]any{"id": e.ID, "mode": "hard"}, nil); err != nil && !isNotFound(err) {
				return fmt.Errorf("removing stale NBD export %s: %w", e.ID, err)
			}
		}
	}
	if ours {
		// The server was started for the exports kura made.
		if err := c.Execute(ctx, "nbd-server-stop", nil, nil); err != nil && !isNotFound(err) {
			return fmt.Errorf("stopping the stale NBD server: %w", err)
		}
		if err := waitExportsGone(ctx, c); err != nil {
			return err
		}
	}
	js, err := queryJobs(ctx, c)
	if err != nil {
		return err
	}
	for _, j := range js {
		if strings.HasPrefix(j.ID, jobPrefix) {
			if err := endJob(ctx, c, j.ID); err != nil {
				return err
			}
		}
	}
	ns, err := queryNodes(ctx, c)
	if err != nil {
		return err
	}
	var files []string
	for _, n := range ns {
		if strings.HasPrefix(n.NodeName, nodePrefix) && !strings.HasSuffix(n.NodeName, "-file") {
			if err := deleteNode(ctx, c, n.NodeName); err != nil {
				return err
			}
			files = append(files, n.Image.Filename)
		}
	}
	for _, n := range ns {
		if strings.HasPrefix(n.NodeName, nodePrefix) && strings.HasSuffix(n.NodeName, "-file") {
			if err := deleteNode(ctx, c, n.NodeName); err != nil {
				return err
			}
			files = append(files, n.Image.Filename)
		}
	}
	for _, f := range files {
		dir := filepath.Dir(f)
		if strings.HasPrefix(filepath.Base(f), "fleece-") && strings.HasPrefix(filepath.Base(dir), dirPrefix) {
			os.RemoveAll(dir) // best effort: it may live on another host's view
		}
	}
	return nil
}

// ErrScratchFull is returned (wrapped) by reads and End of a capture that
// was ended early because its scratch directory filled up.
var ErrScratchFull = errors.New("the scratch directory for fleecing images filled up")

// scratchLow is the free space below which a guest write that failed for
// lack of space is blamed on the scratch directory.
const scratchLow = 16 << 20

// watch ends the capture early, in favour of the guest, when the scratch
// directory fills up. A guest write that the fleecing job cannot first
// copy into the fleecing image fails with ENOSPC, and QEMU's default error
// policy (werror=enospc) pauses the VM: it would stay paused until End.
// Instead the watcher removes the exports (reads of the capture fail from
// then on, since its view is no longer the instant) and the fleecing jobs,
// and resumes the VM, which retries the failed writes.
func (cp *capture) watch() {
	defer close(cp.watchDone)
	for {
		select {
		case <-cp.stopWatch:
			return
		case <-cp.c.Done():
			return
		case <-cp.c.Notify():
		}
		for _, ev := range cp.c.Events() {
			if ev.Name != "BLOCK_IO_ERROR" {
				continue
			}
			var e struct {
				NodeName string `json:"node-name"`
				NoSpace  bool   `json:"nospace"`
				Action   string `json:"action"`
			}
			if json.Unmarshal(ev.Data, &e) != nil || !e.NoSpace || !strings.HasPrefix(e.NodeName, filterPrefix) {
				continue
			}
			var fs unix.Statfs_t
			if unix.Statfs(cp.dir, &fs) == nil && int64(fs.Bavail)*int64(fs.Bsize) > scratchLow {
				continue // the disk's own filesystem is full, not the scratch one
			}
			cp.breakSnapshot(ev.Time)
		}
	}
}

// breakSnapshot ends the capture early and resumes the VM that the failed
// guest writes paused (see watch).
func (cp *capture) breakSnapshot(since time.Time) {
	cp.mu.Lock()
	if cp.broken != nil {
		cp.mu.Unlock()
		return
	}
	cp.broken = fmt.Errorf("%w (in %s) while the guest wrote, which paused the VM: kura ended the point-in-time view early", ErrScratchFull, filepath.Dir(cp.dir))
	cp.mu.Unlock()
	if since.IsZero() {
		since = time.Now()
	}
	ctx, cancel := context.WithTimeout(context.Background(), endTimeout)
	defer cancel()
	var errs []error
	for _, d := range cp.disks {
		if err := cp.c.Execute(ctx, "block-export-del", map[string]any{"id": d.export, "mode": "hard"}, nil); err != nil && !isNotFound(err) {
			errs = append(errs, err)
		}
	}
	for _, d := range cp.disks {
		errs = append(errs, endJob(ctx, cp.c, d.job))
	}
	st, err := queryStatus(ctx, cp.c)
	if err == nil && st.Status == "io-error" {
		err = cp.c.Execute(ctx, "cont", nil, nil)
	}
	errs = append(errs, err)
	msg := fmt.Sprintf("and resumed the VM (paused %s); give the scratch directory more room (Options.ScratchDir)", time.Since(since).Round(time.Millisecond))
	if err := errors.Join(errs...); err != nil {
		msg = fmt.Sprintf("but resuming the VM failed: %v: resume it with QMP cont", err)
	}
	cp.mu.Lock()
	cp.broken = fmt.Errorf("%w %s", cp.broken, msg)
	cp.mu.Unlock()
}

// brokenErr says why the capture was ended early, nil if it was not.
func (cp *capture) brokenErr() error {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.broken
}
