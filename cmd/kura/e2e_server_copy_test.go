package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/catalog"
	"github.com/kura-backup/kura/internal/crypt"
)

// metricValue returns the value of the sample of metrics whose name and
// labels are series (as the exposition writes them), and whether there is
// one.
func metricValue(metrics, series string) (float64, bool) {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindStringSubmatch(metrics)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(m[1], 64)
	return v, err == nil
}

// snapTimes returns the restore points of e's repository by name, with
// their times, oldest first.
func snapTimes(e *env) map[string][]time.Time {
	e.t.Helper()
	var ss []struct {
		Name string    `json:"name"`
		Time time.Time `json:"time"`
	}
	if err := json.Unmarshal([]byte(e.ok("snapshots", "--json")), &ss); err != nil {
		e.t.Fatal(err)
	}
	out := map[string][]time.Time{}
	for _, s := range ss {
		out[s.Name] = append(out[s.Name], s.Time)
	}
	return out
}

// TestServerCopyJobs drives copy jobs in `kura server` without a VM: the
// restore points are put into the source with `kura backup image`, and the
// daemon, configured with copy jobs only (it then needs no libvirtd),
// copies them when asked by run-now. The copies restore byte for byte
// from the target, `kura runs` and `kura jobs` show the copy runs, the
// metrics show what is pending and the newest copy, a second run sends
// nothing, and the job's retention forgets in the target what it does not
// keep. Then, where libvirtd answers, a backup job (that selects no VM)
// triggers the copy job that follows it.
func TestServerCopyJobs(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kura server")
	}
	e := newEnv(t)
	e.ok("init", "--chunk-size", "256K")
	images := map[string]string{}
	for i, name := range []string{"web01", "db01", "mail"} {
		images[name] = filepath.Join(e.dir, name+"-disk0.raw")
		makeImage(t, images[name], 8<<20, uint64(40+i), 12)
	}
	// web01 three times, db01 and mail once: the copy job takes the
	// newest 2 of web01 and db01.
	e.ok("backup", "image", images["web01"], "--name", "web01")
	for i := range 2 {
		scribble(t, images["web01"], uint64(50+i), 4)
		e.ok("backup", "image", images["web01"], "--name", "web01")
	}
	e.ok("backup", "image", images["db01"], "--name", "db01")
	e.ok("backup", "image", images["mail"], "--name", "mail")

	off := *e
	off.repo, off.pw = filepath.Join(e.dir, "offsite"), "the offsite password"
	off.ok("init")
	mainPw := writeFile(t, e.dir, "main.pass", e.pw+"\n")
	offPw := writeFile(t, e.dir, "offsite.pass", off.pw+"\n")
	listen := freePort(t)
	cfgPath := filepath.Join(e.dir, "kura.yaml")
	writeCfg := func(jobs, when string) {
		cfg := fmt.Sprintf(`repositories:
  main:
    path: %s
    password_file: %s
  offsite:
    path: %s
    password_file: %s
%scopies:
  - name: offsite
    from: main
    to: offsite
    vms: [web*, db01]
    latest: 2
    %s
    retention: {keep_last: 2}
    verify: true
server:
  listen: %s
  state_dir: %s
`, e.repo, mainPw, off.repo, offPw, jobs, when, listen, filepath.Join(e.dir, "state"))
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeCfg("", `schedule: "0 6 * * *"`)
	s := e.startServer(cfgPath, listen)

	// At start the daemon reads what the target lacks.
	s.waitFor(time.Minute, "the pending gauges", func() bool {
		_, ok := metricValue(s.metrics(), `kura_copy_pending_restore_points{copy_job="offsite",vm="db01"}`)
		return ok
	})
	m := s.metrics()
	for series, want := range map[string]float64{
		`kura_copy_pending_restore_points{copy_job="offsite",vm="web01"}`:   2,
		`kura_copy_pending_restore_points{copy_job="offsite",vm="db01"}`:    1,
		`kura_copy_newest_timestamp_seconds{copy_job="offsite",vm="web01"}`: 0,
	} {
		if v, ok := metricValue(m, series); !ok || v != want {
			t.Errorf("%s = %v (%v), want %v\n%s", series, v, ok, want, m)
		}
	}
	if strings.Contains(m, `vm="mail"`) {
		t.Errorf("the metrics name a VM the copy job does not select:\n%s", m)
	}

	// A run by run-now: 3 restore points copied, with --verify.
	out := e.ok("run-now", "offsite", "--wait", "--config", cfgPath)
	runs := s.runs()
	r := runs[0]
	if r.Job != "offsite" || r.Kind != catalog.KindCopy || !r.Manual || r.Status != catalog.StatusSucceeded || !strings.Contains(r.Summary, "3 copied") ||
		!strings.Contains(out, "succeeded") {
		t.Fatalf("the copy run: %+v; run-now --wait printed %q\n%s", r, out, s.log.String())
	}
	if out := e.ok("runs", "--config", cfgPath); !regexp.MustCompile(`(?m)^` + fmt.Sprint(r.ID) + `\s+copy\s+offsite\s.*succeeded\s+3 copied`).MatchString(out) {
		t.Errorf("kura runs does not show the copy run:\n%s", out)
	}
	out = e.ok("runs", "--config", cfgPath, "--run", fmt.Sprint(r.ID))
	if !strings.HasPrefix(out, "RESTORE POINT") || strings.Count(out, "copied") != 3 || !strings.Contains(out, "web01") || !strings.Contains(out, "db01") {
		t.Errorf("runs --run of the copy run:\n%s", out)
	}
	if out := e.ok("jobs", "--config", cfgPath); !regexp.MustCompile(`offsite\s+0 6 \* \* \*\s+web\*,db01 \(latest 2\)\s+copy\s+main -> offsite\s.*succeeded`).MatchString(out) {
		t.Errorf("kura jobs does not show the copy job:\n%s", out)
	}

	// The target has the newest 2 of web01 and db01, which restore byte
	// for byte.
	src, dst := snapTimes(e), snapTimes(&off)
	if len(dst["web01"]) != 2 || len(dst["db01"]) != 1 || len(dst["mail"]) != 0 || !dst["web01"][1].Equal(src["web01"][2]) {
		t.Fatalf("the target's restore points %v; the source's %v", dst, src)
	}
	for _, name := range []string{"web01", "db01"} {
		to := filepath.Join(e.dir, "restored-"+name)
		off.ok("restore", name+"@latest", "--to", to)
		sameFile(t, filepath.Join(to, name+"-disk0.raw"), images[name])
	}

	m = s.metrics()
	sent, _ := metricValue(m, `kura_copy_bytes_sent_total{copy_job="offsite"}`)
	for series, want := range map[string]float64{
		`kura_copy_pending_restore_points{copy_job="offsite",vm="web01"}`:   0,
		`kura_copy_pending_restore_points{copy_job="offsite",vm="db01"}`:    0,
		`kura_copy_newest_timestamp_seconds{copy_job="offsite",vm="web01"}`: float64(src["web01"][2].Unix()),
		`kura_copy_newest_timestamp_seconds{copy_job="offsite",vm="db01"}`:  float64(src["db01"][0].Unix()),
		`kura_copy_runs_total{copy_job="offsite",status="succeeded"}`:       1,
	} {
		if v, ok := metricValue(m, series); !ok || v != want {
			t.Errorf("%s = %v (%v), want %v", series, v, ok, want)
		}
	}
	if sent < 1<<20 {
		t.Errorf("kura_copy_bytes_sent_total %v after copying three 8 MiB images", sent)
	}
	for _, series := range []string{`kura_copy_duration_seconds{copy_job="offsite"}`, `kura_copy_last_success_timestamp_seconds{copy_job="offsite"}`} {
		if v, ok := metricValue(m, series); !ok || v <= 0 {
			t.Errorf("%s = %v (%v)", series, v, ok)
		}
	}

	// Again: nothing to send.
	if r := s.runNow("offsite"); r.Status != catalog.StatusSucceeded || !strings.Contains(r.Summary, "0 copied (0 B sent), 3 already in the target") {
		t.Fatalf("the second copy run: %+v\n%s", r, s.log.String())
	}
	m = s.metrics()
	if v, _ := metricValue(m, `kura_copy_bytes_sent_total{copy_job="offsite"}`); v != sent {
		t.Errorf("the second run sent %v bytes", v-sent)
	}
	if v, _ := metricValue(m, `kura_copy_runs_total{copy_job="offsite",status="succeeded"}`); v != 2 {
		t.Errorf("kura_copy_runs_total succeeded = %v after two runs", v)
	}

	// The target out of reach: the run fails, says why, and is counted;
	// back, the next run has nothing to do.
	moved := off.repo + ".away"
	if err := os.Rename(off.repo, moved); err != nil {
		t.Fatal(err)
	}
	// run-now --wait takes a manual run due up to a second before it
	// asked for its own: the run just before, which did nothing, must be
	// older than that.
	time.Sleep(1100 * time.Millisecond)
	res := e.fails("failed: see `kura runs --run", "run-now", "offsite", "--wait", "--config", cfgPath)
	if r := s.runs()[0]; r.Kind != catalog.KindCopy || r.Status != catalog.StatusFailed || !strings.HasPrefix(r.Summary, "not copied: ") || !strings.Contains(res.stdout, "offsite: failed") {
		t.Fatalf("the copy run without its target: %+v; run-now printed %q", r, res.stdout)
	}
	if err := os.Rename(moved, off.repo); err != nil {
		t.Fatal(err)
	}
	m = s.metrics()
	for series, want := range map[string]float64{
		`kura_copy_runs_total{copy_job="offsite",status="failed"}`: 1,
		`kura_errors_total{kind="copy"}`:                           1,
	} {
		if v, ok := metricValue(m, series); !ok || v != want {
			t.Errorf("%s = %v (%v), want %v", series, v, ok, want)
		}
	}
	if r := s.runNow("offsite"); r.Status != catalog.StatusSucceeded || !strings.Contains(r.Summary, "0 copied (0 B sent), 3 already in the target") {
		t.Fatalf("the copy run with the target back: %+v\n%s", r, s.log.String())
	}

	// A new restore point of web01: the next run copies it, and the
	// retention (keep_last 2) forgets the oldest copy of web01.
	scribble(t, images["web01"], 60, 4)
	e.ok("backup", "image", images["web01"], "--name", "web01")
	r = s.runNow("offsite")
	if r.Status != catalog.StatusSucceeded || !strings.Contains(r.Summary, "1 copied") || !strings.Contains(r.Summary, "2 already in the target") ||
		!strings.Contains(r.Summary, "retention forgot 1 in the target") {
		t.Fatalf("the copy run after a new backup: %+v\n%s", r, s.log.String())
	}
	if out := e.ok("runs", "--config", cfgPath, "--run", fmt.Sprint(r.ID)); strings.Count(out, "copied") != 1 || strings.Count(out, "forgotten") != 1 {
		t.Errorf("runs --run of the copy run with retention:\n%s", out)
	}
	src, dst = snapTimes(e), snapTimes(&off)
	if len(dst["web01"]) != 2 || !dst["web01"][1].Equal(src["web01"][3]) || !dst["web01"][0].Equal(src["web01"][2]) {
		t.Fatalf("the target's restore points after retention %v; the source's %v", dst, src)
	}
	to := filepath.Join(e.dir, "restored-web01-again")
	off.ok("restore", "web01@latest", "--to", to)
	sameFile(t, filepath.Join(to, "web01-disk0.raw"), images["web01"])
	if r := s.runNow("offsite"); r.Status != catalog.StatusSucceeded || !strings.Contains(r.Summary, "0 copied (0 B sent)") {
		t.Fatalf("the copy run after retention: %+v", r)
	}
	if out := off.ok("verify"); !strings.Contains(out, "no problems found") {
		t.Errorf("verify on the target: %s", out)
	}

	// After a backup job: each of its runs, once every VM of it is done,
	// starts the copy job. The job selects no VM (there is none here), so
	// its runs end at once; the daemon connects to libvirtd once the
	// reload brings it a backup job.
	if _, err := os.Stat("/var/run/libvirt/libvirt-sock"); err != nil || os.Geteuid() != 0 {
		t.Skip("no libvirtd to list VMs: the rest needs a backup job")
	}
	if _, err := exec.LookPath("virsh"); err != nil {
		t.Skip("no libvirt")
	}
	writeCfg(`jobs:
  - name: nightly
    repository: main
    vms: [kura-test-no-such-vm]
    schedule: "0 3 * * *"
`, "after: nightly")
	reloads := strings.Count(s.log.String(), "configuration reloaded")
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(time.Minute, "the reload", func() bool { return strings.Count(s.log.String(), "configuration reloaded") > reloads })
	scribble(t, images["db01"], 70, 4)
	e.ok("backup", "image", images["db01"], "--name", "db01")
	if out := e.ok("run-now", "nightly", "--wait", "--config", cfgPath); !strings.Contains(out, "succeeded") {
		t.Fatalf("run-now nightly printed %q", out)
	}
	var nightly catalog.Run
	for _, r := range s.runs() {
		if r.Job == "nightly" {
			nightly = r
			break
		}
	}
	var copied catalog.Run
	s.waitFor(time.Minute, "the copy after nightly", func() bool {
		for _, r := range s.runs() {
			if r.Job == "offsite" && r.ID > nightly.ID && r.Status != catalog.StatusRunning {
				copied = r
				return true
			}
		}
		return false
	})
	if nightly.Job != "nightly" || nightly.Kind != catalog.KindBackup || copied.Kind != catalog.KindCopy || copied.Manual ||
		copied.Status != catalog.StatusSucceeded || !strings.Contains(copied.Summary, "1 copied") {
		t.Fatalf("the backup run %+v and the copy run after it %+v\n%s", nightly, copied, s.log.String())
	}
	src = snapTimes(e)
	if v, _ := metricValue(s.metrics(), `kura_copy_newest_timestamp_seconds{copy_job="offsite",vm="db01"}`); v != float64(src["db01"][1].Unix()) {
		t.Errorf("the newest copy of db01 at %v, want %v", v, src["db01"][1].Unix())
	}
	if out := e.ok("runs", "--config", cfgPath); !regexp.MustCompile(`(?m)^\d+\s+backup\s+nightly\s`).MatchString(out) {
		t.Errorf("kura runs does not tell the backup run:\n%s", out)
	}
}

// TestServerCopyJobToS3 runs a copy job of `kura server` into a bucket of
// a real S3 server (versitygw), the target given field by field with a
// credentials file, and its upload held to the job's bandwidth: the copy
// restores byte for byte from the bucket, took at least as long as the
// limit allows for what it sent, and a second run sends nothing.
func TestServerCopyJobToS3(t *testing.T) {
	if testing.Short() {
		t.Skip("starts kura server and an S3 server")
	}
	srv := s3servers.Get(t, s3test.VersityGW)
	e := newEnv(t)
	e.ok("init", "--chunk-size", "256K")
	raw := filepath.Join(e.dir, "vm1-disk0.raw")
	makeImage(t, raw, 16<<20, 81, 24)
	e.ok("backup", "image", raw, "--name", "vm1")
	scribble(t, raw, 82, 8)
	e.ok("backup", "image", raw, "--name", "vm1")

	prefix := "daemon-copy/" + crypt.RandomID().Short()
	s3 := *e
	s3.repo, s3.pw, s3.vars = srv.Location(srv.Bucket, prefix), "the bucket's password", srv.Env()
	s3.ok("init")
	creds := writeFile(t, e.dir, "s3-credentials", fmt.Sprintf("[kura]\naws_access_key_id = %s\naws_secret_access_key = %s\n", srv.AccessKey, srv.SecretKey))
	listen := freePort(t)
	cfgPath := writeFile(t, e.dir, "kura.yaml", fmt.Sprintf(`repositories:
  main:
    path: %s
    password_file: %s
  bucket:
    s3:
      endpoint: %s
      bucket: %s
      prefix: %s
      credentials_file: %s
      profile: kura
    password_file: %s
copies:
  - name: to-bucket
    from: main
    to: bucket
    schedule: "@daily"
    bandwidth: 2MiB
server:
  listen: %s
  state_dir: %s
`, e.repo, writeFile(t, e.dir, "main.pass", e.pw), srv.Endpoint, srv.Bucket, prefix, creds, writeFile(t, e.dir, "bucket.pass", s3.pw),
		listen, filepath.Join(e.dir, "state")))
	// The server gets no S3 credentials from its environment: only the
	// credentials file names them.
	s := e.startServer(cfgPath, listen)
	r := s.runNow("to-bucket")
	if r.Kind != catalog.KindCopy || r.Status != catalog.StatusSucceeded || !strings.Contains(r.Summary, "2 copied") {
		t.Fatalf("the copy run: %+v\n%s", r, s.log.String())
	}
	sent, _ := metricValue(s.metrics(), `kura_copy_bytes_sent_total{copy_job="to-bucket"}`)
	took := r.Ended.Sub(r.Started)
	if least := time.Duration(0.7 * sent / (2 << 20) * float64(time.Second)); sent < 2<<20 || took < least {
		t.Errorf("the copy sent %.0f bytes in %s; at 2 MiB/s it takes at least %s", sent, took, least)
	}
	t.Logf("sent %.1f MiB in %s at bandwidth 2MiB", sent/(1<<20), took.Round(time.Millisecond))
	out := filepath.Join(e.dir, "out")
	s3.ok("restore", "vm1@latest", "--to", out)
	sameFile(t, filepath.Join(out, "vm1-disk0.raw"), raw)
	if v, ok := metricValue(s.metrics(), `kura_copy_pending_restore_points{copy_job="to-bucket",vm="vm1"}`); !ok || v != 0 {
		t.Errorf("pending %v (%v) after the copy", v, ok)
	}
	if r := s.runNow("to-bucket"); r.Status != catalog.StatusSucceeded || !strings.Contains(r.Summary, "0 copied (0 B sent), 2 already in the target") {
		t.Fatalf("the second copy run: %+v", r)
	}
	if v, _ := metricValue(s.metrics(), `kura_copy_bytes_sent_total{copy_job="to-bucket"}`); v != sent {
		t.Errorf("the second run sent %v bytes", v-sent)
	}
}
