package metrics

import (
	"io"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

func TestExposition(t *testing.T) {
	r := New()
	runs := r.Counter("kura_backup_runs_total", "Backups run, by VM and result.", "vm", "result")
	last := r.Gauge("kura_backup_last_success_timestamp_seconds", "When the VM's last backup succeeded.", "vm")
	queue := r.Gauge("kura_queue_length", "VMs waiting to be backed up.")
	runs.Inc("web01", "ok")
	runs.Inc("web01", "ok")
	runs.Inc(`we"ird\vm`, "error")
	last.Set(1.7642e9, "web01")
	queue.Set(3)
	var b strings.Builder
	r.WriteTo(&b)
	want := `# HELP kura_backup_last_success_timestamp_seconds When the VM's last backup succeeded.
# TYPE kura_backup_last_success_timestamp_seconds gauge
kura_backup_last_success_timestamp_seconds{vm="web01"} 1.7642e+09
# HELP kura_backup_runs_total Backups run, by VM and result.
# TYPE kura_backup_runs_total counter
kura_backup_runs_total{vm="we\"ird\\vm",result="error"} 1
kura_backup_runs_total{vm="web01",result="ok"} 2
# HELP kura_queue_length VMs waiting to be backed up.
# TYPE kura_queue_length gauge
kura_queue_length 3
`
	if b.String() != want {
		t.Fatalf("exposition:\n%s\nwant:\n%s", b.String(), want)
	}
	last.Delete("web01")
	if last.Value("web01") != 0 || runs.Value("web01", "ok") != 2 {
		t.Fatal("Delete or Value wrong")
	}

	srv := httptest.NewServer(r.Handler())
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") || !strings.Contains(string(body), "kura_queue_length 3") {
		t.Fatalf("served %q: %s", resp.Header.Get("Content-Type"), body)
	}
}

func TestConcurrentAndMisuse(t *testing.T) {
	r := New()
	c := r.Counter("c_total", "c", "k")
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 1000; j++ {
				c.Inc("a")
			}
		}()
	}
	wg.Wait()
	if c.Value("a") != 8000 {
		t.Fatalf("counter %v, want 8000", c.Value("a"))
	}
	for name, f := range map[string]func(){
		"negative add":      func() { c.Add(-1, "a") },
		"wrong label count": func() { c.Inc() },
		"redeclared":        func() { r.Gauge("c_total", "c", "k") },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s did not panic", name)
				}
			}()
			f()
		}()
	}
}
