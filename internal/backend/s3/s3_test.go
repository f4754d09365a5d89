package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/backendtest"
	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
)

var servers = s3test.NewPool()

func TestMain(m *testing.M) {
	code := m.Run()
	servers.Close()
	os.Exit(code)
}

// testConfig is a backend of srv under a fresh prefix, with a multipart
// threshold below backendtest.LargeObjectSize and the smallest parts.
func testConfig(srv *s3test.Server) Config {
	return Config{
		Endpoint:           srv.Endpoint,
		Bucket:             srv.Bucket,
		Prefix:             "t/" + crypt.RandomID().Short(),
		Credentials:        credentials.NewStaticV4(srv.AccessKey, srv.SecretKey, ""),
		MultipartThreshold: 6 << 20,
		PartSize:           MinPartSize,
	}
}

func open(t *testing.T, cfg Config) *Backend {
	t.Helper()
	b, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// eachServer runs f against every S3 server.
func eachServer(t *testing.T, f func(t *testing.T, srv *s3test.Server)) {
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			f(t, servers.Get(t, k))
		})
	}
}

func TestConformance(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		backendtest.Run(t, func(t *testing.T) backend.Backend { return open(t, testConfig(srv)) })
	})
}

// The whole bucket as a repository, no prefix.
func TestNoPrefix(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		bucket := "noprefix-" + strings.ToLower(crypt.RandomID().Short())
		if err := srv.MakeBucket(ctx, bucket); err != nil {
			t.Fatal(err)
		}
		cfg := testConfig(srv)
		cfg.Bucket, cfg.Prefix = bucket, ""
		b := open(t, cfg)
		if err := b.Save(ctx, "data/00/a", []byte("a")); err != nil {
			t.Fatal(err)
		}
		var names []string
		if err := b.List(ctx, "", func(oi backend.ObjectInfo) error { names = append(names, oi.Name); return nil }); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(names) != "[data/00/a]" {
			t.Fatalf("listed %v", names)
		}
		// Opening a location that holds objects checks it as well.
		for _, prefix := range []string{"", "data", "data/00"} {
			cfg.Prefix = prefix
			if _, err := Open(ctx, cfg); err != nil {
				t.Fatalf("Open of a non-empty location (prefix %q): %v", prefix, err)
			}
		}
		cfg.Prefix = ""
		if b.Location() != "s3:"+srv.Endpoint+"/"+bucket {
			t.Errorf("Location() = %q", b.Location())
		}
	})
}

// corrupting flips one byte of the body of the PUT requests it is armed
// for, after the client computed the checksums: what a faulty network
// card or proxy would do.
type corrupting struct {
	base  http.RoundTripper
	armed atomic.Int32 // PUTs with a body to corrupt
}

func (c *corrupting) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method == http.MethodPut && req.Body != nil && req.ContentLength > 100 && c.armed.Add(-1) >= 0 {
		req.Body = &flipReader{r: req.Body, at: 100}
	}
	return c.base.RoundTrip(req)
}

type flipReader struct {
	r   io.ReadCloser
	n   int64
	at  int64
	hit bool
}

func (f *flipReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if !f.hit && f.at >= f.n && f.at < f.n+int64(n) {
		p[f.at-f.n] ^= 0x55
		f.hit = true
	}
	f.n += int64(n)
	return n, err
}

func (f *flipReader) Close() error { return f.r.Close() }

// TestCorruptUploadRefused proves that the server checks what Save sends:
// a byte changed on the way, after the checksums were computed, makes the
// server refuse the upload and store nothing, with the payload's signed
// SHA-256 (plain HTTP) and with Content-MD5 alone (as over HTTPS).
func TestCorruptUploadRefused(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		for _, tc := range []struct {
			name   string
			signed bool
			size   int
		}{
			{"Content-MD5 and signed SHA-256", true, 4096},
			{"Content-MD5 alone", false, 4096},
			{"multipart, Content-MD5 alone", false, 7 << 20},
			{"multipart, Content-MD5 and signed SHA-256", true, 7 << 20},
		} {
			t.Run(tc.name, func(t *testing.T) {
				base, err := minio.DefaultTransport(false)
				if err != nil {
					t.Fatal(err)
				}
				tr := &corrupting{base: base}
				cfg := testConfig(srv)
				cfg.Transport = tr
				b := open(t, cfg)
				b.signPayload = tc.signed
				data := bytes.Repeat([]byte("0123456789abcdef"), tc.size/16)
				tr.armed.Store(1)
				err = b.Save(ctx, "data/aa/corrupt", data)
				if err == nil {
					got, _ := b.Load(ctx, "data/aa/corrupt", 0, 0)
					t.Fatalf("a corrupted upload was accepted (stored %d bytes, equal: %v)", len(got), bytes.Equal(got, data))
				}
				t.Logf("refused: %v", err)
				if !backend.IsTransient(err) {
					t.Errorf("a refused corrupt upload is not marked transient (a retry sends the bytes again): %v", err)
				}
				if _, err := b.Stat(ctx, "data/aa/corrupt"); !errors.Is(err, backend.ErrNotFound) {
					t.Errorf("after the refused upload, Stat: %v, want ErrNotFound", err)
				}
				// The same Save, not corrupted, goes through.
				if err := b.Save(ctx, "data/aa/corrupt", data); err != nil {
					t.Fatal(err)
				}
				if got, err := b.Load(ctx, "data/aa/corrupt", 0, 0); err != nil || !bytes.Equal(got, data) {
					t.Fatalf("Load = %d bytes, %v", len(got), err)
				}
			})
		}
	})
}

// TestWriteOnce: the server refuses to replace a write-once object with
// other bytes (If-None-Match: *), in one PUT and multipart; lock records
// are replaced.
func TestWriteOnce(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		b := open(t, testConfig(srv))
		big1 := bytes.Repeat([]byte{1}, 7<<20)
		big2 := bytes.Repeat([]byte{2}, 7<<20)
		for _, tc := range []struct {
			name          string
			first, second []byte
			wantExists    bool
		}{
			{"config", []byte("one"), []byte("two"), true},
			{"data/ab/pack", big1, big2, true},
			{"snapshots/s", []byte("abc"), []byte("abcd"), true},
			{"locks/l", []byte("one"), []byte("two"), false},
			{"gc/g", []byte("one"), []byte("two"), false},
		} {
			if err := b.Save(ctx, tc.name, tc.first); err != nil {
				t.Fatal(err)
			}
			err := b.Save(ctx, tc.name, tc.second)
			got, lerr := b.Load(ctx, tc.name, 0, 0)
			if lerr != nil {
				t.Fatal(lerr)
			}
			if tc.wantExists {
				if !errors.Is(err, backend.ErrExists) || !bytes.Equal(got, tc.first) {
					t.Errorf("%s: second Save: %v, stored %d bytes (first: %v); want ErrExists and the first bytes", tc.name, err, len(got), bytes.Equal(got, tc.first))
				}
				if b.noConditional.Load() {
					t.Errorf("%s: the server was taken for one without conditional writes", tc.name)
				}
			} else if err != nil || !bytes.Equal(got, tc.second) {
				t.Errorf("%s: second Save: %v, want the object replaced", tc.name, err)
			}
		}
	})
}

// failing answers 503 SlowDown to the part uploads it is armed for.
type failing struct {
	base  http.RoundTripper
	armed atomic.Int32
}

func (f *failing) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method == http.MethodPut && req.URL.Query().Get("partNumber") == "2" && f.armed.Add(-1) >= 0 {
		return s3test.SlowDown(req), nil
	}
	return f.base.RoundTrip(req)
}

// TestMultipartFailureAborts: a part that fails fails the Save (marked
// transient), leaves no object and no incomplete upload behind.
func TestMultipartFailureAborts(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		base, err := minio.DefaultTransport(false)
		if err != nil {
			t.Fatal(err)
		}
		tr := &failing{base: base}
		cfg := testConfig(srv)
		cfg.Transport = tr
		b := open(t, cfg)
		tr.armed.Store(1)
		err = b.Save(ctx, "data/cc/big", make([]byte, 11<<20))
		if err == nil || !backend.IsTransient(err) || !strings.Contains(err.Error(), "SlowDown") {
			t.Fatalf("Save with a failing part: %v, want a transient SlowDown", err)
		}
		if _, err := b.Stat(ctx, "data/cc/big"); !errors.Is(err, backend.ErrNotFound) {
			t.Errorf("Stat after the failed Save: %v, want ErrNotFound", err)
		}
		if n := incompleteUploads(t, b); n != 0 {
			t.Errorf("%d incomplete uploads left after the failed Save", n)
		}
	})
}

func incompleteUploads(t *testing.T, b *Backend) int {
	t.Helper()
	res, err := b.core.ListMultipartUploads(context.Background(), b.cfg.Bucket, b.prefix, "", "", "", 1000)
	if err != nil {
		t.Fatalf("listing multipart uploads: %v", err)
	}
	return len(res.Uploads)
}

// TestRemoveStaleTemp: an upload a killed process left is aborted once it
// is old enough, and not before.
func TestRemoveStaleTemp(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		b := open(t, testConfig(srv))
		id, err := b.core.NewMultipartUpload(ctx, b.cfg.Bucket, b.prefix+"data/dd/abandoned", minio.PutObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.core.PutObjectPart(ctx, b.cfg.Bucket, b.prefix+"data/dd/abandoned", id, 1, bytes.NewReader(make([]byte, 1000)), 1000, minio.PutObjectPartOptions{}); err != nil {
			t.Fatal(err)
		}
		if n, _, err := b.RemoveStaleTemp(ctx); err != nil || n != 0 {
			t.Fatalf("RemoveStaleTemp of a fresh upload = %d, %v; want 0", n, err)
		}
		if n := incompleteUploads(t, b); n != 1 {
			t.Fatalf("%d incomplete uploads, want 1", n)
		}
		b.staleAge = 0
		if n, _, err := b.RemoveStaleTemp(ctx); err != nil || n != 1 {
			t.Fatalf("RemoveStaleTemp of an old upload = %d, %v; want 1", n, err)
		}
		if n := incompleteUploads(t, b); n != 0 {
			t.Fatalf("%d incomplete uploads left", n)
		}
	})
}

// TestOpenErrors: a wrong key or a missing bucket fails Open with a
// one-line error that says what to do and holds no secret.
func TestOpenErrors(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		for _, tc := range []struct {
			name string
			mod  func(*Config)
			want error
		}{
			{"wrong secret", func(c *Config) { c.Credentials = credentials.NewStaticV4(srv.AccessKey, "not-the-secret-xyz", "") }, ErrAccess},
			{"unknown access key", func(c *Config) { c.Credentials = credentials.NewStaticV4("nosuchkey", "not-the-secret-xyz", "") }, ErrAccess},
			{"missing bucket", func(c *Config) { c.Bucket = "no-such-bucket" }, ErrNoBucket},
		} {
			t.Run(tc.name, func(t *testing.T) {
				cfg := testConfig(srv)
				tc.mod(&cfg)
				_, err := Open(ctx, cfg)
				if !errors.Is(err, tc.want) {
					t.Fatalf("Open: %v, want %v", err, tc.want)
				}
				msg := err.Error()
				if strings.Contains(msg, "\n") || strings.Contains(msg, "not-the-secret-xyz") || strings.Contains(msg, srv.SecretKey) {
					t.Errorf("error is not one line without secrets: %q", msg)
				}
				if backend.IsTransient(err) {
					t.Errorf("error is marked transient: %v", err)
				}
				t.Logf("%s", msg)
			})
		}
	})
}

// TestConcurrentLoadInto: many ranged reads at once into separate
// buffers, as a restore does.
func TestConcurrentLoadInto(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		b := open(t, testConfig(srv))
		data := make([]byte, 4<<20)
		for i := range data {
			data[i] = byte(i * 13)
		}
		if err := b.Save(ctx, "data/ee/pack", data); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for g := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := backend.AlignedBuffer(256<<10 + backend.DirectRoom)
				for i := range 8 {
					off := int64((g*8+i)*31<<10) % int64(len(data)-256<<10)
					got, err := b.LoadInto(ctx, "data/ee/pack", off, 256<<10, buf)
					if err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, data[off:off+256<<10]) {
						errs <- fmt.Errorf("range at %d differs", off)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	})
}

func TestContentRange(t *testing.T) {
	for _, tc := range []struct {
		cr, cl       string
		start, total int64
		bad          bool
	}{
		{"bytes 100-199/5000", "100", 100, 5000, false},
		{"bytes 0-0/1", "1", 0, 1, false},
		{"", "5000", 0, 5000, false},
		{"bytes */5000", "", 0, 0, true},
		{"", "", 0, 0, true},
		{"", "-1", 0, 0, true},
	} {
		h := http.Header{}
		if tc.cr != "" {
			h.Set("Content-Range", tc.cr)
		}
		if tc.cl != "" {
			h.Set("Content-Length", tc.cl)
		}
		start, total, err := contentRange(h)
		if (err != nil) != tc.bad || !tc.bad && (start != tc.start || total != tc.total) {
			t.Errorf("contentRange(%q, %q) = %d, %d, %v", tc.cr, tc.cl, start, total, err)
		}
	}
}

// noConditional answers 501 NotImplemented to writes with If-None-Match,
// as a server without conditional writes does.
type noConditional struct {
	base http.RoundTripper
	seen atomic.Int32
}

func (n *noConditional) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Header.Get("If-None-Match") != "" {
		n.seen.Add(1)
		if req.Body != nil {
			req.Body.Close()
		}
		body := `<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that is not implemented.</Message></Error>`
		return &http.Response{StatusCode: http.StatusNotImplemented, Status: "501 Not Implemented",
			Header: http.Header{"Content-Type": {"application/xml"}}, Body: io.NopCloser(strings.NewReader(body)),
			ContentLength: int64(len(body)), Request: req, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}, nil
	}
	return n.base.RoundTrip(req)
}

// TestWithoutConditionalWrites: a server that does not implement
// If-None-Match gets plain PUTs, from the first refusal on.
func TestWithoutConditionalWrites(t *testing.T) {
	eachServer(t, func(t *testing.T, srv *s3test.Server) {
		ctx := context.Background()
		base, err := minio.DefaultTransport(false)
		if err != nil {
			t.Fatal(err)
		}
		tr := &noConditional{base: base}
		cfg := testConfig(srv)
		cfg.Transport = tr
		b := open(t, cfg)
		for _, s := range []string{"one", "two"} {
			if err := b.Save(ctx, "snapshots/s", []byte(s)); err != nil {
				t.Fatalf("Save: %v", err)
			}
		}
		if got, err := b.Load(ctx, "snapshots/s", 0, 0); err != nil || string(got) != "two" {
			t.Fatalf("Load = %q, %v", got, err)
		}
		if !b.noConditional.Load() || tr.seen.Load() != 1 {
			t.Errorf("noConditional %v after %d conditional requests; want true after 1", b.noConditional.Load(), tr.seen.Load())
		}
	})
}
