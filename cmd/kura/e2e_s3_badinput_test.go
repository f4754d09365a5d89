package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
)

// freeAddr returns a 127.0.0.1 address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestS3BadInput gives kura init and kura snapshots what users get wrong
// or meet: a wrong key, secret or session token, a missing or invalid
// bucket, an endpoint nobody listens on, TLS against plain HTTP and the
// other way round, a certificate nobody vouches for, a clock an hour off.
// Each fails with one short line that names the bucket or the endpoint,
// says what to do, and shows no secret.
func TestS3BadInput(t *testing.T) {
	var tlsSrv *s3test.Server
	defer func() {
		if tlsSrv != nil {
			tlsSrv.Stop()
		}
	}()
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := s3servers.Get(t, k)
			host := strings.TrimPrefix(srv.Endpoint, "http://")
			good, _ := s3env(t, srv)
			good.ok("init")

			type tc struct {
				name string
				// repo: the location (good.repo when empty); vars: the
				// environment (the server's credentials when nil).
				repo string
				vars []string
				// want: what the line must say (each, case-insensitive);
				// names: the bucket or endpoint it must name.
				want  []string
				names string
				// accepts: the server takes it (not kura's to refuse).
				accepts bool
			}
			creds := func(kv ...string) []string { return append(srv.Env(), kv...) }
			nobody := freeAddr(t)
			// A web server where the S3 server should be (a wrong port).
			web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, "<html><body>404 page not found</body></html>", http.StatusNotFound)
			}))
			defer web.Close()
			webHost := strings.TrimPrefix(web.URL, "http://")
			cases := []tc{
				{name: "wrong access key", vars: creds("AWS_ACCESS_KEY_ID=AKIAKURAWRONGKEY0000"),
					want: []string{"does not know the access key", "check the credentials", "AWS_ACCESS_KEY_ID"}, names: srv.Bucket},
				{name: "wrong secret", vars: creds("AWS_SECRET_ACCESS_KEY=wrong-secret-for-the-test"),
					want: []string{"refused the request's signature", "check the credentials", "AWS_SECRET_ACCESS_KEY"}, names: srv.Bucket},
				// SeaweedFS ignores a session token sent with a static key.
				{name: "garbage session token", vars: creds("AWS_SESSION_TOKEN=garbage-token-for-the-test"),
					want: []string{"refused the session token", "check the credentials", "AWS_SESSION_TOKEN"}, names: srv.Bucket,
					accepts: k == s3test.SeaweedFS},
				{name: "missing bucket", repo: srv.Location("no-such-bucket-"+strings.ToLower(crypt.RandomID().Short()), "x"),
					want: []string{"does not exist", "create it"}, names: "no-such-bucket-"},
				{name: "invalid bucket name", repo: srv.Location("Not_A_Bucket", "x"),
					want: []string{"bucket name", "lowercase"}, names: "Not_A_Bucket"},
				{name: "nobody listens", repo: "s3:http://" + nobody + "/" + srv.Bucket + "/x",
					want: []string{"could not be reached", "running"}, names: nobody},
				{name: "not an S3 server", repo: "s3:http://" + webHost + "/" + srv.Bucket + "/x",
					want: []string{"not an S3 server", "correct the repository location"}, names: webHost},
				{name: "https to a plain-HTTP server", repo: "s3:https://" + host + "/" + srv.Bucket + "/x",
					want: []string{"plain HTTP", "s3:http://"}, names: host},
			}
			for _, skew := range []time.Duration{time.Hour, -time.Hour} {
				p, err := s3test.NewClockSkew(srv, skew)
				if err != nil {
					t.Fatal(err)
				}
				defer p.Close()
				cases = append(cases, tc{name: fmt.Sprintf("clock %v off", skew), repo: "s3:" + p.Endpoint + "/" + srv.Bucket + "/x",
					want: []string{"clock", "set the time"}, names: strings.TrimPrefix(p.Endpoint, "http://")})
			}
			if k == s3test.VersityGW {
				var err error
				if tlsSrv, err = s3test.StartTLS(context.Background()); err != nil {
					t.Fatal(err)
				}
				thost := strings.TrimPrefix(tlsSrv.Endpoint, "https://")
				cases = append(cases,
					tc{name: "plain HTTP to a TLS server", repo: "s3:http://" + thost + "/" + tlsSrv.Bucket + "/x", vars: tlsSrv.Env(),
						want: []string{"TLS", "s3:https://"}, names: thost},
					tc{name: "a certificate nobody vouches for", repo: "s3:https://" + thost + "/" + tlsSrv.Bucket + "/x", vars: tlsSrv.Env(),
						want: []string{"certificate", "ca=FILE"}, names: thost})
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					e := *good
					e.t = t
					if c.repo != "" {
						e.repo = c.repo
					}
					if c.vars != nil {
						e.vars = c.vars
					}
					for _, args := range [][]string{{"snapshots"}, {"init"}} {
						fresh := e
						if args[0] == "init" && c.repo == "" {
							fresh.repo = srv.Location(srv.Bucket, "faults/"+crypt.RandomID().Short())
						}
						r := fresh.run(args...)
						msg := strings.TrimSpace(r.stderr)
						t.Logf("kura %s: %s", args[0], msg)
						if r.code == 0 {
							if !c.accepts {
								t.Errorf("kura %s succeeded", args[0])
							}
							continue
						}
						if c.accepts {
							t.Logf("kura %s: the server refused what it used to take", args[0])
						}
						checkOneLine(t, "kura "+args[0], msg)
						for _, w := range c.want {
							if !strings.Contains(strings.ToLower(msg), strings.ToLower(w)) {
								t.Errorf("kura %s: %q does not say %q", args[0], msg, w)
							}
						}
						if !strings.Contains(msg, c.names) {
							t.Errorf("kura %s: %q does not name %s", args[0], msg, c.names)
						}
						if n := len(msg); n > 320 {
							t.Errorf("kura %s: the line is %d characters long", args[0], n)
						}
						for _, secret := range []string{srv.SecretKey, "wrong-secret-for-the-test", "garbage-token-for-the-test"} {
							if strings.Contains(msg, secret) {
								t.Errorf("kura %s: the line shows a secret: %q", args[0], msg)
							}
						}
					}
				})
			}
		})
	}
}
