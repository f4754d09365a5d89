package config

import (
	"os"

	"github.com/kura-backup/kura/internal/backend/location"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const good = `# kura daemon configuration
repositories:
  main:
    path: /srv/kura
    password_file: /etc/kura/main.pass
limits:
  per_host: 3
  bandwidth: 200MiB
latency:
  {threshold: 15ms, min_rate: 2MiB}
jobs:
  - name: nightly
    repository: main
    vms: [web*, db01]
    schedule: "0 22 * * *"
    window: {start: "22:00", duration: 8h}
    rpo: 1d
    retention: {keep_last: 3, keep_daily: 7}
  - name: hourly-db
    repository: main
    tags: [database]
    mode: crash
    schedule: "@every 1h"
server:
  log_format: json
  email:
    smtp: mail.example.com:587
    from: Kura <kura@host1.example>
    to: [ops@example.com]
`

func TestParseGood(t *testing.T) {
	c, err := Parse("kura.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	j := c.Jobs[0]
	if j.Name != "nightly" || j.Mode != "app" || j.RPO.Duration != 24*time.Hour || j.Window.StartOfDay != 22*time.Hour ||
		j.Window.Duration.Duration != 8*time.Hour || j.Retention.Policy().Daily != 7 || j.Retry.Attempts != 3 || j.Retry.Backoff.Duration != time.Minute {
		t.Errorf("job 0: %+v", j)
	}
	if j.Capture != "fleece" {
		t.Errorf("job 0's capture method %q, want the default fleece", j.Capture)
	}
	if c.Jobs[1].Mode != "crash" || c.Jobs[1].Tags[0] != "database" {
		t.Errorf("job 1: %+v", c.Jobs[1])
	}
	if c.Latency.MinRateBytes != 2<<20 || c.Latency.IncreaseBytes != 0 {
		t.Errorf("latency rates: %+v", c.Latency)
	}
	if c.Limits.PerHost != 3 || c.Limits.PerDatastore != 1 || c.Limits.BandwidthBytes != 200<<20 || *c.Limits.Nice != 19 || c.Latency.Threshold.Duration != 15*time.Millisecond {
		t.Errorf("limits %+v latency %+v", c.Limits, c.Latency)
	}
	if e := c.Server.Email; e == nil || e.SMTP != "mail.example.com:587" || len(e.To) != 1 {
		t.Errorf("email %+v", e)
	}
	if c.Server.Listen != "127.0.0.1:9470" || c.Server.Catalog != "/var/lib/kura/catalog.db" || c.Server.LogFormat != "json" || c.Libvirt.Connect != "qemu:///system" {
		t.Errorf("server %+v libvirt %+v", c.Server, c.Libvirt)
	}
}

// The overlay capture method, a scratch directory and a read size are read.
func TestCaptureAndScratch(t *testing.T) {
	cfg := strings.Replace(good, "mode: crash", "mode: crash\n    capture: overlay", 1) + "libvirt:\n  scratch_dir: /srv/scratch\n"
	cfg = strings.Replace(cfg, "min_rate: 2MiB}", "min_rate: 2MiB, read_size: 64KiB}", 1)
	c, err := Parse("kura.yaml", []byte(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if c.Jobs[1].Capture != "overlay" || c.Libvirt.ScratchDir != "/srv/scratch" || c.Latency.ReadSizeBytes != 64<<10 {
		t.Errorf("capture %q, scratch_dir %q", c.Jobs[1].Capture, c.Libvirt.ScratchDir)
	}
}

// A nice of 0 is kept, not taken for "unset".
func TestNiceZero(t *testing.T) {
	c, err := Parse("kura.yaml", []byte(strings.Replace(good, "per_host: 3", "per_host: 3\n  nice: 0", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if *c.Limits.Nice != 0 {
		t.Errorf("limits.nice: 0 parsed as %d", *c.Limits.Nice)
	}
}

// Every mistake is reported with the file, the line and the field.
func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, edit, want string
	}{
		{"bad cron", `schedule: "0 22 * * *"|schedule: "0 22 * *"`, `kura.yaml:15: jobs[0] (nightly).schedule: "0 22 * *": expected exactly 5 fields`},
		{"cron out of range", `schedule: "0 22 * * *"|schedule: "0 25 * * *"`, `kura.yaml:15: jobs[0] (nightly).schedule: "0 25 * * *": end of range (25) above maximum (23)`},
		{"unknown field", `retention: {keep_last|retenton: {keep_last`, `kura.yaml: line 18: field retenton not found`},
		{"unknown nested field", `keep_daily: 7|keep_dayly: 7`, `kura.yaml: line 18: field keep_dayly not found`},
		{"unknown repository", `    repository: main
    tags|    repository: backup
    tags`, `kura.yaml:20: jobs[1] (hourly-db).repository: "backup" is not one of the repositories configured`},
		{"bad mode", `mode: crash|mode: snapshot`, `kura.yaml:22: jobs[1] (hourly-db).mode: "snapshot": use app, crash, suspend or shutdown`},
		{"bad capture", "mode: crash|mode: crash\n    capture: snapshot", `kura.yaml:23: jobs[1] (hourly-db).capture: "snapshot": use fleece or overlay`},
		{"bad duration", `rpo: 1d|rpo: one day`, `line 17: "one day" is not a duration`},
		{"bad window", `start: "22:00"|start: "10pm"`, `kura.yaml:16: jobs[0] (nightly).window.start: "10pm": use HH:MM`},
		{"bad bandwidth", `bandwidth: 200MiB|bandwidth: fast`, `kura.yaml:8: limits.bandwidth: "fast" is not a rate`},
		{"bandwidth with trailing junk", `bandwidth: 200MiB|bandwidth: 200MiBx`, `kura.yaml:8: limits.bandwidth: "200MiBx" is not a rate`},
		{"zero bandwidth", `bandwidth: 200MiB|bandwidth: "0"`, `kura.yaml:8: limits.bandwidth: "0" is not a rate: it must be more than 0`},
		{"decimal read_size", `min_rate: 2MiB}|min_rate: 2MiB, read_size: 64KB}`, `kura.yaml:9: latency.read_size: "64KB": use a multiple of 4 KiB`},
		{"bad min_rate", `min_rate: 2MiB}|min_rate: 2 MiB per second}`, `latency.min_rate: "2 MiB per second" is not a rate`},
		{"bad read_size", `min_rate: 2MiB}|min_rate: 2MiB, read_size: 5000}`, `kura.yaml:9: latency.read_size: "5000": use a multiple of 4 KiB`},
		{"negative max_reads", `min_rate: 2MiB}|min_rate: 2MiB, max_reads: -1}`, `kura.yaml:9: latency.max_reads: -1: use a positive number`},
		{"negative per_host", `per_host: 3|per_host: -1`, `kura.yaml:7: limits.per_host: -1: use 1 to 1000`},
		{"zero per_host", `per_host: 3|per_host: 0`, `kura.yaml:7: limits.per_host: 0: use 1 to 1000`},
		{"zero per_datastore", `per_host: 3|per_datastore: 0`, `kura.yaml:7: limits.per_datastore: 0: use 1 to 1000`},
		{"tiny interval", `{threshold: 15ms,|{threshold: 15ms, interval: 1ns,`, `kura.yaml:9: latency.interval: 1ns: use 100ms to 1h`},
		{"negative keep", `keep_last: 3|keep_last: -1`, `kura.yaml:18: jobs[0] (nightly).retention.keep_last: -1: use a positive number`},
		{"negative keep_daily", `keep_daily: 7|keep_daily: -7`, `jobs[0] (nightly).retention.keep_daily: -7`},
		{"negative retry", `rpo: 1d|rpo: 1d
    retry: {attempts: -2}`, `jobs[0] (nightly).retry.attempts: -2: use 1 to 100`},
		{"nice too low", `bandwidth: 200MiB|nice: -21`, `kura.yaml:8: limits.nice: -21: use a CPU priority from -20 to 19`},
		{"nice too high", `bandwidth: 200MiB|nice: 20`, `kura.yaml:8: limits.nice: 20: use a CPU priority`},
		{"duplicate name", `name: hourly-db|name: nightly`, `jobs[1] (nightly).name: "nightly" is also the name of the job at line 12`},
		{"no vms", `    tags: [database]
|`, `kura.yaml:19: jobs[1] (hourly-db): say which VMs`},
		{"bad every", `"@every 1h"|"@every 10s"`, `kura.yaml:23: jobs[1] (hourly-db).schedule: "@every 10s": @every needs at least 1m`},
		{"wrong type", `per_host: 3|per_host: many`, `kura.yaml: line 7: cannot unmarshal !!str ` + "`many`"},
		{"bad yaml", `jobs:|jobs: [`, `kura.yaml: line`},
		{"smtp without port", `smtp: mail.example.com:587|smtp: mail.example.com`, `kura.yaml:27: server.email.smtp: "mail.example.com": give the SMTP server as host:port`},
		{"bad sender", `from: Kura <kura@host1.example>|from: kura at host1`, `kura.yaml:28: server.email.from: "kura at host1" is not an e-mail address`},
		{"no recipient", `to: [ops@example.com]|to: []`, `kura.yaml:29: server.email.to: no recipient`},
		{"bad tls", `to: [ops@example.com]|to: [ops@example.com]
    tls: yes-please`, `kura.yaml:30: server.email.tls: "yes-please": use starttls, tls or none`},
		{"password in clear", `to: [ops@example.com]|to: [ops@example.com]
    tls: none
    username: kura`, `kura.yaml:31: server.email.username: a password is only sent over TLS`},
		{"missing password file", `to: [ops@example.com]|to: [ops@example.com]
    username: kura
    password_file: /nonexistent/smtp.pass`, `kura.yaml:31: server.email.password_file: open /nonexistent/smtp.pass: no such file`},
		{"unknown email field", `to: [ops@example.com]|to: [ops@example.com]
    port: 25`, `line 30: field port not found`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			from, to, _ := strings.Cut(tc.edit, "|")
			if !strings.Contains(good, from) {
				t.Fatalf("test edit %q does not apply", from)
			}
			_, err := Parse("kura.yaml", []byte(strings.Replace(good, from, to, 1)))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	p := filepath.Join(t.TempDir(), "kura.yaml")
	if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "reading the configuration") {
		t.Fatalf("missing file: %v", err)
	}
	os.WriteFile(p, []byte(good), 0o600)
	if _, err := Load(p); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(p, nil, 0o600)
	if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("empty file: %v", err)
	}
}

// The example configuration shipped in dist/ is valid.
func TestExampleConfig(t *testing.T) {
	if _, err := Load("../../dist/kura.yaml"); err != nil {
		t.Fatal(err)
	}
}

// An S3 repository given field by field becomes the same location string
// --repo takes, and its credentials file replaces the environment's keys.
func TestS3Repository(t *testing.T) {
	creds := filepath.Join(t.TempDir(), "s3-credentials")
	os.WriteFile(creds, []byte("[default]\naws_access_key_id = K\naws_secret_access_key = S\n"), 0o600)
	for _, tc := range []struct {
		name, repo, want, err string
	}{
		{"minimal", "s3: {endpoint: https://s3.example.com, bucket: backups}", "s3:https://s3.example.com/backups", ""},
		{"full", "s3: {endpoint: 'https://minio.lan:9000/', bucket: backups, prefix: /kura/web/, region: eu-west-3, style: virtual, ca_file: " + creds + ", credentials_file: " + creds + "}",
			"s3:https://minio.lan:9000/backups/kura/web?ca=" + strings.ReplaceAll(creds, "/", "%2F") + "&profile=default&region=eu-west-3&style=virtual", ""},
		{"profile", "s3: {endpoint: http://127.0.0.1:8333, bucket: b, profile: kura}", "s3:http://127.0.0.1:8333/b?profile=kura", ""},
		{"both", "path: /srv/kura\n    s3: {endpoint: https://h, bucket: b}", "", "give path or s3, not both"},
		{"no endpoint", "s3: {bucket: b}", "", `s3.endpoint: "": use https://HOST[:PORT]`},
		{"endpoint with bucket", "s3: {endpoint: https://h/b, bucket: b}", "", "without bucket, path or credentials"},
		{"endpoint with key", "s3: {endpoint: 'https://AKIA:secret@h', bucket: b}", "", "without bucket, path or credentials"},
		{"no bucket", "s3: {endpoint: https://h}", "", `s3.bucket: "": name the bucket`},
		{"bad style", "s3: {endpoint: https://h, bucket: b, style: dns}", "", `s3.style: "dns": use path or virtual`},
		{"missing credentials file", "s3: {endpoint: https://h, bucket: b, credentials_file: /nonexistent/creds}", "", "credentials_file: open /nonexistent/creds"},
		{"unknown field", "s3: {endpoint: https://h, bucket: b, secret_key: x}", "", "field secret_key not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conf := strings.Replace(good, "path: /srv/kura", tc.repo, 1)
			c, err := Parse("kura.yaml", []byte(conf))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			r := c.Repositories["main"]
			if got := r.Location(); got != tc.want {
				t.Errorf("location %q, want %q", got, tc.want)
			}
			l, err := location.Parse(r.Location(), func(string) string { return "" })
			if err != nil || l.S3.Bucket != r.S3.Bucket || l.S3.Prefix != strings.Trim(r.S3.Prefix, "/") || l.S3.CAFile != r.S3.CAFile || l.S3.VirtualHost != (r.S3.Style == "virtual") {
				t.Errorf("the location does not parse back: %+v %v", l.S3, err)
			}
			env := r.Getenv(func(k string) string { return "from-env-" + k })
			if f := env("AWS_SHARED_CREDENTIALS_FILE"); (r.S3.CredentialsFile != "") != (f == creds) {
				t.Errorf("AWS_SHARED_CREDENTIALS_FILE = %q", f)
			}
		})
	}
}

const goodCopies = `repositories:
  main:
    path: /srv/kura
    password_file: /etc/kura/main.pass
  offsite:
    path: s3:https://s3.example.com/offsite/kura
    password_file: /etc/kura/offsite.pass
  usb:
    path: /mnt/usb/kura
jobs:
  - name: nightly
    repository: main
    all: true
    schedule: "0 22 * * *"
copies:
  - name: offsite
    from: main
    to: offsite
    vms: [web*, db01]
    latest: 3
    after: nightly
    retention: {keep_last: 7, keep_daily: 14}
    verify: true
    bandwidth: 20MiB
  - name: usb
    from: offsite
    to: usb
    schedule: "0 6 * * *"
`

func TestCopyJobs(t *testing.T) {
	c, err := Parse("kura.yaml", []byte(goodCopies))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Copies) != 2 {
		t.Fatalf("%d copy jobs", len(c.Copies))
	}
	o := c.CopyJob("offsite")
	if o == nil || o.From != "main" || o.To != "offsite" || o.Latest != 3 || o.After != "nightly" || o.Schedule != "" || !o.Verify ||
		o.BandwidthBytes != 20<<20 || o.Retention.Policy().Daily != 14 || o.Retention.Last != 7 {
		t.Errorf("copy job offsite: %+v", o)
	}
	if !o.Selects("web01") || !o.Selects("db01") || o.Selects("db02") {
		t.Errorf("offsite's selection")
	}
	u := c.CopyJob("usb")
	if u == nil || u.Schedule != "0 6 * * *" || u.After != "" || u.Latest != 0 || u.BandwidthBytes != 0 || !u.Retention.Policy().Empty() || !u.Selects("anything") {
		t.Errorf("copy job usb: %+v", u)
	}
	if c.CopyJob("nightly") != nil || c.Job("offsite") != nil {
		t.Errorf("jobs and copy jobs are looked up apart")
	}
	// A configuration may hold copy jobs only (a host that only copies).
	only := strings.Replace(goodCopies, `jobs:
  - name: nightly
    repository: main
    all: true
    schedule: "0 22 * * *"
`, "", 1)
	only = strings.Replace(only, "after: nightly", `schedule: "@every 1h"`, 1)
	if c, err := Parse("kura.yaml", []byte(only)); err != nil || len(c.Jobs) != 0 || len(c.Copies) != 2 {
		t.Errorf("copy jobs only: %v", err)
	}
}

// Every mistake in a copy job is reported with the file, the line and the
// field.
func TestCopyJobErrors(t *testing.T) {
	for _, tc := range []struct {
		name, edit, want string
	}{
		{"same repository", `to: offsite|to: main`, `kura.yaml:18: copies[0] (offsite).to: "main" is also the source: copy to another repository`},
		{"same location", `path: /mnt/usb/kura|path: s3:https://s3.example.com/offsite/kura`, `kura.yaml:27: copies[1] (usb).to: repositories offsite and usb are the same location s3:https://s3.example.com/offsite/kura`},
		{"unknown source", `from: main|from: mian`, `kura.yaml:17: copies[0] (offsite).from: "mian" is not one of the repositories configured`},
		{"unknown target", `to: usb|to: tape`, `kura.yaml:27: copies[1] (usb).to: "tape" is not one of the repositories configured`},
		{"no target", "    to: usb\n|", `kura.yaml:25: copies[1] (usb).to: missing: name one of the repositories configured`},
		{"both after and schedule", `after: nightly|after: nightly
    schedule: "@daily"`, `kura.yaml:22: copies[0] (offsite): give after (a backup job) or schedule, not both`},
		{"neither after nor schedule", "    schedule: \"0 6 * * *\"\n|", `kura.yaml:25: copies[1] (usb): say when it runs: after (a backup job, after each of its runs) or schedule (cron)`},
		{"after an unknown job", `after: nightly|after: hourly`, `kura.yaml:21: copies[0] (offsite).after: "hourly" is not one of the jobs configured`},
		{"after another copy job", `after: nightly|after: usb`, `kura.yaml:21: copies[0] (offsite).after: "usb" is not one of the jobs configured`},
		{"bad cron", `"0 6 * * *"|"0 6 * *"`, `kura.yaml:28: copies[1] (usb).schedule: "0 6 * *": expected exactly 5 fields`},
		{"short every", `"0 6 * * *"|"@every 30s"`, `kura.yaml:28: copies[1] (usb).schedule: "@every 30s": @every needs at least 1m`},
		{"unknown field", `verify: true|verfy: true`, `kura.yaml: line 23: field verfy not found`},
		{"unknown retention field", `keep_daily: 14|keep_dayly: 14`, `kura.yaml: line 22: field keep_dayly not found`},
		{"negative keep", `keep_last: 7|keep_last: -7`, `kura.yaml:22: copies[0] (offsite).retention.keep_last: -7: use a positive number`},
		{"negative latest", `latest: 3|latest: -3`, `kura.yaml:20: copies[0] (offsite).latest: -3: use a positive number`},
		{"bad bandwidth", `bandwidth: 20MiB|bandwidth: fast`, `kura.yaml:24: copies[0] (offsite).bandwidth: "fast" is not a rate`},
		{"bad glob", `vms: [web*, db01]|vms: ["web[", db01]`, `kura.yaml:19: copies[0] (offsite).vms: "web[" is not a valid glob`},
		{"no name", `  - name: usb
|  -
`, `kura.yaml:26: copies[1].name: missing: every copy job needs a name`},
		{"name of a job", `name: usb|name: nightly`, `kura.yaml:25: copies[1] (nightly).name: "nightly" is also the name of the job at line 11`},
		{"duplicate name", `name: usb|name: offsite`, `kura.yaml:25: copies[1] (offsite).name: "offsite" is also the name of the copy job at line 16`},
		{"wrong type", `latest: 3|latest: [3]`, `kura.yaml: line 20: cannot unmarshal !!seq`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			from, to, _ := strings.Cut(tc.edit, "|")
			if !strings.Contains(goodCopies, from) {
				t.Fatalf("test edit %q does not apply", from)
			}
			_, err := Parse("kura.yaml", []byte(strings.Replace(goodCopies, from, to, 1)))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}
