package main

// Live-VM backups through the CLI when things go wrong under them: the VM
// disappears, libvirtd restarts or the NBD connection drops mid-read; and
// several VMs backed up into one repository at once.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// vfSnap is what these tests read of `kura snapshots --json`.
type vfSnap struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	Kind       string `json:"kind"`
	Mode       string `json:"mode"`
	Checkpoint string `json:"checkpoint"`
	Disks      []struct {
		Name string `json:"name"`
		Read string `json:"read"`
	} `json:"disks"`
	Stats struct {
		BytesRead int64 `json:"bytes_read"`
	} `json:"stats"`
}

func (e *env) vfSnaps(name string) []vfSnap {
	e.t.Helper()
	var ss []vfSnap
	out := e.ok("snapshots", "--json", "--name", name)
	if err := json.Unmarshal([]byte(out), &ss); err != nil {
		e.t.Fatalf("snapshots --json: %v\n%s", err, out)
	}
	return ss
}

// vfLatest checks how the latest snapshot of name read each of its disks:
// read[disk] is the start of the disk's "read" field.
func (e *env) vfLatest(name, kind string, read map[string]string) vfSnap {
	e.t.Helper()
	ss := e.vfSnaps(name)
	if len(ss) == 0 {
		e.t.Fatalf("no snapshot of %s", name)
	}
	s := ss[len(ss)-1]
	var got []string
	for _, d := range s.Disks {
		got = append(got, d.Name+": "+d.Read)
	}
	e.t.Logf("snapshot %s of %s: %s backup, read %d MiB; %s", s.ID[:8], name, s.Kind, s.Stats.BytesRead>>20, strings.Join(got, "; "))
	if kind != "" && s.Kind != kind {
		e.t.Errorf("snapshot %s of %s is a %s backup; want %s", s.ID[:8], name, s.Kind, kind)
	}
	for _, d := range s.Disks {
		if want, ok := read[d.Name]; ok && !strings.HasPrefix(d.Read, want) {
			e.t.Errorf("snapshot %s: disk %s read %q; want %q", s.ID[:8], d.Name, d.Read, want)
		}
	}
	return s
}

func vfVirsh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-q", "-c", testvm.LibvirtURI}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// vfCheckpoints lists the domain's checkpoints, sorted.
func vfCheckpoints(t *testing.T, dom string) []string {
	t.Helper()
	cps := strings.Fields(vfVirsh(t, "checkpoint-list", dom, "--name"))
	slices.Sort(cps)
	return cps
}

var vfNoJob = regexp.MustCompile(`(?m)^Job type:\s+None`)

// vfNoBackupJob checks that no job (the backup job of a run) is left on
// the domain, waiting up to 5 s: after a good backup libvirt tears the job
// down on its own once kura has aborted it.
func vfNoBackupJob(t *testing.T, dom string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out, err := exec.Command("virsh", "-q", "-c", testvm.LibvirtURI, "domjobinfo", dom).CombinedOutput()
		switch {
		case err != nil && strings.Contains(string(out), "domain is not running"):
			return
		case err != nil:
			t.Fatalf("virsh domjobinfo %s: %v\n%s", dom, err, out)
		case vfNoJob.MatchString(string(out)):
			return
		case time.Now().After(deadline):
			t.Errorf("domain %s still has a job 5 s after kura ended:\n%s", dom, out)
			return
		}
	}
}

// vfRchar is how many bytes the process has read (files and sockets).
func vfRchar(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "rchar: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

// vfProcState is the state letter of /proc/PID/stat ("T" when stopped).
func vfProcState(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+3 <= len(s) {
		return s[i+2 : i+3]
	}
	return ""
}

// vfMidRead is how much kura must have read through its NBD socket
// before a test stops it to inject a fault: clearly reading, far from done.
const vfMidRead = 32 << 20

// vfMidBackup runs `kura args...` with TMPDIR=tmp and, once it reads the VM's
// disks (socket(pid) names its NBD socket and it has read vfMidRead
// bytes since that appeared), stops it with SIGSTOP, runs fault, lets it go
// on and returns its result and pid. Stopping kura makes "mid-backup"
// certain however fast it reads. The test fails if kura ends before it could
// be stopped, or has not ended 3 minutes after the fault.
func (e *env) vfMidBackup(tmp string, socket func(pid int) string, fault func(), args ...string) (result, int) {
	e.t.Helper()
	c := e.cmd(args...)
	c.Env = append(c.Env, "TMPDIR="+tmp)
	var so, se bytes.Buffer
	c.Stdout, c.Stderr = &so, &se
	if err := c.Start(); err != nil {
		e.t.Fatal(err)
	}
	pid := c.Process.Pid
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	ended := false
	defer func() {
		if !ended { // the test failed: do not leave kura stopped
			syscall.Kill(pid, syscall.SIGCONT)
			c.Process.Kill()
			<-done
		}
	}()
	base := int64(-1)
	deadline := time.Now().Add(3 * time.Minute)
wait:
	for {
		select {
		case err := <-done:
			ended = true
			e.t.Fatalf("kura %s ended (%v) before it could be stopped mid-read (socket seen: %v)\nstdout: %s\nstderr: %s",
				strings.Join(args, " "), err, base >= 0, so.String(), se.String())
		default:
		}
		switch {
		case time.Now().After(deadline):
			e.t.Fatalf("kura %s did not start reading its disks within 3 minutes (socket seen: %v)\nstderr: %s", strings.Join(args, " "), base >= 0, se.String())
		case base < 0:
			if socket(pid) != "" {
				base = vfRchar(pid)
			}
		case vfRchar(pid)-base >= vfMidRead:
			break wait
		}
		time.Sleep(2 * time.Millisecond)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		e.t.Fatal(err)
	}
	for i := 0; vfProcState(pid) != "T" && i < 500; i++ {
		time.Sleep(2 * time.Millisecond)
	}
	e.t.Logf("kura (pid %d) stopped after reading %d MiB through %s", pid, (vfRchar(pid)-base)>>20, socket(pid))
	fault()
	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		e.t.Fatal(err)
	}
	var err error
	select {
	case err = <-done:
		ended = true
	case <-time.After(3 * time.Minute):
		e.t.Fatalf("kura %s hung: still running 3 minutes after the fault\nstderr: %s", strings.Join(args, " "), se.String())
	}
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("kura %v: %v", args, err)
	}
	e.t.Logf("kura ended %s after the fault: exit %d\nstdout: %s\nstderr: %s", time.Since(start).Round(time.Millisecond), code, so.String(), se.String())
	return result{so.String(), se.String(), code, pid}, pid
}

// vfFailedCleanly checks a backup of vm that failed: a one-line error naming
// the VM and containing each hint, before restore points of the VM (no new
// one unless the failure came after it was saved), and a repository that
// verifies.
func (e *env) vfFailedCleanly(r result, vm string, before int, hints ...string) {
	e.t.Helper()
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(r.stderr), "\n") {
		if !strings.HasPrefix(l, "time=") { // a log line, not the error
			lines = append(lines, l)
		}
	}
	msg := strings.Join(lines, "\n")
	if r.code == 0 {
		e.t.Fatalf("the backup succeeded; want it to fail\n%s", r.stdout)
	}
	if strings.Contains(msg, "\n") {
		e.t.Errorf("error is not one line:\n%s", msg)
	}
	if !strings.Contains(msg, vm) {
		e.t.Errorf("error does not name VM %s: %s", vm, msg)
	}
	for _, h := range hints {
		if !strings.Contains(msg, h) {
			e.t.Errorf("error does not say %q: %s", h, msg)
		}
	}
	if n := len(e.vfSnaps(vm)); n != before {
		e.t.Errorf("%d restore points of %s after the failed backup; want %d", n, vm, before)
	}
	e.ok("verify")
}

// vfNoLeftovers checks that the kura process pid left no scratch images or
// NBD sockets: not in its libvirt scratch directories (/var/tmp/kura-PID-*),
// not in its TMPDIR, not in libvirt's directory.
func vfNoLeftovers(t *testing.T, pid int, tmp string) {
	t.Helper()
	if m, _ := filepath.Glob(fmt.Sprintf("/var/tmp/kura-%d-*", pid)); len(m) > 0 {
		t.Errorf("scratch directory left behind: %v", m)
	}
	if ents, _ := os.ReadDir(tmp); len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("left behind in TMPDIR %s: %v", tmp, names)
	}
	filepath.WalkDir("/var/lib/libvirt/qemu", func(p string, d fs.DirEntry, err error) error {
		if err == nil && (strings.HasSuffix(p, ".scratch") || strings.Contains(p, fmt.Sprintf("kura-%d-", pid))) {
			t.Errorf("left behind in libvirt's directory: %s", p)
		}
		return nil
	})
}

var vfOwnerPID = regexp.MustCompile(`^kura testvm guest; owner pid=(\d+)$`)

// vfWaitOtherGuests waits until no other live process runs a testvm guest:
// test binaries built before testvm's libvirtd lock do not take it. It
// skips the test if they do not end in time.
func vfWaitOtherGuests(t *testing.T, ctx context.Context) {
	t.Helper()
	for {
		var others []string
		for _, dom := range strings.Fields(vfVirsh(t, "list", "--name")) {
			desc, err := exec.Command("virsh", "-q", "-c", testvm.LibvirtURI, "desc", dom).Output()
			if err != nil {
				continue
			}
			m := vfOwnerPID.FindStringSubmatch(strings.TrimSpace(string(desc)))
			if m == nil {
				continue
			}
			if pid, _ := strconv.Atoi(m[1]); pid != os.Getpid() && syscall.Kill(pid, 0) == nil {
				others = append(others, dom)
			}
		}
		if len(others) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Skipf("other tests' guests %v still run: not restarting libvirtd under them", others)
		case <-time.After(time.Second):
		}
	}
}

// vfLibvirtSocket finds the NBD socket of kura process pid's libvirt capture.
func vfLibvirtSocket(pid int) string {
	m, _ := filepath.Glob(fmt.Sprintf("/var/tmp/kura-%d-*/nbd.sock", pid))
	if len(m) == 0 {
		return ""
	}
	return m[0]
}

func vfGuestRun(t *testing.T, ctx context.Context, g *testvm.Guest, args ...string) {
	t.Helper()
	if out, code, err := g.Exec(ctx, args[0], args[1:]...); err != nil || code != 0 {
		t.Fatalf("in guest %s: %v: exit %d, %v: %s", g.Name, args, code, err, out)
	}
}

// vfCheckDataDisk checks a restored ext4 data disk: it fscks clean and holds
// every file kura-workload wrote to its root with the checksum it recorded.
// It returns the number of files.
func vfCheckDataDisk(t *testing.T, img string) int {
	t.Helper()
	if out, err := exec.Command("fsck.ext4", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("restored data disk %s does not fsck clean: %v\n%s", img, err, out)
	}
	manifest, err := exec.Command("debugfs", "-R", "cat /MANIFEST.sha256", img).Output()
	if err != nil {
		t.Fatalf("debugfs %s: %v", img, err)
	}
	dir := t.TempDir()
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(manifest))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		want, name := f[0], strings.TrimPrefix(f[1], "*")
		dst := filepath.Join(dir, name)
		if out, err := exec.Command("debugfs", "-R", fmt.Sprintf("dump /%s %s", name, dst), img).CombinedOutput(); err != nil {
			t.Fatalf("debugfs dump %s: %v\n%s", name, err, out)
		}
		f0, err := os.Open(dst)
		if err != nil {
			t.Fatalf("%s is not in the restored disk %s: %v", name, img, err)
		}
		h := sha256.New()
		io.Copy(h, f0)
		f0.Close()
		if got := hex.EncodeToString(h.Sum(nil)); got != want {
			t.Errorf("%s in the restored disk %s: sha256 %s, the guest wrote %s", name, img, got, want)
		}
		n++
	}
	if n == 0 {
		t.Fatalf("no files in the manifest of the restored disk %s: %q", img, manifest)
	}
	return n
}

// TestLiveVMFailures: things go wrong while kura reads a libvirt guest's
// disks. When the NBD connection drops or the VM is destroyed, the backup
// fails with one line naming the VM, saves no restore point and leaves no
// scratch files, no backup job and only the checkpoints of the last good
// backup. A libvirtd restart does not fail the backup; libvirtd down when
// the backup ends leaves a complete restore point and says how to end the
// job. Each time the next backup works, and reads only the changes where
// it can.
func TestLiveVMFailures(t *testing.T) {
	needVM(t, "fsck.ext4", "debugfs")
	testStart := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g, err := testvm.StartLibvirt(ctx, testvm.Options{Dir: dir, Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data", SizeMiB: 256}}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Destroy(context.Background())
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest %s booted in %s (%s)", g.Name, g.BootTime.Round(time.Second), g.Accel)
	vfGuestRun(t, ctx, g, "/usr/local/bin/kura-workload", "write", "/data", "16", "1")

	e := newEnv(t)
	e.ok("init")
	e.ok("backup", "vm", g.Name)
	e.vfLatest(g.Name, "full", nil)
	if cps := vfCheckpoints(t, g.Name); len(cps) != 1 {
		t.Fatalf("checkpoints after the first backup: %v", cps)
	}
	tmp := t.TempDir()

	// The repository is unlocked while the capture is prepared and taken
	// (a VM with one checkpoint of Kura's need not wait for it): a wrong
	// password must still fail the backup, undo the capture (its new
	// checkpoint deleted, the guest thawed) and leave nothing behind.
	t.Run("wrong password", func(t *testing.T) {
		w := *e
		w.t, w.pw = t, "nope"
		cps := vfCheckpoints(t, g.Name)
		before := len(e.vfSnaps(g.Name))
		r := w.fails("wrong password", "backup", "vm", g.Name)
		if got := vfCheckpoints(t, g.Name); !slices.Equal(got, cps) {
			t.Errorf("checkpoints %v after a wrong password; want %v", got, cps)
		}
		if n := len(e.vfSnaps(g.Name)); n != before {
			t.Errorf("%d restore points after a wrong password; want %d", n, before)
		}
		vfNoBackupJob(t, g.Name)
		// Capture directories are named after their kura's pid (only
		// this kura's: other packages' tests leave theirs on purpose).
		if dirs, _ := filepath.Glob(fmt.Sprintf("/var/tmp/kura-%d-*", r.pid)); len(dirs) > 0 {
			t.Errorf("capture directory left behind: %v", dirs)
		}
		var st string
		if err := g.Agent(ctx, "guest-fsfreeze-status", nil, &st); err != nil || st != "thawed" {
			t.Errorf("guest filesystems after a wrong password: %q (%v); want thawed", st, err)
		}
	})
	backup := []string{"backup", "vm", g.Name, "--full"} // reads all of every disk: a long read to stop in

	// What becomes of the backup that meets the fault.
	const (
		fails     = iota // no restore point; checkpoints as before
		succeeds         // a complete restore point, as if nothing happened
		savedOnly        // a complete restore point, but kura fails to end the job
	)
	type fault struct {
		name string
		// libvirtd: the fault stops libvirtd, so the test holds it
		// exclusively (other tests' guests must not see it go away).
		libvirtd bool
		// inject runs while kura is stopped mid-read; it returns what to
		// do once kura has ended, or nil.
		inject  func(t *testing.T) func()
		outcome int
		hints   []string // what the error must say besides the VM's name
		// keepsCheckpoint: the failed backup's checkpoint may stay (libvirt
		// cannot delete a checkpoint of a VM that is not running; the next
		// good backup does).
		keepsCheckpoint bool
		// next is how the next backup reads every disk: "changed", or ""
		// for "changed" or "full (reason)".
		next string
	}
	faults := []fault{
		{
			name:    "NBD connection drops",
			inject:  func(t *testing.T) func() { vfVirsh(t, "domjobabort", g.Name); return nil },
			outcome: fails,
			hints:   []string{"backup job was ended outside Kura", "run the backup again"},
			next:    "changed",
		},
		{
			name:     "libvirtd restarts",
			libvirtd: true,
			inject: func(t *testing.T) func() {
				start := time.Now()
				if err := testvm.RestartLibvirtd(ctx, time.Second); err != nil {
					t.Fatal(err)
				}
				t.Logf("libvirtd restarted in %s", time.Since(start).Round(time.Millisecond))
				return nil
			},
			outcome: succeeds,
			next:    "changed",
		},
		{
			name:     "libvirtd down when the backup ends",
			libvirtd: true,
			inject: func(t *testing.T) func() {
				if err := testvm.StopLibvirtd(ctx); err != nil {
					t.Fatal(err)
				}
				return func() {
					if err := testvm.EnsureLibvirtd(ctx); err != nil {
						t.Fatal(err)
					}
				}
			},
			outcome: savedOnly,
			hints:   []string{"backup saved", "connection to libvirtd was lost", "virsh domjobabort"},
			next:    "changed",
		},
		{
			name:            "VM destroyed",
			inject:          func(t *testing.T) func() { vfVirsh(t, "destroy", g.Name); return nil },
			outcome:         fails,
			hints:           []string{"no longer running", "run the backup again"},
			keepsCheckpoint: true,
		},
	}
	var releaseLibvirtd func()
	defer func() {
		if releaseLibvirtd != nil {
			releaseLibvirtd()
		}
	}()
	for i, f := range faults {
		if f.libvirtd && releaseLibvirtd == nil {
			// Wait until other tests' guests are gone; keep new ones
			// waiting. This test's own guest keeps its hold.
			lctx, lcancel := context.WithTimeout(ctx, 8*time.Minute)
			release, err := testvm.LockLibvirtdExclusive(lctx)
			if err != nil {
				lcancel()
				t.Fatal(err)
			}
			releaseLibvirtd = func() {
				lcancel()
				release()
				// Running again, whatever happened.
				if err := testvm.EnsureLibvirtd(context.WithoutCancel(ctx)); err != nil {
					t.Error(err)
				}
			}
			vfWaitOtherGuests(t, lctx)
		}
		if !f.libvirtd && releaseLibvirtd != nil {
			releaseLibvirtd()
			releaseLibvirtd = nil
		}
		ok := t.Run(f.name, func(t *testing.T) {
			w := *e
			w.t = t
			before := len(w.vfSnaps(g.Name))
			cps := vfCheckpoints(t, g.Name)
			var after func()
			r, pid := w.vfMidBackup(tmp, vfLibvirtSocket, func() { after = f.inject(t) }, backup...)
			if after != nil {
				after()
			}
			vfNoLeftovers(t, pid, tmp)
			got := vfCheckpoints(t, g.Name)
			switch f.outcome {
			case fails:
				w.vfFailedCleanly(r, g.Name, before, f.hints...)
				if f.keepsCheckpoint && len(got) == len(cps)+1 {
					got = slices.DeleteFunc(got, func(c string) bool { return !slices.Contains(cps, c) })
				}
				if !slices.Equal(got, cps) {
					t.Errorf("checkpoints after the failed backup: %v; want %v (those of the last good backup)", got, cps)
				}
			case succeeds:
				if r.code != 0 {
					t.Fatalf("the backup failed: %s", r.stderr)
				}
				s := w.vfLatest(g.Name, "full", nil)
				if len(got) != 1 || got[0] != s.Checkpoint {
					t.Errorf("checkpoints %v; want only the new backup's, %s", got, s.Checkpoint)
				}
			case savedOnly:
				w.vfFailedCleanly(r, g.Name, before+1, f.hints...)
				s := w.vfLatest(g.Name, "full", nil)
				if want := append(slices.Clone(cps), s.Checkpoint); !slices.Equal(got, want) {
					t.Errorf("checkpoints %v; want %v: the older ones stay until a backup ends well", got, want)
				}
			}
			if f.outcome != savedOnly {
				vfNoBackupJob(t, g.Name)
			}
			if f.name == "VM destroyed" {
				vfVirsh(t, "start", g.Name)
				if _, err := g.WaitAgent(ctx); err != nil {
					t.Fatal(err)
				}
			}

			// The guest writes more; the next backup works (and ends a
			// job left behind).
			vfGuestRun(t, ctx, g, "/usr/local/bin/kura-workload", "write", "/data", "2", strconv.Itoa(10+i))
			prev := vfCheckpoints(t, g.Name)
			w.ok("backup", "vm", g.Name)
			s := w.vfLatest(g.Name, "", nil)
			for _, d := range s.Disks {
				if d.Read != "changed" && (f.next == "changed" || !strings.HasPrefix(d.Read, "full (")) {
					t.Errorf("next backup: disk %s read %q; want changed%s", d.Name, d.Read, map[bool]string{true: "", false: ", or full with the reason"}[f.next == "changed"])
				}
			}
			if got := vfCheckpoints(t, g.Name); len(got) != 1 || got[0] != s.Checkpoint || slices.Contains(prev, got[0]) {
				t.Errorf("checkpoints after the next backup: %v; want only its new one, %s", got, s.Checkpoint)
			}
			vfNoBackupJob(t, g.Name)
		})
		if !ok {
			break
		}
	}
	if releaseLibvirtd != nil {
		releaseLibvirtd()
		releaseLibvirtd = nil
	}

	// Every restore point restores, the latest with all the guest wrote.
	e.ok("verify", "--read-data")
	restored := filepath.Join(dir, "vdb.raw")
	e.ok("restore", g.Name+"@latest", "--disk", "vdb", "--to", restored)
	if n := vfCheckDataDisk(t, restored); n != 16+2*len(faults) {
		t.Errorf("%d files in the restored data disk; want %d", n, 16+2*len(faults))
	}
	t.Logf("TestLiveVMFailures: %s", time.Since(testStart).Round(time.Second))
}

// TestLiveQMPFailure: the QEMU process of a plain QEMU guest is killed
// while `kura backup qmp` reads it. kura fails in one line naming the VM,
// saves no restore point and leaves no fleecing images or NBD socket; a
// QEMU started again on the same data disk is backed up again.
func TestLiveQMPFailure(t *testing.T) {
	needVM(t, "fsck.ext4", "debugfs")
	testStart := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g, err := testvm.StartQEMU(ctx, testvm.Options{Dir: t.TempDir(), Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data", SizeMiB: 256}}})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Destroy(context.Background())
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest %s booted in %s (%s)", g.Name, g.BootTime.Round(time.Second), g.Accel)
	vfGuestRun(t, ctx, g, "/usr/local/bin/kura-workload", "write", "/data", "16", "1")

	const name = "qmpvm"
	e := newEnv(t)
	e.ok("init")
	// testvm holds the guest agent's socket (QEMU serves one client): crash
	// mode, without a warning that the agent does not answer.
	e.ok("backup", "qmp", "--socket", g.QMPSocket, "--name", name, "--mode", "crash")
	e.vfLatest(name, "full", nil)
	tmp := t.TempDir()
	socket := func(int) string {
		m, _ := filepath.Glob(filepath.Join(tmp, "kura-qmp-*", "nbd.sock"))
		if len(m) == 0 {
			return ""
		}
		return m[0]
	}
	r, pid := e.vfMidBackup(tmp, socket, func() {
		if err := syscall.Kill(g.PID, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 500 && syscall.Kill(g.PID, 0) == nil && vfProcState(g.PID) != "Z"; i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}, "backup", "qmp", "--socket", g.QMPSocket, "--name", name, "--mode", "crash", "--full")
	e.vfFailedCleanly(r, name, 1, "the VM exited", "run the backup again")
	vfNoLeftovers(t, pid, tmp)

	// QEMU again, on the same data disk: the next backup works. QEMU was
	// killed, so the disk's bitmaps were not saved: it is read in full.
	data := g.Disks[1].Path
	g2, err := testvm.StartQEMU(ctx, testvm.Options{Dir: t.TempDir(), Disks: []testvm.DiskSpec{{Source: data, Format: "qcow2", FS: "ext4", Mount: "/data"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Destroy(context.Background())
	if _, err := g2.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	vfGuestRun(t, ctx, g2, "/usr/local/bin/kura-workload", "write", "/data", "2", "2")
	e.ok("backup", "qmp", "--socket", g2.QMPSocket, "--name", name, "--mode", "crash")
	s := e.vfLatest(name, "", nil)
	for _, d := range s.Disks {
		if d.Read != "changed" && !strings.HasPrefix(d.Read, "full (") {
			t.Errorf("disk %s read %q: want changed, or full with the reason", d.Name, d.Read)
		}
	}
	e.ok("verify", "--read-data")
	restored := filepath.Join(dir, "vdb.raw")
	e.ok("restore", name+"@latest", "--disk", "vdb", "--to", restored)
	if n := vfCheckDataDisk(t, restored); n != 18 {
		t.Errorf("%d files in the restored data disk; want 18", n)
	}
	t.Logf("TestLiveQMPFailure: %s", time.Since(testStart).Round(time.Second))
}

// TestConcurrentVMBackups: two libvirt guests backed up into one
// repository at once, by one `kura backup vm A B --parallel 2` and by two
// kura processes. Every restore point verifies and restores to a data disk
// that fscks clean and holds what the guest wrote.
func TestConcurrentVMBackups(t *testing.T) {
	needVM(t, "fsck.ext4", "debugfs")
	testStart := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir := t.TempDir()
	var gs []*testvm.Guest
	for i := 0; i < 2; i++ {
		g, err := testvm.StartLibvirt(ctx, testvm.Options{Dir: t.TempDir(), MemoryMiB: 512, CPUs: 1,
			Disks: []testvm.DiskSpec{{FS: "ext4", Mount: "/data", SizeMiB: 128}}})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Destroy(context.Background())
		gs = append(gs, g)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(gs))
	for i, g := range gs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, errs[i] = g.WaitAgent(ctx); errs[i] == nil {
				var code int
				var out string
				out, code, errs[i] = g.Exec(ctx, "/usr/local/bin/kura-workload", "write", "/data", "8", strconv.Itoa(i+1))
				if errs[i] == nil && code != 0 {
					errs[i] = fmt.Errorf("kura-workload: exit %d: %s", code, out)
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for _, g := range gs {
		t.Logf("guest %s booted in %s (%s)", g.Name, g.BootTime.Round(time.Second), g.Accel)
	}
	a, b := gs[0].Name, gs[1].Name

	e := newEnv(t)
	e.ok("init")
	start := time.Now()
	out := e.ok("backup", "vm", a, b, "--parallel", "2")
	t.Logf("kura backup vm %s %s --parallel 2: %s\n%s", a, b, time.Since(start).Round(time.Millisecond), out)
	for _, g := range gs {
		e.vfLatest(g.Name, "full", nil)
	}

	// More data, then two kura processes at once.
	for i, g := range gs {
		vfGuestRun(t, ctx, g, "/usr/local/bin/kura-workload", "write", "/data", "4", strconv.Itoa(10+i))
	}
	start = time.Now()
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for _, g := range gs {
		c := e.cmd("backup", "vm", g.Name)
		var buf bytes.Buffer
		c.Stdout, c.Stderr = &buf, &buf
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, c), append(outs, &buf)
	}
	for i, c := range cmds {
		if err := c.Wait(); err != nil {
			t.Errorf("kura backup vm %s (run beside another): %v\n%s", gs[i].Name, err, outs[i])
		}
	}
	t.Logf("two kura processes at once: %s", time.Since(start).Round(time.Millisecond))
	if t.Failed() {
		t.FailNow()
	}
	for _, g := range gs {
		e.vfLatest(g.Name, "incremental", map[string]string{"vda": "changed", "vdb": "changed"})
	}

	if out := e.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") {
		t.Fatalf("verify: %s", out)
	}
	for i, g := range gs {
		ss := e.vfSnaps(g.Name)
		if len(ss) != 2 {
			t.Fatalf("%d restore points of %s; want 2", len(ss), g.Name)
		}
		for j, s := range ss {
			img := filepath.Join(dir, fmt.Sprintf("%s-%d.raw", g.Name, j))
			e.ok("restore", s.ID, "--disk", "vdb", "--to", img)
			want := 8 + 4*j
			if n := vfCheckDataDisk(t, img); n != want {
				t.Errorf("restore point %d of guest %d (%s): %d files in the data disk; want %d", j, i, s.ID[:8], n, want)
			}
			os.Remove(img)
		}
	}
	t.Logf("TestConcurrentVMBackups: %s", time.Since(testStart).Round(time.Second))
}
