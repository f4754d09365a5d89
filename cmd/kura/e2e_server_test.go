package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/catalog"
	"github.com/kura-backup/kura/internal/notify/smtptest"
)

// server is a `kura server` process of a test.
type server struct {
	t      *testing.T
	e      *env
	cfg    string
	listen string
	cmd    *exec.Cmd
	log    *syncBuffer
}

func (e *env) startServer(cfg, listen string) *server {
	e.t.Helper()
	s := &server{t: e.t, e: e, cfg: cfg, listen: listen, log: &syncBuffer{}}
	s.cmd = e.cmd("server", "--config", cfg)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { s.kill() })
	s.waitFor(30*time.Second, "the server to answer", func() bool {
		resp, err := http.Get("http://" + listen + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})
	return s
}

func (s *server) kill() {
	if s.cmd.ProcessState == nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
	}
}

func (s *server) waitFor(d time.Duration, what string, ok func() bool) {
	s.t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		if ok() {
			return
		}
		if s.cmd.ProcessState != nil {
			s.t.Fatalf("kura server exited while waiting for %s:\n%s", what, s.log.String())
		}
	}
	s.t.Fatalf("timed out after %s waiting for %s; server log:\n%s", d, what, s.log.String())
}

func (s *server) runs() []catalog.Run {
	s.t.Helper()
	var runs []catalog.Run
	if err := json.Unmarshal([]byte(s.e.ok("runs", "--config", s.cfg, "--json")), &runs); err != nil {
		s.t.Fatal(err)
	}
	return runs
}

// runNow starts a run of job and waits until it ends; it returns the run.
func (s *server) runNow(job string) catalog.Run {
	s.t.Helper()
	return s.waitRun(job, s.startRun(job))
}

// startRun starts a run of job and returns how many runs there were
// before it, for waitRun.
func (s *server) startRun(job string) int {
	s.t.Helper()
	before := len(s.runs())
	s.e.ok("run-now", job, "--config", s.cfg)
	return before
}

// waitRun waits until the run startRun started ends, and returns it.
func (s *server) waitRun(job string, before int) catalog.Run {
	s.t.Helper()
	var last catalog.Run
	s.waitFor(4*time.Minute, "run of "+job+" to end", func() bool {
		runs := s.runs()
		if len(runs) <= before {
			return false
		}
		last = runs[0]
		return last.Status != catalog.StatusRunning
	})
	return last
}

func (s *server) metrics() string {
	s.t.Helper()
	resp, err := http.Get("http://" + s.listen + "/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// The daemon against a real guest: run-now, catalog, metrics, retention,
// a configuration reload during a backup (bad then good), and a daemon
// killed mid-backup that, restarted, marks the run interrupted, clears
// libvirt's job and backs up again.
// checkNice fails t unless every thread of process pid runs at nice.
func checkNice(t *testing.T, pid, nice int) {
	t.Helper()
	stats, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if len(stats) == 0 {
		t.Fatalf("no threads of process %d", pid)
	}
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread ended
		}
		// After the command name in parentheses: state is field 3, nice 19.
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) < 17 || f[16] != strconv.Itoa(nice) {
			t.Fatalf("%s: want nice %d: %s", p, nice, b)
		}
	}
}

func TestServer(t *testing.T) {
	needVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir := t.TempDir()
	g := dataGuest(ctx, t, dir, 8, 3)
	e := newEnv(t)
	e.ok("init")
	pwFile := filepath.Join(dir, "pw")
	os.WriteFile(pwFile, []byte(e.pw+"\n"), 0o600)
	listen := freePort(t)
	cfgPath := filepath.Join(dir, "kura.yaml")
	serverExtra, latencyExtra, limitsExtra := "", "", ""
	writeCfg := func(extra string) {
		cfg := fmt.Sprintf(`repositories:
  main:
    path: %s
    password_file: %s
latency:
  interval: 1s
%s%sjobs:
  - name: nightly
    repository: main
    vms: [%s]
    schedule: "0 3 * * *"
    retention: {keep_last: 2}
%s
server:
  listen: %s
  state_dir: %s
%s`, e.repo, pwFile, latencyExtra, limitsExtra, g.Name, extra, listen, filepath.Join(dir, "state"), serverExtra)
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeCfg("")
	e.fails("the kura server does not answer", "run-now", "nightly", "--config", cfgPath)
	s := e.startServer(cfgPath, listen)

	run := s.runNow("nightly")
	if run.Status != catalog.StatusSucceeded || !strings.Contains(run.Summary, "1 of 1 VMs backed up") {
		t.Fatalf("first run: %+v\n%s", run, s.log.String())
	}
	if out := e.ok("runs", "--config", cfgPath, "--run", fmt.Sprint(run.ID)); !strings.Contains(out, g.Name) || !strings.Contains(out, "succeeded") {
		t.Fatalf("runs --run:\n%s", out)
	}
	m := s.metrics()
	for _, want := range []string{`kura_backup_last_success_timestamp_seconds{vm="` + g.Name + `"}`, `kura_backups_total{vm="` + g.Name + `",result="ok"} 1`, "kura_backups_running 0"} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q:\n%s", want, m)
		}
	}
	e.fails("no such job", "run-now", "nosuch", "--config", cfgPath)
	// The daemon, backups included, runs at the lowest CPU priority by
	// default (limits.nice 19).
	checkNice(t, s.cmd.Process.Pid, 19)
	if out := e.ok("jobs", "--config", cfgPath); !strings.Contains(out, "nightly") || !strings.Contains(out, "succeeded") {
		t.Errorf("jobs:\n%s", out)
	}

	// A bad configuration is refused on SIGHUP and the old one kept; a
	// good one sent while a backup runs does not interrupt it.
	os.WriteFile(cfgPath, []byte("jobs: [\n"), 0o600)
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(30*time.Second, "the bad configuration to be refused", func() bool {
		return strings.Contains(s.log.String(), "configuration not reloaded")
	})
	limitsExtra = "limits:\n  nice: 5\n"
	writeCfg(`  - name: hourly
    repository: main
    vms: [` + g.Name + `]
    schedule: "@hourly"`)
	before := len(s.runs())
	e.ok("run-now", "nightly", "--config", cfgPath)
	s.waitFor(time.Minute, "the run to start", func() bool { return len(s.runs()) > before })
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(4*time.Minute, "the run during the reload to end", func() bool { return s.runs()[0].Status != catalog.StatusRunning })
	if r := s.runs()[0]; r.Status != catalog.StatusSucceeded {
		t.Fatalf("the run during the reload: %+v\n%s", r, s.log.String())
	}
	if !strings.Contains(s.log.String(), "configuration reloaded") {
		t.Fatalf("the good configuration was not reloaded:\n%s", s.log.String())
	}
	checkNice(t, s.cmd.Process.Pid, 5)
	// run-now --wait returns once the run has ended, with its outcome.
	out := e.ok("run-now", "hourly", "--wait", "--config", cfgPath)
	if r := s.runs()[0]; r.Job != "hourly" || !r.Manual || r.Status != catalog.StatusSucceeded || !strings.Contains(out, "succeeded") {
		t.Fatalf("the reloaded job's run, after run-now --wait printed %q: %+v", out, r)
	}
	// Interrupted, run-now --wait stops waiting, says where the run goes
	// on, and the run ends in the server as if nobody had waited.
	before = len(s.runs())
	waiting := e.cmd("run-now", "hourly", "--wait", "--config", cfgPath)
	var waitErr bytes.Buffer
	waiting.Stderr = &waitErr
	started, _ := waiting.StdoutPipe()
	if err := waiting.Start(); err != nil {
		t.Fatal(err)
	}
	// Its first line says the server started the run, which takes a
	// second or more: interrupted now, it is still waiting.
	if line, err := bufio.NewReader(started).ReadString('\n'); err != nil {
		t.Fatalf("run-now --wait printed %q, %v", line, err)
	}
	waiting.Process.Signal(os.Interrupt)
	if err := waiting.Wait(); err == nil || !strings.Contains(waitErr.String(), "it goes on in the server") {
		t.Errorf("run-now --wait interrupted: %v, %q; want a failure saying the run goes on in the server", err, waitErr.String())
	}
	if r := s.waitRun("hourly", before); r.Status != catalog.StatusSucceeded {
		t.Fatalf("the run whose run-now --wait was interrupted: %+v\n%s", r, s.log.String())
	}

	// Killed mid-backup.
	before = len(s.runs())
	e.ok("run-now", "nightly", "--config", cfgPath)
	s.waitFor(time.Minute, "the run to start", func() bool { return len(s.runs()) > before })
	s.kill()
	s = e.startServer(cfgPath, listen)
	killed := s.runs()[0]
	if killed.Status != catalog.StatusInterrupted {
		t.Fatalf("the run of the killed daemon: %+v", killed)
	}
	if out, _ := exec.Command("virsh", "domjobinfo", g.Name).CombinedOutput(); !strings.Contains(string(out), "None") {
		t.Errorf("a libvirt job is left after the restart:\n%s", out)
	}
	if _, _, err := g.Exec(ctx, "/bin/true"); err != nil {
		t.Fatalf("the guest does not answer after the daemon was killed: %v", err)
	}
	if r := s.runNow("nightly"); r.Status != catalog.StatusSucceeded {
		t.Fatalf("the run after the restart: %+v\n%s", r, s.log.String())
	}
	// VMs deleted and renamed while scheduled: recorded as not found, the
	// others are backed up, the daemon keeps running, and the failed run
	// is reported to the webhook and by e-mail through a real SMTP server.
	gone, renamed := g.Name+"-gone", g.Name+"-renamed"
	for _, name := range []string{gone, renamed} {
		domXML := filepath.Join(dir, name+".xml")
		os.WriteFile(domXML, []byte("<domain type='qemu'><name>"+name+"</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"), 0o600)
		if out, err := exec.Command("virsh", "define", domXML).CombinedOutput(); err != nil {
			t.Fatalf("virsh define: %v %s", err, out)
		}
		t.Cleanup(func() { exec.Command("virsh", "undefine", name).Run() })
	}
	t.Cleanup(func() { exec.Command("virsh", "undefine", renamed+"-new").Run() })
	hooks := make(chan map[string]any, 4)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m map[string]any
		json.NewDecoder(r.Body).Decode(&m)
		hooks <- m
	}))
	defer hook.Close()
	mailServer := smtptest.Start(t, "", "")
	serverExtra = "  webhook: " + hook.URL + "\n  email: {smtp: \"" + mailServer.Addr + "\", from: kura@test.example, to: [ops@test.example], tls: none}\n"
	twovms := `  - name: twovms
    repository: main
    vms: [` + g.Name + `, ` + gone + `, ` + renamed + `]
    schedule: "@hourly"`
	writeCfg(twovms)
	reloads := strings.Count(s.log.String(), "configuration reloaded")
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(time.Minute, "the reload", func() bool { return strings.Count(s.log.String(), "configuration reloaded") > reloads })
	if out, err := exec.Command("virsh", "undefine", gone).CombinedOutput(); err != nil {
		t.Fatalf("virsh undefine: %v %s", err, out)
	}
	if out, err := exec.Command("virsh", "domrename", renamed, renamed+"-new").CombinedOutput(); err != nil {
		t.Fatalf("virsh domrename: %v %s", err, out)
	}
	// run-now --wait prints the run's outcome and fails unless it succeeded.
	before = len(s.runs())
	res := e.fails("partial: see `kura runs --run", "run-now", "twovms", "--wait", "--config", cfgPath)
	runs := s.runs()
	if len(runs) != before+1 {
		t.Fatalf("%d runs after run-now --wait, %d before", len(runs), before)
	}
	r := runs[0]
	if !strings.Contains(res.stdout, fmt.Sprintf("run %d of job twovms: partial", r.ID)) || !strings.Contains(res.stdout, gone+": not found") {
		t.Errorf("run-now --wait printed %q for run %+v", res.stdout, r)
	}
	if r.Status != catalog.StatusPartial || !strings.Contains(r.Summary, gone+": not found") || !strings.Contains(r.Summary, renamed+": not found") {
		t.Fatalf("the run with a deleted and a renamed VM: %+v\n%s", r, s.log.String())
	}
	if out := e.ok("runs", "--config", cfgPath, "--run", fmt.Sprint(r.ID)); !strings.Contains(out, "not-found") {
		t.Errorf("runs --run of the run with a deleted VM:\n%s", out)
	}
	select {
	case m := <-hooks:
		if m["job"] != "twovms" || m["status"] != "partial" || m["run"] != float64(r.ID) || !strings.Contains(fmt.Sprint(m["summary"]), gone) {
			t.Errorf("webhook message %v", m)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("no webhook message for the partial run:\n%s", s.log.String())
	}
	s.waitFor(30*time.Second, "the e-mail", func() bool { return len(mailServer.Messages(t)) == 1 })
	if subj := mailServer.Messages(t)[0].Header.Get("Subject"); !strings.Contains(subj, fmt.Sprintf("job twovms run %d partial", r.ID)) {
		t.Errorf("e-mail subject %q", subj)
	}
	// Nowhere to deliver: logged and counted, and the daemon goes on.
	// (The reload drops the VMs that are gone; one more is deleted after it.)
	if out, err := exec.Command("virsh", "define", filepath.Join(dir, gone+".xml")).CombinedOutput(); err != nil {
		t.Fatalf("virsh define: %v %s", err, out)
	}
	serverExtra = "  webhook: http://" + smtptest.FreeAddr(t) + "/hook\n"
	writeCfg(twovms)
	reloads = strings.Count(s.log.String(), "configuration reloaded")
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(time.Minute, "the reload", func() bool { return strings.Count(s.log.String(), "configuration reloaded") > reloads })
	if out, err := exec.Command("virsh", "undefine", gone).CombinedOutput(); err != nil {
		t.Fatalf("virsh undefine: %v %s", err, out)
	}
	// The reload read the repository's new snapshots into the catalog's
	// cache, which now lists exactly the repository's.
	cat, err := catalog.Open(ctx, filepath.Join(dir, "state", "catalog.db"))
	if err != nil {
		t.Fatal(err)
	}
	cached, err := cat.Snapshots(ctx, "main")
	cat.Close()
	inRepo := e.snapshots()
	if err != nil || len(cached) != len(inRepo) {
		t.Errorf("the catalog caches %d snapshots (%v), the repository has %d", len(cached), err, len(inRepo))
	}
	for _, c := range cached {
		if !slices.ContainsFunc(inRepo, func(s snapJSON) bool { return s.ID == c.ID && s.Name == c.Name }) {
			t.Errorf("cached snapshot %s (%s) is not in the repository", c.ID, c.Name)
		}
	}
	if r := s.runNow("twovms"); r.Status != catalog.StatusPartial {
		t.Fatalf("the second run with a deleted VM: %+v\n%s", r, s.log.String())
	}
	s.waitFor(30*time.Second, "the failed delivery to be logged", func() bool {
		return strings.Contains(s.log.String(), "the notification of a failed run was not delivered")
	})
	if m := s.metrics(); !strings.Contains(m, `kura_errors_total{kind="notify"} 1`) {
		t.Errorf("the failed delivery is not counted:\n%s", m)
	}

	// nightly keeps the last 2 restore points of the VM after each of its
	// runs; twovms (no retention) added two since.
	if n := len(e.snapshots("--name", g.Name)); n != 4 {
		t.Errorf("%d snapshots of %s after nightly's keep_last 2 and one more backup", n, g.Name)
	}
	e.ok("verify")

	// Latency control: with a threshold the guest's own writes exceed,
	// the daemon holds new backups on the VM's datastore while the guest
	// is busy, and records and counts the decision; a run started then
	// waits. Reloaded with the default threshold (20 ms, far above what
	// the guest and the host see), the controller resumes at its next
	// ticks and the waiting backup runs. (A 1 µs threshold also applies
	// to the host device, which other tests keep busy: it never
	// recovers on its own.)
	latencyExtra = "  threshold: 1us\n"
	writeCfg(twovms)
	reloads = strings.Count(s.log.String(), "configuration reloaded")
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(time.Minute, "the reload", func() bool { return strings.Count(s.log.String(), "configuration reloaded") > reloads })
	const busy = 15
	load := fmt.Sprintf(`setsid sh -c 'end=$(($(date +%%s)+%d)); while [ $(date +%%s) -lt $end ]; do dd if=/dev/zero of=/data/load bs=64k count=64 oflag=direct conv=fsync 2>/dev/null; done; rm -f /data/load' >/dev/null 2>&1 </dev/null &`, busy)
	mustExec(ctx, t, g, "/bin/sh", "-c", load)
	pausedRe := regexp.MustCompile(`(?m)^kura_datastore_paused\{[^}]*\} 1$`)
	var lastMetrics string
	for end := time.Now().Add(busy * time.Second); !pausedRe.MatchString(lastMetrics); time.Sleep(200 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("latency control did not hold the busy guest's datastore within %d s: %s\n%s", busy,
				regexp.MustCompile(`(?m)^kura_datastore_.*$`).FindAllString(lastMetrics, -1), s.log.String())
		}
		lastMetrics = s.metrics()
	}
	nightlyDone := strings.Count(s.log.String(), "job=nightly snapshot=")
	before = s.startRun("nightly")
	time.Sleep(5 * time.Second)
	if n := strings.Count(s.log.String(), "job=nightly snapshot="); n != nightlyDone {
		t.Fatalf("a backup ran while latency control held the datastore:\n%s", s.log.String())
	}
	latencyExtra = ""
	writeCfg(twovms)
	reloads = strings.Count(s.log.String(), "configuration reloaded")
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(time.Minute, "the reload", func() bool { return strings.Count(s.log.String(), "configuration reloaded") > reloads })
	r = s.waitRun("nightly", before)
	if r.Status != catalog.StatusSucceeded {
		t.Fatalf("the run held by latency control: %+v\n%s", r, s.log.String())
	}
	if out := e.ok("runs", "--config", cfgPath, "--throttle"); !strings.Contains(out, "pause") || !strings.Contains(out, "resume") {
		t.Errorf("runs --throttle does not show the pause and the resume:\n%s", out)
	}
	if m := s.metrics(); !regexp.MustCompile(`kura_throttle_decisions_total\{datastore="[^"]+",action="pause"\} [1-9]`).MatchString(m) {
		t.Errorf("the pause is not counted:\n%s", m)
	}

	// The read window (latency.read_window): the backup's reads go through
	// the datastore's window, which the daemon samples and exports.
	latencyExtra = "  read_window: true\n"
	writeCfg(twovms)
	reloads = strings.Count(s.log.String(), "configuration reloaded")
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(time.Minute, "the reload", func() bool { return strings.Count(s.log.String(), "configuration reloaded") > reloads })
	out = e.ok("run-now", "nightly", "--wait", "--config", cfgPath)
	if !strings.Contains(out, "succeeded") {
		t.Errorf("run-now --wait with the read window printed %q", out)
	}
	limitRe := regexp.MustCompile(`(?m)^kura_datastore_backup_reads_limit\{datastore="[^"]+"\} ([0-9]+)$`)
	s.waitFor(30*time.Second, "the read window's limit in the metrics", func() bool { return limitRe.MatchString(s.metrics()) })
	if m := limitRe.FindStringSubmatch(s.metrics()); m[1] == "0" {
		t.Errorf("read window limit %s; want at least 1", m[0])
	}
	e.ok("verify")

	// A window that closes while latency control holds the VM's
	// datastore: the run ends with the VM left behind, and says why.
	now := time.Now()
	winStart := now.Truncate(time.Minute).Add(time.Minute)
	if winStart.Sub(now) < 20*time.Second {
		winStart = winStart.Add(time.Minute)
	}
	latencyExtra = "  threshold: 1us\n"
	writeCfg(twovms + fmt.Sprintf(`
  - name: windowed
    repository: main
    vms: [%s]
    schedule: "* * * * *"
    window: {start: "%s", duration: 1m}`, g.Name, winStart.Format("15:04")))
	reloads = strings.Count(s.log.String(), "configuration reloaded")
	s.cmd.Process.Signal(syscall.SIGHUP)
	s.waitFor(time.Minute, "the reload", func() bool { return strings.Count(s.log.String(), "configuration reloaded") > reloads })
	loadFor := int(time.Until(winStart.Add(time.Minute)).Seconds()) + 20
	load = fmt.Sprintf(`setsid sh -c 'end=$(($(date +%%s)+%d)); while [ $(date +%%s) -lt $end ]; do dd if=/dev/zero of=/data/load bs=64k count=64 oflag=direct conv=fsync 2>/dev/null; done; rm -f /data/load' >/dev/null 2>&1 </dev/null &`, loadFor)
	mustExec(ctx, t, g, "/bin/sh", "-c", load)
	var windowed catalog.Run
	s.waitFor(time.Until(winStart)+2*time.Minute, "the windowed run to end", func() bool {
		// The first run that ended: its due time is the cron minute
		// before or at the window's start.
		for _, r := range s.runs() {
			if r.Job == "windowed" && !r.Ended.IsZero() {
				windowed = r
				return true
			}
		}
		return false
	})
	if windowed.Ended.Before(winStart.Add(time.Minute)) {
		t.Errorf("the windowed run ended at %s, before its window closed at %s", windowed.Ended, winStart.Add(time.Minute))
	}
	t.Logf("the run whose window closed: %+v", windowed)
	if windowed.Status == catalog.StatusSucceeded || !strings.Contains(windowed.Summary, g.Name) || !strings.Contains(windowed.Summary, "paused") {
		t.Errorf("the run whose window closed while its datastore was held: %+v; want it to name %s, left because its datastore was paused", windowed, g.Name)
	}
	if out := e.ok("runs", "--config", cfgPath, "--run", fmt.Sprint(windowed.ID)); !strings.Contains(out, "not-done") || !strings.Contains(out, "paused") {
		t.Errorf("runs --run of the run whose window closed:\n%s", out)
	}
}
