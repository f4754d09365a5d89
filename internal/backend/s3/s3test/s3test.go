// Package s3test runs real S3 servers for tests: versitygw (a gateway
// that serves a directory as S3) and SeaweedFS (a distributed store, run
// as its all-in-one "weed mini"), as built by scripts/s3servers.sh into
// ~/.cache/kura/s3/bin (KURA_S3_BIN names another directory).
//
// A test package shares one server of each kind across its tests: a
// Pool, stopped in TestMain after m.Run. A server listens on free ports of
// 127.0.0.1 only, keeps its data in a temporary directory removed when it
// stops, and dies with the test process (SIGKILL on the parent's death).
//
// When a server's binary is missing, the test fails with a message that
// says to run scripts/s3servers.sh: a test that skipped would hide, in CI,
// that nothing ran. Under `go test -short` it skips instead.
package s3test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Kind is a server program.
type Kind string

// The servers.
const (
	VersityGW Kind = "versitygw"
	SeaweedFS Kind = "seaweedfs"
)

// Kinds lists every server the tests run against.
var Kinds = []Kind{VersityGW, SeaweedFS}

// binaryName is a kind's program in the binary directory.
func (k Kind) binaryName() string {
	if k == SeaweedFS {
		return "weed"
	}
	return string(k)
}

// BinDir is where scripts/s3servers.sh puts the servers.
func BinDir() string {
	if d := os.Getenv("KURA_S3_BIN"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = "/root"
	}
	return filepath.Join(home, ".cache", "kura", "s3", "bin")
}

// Binary returns the path of kind's server, or an error that says how to
// build it.
func Binary(k Kind) (string, error) {
	p := filepath.Join(BinDir(), k.binaryName())
	if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("the %s S3 server is not built (%s is missing): run scripts/s3servers.sh (make test does) to build it", k, p)
	}
	return p, nil
}

// Server is a running S3 server with one bucket.
type Server struct {
	Kind Kind
	// Endpoint is "http://127.0.0.1:PORT".
	Endpoint string
	// AccessKey and SecretKey are its root credentials.
	AccessKey, SecretKey string
	// Bucket exists when the server is returned.
	Bucket string
	// CAFile, for a server started with TLS, is the PEM certificate it
	// serves (self-signed, for 127.0.0.1), to trust.
	CAFile string

	dir     string
	logPath string
	// bin, args and env start the server again (Restart) on the same
	// ports and data.
	bin       string
	args, env []string
	mu        sync.Mutex // guards cmd and exited across Kill and Restart
	cmd       *exec.Cmd
	exited    chan struct{}
}

// Env returns the environment variables that give a kura process the
// server's credentials.
func (s *Server) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey}
}

// Location returns the repository location of prefix in bucket.
func (s *Server) Location(bucket, prefix string) string {
	loc := "s3:" + s.Endpoint + "/" + bucket
	if prefix != "" {
		loc += "/" + prefix
	}
	return loc
}

// Client returns a minio client with the root credentials.
func (s *Server) Client() (*minio.Client, error) {
	secure := strings.HasPrefix(s.Endpoint, "https://")
	tr, err := minio.DefaultTransport(secure)
	if err != nil {
		return nil, err
	}
	if s.CAFile != "" {
		data, err := os.ReadFile(s.CAFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(data)
		tr.TLSClientConfig.RootCAs = pool
	}
	host := strings.TrimPrefix(strings.TrimPrefix(s.Endpoint, "http://"), "https://")
	return minio.New(host, &minio.Options{
		Creds:        credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""),
		Secure:       secure,
		Transport:    tr,
		BucketLookup: minio.BucketLookupPath,
	})
}

// MakeBucket creates a bucket.
func (s *Server) MakeBucket(ctx context.Context, name string) error {
	c, err := s.Client()
	if err != nil {
		return err
	}
	return c.MakeBucket(ctx, name, minio.MakeBucketOptions{})
}

// MakeLockedBucket creates a bucket with object lock enabled (and so
// versioning), without a default retention.
func (s *Server) MakeLockedBucket(ctx context.Context, name string) error {
	c, err := s.Client()
	if err != nil {
		return err
	}
	return c.MakeBucket(ctx, name, minio.MakeBucketOptions{ObjectLocking: true})
}

// LogTail returns the end of the server's log, for a failure message.
func (s *Server) LogTail() string {
	data, _ := os.ReadFile(s.logPath)
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

// Start starts a server of kind and creates its bucket; Stop ends it.
func Start(ctx context.Context, k Kind) (*Server, error) {
	return startTries(ctx, k, false)
}

// StartTLS starts a versitygw that serves HTTPS with a self-signed
// certificate (Server.CAFile).
func StartTLS(ctx context.Context) (*Server, error) {
	return startTries(ctx, VersityGW, true)
}

func startTries(ctx context.Context, k Kind, withTLS bool) (*Server, error) {
	bin, err := Binary(k)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for try := 0; try < 3; try++ { // another process may take a free port first
		s, err := start(ctx, k, bin, withTLS)
		if err == nil {
			return s, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, lastErr
}

func start(ctx context.Context, k Kind, bin string, withTLS bool) (*Server, error) {
	dir, err := os.MkdirTemp("", "kura-s3test-"+string(k)+"-")
	if err != nil {
		return nil, err
	}
	s := &Server{Kind: k, AccessKey: "kuratestaccess", SecretKey: "kura-test-secret-" + strconv.Itoa(os.Getpid()),
		Bucket: "kura-test", dir: dir, logPath: filepath.Join(dir, "server.log"), bin: bin}
	var args, env []string
	switch k {
	case VersityGW:
		ports, err := freePorts(1)
		if err != nil {
			return nil, err
		}
		s.Endpoint = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
		data, vers := filepath.Join(dir, "data"), filepath.Join(dir, "versions")
		for _, d := range []string{data, vers} {
			if err := os.MkdirAll(d, 0o700); err != nil {
				return nil, err
			}
		}
		args = []string{"--port", fmt.Sprintf("127.0.0.1:%d", ports[0])}
		if withTLS {
			cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
			if err := selfSigned(cert, key); err != nil {
				return nil, err
			}
			s.CAFile = cert
			s.Endpoint = strings.Replace(s.Endpoint, "http://", "https://", 1)
			args = append(args, "--cert", cert, "--key", key)
		}
		args = append(args, "posix", "--versioning-dir", vers, data)
		env = []string{"ROOT_ACCESS_KEY_ID=" + s.AccessKey, "ROOT_SECRET_ACCESS_KEY=" + s.SecretKey}
	case SeaweedFS:
		// Every port explicit (and gRPC's, which default to HTTP's + 10000),
		// so that two test binaries can each run one.
		p, err := freePorts(10)
		if err != nil {
			return nil, err
		}
		s.Endpoint = fmt.Sprintf("http://127.0.0.1:%d", p[0])
		args = []string{"mini", "-dir=" + filepath.Join(dir, "data"), "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
			"-master.telemetry=false", "-webdav=false", "-admin.ui=false",
			"-s3.port=" + strconv.Itoa(p[0]), "-s3.port.grpc=" + strconv.Itoa(p[1]),
			"-s3.port.iceberg=0", "-s3.port.lance=0",
			"-master.port=" + strconv.Itoa(p[2]), "-master.port.grpc=" + strconv.Itoa(p[3]),
			"-filer.port=" + strconv.Itoa(p[4]), "-filer.port.grpc=" + strconv.Itoa(p[5]),
			"-volume.port=" + strconv.Itoa(p[6]), "-volume.port.grpc=" + strconv.Itoa(p[7]),
			"-admin.port=" + strconv.Itoa(p[8]), "-admin.port.grpc=" + strconv.Itoa(p[9]), "-admin.port.legacy=0",
		}
		if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
			return nil, err
		}
		env = []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey}
	default:
		return nil, fmt.Errorf("unknown S3 server kind %q", k)
	}
	if withTLS && s.CAFile == "" {
		return nil, fmt.Errorf("%s: TLS is not set up in the tests", k)
	}
	s.args, s.env = args, env
	if err := s.launch(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := s.waitReady(ctx, 90*time.Second); err != nil {
		tail := s.LogTail()
		s.Stop()
		return nil, fmt.Errorf("%s did not come up: %w\n%s", k, err, tail)
	}
	return s, nil
}

// launch starts the server's process (its log appended to), without
// waiting for it to serve.
func (s *Server) launch() error {
	logf, err := os.OpenFile(s.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(s.bin, s.args...)
	cmd.Dir = s.dir
	// TMPDIR: SeaweedFS puts its sockets there; they go with the data.
	cmd.Env = append(serverEnv(), append(s.env, "TMPDIR="+s.dir)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", s.Kind, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.mu.Lock()
	s.cmd, s.exited = cmd, exited
	s.mu.Unlock()
	return nil
}

// running returns the server's process and the channel closed when it
// exits.
func (s *Server) running() (*exec.Cmd, chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd, s.exited
}

// Running reports whether the server's process runs (it may not serve
// yet, or any more).
func (s *Server) Running() bool {
	cmd, exited := s.running()
	if cmd == nil {
		return false
	}
	select {
	case <-exited:
		return false
	default:
		return true
	}
}

// Kill ends the server at once, as a crash or a power cut would: SIGKILL
// to its process group, no chance to finish a request or flush anything.
// Its data stays; Restart brings it back.
func (s *Server) Kill() {
	cmd, exited := s.running()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-exited
}

// Restart starts a killed (or running: it is killed first) server again
// on the same ports and data, and waits until it serves. A port another
// process took in between makes it fail.
func (s *Server) Restart(ctx context.Context) error {
	s.Kill()
	if err := s.launch(); err != nil {
		return err
	}
	if err := s.waitReady(ctx, 90*time.Second); err != nil {
		return fmt.Errorf("%s did not come back: %w\n%s", s.Kind, err, s.LogTail())
	}
	return nil
}

// serverEnv is the test process's environment without AWS and S3
// settings that could change how a server starts.
func serverEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "TMPDIR" || strings.HasPrefix(k, "AWS_") || strings.HasPrefix(k, "VGW_") || strings.HasPrefix(k, "ROOT_") || strings.HasPrefix(k, "S3_") || strings.HasPrefix(k, "WEED_") {
			continue
		}
		out = append(out, kv)
	}
	return out
}

// waitReady waits until the bucket can be created, and a small object
// written and read back.
func (s *Server) waitReady(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	c, err := s.Client()
	if err != nil {
		return err
	}
	_, exited := s.running()
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return errors.New("the server exited")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		lastErr = s.probe(rctx, c)
		cancel()
		if lastErr == nil {
			return nil
		}
	}
	return fmt.Errorf("not ready after %v: %v", limit, lastErr)
}

func (s *Server) probe(ctx context.Context, c *minio.Client) error {
	ok, err := c.BucketExists(ctx, s.Bucket)
	if err != nil {
		return err
	}
	if !ok {
		if err := c.MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{}); err != nil {
			return err
		}
	}
	_, err = c.PutObject(ctx, s.Bucket, "probe", strings.NewReader("ready"), 5, minio.PutObjectOptions{})
	if err != nil {
		return err
	}
	return c.RemoveObject(ctx, s.Bucket, "probe", minio.RemoveObjectOptions{})
}

// Stop ends the server and removes its data.
func (s *Server) Stop() {
	if cmd, exited := s.running(); cmd != nil && cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	}
	os.RemoveAll(s.dir)
}

// selfSigned writes a self-signed certificate for 127.0.0.1, valid for a
// day, and its key.
func selfSigned(certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "kura s3test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
}

// freePorts returns n distinct free TCP ports of 127.0.0.1 below 55535
// (so that a server's default gRPC port, 10000 above, stays valid).
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for tries := 0; len(ports) < n && tries < 100*n; tries++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		if p := l.Addr().(*net.TCPAddr).Port; p < 55535 {
			ports = append(ports, p)
		}
	}
	if len(ports) < n {
		return nil, errors.New("no free ports below 55535")
	}
	return ports, nil
}

// Pool starts one server of each kind on first use and shares it; Close
// stops them. A test package keeps one Pool and closes it in TestMain.
type Pool struct {
	mu      sync.Mutex
	servers map[Kind]*Server
	errs    map[Kind]error
}

// NewPool returns an empty pool.
func NewPool() *Pool {
	return &Pool{servers: map[Kind]*Server{}, errs: map[Kind]error{}}
}

// Get returns the pool's server of kind k, starting it if needed. When
// it cannot run (the binary is missing, it does not start) the test fails,
// or under -short skips.
func (p *Pool) Get(t testing.TB, k Kind) *Server {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if s := p.servers[k]; s != nil {
		return s
	}
	err := p.errs[k]
	if err == nil {
		var s *Server
		s, err = Start(context.Background(), k)
		if err == nil {
			p.servers[k] = s
			return s
		}
		p.errs[k] = err
	}
	if testing.Short() {
		t.Skipf("S3 server %s: %v", k, err)
	}
	t.Fatalf("S3 server %s: %v", k, err)
	return nil
}

// Close stops every server of the pool.
func (p *Pool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, s := range p.servers {
		s.Stop()
		delete(p.servers, k)
	}
}

// SlowDown is the answer an S3 server gives a client it wants to slow
// down (503 SlowDown), for tests that inject one through a RoundTripper
// (the real servers do not produce it on demand). req's body is closed.
func SlowDown(req *http.Request) *http.Response {
	if req.Body != nil {
		req.Body.Close()
	}
	body := `<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>`
	return &http.Response{StatusCode: http.StatusServiceUnavailable, Status: "503 Service Unavailable",
		Header: http.Header{"Content-Type": {"application/xml"}}, Body: io.NopCloser(strings.NewReader(body)),
		ContentLength: int64(len(body)), Request: req, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
}

// Delay is an http.RoundTripper that makes a store look far away: it
// waits its delay before passing each request to Base (or
// http.DefaultTransport), as a round trip to a distant region would, and
// counts the requests by kind (Kind). Tests put it in s3.Config.Transport
// and assert on the counts; bench/s3delay puts it behind a proxy so that
// kura commands can be timed against a slow store. Safe for concurrent
// use; the zero delay passes requests on at once.
type Delay struct {
	Base http.RoundTripper

	mu     sync.Mutex
	delay  time.Duration
	counts map[string]int
	onReq  func(kind string, req *http.Request)
}

// NewDelay returns a Delay of d in front of base.
func NewDelay(base http.RoundTripper, d time.Duration) *Delay {
	return &Delay{Base: base, delay: d, counts: map[string]int{}}
}

// SetDelay changes the delay of the next requests.
func (d *Delay) SetDelay(delay time.Duration) {
	d.mu.Lock()
	d.delay = delay
	d.mu.Unlock()
}

// OnRequest calls f for each request, after counting it (a request log).
func (d *Delay) OnRequest(f func(kind string, req *http.Request)) {
	d.mu.Lock()
	d.onReq = f
	d.mu.Unlock()
}

// Counts returns the requests seen since the last Reset, by kind.
func (d *Delay) Counts() map[string]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]int, len(d.counts))
	for k, v := range d.counts {
		out[k] = v
	}
	return out
}

// Reset sets the counts to zero.
func (d *Delay) Reset() {
	d.mu.Lock()
	clear(d.counts)
	d.mu.Unlock()
}

// RequestKind names an S3 request: LIST for a listing of objects or
// uploads, BUCKET for a question about the bucket (its region), else the
// HTTP method (GET of an object, PUT, HEAD, DELETE, POST).
func RequestKind(req *http.Request) string {
	q := req.URL.Query()
	switch {
	case req.Method != http.MethodGet:
		return req.Method
	case q.Has("list-type") || q.Has("prefix") || q.Has("uploads") || q.Has("delimiter"):
		return "LIST"
	case q.Has("location"):
		return "BUCKET"
	}
	return req.Method
}

// RoundTrip implements http.RoundTripper.
func (d *Delay) RoundTrip(req *http.Request) (*http.Response, error) {
	kind := RequestKind(req)
	d.mu.Lock()
	if d.counts == nil {
		d.counts = map[string]int{}
	}
	d.counts[kind]++
	delay, onReq := d.delay, d.onReq
	d.mu.Unlock()
	if onReq != nil {
		onReq(kind, req)
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-req.Context().Done():
			t.Stop()
			if req.Body != nil {
				req.Body.Close()
			}
			return nil, req.Context().Err()
		}
	}
	base := d.Base
	if base == nil {
		base = http.DefaultTransport
	}
	return base.RoundTrip(req)
}
