package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// Scripts pushed into the consistency test's guest.

// vcHook is qemu-ga's fsfreeze hook (qemu-ga -F): qemu-ga runs it with
// "freeze" before it freezes the filesystems and with "thaw" after it thawed
// them. On freeze it stops the continuous writers (each process group named
// in /run/kura-writers/*.pid), waits until they and their children are
// stopped, syncs, and records the sha256 of every file on both data disks
// (except ord/, the ordered writer's, which keeps running through freezes)
// in /run/kura-freeze-N.sha256, N counting the freezes
// (/run/kura-freeze-count). /run is a tmpfs, not on a backed-up disk. On
// thaw it lets the writers go on. It runs while Kura waits for the freeze
// (10 s at most), under TCG on a busy host: it uses shell builtins where it
// can, and gives up after 3 s.
const vcHook = `#!/bin/sh
log=/run/kura-hook.log
groups=
for f in /run/kura-writers/*.pid; do
	[ -e "$f" ] && read -r g <"$f" && groups="$groups $g"
done
uptime() { read -r now _ </proc/uptime; now=${now%.*}; }
# stopped PID succeeds when PID and its descendants are stopped (or zombies).
# (A dash writer would vfork: its parent waits in state D for a stopped
# child, so the writers are bash scripts, which fork.)
stopped() {
	local st kids k
	read -r _ _ st _ </proc/$1/stat 2>/dev/null || return 0
	case $st in T | t | Z | X) ;; *) return 1 ;; esac
	kids=
	read -r kids </proc/$1/task/$1/children 2>/dev/null
	for k in $kids; do stopped $k || return 1; done
	return 0
}
allstopped() { for g in $groups; do stopped $g || return 1; done; }
signal() { for g in $groups; do kill -s $1 -- -$g; done; }
read -r up _ </proc/uptime
case "$1" in
freeze)
	n=0
	read -r n </run/kura-freeze-count 2>/dev/null
	n=$((n + 1))
	signal STOP
	uptime
	deadline=$((now + 3))
	tries=0
	until allstopped; do
		tries=$((tries + 1))
		uptime
		if [ $now -ge $deadline ]; then
			echo "$up freeze $n: the writers ($groups) did not stop" >>$log
			ps -e -o pid,ppid,pgid,stat,wchan:32,args >>$log
			signal CONT
			exit 1
		fi
		signal STOP
	done
	sync
	find /data /data2 \( -path /data/ord -o -path /data2/ord \) -prune -o -type f -exec sha256sum {} + >/run/kura-freeze-$n.sha256 ||
		{ echo "$up freeze $n: the manifest failed" >>$log; signal CONT; exit 1; }
	echo $n >/run/kura-freeze-count
	read -r end _ </proc/uptime
	echo "$up freeze $n: writers ($groups) stopped after $tries checks; manifest written at $end" >>$log
	;;
thaw)
	signal CONT
	echo "$up thaw" >>$log
	;;
esac
exit 0
`

// vcWriter writes without end on both data disks: files of random data of
// varying size, each written under a temporary name and renamed into place,
// and now and then one deleted, so that the file set changes too. It runs
// as a systemd unit, so it leads its own process group, which the hook stops.
// It pauses 0.1 s between rounds (read -t on a FIFO: no process) to leave
// the guest's CPUs some air under TCG.
const vcWriter = `#!/bin/bash
set -eu
mkdir -p /data/w /data2/w /run/kura-writers
rm -f /run/kura-writer.fifo
mkfifo /run/kura-writer.fifo
exec 3<>/run/kura-writer.fifo
echo $$ >/run/kura-writers/writer.pid
i=0
while :; do
	i=$((i + 1))
	n=$((i % 13))
	size=$(((i * 37 % 61 + 3) * 1024))
	for d in /data/w /data2/w; do
		head -c $size /dev/urandom >$d/.f$n.tmp
		mv -f $d/.f$n.tmp $d/f$n
	done
	if [ $((i % 5)) -eq 0 ]; then rm -f /data/w/f$((i * 7 % 13)) /data2/w/f$((i * 3 % 13)); fi
	echo $i >/run/kura-writer.iter
	read -r -t 0.1 -u 3 || true
done
`

// vcOrdered writes i = 1, 2, 3, … to disk A (vdb, ext4) and fsyncs, then i
// to disk B (vdc, xfs) and fsyncs, without end: at any instant a = b or
// a = b+1. Each value is a fixed-width overwrite in place (one block), so a
// crash image never holds a torn or truncated counter. The freeze hook
// leaves it running.
const vcOrdered = `#!/bin/bash
set -eu
a=/data/ord/ctr b=/data2/ord/ctr
mkdir -p /data/ord /data2/ord
printf '%012d\n' 0 >$a
printf '%012d\n' 0 >$b
sync
rm -f /run/kura-ordered.fifo
mkfifo /run/kura-ordered.fifo
exec 3<>/run/kura-ordered.fifo
echo $$ >/run/kura-ordered.pid
i=0
while :; do
	i=$((i + 1))
	printf '%012d\n' $i | dd of=$a conv=notrunc,fsync status=none
	printf '%012d\n' $i | dd of=$b conv=notrunc,fsync status=none
	echo $i >/run/kura-ordered.iter
	read -r -t 0.02 -u 3 || true
done
`

// vcSnap is what the consistency test reads from `kura snapshots --json`.
type vcSnap struct {
	ID    string `json:"id"`
	Kind  string `json:"kind"`
	Mode  string `json:"mode"`
	Disks []struct {
		Name string `json:"name"`
		Size int64  `json:"size"`
		Read string `json:"read"` // "full", "changed" or "full (why)"
	} `json:"disks"`
	Stats struct {
		BytesRead    int64   `json:"bytes_read"`
		FreezeMillis float64 `json:"freeze_ms"`
	} `json:"stats"`
}

// TestLiveVMConsistency backs up one real guest (TCG) through the CLI while
// it writes without pause, and proves each restore point consistent:
//
//   - app mode, a full and three incremental backups: qemu-ga's freeze hook
//     stops a continuous writer and records the checksum of every file on
//     both data disks (ext4 and xfs) just before the freeze; each restored
//     data disk holds exactly those files with exactly those contents,
//     mounted without journal or log recovery, and checks clean (ext4 as it
//     is; xfs, whose freeze leaves superblock-only records in its log, after
//     replaying them);
//   - cross-disk order: a second writer puts i on disk A, fsync, then i on
//     disk B, fsync; in every restored pair (the four app-mode restore points
//     and five crash-mode incrementals, after journal/log replay) b ≤ a ≤ b+1,
//     and crash-mode disks fsck clean after replay;
//   - whole-disk identity: a live incremental backup taken with the data
//     disks unmounted in the guest restores byte for byte equal to those
//     disks after the guest shut down, so the chain of one full and nine
//     incrementals adds up exactly; and an offline backup of the shut-off VM
//     (--mode shutdown, which must leave it off) restores all three disks,
//     root included, byte for byte.
func TestLiveVMConsistency(t *testing.T) {
	needVM(t, "losetup", "e2fsck", "dumpe2fs", "xfs_repair", "xfs_logprint")
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	if err := testvm.EnsureLibvirtd(ctx); err != nil {
		t.Fatal(err)
	}
	img, err := testvm.EnsureImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	baseInfo, err := os.Stat(img.RootQcow2)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	g, err := testvm.StartLibvirt(ctx, testvm.Options{Image: img, Dir: dir, Disks: []testvm.DiskSpec{
		{FS: "ext4", Mount: "/data", SizeMiB: 256},
		{FS: "xfs", Mount: "/data2"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Destroy(context.Background()) })
	if _, err := g.WaitAgent(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest %s up after %s", g.Name, g.BootTime.Round(time.Millisecond))
	if len(g.Disks) != 3 || g.Disks[1].Target != "vdb" || g.Disks[2].Target != "vdc" {
		t.Fatalf("guest disks: %+v", g.Disks)
	}

	vcInstallHook(t, ctx, g)
	vcPut(t, ctx, g, "/usr/local/bin/kura-test-writer", vcWriter)
	vcPut(t, ctx, g, "/usr/local/bin/kura-test-ordered", vcOrdered)
	vcSh(t, ctx, g, `systemd-run --quiet --unit=kura-writer --collect /bin/bash /usr/local/bin/kura-test-writer &&
systemd-run --quiet --unit=kura-ordered --collect /bin/bash /usr/local/bin/kura-test-ordered`)
	w := vcWaitCounter(t, ctx, g, "/run/kura-writer.iter", 3)
	o := vcWaitCounter(t, ctx, g, "/run/kura-ordered.iter", 3)
	// The hook stops the writer's process group: it must lead one.
	if out := vcSh(t, ctx, g, `p=$(cat /run/kura-writers/writer.pid); echo $p $(ps -o pgid= -p $p)`); len(strings.Fields(out)) != 2 || strings.Fields(out)[0] != strings.Fields(out)[1] {
		t.Fatalf("the writer does not lead its process group (pid, pgid): %q", out)
	}

	e := newEnv(t)
	e.ok("init")
	work := filepath.Join(dir, "restored")
	if err := os.Mkdir(work, 0o755); err != nil {
		t.Fatal(err)
	}
	nsnap := 0
	freezes := 0
	checkOrder := func(t *testing.T, label string, a, b int) {
		t.Helper()
		if !(b <= a && a <= b+1) {
			t.Errorf("%s: cross-disk order broken: a (vdb) = %d, b (vdc) = %d; want b ≤ a ≤ b+1", label, a, b)
		}
	}
	lastA := 0

	// sub gives a subtest the repository, failing that subtest on errors.
	sub := func(t *testing.T) *env { c := *e; c.t = t; return &c }

	t.Run("app full and incrementals", func(t *testing.T) {
		e := sub(t)
		for k := 0; k < 4; k++ {
			// Let both writers get on between backups.
			w = vcWaitCounter(t, ctx, g, "/run/kura-writer.iter", w+4)
			o = vcWaitCounter(t, ctx, g, "/run/kura-ordered.iter", o+4)
			t0 := time.Now()
			r := e.run("backup", "vm", g.Name)
			if r.code != 0 {
				diag, _ := g.ExecFull(ctx, nil, "/bin/sh", "-c", "cat /run/kura-hook.log")
				t.Fatalf("app backup %d: exit %d\n%s%s\nfreeze hook log:\n%s", k+1, r.code, r.stdout, r.stderr, diag.Stdout)
			}
			out := r.stdout
			nsnap++
			s := vcLatest(t, e, g.Name, nsnap)
			label := fmt.Sprintf("app backup %d (%s %s)", k+1, s.Kind, s.ID[:8])
			t.Logf("%s in %s, freeze %.0f ms, %d bytes read", label, time.Since(t0).Round(time.Millisecond), s.Stats.FreezeMillis, s.Stats.BytesRead)
			wantKind, wantRead := "incremental", "changed"
			if k == 0 {
				wantKind, wantRead = "full", "full"
			}
			if s.Kind != wantKind || s.Mode != "app" || !strings.Contains(out, "guest frozen") {
				t.Fatalf("%s: kind %q mode %q, want %s app:\n%s", label, s.Kind, s.Mode, wantKind, out)
			}
			for _, d := range s.Disks {
				if d.Read != wantRead && !(k == 0 && strings.HasPrefix(d.Read, "full")) {
					t.Errorf("%s: disk %s read %q, want %q", label, d.Name, d.Read, wantRead)
				}
			}
			n, err := strconv.Atoi(strings.TrimSpace(vcSh(t, ctx, g, "cat /run/kura-freeze-count")))
			if err != nil || n != freezes+1 {
				t.Fatalf("%s: the freeze hook ran %d times in all, want %d (%v); hook log:\n%s", label, n, freezes+1, err, vcSh(t, ctx, g, "cat /run/kura-hook.log"))
			}
			freezes = n
			manifest, hookLog, _ := strings.Cut(vcSh(t, ctx, g, fmt.Sprintf("cat /run/kura-freeze-%d.sha256; echo ---; tail -n 2 /run/kura-hook.log", n)), "---\n")
			t.Logf("%s: freeze hook (guest uptime): %s", label, strings.ReplaceAll(strings.TrimSpace(hookLog), "\n", "; "))
			if tmp := strings.Count(manifest, ".tmp\n"); tmp > 0 {
				t.Logf("%s: the freeze caught the writer in the middle of %d file(s)", label, tmp)
			}
			var a, b int
			for _, d := range []struct{ target, fs, mount string }{{"vdb", "ext4", "/data"}, {"vdc", "xfs", "/data2"}} {
				want := vcParseManifest(t, manifest, d.mount)
				if len(want) == 0 {
					t.Fatalf("%s: the freeze manifest of /%s is empty", label, d.mount)
				}
				v := vcCheckFrozen(t, e, s.ID, d.target, d.fs, work, want)
				if d.target == "vdb" {
					a = v
				} else {
					b = v
				}
				t.Logf("%s: %s (%s) checks clean and holds the %d files of freeze %d; counter %d", label, d.target, d.fs, len(want), n, v)
			}
			checkOrder(t, label, a, b)
			if a <= lastA {
				t.Errorf("%s: the ordered writer's counter did not advance (%d after %d)", label, a, lastA)
			}
			lastA = a
		}
	})

	t.Run("cross-disk order in crash mode", func(t *testing.T) {
		e := sub(t)
		for k := 0; k < 5; k++ {
			w = vcWaitCounter(t, ctx, g, "/run/kura-writer.iter", w+2)
			o = vcWaitCounter(t, ctx, g, "/run/kura-ordered.iter", o+4)
			t0 := time.Now()
			out := e.ok("backup", "vm", g.Name, "--mode", "crash")
			nsnap++
			s := vcLatest(t, e, g.Name, nsnap)
			label := fmt.Sprintf("crash backup %d (%s %s)", k+1, s.Kind, s.ID[:8])
			t.Logf("%s in %s, %d bytes read", label, time.Since(t0).Round(time.Millisecond), s.Stats.BytesRead)
			if s.Kind != "incremental" || s.Mode != "crash" || s.Stats.FreezeMillis != 0 {
				t.Fatalf("%s: kind %q mode %q freeze %v ms, want an incremental crash backup without freeze:\n%s", label, s.Kind, s.Mode, s.Stats.FreezeMillis, out)
			}
			for _, d := range s.Disks {
				if d.Read != "changed" {
					t.Errorf("%s: disk %s read %q, want changed", label, d.Name, d.Read)
				}
			}
			if n := strings.TrimSpace(vcSh(t, ctx, g, "cat /run/kura-freeze-count")); n != strconv.Itoa(freezes) {
				t.Errorf("%s: crash mode ran the freeze hook (count %s, was %d)", label, n, freezes)
			}
			a := vcCheckCrash(t, e, s.ID, "vdb", "ext4", work)
			b := vcCheckCrash(t, e, s.ID, "vdc", "xfs", work)
			t.Logf("%s: counters a=%d b=%d; both disks fsck clean after replay", label, a, b)
			checkOrder(t, label, a, b)
			if a <= lastA {
				t.Errorf("%s: the ordered writer's counter did not advance (%d after %d)", label, a, lastA)
			}
			lastA = a
		}
	})

	t.Run("whole-disk identity", func(t *testing.T) {
		e := sub(t)
		// Quiesce the data disks: stop both writers, unmount the disks.
		vcSh(t, ctx, g, `systemctl stop kura-writer kura-ordered; rm -f /run/kura-writers/*.pid; umount /data /data2 && sync`)
		t0 := time.Now()
		e.ok("backup", "vm", g.Name)
		nsnap++
		live := vcLatest(t, e, g.Name, nsnap)
		t.Logf("live backup of the quiet disks (%s %s %s) in %s", live.Kind, live.Mode, live.ID[:8], time.Since(t0).Round(time.Millisecond))
		if live.Kind != "incremental" {
			t.Errorf("live backup of the quiet disks is %q, want incremental", live.Kind)
		}
		vcShutdown(t, ctx, g)

		// The live restore point, at the end of a chain of one full and
		// nine incrementals, equals the data disks now that they are off.
		for _, d := range g.Disks[1:] {
			vcSameDisk(t, e, live.ID, d, work)
		}

		// An offline backup of the shut-off VM: shutdown mode reads the
		// files and must leave the VM off.
		t0 = time.Now()
		e.ok("backup", "vm", g.Name, "--mode", "shutdown")
		nsnap++
		off := vcLatest(t, e, g.Name, nsnap)
		t.Logf("offline backup (%s %s %s) in %s", off.Kind, off.Mode, off.ID[:8], time.Since(t0).Round(time.Millisecond))
		if off.Mode != "shutdown" {
			t.Errorf("offline backup has mode %q, want shutdown", off.Mode)
		}
		if st := vcVirsh(t, ctx, "domstate", g.Name); st != "shut off" {
			t.Errorf("after a backup of the shut-off VM it is %q, want it left shut off", st)
		}
		disks := g.Disks
		if cur, err := os.Stat(img.RootQcow2); err != nil || !os.SameFile(cur, baseInfo) {
			t.Logf("the guest image %s was rebuilt during the test: not comparing the root disk", img.RootQcow2)
			disks = disks[1:]
		}
		for _, d := range disks {
			vcSameDisk(t, e, off.ID, d, work)
		}
	})
	t.Logf("TestLiveVMConsistency took %s (%d restore points)", time.Since(start).Round(time.Second), nsnap)
}

// vcSh runs a shell script in the guest and returns its standard output; it
// fails the test unless the script exits 0.
func vcSh(t *testing.T, ctx context.Context, g *testvm.Guest, script string) string {
	t.Helper()
	r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", script)
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("in the guest: %s\nexit %d, %v\nstdout: %s\nstderr: %s", script, r.ExitCode, err, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// vcPut writes an executable file in the guest.
func vcPut(t *testing.T, ctx context.Context, g *testvm.Guest, path, content string) {
	t.Helper()
	r, err := g.ExecFull(ctx, []byte(content), "/bin/sh", "-c", "cat >"+path+" && chmod 755 "+path)
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("writing %s in the guest: exit %d, %v: %s", path, r.ExitCode, err, r.Stderr)
	}
}

// vcInstallHook restarts the guest agent with vcHook as its freeze hook.
func vcInstallHook(t *testing.T, ctx context.Context, g *testvm.Guest) {
	t.Helper()
	if err := g.InstallFreezeHook(ctx, vcHook); err != nil {
		t.Fatal(err)
	}
}

// vcWaitCounter waits until the number in the guest file path is at least
// min, and returns it.
func vcWaitCounter(t *testing.T, ctx context.Context, g *testvm.Guest, path string, min int) int {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out := vcSh(t, ctx, g, "cat "+path+" 2>/dev/null || echo 0")
		n, err := strconv.Atoi(strings.TrimSpace(out))
		if err == nil && n >= min {
			return n
		}
		if time.Now().After(deadline) {
			diag, _ := g.ExecFull(ctx, nil, "/bin/sh", "-c", "cat /run/kura-hook.log; ps -e -o pid,pgid,stat,args; systemctl status kura-writer kura-ordered")
			t.Fatalf("%s in the guest is %q after 2 minutes, want at least %d: a writer stopped\n%s", path, out, min, diag.Stdout)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// vcLatest returns the newest restore point of name, checking that there
// are want of them.
func vcLatest(t *testing.T, e *env, name string, want int) vcSnap {
	t.Helper()
	var ss []vcSnap
	out := e.ok("snapshots", "--json", "--name", name)
	if err := json.Unmarshal([]byte(out), &ss); err != nil {
		t.Fatalf("snapshots --json: %v\n%s", err, out)
	}
	if len(ss) != want {
		t.Fatalf("%d restore points of %s, want %d", len(ss), name, want)
	}
	return ss[len(ss)-1]
}

// vcRestore restores one disk of a restore point to a raw file in dir,
// removed at the end of the test (or earlier by the caller).
func vcRestore(t *testing.T, e *env, id, disk, dir string) string {
	t.Helper()
	path := filepath.Join(dir, id[:8]+"-"+disk+".raw")
	e.ok("restore", id, "--disk", disk, "--to", path)
	t.Cleanup(func() { os.Remove(path) })
	return path
}

// vcParseManifest reads the lines "HASH  PATH" of sha256sum for the files
// under the guest directory mount, keyed by their path relative to it.
func vcParseManifest(t *testing.T, s, mount string) map[string]string {
	t.Helper()
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		sum, path, ok := strings.Cut(line, "  ")
		if !ok || len(sum) != 64 || !strings.HasPrefix(path, "/") {
			t.Fatalf("bad manifest line %q", line)
		}
		if rel, ok := strings.CutPrefix(path, mount+"/"); ok {
			m[rel] = sum
		}
	}
	return m
}

// vcHostManifest is the sha256 of every regular file under root (except
// root/ord), keyed by its path relative to root.
func vcHostManifest(root string) (map[string]string, error) {
	m := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		if d.IsDir() && rel == "ord" {
			return filepath.SkipDir
		}
		if !d.Type().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		m[rel] = hex.EncodeToString(h.Sum(nil))
		return nil
	})
	return m, err
}

// vcDiffManifests describes how got differs from want, "" if not.
func vcDiffManifests(want, got map[string]string) string {
	var diffs []string
	for p, sum := range want {
		switch g, ok := got[p]; {
		case !ok:
			diffs = append(diffs, "missing "+p)
		case g != sum:
			diffs = append(diffs, "different content "+p)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, "not in the guest then "+p)
		}
	}
	sort.Strings(diffs)
	if len(diffs) > 20 {
		diffs = append(diffs[:20], fmt.Sprintf("… %d more", len(diffs)-20))
	}
	return strings.Join(diffs, "; ")
}

// vcFsck checks a filesystem image read-only and fails the test unless it
// is clean.
func vcFsck(t *testing.T, label, fsType, path string) {
	t.Helper()
	var c *exec.Cmd
	if fsType == "ext4" {
		c = exec.Command("e2fsck", "-fn", path)
	} else {
		c = exec.Command("xfs_repair", "-n", "-f", path)
	}
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("%s: %s does not check clean: %v\n%s", label, c, err, out)
	}
}

// vcMount attaches file to a loop device and mounts it with opts on a new
// directory. release unmounts and detaches; t.Cleanup calls it too, so
// nothing stays behind when the test stops early.
func vcMount(t *testing.T, file, fsType, opts string, readOnly bool) (mnt string, release func()) {
	t.Helper()
	args := []string{"--find", "--show"}
	if readOnly {
		args = append(args, "--read-only")
	}
	out, err := exec.Command("losetup", append(args, file)...).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	// Outside t.TempDir, whose removal must never descend into a mount.
	mnt, err = os.MkdirTemp("", "kura-vc-mnt-")
	if err != nil {
		exec.Command("losetup", "-d", dev).Run()
		t.Fatal(err)
	}
	mounted := false
	var once sync.Once
	release = func() {
		once.Do(func() {
			if mounted {
				if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
					t.Errorf("umount %s: %v: %s", mnt, err, out)
					exec.Command("umount", "-l", mnt).Run()
				}
			}
			if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
				t.Errorf("losetup -d %s: %v: %s", dev, err, out)
			}
			os.Remove(mnt)
		})
	}
	t.Cleanup(release)
	if out, err := exec.Command("mount", "-t", fsType, "-o", opts, dev, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount -t %s -o %s %s (%s): %v: %s", fsType, opts, dev, file, err, out)
	}
	mounted = true
	return mnt, release
}

// vcCounter reads the ordered writer's counter in a mounted data disk.
func vcCounter(t *testing.T, label, mnt string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(mnt, "ord", "ctr"))
	if err != nil {
		t.Fatalf("%s: %v", label, err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("%s: the ordered writer's counter is %q: %v", label, b, err)
	}
	return n
}

// vcCheckFrozen checks one data disk of an app-consistent restore point:
// the restored image has nothing but a freeze's leftovers to recover (ext4:
// checks clean, no journal recovery pending; xfs: the log holds only the
// superblock records with which a freeze covers it), mounted read-only
// without recovery it holds exactly the files of the freeze manifest want,
// and xfs checks clean once that log is replayed. It returns the ordered
// writer's counter on the disk.
func vcCheckFrozen(t *testing.T, e *env, id, disk, fsType, dir string, want map[string]string) int {
	t.Helper()
	label := fmt.Sprintf("restore point %s disk %s", id[:8], disk)
	raw := vcRestore(t, e, id, disk, dir)
	defer os.Remove(raw)
	opts := "ro,norecovery,nouuid"
	if fsType == "ext4" {
		vcFsck(t, label, fsType, raw)
		out, err := exec.Command("dumpe2fs", "-h", raw).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: dumpe2fs: %v: %s", label, err, out)
		}
		if strings.Contains(string(out), "needs_recovery") {
			t.Errorf("%s: the frozen ext4 filesystem needs journal recovery", label)
		}
		opts = "ro,noload"
	} else {
		// Freezing xfs covers its log with superblock-only transactions,
		// which xfs_repair -n calls "valuable metadata changes": anything
		// else in the log would be metadata the freeze did not write back.
		out, err := exec.Command("xfs_logprint", "-t", raw).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: xfs_logprint: %v: %s", label, err, out)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if _, rest, ok := strings.Cut(line, "start blkno:"); (ok && !strings.HasPrefix(rest, "0x0 ")) || strings.Contains(line, "INODE") {
				t.Errorf("%s: the log of the frozen xfs holds more than the superblock: %q\n%s", label, line, out)
				break
			}
		}
	}
	mnt, release := vcMount(t, raw, fsType, opts, true)
	got, err := vcHostManifest(mnt)
	if err != nil {
		t.Fatalf("%s: %v", label, err)
	}
	if d := vcDiffManifests(want, got); d != "" {
		t.Errorf("%s: the files differ from those the guest had when it froze: %s", label, d)
	}
	n := vcCounter(t, label, mnt)
	release()
	if fsType == "xfs" {
		_, release := vcMount(t, raw, fsType, "rw,nouuid", false)
		release()
		vcFsck(t, label+" after replaying the log", fsType, raw)
	}
	return n
}

// vcCheckCrash checks one data disk of a crash-consistent restore point:
// mounted read-write it replays its journal or log, and then checks clean.
// It returns the ordered writer's counter on the disk.
func vcCheckCrash(t *testing.T, e *env, id, disk, fsType, dir string) int {
	t.Helper()
	label := fmt.Sprintf("restore point %s disk %s", id[:8], disk)
	raw := vcRestore(t, e, id, disk, dir)
	defer os.Remove(raw)
	opts := "rw"
	if fsType == "xfs" {
		opts = "rw,nouuid"
	}
	mnt, release := vcMount(t, raw, fsType, opts, false)
	n := vcCounter(t, label, mnt)
	if _, err := os.Stat(filepath.Join(mnt, "w")); err != nil {
		t.Errorf("%s: the writer's directory: %v", label, err)
	}
	release()
	vcFsck(t, label+" after replay", fsType, raw)
	return n
}

// vcSameDisk restores one disk of a restore point and compares it with the
// guest's disk file, byte for byte as the guest sees it.
func vcSameDisk(t *testing.T, e *env, id string, d testvm.Disk, dir string) {
	t.Helper()
	raw := vcRestore(t, e, id, d.Target, dir)
	defer os.Remove(raw)
	out, err := exec.Command("qemu-img", "info", "--output=json", "-f", d.Format, "-U", d.Path).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", d.Path, err)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(raw)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != info.VirtualSize {
		t.Errorf("restore point %s disk %s: restored %d bytes, the disk has %d", id[:8], d.Target, st.Size(), info.VirtualSize)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", d.Format, "-F", "raw", d.Path, raw).CombinedOutput(); err != nil {
		t.Errorf("restore point %s disk %s differs from the guest's disk %s: %v\n%s", id[:8], d.Target, d.Path, err, out)
		return
	}
	t.Logf("restore point %s disk %s (%d MiB) is identical to the guest's disk", id[:8], d.Target, info.VirtualSize>>20)
}

// vcVirsh runs virsh on testvm's libvirt and returns its trimmed output.
func vcVirsh(t *testing.T, ctx context.Context, args ...string) string {
	t.Helper()
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-q", "-c", testvm.LibvirtURI}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// vcShutdown shuts the guest down and waits until it is off. (virsh
// shutdown --mode agent fails on the test guest: qemu-ga runs "shutdown -h
// +0", which systemd schedules through logind, and the guest has no D-Bus.)
func vcShutdown(t *testing.T, ctx context.Context, g *testvm.Guest) {
	t.Helper()
	// The agent may die before it answers.
	g.ExecFull(ctx, nil, "/bin/systemctl", "--no-block", "poweroff")
	deadline := time.Now().Add(3 * time.Minute)
	for {
		st := vcVirsh(t, ctx, "domstate", g.Name)
		if st == "shut off" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest %s is %q 3 minutes after systemctl poweroff", g.Name, st)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
