// Package location owns repository locations: the strings a user gives
// as --repo, KURA_REPO or a configuration's repository path, and the
// backends they open. It is the one place that turns a location into a
// backend.Backend, wrapped in the decorators every caller gets: retries
// for object stores (internal/backend/retry), bandwidth limits
// (internal/backend/limit), and for object stores a local cache of the
// metadata objects (internal/backend/cache).
//
// Locations:
//
//	/srv/kura, ./repo, local:/srv/kura      a local directory
//	s3:https://HOST[:PORT]/BUCKET[/PREFIX]  an S3-compatible object store
//	s3:http://HOST[:PORT]/BUCKET[/PREFIX]   the same without TLS (tests, a trusted network)
//
// An S3 location may end in query parameters: region=NAME (else
// AWS_REGION or AWS_DEFAULT_REGION), style=path|virtual (path by default
// for other endpoints than AWS), ca=FILE (a PEM CA to trust, else
// AWS_CA_BUNDLE), profile=NAME (a profile of the shared credentials file,
// else AWS_PROFILE). Credentials never go into a location, which shows in
// process lists, logs and configuration files: they come from
// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, or from
// the credentials file (AWS_SHARED_CREDENTIALS_FILE, default
// ~/.aws/credentials); see s3.FromEnv.
package location

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/cache"
	"github.com/kura-backup/kura/internal/backend/limit"
	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backend/retry"
	"github.com/kura-backup/kura/internal/backend/s3"
)

// Options are how to open a location.
type Options struct {
	// Logger receives the retry lines and debug lines; nil discards them.
	Logger *slog.Logger
	// Getenv reads the environment (credentials, region, CA); nil is
	// os.Getenv.
	Getenv func(string) string
	// NoRetry leaves object stores without the retry decorator (tests
	// that want to see the first error).
	NoRetry bool
	// Retry is the retry policy; zero fields take retry.DefaultPolicy's.
	Retry retry.Policy
	// UploadLimit and DownloadLimit are bandwidth limits in bytes per
	// second for the repository's objects; 0 for none.
	UploadLimit, DownloadLimit float64
	// NoCache leaves object stores without the local metadata cache
	// (internal/backend/cache), which they get by default. A local
	// directory never gets it: reading its objects is as fast as reading
	// the cache's.
	NoCache bool
	// CacheDir is the directory that holds the metadata caches, one
	// directory per location in it; "" takes cache.Root of the
	// environment (Getenv). When neither gives one, there is no cache.
	CacheDir string
	// S3 tunes S3 backends: MultipartThreshold, PartSize,
	// PartConcurrency and Transport are taken from it; the rest comes
	// from the location and the environment.
	S3 s3.Config
}

// Location is a parsed location.
type Location struct {
	// Kind is "local" or "s3".
	Kind string
	// Path is a local location's directory.
	Path string
	// S3 is an S3 location's endpoint, bucket, prefix, region, style and
	// CA file (no credentials); Profile the credentials profile it names.
	S3      s3.Config
	Profile string
}

var schemeRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*:`)

// Parse reads a location; getenv (nil: os.Getenv) supplies the defaults
// of an S3 location's parameters.
func Parse(loc string, getenv func(string) string) (Location, error) {
	if getenv == nil {
		getenv = os.Getenv
	}
	switch {
	case loc == "":
		return Location{}, errors.New("no repository location given: set KURA_REPO or pass --repo")
	case strings.HasPrefix(loc, "local:"):
		p := strings.TrimPrefix(loc, "local:")
		if p == "" {
			return Location{}, errors.New("repository location local: names no directory")
		}
		return Location{Kind: "local", Path: p}, nil
	case strings.HasPrefix(loc, "s3:"):
		return parseS3(strings.TrimPrefix(loc, "s3:"), getenv)
	case strings.HasPrefix(loc, "http://"), strings.HasPrefix(loc, "https://"):
		return Location{}, fmt.Errorf("repository location %q: an S3 location starts with s3: (s3:%s)", redact(loc), redact(loc))
	}
	if m := schemeRE.FindString(loc); m != "" && strings.HasPrefix(loc[len(m):], "//") {
		return Location{}, fmt.Errorf("repository location %q: unknown kind %q: use a directory, local:DIR or s3:https://HOST/BUCKET[/PREFIX]", redact(loc), strings.TrimSuffix(m, ":"))
	}
	return Location{Kind: "local", Path: loc}, nil
}

// redact drops a URL's user information, should someone put a key there.
func redact(loc string) string {
	i := strings.Index(loc, "://")
	if i < 0 {
		return loc
	}
	rest := loc[i+3:]
	host, _, _ := strings.Cut(rest, "/")
	if at := strings.LastIndex(host, "@"); at >= 0 {
		return loc[:i+3] + "REDACTED@" + rest[at+1:]
	}
	return loc
}

func parseS3(raw string, getenv func(string) string) (Location, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return Location{}, fmt.Errorf("repository location s3:%s does not parse: want s3:https://HOST[:PORT]/BUCKET[/PREFIX]", redact(raw))
	}
	if u.User != nil {
		return Location{}, errors.New("repository location: credentials do not go into an S3 location (it shows in process lists and logs): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
	}
	if (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return Location{}, fmt.Errorf("repository location s3:%s: want s3:https://HOST[:PORT]/BUCKET[/PREFIX] (or s3:http://…)", raw)
	}
	bucket, prefix, _ := strings.Cut(strings.TrimPrefix(u.Path, "/"), "/")
	if bucket == "" {
		return Location{}, fmt.Errorf("repository location s3:%s names no bucket: s3:%s://%s/BUCKET[/PREFIX]", raw, u.Scheme, u.Host)
	}
	l := Location{Kind: "s3", S3: s3.Config{
		Endpoint: u.Scheme + "://" + u.Host,
		Bucket:   bucket,
		Prefix:   strings.Trim(prefix, "/"),
		Region:   firstOf(getenv("AWS_REGION"), getenv("AWS_DEFAULT_REGION")),
		CAFile:   getenv("AWS_CA_BUNDLE"),
	}}
	q := u.Query()
	var unknown []string
	for k, v := range q {
		val := v[len(v)-1]
		switch k {
		case "region":
			l.S3.Region = val
		case "ca":
			l.S3.CAFile = val
		case "profile":
			l.Profile = val
		case "as-of":
			t, err := ParseTime(val)
			if err != nil {
				return Location{}, fmt.Errorf("repository location: as-of=%s: %w", val, err)
			}
			l.S3.AsOf = t
		case "style":
			switch val {
			case "path":
				l.S3.VirtualHost = false
			case "virtual":
				l.S3.VirtualHost = true
			default:
				return Location{}, fmt.Errorf("repository location: style=%s: want style=path or style=virtual", val)
			}
		default:
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return Location{}, fmt.Errorf("repository location: unknown parameter %s: an S3 location takes region, style, ca, profile and as-of", strings.Join(unknown, ", "))
	}
	return l, nil
}

// ParseTime reads a point in time as a user writes one: RFC 3339
// ("2026-12-07T10:00:00Z", "2026-12-07T10:00:00+01:00"), or a local date
// and time ("2026-12-07 10:00", "2026-12-07T10:00:00", "2026-12-07").
func ParseTime(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	for _, f := range []string{"2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02T15:04", "2006-01-02 15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(f, s, time.Local); err == nil {
			return t, nil
		}
	}
	return time.Time{}, errors.New("want a time such as 2026-12-07T10:00:00Z or \"2026-12-07 10:00\" (local time)")
}

func firstOf(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

// Canonical returns loc in a form that means the same from any working
// directory (a local path made absolute), for handing to another process.
func Canonical(loc string) (string, error) {
	l, err := Parse(loc, func(string) string { return "" })
	if err != nil {
		return "", err
	}
	if l.Kind != "local" {
		return loc, nil
	}
	abs, err := filepath.Abs(l.Path)
	if err != nil {
		return "", fmt.Errorf("repository path %q: %w", l.Path, err)
	}
	if strings.HasPrefix(loc, "local:") {
		return "local:" + abs, nil
	}
	return abs, nil
}

// cacheKey names the storage l designates, for the metadata cache: an
// S3 location without its parameters (which change how the store is
// reached, not which objects it holds); a local directory's absolute path.
func (l Location) cacheKey() string {
	if l.Kind == "s3" {
		k := "s3:" + l.S3.Endpoint + "/" + l.S3.Bucket
		if l.S3.Prefix != "" {
			k += "/" + l.S3.Prefix
		}
		return k
	}
	abs, err := filepath.Abs(l.Path)
	if err != nil {
		abs = l.Path
	}
	return "local:" + abs
}

// CacheDir returns the directory of loc's metadata cache under the
// cache root of opts (CacheDir, else from the environment), whether or
// not Open would use it; "" when there is no cache root.
func CacheDir(loc string, opts Options) (string, error) {
	getenv := opts.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	l, err := Parse(loc, getenv)
	if err != nil {
		return "", err
	}
	root := opts.CacheDir
	if root == "" {
		root = cache.Root(getenv)
	}
	if root == "" {
		return "", nil
	}
	return cache.Dir(root, l.cacheKey()), nil
}

// Open opens the backend at loc. An S3 location is checked on the way
// (the bucket exists, the credentials are accepted), wrapped in retries
// unless opts.NoRetry, and given a local metadata cache unless
// opts.NoCache or it is a view as of a time; any location gets the bandwidth limits of opts (which a
// load served by the cache does not count against).
func Open(ctx context.Context, loc string, opts Options) (backend.Backend, error) {
	getenv := opts.Getenv
	if getenv == nil {
		getenv = os.Getenv
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l, err := Parse(loc, getenv)
	if err != nil {
		return nil, err
	}
	var be backend.Backend
	switch l.Kind {
	case "local":
		lb, err := local.Open(l.Path)
		if err != nil {
			return nil, err
		}
		be = lb
	case "s3":
		creds, from, err := s3.FromEnv(getenv, l.Profile)
		if err != nil {
			return nil, fmt.Errorf("repository %s: %w", redact(loc), err)
		}
		cfg := l.S3
		cfg.Credentials = creds
		cfg.Logger = log
		cfg.MultipartThreshold = opts.S3.MultipartThreshold
		cfg.PartSize = opts.S3.PartSize
		cfg.PartConcurrency = opts.S3.PartConcurrency
		cfg.Transport = opts.S3.Transport
		sb, err := s3.Open(ctx, cfg)
		if err != nil {
			return nil, err
		}
		log.Debug("repository on S3", "location", sb.Location(), "credentials", from)
		be = sb
		if !opts.NoRetry {
			be = retry.New(be, opts.Retry, log)
		}
	}
	if opts.UploadLimit > 0 || opts.DownloadLimit > 0 {
		be = limit.New(be, opts.UploadLimit, opts.DownloadLimit)
	}
	// Not for a view of the past (as-of): it must read the versions the
	// store kept, never copies of the present ones, which after an attack
	// that overwrote objects may be the attacker's bytes.
	if l.Kind == "s3" && !opts.NoCache && l.S3.AsOf.IsZero() {
		root := opts.CacheDir
		if root == "" {
			root = cache.Root(getenv)
		}
		if root == "" {
			log.Debug("no metadata cache: set KURA_CACHE_DIR, XDG_CACHE_HOME or HOME")
			return be, nil
		}
		key := l.cacheKey()
		cb, err := cache.New(be, cache.Dir(root, key), key, log)
		if err != nil {
			log.Warn("going on without the metadata cache", "err", err)
			return be, nil
		}
		log.Debug("metadata cache", "dir", cb.Dir())
		be = cb
	}
	return be, nil
}
