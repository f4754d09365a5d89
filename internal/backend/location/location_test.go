package location

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/limit"
	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/backend/retry"
	"github.com/kura-backup/kura/internal/backend/s3"
	"github.com/kura-backup/kura/internal/backend/s3/s3test"
)

var servers = s3test.NewPool()

func TestMain(m *testing.M) {
	code := m.Run()
	servers.Close()
	os.Exit(code)
}

func envOf(kv ...string) func(string) string {
	m := map[string]string{}
	for _, s := range kv {
		k, v, _ := strings.Cut(s, "=")
		m[k] = v
	}
	return func(k string) string { return m[k] }
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		loc  string
		env  []string
		want Location
		err  string
	}{
		{loc: "/srv/kura", want: Location{Kind: "local", Path: "/srv/kura"}},
		{loc: "repo", want: Location{Kind: "local", Path: "repo"}},
		{loc: "local:/srv/kura", want: Location{Kind: "local", Path: "/srv/kura"}},
		{loc: "/srv/a:b", want: Location{Kind: "local", Path: "/srv/a:b"}},
		{loc: "s3:https://s3.example.com/bucket", want: Location{Kind: "s3", S3: s3.Config{Endpoint: "https://s3.example.com", Bucket: "bucket"}}},
		{loc: "s3:http://127.0.0.1:9000/b/some/prefix/", want: Location{Kind: "s3", S3: s3.Config{Endpoint: "http://127.0.0.1:9000", Bucket: "b", Prefix: "some/prefix"}}},
		{loc: "s3:https://h/b/p?region=eu-west-3&style=virtual&ca=/etc/ca.pem&profile=backup",
			want: Location{Kind: "s3", Profile: "backup", S3: s3.Config{Endpoint: "https://h", Bucket: "b", Prefix: "p", Region: "eu-west-3", VirtualHost: true, CAFile: "/etc/ca.pem"}}},
		{loc: "s3:https://h/b", env: []string{"AWS_REGION=us-west-2", "AWS_CA_BUNDLE=/ca.pem"},
			want: Location{Kind: "s3", S3: s3.Config{Endpoint: "https://h", Bucket: "b", Region: "us-west-2", CAFile: "/ca.pem"}}},
		{loc: "s3:https://h/b", env: []string{"AWS_DEFAULT_REGION=ap-south-1"},
			want: Location{Kind: "s3", S3: s3.Config{Endpoint: "https://h", Bucket: "b", Region: "ap-south-1"}}},
		{loc: "s3:https://h/b?region=x", env: []string{"AWS_REGION=y"},
			want: Location{Kind: "s3", S3: s3.Config{Endpoint: "https://h", Bucket: "b", Region: "x"}}},
		{loc: "", err: "no repository location"},
		{loc: "local:", err: "names no directory"},
		{loc: "s3:https://h", err: "names no bucket"},
		{loc: "s3:https://h/", err: "names no bucket"},
		{loc: "s3:ftp://h/b", err: "want s3:https://"},
		{loc: "s3:h/b", err: "want s3:https://"},
		{loc: "s3:https://AKIA:topsecret@h/b", err: "credentials do not go into"},
		{loc: "s3:https://h/b?style=dns", err: "style=path or style=virtual"},
		{loc: "s3:https://h/b?secret=x&foo=1", err: "unknown parameter foo, secret"},
		{loc: "https://h/b", err: "starts with s3:"},
		{loc: "https://AKIA:topsecret@h/b", err: "REDACTED@h"},
		{loc: "gs://bucket/x", err: `unknown kind "gs"`},
	} {
		t.Run(tc.loc, func(t *testing.T) {
			got, err := Parse(tc.loc, envOf(tc.env...))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("Parse = %+v, %v; want error with %q", got, err, tc.err)
				}
				if strings.Contains(err.Error(), "topsecret") {
					t.Errorf("the error shows the secret: %v", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("Parse = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestCanonical(t *testing.T) {
	wd, _ := os.Getwd()
	for _, tc := range []struct{ loc, want string }{
		{"repo", filepath.Join(wd, "repo")},
		{"/srv/kura", "/srv/kura"},
		{"local:rel", "local:" + filepath.Join(wd, "rel")},
		{"s3:https://h/b/p?region=x", "s3:https://h/b/p?region=x"},
	} {
		if got, err := Canonical(tc.loc); err != nil || got != tc.want {
			t.Errorf("Canonical(%q) = %q, %v; want %q", tc.loc, got, err, tc.want)
		}
	}
}

func TestOpenLocal(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	be, err := Open(ctx, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := be.(*local.Backend); !ok || be.Location() != "local:"+dir {
		t.Fatalf("Open(%s) = %T %s, want the local backend, no decorator", dir, be, be.Location())
	}
	be, err = Open(ctx, "local:"+dir, Options{UploadLimit: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := be.(*limit.Backend); !ok {
		t.Fatalf("Open with a limit = %T, want the limit decorator", be)
	}
}

func TestS3Credentials(t *testing.T) {
	ctx := context.Background()
	home := t.TempDir()
	for _, tc := range []struct {
		name string
		env  []string
		err  string
	}{
		{"none", []string{"HOME=" + home}, "no S3 credentials: set AWS_ACCESS_KEY_ID"},
		{"id without secret", []string{"HOME=" + home, "AWS_ACCESS_KEY_ID=AKIA"}, "AWS_SECRET_ACCESS_KEY is not"},
		{"file without the profile", []string{"AWS_SHARED_CREDENTIALS_FILE=" + writeCreds(t, "[other]\naws_access_key_id = a\naws_secret_access_key = topsecret\n"), "AWS_PROFILE=backup"}, `no S3 credentials for profile "backup"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Open(ctx, "s3:http://127.0.0.1:1/bucket", Options{Getenv: envOf(tc.env...)})
			if err == nil || !strings.Contains(err.Error(), tc.err) || strings.Contains(err.Error(), "topsecret") {
				t.Fatalf("Open: %v; want an error with %q", err, tc.err)
			}
		})
	}
}

func writeCreds(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "credentials")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// slowDown answers 503 SlowDown to the first n requests it sees, but
// for the S3 backend's checksum probe (a PUT under probe/ before its first
// upload), which is not the call under test.
type slowDown struct {
	base http.RoundTripper
	n    atomic.Int32
}

func (s *slowDown) RoundTrip(req *http.Request) (*http.Response, error) {
	if strings.Contains(req.URL.Path, "/probe/") {
		return s.base.RoundTrip(req)
	}
	if s.n.Add(-1) >= 0 {
		return s3test.SlowDown(req), nil
	}
	return s.base.RoundTrip(req)
}

// TestS3 opens real servers through the registry: credentials from the
// environment or a credentials file, retries on by default (a server
// answering SlowDown is ridden out, with a log line per retry), and the
// errors a user meets on one line.
func TestS3(t *testing.T) {
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := servers.Get(t, k)
			ctx := context.Background()
			loc := srv.Location(srv.Bucket, "registry/"+strings.ReplaceAll(t.Name(), "/", "-"))
			env := envOf(srv.Env()...)

			t.Run("environment credentials, retries", func(t *testing.T) {
				base, err := minio.DefaultTransport(false)
				if err != nil {
					t.Fatal(err)
				}
				tr := &slowDown{base: base}
				var logged bytes.Buffer
				be, err := Open(ctx, loc, Options{Getenv: env, Logger: slog.New(slog.NewTextHandler(&logged, nil)),
					Retry: retry.Policy{Base: time.Millisecond}, S3: s3.Config{Transport: tr}})
				if err != nil {
					t.Fatal(err)
				}
				if _, ok := be.(*retry.Backend); !ok {
					t.Fatalf("Open = %T, want the retry decorator", be)
				}
				if be.Location() != loc {
					t.Errorf("Location() = %q, want %q", be.Location(), loc)
				}
				tr.n.Store(3)
				if err := be.Save(ctx, "snapshots/one", []byte("restore point")); err != nil {
					t.Fatalf("Save through three SlowDowns: %v", err)
				}
				if got, err := be.Load(ctx, "snapshots/one", 0, 0); err != nil || string(got) != "restore point" {
					t.Fatalf("Load = %q, %v", got, err)
				}
				if n := strings.Count(logged.String(), "retrying"); n != 3 {
					t.Errorf("%d retry lines, want 3:\n%s", n, logged.String())
				}
				if strings.Contains(logged.String(), srv.SecretKey) {
					t.Errorf("the log shows the secret")
				}
				// Beyond the attempts, the error says what happened.
				tr.n.Store(100)
				err = be.Save(ctx, "snapshots/two", []byte("x"))
				if err == nil || !strings.Contains(err.Error(), "SlowDown") || !strings.Contains(err.Error(), fmt.Sprintf("gave up after %d attempts", retry.DefaultPolicy.Attempts)) {
					t.Fatalf("Save through endless SlowDowns: %v", err)
				}
				tr.n.Store(0)
			})

			t.Run("credentials file", func(t *testing.T) {
				file := writeCreds(t, "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n[kura]\naws_access_key_id = "+srv.AccessKey+"\naws_secret_access_key = "+srv.SecretKey+"\n")
				for _, tc := range []struct {
					loc string
					env []string
				}{
					{loc, []string{"AWS_SHARED_CREDENTIALS_FILE=" + file, "AWS_PROFILE=kura"}},
					{loc + "?profile=kura", []string{"AWS_SHARED_CREDENTIALS_FILE=" + file}},
				} {
					be, err := Open(ctx, tc.loc, Options{Getenv: envOf(tc.env...)})
					if err != nil {
						t.Fatalf("%s: %v", tc.loc, err)
					}
					if _, err := be.Load(ctx, "snapshots/one", 0, 0); err != nil {
						t.Fatal(err)
					}
				}
			})

			t.Run("errors", func(t *testing.T) {
				for _, tc := range []struct {
					name, loc string
					env       []string
					want      error
					says      string
				}{
					{"wrong secret", loc, []string{"AWS_ACCESS_KEY_ID=" + srv.AccessKey, "AWS_SECRET_ACCESS_KEY=wrong-secret-123"}, s3.ErrAccess, "check the credentials"},
					{"missing bucket", srv.Location("no-such-bucket", "x"), srv.Env(), s3.ErrNoBucket, "create it"},
				} {
					start := time.Now()
					_, err := Open(ctx, tc.loc, Options{Getenv: envOf(tc.env...)})
					if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.says) {
						t.Fatalf("%s: Open = %v, want %v", tc.name, err, tc.want)
					}
					if msg := err.Error(); strings.Contains(msg, "\n") || strings.Contains(msg, "wrong-secret-123") || strings.Contains(msg, srv.SecretKey) {
						t.Errorf("%s: not one line without secrets: %q", tc.name, msg)
					}
					if time.Since(start) > 5*time.Second {
						t.Errorf("%s: took %v (retried?)", tc.name, time.Since(start))
					}
				}
				// A missing object is final too: no retries.
				be, err := Open(ctx, loc, Options{Getenv: env})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := be.Load(ctx, "snapshots/none", 0, 0); !errors.Is(err, backend.ErrNotFound) || !strings.Contains(err.Error(), "s3://"+srv.Bucket+"/") {
					t.Fatalf("Load of a missing object: %v", err)
				}
			})
		})
	}
}

// TestS3TLS: a server with a self-signed certificate is refused until its
// CA is trusted, with ?ca=FILE or AWS_CA_BUNDLE.
func TestS3TLS(t *testing.T) {
	ctx := context.Background()
	srv, err := s3test.StartTLS(ctx)
	if err != nil {
		if testing.Short() {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	defer srv.Stop()
	loc := srv.Location(srv.Bucket, "tls")
	if !strings.HasPrefix(loc, "s3:https://") {
		t.Fatalf("location %s", loc)
	}
	start := time.Now()
	_, err = Open(ctx, loc, Options{Getenv: envOf(srv.Env()...)})
	if err == nil || !strings.Contains(err.Error(), "?ca=FILE") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Open without the CA: %v; want a one-line error that names ?ca=FILE", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("a certificate error took %v (retried?)", time.Since(start))
	}
	for _, tc := range []struct {
		loc string
		env []string
	}{
		{loc + "?ca=" + srv.CAFile, srv.Env()},
		{loc, append(srv.Env(), "AWS_CA_BUNDLE="+srv.CAFile)},
	} {
		be, err := Open(ctx, tc.loc, Options{Getenv: envOf(tc.env...)})
		if err != nil {
			t.Fatalf("Open(%s): %v", tc.loc, err)
		}
		if err := be.Save(ctx, "keys/k", []byte("over TLS")); err != nil {
			t.Fatal(err)
		}
		if got, err := be.Load(ctx, "keys/k", 0, 0); err != nil || string(got) != "over TLS" {
			t.Fatalf("Load = %q, %v", got, err)
		}
	}
}
