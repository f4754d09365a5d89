// Package qemuargs rewrites the command line of a plain QEMU VM, as saved
// with its backup, so that the VM can run again from other disk images:
// every disk image the backup read is replaced by a new image, and
// everything the copy would otherwise share with the original (its QMP and
// chardev sockets, console log files, pid file, and with a new identity its
// name, UUID and MAC addresses) moves to a directory of its own.
//
// It knows QEMU's option syntax (key=value lists with ",," escapes, JSON
// -blockdev, chardev specs such as unix:PATH) and nothing of repositories or
// of how the images are made.
package qemuargs

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
)

// Image is what replaces one disk image of the saved command line.
type Image struct {
	Path   string
	Format string // "qcow2" or "raw"
}

// Plan says what Rewrite changes.
type Plan struct {
	// Disks maps each image path of the original (as QEMU named it in
	// query-block) to its replacement. Every one must be found on the
	// command line.
	Disks map[string]Image
	// RunDir receives the copy's sockets, console logs and QMP monitor.
	// Unix socket paths must stay under 108 bytes. Empty leaves them as
	// they are and adds no monitor: the command line of the same VM with
	// other disks.
	RunDir string
	// Name, when set, replaces the VM's -name.
	Name string
	// NewIdentity gives the copy a new UUID and new MAC addresses, so that
	// it can run beside the original.
	NewIdentity bool
}

// Result is a rewritten command line.
type Result struct {
	// Args is the command line, Args[0] the emulator.
	Args []string
	// QMPSocket is a QMP monitor (server, no wait) that Rewrite adds for
	// the caller, in RunDir.
	QMPSocket string
	// AgentSocket is the unix socket of the guest agent's chardev in
	// RunDir, or "" when the VM has no agent port on a unix socket.
	AgentSocket string
}

// maxSocketPath is the longest unix socket path Linux accepts.
const maxSocketPath = 107

// flagOptions take no argument; every other option takes one.
var flagOptions = map[string]bool{
	"S": true, "nodefaults": true, "no-user-config": true, "nodefconfig": true, "daemonize": true,
	"nographic": true, "snapshot": true, "enable-kvm": true, "no-reboot": true, "no-shutdown": true,
	"no-hpet": true, "no-acpi": true, "full-screen": true, "no-fd-bootchk": true, "no-quit": true,
	"enable-fips": true, "only-migratable": true, "preconfig": true, "win2k-hack": true,
	"rtc-td-hack": true, "usb": true, "s": true, "alt-grab": true, "ctrl-grab": true, "curses": true,
	"portrait": true, "semihosting": true, "enable-sync-profile": true, "no-frame": true,
	"no-kvm": true, "no-kvm-irqchip": true, "no-kvm-pit": true, "old-param": true, "sdl": true,
	"watchdog-action-reset": true, "help": true, "h": true, "version": true,
}

// dropped options (with their argument) make no sense for a copy started
// now: it is not daemonized by QEMU, does not wait for a migration, does
// not load a VM state, and kura knows its pid.
var dropped = map[string]bool{"daemonize": true, "incoming": true, "loadvm": true, "pidfile": true}

// Rewrite returns the command line args (args[0] the emulator) with the
// changes p asks for.
func Rewrite(args []string, p Plan) (*Result, error) {
	if len(args) == 0 {
		return nil, fmt.Errorf("the saved command line is empty")
	}
	rw := &rewriter{plan: p, found: map[string]bool{}, fileNodes: map[string]Image{}, sockets: map[string]bool{}}
	type opt struct {
		name string // without dashes; "" for a positional argument
		arg  string
		flag bool
	}
	var opts []opt
	for i := 1; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			opts = append(opts, opt{arg: a})
			continue
		}
		name := strings.TrimLeft(a, "-")
		if flagOptions[name] {
			opts = append(opts, opt{name: name, flag: true})
			continue
		}
		if i+1 >= len(args) {
			return nil, fmt.Errorf("option %s has no argument in the saved command line", a)
		}
		opts = append(opts, opt{name: name, arg: args[i+1]})
		i++
	}
	// Format nodes name their file node: find the file nodes first.
	for i, o := range opts {
		if o.name != "blockdev" {
			continue
		}
		v, err := rw.fileNode(o.arg)
		if err != nil {
			return nil, err
		}
		opts[i].arg = v
	}
	// The agent's chardev is named by its virtserialport.
	agentChardev := ""
	for _, o := range opts {
		if o.name == "device" {
			kv := parseKV(o.arg, "driver")
			if kv.get("driver") == "virtserialport" && kv.get("name") == "org.qemu.guest_agent.0" {
				agentChardev = kv.get("chardev")
			}
		}
	}
	out := []string{args[0]}
	res := &Result{}
	for _, o := range opts {
		if dropped[o.name] {
			continue
		}
		if o.flag {
			out = append(out, "-"+o.name)
			continue
		}
		v := o.arg
		var err error
		switch o.name {
		case "":
			v = rw.imagePath(v)
		case "hda", "hdb", "hdc", "hdd":
			v = rw.imagePath(v)
		case "blockdev":
			v, err = rw.formatNode(v)
		case "drive":
			v = rw.drive(v)
		case "chardev":
			if p.RunDir == "" {
				break
			}
			var path string
			v, path, err = rw.chardev(v)
			if err == nil && path != "" && parseKV(o.arg, "backend").get("id") == agentChardev {
				res.AgentSocket = path
			}
		case "qmp", "qmp-pretty", "monitor", "serial", "parallel", "debugcon":
			if p.RunDir != "" {
				v, err = rw.chardevSpec(v, o.name)
			}
		case "D":
			if p.RunDir != "" {
				v = filepath.Join(p.RunDir, "qemu-debug.log")
			}
		case "name":
			if p.Name != "" {
				kv := parseKV(v, "guest")
				kv.set("guest", p.Name)
				v = kv.String()
			}
		case "uuid":
			if p.NewIdentity {
				v = newUUID()
			}
		case "device", "nic", "net":
			if p.NewIdentity {
				v = newMACs(v, o.name)
			}
		}
		if err != nil {
			return nil, err
		}
		if o.name == "" {
			out = append(out, v)
		} else {
			out = append(out, "-"+o.name, v)
		}
	}
	var missing []string
	for path := range p.Disks {
		if !rw.found[path] {
			missing = append(missing, path)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return nil, fmt.Errorf("the saved command line does not name the image %s of a backed-up disk in a form kura rewrites (-blockdev, -drive, -hdX)", strings.Join(missing, ", "))
	}
	res.Args = out
	if p.RunDir == "" {
		return res, nil
	}
	res.QMPSocket = filepath.Join(p.RunDir, "kura-qmp.sock")
	if len(res.QMPSocket) > maxSocketPath {
		return nil, fmt.Errorf("socket path %s is longer than %d bytes: choose a shorter directory", res.QMPSocket, maxSocketPath)
	}
	out = append(out, "-qmp", "unix:"+res.QMPSocket+",server=on,wait=off")
	res.Args = out
	return res, nil
}

type rewriter struct {
	plan      Plan
	found     map[string]bool  // image paths replaced
	fileNodes map[string]Image // node-name of a replaced protocol node -> its image
	sockets   map[string]bool  // socket names used in RunDir
	logs      int
}

func (rw *rewriter) imagePath(v string) string {
	if img, ok := rw.plan.Disks[v]; ok {
		rw.found[v] = true
		return img.Path
	}
	return v
}

// protocolDrivers open an image file; the format node above one reads it.
var protocolDrivers = map[string]bool{"file": true, "host_device": true}

// fileNode replaces the filename of a -blockdev protocol node (or of a
// format node's inline file.filename) that opens a backed-up image.
func (rw *rewriter) fileNode(v string) (string, error) {
	if strings.HasPrefix(strings.TrimSpace(v), "{") {
		var m map[string]any
		if err := json.Unmarshal([]byte(v), &m); err != nil {
			return "", fmt.Errorf("-blockdev %s: %w", v, err)
		}
		changed, err := rw.fileNodeJSON(m, true)
		if err != nil || !changed {
			return v, err
		}
		b, err := json.Marshal(m)
		return string(b), err
	}
	kv := parseKV(v, "")
	if protocolDrivers[kv.get("driver")] {
		if img, ok := rw.plan.Disks[kv.get("filename")]; ok {
			rw.found[kv.get("filename")] = true
			kv.set("filename", img.Path)
			kv.set("driver", "file")
			if n := kv.get("node-name"); n != "" {
				rw.fileNodes[n] = img
			}
			return kv.String(), nil
		}
	}
	if fn := kv.get("file.filename"); fn != "" {
		if img, ok := rw.plan.Disks[fn]; ok {
			rw.found[fn] = true
			kv.set("file.filename", img.Path)
			kv.set("file.driver", "file")
			if err := setFormat(kv, img.Format); err != nil {
				return "", err
			}
			return kv.String(), nil
		}
	}
	return v, nil
}

// fileNodeJSON is fileNode for a JSON -blockdev: m itself or its inline
// "file" object may open a backed-up image.
func (rw *rewriter) fileNodeJSON(m map[string]any, top bool) (bool, error) {
	drv, _ := m["driver"].(string)
	if fn, _ := m["filename"].(string); protocolDrivers[drv] {
		if img, ok := rw.plan.Disks[fn]; ok {
			rw.found[fn] = true
			m["filename"], m["driver"] = img.Path, "file"
			if n, _ := m["node-name"].(string); n != "" && top {
				rw.fileNodes[n] = img
			}
			return true, nil
		}
		return false, nil
	}
	if f, ok := m["file"].(map[string]any); ok {
		changed, err := rw.fileNodeJSON(f, false)
		if err != nil || !changed {
			return false, err
		}
		fn, _ := f["filename"].(string)
		return true, setFormatJSON(m, rw.imageAt(fn))
	}
	return false, nil
}

func (rw *rewriter) imageAt(path string) Image {
	for _, img := range rw.plan.Disks {
		if img.Path == path {
			return img
		}
	}
	return Image{Path: path, Format: "qcow2"}
}

// formatNode makes a -blockdev format node over a replaced protocol node
// read the replacement's format.
func (rw *rewriter) formatNode(v string) (string, error) {
	if strings.HasPrefix(strings.TrimSpace(v), "{") {
		var m map[string]any
		if err := json.Unmarshal([]byte(v), &m); err != nil {
			return "", fmt.Errorf("-blockdev %s: %w", v, err)
		}
		f, _ := m["file"].(string)
		img, ok := rw.fileNodes[f]
		if !ok {
			return v, nil
		}
		if err := setFormatJSON(m, img); err != nil {
			return "", err
		}
		b, err := json.Marshal(m)
		return string(b), err
	}
	kv := parseKV(v, "")
	img, ok := rw.fileNodes[kv.get("file")]
	if !ok {
		return v, nil
	}
	if err := setFormat(kv, img.Format); err != nil {
		return "", err
	}
	return kv.String(), nil
}

// setFormat makes a key=value format node read format, dropping what only
// the original's format meant.
func setFormat(kv *kvList, format string) error {
	if kv.get("offset") != "" || kv.get("size") != "" {
		return fmt.Errorf("-blockdev %s reads a part of its image (offset/size): kura cannot start a copy of it", kv.String())
	}
	kv.set("driver", format)
	kv.del("backing")
	kv.delPrefix("encrypt.")
	kv.delPrefix("data-file")
	return nil
}

func setFormatJSON(m map[string]any, img Image) error {
	if _, ok := m["offset"]; ok {
		return fmt.Errorf("a -blockdev reads a part of its image (offset): kura cannot start a copy of it")
	}
	if _, ok := m["size"]; ok {
		return fmt.Errorf("a -blockdev reads a part of its image (size): kura cannot start a copy of it")
	}
	m["driver"] = img.Format
	delete(m, "backing")
	delete(m, "encrypt")
	delete(m, "data-file")
	return nil
}

// drive replaces a -drive's image.
func (rw *rewriter) drive(v string) string {
	kv := parseKV(v, "")
	img, ok := rw.plan.Disks[kv.get("file")]
	if !ok {
		return v
	}
	rw.found[kv.get("file")] = true
	kv.set("file", img.Path)
	kv.set("format", img.Format)
	kv.delPrefix("encrypt.")
	return kv.String()
}

// socket returns a new socket path in RunDir for name.
func (rw *rewriter) socket(name string) (string, error) {
	name = sanitize(name)
	for i := 2; rw.sockets[name]; i++ {
		name = fmt.Sprintf("%s-%d", strings.TrimSuffix(name, fmt.Sprintf("-%d", i-1)), i)
	}
	rw.sockets[name] = true
	p := filepath.Join(rw.plan.RunDir, name+".sock")
	if len(p) > maxSocketPath {
		return "", fmt.Errorf("socket path %s is longer than %d bytes: choose a shorter directory", p, maxSocketPath)
	}
	return p, nil
}

func (rw *rewriter) logFile(name string) string {
	rw.logs++
	return filepath.Join(rw.plan.RunDir, fmt.Sprintf("%s-%d.log", sanitize(name), rw.logs))
}

// chardev moves a -chardev's socket or file into RunDir; it returns the
// new socket path of a unix socket.
func (rw *rewriter) chardev(v string) (string, string, error) {
	kv := parseKV(v, "backend")
	id := kv.get("id")
	switch kv.get("backend") {
	case "socket":
		if kv.get("path") == "" {
			return v, "", nil // TCP: left as it is
		}
		p, err := rw.socket(id)
		if err != nil {
			return "", "", err
		}
		kv.set("path", p)
		return kv.String(), p, nil
	case "file":
		kv.set("path", rw.logFile(id))
		return kv.String(), "", nil
	}
	return v, "", nil
}

// chardevSpec moves the socket or file of a -serial/-monitor/-qmp style
// spec (unix:PATH,opts or file:PATH) into RunDir.
func (rw *rewriter) chardevSpec(v, opt string) (string, error) {
	backend, rest, ok := strings.Cut(v, ":")
	if !ok {
		return v, nil
	}
	switch backend {
	case "unix":
		// The path runs to the first single comma.
		kv := parseKV(rest, "path")
		p, err := rw.socket(opt)
		if err != nil {
			return "", err
		}
		kv.set("path", p)
		return "unix:" + kv.String(), nil
	case "file":
		return "file:" + escape(rw.logFile(opt)), nil
	}
	return v, nil
}

// newMACs gives every MAC address of a -device, -nic or -net a new
// locally administered address in QEMU's 52:54:00 range.
func newMACs(v, opt string) string {
	kv := parseKV(v, "driver")
	changed := false
	for _, key := range []string{"mac", "macaddr"} {
		if kv.get(key) != "" {
			kv.set(key, newMAC())
			changed = true
		}
	}
	if !changed {
		return v
	}
	return kv.String()
}

func newMAC() string {
	var b [3]byte
	rand.Read(b[:])
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
}

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func sanitize(s string) string {
	if s == "" {
		return "chardev"
	}
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' {
			return r
		}
		return '_'
	}, s)
}
