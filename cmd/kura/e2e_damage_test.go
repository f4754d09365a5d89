package main

// The damage suite: every kind of stored object (pack data, pack header,
// index, snapshot, key, config), damaged, truncated and missing. For each:
// what verify and verify --read-data report, what restore does with and
// without --ignore-damage, what the next backup does, and that after
// healing or repair every restore point whose data still exists restores
// byte for byte.

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// damageRepo is a repository with two restore points of two unrelated
// images, and the objects the first backup (vm1) wrote.
type damageRepo struct {
	*env
	img1, img2 string
	vm1Packs   []string // pack files written by vm1's backup
	vm1Index   string   // vm1's index file
	vm1Snap    string   // vm1's snapshot file
}

// objects lists the files under dir of the repository.
func (e *env) objects(dir string) []string {
	e.t.Helper()
	var out []string
	filepath.WalkDir(filepath.Join(e.repo, dir), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && !strings.HasPrefix(d.Name(), ".tmp-") {
			out = append(out, p)
		}
		return nil
	})
	sort.Strings(out)
	return out
}

func newDamageRepo(t *testing.T, img1, img2 string) *damageRepo {
	e := newEnv(t)
	e.ok("init")
	d := &damageRepo{env: e, img1: img1, img2: img2}
	e.ok("backup", "image", img1, "--name", "vm1")
	d.vm1Packs = e.objects("data")
	d.vm1Index = e.objects("index")[0]
	d.vm1Snap = e.objects("snapshots")[0]
	e.ok("backup", "image", img2, "--name", "vm2")
	return d
}

// damage applies how ("damaged": one byte flipped at off, counted from the
// end when negative; "truncated": cut to half; "missing": removed) to path.
func damage(t *testing.T, path, how string, off int) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	switch how {
	case "damaged":
		if off < 0 {
			off += len(data)
		}
		data[off] ^= 0x20
	case "truncated":
		data = data[:len(data)/2]
	case "missing":
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		return
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// restoreAll restores every restore point and compares it with the image
// it was taken from (found by the disk's name).
func (d *damageRepo) restoreAll(t *testing.T) {
	t.Helper()
	src := map[string]string{"vm1": d.img1, "vm2": d.img2}
	for _, s := range d.snapshots() {
		out := filepath.Join(t.TempDir(), s.ID[:8])
		d.ok("restore", s.ID, "--to", out)
		sameFile(t, filepath.Join(out, s.Disks[0].Name+".raw"), src[s.Name])
	}
}

// verify runs verify with args and checks its exit status (0 or 3) and
// that its output mentions want.
func (d *damageRepo) verify(t *testing.T, code int, want string, args ...string) string {
	t.Helper()
	r := d.run(append([]string{"verify"}, args...)...)
	if r.code != code || !strings.Contains(r.stdout, want) {
		t.Fatalf("verify %v: exit %d (want %d), output lacks %q:\n%s%s", args, r.code, code, want, r.stdout, r.stderr)
	}
	return r.stdout
}

var damagedRange = regexp.MustCompile(`damaged: disk (\S+) bytes (\d+)-(\d+)`)

// restoreIgnoringDamage restores vm1's first restore point with
// --ignore-damage and checks that every byte outside the listed damaged
// ranges is the image's, and every byte inside them is zero.
func (d *damageRepo) restoreIgnoringDamage(t *testing.T, snap string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "partial")
	r := d.run("restore", snap, "--to", out, "--ignore-damage")
	if r.code != 3 {
		t.Fatalf("restore --ignore-damage: exit %d, want 3\n%s%s", r.code, r.stdout, r.stderr)
	}
	got, err := os.ReadFile(filepath.Join(out, "vm1.raw"))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(d.img1)
	ms := damagedRange.FindAllStringSubmatch(r.stdout, -1)
	if len(ms) == 0 {
		t.Fatalf("restore --ignore-damage lists no damaged range:\n%s", r.stdout)
	}
	for _, m := range ms {
		a, _ := strconv.Atoi(m[2])
		b, _ := strconv.Atoi(m[3])
		if !bytes.Equal(got[a:b+1], make([]byte, b+1-a)) {
			t.Fatalf("damaged range %d-%d is not zeros", a, b)
		}
		copy(want[a:b+1], make([]byte, b+1-a))
	}
	if !bytes.Equal(got, want) {
		t.Fatal("bytes outside the damaged ranges differ from the image")
	}
}

func TestDamageSuite(t *testing.T) {
	dir := t.TempDir()
	img1, img2 := filepath.Join(dir, "vm1.raw"), filepath.Join(dir, "vm2.raw")
	makeImage(t, img1, 24<<20, 11, 10)
	makeImage(t, img2, 24<<20, 12, 10)

	// Pack data: the chunk's copy is damaged or gone. Restore fails
	// cleanly, or with --ignore-damage restores the rest; the next backup
	// stores the lost chunks again, which heals the old restore point;
	// prune removes the damaged copy.
	for _, how := range []string{"damaged", "truncated", "missing"} {
		t.Run("pack data "+how, func(t *testing.T) {
			t.Parallel()
			d := newDamageRepo(t, img1, img2)
			first := d.snapshots("--name", "vm1")[0].ID
			damage(t, d.vm1Packs[0], how, 200)
			if how == "damaged" {
				d.verify(t, 0, "no problems found") // the structure is whole
				d.verify(t, 3, "affects snapshots: "+first[:8], "--read-data")
			} else {
				d.verify(t, 3, "pack")
			}
			d.fails("--ignore-damage", "restore", first, "--to", t.TempDir())
			d.restoreIgnoringDamage(t, first)
			if out := d.ok("backup", "image", img1, "--name", "vm1"); strings.Contains(out, " 0 new chunks") {
				t.Fatalf("the backup after the damage stored nothing anew:\n%s", out)
			}
			d.restoreAll(t) // the first restore point is healed
			d.ok("prune")
			d.verify(t, 0, "no problems found", "--read-data")
			if n := len(d.objects("damage")); n != 0 {
				t.Errorf("%d damage records left after prune removed the damaged copies", n)
			}
			d.restoreAll(t)
		})
	}

	// Pack header: the tag or the length field. The chunks are intact and
	// read through the index; --read-data finds the header, and prune
	// moves the chunks to a pack with a good header.
	for _, c := range []struct {
		name string
		off  int
	}{{"tag damaged", -6}, {"length damaged", -2}} {
		t.Run("pack header "+c.name, func(t *testing.T) {
			t.Parallel()
			d := newDamageRepo(t, img1, img2)
			damage(t, d.vm1Packs[0], "damaged", c.off)
			d.verify(t, 0, "no problems found")
			d.verify(t, 3, "header", "--read-data")
			d.restoreAll(t)
			d.ok("backup", "image", img1, "--name", "vm1")
			if out := d.ok("repair", "index"); !strings.Contains(out, "kept from the old index") {
				t.Fatalf("repair index did not keep the unreadable pack's entries:\n%s", out)
			}
			d.restoreAll(t)
			d.ok("prune")
			d.verify(t, 0, "no problems found", "--read-data")
			d.restoreAll(t)
		})
	}

	// Index: readers fall back to the pack headers; prune keeps the packs;
	// repair index rebuilds it.
	for _, how := range []string{"damaged", "truncated", "missing"} {
		t.Run("index "+how, func(t *testing.T) {
			t.Parallel()
			d := newDamageRepo(t, img1, img2)
			damage(t, d.vm1Index, how, 60)
			out := d.verify(t, 3, "kura repair index")
			if strings.Contains(out, "harmless") {
				t.Fatalf("verify calls packs whose index was lost harmless:\n%s", out)
			}
			d.restoreAll(t)
			d.ok("backup", "image", img1, "--name", "vm1")
			d.ok("prune")
			d.restoreAll(t) // prune deleted none of the packs the index lost
			d.ok("repair", "index")
			d.verify(t, 0, "no problems found", "--read-data")
			d.restoreAll(t)
		})
	}

	// Snapshot: a damaged one is named and left out; prune refuses to run
	// without knowing what it references; forget removes it.
	for _, how := range []string{"damaged", "truncated", "missing"} {
		t.Run("snapshot "+how, func(t *testing.T) {
			t.Parallel()
			d := newDamageRepo(t, img1, img2)
			id := filepath.Base(d.vm1Snap)
			damage(t, d.vm1Snap, how, 40)
			if how == "missing" {
				d.verify(t, 0, "no problems found", "--read-data")
			} else {
				d.verify(t, 3, "snapshots/"+id, "--read-data")
				d.fails("refuses", "prune")
				d.fails("damaged", "restore", "vm1@latest", "--to", t.TempDir())
				d.ok("forget", id[:8])
			}
			d.restoreAll(t)
			d.ok("backup", "image", img1, "--name", "vm1")
			d.ok("prune")
			d.verify(t, 0, "no problems found", "--read-data")
			d.restoreAll(t)
		})
	}

	// Key: with a second password the repository still opens; verify names
	// the damaged key file, which `key remove` then removes.
	for _, how := range []string{"damaged", "truncated", "missing"} {
		t.Run("key "+how, func(t *testing.T) {
			t.Parallel()
			d := newDamageRepo(t, img1, img2)
			keys := d.objects("keys")
			d.ok("key", "add", "--new-password-file", writeFile(t, d.dir, "pw2", "second password\n"))
			damage(t, keys[0], how, 30)
			d.fails("wrong password", "snapshots")
			d2 := &damageRepo{env: &env{t: t, repo: d.repo, dir: d.dir, pw: "second password"}, img1: img1, img2: img2}
			if how == "missing" {
				d2.verify(t, 0, "no problems found", "--read-data")
			} else {
				d2.verify(t, 3, "keys/", "--read-data")
				d2.ok("key", "remove", filepath.Base(keys[0])[:8])
				d2.verify(t, 0, "no problems found", "--read-data")
			}
			d2.ok("backup", "image", img1, "--name", "vm1")
			d2.restoreAll(t)
		})
	}

	// Config: nothing opens the repository, with a one-line error, and
	// nothing is written; with the config back every restore point
	// restores.
	for _, c := range []struct{ how, want string }{
		{"damaged", "config"}, {"truncated", "config is damaged"}, {"missing", "kura init"},
	} {
		t.Run("config "+c.how, func(t *testing.T) {
			t.Parallel()
			d := newDamageRepo(t, img1, img2)
			cfg := filepath.Join(d.repo, "config")
			saved, _ := os.ReadFile(cfg)
			before := d.objects("")
			// In the JSON's "id" value: still JSON, but the MAC fails.
			off := bytes.Index(saved, []byte(`"id": "`)) + 8
			damage(t, cfg, c.how, off)
			d.fails(c.want, "snapshots")
			d.fails(c.want, "backup", "image", img1, "--name", "vm1")
			d.fails(c.want, "restore", "latest", "--to", t.TempDir())
			d.fails(c.want, "verify", "--read-data")
			d.fails(c.want, "prune")
			after := d.objects("")
			if c.how == "missing" {
				after = append(after, cfg)
				sort.Strings(after)
			}
			if strings.Join(before, "\n") != strings.Join(after, "\n") {
				t.Fatalf("objects changed while the config was %s", c.how)
			}
			os.WriteFile(cfg, saved, 0o600)
			d.verify(t, 0, "no problems found", "--read-data")
			d.restoreAll(t)
		})
	}
}

// The header's length field is the last 4 bytes of a pack: make sure the
// offsets the suite flips are where the format says.
func TestPackTrailerLayout(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.dir, "d.raw")
	makeImage(t, img, 8<<20, 1, 3)
	e.ok("init")
	e.ok("backup", "image", img, "--name", "d")
	p := e.objects("data")[0]
	data, _ := os.ReadFile(p)
	hlen := binary.LittleEndian.Uint32(data[len(data)-4:])
	if hlen < 28 || int(hlen) > len(data)-4 {
		t.Fatalf("pack trailer gives header length %d for %d bytes", hlen, len(data))
	}
}
