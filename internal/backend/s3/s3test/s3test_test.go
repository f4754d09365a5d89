package s3test

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
)

var pool = NewPool()

func TestMain(m *testing.M) {
	code := m.Run()
	pool.Close()
	os.Exit(code)
}

// A killed server comes back on the same endpoint with its data: what
// the fault tests of cmd/kura rely on.
func TestKillRestart(t *testing.T) {
	for _, k := range Kinds {
		t.Run(string(k), func(t *testing.T) {
			ctx := context.Background()
			s := pool.Get(t, k)
			c, err := s.Client()
			if err != nil {
				t.Fatal(err)
			}
			data := bytes.Repeat([]byte("kept across a crash "), 1000)
			if _, err := c.PutObject(ctx, s.Bucket, "restart/obj", bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{}); err != nil {
				t.Fatal(err)
			}
			s.Kill()
			if s.Running() {
				t.Fatal("the killed server runs")
			}
			if _, err := c.ListBuckets(ctx); err == nil {
				t.Fatal("the killed server still answers")
			}
			start := time.Now()
			if err := s.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s back after %v", k, time.Since(start).Round(time.Millisecond))
			if !s.Running() {
				t.Fatal("the restarted server does not run")
			}
			o, err := c.GetObject(ctx, s.Bucket, "restart/obj", minio.GetObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(o)
			o.Close()
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("after the restart: %d bytes, %v", len(got), err)
			}
			if !strings.HasPrefix(s.Endpoint, "http://127.0.0.1:") {
				t.Fatalf("endpoint %s", s.Endpoint)
			}
		})
	}
}

// ClockSkew re-signs correctly (no skew: the server takes the requests,
// uploads included), and with an hour's skew the server refuses them as
// a skewed client's.
func TestClockSkew(t *testing.T) {
	for _, k := range Kinds {
		t.Run(string(k), func(t *testing.T) {
			ctx := context.Background()
			s := pool.Get(t, k)
			for _, skew := range []time.Duration{0, time.Hour, -time.Hour} {
				p, err := NewClockSkew(s, skew)
				if err != nil {
					t.Fatal(err)
				}
				via := &Server{Endpoint: p.Endpoint, AccessKey: s.AccessKey, SecretKey: s.SecretKey}
				c, err := via.Client()
				if err != nil {
					t.Fatal(err)
				}
				data := []byte("signed again on the way")
				_, perr := c.PutObject(ctx, s.Bucket, "skew/obj", bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{})
				_, lerr := c.BucketExists(ctx, s.Bucket)
				p.Close()
				if skew == 0 {
					if perr != nil || lerr != nil {
						t.Fatalf("through the proxy without skew: put %v, head %v", perr, lerr)
					}
					continue
				}
				if code := minio.ToErrorResponse(perr).Code; code != "RequestTimeTooSkewed" {
					t.Errorf("skew %v: put answered %q (%v), want RequestTimeTooSkewed", skew, code, perr)
				}
			}
		})
	}
}

// sink accepts connections, reads everything a client sends, and answers
// "ok" when the client has closed its side.
func sink(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(io.Discard, c)
				c.Write([]byte("ok"))
			}()
		}
	}()
	return ln.Addr().String()
}

// send writes n bytes through addr, closes its side and reads the answer.
func send(addr string, n int) (time.Duration, string, error) {
	start := time.Now()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, "", err
	}
	defer c.Close()
	if _, err := c.Write(make([]byte, n)); err != nil {
		return time.Since(start), "", err
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	return time.Since(start), string(got), err
}

// The shaper delays, limits the rate, delays "lost" segments and cuts
// connections as told.
func TestShaper(t *testing.T) {
	target := sink(t)
	s, err := NewShaper(target, Link{Delay: 50 * time.Millisecond, Rate: 20e6, Loss: 0.01, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// A round trip with almost no data: handshake, request, answer.
	took, got, err := send(s.Addr, 1)
	if err != nil || got != "ok" {
		t.Fatalf("through the shaper: %q, %v", got, err)
	}
	if took < 150*time.Millisecond || took > time.Second {
		t.Errorf("a round trip (with the handshake's) took %v, want 150 ms and a little", took)
	}
	// 2 MiB at 20 Mbit/s: 0.84 s, plus the delays and ~14 lost segments.
	const n = 2 << 20
	took, got, err = send(s.Addr, n)
	if err != nil || got != "ok" {
		t.Fatalf("through the shaper: %q, %v", got, err)
	}
	st := s.Stats()
	t.Logf("2 MiB in %v; %+v", took, st)
	if took < 840*time.Millisecond || took > 6*time.Second {
		t.Errorf("2 MiB at 20 Mbit/s took %v", took)
	}
	if st.LostUp == 0 || st.LostUp > 60 {
		t.Errorf("%d of ~1436 segments lost at 1%%", st.LostUp)
	}
	if st.BytesUp != n+1 || st.BytesDown != 4 {
		t.Errorf("bytes: %+v", st)
	}

	// Every connection cut within its first 64 KiB.
	d, err := NewShaper(target, Link{DropConn: 1, DropWithin: 64 << 10, Seed: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, got, err := send(d.Addr, 1<<20); err == nil && got == "ok" {
		t.Error("a connection to cut went through")
	}
	if st := d.Stats(); st.Dropped != 1 {
		t.Errorf("dropped %d connections, want 1", st.Dropped)
	}

	// CutOnce: the first connection past 64 KiB, and no other.
	o, err := NewShaper(target, Link{CutOnce: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if _, got, err := send(o.Addr, 1000); err != nil || got != "ok" {
		t.Fatalf("a small connection: %q, %v", got, err)
	}
	if _, got, err := send(o.Addr, 1<<20); err == nil && got == "ok" {
		t.Error("the connection to cut went through")
	}
	if _, got, err := send(o.Addr, 1<<20); err != nil || got != "ok" {
		t.Errorf("a connection after the cut: %q, %v", got, err)
	}
	if st := o.Stats(); st.Dropped != 1 {
		t.Errorf("dropped %d connections, want 1", st.Dropped)
	}
}
