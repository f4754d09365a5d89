package guestfs

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

func buildImage(t testing.TB, name string) *fsImage {
	switch name {
	case "ext4", "ext2", "ext4-inline":
		return buildExt(t, name)
	case "xfs":
		return buildXFS(t)
	case "vfat", "fat12", "fat32":
		return buildFAT(t, name)
	case "ntfs":
		return buildNTFS(t)
	}
	t.Fatalf("unknown image %s", name)
	return nil
}

func buildExt(t testing.TB, name string) *fsImage {
	need(t, "mkfs.ext4", "debugfs")
	src, big := sourceTree(t, true)
	dir := t.TempDir()
	img := filepath.Join(dir, name+".img")
	truncate(t, img, 24<<20)
	args := []string{"-q", "-F", "-L", "kura-" + name, "-d", src, "-b", "1024", "-I", "256", "-E", "root_owner=0:0"}
	switch name {
	case "ext2":
		args = append(args, "-t", "ext2")
	case "ext4-inline":
		args = append(args, "-t", "ext4", "-O", "inline_data", "-b", "4096")
	default:
		args = append(args, "-t", "ext4")
	}
	run(t, nil, "mkfs.ext4", append(args, img)...)
	// Fragment free space: fill it with small files, delete every other,
	// then write the big files into the holes.
	bigDir := t.TempDir()
	var cmds strings.Builder
	filler := filepath.Join(bigDir, "filler")
	writeFile(t, filler, randBytes(3, 8192), 0o644)
	cmds.WriteString("mkdir /filler\n")
	for i := 0; i < 400; i++ {
		fmt.Fprintf(&cmds, "write %s /filler/%d\n", filler, i)
	}
	for i := 0; i < 400; i += 2 {
		fmt.Fprintf(&cmds, "rm /filler/%d\n", i)
	}
	for _, n := range sortedKeys(big) {
		writeFile(t, filepath.Join(bigDir, n), big[n], 0o644)
		fmt.Fprintf(&cmds, "write %s /%s\n", filepath.Join(bigDir, n), n)
	}
	for i := 1; i < 400; i += 2 {
		fmt.Fprintf(&cmds, "rm /filler/%d\n", i)
	}
	cmds.WriteString("rmdir /filler\n")
	cmdFile := filepath.Join(bigDir, "cmds")
	writeFile(t, cmdFile, []byte(cmds.String()), 0o644)
	run(t, nil, "debugfs", "-w", "-f", cmdFile, img)
	return &fsImage{fsType: "ext4", path: img, src: src, big: big, caps: caps{owners: true, modes: true, symlinks: true, hardlinks: true, fragmented: true}}
}

func sortedKeys(m map[string][]byte) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	sort.Strings(k)
	return k
}

// buildXFS uses a protofile (mkfs.xfs -p), which sets modes and owners but
// not times, hard links or holes; the big files span allocation groups.
func buildXFS(t testing.TB) *fsImage {
	need(t, "mkfs.xfs", "xfs_db")
	src, big := sourceTree(t, true)
	os.Remove(filepath.Join(src, "hardlink.txt"))
	os.Chmod(filepath.Join(src, "sticky"), 0o777) // protofiles have no sticky bit
	dir := t.TempDir()
	for n, b := range big {
		writeFile(t, filepath.Join(dir, n), b, 0o644)
	}
	var proto strings.Builder
	proto.WriteString("/dev/null\n0 0\nd--755 0 0\n")
	var walk func(host string, depth int)
	walk = func(host string, depth int) {
		ents, err := os.ReadDir(host)
		if err != nil {
			t.Fatal(err)
		}
		ind := strings.Repeat(" ", depth)
		for _, e := range ents {
			p := filepath.Join(host, e.Name())
			fi, err := os.Lstat(p)
			if err != nil {
				t.Fatal(err)
			}
			st := fi.Sys().(*syscallStat)
			m := fi.Mode()
			flags := "--"
			if m&os.ModeSetuid != 0 {
				flags = "u-"
			}
			perm := fmt.Sprintf("%03o", m.Perm())
			if m&os.ModeSticky != 0 {
				perm = "1" + perm
			}
			name := strings.ReplaceAll(e.Name(), " ", "_")
			if name != e.Name() {
				// protofile names cannot contain spaces; keep the UTF-8.
				os.Rename(p, filepath.Join(host, name))
				p = filepath.Join(host, name)
			}
			switch {
			case m.IsDir():
				fmt.Fprintf(&proto, "%s%s d%s%s %d %d\n", ind, name, flags, perm, st.Uid, st.Gid)
				walk(p, depth+1)
				fmt.Fprintf(&proto, "%s$\n", ind)
			case m&os.ModeSymlink != 0:
				target, _ := os.Readlink(p)
				fmt.Fprintf(&proto, "%s%s l%s%s %d %d %s\n", ind, name, flags, perm, st.Uid, st.Gid, target)
			default:
				fmt.Fprintf(&proto, "%s%s -%s%s %d %d %s\n", ind, name, flags, perm, st.Uid, st.Gid, p)
			}
		}
	}
	walk(src, 1)
	for _, n := range sortedKeys(big) {
		fmt.Fprintf(&proto, " %s ---644 0 0 %s\n", n, filepath.Join(dir, n))
	}
	proto.WriteString("$\n")
	pf := filepath.Join(dir, "proto")
	writeFile(t, pf, []byte(proto.String()), 0o644)
	img := filepath.Join(dir, "xfs.img")
	truncate(t, img, 64<<20)
	env := []string{"TEST_DIR=1", "TEST_DEV=1", "QA_CHECK_FS=1"}
	// Small allocation groups (16 MiB) so that the big files need several
	// extents.
	run(t, env, "mkfs.xfs", "-q", "-f", "-L", "kura-xfs", "-d", "agsize=16m", "-p", pf, img)
	return &fsImage{fsType: "xfs", path: img, src: src, big: big, caps: caps{owners: true, modes: true, symlinks: true, mtime: -1, noHardlinkSrc: true}}
}

func buildFAT(t testing.TB, name string) *fsImage {
	need(t, "mkfs.vfat", "mcopy", "mdel", "mmd", "mrd")
	src, big := sourceTree(t, false)
	dir := t.TempDir()
	img := filepath.Join(dir, name+".img")
	size, args := int64(16<<20), []string{"-F", "16", "-s", "4"}
	switch name {
	case "fat12":
		size, args = 12<<20, []string{"-F", "12", "-s", "8"}
	case "fat32":
		size, args = 40<<20, []string{"-F", "32", "-s", "1"}
	}
	truncate(t, img, size)
	run(t, nil, "mkfs.vfat", append(append(args, "-n", "KURAFAT"), img)...)
	// Mark one file read-only to check the mode mapping.
	os.Chmod(filepath.Join(src, "empty.txt"), 0o444)
	env := []string{"MTOOLS_SKIP_CHECK=1"}
	ents, _ := os.ReadDir(src)
	args = []string{"-i", img, "-s", "-m", "-Q"}
	for _, e := range ents {
		args = append(args, filepath.Join(src, e.Name()))
	}
	run(t, env, "mcopy", append(args, "::/")...)
	run(t, env, "mattrib", "-i", img, "+r", "::/empty.txt")
	// Fragment: fill with small files, delete every other, add big files.
	filler := filepath.Join(dir, "filler")
	writeFile(t, filler, randBytes(3, 8192), 0o644)
	run(t, env, "mmd", "-i", img, "::/filler")
	var fill []string
	for i := 0; i < 200; i++ {
		p := filepath.Join(dir, fmt.Sprintf("f%d", i))
		os.Link(filler, p)
		fill = append(fill, p)
	}
	run(t, env, "mcopy", append(append([]string{"-i", img}, fill...), "::/filler/")...)
	var del []string
	for i := 0; i < 200; i += 2 {
		del = append(del, fmt.Sprintf("::/filler/f%d", i))
	}
	run(t, env, "mdel", append([]string{"-i", img}, del...)...)
	for _, n := range sortedKeys(big) {
		p := filepath.Join(dir, n)
		writeFile(t, p, big[n], 0o644)
		run(t, env, "mcopy", "-i", img, p, "::/"+n)
	}
	run(t, env, "mdel", "-i", img, "::/filler/*")
	run(t, env, "mrd", "-i", img, "::/filler")
	// FAT32 allocates after the FSInfo next-free hint: no fragmentation.
	return &fsImage{fsType: "vfat", path: img, src: src, big: big, caps: caps{mtime: 2 * time.Second, fragmented: name != "fat32"}}
}

// buildNTFS formats with mkntfs and fills the volume through an ntfs-3g
// FUSE mount (falling back to the test being skipped without FUSE).
func buildNTFS(t testing.TB) *fsImage {
	need(t, "mkntfs", "ntfs-3g", "fusermount")
	src, big := sourceTree(t, true)
	dir := t.TempDir()
	img := filepath.Join(dir, "ntfs.img")
	truncate(t, img, 24<<20)
	run(t, nil, "mkntfs", "-q", "-F", "-Q", "-L", "KuraNTFS", "-c", "4096", img)
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("ntfs-3g", "-o", "no_def_opts", img, mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount NTFS with ntfs-3g (FUSE unavailable?): %v: %s", err, out)
	}
	defer exec.Command("fusermount", "-u", mnt).Run()
	run(t, nil, "cp", "-R", "-P", "--preserve=timestamps,links", src+"/.", mnt)
	// Fragment free space: fill it with small files, delete every other,
	// then write the big files, appending to both in turn.
	os.Mkdir(filepath.Join(mnt, "filler"), 0o755)
	for i := 0; i < 300; i++ {
		if err := os.WriteFile(filepath.Join(mnt, "filler", fmt.Sprint(i)), randBytes(3, 8192), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 300; i += 2 {
		os.Remove(filepath.Join(mnt, "filler", fmt.Sprint(i)))
	}
	f1, err := os.Create(filepath.Join(mnt, "big1.bin"))
	if err != nil {
		t.Fatal(err)
	}
	f2, err := os.Create(filepath.Join(mnt, "big2.bin"))
	if err != nil {
		t.Fatal(err)
	}
	b1, b2 := big["big1.bin"], big["big2.bin"]
	const chunk = 64 << 10
	for off := 0; off < len(b1) || off < len(b2); off += chunk {
		for _, p := range []struct {
			f *os.File
			b []byte
		}{{f1, b1}, {f2, b2}} {
			if off < len(p.b) {
				if _, err := p.f.Write(p.b[off:min(off+chunk, len(p.b))]); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	f1.Close()
	f2.Close()
	if err := os.RemoveAll(filepath.Join(mnt, "filler")); err != nil {
		t.Fatal(err)
	}
	// cp -a set times before the big files changed the root directory.
	os.Chtimes(mnt, testTime, testTime)
	run(t, nil, "fusermount", "-u", mnt)
	return &fsImage{fsType: "ntfs", path: img, src: src, big: big, caps: caps{symlinks: true, hardlinks: true, fragmented: true}}
}

// Disk layouts: the filesystem images placed on partitioned disks.

type placed struct {
	img  *fsImage
	name string // expected volume name
}

// mbrDisk builds an MBR disk with primary partitions p1.. for primaries
// and logical partitions p5.. in an extended partition for logicals.
func mbrDisk(t testing.TB, primaries, logicals []*fsImage) (string, []placed) {
	need(t, "sfdisk")
	disk := filepath.Join(t.TempDir(), "mbr.img")
	const mib = 1 << 20
	var script strings.Builder
	script.WriteString("label: dos\n")
	pos := int64(1 * mib)
	var out []placed
	type at struct {
		img *fsImage
		off int64
	}
	var places []at
	for i, img := range primaries {
		n := (fileSize(t, img.path) + mib - 1) / mib * mib
		fmt.Fprintf(&script, "start=%d, size=%d, type=83\n", pos/512, n/512)
		places = append(places, at{img, pos})
		out = append(out, placed{img, fmt.Sprintf("p%d", i+1)})
		pos += n
	}
	if len(logicals) > 0 {
		var total int64
		for _, img := range logicals {
			total += (fileSize(t, img.path)+mib-1)/mib*mib + mib
		}
		fmt.Fprintf(&script, "start=%d, size=%d, type=5\n", pos/512, total/512)
		lpos := pos
		for i, img := range logicals {
			n := (fileSize(t, img.path) + mib - 1) / mib * mib
			lpos += mib // room for the EBR
			fmt.Fprintf(&script, "start=%d, size=%d, type=83\n", lpos/512, n/512)
			places = append(places, at{img, lpos})
			out = append(out, placed{img, fmt.Sprintf("p%d", 5+i)})
			lpos += n
		}
		pos += total
	}
	truncate(t, disk, pos+mib)
	cmd := exec.Command("sfdisk", "-q", disk)
	cmd.Stdin = strings.NewReader(script.String())
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s\n%s", err, b, script.String())
	}
	for _, p := range places {
		copyInto(t, disk, p.off, p.img.path)
	}
	return disk, out
}

func gptDisk(t testing.TB, imgs []*fsImage) (string, []placed) {
	need(t, "sgdisk")
	disk := filepath.Join(t.TempDir(), "gpt.img")
	const mib = 1 << 20
	var total int64 = 2 * mib
	for _, img := range imgs {
		total += (fileSize(t, img.path) + mib - 1) / mib * mib
	}
	truncate(t, disk, total+mib)
	args := []string{}
	pos := int64(mib)
	var out []placed
	var offs []int64
	for i, img := range imgs {
		n := (fileSize(t, img.path) + mib - 1) / mib * mib
		args = append(args, "-n", fmt.Sprintf("%d:%d:%d", i+1, pos/512, (pos+n)/512-1))
		offs = append(offs, pos)
		out = append(out, placed{img, fmt.Sprintf("p%d", i+1)})
		pos += n
	}
	run(t, nil, "sgdisk", append(args, disk)...)
	for i, img := range imgs {
		copyInto(t, disk, offs[i], img.path)
	}
	return disk, out
}

const lvmConfig = `devices{filter=["a|^/dev/loop|","r|.*|"]} backup{backup=0 archive=0} global{activation=0} activation{udev_sync=0 udev_rules=0}`

// lvmDisk makes the whole disk an LVM PV with one linear LV per image. The
// first image's LV is built from two non-adjacent segments. The kernel has
// no device-mapper: LVs are created inactive and the images are written at
// the offsets LVM reports.
func lvmDisk(t testing.TB, imgs []*fsImage) (string, []placed) {
	need(t, "pvcreate", "losetup")
	if os.Geteuid() != 0 {
		t.Skip("LVM tests need root (losetup)")
	}
	disk := filepath.Join(t.TempDir(), "lvm.img")
	var total int64 = 64 << 20
	for _, img := range imgs {
		total += fileSize(t, img.path) + 8<<20
	}
	truncate(t, disk, total)
	out, err := exec.Command("losetup", "-f", "--show", disk).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	defer exec.Command("losetup", "-d", loop).Run()
	vg := fmt.Sprintf("kuratest%d", os.Getpid())
	env := []string{"LVM_SUPPRESS_FD_WARNINGS=1"}
	lvm := func(args ...string) string {
		return run(t, env, args[0], append([]string{"--config", lvmConfig}, args[1:]...)...)
	}
	lvm("pvcreate", "-y", "-ff", loop)
	lvm("vgcreate", "-s", "4M", vg, loop)
	mb := func(img *fsImage) int64 { return (fileSize(t, img.path) + 4<<20 - 1) / (4 << 20) * 4 }
	var res []placed
	for i, img := range imgs {
		name := fmt.Sprintf("lv%d", i)
		size := mb(img)
		if i == 0 {
			size = 8 // first segment; extended after the others
		}
		lvm("lvcreate", "-an", "-Zn", "-y", "-L", fmt.Sprintf("%dM", size), "-n", name, vg)
		res = append(res, placed{img, vg + "/" + name})
	}
	lvm("lvextend", "-y", "-L", fmt.Sprintf("%dM", mb(imgs[0])), vg+"/lv0")
	peStart, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(lvm("pvs", "--noheadings", "-o", "pe_start", "--units", "b", loop)), "B"), 10, 64)
	const extent = 4 << 20
	segsOut := lvm("lvs", "--noheadings", "-o", "lv_name,seg_pe_ranges", vg)
	segs := map[string][][2]int64{}
	for _, line := range strings.Split(segsOut, "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		r := f[1][strings.LastIndexByte(f[1], ':')+1:]
		a, b, _ := strings.Cut(r, "-")
		from, _ := strconv.ParseInt(a, 10, 64)
		to, _ := strconv.ParseInt(b, 10, 64)
		segs[f[0]] = append(segs[f[0]], [2]int64{from, to})
	}
	if len(imgs) > 1 && len(segs["lv0"]) < 2 {
		t.Fatalf("lv0 should have two segments: %q", segsOut)
	}
	// Write each image segment by segment.
	tmp := t.TempDir()
	for i, img := range imgs {
		data, err := os.ReadFile(img.path)
		if err != nil {
			t.Fatal(err)
		}
		var lpos int64
		for j, s := range segs[fmt.Sprintf("lv%d", i)] {
			n := (s[1] - s[0] + 1) * extent
			part := data[min(lpos, int64(len(data))):min(lpos+n, int64(len(data)))]
			pf := filepath.Join(tmp, fmt.Sprintf("%d-%d", i, j))
			writeFile(t, pf, part, 0o644)
			copyInto(t, disk, peStart+s[0]*extent, pf)
			lpos += n
		}
	}
	return disk, res
}
