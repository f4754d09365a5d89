// Package config reads the kura daemon's configuration file (YAML): the
// repositories it writes to, the jobs it runs (which VMs, when, how, how
// long restore points are kept), the copy jobs that copy restore points
// between its repositories, the limits it holds backups to, latency
// control, and the daemon's own settings.
//
// Every error names the file, the line and the field, so that a mistake
// is found without reading the schema: "kura.yaml:14: jobs[1].schedule:
// expected exactly 5 fields, found 4". Unknown fields are errors too: a
// misspelt "retenton" must not silently mean "keep everything forever".
package config

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/mail"
	"net/url"
	"os"
	"path"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/kura-backup/kura/internal/retention"
	"github.com/kura-backup/kura/internal/schedule"
	"github.com/kura-backup/kura/internal/units"
)

// Config is a whole configuration file.
type Config struct {
	Repositories map[string]*Repository `yaml:"repositories"`
	Libvirt      Libvirt                `yaml:"libvirt"`
	Limits       Limits                 `yaml:"limits"`
	Latency      Latency                `yaml:"latency"`
	Jobs         []*Job                 `yaml:"jobs"`
	Copies       []*CopyJob             `yaml:"copies"`
	Server       Server                 `yaml:"server"`

	file  string
	lines map[string]int
}

// Repository is where a job's restore points go: a location (path: a
// directory, or an s3: location string), or a bucket described field by
// field (s3:).
type Repository struct {
	Path         string      `yaml:"path"`
	S3           *S3Location `yaml:"s3"`
	PasswordFile string      `yaml:"password_file"`

	lines map[string]int
}

// S3Location is a repository in an S3 bucket, field by field (the same
// as an s3: location string, docs/S3.md).
type S3Location struct {
	// Endpoint is the server's URL: https://HOST[:PORT] (http:// on a
	// trusted network).
	Endpoint string `yaml:"endpoint"`
	Bucket   string `yaml:"bucket"`
	Prefix   string `yaml:"prefix"`
	Region   string `yaml:"region"`
	// Style is path (the default) or virtual (bucket.HOST).
	Style string `yaml:"style"`
	// CAFile is a PEM file of certificate authorities to trust besides
	// the system's.
	CAFile string `yaml:"ca_file"`
	// CredentialsFile is a credentials file in the AWS format, read
	// instead of the environment's AWS_* variables; Profile its section
	// (default "default").
	CredentialsFile string `yaml:"credentials_file"`
	Profile         string `yaml:"profile"`

	lines map[string]int
}

// Location returns the repository's location string, as --repo takes it.
func (r *Repository) Location() string {
	if r.S3 == nil {
		return r.Path
	}
	s := r.S3
	loc := "s3:" + strings.TrimRight(s.Endpoint, "/") + "/" + s.Bucket
	if p := strings.Trim(s.Prefix, "/"); p != "" {
		loc += "/" + p
	}
	q := url.Values{}
	for k, v := range map[string]string{"region": s.Region, "style": s.Style, "ca": s.CAFile} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if s.CredentialsFile != "" {
		q.Set("profile", cmp.Or(s.Profile, "default"))
	} else if s.Profile != "" {
		q.Set("profile", s.Profile)
	}
	if len(q) > 0 {
		loc += "?" + q.Encode()
	}
	return loc
}

// Getenv returns getenv with the repository's credentials file in
// AWS_SHARED_CREDENTIALS_FILE, for location.Options.Getenv.
func (r *Repository) Getenv(getenv func(string) string) func(string) string {
	if r.S3 == nil || r.S3.CredentialsFile == "" {
		return getenv
	}
	return func(k string) string {
		if k == "AWS_SHARED_CREDENTIALS_FILE" {
			return r.S3.CredentialsFile
		}
		return getenv(k)
	}
}

// Libvirt says how to reach libvirtd.
type Libvirt struct {
	Connect string `yaml:"connect"` // default qemu:///system
	// ScratchDir receives each capture's temporary files: the fleece
	// method's copy-before-write images, the overlay method's overlays
	// (the guests' writes during a backup). Default /var/tmp.
	ScratchDir string `yaml:"scratch_dir"`
}

// Limits bound how many backups run at once and how fast they read.
type Limits struct {
	PerHost       int    `yaml:"per_host"`       // default 2
	PerDatastore  int    `yaml:"per_datastore"`  // default 1
	PerRepository int    `yaml:"per_repository"` // default 2
	Bandwidth     string `yaml:"bandwidth"`      // per backup, e.g. "200MiB" (per second); "" = unlimited
	// Nice is the CPU priority of the daemon's backups (and of the whole
	// daemon), -20 to 19; default 19, the lowest: hashing, compressing
	// and encrypting then take only the CPU the guests leave.
	Nice *int `yaml:"nice"`

	BandwidthBytes int64 `yaml:"-"`
	lines          map[string]int
}

// Latency configures adaptive latency control.
type Latency struct {
	Threshold Duration `yaml:"threshold"` // default 20ms; 0 disables control
	Interval  Duration `yaml:"interval"`  // sampling interval, default 2s
	Disabled  bool     `yaml:"disabled"`
	// MinRate is the floor a throttled backup's read rate never goes
	// below, Increase what is added per recovered interval (per second,
	// e.g. "4MiB"); defaults 8MiB and 16MiB. Set them well below the
	// datastore's throughput divided by the backups that may run on it.
	MinRate  string `yaml:"min_rate"`
	Increase string `yaml:"increase"`
	// ReadWindow also limits the backup reads in flight on a datastore to
	// one fewer than it is found to serve at once (throttle.Window). Off
	// by default: its estimate is still noisy on busy datastores, where it
	// holds backups well below what the guests can spare (docs/BENCHMARKS.md).
	ReadWindow bool `yaml:"read_window"`
	// MaxReads caps the backup reads in flight on one datastore (the read
	// window never grows past it; with read_window off, a fixed window of
	// this many reads); 0: no cap. Each read is one chunk.
	MaxReads int `yaml:"max_reads"`
	// ReadSize splits backup reads into requests of at most this size
	// ("64KiB"; a multiple of 4 KiB), each counted by max_reads: a guest
	// I/O queued behind one on the datastore then waits less. Default:
	// whole chunks (256 KiB).
	ReadSize string `yaml:"read_size"`

	MinRateBytes, IncreaseBytes, ReadSizeBytes int64 `yaml:"-"`
}

// Job is one scheduled backup.
type Job struct {
	Name       string   `yaml:"name"`
	Repository string   `yaml:"repository"`
	VMs        []string `yaml:"vms"`  // names or shell globs
	Tags       []string `yaml:"tags"` // libvirt metadata tags (any)
	All        bool     `yaml:"all"`  // every domain
	Mode       string   `yaml:"mode"` // app (default), crash, suspend, shutdown
	// Capture is the capture method: fleece (default) or overlay
	// (source.Method*).
	Capture   string    `yaml:"capture"`
	Schedule  string    `yaml:"schedule"`
	Window    *Window   `yaml:"window"`
	RPO       Duration  `yaml:"rpo"`
	Retention Retention `yaml:"retention"`
	Retry     Retry     `yaml:"retry"`

	lines map[string]int
	line  int
}

// CopyJob copies restore points from one repository of the configuration
// to another, as `kura copy` does: after each run of a backup job, or on a
// schedule of its own (docs/COPY.md, Copy jobs in the daemon).
type CopyJob struct {
	Name string `yaml:"name"`
	From string `yaml:"from"` // a repository of the configuration
	To   string `yaml:"to"`   // another one
	// VMs are the names (or shell globs) of the restore points copied;
	// none: all.
	VMs []string `yaml:"vms"`
	// Latest copies only the newest Latest restore points of each VM; 0:
	// all.
	Latest int `yaml:"latest"`
	// After names the backup job after each run of which the copy runs;
	// Schedule is a cron schedule instead. Exactly one of the two.
	After    string `yaml:"after"`
	Schedule string `yaml:"schedule"`
	// Retention is applied to the target's restore points of the
	// selected VMs after each successful copy; restore points it would
	// forget at once are not copied.
	Retention Retention `yaml:"retention"`
	// Verify reads back what was written (kura copy --verify).
	Verify bool `yaml:"verify"`
	// Bandwidth limits the upload to the target ("20MiB", per second);
	// "" = unlimited.
	Bandwidth string `yaml:"bandwidth"`

	BandwidthBytes int64 `yaml:"-"`
	lines          map[string]int
	line           int
}

// Selects reports whether the copy job copies restore points of VM name.
func (j *CopyJob) Selects(name string) bool {
	if len(j.VMs) == 0 {
		return true
	}
	for _, g := range j.VMs {
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}

// UnmarshalYAML implements yaml.Unmarshaler, recording key lines.
func (j *CopyJob) UnmarshalYAML(n *yaml.Node) error {
	type plain CopyJob
	if err := checkKnown(n, (*plain)(j)); err != nil {
		return err
	}
	if err := n.Decode((*plain)(j)); err != nil {
		return err
	}
	j.lines, j.line = keyLines(n), n.Line
	return nil
}

// Window is the time of day in which a job may start backups.
type Window struct {
	Start    string   `yaml:"start"` // "22:00"
	Duration Duration `yaml:"duration"`

	StartOfDay time.Duration `yaml:"-"`
	lines      map[string]int
}

// Retention is a keep policy applied after each run.
type Retention struct {
	Last    int `yaml:"keep_last"`
	Hourly  int `yaml:"keep_hourly"`
	Daily   int `yaml:"keep_daily"`
	Weekly  int `yaml:"keep_weekly"`
	Monthly int `yaml:"keep_monthly"`
	Yearly  int `yaml:"keep_yearly"`
}

// Policy converts r for package retention.
func (r Retention) Policy() retention.Policy {
	return retention.Policy{Last: r.Last, Hourly: r.Hourly, Daily: r.Daily, Weekly: r.Weekly, Monthly: r.Monthly, Yearly: r.Yearly}
}

// Retry says how a failed VM is retried within a run.
type Retry struct {
	Attempts int      `yaml:"attempts"` // default 3
	Backoff  Duration `yaml:"backoff"`  // first delay, doubled each time; default 1m
}

// Server is the daemon's own configuration.
type Server struct {
	Listen    string `yaml:"listen"`     // HTTP address for /metrics and /healthz; default 127.0.0.1:9470
	Catalog   string `yaml:"catalog"`    // SQLite file; default /var/lib/kura/catalog.db
	StateDir  string `yaml:"state_dir"`  // default /var/lib/kura
	LogFormat string `yaml:"log_format"` // text (default) or json
	Webhook   string `yaml:"webhook"`    // URL posted a JSON message when a run fails
	Email     *Email `yaml:"email"`      // e-mail sent when a run fails
}

// Email says how the daemon sends the e-mail about a failed run.
type Email struct {
	SMTP         string   `yaml:"smtp"` // host:port of the SMTP server
	From         string   `yaml:"from"`
	To           []string `yaml:"to"`
	Username     string   `yaml:"username"`
	PasswordFile string   `yaml:"password_file"` // the SMTP password, read at start and on reload
	TLS          string   `yaml:"tls"`           // starttls (default), tls, none
	CAFile       string   `yaml:"ca_file"`       // PEM roots the server's certificate must chain to

	Password string `yaml:"-"`
	lines    map[string]int
}

// Duration is a time.Duration written as "20ms", "1h30m", "7d".
type Duration struct{ time.Duration }

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return err
	}
	v, err := parseDuration(s)
	if err != nil {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %v", n.Line, err)}}
	}
	d.Duration = v
	return nil
}

func parseDuration(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%q is not a duration (like 30s, 20ms, 1h30m, 7d)", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%q is not a duration (like 30s, 20ms, 1h30m, 7d)", s)
	}
	return d, nil
}

// checkKnown fails on keys of mapping n that are not yaml fields of the
// struct v points to (yaml.v3 does not apply KnownFields inside custom
// unmarshalers).
func checkKnown(n *yaml.Node, v any) error {
	if n.Kind != yaml.MappingNode {
		return nil
	}
	known := map[string]bool{}
	t := reflect.TypeOf(v).Elem()
	for i := 0; i < t.NumField(); i++ {
		if name, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); name != "" && name != "-" {
			known[name] = true
		}
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if k := n.Content[i]; !known[k.Value] {
			return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: field %s not found", k.Line, k.Value)}}
		}
	}
	return nil
}

// keyLines records the line of each key of a mapping node.
func keyLines(n *yaml.Node) map[string]int {
	m := map[string]int{"": n.Line}
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			m[n.Content[i].Value] = n.Content[i].Line
		}
	}
	return m
}

// UnmarshalYAML implements yaml.Unmarshaler, recording key lines.
func (j *Job) UnmarshalYAML(n *yaml.Node) error {
	type plain Job
	if err := checkKnown(n, (*plain)(j)); err != nil {
		return err
	}
	if err := n.Decode((*plain)(j)); err != nil {
		return err
	}
	j.lines, j.line = keyLines(n), n.Line
	return nil
}

// UnmarshalYAML implements yaml.Unmarshaler, recording key lines.
func (r *Repository) UnmarshalYAML(n *yaml.Node) error {
	type plain Repository
	if err := checkKnown(n, (*plain)(r)); err != nil {
		return err
	}
	if err := n.Decode((*plain)(r)); err != nil {
		return err
	}
	r.lines = keyLines(n)
	return nil
}

// UnmarshalYAML implements yaml.Unmarshaler, recording key lines.
func (s *S3Location) UnmarshalYAML(n *yaml.Node) error {
	type plain S3Location
	if err := checkKnown(n, (*plain)(s)); err != nil {
		return err
	}
	if err := n.Decode((*plain)(s)); err != nil {
		return err
	}
	s.lines = keyLines(n)
	return nil
}

// UnmarshalYAML implements yaml.Unmarshaler, recording key lines.
func (w *Window) UnmarshalYAML(n *yaml.Node) error {
	type plain Window
	if err := checkKnown(n, (*plain)(w)); err != nil {
		return err
	}
	if err := n.Decode((*plain)(w)); err != nil {
		return err
	}
	w.lines = keyLines(n)
	return nil
}

// UnmarshalYAML implements yaml.Unmarshaler, recording key lines.
func (e *Email) UnmarshalYAML(n *yaml.Node) error {
	type plain Email
	if err := checkKnown(n, (*plain)(e)); err != nil {
		return err
	}
	if err := n.Decode((*plain)(e)); err != nil {
		return err
	}
	e.lines = keyLines(n)
	return nil
}

// UnmarshalYAML implements yaml.Unmarshaler, recording key lines.
func (l *Limits) UnmarshalYAML(n *yaml.Node) error {
	type plain Limits
	if err := checkKnown(n, (*plain)(l)); err != nil {
		return err
	}
	if err := n.Decode((*plain)(l)); err != nil {
		return err
	}
	l.lines = keyLines(n)
	return nil
}

// Load reads and validates the configuration file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the configuration: %w", err)
	}
	return Parse(path, data)
}

// Parse reads and validates a configuration; file names it in errors.
func Parse(file string, data []byte) (*Config, error) {
	c := &Config{file: file}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("%s: %s", file, cleanYAMLError(err))
	}
	if len(root.Content) == 0 {
		return nil, fmt.Errorf("%s: the configuration is empty: it needs at least repositories and jobs", file)
	}
	c.lines = keyLines(root.Content[0])
	dec := yaml.NewDecoder(strings.NewReader(string(data)))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil {
		return nil, fmt.Errorf("%s: %s", file, cleanYAMLError(err))
	}
	c.defaults()
	if err := c.validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// cleanYAMLError makes yaml.v3's messages read as "line N: ..." without
// Go type names.
func cleanYAMLError(err error) string {
	msg := err.Error()
	msg = strings.TrimPrefix(msg, "yaml: ")
	msg = strings.ReplaceAll(msg, "unmarshal errors:\n  ", "")
	msg = strings.ReplaceAll(msg, "\n  ", "; ")
	msg = regexp.MustCompile(` in type config\.\w+`).ReplaceAllString(msg, "")
	msg = regexp.MustCompile(`into config\.\w+`).ReplaceAllString(msg, "here")
	return msg
}

func (c *Config) defaults() {
	if c.Libvirt.Connect == "" {
		c.Libvirt.Connect = "qemu:///system"
	}
	// A limit written as 0 is left for validate to refuse: it would
	// start no backup at all.
	for _, l := range []struct {
		key string
		n   *int
		def int
	}{{"per_host", &c.Limits.PerHost, 2}, {"per_datastore", &c.Limits.PerDatastore, 1}, {"per_repository", &c.Limits.PerRepository, 2}} {
		if _, set := c.Limits.lines[l.key]; !set && *l.n == 0 {
			*l.n = l.def
		}
	}
	if c.Limits.Nice == nil {
		n := 19
		c.Limits.Nice = &n
	}
	if c.Latency.Threshold.Duration == 0 && !c.Latency.Disabled {
		c.Latency.Threshold.Duration = 20 * time.Millisecond
	}
	if c.Latency.Interval.Duration == 0 {
		c.Latency.Interval.Duration = 2 * time.Second
	}
	if c.Server.Listen == "" {
		c.Server.Listen = "127.0.0.1:9470"
	}
	if c.Server.StateDir == "" {
		c.Server.StateDir = "/var/lib/kura"
	}
	if c.Server.Catalog == "" {
		c.Server.Catalog = path.Join(c.Server.StateDir, "catalog.db")
	}
	if c.Server.LogFormat == "" {
		c.Server.LogFormat = "text"
	}
	for _, j := range c.Jobs {
		if j.Mode == "" {
			j.Mode = "app"
		}
		if j.Capture == "" {
			j.Capture = "fleece"
		}
		if j.Retry.Attempts == 0 {
			j.Retry.Attempts = 3
		}
		if j.Retry.Backoff.Duration == 0 {
			j.Retry.Backoff.Duration = time.Minute
		}
	}
}

func (c *Config) validateEmail(e *Email) []error {
	var errs []error
	at := func(key string) int {
		if l, ok := e.lines[key]; ok {
			return l
		}
		return e.lines[""]
	}
	if _, port, err := net.SplitHostPort(e.SMTP); err != nil || port == "" {
		errs = append(errs, c.errorf(at("smtp"), "server.email.smtp", "%q: give the SMTP server as host:port (587 for STARTTLS, 465 for TLS, 25 for a local relay)", e.SMTP))
	}
	if _, err := mail.ParseAddress(e.From); err != nil {
		errs = append(errs, c.errorf(at("from"), "server.email.from", "%q is not an e-mail address", e.From))
	}
	if len(e.To) == 0 {
		errs = append(errs, c.errorf(at("to"), "server.email.to", "no recipient"))
	}
	for _, a := range e.To {
		if _, err := mail.ParseAddress(a); err != nil {
			errs = append(errs, c.errorf(at("to"), "server.email.to", "%q is not an e-mail address", a))
		}
	}
	switch e.TLS {
	case "", "starttls", "tls", "none":
	default:
		errs = append(errs, c.errorf(at("tls"), "server.email.tls", "%q: use starttls, tls or none", e.TLS))
	}
	if e.Username != "" && e.TLS == "none" {
		errs = append(errs, c.errorf(at("username"), "server.email.username", "a password is only sent over TLS: use tls: starttls or tls"))
	}
	if e.PasswordFile != "" {
		b, err := os.ReadFile(e.PasswordFile)
		if err != nil {
			errs = append(errs, c.errorf(at("password_file"), "server.email.password_file", "%v", err))
		}
		e.Password = strings.TrimRight(string(b), "\r\n")
	}
	if e.CAFile != "" {
		if _, err := os.Stat(e.CAFile); err != nil {
			errs = append(errs, c.errorf(at("ca_file"), "server.email.ca_file", "%v", err))
		}
	}
	return errs
}

// errorf makes a validation error at line of field.
func (c *Config) errorf(line int, field, format string, args ...any) error {
	return fmt.Errorf("%s:%d: %s: %s", c.file, line, field, fmt.Sprintf(format, args...))
}

func (c *Config) validateS3(field string, s *S3Location) []error {
	var errs []error
	line := func(k string) int {
		if l, ok := s.lines[k]; ok {
			return l
		}
		return s.lines[""]
	}
	u, err := url.Parse(s.Endpoint)
	if s.Endpoint == "" || err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || strings.Trim(u.Path, "/") != "" || u.User != nil || u.RawQuery != "" {
		errs = append(errs, c.errorf(line("endpoint"), field+".endpoint", "%q: use https://HOST[:PORT] (or http:// on a trusted network), without bucket, path or credentials", s.Endpoint))
	}
	if s.Bucket == "" || strings.ContainsAny(s.Bucket, "/?#") {
		errs = append(errs, c.errorf(line("bucket"), field+".bucket", "%q: name the bucket, which must exist", s.Bucket))
	}
	if s.Style != "" && s.Style != "path" && s.Style != "virtual" {
		errs = append(errs, c.errorf(line("style"), field+".style", "%q: use path or virtual", s.Style))
	}
	for _, f := range []struct{ key, path string }{{"ca_file", s.CAFile}, {"credentials_file", s.CredentialsFile}} {
		if f.path == "" {
			continue
		}
		if fh, err := os.Open(f.path); err != nil {
			errs = append(errs, c.errorf(line(f.key), field+"."+f.key, "%v", err))
		} else {
			fh.Close()
		}
	}
	return errs
}

func (c *Config) validate() error {
	var errs []error
	if len(c.Repositories) == 0 {
		errs = append(errs, c.errorf(c.lines[""], "repositories", "no repository is configured"))
	}
	for name, r := range c.Repositories {
		field := "repositories." + name
		switch {
		case r == nil || r.Path == "" && r.S3 == nil:
			line := c.lines["repositories"]
			if r != nil {
				line = r.lines[""]
			}
			errs = append(errs, c.errorf(line, field+".path", "missing: the repository's location (a directory, or s3:https://HOST/BUCKET[/PREFIX]), or s3: with endpoint and bucket"))
		case r.Path != "" && r.S3 != nil:
			errs = append(errs, c.errorf(r.lines["s3"], field, "give path or s3, not both"))
		case r.S3 != nil:
			errs = append(errs, c.validateS3(field+".s3", r.S3)...)
		}
	}
	for _, l := range []struct {
		key string
		n   int
	}{{"per_host", c.Limits.PerHost}, {"per_datastore", c.Limits.PerDatastore}, {"per_repository", c.Limits.PerRepository}} {
		if l.n < 1 || l.n > 1000 {
			errs = append(errs, c.errorf(c.Limits.lines[l.key], "limits."+l.key, "%d: use 1 to 1000 backups at once (leave it out for the default)", l.n))
		}
	}
	if d := c.Latency.Interval.Duration; d < 100*time.Millisecond || d > time.Hour {
		errs = append(errs, c.errorf(c.lines["latency"], "latency.interval", "%s: use 100ms to 1h (leave it out for 2s)", d))
	}
	if c.Latency.MaxReads < 0 {
		errs = append(errs, c.errorf(c.lines["latency"], "latency.max_reads", "%d: use a positive number of reads, or 0 for no cap", c.Latency.MaxReads))
	}
	if n := *c.Limits.Nice; n < -20 || n > 19 {
		errs = append(errs, c.errorf(c.Limits.lines["nice"], "limits.nice", "%d: use a CPU priority from -20 to 19 (19, the default, is the lowest)", n))
	}
	if c.Limits.Bandwidth != "" {
		n, err := units.ParseRate(c.Limits.Bandwidth)
		if err != nil {
			errs = append(errs, c.errorf(c.Limits.lines["bandwidth"], "limits.bandwidth", "%v", err))
		}
		c.Limits.BandwidthBytes = n
	}
	for _, r := range []struct {
		field string
		s     string
		n     *int64
	}{{"latency.min_rate", c.Latency.MinRate, &c.Latency.MinRateBytes}, {"latency.increase", c.Latency.Increase, &c.Latency.IncreaseBytes}} {
		if r.s == "" {
			continue
		}
		n, err := units.ParseRate(r.s)
		if err != nil {
			errs = append(errs, c.errorf(c.lines["latency"], r.field, "%v", err))
		}
		*r.n = n
	}
	if c.Latency.ReadSize != "" {
		n, err := units.ParseSize(c.Latency.ReadSize)
		if err != nil || n < 4<<10 || n%(4<<10) != 0 {
			errs = append(errs, c.errorf(c.lines["latency"], "latency.read_size", "%q: use a multiple of 4 KiB, like 64KiB", c.Latency.ReadSize))
		}
		c.Latency.ReadSizeBytes = n
	}
	if c.Server.LogFormat != "text" && c.Server.LogFormat != "json" {
		errs = append(errs, c.errorf(c.lines["server"], "server.log_format", "%q: use text or json", c.Server.LogFormat))
	}
	if e := c.Server.Email; e != nil {
		errs = append(errs, c.validateEmail(e)...)
	}
	if len(c.Jobs) == 0 && len(c.Copies) == 0 {
		errs = append(errs, c.errorf(c.lines[""], "jobs", "no job is configured"))
	}
	names := map[string]int{}
	for i, j := range c.Jobs {
		at := func(key string) int {
			if l, ok := j.lines[key]; ok {
				return l
			}
			return j.line
		}
		field := fmt.Sprintf("jobs[%d]", i)
		if j.Name != "" {
			field += " (" + j.Name + ")"
		}
		if j.Name == "" {
			errs = append(errs, c.errorf(at("name"), field+".name", "missing: every job needs a name"))
		} else if prev, dup := names[j.Name]; dup {
			errs = append(errs, c.errorf(at("name"), field+".name", "%q is also the name of the job at line %d", j.Name, prev))
		}
		names[j.Name] = at("name")
		if _, ok := c.Repositories[j.Repository]; !ok {
			errs = append(errs, c.errorf(at("repository"), field+".repository", "%q is not one of the repositories configured", j.Repository))
		}
		if !j.All && len(j.VMs) == 0 && len(j.Tags) == 0 {
			errs = append(errs, c.errorf(j.line, field, "say which VMs: vms (names or globs), tags, or all: true"))
		}
		for _, g := range j.VMs {
			if _, err := path.Match(g, ""); err != nil {
				errs = append(errs, c.errorf(at("vms"), field+".vms", "%q is not a valid glob", g))
			}
		}
		switch j.Mode {
		case "app", "crash", "suspend", "shutdown":
		default:
			errs = append(errs, c.errorf(at("mode"), field+".mode", "%q: use app, crash, suspend or shutdown", j.Mode))
		}
		switch j.Capture {
		case "fleece", "overlay":
		default:
			errs = append(errs, c.errorf(at("capture"), field+".capture", "%q: use fleece or overlay", j.Capture))
		}
		if j.Schedule == "" {
			errs = append(errs, c.errorf(at("schedule"), field+".schedule", "missing: a cron schedule like \"0 22 * * *\" or @daily"))
		} else if err := schedule.CheckSchedule(j.Schedule); err != nil {
			errs = append(errs, c.errorf(at("schedule"), field+".schedule", "%q: %v", j.Schedule, err))
		} else if every, ok := strings.CutPrefix(j.Schedule, "@every "); ok {
			if d, err := parseDuration(strings.TrimSpace(every)); err == nil && d < time.Minute {
				errs = append(errs, c.errorf(at("schedule"), field+".schedule", "%q: @every needs at least 1m", j.Schedule))
			}
		}
		if w := j.Window; w != nil {
			t, err := time.Parse("15:04", w.Start)
			if err != nil {
				errs = append(errs, c.errorf(w.lines["start"], field+".window.start", "%q: use HH:MM", w.Start))
			}
			w.StartOfDay = time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute
			if w.Duration.Duration <= 0 || w.Duration.Duration > 24*time.Hour {
				errs = append(errs, c.errorf(w.lines["duration"], field+".window.duration", "must be between 1m and 24h"))
			}
		}
		if j.Retry.Attempts < 0 || j.Retry.Attempts > 100 {
			errs = append(errs, c.errorf(at("retry"), field+".retry.attempts", "%d: use 1 to 100 (leave it out for 3)", j.Retry.Attempts))
		}
		for _, k := range []struct {
			key string
			n   int
		}{{"keep_last", j.Retention.Last}, {"keep_hourly", j.Retention.Hourly}, {"keep_daily", j.Retention.Daily},
			{"keep_weekly", j.Retention.Weekly}, {"keep_monthly", j.Retention.Monthly}, {"keep_yearly", j.Retention.Yearly}} {
			if k.n < 0 {
				errs = append(errs, c.errorf(at("retention"), field+".retention."+k.key, "%d: use a positive number of restore points, or leave it out", k.n))
			}
		}
	}
	errs = append(errs, c.validateCopies(names)...)
	return errors.Join(errs...)
}

// checkSchedule validates a cron schedule of field at line.
func (c *Config) checkSchedule(line int, field, spec string) error {
	if err := schedule.CheckSchedule(spec); err != nil {
		return c.errorf(line, field, "%q: %v", spec, err)
	}
	if every, ok := strings.CutPrefix(spec, "@every "); ok {
		if d, err := parseDuration(strings.TrimSpace(every)); err == nil && d < time.Minute {
			return c.errorf(line, field, "%q: @every needs at least 1m", spec)
		}
	}
	return nil
}

// validateCopies checks the copy jobs; names holds the backup jobs' names
// and lines (a copy job's name is one more name for run-now and the
// catalog, so it must differ from every job's).
func (c *Config) validateCopies(names map[string]int) []error {
	var errs []error
	copyNames := map[string]int{}
	for i, j := range c.Copies {
		at := func(key string) int {
			if l, ok := j.lines[key]; ok {
				return l
			}
			return j.line
		}
		field := fmt.Sprintf("copies[%d]", i)
		if j.Name != "" {
			field += " (" + j.Name + ")"
		}
		switch prevJob, isJob := names[j.Name]; {
		case j.Name == "":
			errs = append(errs, c.errorf(at("name"), field+".name", "missing: every copy job needs a name"))
		case isJob:
			errs = append(errs, c.errorf(at("name"), field+".name", "%q is also the name of the job at line %d", j.Name, prevJob))
		default:
			if prev, dup := copyNames[j.Name]; dup {
				errs = append(errs, c.errorf(at("name"), field+".name", "%q is also the name of the copy job at line %d", j.Name, prev))
			}
		}
		copyNames[j.Name] = at("name")
		for _, side := range []struct{ key, repo string }{{"from", j.From}, {"to", j.To}} {
			if side.repo == "" {
				errs = append(errs, c.errorf(at(side.key), field+"."+side.key, "missing: name one of the repositories configured"))
			} else if _, ok := c.Repositories[side.repo]; !ok {
				errs = append(errs, c.errorf(at(side.key), field+"."+side.key, "%q is not one of the repositories configured", side.repo))
			}
		}
		if j.From != "" && j.From == j.To {
			errs = append(errs, c.errorf(at("to"), field+".to", "%q is also the source: copy to another repository", j.To))
		} else if f, t := c.Repositories[j.From], c.Repositories[j.To]; f != nil && t != nil && (f.Path != "" || f.S3 != nil) && f.Location() == t.Location() {
			errs = append(errs, c.errorf(at("to"), field+".to", "repositories %s and %s are the same location %s", j.From, j.To, f.Location()))
		}
		for _, g := range j.VMs {
			if _, err := path.Match(g, ""); err != nil {
				errs = append(errs, c.errorf(at("vms"), field+".vms", "%q is not a valid glob", g))
			}
		}
		if j.Latest < 0 {
			errs = append(errs, c.errorf(at("latest"), field+".latest", "%d: use a positive number of restore points per VM, or leave it out for all", j.Latest))
		}
		switch {
		case j.After != "" && j.Schedule != "":
			errs = append(errs, c.errorf(at("schedule"), field, "give after (a backup job) or schedule, not both"))
		case j.After == "" && j.Schedule == "":
			errs = append(errs, c.errorf(j.line, field, "say when it runs: after (a backup job, after each of its runs) or schedule (cron)"))
		case j.After != "":
			if _, ok := names[j.After]; !ok {
				errs = append(errs, c.errorf(at("after"), field+".after", "%q is not one of the jobs configured", j.After))
			}
		default:
			if err := c.checkSchedule(at("schedule"), field+".schedule", j.Schedule); err != nil {
				errs = append(errs, err)
			}
		}
		for _, k := range []struct {
			key string
			n   int
		}{{"keep_last", j.Retention.Last}, {"keep_hourly", j.Retention.Hourly}, {"keep_daily", j.Retention.Daily},
			{"keep_weekly", j.Retention.Weekly}, {"keep_monthly", j.Retention.Monthly}, {"keep_yearly", j.Retention.Yearly}} {
			if k.n < 0 {
				errs = append(errs, c.errorf(at("retention"), field+".retention."+k.key, "%d: use a positive number of restore points, or leave it out", k.n))
			}
		}
		if j.Bandwidth != "" {
			n, err := units.ParseRate(j.Bandwidth)
			if err != nil {
				errs = append(errs, c.errorf(at("bandwidth"), field+".bandwidth", "%v", err))
			}
			j.BandwidthBytes = n
		}
	}
	return errs
}

// Job returns the job called name, or nil (a job removed by a reload).
func (c *Config) Job(name string) *Job {
	for _, j := range c.Jobs {
		if j.Name == name {
			return j
		}
	}
	return nil
}

// CopyJob returns the copy job called name, or nil.
func (c *Config) CopyJob(name string) *CopyJob {
	for _, j := range c.Copies {
		if j.Name == name {
			return j
		}
	}
	return nil
}

// UnmarshalYAML implements yaml.Unmarshaler, refusing unknown keys.
func (r *Retention) UnmarshalYAML(n *yaml.Node) error {
	type plain Retention
	if err := checkKnown(n, (*plain)(r)); err != nil {
		return err
	}
	return n.Decode((*plain)(r))
}

// UnmarshalYAML implements yaml.Unmarshaler, refusing unknown keys.
func (r *Retry) UnmarshalYAML(n *yaml.Node) error {
	type plain Retry
	if err := checkKnown(n, (*plain)(r)); err != nil {
		return err
	}
	return n.Decode((*plain)(r))
}
