package main

// End-to-end tests: they build the kura binary and drive it as a user
// would, on real image files, real qemu-storage-daemon exports and a real
// local repository.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var kuraBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kura-bin-")
	if err != nil {
		panic(err)
	}
	kuraBin = filepath.Join(dir, "kura")
	out, err := exec.Command("go", "build", "-o", kuraBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building kura: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	s3servers.Close()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is one test's repository and password.
type env struct {
	t    *testing.T
	repo string
	dir  string
	pw   string
	path string   // PATH override
	vars []string // more environment variables (an S3 server's credentials)
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	return &env{t: t, repo: filepath.Join(dir, "repo"), dir: dir, pw: "s3cret pass"}
}

type result struct {
	stdout, stderr string
	code           int
	pid            int // of the kura process
}

func (e *env) cmd(args ...string) *exec.Cmd {
	c := exec.Command(kuraBin, args...)
	// The metadata cache of S3 repositories stays in the test's
	// directory, not in the user's home.
	c.Env = append(os.Environ(), "KURA_REPO="+e.repo, "KURA_PASSWORD="+e.pw, "KURA_CACHE_DIR="+filepath.Join(e.dir, "kura-cache"))
	if e.path != "" {
		c.Env = append(c.Env, "PATH="+e.path)
	}
	c.Env = append(c.Env, e.vars...)
	return c
}

func (e *env) run(args ...string) result {
	e.t.Helper()
	c := e.cmd(args...)
	var so, se bytes.Buffer
	c.Stdout, c.Stderr = &so, &se
	err := c.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatalf("kura %v: %v", args, err)
	}
	return result{so.String(), se.String(), code, c.Process.Pid}
}

// ok runs kura and fails the test unless it succeeds.
func (e *env) ok(args ...string) string {
	e.t.Helper()
	r := e.run(args...)
	if r.code != 0 {
		e.t.Fatalf("kura %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// fails runs kura, expects a non-zero exit and a one-line error containing want.
func (e *env) fails(want string, args ...string) result {
	e.t.Helper()
	r := e.run(args...)
	if r.code == 0 {
		e.t.Fatalf("kura %s succeeded, want failure with %q", strings.Join(args, " "), want)
	}
	msg := strings.TrimSpace(r.stderr)
	if !strings.Contains(msg, want) {
		e.t.Fatalf("kura %s: error %q does not contain %q", strings.Join(args, " "), msg, want)
	}
	if strings.Count(msg, "\n") > 0 {
		e.t.Fatalf("kura %s: error is not one line: %q", strings.Join(args, " "), msg)
	}
	return r
}

// makeImage writes a sparse raw image of size bytes with compressible
// random data in some regions; it returns the path.
func makeImage(t *testing.T, path string, size int64, seed uint64, regions int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 7))
	for i := 0; i < regions; i++ {
		n := int64(64<<10) * int64(1+rng.IntN(32))
		off := rng.Int64N(size-n) &^ 511
		buf := make([]byte, n)
		for j := range buf {
			buf[j] = "kura backs up virtual machines "[rng.IntN(31)] ^ byte(rng.IntN(2))
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
}

func scribble(t *testing.T, path string, seed uint64, n int) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	rng := rand.New(rand.NewPCG(seed, 9))
	for i := 0; i < n; i++ {
		buf := make([]byte, 4096)
		for j := range buf {
			buf[j] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(buf, rng.Int64N(st.Size()-4096)&^4095); err != nil {
			t.Fatal(err)
		}
	}
}

func sameFile(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		t.Fatalf("%s and %s differ", a, b)
	}
}

func needQemu(t *testing.T) {
	t.Helper()
	for _, b := range []string{"qemu-img", "qemu-storage-daemon"} {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s not installed (apt-get install qemu-utils)", b)
		}
	}
}

type snapJSON struct {
	ID    string `json:"id"`
	Name  string `json:"name"`
	Kind  string `json:"kind"`
	Disks []struct {
		Name   string `json:"name"`
		Size   int64  `json:"size"`
		Format string `json:"format"`
	} `json:"disks"`
	Stats struct {
		BytesRead int64 `json:"bytes_read"`
		BytesNew  int64 `json:"bytes_new"`
	} `json:"stats"`
}

func (e *env) snapshots(args ...string) []snapJSON {
	e.t.Helper()
	var ss []snapJSON
	out := e.ok(append([]string{"snapshots", "--json"}, args...)...)
	if err := json.Unmarshal([]byte(out), &ss); err != nil {
		e.t.Fatalf("snapshots --json: %v\n%s", err, out)
	}
	return ss
}

func TestEndToEnd(t *testing.T) {
	needQemu(t)
	e := newEnv(t)
	raw := filepath.Join(e.dir, "vm1-disk1.raw")
	makeImage(t, raw, 64<<20, 1, 40)
	src0 := filepath.Join(e.dir, "src0.raw")
	makeImage(t, src0, 96<<20, 2, 40)
	qcow := filepath.Join(e.dir, "vm1-disk0.qcow2")
	if out, err := exec.Command("qemu-img", "convert", "-O", "qcow2", src0, qcow).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v %s", err, out)
	}

	e.ok("init", "--chunk-size", "256K")
	out := e.ok("backup", "image", qcow, raw, "--name", "vm1")
	if !strings.Contains(out, "snapshot") || !strings.Contains(out, "vm1-disk0") {
		t.Fatalf("backup output: %s", out)
	}
	ss := e.snapshots()
	if len(ss) != 1 || ss[0].Name != "vm1" || len(ss[0].Disks) != 2 || ss[0].Disks[0].Format != "qcow2" || ss[0].Disks[1].Format != "raw" {
		t.Fatalf("snapshots: %+v", ss)
	}
	first := ss[0]

	// Restore everything as raw: both disks come back byte for byte.
	out1 := filepath.Join(e.dir, "out1")
	e.ok("restore", "vm1@latest", "--to", out1)
	sameFile(t, filepath.Join(out1, "vm1-disk0.raw"), src0)
	sameFile(t, filepath.Join(out1, "vm1-disk1.raw"), raw)
	// Sparse: holes stay holes.
	var st1, st2 = statBlocks(t, filepath.Join(out1, "vm1-disk1.raw")), statBlocks(t, raw)
	if st1 > st2+int64(2<<20) {
		t.Errorf("restored raw uses %d bytes on disk, source %d: holes were filled", st1, st2)
	}
	// Restoring over existing files refuses without --overwrite.
	e.fails("--overwrite", "restore", "latest", "--to", out1)
	e.ok("restore", "latest", "--to", out1, "--overwrite")

	// One disk, by index, as qcow2.
	q := filepath.Join(e.dir, "one.qcow2")
	e.ok("restore", first.ID[:8], "--disk", "0", "--to", q)
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", q, src0).CombinedOutput(); err != nil {
		t.Fatalf("restored qcow2 differs: %v %s", err, out)
	}

	// Second backup after small changes reads everything but stores little.
	scribble(t, raw, 3, 10)
	e.ok("backup", "image", qcow, raw, "--name", "vm1")
	ss = e.snapshots("--name", "vm1")
	if len(ss) != 2 {
		t.Fatalf("%d snapshots", len(ss))
	}
	if n := ss[1].Stats.BytesNew; n > 10*256<<10+1<<20 {
		t.Errorf("second backup stored %d new bytes for 10 changed blocks", n)
	}
	out2 := filepath.Join(e.dir, "out2")
	e.ok("restore", "vm1@latest", "--to", out2, "--disk", "vm1-disk1")
	sameFile(t, filepath.Join(out2, "vm1-disk1.raw"), raw)

	// An older restore point is still complete.
	out3 := filepath.Join(e.dir, "out3")
	e.ok("restore", first.ID, "--to", out3, "--disk", "vm1-disk0")
	sameFile(t, filepath.Join(out3, "vm1-disk0.raw"), src0)

	if out := e.ok("verify", "--read-data"); !strings.Contains(out, "no problems found") {
		t.Fatalf("verify: %s", out)
	}
	var stats struct {
		Snapshots  int     `json:"snapshots"`
		DedupRatio float64 `json:"dedup_ratio"`
	}
	if err := json.Unmarshal([]byte(e.ok("stats", "--json")), &stats); err != nil || stats.Snapshots != 2 || stats.DedupRatio < 1.8 {
		t.Fatalf("stats: %+v %v", stats, err)
	}

	// Forget the older one and prune; the newer still restores.
	e.ok("forget", "--name", "vm1", "--keep-last", "1", "--prune")
	if ss := e.snapshots(); len(ss) != 1 {
		t.Fatalf("after forget: %d snapshots", len(ss))
	}
	out4 := filepath.Join(e.dir, "out4")
	e.ok("restore", "latest", "--to", out4)
	sameFile(t, filepath.Join(out4, "vm1-disk1.raw"), raw)
	sameFile(t, filepath.Join(out4, "vm1-disk0.raw"), src0)
	e.ok("verify", "--read-data")

	// Keys: a second password opens the repository.
	e2 := *e
	e.ok("key", "add", "--new-password-file", writeFile(t, e.dir, "pw2", "another one\n"))
	e2.pw = "another one"
	e2.ok("snapshots")
	var keys []map[string]any
	json.Unmarshal([]byte(e.ok("key", "list", "--json")), &keys)
	if len(keys) != 2 {
		t.Fatalf("key list: %v", keys)
	}
}

func writeFile(t *testing.T, dir, name, content string) string {
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func statBlocks(t *testing.T, p string) int64 {
	t.Helper()
	out, err := exec.Command("du", "-B1", p).Output()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	fmt.Sscan(string(out), &n)
	return n
}
