// Command s3link measures Kura's backup to S3 over a slow, lossy link:
// the throughput it gets as a fraction of the link's rate (docs/
// BENCHMARKS.md, "Kura over a slow link"). Run it through bench/s3-link.sh.
//
// It starts a versitygw server on this host (internal/backend/s3/s3test)
// and a shaper in front of it (s3test.Shaper: one-way delay, a rate limit
// shared by every connection, lost segments as the retransmission delay
// they cost; tc netem is not available on every kernel), writes an image
// of incompressible data, and times, through the shaper:
//
//   - the link's floor: PUTs of 16 MiB objects straight from memory, 1
//     and 8 in flight (what any S3 client can get through this link);
//   - `kura init` + `kura backup image` (full), its bytes on the wire
//     counted by the shaper;
//   - restic's backup of the same image, when BENCH_RESTIC_BIN is set.
//
// Each result is the bytes sent upstream over the wall time, as a fraction
// of the link's rate. It prints a JSON report on stdout.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
)

type result struct {
	What     string  `json:"what"`
	Seconds  float64 `json:"seconds"`
	BytesUp  int64   `json:"bytes_up"`
	MbitUp   float64 `json:"mbit_per_s_up"`
	OfLink   float64 `json:"fraction_of_link"`
	LostUp   int64   `json:"segments_lost_up"`
	Conns    int64   `json:"connections"`
	ExitCode int     `json:"exit_code"`
}

type report struct {
	Link struct {
		DelayMS  float64 `json:"one_way_delay_ms"`
		RateMbit float64 `json:"rate_mbit"`
		Loss     float64 `json:"loss"`
	} `json:"link"`
	ImageMiB int      `json:"image_mib"`
	Results  []result `json:"results"`
}

func envFloat(k string, def float64) float64 {
	if v := os.Getenv(k); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			fatal(fmt.Errorf("%s=%q: %v", k, v, err))
		}
		return f
	}
	return def
}

func envStr(k, def string) string {
	if v, ok := os.LookupEnv(k); ok {
		return v
	}
	return def
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "s3link:", err)
	os.Exit(1)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[s3link %s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func main() {
	kura := os.Getenv("BENCH_KURA_BIN")
	if kura == "" {
		fatal(fmt.Errorf("set BENCH_KURA_BIN"))
	}
	work, err := os.MkdirTemp(os.Getenv("BENCH_WORK"), "kura-s3link.")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(work)
	link := s3test.Link{
		Delay: time.Duration(envFloat("BENCH_LINK_DELAY_MS", 50) * float64(time.Millisecond)),
		Rate:  envFloat("BENCH_LINK_MBIT", 20) * 1e6,
		Loss:  envFloat("BENCH_LINK_LOSS", 0.01),
		Seed:  1,
	}
	mib := int(envFloat("BENCH_LINK_MIB", 64))
	var rep report
	rep.Link.DelayMS = float64(link.Delay) / float64(time.Millisecond)
	rep.Link.RateMbit = link.Rate / 1e6
	rep.Link.Loss = link.Loss
	rep.ImageMiB = mib

	ctx := context.Background()
	srv, err := s3test.Start(ctx, s3test.VersityGW)
	if err != nil {
		fatal(err)
	}
	defer srv.Stop()

	img := filepath.Join(work, "disk.raw")
	data := make([]byte, mib<<20)
	rand.Read(data)
	if err := os.WriteFile(img, data, 0o600); err != nil {
		fatal(err)
	}

	// measure runs f through a fresh shaper and returns its result.
	measure := func(what string, f func(endpoint string) int) result {
		sh, err := srv.Shaped(link)
		if err != nil {
			fatal(err)
		}
		start := time.Now()
		code := f(sh.Endpoint())
		secs := time.Since(start).Seconds()
		st := sh.Stats()
		sh.Close()
		r := result{What: what, Seconds: secs, BytesUp: st.BytesUp, LostUp: st.LostUp, Conns: st.Conns, ExitCode: code}
		r.MbitUp = float64(st.BytesUp) * 8 / secs / 1e6
		r.OfLink = r.MbitUp * 1e6 / link.Rate
		logf("%s: %.1f s, %.1f MB up, %.2f Mbit/s = %.0f%% of the link (%d segments delayed as lost, %d connections, exit %d)",
			what, secs, float64(st.BytesUp)/1e6, r.MbitUp, 100*r.OfLink, st.LostUp, st.Conns, code)
		rep.Results = append(rep.Results, r)
		return r
	}

	// The floor: 16 MiB PUTs, 1 and 8 in flight.
	var inflights []int
	for _, f := range strings.Fields(envStr("BENCH_LINK_FLOOR_INFLIGHT", "1 8")) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			fatal(fmt.Errorf("BENCH_LINK_FLOOR_INFLIGHT: %q", f))
		}
		inflights = append(inflights, n)
	}
	for _, inflight := range inflights {
		measure(fmt.Sprintf("floor: 16 MiB PUTs, %d in flight", inflight), func(endpoint string) int {
			c, err := minio.New(strings.TrimPrefix(endpoint, "http://"), &minio.Options{Creds: credsOf(srv), BucketLookup: minio.BucketLookupPath, Region: "us-east-1"})
			if err != nil {
				fatal(err)
			}
			var wg sync.WaitGroup
			n := (mib + 15) / 16
			next := make(chan int, n)
			for i := range n {
				next <- i
			}
			close(next)
			for range inflight {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range next {
						part := data[i*16<<20 : min((i+1)*16<<20, len(data))]
						if _, err := c.PutObject(ctx, srv.Bucket, fmt.Sprintf("floor%d/%d", inflight, i), bytes.NewReader(part), int64(len(part)), minio.PutObjectOptions{DisableMultipart: true}); err != nil {
							fatal(err)
						}
					}
				}()
			}
			wg.Wait()
			return 0
		})
	}

	run := func(env []string, name string, args ...string) int {
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		os.WriteFile(filepath.Join(work, "last.log"), out, 0o600)
		if err != nil {
			logf("%s %s: %v\n%s", name, strings.Join(args, " "), err, lastLines(string(out), 8))
			if ee, ok := err.(*exec.ExitError); ok {
				return ee.ExitCode()
			}
			return -1
		}
		return 0
	}

	// The repositories are made directly (init is not what is measured);
	// the backups go through the link. The endpoint is the shaper's, so
	// the location differs: the metadata cache is left out.
	kuraEnv := func(endpoint string) []string {
		return append(srv.Env(), "KURA_REPO=s3:"+endpoint+"/"+srv.Bucket+"/kura", "KURA_PASSWORD=kura-bench-password", "KURA_CACHE_DIR="+filepath.Join(work, "cache"))
	}
	if code := run(kuraEnv(srv.Endpoint), kura, "-q", "init"); code != 0 {
		fatal(fmt.Errorf("kura init failed"))
	}
	measure("kura backup image (full)", func(endpoint string) int {
		return run(kuraEnv(endpoint), kura, "-q", "--no-cache", "backup", "image", img, "--name", "link")
	})
	if restic := os.Getenv("BENCH_RESTIC_BIN"); restic != "" {
		resticEnv := func(endpoint string) []string {
			return append(srv.Env(), "RESTIC_REPOSITORY=s3:"+endpoint+"/"+srv.Bucket+"/restic", "RESTIC_PASSWORD=kura-bench-password", "RESTIC_CACHE_DIR="+filepath.Join(work, "restic-cache"))
		}
		if code := run(resticEnv(srv.Endpoint), restic, "-q", "init"); code != 0 {
			fatal(fmt.Errorf("restic init failed"))
		}
		measure("restic backup (full)", func(endpoint string) int {
			return run(resticEnv(endpoint), restic, "-q", "backup", img)
		})
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	enc.Encode(rep)
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

func credsOf(srv *s3test.Server) *credentials.Credentials {
	return credentials.NewStaticV4(srv.AccessKey, srv.SecretKey, "")
}
