// Command s3delay serves a scratch S3 bucket that looks far away: it
// starts a versitygw (as the tests do, from ~/.cache/kura/s3/bin: run
// scripts/s3servers.sh once) with one bucket, and a proxy in front of it
// on 127.0.0.1 that holds every request for -delay before passing it on
// (s3test.Delay), as a round trip to a distant region would. kura
// commands pointed at the proxy can then be timed against a slow store
// without tc netem. bench/s3-cache.sh drives it.
//
//	go run ./bench/s3delay -delay 50ms -env work/s3.env -log work/requests.log
//
// The env file it writes, once both are up, sets KURA_REPO (through the
// proxy), KURA_REPO_DIRECT (the server itself, for setting up without
// the delay) and the server's credentials. The log gets one line per
// request that passes the proxy: its kind (GET, LIST, PUT, HEAD, …),
// method and path. It runs until SIGINT or SIGTERM, then stops the server
// and removes its data.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
)

func main() {
	delay := flag.Duration("delay", 50*time.Millisecond, "wait before passing each request on")
	envFile := flag.String("env", "s3.env", "write the repository location and credentials to `file`")
	logFile := flag.String("log", "", "append one line per request to `file`")
	prefix := flag.String("prefix", "bench", "the repository's prefix in the bucket")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv, err := s3test.Start(ctx, s3test.VersityGW)
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Stop()

	target, err := url.Parse(srv.Endpoint)
	if err != nil {
		log.Fatal(err)
	}
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.MaxIdleConnsPerHost = 256
	tr := s3test.NewDelay(base, *delay)
	if *logFile != "" {
		f, err := os.OpenFile(*logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			log.Fatal(err)
		}
		defer f.Close()
		var mu sync.Mutex
		tr.OnRequest(func(kind string, req *http.Request) {
			mu.Lock()
			fmt.Fprintf(f, "%s %s %s\n", kind, req.Method, req.URL.RequestURI())
			mu.Unlock()
		})
	}
	// The Host header stays the proxy's: the client signed it.
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = tr
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	hs := &http.Server{Handler: proxy, ReadHeaderTimeout: time.Minute}
	go func() {
		if err := hs.Serve(ln); err != http.ErrServerClosed {
			log.Print(err)
			stop()
		}
	}()

	through := "http://" + ln.Addr().String()
	env := fmt.Sprintf("KURA_REPO=s3:%s/%s/%s\nKURA_REPO_DIRECT=s3:%s/%s/%s\nAWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n",
		through, srv.Bucket, *prefix, srv.Endpoint, srv.Bucket, *prefix, srv.AccessKey, srv.SecretKey)
	if err := os.WriteFile(*envFile+".tmp", []byte(env), 0o600); err != nil {
		log.Fatal(err)
	}
	if err := os.Rename(*envFile+".tmp", *envFile); err != nil {
		log.Fatal(err)
	}
	log.Printf("versitygw at %s, behind %v per request at %s", srv.Endpoint, *delay, through)
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = hs.Shutdown(sctx)
}
