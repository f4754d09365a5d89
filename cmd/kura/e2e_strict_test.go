package main

// Strictness (issue 23): input that could select, delete or print the
// wrong thing is refused with a one-line error that says what is valid.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend/local"
	"github.com/kura-backup/kura/internal/repo"
)

// A half-written selector selects nothing: `kura forget web@` used to
// forget web's newest restore point.
func TestSelectorForms(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 4<<20, 3, 4)
	e.ok("init")
	e.ok("backup", "image", img, "--name", "web")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"forget", "web@"}, "nothing after @"},
		{[]string{"forget", "@latest"}, "no name before @"},
		{[]string{"forget", "web@yesterday"}, "not a local date or time"},
		{[]string{"restore", "web@", "--to", e.dir + "/r"}, "nothing after @"},
		{[]string{"files", "ls", "web@"}, "nothing after @"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			w := *e
			w.t = t
			r := w.fails(tc.want, tc.args...)
			for _, form := range []string{"NAME@latest", "NAME@2026-11-20", "id prefix", "latest"} {
				if !strings.Contains(r.stderr, form) {
					t.Errorf("error %q does not name the form %s", r.stderr, form)
				}
			}
		})
	}
	if ss := e.snapshots(); len(ss) != 1 {
		t.Fatalf("%d snapshots after the refused forgets, want 1", len(ss))
	}
	e.ok("forget", "web@latest")
	if ss := e.snapshots(); len(ss) != 0 {
		t.Fatalf("%d snapshots after forget web@latest, want 0", len(ss))
	}
}

// Restore point names are checked when a backup is made.
func TestBackupNames(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 4<<20, 4, 2)
	odd := filepath.Join(e.dir, "disk@2.raw")
	makeImage(t, odd, 4<<20, 4, 2)
	e.ok("init")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"backup", "image", img, "--name", "a@b"}, `holds '@'`},
		{[]string{"backup", "image", img, "--name", "a/b"}, `holds '/'`},
		{[]string{"backup", "image", img, "--name", "two\nlines"}, `holds '\n'`},
		{[]string{"backup", "image", img, "--name", "\x1b[31mred"}, `"\x1b[31mred"`},
		{[]string{"backup", "image", odd}, `"disk@2"`}, // the default name, from the file name
		{[]string{"backup", "qmp", "--socket", "/nonexistent", "--name", "x@y"}, `holds '@'`},
	} {
		t.Run(strings.Join(tc.args[2:], " "), func(t *testing.T) {
			w := *e
			w.t = t
			r := w.fails(tc.want, tc.args...)
			if !strings.Contains(r.stderr, "--name") || !strings.Contains(r.stderr, "letters, digits") {
				t.Errorf("error %q does not say what is allowed and how to pass --name", r.stderr)
			}
		})
	}
	if ss := e.snapshots(); len(ss) != 0 {
		t.Fatalf("%d snapshots after refused names, want 0", len(ss))
	}
	e.ok("backup", "image", img, "--name", "Windows Server 2022:web-01.example_a+b")
	e.ok("restore", "Windows Server 2022:web-01.example_a+b@latest", "--to", filepath.Join(e.dir, "r"))
}

// Sizes are read whole, with their units: --chunk-size 1MB used to be 1.
func TestSizeFlags(t *testing.T) {
	for _, tc := range []struct {
		value, want string // want: error text, or the chunk size printed
		ok          bool
	}{
		{"1MB", "use a power of two from 64KiB to 16MiB", false},
		{"1MBx", `unknown unit "MBx"`, false},
		{"1 furlong", "unknown unit", false},
		{"0", "use a power of two", false},
		{"-256K", "negative", false},
		{"32M", "use a power of two", false},
		{"1MiB", "chunk size 1.0 MiB", true},
		{"512k", "chunk size 512.0 KiB", true},
	} {
		t.Run(tc.value, func(t *testing.T) {
			e := newEnv(t)
			if !tc.ok {
				r := e.fails(tc.want, "init", "--chunk-size", tc.value)
				if !strings.Contains(r.stderr, "--chunk-size") {
					t.Errorf("error %q does not name the flag", r.stderr)
				}
				if _, err := os.Stat(e.repo); err == nil {
					t.Errorf("a refused init left %s", e.repo)
				}
				return
			}
			if out := e.ok("init", "--chunk-size", tc.value); !strings.Contains(out, tc.want) {
				t.Errorf("init --chunk-size %s said %q, want %q", tc.value, out, tc.want)
			}
		})
	}
}

// --pack-size takes any size from 4 MiB to 128 MiB (a power of two or
// not), is recorded in the config, and the packs a backup writes follow it.
func TestPackSizeFlag(t *testing.T) {
	for _, tc := range []struct{ value, want string }{
		{"3M", "use a size from 4MiB to 128MiB"},
		{"129MiB", "use a size from 4MiB to 128MiB"},
		{"1G", "use a size from 4MiB to 128MiB"},
		{"16 furlongs", "unknown unit"},
		{"-16M", "negative"},
	} {
		t.Run(tc.value, func(t *testing.T) {
			e := newEnv(t)
			r := e.fails(tc.want, "init", "--pack-size", tc.value)
			if !strings.Contains(r.stderr, "--pack-size") {
				t.Errorf("error %q does not name the flag", r.stderr)
			}
			if _, err := os.Stat(e.repo); err == nil {
				t.Errorf("a refused init left %s", e.repo)
			}
		})
	}
	for _, tc := range []struct {
		value, want string
		bytes       int
	}{
		{"", "pack size 16.0 MiB", 16 << 20},
		{"4M", "pack size 4.0 MiB", 4 << 20},
		{"48MiB", "pack size 48.0 MiB", 48 << 20},
		{"128M", "pack size 128.0 MiB", 128 << 20},
	} {
		t.Run("ok-"+tc.value, func(t *testing.T) {
			e := newEnv(t)
			args := []string{"init"}
			if tc.value != "" {
				args = append(args, "--pack-size", tc.value)
			}
			if out := e.ok(args...); !strings.Contains(out, tc.want) {
				t.Errorf("init %v said %q, want %q", args, out, tc.want)
			}
			data, err := os.ReadFile(filepath.Join(e.repo, "config"))
			if err != nil {
				t.Fatal(err)
			}
			var cfg struct {
				PackSize int `json:"pack_size"`
			}
			if err := json.Unmarshal(data, &cfg); err != nil {
				t.Fatal(err)
			}
			if cfg.PackSize != tc.bytes {
				t.Errorf("config pack_size %d, want %d", cfg.PackSize, tc.bytes)
			}
		})
	}
	// 12 MiB of incompressible data in 4 MiB packs: at least three packs,
	// none much above the target (a pack closes at the first chunk past it).
	e := newEnv(t)
	e.ok("init", "--pack-size", "4M")
	img := filepath.Join(e.dir, "disk.raw")
	data := make([]byte, 12<<20)
	rand.NewChaCha8([32]byte{7}).Read(data)
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	e.ok("backup", "image", img, "--name", "vm")
	var packs int
	err := filepath.WalkDir(filepath.Join(e.repo, "data"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		st, err := d.Info()
		if err != nil {
			return err
		}
		if st.Size() > 4<<20+512<<10 {
			t.Errorf("pack %s has %d bytes, want at most the target plus one chunk", p, st.Size())
		}
		packs++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if packs < 3 {
		t.Errorf("%d packs for 12 MiB in 4 MiB packs, want at least 3", packs)
	}
	e.ok("restore", "vm@latest", "--to", filepath.Join(e.dir, "r"))
	out, err := filepath.Glob(filepath.Join(e.dir, "r", "*"))
	if err != nil || len(out) != 1 {
		t.Fatalf("restore wrote %v (%v), want one file", out, err)
	}
	sameFile(t, img, out[0])
}

// Numbers that mean nothing are refused, naming the flag and its range,
// before anything is done.
func TestNumericFlagRanges(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 4<<20, 6, 3)
	e.ok("init")
	e.ok("backup", "image", img, "--name", "vm")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"forget", "--keep-last", "-1"}, "--keep-last -1: use 1 to 1000000"},
		{[]string{"forget", "--keep-last", "0"}, "--keep-last 0: use 1 to 1000000"},
		{[]string{"forget", "--keep-daily", "-3"}, "--keep-daily -3: use 1 to"},
		{[]string{"forget", "--keep-yearly", "-1", "--keep-last", "2"}, "--keep-yearly -1"},
		{[]string{"backup", "image", img, "--workers", "0"}, "--workers 0: use 1 to 1024 (leave it out for 2 per CPU)"},
		{[]string{"backup", "image", img, "--workers", "-3"}, "--workers -3: use 1 to 1024"},
		{[]string{"backup", "vm", "--all", "--parallel", "0"}, "--parallel 0: use 1 to 256"},
		{[]string{"backup", "vm", "--all", "--workers", "-1"}, "--workers -1"},
		{[]string{"backup", "vm", "--all", "--freeze-timeout", "-5s"}, "--freeze-timeout -5s: use 1s to 1h"},
		{[]string{"backup", "qmp", "--freeze-timeout", "0s", "--socket", "x", "--name", "y"}, "--freeze-timeout 0s"},
		{[]string{"restore", "latest", "--to", e.dir + "/r", "--workers", "0"}, "--workers 0"},
		{[]string{"verify", "--boot", "latest", "--timeout", "-1m"}, "--timeout -1m0s: use 1s to 24h"},
		{[]string{"instant", "latest", "--wait-agent", "0s"}, "--wait-agent 0s: use 1s to 24h"},
		{[]string{"prune", "--repack-below", "1.5"}, "--repack-below 1.5: use 0 to 1"},
		{[]string{"prune", "--repack-below", "-0.1"}, "--repack-below -0.1"},
		{[]string{"export", "latest", "--cache", "0"}, "--cache 0: use 1 to 1048576 (MiB per disk)"},
		{[]string{"runs", "--limit", "0"}, "--limit 0: use 1 to"},
		{[]string{"runs", "--run", "-4"}, "--run -4"},
		{[]string{"runs", "--throttle", "--since", "-1h"}, "--since -1h0m0s"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			w := *e
			w.t = t
			w.fails(tc.want, tc.args...)
		})
	}
	if ss := e.snapshots(); len(ss) != 1 {
		t.Fatalf("%d snapshots after refused commands, want 1", len(ss))
	}
}

// What a killed kura leaves behind goes without `kura unlock`: its lock
// with the next command that takes one, its temporary files with the
// next prune.
func TestCleanupAfterKilledProcess(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 64<<20, 8, 200)
	e.ok("init")
	lockFiles := func() []string { // not the temporary files of locks being saved
		m, _ := filepath.Glob(filepath.Join(e.repo, "locks", "[0-9a-f]*"))
		return m
	}
	// Kill a backup once it holds its lock.
	c := e.cmd("backup", "image", img, "--name", "vm", "--limit-read", "4MiB")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for len(lockFiles()) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	c.Process.Signal(syscall.SIGKILL)
	c.Wait()
	if len(lockFiles()) == 0 {
		t.Fatal("the backup took no lock within 20s")
	}
	e.ok("verify")
	if m := lockFiles(); len(m) != 0 {
		t.Fatalf("lock files left after the next verify: %v", m)
	}

	// A temporary file whose writer (on this host) is gone.
	host, _ := os.Hostname()
	h := sha256.Sum256([]byte(host))
	dir := filepath.Join(e.repo, "data", "00")
	os.MkdirAll(dir, 0o700)
	tmp := filepath.Join(dir, fmt.Sprintf(".tmp-%s-%d-deadbeef", hex.EncodeToString(h[:4]), c.Process.Pid))
	if err := os.WriteFile(tmp, make([]byte, 25<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	// (The killed backup may have left temporary files of its own.)
	if out := e.ok("prune"); !strings.Contains(out, "temporary files left by processes that died removed") {
		t.Errorf("prune said %q, want it to count the temporary files removed", out)
	}
	filepath.WalkDir(e.repo, func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.HasPrefix(d.Name(), ".tmp-") {
			t.Errorf("temporary file %s still there after prune", p)
		}
		return nil
	})
	e.ok("verify", "--read-data")
}

// A repository written before names were checked may hold names with
// newlines and escape sequences: the CLI prints them escaped, never raw,
// and they can still be selected.
func TestOddNamesPrintedEscaped(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "disk.raw")
	makeImage(t, img, 4<<20, 9, 3)
	e.ok("init")
	e.ok("backup", "image", img, "--name", "plain")
	// Rewrite the restore point as an older kura could have saved it.
	ctx := context.Background()
	be, err := local.Open(e.repo)
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Open(ctx, be, []byte(e.pw))
	if err != nil {
		t.Fatal(err)
	}
	ss, err := r.Snapshots(ctx)
	if err != nil || len(ss) != 1 {
		t.Fatalf("snapshots: %v %v", ss, err)
	}
	const evil = "evil\n\x1b[31mFORGED@x"
	odd := *ss[0]
	odd.Name, odd.Hostname = evil, "host\x1b]0;title\x07"
	if _, err := r.SaveSnapshot(ctx, &odd); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"snapshots"},
		{"forget", "--keep-last", "1", "--dry-run"},
		{"forget", "--keep-last", "5", "--dry-run"},
		{"restore", evil + "@latest", "--to", filepath.Join(e.dir, "r")},
	} {
		out := e.ok(args...)
		if strings.ContainsAny(out, "\x1b\x07") || strings.Contains(out, "\nFORGED") || strings.Contains(out, "evil\n") {
			t.Errorf("kura %s printed a name raw:\n%s", strings.Join(args, " "), out)
		}
		if args[0] != "restore" && !strings.Contains(out, `"evil\n\x1b[31mFORGED@x"`) {
			t.Errorf("kura %s does not show the name escaped:\n%s", strings.Join(args, " "), out)
		}
	}
	r2 := e.run("restore", evil+"@2099", "--to", filepath.Join(e.dir, "r2"))
	if r2.code == 0 || strings.ContainsAny(r2.stderr, "\x1b") || strings.Count(strings.TrimSpace(r2.stderr), "\n") > 0 {
		t.Errorf("error about an odd name is not one escaped line: exit %d %q", r2.code, r2.stderr)
	}
}
