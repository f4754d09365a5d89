package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/testvm"
)

// Row is one measured backup.
type Row struct {
	Tool string `json:"tool"` // kura, vnb, vnb-z
	Step string `json:"step"` // full, inc0, inc, freeze-NN
	Meas
	Kind        string           `json:"kind"`                    // full or incremental
	Mode        string           `json:"mode,omitempty"`          // kura: the snapshot's consistency mode
	BytesRead   int64            `json:"bytes_read"`              // from the NBD export
	ReadPerDisk map[string]int64 `json:"read_per_disk,omitempty"` // virtnbdbackup: data extents per disk
	DiskRead    string           `json:"disk_read,omitempty"`     // kura: disks[].read
	Stored      int64            `json:"stored"`                  // repository / output directory after the backup (du -sb)
	StoredDelta int64            `json:"stored_delta"`            // growth by this backup
	DataFiles   int64            `json:"data_files,omitempty"`    // virtnbdbackup: the *.data files this backup wrote
	FreezeMS    float64          `json:"freeze_ms"`               // freeze call start to thaw return
	// The freeze window's parts: the guest agent's freeze call, what the
	// tool does while the guest is frozen (start the backup job and the
	// checkpoint), the thaw call. Kura: stats.freeze_call_ms, instant_ms,
	// thaw_call_ms when it records them; virtnbdbackup: timed by the wrapper.
	FreezeCallMS float64   `json:"freeze_call_ms,omitempty"`
	InstantMS    float64   `json:"instant_ms,omitempty"`
	ThawCallMS   float64   `json:"thaw_call_ms,omitempty"`
	Fio          *FioStats `json:"fio,omitempty"` // the guest's writes during the backup
}

// driver backs up one guest with one tool.
type driver interface {
	init(ctx context.Context) error
	backup(ctx context.Context, step, level string) (Row, error)
	restore(ctx context.Context, dest string) (string, error) // the data disk vdb as a file under dest
}

func (b *bench) newDriver(tool, dir string, g *testvm.Guest) driver {
	switch tool {
	case "kura":
		return &kuraDriver{b: b, g: g, repo: filepath.Join(dir, "repo"), cache: filepath.Join(dir, "kura-cache")}
	default:
		return &vnbDriver{b: b, g: g, tool: tool, out: filepath.Join(dir, "backup"), freezeLog: filepath.Join(dir, "vnb-freeze.jsonl"), compress: tool == "vnb-z"}
	}
}

// --- kura ----------------------------------------------------------------------

type kuraDriver struct {
	b           *bench
	g           *testvm.Guest
	repo, cache string
	stored      int64
}

const kuraPassword = "kura-bench-password"

func (k *kuraDriver) env() ([]string, []string) {
	return []string{"KURA_REPO=" + k.repo, "KURA_PASSWORD=" + kuraPassword, "XDG_CACHE_HOME=" + k.cache},
		[]string{"KURA_CACHE", "KURA_PASSWORD_FILE"}
}

func (k *kuraDriver) run(ctx context.Context, args ...string) (string, error) {
	env, unset := k.env()
	out, err := runEnv(ctx, env, unset, k.b.cfg.Kura, args...)
	return out, err
}

func (k *kuraDriver) init(ctx context.Context) error {
	_, err := k.run(ctx, "init")
	return err
}

type kuraSnapshot struct {
	ID    string `json:"id"`
	Kind  string `json:"kind"`
	Mode  string `json:"mode"`
	Disks []struct {
		Name      string `json:"name"`
		Read      string `json:"read"`
		DataBytes int64  `json:"data_bytes"`
	} `json:"disks"`
	Stats struct {
		Start       time.Time `json:"start"`
		End         time.Time `json:"end"`
		BytesRead   int64     `json:"bytes_read"`
		BytesNew    int64     `json:"bytes_new"`
		BytesStored int64     `json:"bytes_stored"`
		FreezeMS    float64   `json:"freeze_ms"`
		FreezeCall  float64   `json:"freeze_call_ms"`
		Instant     float64   `json:"instant_ms"`
		ThawCall    float64   `json:"thaw_call_ms"`
		Note        string    `json:"note"`
	} `json:"stats"`
}

func (k *kuraDriver) backup(ctx context.Context, step, level string) (Row, error) {
	env, unset := k.env()
	argv := append([]string{k.b.cfg.Kura, "-q"}, k.b.cfg.KuraFlags...)
	argv = append(argv, "backup", "vm", k.g.Name)
	m, _, err := k.b.measure(ctx, "kura-"+step, k.g.PID, env, unset, argv...)
	row := Row{Tool: "kura", Step: step, Meas: m}
	if err != nil {
		return row, err
	}
	out, err := k.run(ctx, "snapshots", "--json", "--name", k.g.Name)
	if err != nil {
		return row, err
	}
	var ss []kuraSnapshot
	if err := json.Unmarshal([]byte(out), &ss); err != nil || len(ss) == 0 {
		return row, fmt.Errorf("kura snapshots --json: %v: %s", err, benchutil.FirstLine(out))
	}
	s := ss[len(ss)-1]
	row.Kind, row.Mode = s.Kind, s.Mode
	row.BytesRead = s.Stats.BytesRead
	row.FreezeMS = s.Stats.FreezeMS
	row.FreezeCallMS, row.InstantMS, row.ThawCallMS = s.Stats.FreezeCall, s.Stats.Instant, s.Stats.ThawCall
	var reads []string
	for _, d := range s.Disks {
		reads = append(reads, d.Name+": "+d.Read)
	}
	row.DiskRead = strings.Join(reads, ", ")
	want := map[string]string{"full": "full", "inc": "incremental"}[level]
	if s.Kind != want {
		return row, fmt.Errorf("kura %s: snapshot %s is %q, expected %q (disks read: %s)", step, s.ID[:8], s.Kind, want, row.DiskRead)
	}
	if s.Mode != "app" {
		return row, fmt.Errorf("kura %s: snapshot %s has mode %q, not app (note: %s)", step, s.ID[:8], s.Mode, s.Stats.Note)
	}
	if row.Stored, err = benchutil.DirBytes(k.repo); err != nil {
		return row, err
	}
	row.StoredDelta, k.stored = row.Stored-k.stored, row.Stored
	logf("kura %s: %s, read %.1f MB, stored %+.1f MiB, frozen %.1f ms (%s)", step, s.Kind, float64(row.BytesRead)/1e6, float64(row.StoredDelta)/MiB, row.FreezeMS, row.DiskRead)
	return row, nil
}

func (k *kuraDriver) restore(ctx context.Context, dest string) (string, error) {
	p := filepath.Join(dest, "vdb.raw")
	env, unset := k.env()
	if _, _, err := k.b.measure(ctx, "kura-restore-vdb", 0, env, unset, k.b.cfg.Kura, "-q", "restore", k.g.Name+"@latest", "--disk", "vdb", "--to", p); err != nil {
		return "", err
	}
	return p, nil
}

// --- virtnbdbackup -----------------------------------------------------------

type vnbDriver struct {
	b              *bench
	g              *testvm.Guest
	tool           string
	out, freezeLog string
	compress       bool
	stored         int64
}

func (v *vnbDriver) init(ctx context.Context) error { return nil }

var vnbExtents = regexp.MustCompile(`\[([^\]]+)\]: (\d+) bytes of data extents to backup`)

func (v *vnbDriver) backup(ctx context.Context, step, level string) (Row, error) {
	before := fileSizes(v.out)
	freezes := len(readLines(v.freezeLog))
	// The wrapper runs /usr/bin/virtnbdbackup unchanged and records when
	// its fsFreeze call started and its fsThaw call returned.
	argv := []string{"/usr/bin/python3", v.b.cfg.VNBWrapper, "-d", v.g.Name, "-l", level, "-o", v.out, "-n"}
	if v.compress {
		argv = append(argv, "-z")
	}
	m, out, err := v.b.measure(ctx, v.tool+"-"+step, v.g.PID, []string{"VNB_FREEZE_OUT=" + v.freezeLog}, nil, argv...)
	row := Row{Tool: v.tool, Step: step, Meas: m, Kind: map[string]string{"full": "full", "inc": "incremental"}[level]}
	if err != nil {
		return row, err
	}
	if !strings.Contains(out, "Finished successfully") {
		return row, fmt.Errorf("virtnbdbackup did not say \"Finished successfully\"; see %s", m.Log)
	}
	row.ReadPerDisk = map[string]int64{}
	for _, mm := range vnbExtents.FindAllStringSubmatch(out, -1) {
		n, _ := strconv.ParseInt(mm[2], 10, 64)
		row.ReadPerDisk[mm[1]] += n
		row.BytesRead += n
	}
	if len(row.ReadPerDisk) == 0 {
		return row, fmt.Errorf("no \"bytes of data extents to backup\" in the output of virtnbdbackup; see %s", m.Log)
	}
	fl := readLines(v.freezeLog)
	if len(fl) != freezes+1 {
		return row, fmt.Errorf("virtnbdbackup %s: expected one freeze/thaw record in %s, found %d new ones: was the guest not frozen?", step, v.freezeLog, len(fl)-freezes)
	}
	var fr struct {
		FreezeStart float64 `json:"freeze_start"`
		FreezeEnd   float64 `json:"freeze_end"`
		ThawStart   float64 `json:"thaw_start"`
		ThawEnd     float64 `json:"thaw_end"`
		Frozen      bool    `json:"frozen"`
		Thawed      bool    `json:"thawed"`
	}
	if err := json.Unmarshal([]byte(fl[len(fl)-1]), &fr); err != nil {
		return row, fmt.Errorf("%s: %w", v.freezeLog, err)
	}
	if !fr.Frozen || !fr.Thawed {
		return row, fmt.Errorf("virtnbdbackup %s: the guest was not frozen (fsFreeze %v, fsThaw %v): the backup is not app-consistent", step, fr.Frozen, fr.Thawed)
	}
	row.Mode = "app"
	row.FreezeMS = (fr.ThawEnd - fr.FreezeStart) * 1000
	row.FreezeCallMS = (fr.FreezeEnd - fr.FreezeStart) * 1000
	row.InstantMS = (fr.ThawStart - fr.FreezeEnd) * 1000
	row.ThawCallMS = (fr.ThawEnd - fr.ThawStart) * 1000
	for f, n := range fileSizes(v.out) {
		if _, ok := before[f]; !ok && strings.HasSuffix(f, ".data") {
			row.DataFiles += n
		}
	}
	if row.Stored, err = benchutil.DirBytes(v.out); err != nil {
		return row, err
	}
	row.StoredDelta, v.stored = row.Stored-v.stored, row.Stored
	logf("%s %s: read %.1f MB %v, stored %+.1f MiB (data files %.1f MiB), frozen %.1f ms", v.tool, step, float64(row.BytesRead)/1e6, row.ReadPerDisk, float64(row.StoredDelta)/MiB, float64(row.DataFiles)/MiB, row.FreezeMS)
	return row, nil
}

func (v *vnbDriver) restore(ctx context.Context, dest string) (string, error) {
	rdir := filepath.Join(dest, "vnb-restore")
	if _, _, err := v.b.measure(ctx, v.tool+"-restore-vdb", 0, nil, nil,
		"virtnbdrestore", "-i", v.out, "-o", rdir, "-d", "vdb", "-n", "-L", filepath.Join(dest, "virtnbdrestore.log")); err != nil {
		return "", err
	}
	var images []string
	for f := range fileSizes(rdir) {
		if strings.HasPrefix(filepath.Base(f), "vdb") && !strings.HasSuffix(f, ".xml") && !strings.HasSuffix(f, ".log") {
			images = append(images, filepath.Join(rdir, f))
		}
	}
	if len(images) != 1 {
		return "", fmt.Errorf("virtnbdrestore: expected one image of vdb in %s, found %v", rdir, images)
	}
	// virtnbdrestore's qemu-nbd (--fork) exits on its own after the
	// restore disconnects: wait for it to release the image.
	raw := filepath.Join(dest, "vdb.raw")
	for i := 0; ; i++ {
		out, err := benchutil.Run(ctx, "qemu-img", "convert", "-O", "raw", images[0], raw)
		if err == nil {
			break
		}
		if !strings.Contains(out, "lock") || i == 60 {
			return "", err
		}
		time.Sleep(time.Second)
	}
	os.RemoveAll(rdir)
	return raw, nil
}

// --- restore check -------------------------------------------------------------

// checkRestored fscks a restored data disk and checks the files the guest
// wrote before the measured incremental backup against the guest's manifest.
func checkRestored(ctx context.Context, raw, dest string) (string, error) {
	if _, err := benchutil.Run(ctx, "e2fsck", "-fn", raw); err != nil {
		return "", fmt.Errorf("the restored data disk does not fsck clean: %w", err)
	}
	dump := filepath.Join(dest, "dump")
	if err := os.MkdirAll(dump, 0o755); err != nil {
		return "", err
	}
	if _, err := benchutil.Run(ctx, "debugfs", "-R", "rdump /inc "+dump, raw); err != nil {
		return "", err
	}
	dir := filepath.Join(dump, "inc")
	lines := readLines(filepath.Join(dir, "MANIFEST.sha256"))
	if len(lines) == 0 {
		return "", fmt.Errorf("the restored data disk has no /inc/MANIFEST.sha256: the files written before the incremental backup are missing")
	}
	for _, l := range lines {
		sum, name, ok := strings.Cut(l, "  ")
		if !ok {
			return "", fmt.Errorf("manifest line %q", l)
		}
		got, err := sha256File(filepath.Join(dir, strings.TrimPrefix(name, "*")))
		if err != nil {
			return "", err
		}
		if got != sum {
			return "", fmt.Errorf("restored /inc/%s: sha256 %s, the guest wrote %s", name, got, sum)
		}
	}
	os.RemoveAll(dump)
	return fmt.Sprintf("e2fsck -fn clean; %d files written by the guest before the incremental backup match its sha256 manifest", len(lines)), nil
}

func sha256File(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func readLines(p string) []string {
	f, err := os.Open(p)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			out = append(out, l)
		}
	}
	return out
}

func runEnv(ctx context.Context, env, unset []string, name string, args ...string) (string, error) {
	return benchutil.RunWith(ctx, benchutil.MergeEnv(env, unset), name, args...)
}

func sortedKeys(m map[string]int64) []string {
	var k []string
	for x := range m {
		k = append(k, x)
	}
	sort.Strings(k)
	return k
}
