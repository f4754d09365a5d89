package s3test

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/minio/minio-go/v7/pkg/s3utils"
)

// ClockSkew is an HTTP proxy in front of a server that makes every
// request look as if its client's clock were off by Skew: it re-signs
// the request (AWS Signature Version 4, with the server's root secret) at
// the shifted time, so that the server sees a well-signed request whose
// X-Amz-Date is Skew away from its own clock, and answers what it answers
// such a client (RequestTimeTooSkewed, 403).
//
// Why a proxy: the clock that matters is the client's against the
// server's, and neither can be moved for one test. Setting the host's
// time would move every process's; a time namespace (unshare --time)
// offsets only the monotonic and boot clocks, not the real-time clock
// requests are dated by; libfaketime does not reach Go programs, which
// read the clock through the vDSO, not libc; and minio-go's signer takes
// the time from time.Now with no way to pass another. Re-signing on the
// way gives the server exactly the request a skewed client would send.
type ClockSkew struct {
	// Endpoint is the proxy's "http://127.0.0.1:PORT", to use in place of
	// the server's.
	Endpoint string
	// Skew is added to the time requests are signed at.
	Skew time.Duration

	srv *Server
	hs  *http.Server
	ln  net.Listener
}

// NewClockSkew starts a proxy to srv (a plain-HTTP server) that shifts
// the requests' time by skew. Close stops it.
func NewClockSkew(srv *Server, skew time.Duration) (*ClockSkew, error) {
	target, err := url.Parse(srv.Endpoint)
	if err != nil {
		return nil, err
	}
	if target.Scheme != "http" {
		return nil, errors.New("ClockSkew: a plain-HTTP server only")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	c := &ClockSkew{Endpoint: "http://" + ln.Addr().String(), Skew: skew, srv: srv, ln: ln}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host // the client signed the proxy's host
			if err := resignV4(pr.Out, srv.AccessKey, srv.SecretKey, time.Now().Add(skew)); err != nil {
				pr.Out.Header.Set("Authorization", "unsigned: "+err.Error())
			}
		},
	}
	c.hs = &http.Server{Handler: rp, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = c.hs.Serve(ln) }()
	return c, nil
}

// Close stops the proxy.
func (c *ClockSkew) Close() error { return c.hs.Close() }

// resignV4 signs r again, with the headers its Authorization header
// names, as of at.
func resignV4(r *http.Request, access, secret string, at time.Time) error {
	const alg = "AWS4-HMAC-SHA256"
	auth := r.Header.Get("Authorization")
	rest, ok := strings.CutPrefix(auth, alg+" ")
	if !ok {
		return fmt.Errorf("not a %s signature", alg)
	}
	fields := map[string]string{}
	for _, f := range strings.Split(rest, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(f), "=")
		fields[k] = v
	}
	cred := strings.Split(fields["Credential"], "/") // key/day/region/service/aws4_request
	if len(cred) != 5 || fields["SignedHeaders"] == "" {
		return errors.New("no credential scope or signed headers")
	}
	region, service := cred[2], cred[3]
	amzDate := at.UTC().Format("20060102T150405Z")
	day := amzDate[:8]
	r.Header.Set("X-Amz-Date", amzDate)
	var headers strings.Builder
	for _, h := range strings.Split(fields["SignedHeaders"], ";") {
		var v string
		switch h {
		case "host":
			v = r.Host
		case "content-length":
			v = strconv.FormatInt(r.ContentLength, 10)
		default:
			var vs []string
			for _, x := range r.Header.Values(h) {
				vs = append(vs, strings.Join(strings.Fields(x), " "))
			}
			v = strings.Join(vs, ",")
		}
		headers.WriteString(h + ":" + v + "\n")
	}
	payload := r.Header.Get("X-Amz-Content-Sha256")
	if payload == "" {
		payload = "UNSIGNED-PAYLOAD"
	}
	canonical := strings.Join([]string{
		r.Method,
		s3utils.EncodePath(r.URL.Path),
		strings.ReplaceAll(r.URL.Query().Encode(), "+", "%20"),
		headers.String(),
		fields["SignedHeaders"],
		payload,
	}, "\n")
	scope := day + "/" + region + "/" + service + "/aws4_request"
	sum := sha256.Sum256([]byte(canonical))
	toSign := alg + "\n" + amzDate + "\n" + scope + "\n" + hex.EncodeToString(sum[:])
	key := []byte("AWS4" + secret)
	for _, part := range []string{day, region, service, "aws4_request"} {
		key = hmacSHA256(key, part)
	}
	r.Header.Set("Authorization", fmt.Sprintf("%s Credential=%s/%s, SignedHeaders=%s, Signature=%s",
		alg, access, scope, fields["SignedHeaders"], hex.EncodeToString(hmacSHA256(key, toSign))))
	return nil
}

func hmacSHA256(key []byte, data string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(data))
	return m.Sum(nil)
}
