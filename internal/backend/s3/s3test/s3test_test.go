package s3test

import (
	"bytes"
	"context"
	"io"
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
			if _, err := c.ListBuckets(ctx); err == nil {
				t.Fatal("the killed server still answers")
			}
			start := time.Now()
			if err := s.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s back after %v", k, time.Since(start).Round(time.Millisecond))
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
