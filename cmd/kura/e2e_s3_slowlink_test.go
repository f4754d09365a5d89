package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
)

// openPTY returns a new pseudo-terminal's controlling side and the
// terminal a child gets.
func openPTY(t *testing.T) (ptm, pts *os.File) {
	t.Helper()
	ptm, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	fd := int(ptm.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlocking the pty: %v", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("the pty's number: %v", err)
	}
	pts, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	return ptm, pts
}

// progressRE is a backup's progress line (cmd/kura/progress.go's rateLine).
var progressRE = regexp.MustCompile(`^backup ([0-9.]+ [KMGT]?i?B) / ([0-9.]+ [KMGT]?i?B) \((\d+)%\)  [0-9.]+ [KMGT]?i?B/s  ETA \S+$`)

// TestS3SlowLink backs up a 20 MiB image to each server through a link
// of 50 ms one-way delay, 20 Mbit/s, 1% of segments lost (as the 200 ms
// a retransmission costs) and the first connection past 3 MiB cut (an
// upload in the middle): the backup finishes, retrying the cut upload,
// and its progress line is drawn on the terminal all along.
// Progress is drawn only when stderr is a terminal (and not with -q):
// kura has no machine-readable progress, so the test runs it on a
// pseudo-terminal and reads what it draws.
func TestS3SlowLink(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: 20 MiB at 20 Mbit/s")
	}
	for _, k := range s3test.Kinds {
		t.Run(string(k), func(t *testing.T) {
			srv := s3servers.Get(t, k)
			sh, err := srv.Shaped(s3test.Link{Delay: 50 * time.Millisecond, Rate: 20e6, Loss: 0.01,
				CutOnce: 3 << 20, Seed: 7})
			if err != nil {
				t.Fatal(err)
			}
			defer sh.Close()
			e, prefix := s3env(t, srv)
			direct := e.repo
			slow := *e
			slow.repo = "s3:" + sh.Endpoint() + "/" + srv.Bucket + "/" + prefix
			img := filepath.Join(e.dir, "disk.raw")
			makeImage(t, img, 20<<20, 51, 30)
			e.ok("init")

			ptm, pts := openPTY(t)
			defer ptm.Close()
			c := slow.cmd("backup", "image", img, "--name", "vm")
			var stdout bytes.Buffer
			c.Stdout, c.Stderr = &stdout, pts
			type draw struct {
				at   time.Duration
				text string
			}
			var mu sync.Mutex
			var draws []draw
			var raw bytes.Buffer
			start := time.Now()
			read := make(chan struct{})
			go func() {
				defer close(read)
				buf := make([]byte, 4096)
				var pending string
				for {
					n, err := ptm.Read(buf)
					if n > 0 {
						mu.Lock()
						raw.Write(buf[:n])
						pending += string(buf[:n])
						// Each redraw is "\r\033[K" and the line.
						parts := strings.Split(pending, "\r\x1b[K")
						pending = parts[len(parts)-1]
						for _, p := range parts[:len(parts)-1] {
							if p = strings.TrimSpace(p); p != "" {
								draws = append(draws, draw{time.Since(start), p})
							}
						}
						mu.Unlock()
					}
					if err != nil {
						return
					}
				}
			}()
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			pts.Close() // the child holds it now
			werr := c.Wait()
			took := time.Since(start)
			<-read // EIO once the child closed the terminal
			st := sh.Stats()
			t.Logf("backup through the slow link: %v; shaper: %d connections (%d cut), %.1f MiB up, %d segments lost up, %d down, longest queue %v",
				took.Round(time.Millisecond), st.Conns, st.Dropped, float64(st.BytesUp)/(1<<20), st.LostUp, st.LostDown, st.MaxQueueUp.Round(time.Millisecond))
			mu.Lock()
			defer mu.Unlock()
			if werr != nil {
				t.Fatalf("backup through the slow link: %v\nstdout: %s\nterminal: %q", werr, stdout.String(), raw.String())
			}
			if st.BytesUp < 5<<20 {
				t.Fatalf("only %d bytes went through the shaper", st.BytesUp)
			}
			if st.Dropped != 1 || !strings.Contains(raw.String(), "retrying") {
				t.Errorf("%d connections cut; retries on the terminal: %v", st.Dropped, strings.Contains(raw.String(), "retrying"))
			}
			var lines []draw
			for _, d := range draws {
				if progressRE.MatchString(d.text) {
					lines = append(lines, d)
				} else if strings.Contains(d.text, "retrying") {
					// A retry's warning, written over the progress line.
					t.Logf("a retry: %q", d.text)
				} else {
					t.Errorf("the terminal shows %q", d.text)
				}
			}
			if len(lines) < 4 {
				t.Fatalf("%d progress lines in %v, want one every 250 ms: %q", len(lines), took, raw.String())
			}
			first, last := lines[0], lines[len(lines)-1]
			t.Logf("%d progress lines, the first at %v: %q, the last at %v: %q", len(lines), first.at.Round(time.Millisecond), first.text, last.at.Round(time.Millisecond), last.text)
			for _, d := range lines {
				if strings.Contains(d.text, "(100%)") {
					// Progress counts the bytes read from the disk; the
					// uploads behind them are not in it.
					t.Logf("100%% read at %v, the backup done at %v", d.at.Round(time.Millisecond), took.Round(time.Millisecond))
					break
				}
			}
			if took-last.at > 2*time.Second {
				t.Errorf("the last progress line came %v before the end", took-last.at)
			}
			if first.at > took/2 {
				t.Errorf("the first progress line came at %v of %v", first.at, took)
			}
			if !strings.Contains(stdout.String(), "snapshot ") {
				t.Errorf("backup output: %s", stdout.String())
			}

			// Straight to the server: the restore point is whole.
			e.repo = direct
			ss := e.snapshots()
			if len(ss) != 1 {
				t.Fatalf("%d restore points", len(ss))
			}
			checkRepo(t, e, map[string]string{ss[0].ID: img}, "after the backup through the slow link")
		})
	}
}
