package main

import (
	"context"
	cryptorand "crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
	"github.com/kura-backup/kura/internal/crypt"
)

// copySummary is what `kura copy --json` prints.
type copySummary struct {
	From      string `json:"from"`
	To        string `json:"to"`
	SharedKey bool   `json:"shared_key"`
	Copied    []struct {
		Name   string `json:"name"`
		Source string `json:"source"`
		Target string `json:"target"`
	} `json:"copied"`
	Skipped       []struct{} `json:"skipped"`
	Failed        []struct{} `json:"failed"`
	ChunksSent    int64      `json:"chunks_sent"`
	ChunksPresent int64      `json:"chunks_present"`
	BytesSent     int64      `json:"bytes_sent"`
	BlobsVerified int64      `json:"blobs_verified"`
	Seconds       float64    `json:"seconds"`
}

func (e *env) copyJSON(args ...string) copySummary {
	e.t.Helper()
	var s copySummary
	out := e.ok(append([]string{"copy", "--json"}, args...)...)
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		e.t.Fatalf("copy --json: %v\n%s", err, out)
	}
	return s
}

// TestCopyToS3 copies a local repository's restore points to a
// repository on each real S3 server, as a user would: once to a target
// with its own key (re-encrypted), once to one made with
// --copy-key-from (sealed blobs as they are, with --verify); each copy
// restores byte for byte from S3, a second copy sends nothing, and the
// targets verify clean.
func TestCopyToS3(t *testing.T) {
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := s3servers.Get(t, k)
			e := newEnv(t) // the local source, the default repository
			e.vars = srv.Env()
			raw := filepath.Join(e.dir, "vm1-disk0.raw")
			makeImage(t, raw, 32<<20, 21, 30)
			first := filepath.Join(e.dir, "first.raw")
			copyFile(t, raw, first)
			e.ok("init", "--chunk-size", "256K")
			e.ok("backup", "image", raw, "--name", "vm1")
			scribble(t, raw, 22, 8)
			e.ok("backup", "image", raw, "--name", "vm1")
			ss := e.snapshots()

			// The target with its own key and password; the source's
			// password stays KURA_PASSWORD (the --repo side).
			target := srv.Location(srv.Bucket, "copy/"+crypt.RandomID().Short())
			s3 := *e
			s3.repo, s3.pw = target, "the offsite password"
			s3.ok("init")
			toPw := writeFile(t, e.dir, "to-pw", s3.pw+"\n")
			res := e.copyJSON("--to", target, "--to-password-file", toPw)
			if len(res.Copied) != 2 || res.SharedKey || res.ChunksSent == 0 || !strings.HasPrefix(res.To, "s3:") {
				t.Fatalf("copy: %+v", res)
			}
			out := filepath.Join(e.dir, "out")
			s3.ok("restore", "vm1@latest", "--to", out)
			sameFile(t, filepath.Join(out, "vm1-disk0.raw"), raw)
			copies := s3.snapshots()
			if len(copies) != 2 {
				t.Fatalf("%d restore points on S3", len(copies))
			}
			out1 := filepath.Join(e.dir, "out1")
			s3.ok("restore", copies[0].ID, "--to", out1)
			sameFile(t, filepath.Join(out1, "vm1-disk0.raw"), first)

			// Again: nothing to send. The password from the environment
			// this time.
			again := *e
			again.vars = append(append([]string(nil), e.vars...), "KURA_TO_PASSWORD="+s3.pw)
			if res := again.copyJSON("--to", target); len(res.Copied) != 0 || len(res.Skipped) != 2 || res.ChunksSent != 0 || res.BytesSent != 0 {
				t.Errorf("second copy: %+v", res)
			}
			if out := s3.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") {
				t.Fatalf("verify on S3: %s", out)
			}

			// A target sharing the source's key, written from S3's side:
			// --repo is the target, --from the source.
			shared := s3
			shared.repo = srv.Location(srv.Bucket, "copy/"+crypt.RandomID().Short())
			shared.vars = append(append([]string(nil), e.vars...), "KURA_FROM_PASSWORD="+e.pw)
			if out := shared.ok("init", "--copy-key-from", e.repo); !strings.Contains(out, "shares the master key") {
				t.Errorf("init --copy-key-from: %s", out)
			}
			res = shared.copyJSON("--from", e.repo, "--latest", "1", "--verify")
			if len(res.Copied) != 1 || res.Copied[0].Source != ss[1].ID || !res.SharedKey || res.BlobsVerified < res.ChunksSent {
				t.Fatalf("shared-key copy: %+v", res)
			}
			out2 := filepath.Join(e.dir, "out2")
			shared.ok("restore", "vm1@latest", "--to", out2)
			sameFile(t, filepath.Join(out2, "vm1-disk0.raw"), raw)
			// The human summary, and a wrong password for the other side
			// in one line that says where it comes from.
			if out := shared.ok("copy", "--from", e.repo); !strings.Contains(out, "1 copied, 1 already in the target") || !strings.Contains(out, "shared key") {
				t.Errorf("copy summary: %s", out)
			}
			wrong := shared
			wrong.vars = append(append([]string(nil), e.vars...), "KURA_FROM_PASSWORD=nope")
			wrong.fails("--from-password-file", "copy", "--from", e.repo)
		})
	}
}

// TestCopyThroughput measures kura copy of a 256 MiB image (half random,
// half base64 text) from a local repository to another local one and to
// versitygw, with a shared key and with independent keys, then a copy
// with nothing to send with 5000 more objects under the S3 target's
// data/ (what one listing of a big target costs). It runs only with
// KURA_COPY_BENCH=1:
//
//	KURA_COPY_BENCH=1 go test -p 1 -run TestCopyThroughput -v ./cmd/kura/
func TestCopyThroughput(t *testing.T) {
	if os.Getenv("KURA_COPY_BENCH") == "" {
		t.Skip("set KURA_COPY_BENCH=1 to measure")
	}
	e := newEnv(t)
	img := filepath.Join(e.dir, "img.raw")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	rnd := make([]byte, 128<<20)
	if _, err := cryptorand.Read(rnd); err != nil {
		t.Fatal(err)
	}
	f.Write(rnd[:64<<20])
	f.Write(rnd[64<<20:])
	enc := base64.NewEncoder(base64.StdEncoding, f)
	if _, err := io.CopyN(enc, cryptorand.Reader, 96<<20); err != nil {
		t.Fatal(err)
	}
	enc.Close()
	f.Close()
	e.ok("init")
	e.ok("backup", "image", img, "--name", "vm1")
	srv := s3servers.Get(t, s3test.VersityGW)
	e.vars = srv.Env()
	e.vars = append(e.vars, "KURA_TO_PASSWORD=pw2", "KURA_FROM_PASSWORD="+e.pw)
	measure := func(what, target string, shared bool) {
		to := *e
		to.repo, to.pw = target, "pw2"
		if shared {
			to.ok("init", "--copy-key-from", e.repo)
		} else {
			to.ok("init")
		}
		start := time.Now()
		res := e.copyJSON("--to", target)
		el := time.Since(start)
		mib := float64(res.BytesSent) / (1 << 20)
		t.Logf("%-20s %-10s: %.1f MiB sent in %.2fs (%.0f MiB/s; whole command with unlocking both %.2fs); %d chunks", what, map[bool]string{true: "shared key", false: "own key"}[shared],
			mib, res.Seconds, mib/res.Seconds, el.Seconds(), res.ChunksSent)
		start = time.Now()
		res = e.copyJSON("--to", target)
		t.Logf("%-20s again     : nothing sent (%d chunks) in %.2fs (whole command %.2fs)", what, res.ChunksSent, res.Seconds, time.Since(start).Seconds())
	}
	for _, shared := range []bool{false, true} {
		measure("local -> local", filepath.Join(e.dir, fmt.Sprintf("local-%v", shared)), shared)
		measure("local -> versitygw", srv.Location(srv.Bucket, "bench/"+crypt.RandomID().Short()), shared)
	}
	// One listing of a target with 5000 more objects under data/.
	prefix := "bench/" + crypt.RandomID().Short()
	target := srv.Location(srv.Bucket, prefix)
	to := *e
	to.repo, to.pw = target, "pw2"
	to.ok("init")
	e.copyJSON("--to", target)
	before := e.copyJSON("--to", target)
	c, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range 5000 {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			name := fmt.Sprintf("%s/data/zz/filler-%05d", prefix, i)
			if _, err := c.PutObject(ctx, srv.Bucket, name, strings.NewReader("x"), 1, minio.PutObjectOptions{}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	after := e.copyJSON("--to", target)
	t.Logf("copy with nothing to send: %.2fs; with 5000 more objects in the target's data/: %.2fs", before.Seconds, after.Seconds)
}

// packsIn lists the packs in a local repository (not the temporary files
// of packs being written).
func packsIn(dir string) []string {
	var out []string
	all, _ := filepath.Glob(filepath.Join(dir, "data", "*", "*"))
	for _, p := range all {
		if !strings.HasPrefix(filepath.Base(p), ".") {
			out = append(out, p)
		}
	}
	return out
}

// TestCopyKilled kills a copy mid-way (SIGKILL: no cleanup at all): the
// target verifies clean, the next copy sends only what had not landed and
// indexes the packs the killed one left, and the copy restores byte for
// byte.
func TestCopyKilled(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "vm1.raw")
	data := make([]byte, 40<<20)
	if _, err := cryptorand.Read(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	e.ok("init")
	e.ok("backup", "image", img, "--name", "vm1")
	target := filepath.Join(e.dir, "target")
	to := *e
	to.repo = target
	to.ok("init")
	// At 5 MiB/s the 40 MiB (two and a half packs) take 8 s: killed as
	// soon as the first pack landed, long before the index file.
	c := e.cmd("--limit-upload", "5MiB", "copy", "--to", target)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	var landed []string
	for deadline := time.Now().Add(30 * time.Second); len(landed) == 0; {
		select {
		case err := <-done:
			t.Fatalf("the copy ended (%v) before a pack landed", err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.Process.Signal(syscall.SIGKILL)
			t.Fatal("no pack landed in 30 s")
		}
		landed = packsIn(target)
	}
	c.Process.Signal(syscall.SIGKILL)
	<-done
	landed = packsIn(target)
	if out := to.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") {
		t.Fatalf("verify after the kill: %s", out)
	}
	if ss := to.snapshots(); len(ss) != 0 {
		t.Fatalf("a restore point is in the target after the kill: %+v", ss)
	}
	var res struct {
		copySummary
		PacksIndexed int   `json:"packs_indexed"`
		DataSent     int64 `json:"data_sent"`
	}
	out := e.ok("copy", "--to", target, "--json")
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d packs landed before the kill; the next copy indexed %d and sent %d MiB of 40", len(landed), res.PacksIndexed, res.DataSent>>20)
	if len(res.Copied) != 1 || res.PacksIndexed != len(landed) || res.DataSent >= int64(len(data)) {
		t.Errorf("resumed copy: %+v", res)
	}

	restored := filepath.Join(e.dir, "out")
	to.ok("restore", "vm1@latest", "--to", restored)
	sameFile(t, filepath.Join(restored, "vm1.raw"), img)
	if out := to.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") || strings.Contains(out, "no index lists") {
		t.Fatalf("verify after the resumed copy: %s", out)
	}
}
