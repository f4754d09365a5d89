// Command s3count is the S3 benchmark's helper (bench/s3.sh):
//
//	s3count proxy -upstream http://127.0.0.1:PORT [-listen 127.0.0.1:0] [-addr-file F]
//	    a counting HTTP reverse proxy in front of an S3 server. Every tool of
//	    the benchmark talks to it; it forwards each request unchanged (the
//	    Host header too, which SigV4 signs) and counts, per phase, requests
//	    by method and kind of S3 operation, answers by status class, and the
//	    bytes in both directions (bodies, and the header lines as they would
//	    go on the wire). GET or POST /__phase?name=NAME starts a phase
//	    (counts go to NAME from then on); GET /__stats answers the counts of
//	    every phase as JSON; SIGTERM prints them on stdout and exits. Bucket
//	    names cannot start with "_", so /__ never reaches the server.
//	s3count floor -endpoint URL -bucket B -src FILE [-object BYTES] [-inflight 8] [-total BYTES] [-mode both|put|get]
//	    the machine's floor: PUT total bytes as objects of -object bytes
//	    (16 MiB), -inflight at a time, from FILE read into memory (a file in
//	    /dev/shm), then GET them all back (discarding the bytes; -mode put
//	    and -mode get do one half, so that the page cache can be dropped
//	    in between); signed with SigV4 and
//	    UNSIGNED-PAYLOAD (no hashing of the body: the cheapest a client can
//	    be). Prints JSON: seconds and MiB/s of each direction.
//	s3count mb -endpoint URL BUCKET...   create buckets (retries for 60 s
//	    while the server comes up)
//	s3count du -endpoint URL -bucket B   sum of the object sizes in B, JSON
//
// Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/signer"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("s3count: ")
	if len(os.Args) < 2 {
		log.Fatal("usage: s3count proxy|floor|mb|du [flags]")
	}
	var err error
	switch os.Args[1] {
	case "proxy":
		err = runProxy(os.Args[2:])
	case "floor":
		err = runFloor(os.Args[2:])
	case "mb":
		err = runMB(os.Args[2:])
	case "du":
		err = runDU(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q (proxy, floor, mb, du)", os.Args[1])
	}
	if err != nil {
		log.Fatal(err)
	}
}

// ---- proxy ----

// phaseStats are one phase's counts.
type phaseStats struct {
	Requests   int64            `json:"requests"`
	ByMethod   map[string]int64 `json:"by_method"`
	ByOp       map[string]int64 `json:"by_op"`
	ByStatus   map[string]int64 `json:"by_status"`
	BodyUp     int64            `json:"body_bytes_up"`   // request bodies: client to server
	BodyDown   int64            `json:"body_bytes_down"` // response bodies: server to client
	HeaderUp   int64            `json:"header_bytes_up"`
	HeaderDown int64            `json:"header_bytes_down"`
	BytesUp    int64            `json:"bytes_up"` // bodies + headers
	BytesDown  int64            `json:"bytes_down"`
	Started    time.Time        `json:"started"`
	mu         sync.Mutex
	bodyUp     atomic.Int64
	bodyDown   atomic.Int64
}

func newPhase() *phaseStats {
	return &phaseStats{ByMethod: map[string]int64{}, ByOp: map[string]int64{}, ByStatus: map[string]int64{}, Started: time.Now().UTC()}
}

type counter struct {
	mu     sync.Mutex
	cur    string
	phases map[string]*phaseStats
	order  []string
}

func (c *counter) phase() *phaseStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.phases[c.cur]
}

func (c *counter) setPhase(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cur = name
	if c.phases[name] == nil {
		c.phases[name] = newPhase()
		c.order = append(c.order, name)
	}
}

func (c *counter) snapshot() map[string]any {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]*phaseStats{}
	for name, p := range c.phases {
		p.mu.Lock()
		q := &phaseStats{Requests: p.Requests, ByMethod: copyMap(p.ByMethod), ByOp: copyMap(p.ByOp), ByStatus: copyMap(p.ByStatus),
			HeaderUp: p.HeaderUp, HeaderDown: p.HeaderDown, Started: p.Started}
		p.mu.Unlock()
		q.BodyUp, q.BodyDown = p.bodyUp.Load(), p.bodyDown.Load()
		q.BytesUp, q.BytesDown = q.BodyUp+q.HeaderUp, q.BodyDown+q.HeaderDown
		out[name] = q
	}
	return map[string]any{"current": c.cur, "order": append([]string(nil), c.order...), "phases": out}
}

func copyMap(m map[string]int64) map[string]int64 {
	o := make(map[string]int64, len(m))
	for k, v := range m {
		o[k] = v
	}
	return o
}

// opKind names the S3 operation of a request: object, part (a multipart
// part), multipart (initiate, complete, abort, list parts), bucket (list,
// location, …).
func opKind(r *http.Request) string {
	q := r.URL.Query()
	path := strings.Trim(r.URL.Path, "/")
	switch {
	case q.Has("partNumber") && q.Has("uploadId"):
		return "part"
	case q.Has("uploadId") || q.Has("uploads"):
		return "multipart"
	case !strings.Contains(path, "/"):
		return "bucket"
	}
	return "object"
}

func headerBytes(h http.Header) int64 {
	var n int64
	for k, vs := range h {
		for _, v := range vs {
			n += int64(len(k) + len(v) + 4) // "K: V\r\n"
		}
	}
	return n + 2
}

type countingReader struct {
	rc io.ReadCloser
	n  *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.rc.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (c countingReader) Close() error { return c.rc.Close() }

type bufPool struct{ p sync.Pool }

func (b *bufPool) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, 256<<10)
}

func (b *bufPool) Put(v []byte) { b.p.Put(&v) }

func runProxy(args []string) error {
	fs := flag.NewFlagSet("proxy", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	upstream := fs.String("upstream", "", "the S3 server, http://HOST:PORT")
	addrFile := fs.String("addr-file", "", "write the address listened on to this file")
	_ = fs.Parse(args)
	up, err := url.Parse(*upstream)
	if err != nil || up.Host == "" {
		return fmt.Errorf("-upstream %q: want http://HOST:PORT", *upstream)
	}
	c := &counter{phases: map[string]*phaseStats{}}
	c.setPhase("idle")
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        512,
		MaxIdleConnsPerHost: 512,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
		WriteBufferSize:     256 << 10,
		ReadBufferSize:      256 << 10,
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = up.Scheme
			pr.Out.URL.Host = up.Host
			pr.Out.Host = pr.In.Host // SigV4 signs the Host the client used
		},
		Transport:  tr,
		BufferPool: &bufPool{},
		ModifyResponse: func(resp *http.Response) error {
			p, _ := resp.Request.Context().Value(phaseKey{}).(*phaseStats)
			if p != nil {
				p.mu.Lock()
				p.ByStatus[fmt.Sprintf("%dxx", resp.StatusCode/100)]++
				p.HeaderDown += headerBytes(resp.Header) + int64(len(resp.Status)+11)
				p.mu.Unlock()
				resp.Body = countingReader{resp.Body, &p.bodyDown}
			}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			log.Printf("%s %s: %v", r.Method, r.URL.Path, err)
			if p, _ := r.Context().Value(phaseKey{}).(*phaseStats); p != nil {
				p.mu.Lock()
				p.ByStatus["proxy-error"]++
				p.mu.Unlock()
			}
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	mux := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/__phase":
			name := r.URL.Query().Get("name")
			if name == "" {
				http.Error(w, "name= missing", http.StatusBadRequest)
				return
			}
			c.setPhase(name)
			fmt.Fprintln(w, name)
			return
		case "/__stats":
			w.Header().Set("Content-Type", "application/json")
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			_ = enc.Encode(c.snapshot())
			return
		}
		p := c.phase()
		p.mu.Lock()
		p.Requests++
		p.ByMethod[r.Method]++
		p.ByOp[r.Method+" "+opKind(r)]++
		p.HeaderUp += headerBytes(r.Header) + int64(len(r.Method)+len(r.URL.RequestURI())+12)
		p.mu.Unlock()
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = countingReader{r.Body, &p.bodyUp}
		}
		rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), phaseKey{}, p)))
	})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	if *addrFile != "" {
		if err := os.WriteFile(*addrFile+".tmp", []byte(ln.Addr().String()+"\n"), 0o644); err != nil {
			return err
		}
		if err := os.Rename(*addrFile+".tmp", *addrFile); err != nil {
			return err
		}
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-sig:
	case err := <-errc:
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(ctx)
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(c.snapshot())
}

type phaseKey struct{}

// ---- floor ----

func creds() (string, string, error) {
	ak, sk := os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY")
	if ak == "" || sk == "" {
		return "", "", errors.New("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
	}
	return ak, sk, nil
}

type floorResult struct {
	Endpoint    string  `json:"endpoint"`
	Objects     int     `json:"objects"`
	ObjectBytes int64   `json:"object_bytes"`
	TotalBytes  int64   `json:"total_bytes"`
	InFlight    int     `json:"inflight"`
	PutSeconds  float64 `json:"put_seconds,omitempty"`
	GetSeconds  float64 `json:"get_seconds,omitempty"`
	PutMiBps    float64 `json:"put_mib_s,omitempty"`
	GetMiBps    float64 `json:"get_mib_s,omitempty"`
}

func runFloor(args []string) error {
	fs := flag.NewFlagSet("floor", flag.ExitOnError)
	endpoint := fs.String("endpoint", "", "S3 endpoint, http://HOST:PORT")
	bucket := fs.String("bucket", "", "bucket (must exist)")
	src := fs.String("src", "", "file whose bytes are uploaded (read into memory; e.g. in /dev/shm)")
	objSize := fs.Int64("object", 16<<20, "object size in bytes")
	inflight := fs.Int("inflight", 8, "requests in flight")
	total := fs.Int64("total", 1<<30, "bytes to upload, then download")
	prefix := fs.String("prefix", "floor", "key prefix")
	mode := fs.String("mode", "both", "put, get (the objects an earlier put left), or both")
	_ = fs.Parse(args)
	if *mode != "put" && *mode != "get" && *mode != "both" {
		return fmt.Errorf("-mode %q: put, get or both", *mode)
	}
	ak, sk, err := creds()
	if err != nil {
		return err
	}
	data, err := os.ReadFile(*src)
	if err != nil {
		return err
	}
	if int64(len(data)) < *objSize {
		return fmt.Errorf("-src has %d bytes, fewer than one object (%d)", len(data), *objSize)
	}
	n := int((*total + *objSize - 1) / *objSize)
	client := &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 64, DisableCompression: true,
		WriteBufferSize: 256 << 10, ReadBufferSize: 256 << 10}}
	do := func(method string, i int) error {
		u := fmt.Sprintf("%s/%s/%s/%06d", strings.TrimRight(*endpoint, "/"), *bucket, *prefix, i)
		var body io.Reader
		var size int64
		if method == http.MethodPut {
			off := (int64(i) * *objSize) % (int64(len(data)) - *objSize + 1)
			body = bytes.NewReader(data[off : off+*objSize])
			size = *objSize
		}
		req, err := http.NewRequest(method, u, body)
		if err != nil {
			return err
		}
		req.ContentLength = size
		req.Header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
		req = signer.SignV4(*req, ak, sk, "", "us-east-1")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		got, err := io.Copy(io.Discard, resp.Body)
		if err != nil {
			return err
		}
		if resp.StatusCode/100 != 2 {
			return fmt.Errorf("%s %s: %s", method, u, resp.Status)
		}
		if method == http.MethodGet && got != *objSize {
			return fmt.Errorf("GET %s: %d bytes, want %d", u, got, *objSize)
		}
		return nil
	}
	phase := func(method string) (float64, error) {
		var next atomic.Int64
		var wg sync.WaitGroup
		var firstErr error
		var emu sync.Mutex
		t0 := time.Now()
		for w := 0; w < *inflight; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1) - 1)
					if i >= n {
						return
					}
					if err := do(method, i); err != nil {
						emu.Lock()
						if firstErr == nil {
							firstErr = err
						}
						emu.Unlock()
						return
					}
				}
			}()
		}
		wg.Wait()
		return time.Since(t0).Seconds(), firstErr
	}
	res := floorResult{Endpoint: *endpoint, Objects: n, ObjectBytes: *objSize, TotalBytes: int64(n) * *objSize, InFlight: *inflight}
	mib := float64(res.TotalBytes) / (1 << 20)
	if *mode != "get" {
		if res.PutSeconds, err = phase(http.MethodPut); err != nil {
			return err
		}
		res.PutMiBps = round1(mib / res.PutSeconds)
	}
	if *mode != "put" {
		if res.GetSeconds, err = phase(http.MethodGet); err != nil {
			return err
		}
		res.GetMiBps = round1(mib / res.GetSeconds)
	}
	res.PutSeconds, res.GetSeconds = round3(res.PutSeconds), round3(res.GetSeconds)
	return json.NewEncoder(os.Stdout).Encode(res)
}

func round1(f float64) float64 { return float64(int64(f*10+0.5)) / 10 }
func round3(f float64) float64 { return float64(int64(f*1000+0.5)) / 1000 }

// ---- mb, du ----

func client(endpoint string) (*minio.Client, error) {
	ak, sk, err := creds()
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("-endpoint %q: want http://HOST:PORT", endpoint)
	}
	return minio.New(u.Host, &minio.Options{Creds: credentials.NewStaticV4(ak, sk, ""), Secure: u.Scheme == "https",
		BucketLookup: minio.BucketLookupPath, Region: "us-east-1"})
}

func runMB(args []string) error {
	fs := flag.NewFlagSet("mb", flag.ExitOnError)
	endpoint := fs.String("endpoint", "", "S3 endpoint, http://HOST:PORT")
	wait := fs.Duration("wait", 60*time.Second, "how long to retry while the server comes up")
	_ = fs.Parse(args)
	c, err := client(*endpoint)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(*wait)
	for _, b := range fs.Args() {
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			err = c.MakeBucket(ctx, b, minio.MakeBucketOptions{})
			if err != nil {
				if ok, e2 := c.BucketExists(ctx, b); e2 == nil && ok {
					err = nil
				}
			}
			cancel()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("bucket %s: %w", b, err)
			}
			time.Sleep(300 * time.Millisecond)
		}
	}
	return nil
}

func runDU(args []string) error {
	fs := flag.NewFlagSet("du", flag.ExitOnError)
	endpoint := fs.String("endpoint", "", "S3 endpoint, http://HOST:PORT")
	bucket := fs.String("bucket", "", "bucket")
	_ = fs.Parse(args)
	c, err := client(*endpoint)
	if err != nil {
		return err
	}
	var n, size int64
	byTop := map[string]int64{}
	for oi := range c.ListObjects(context.Background(), *bucket, minio.ListObjectsOptions{Recursive: true}) {
		if oi.Err != nil {
			return oi.Err
		}
		n++
		size += oi.Size
		top, _, _ := strings.Cut(oi.Key, "/")
		byTop[top] += oi.Size
	}
	return json.NewEncoder(os.Stdout).Encode(map[string]any{"bucket": *bucket, "objects": n, "bytes": size, "by_top": byTop})
}
