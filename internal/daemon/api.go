package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/notify"
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

// notify tells the configured webhook and e-mail recipients about a run
// that did not fully succeed. It returns at once: the deliveries run in the
// background, each bounded by its timeout, and a failed delivery is logged
// and counted (kura_errors_total{kind="notify"}), never retried.
func (d *Daemon) notify(ctx context.Context, job string, run int64, status, summary string) {
	d.mu.Lock()
	var senders []sender
	if u := d.cfg.Server.Webhook; u != "" {
		senders = append(senders, sender{"webhook " + u, notify.Webhook{URL: u}.Send})
	}
	if e := d.cfg.Server.Email; e != nil {
		em := notify.Email{Server: e.SMTP, From: e.From, To: e.To, Username: e.Username, Password: e.Password, TLS: e.TLS, CAFile: e.CAFile}
		senders = append(senders, sender{"e-mail to " + strings.Join(e.To, ", "), em.Send})
	}
	d.mu.Unlock()
	host, _ := os.Hostname()
	m := notify.Message{Job: job, Run: run, Status: status, Summary: summary, Time: time.Now().UTC(), Host: host}
	for _, s := range senders {
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			if err := s.send(context.WithoutCancel(ctx), m); err != nil {
				d.log.Error("the notification of a failed run was not delivered", "to", s.to, "job", job, "run", run, "err", err)
				d.m.errs.Inc("notify")
				return
			}
			d.log.Info("notified of a failed run", "to", s.to, "job", job, "run", run)
		}()
	}
}

type sender struct {
	to   string
	send func(context.Context, notify.Message) error
}
