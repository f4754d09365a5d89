package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/kura-backup/kura/internal/schedule"
)

// handler serves the daemon's HTTP endpoint:
//
//	GET  /metrics          Prometheus metrics
//	GET  /healthz          "ok" while the daemon runs
//	POST /run-now?job=J    start a run of job J now (kura run-now)
//	POST /reload           reread the configuration (as SIGHUP does)
func (d *Daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", d.reg.Handler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("POST /run-now", func(w http.ResponseWriter, r *http.Request) {
		job := r.URL.Query().Get("job")
		err := d.RunNow(job)
		switch {
		case errors.Is(err, schedule.ErrUnknownJob):
			http.Error(w, err.Error(), http.StatusNotFound)
		case errors.Is(err, schedule.ErrRunOpen):
			http.Error(w, err.Error(), http.StatusConflict)
		case err != nil:
			http.Error(w, err.Error(), http.StatusInternalServerError)
		default:
			fmt.Fprintf(w, "started a run of job %s\n", job)
		}
	})
	mux.HandleFunc("POST /reload", func(w http.ResponseWriter, r *http.Request) {
		if err := d.Reload(r.Context(), true); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintln(w, "configuration reloaded")
	})
	return mux
}

// notify posts a failed run to the configured webhook as JSON
// ({"job", "run", "status", "summary", "time"}); failures are logged.
func (d *Daemon) notify(ctx context.Context, job string, run int64, status, summary string) {
	d.mu.Lock()
	url := d.cfg.Server.Webhook
	d.mu.Unlock()
	if url == "" {
		return
	}
	body, _ := json.Marshal(map[string]any{"job": job, "run": run, "status": status, "summary": summary, "time": time.Now().UTC()})
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		d.log.Error("webhook", "err", err)
		return
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		d.log.Error("webhook: the notification of a failed run was not delivered", "url", url, "err", err)
		d.m.errs.Inc("webhook")
		return
	}
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		d.log.Error("webhook: the notification of a failed run was refused", "url", url, "status", resp.Status)
		d.m.errs.Inc("webhook")
	}
}
