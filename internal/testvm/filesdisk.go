package testvm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BuildWindowsDisk writes a raw GPT disk image at path with the
// filesystems Windows guests use, each holding a copy of the host
// directory src: p1 is vfat (an EFI system partition's filesystem, 40 MiB)
// and p2 is NTFS (64 MiB). The guest never mounts them; they are data for
// file-level restore tests. It needs dosfstools, mtools, ntfs-3g (and
// FUSE for its mount) and fdisk.
func BuildWindowsDisk(ctx context.Context, path, src string) error {
	const (
		mib      = 1 << 20
		p1Start  = 1 * mib
		p1Size   = 40 * mib
		p2Start  = p1Start + p1Size
		p2Size   = 64 * mib
		diskSize = p2Start + p2Size + mib
	)
	for _, tool := range []string{"mkfs.vfat", "mcopy", "mkntfs", "ntfs-3g", "sfdisk"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not installed (apt-get install dosfstools mtools ntfs-3g fdisk): %w", tool, err)
		}
	}
	work, err := os.MkdirTemp("", "kura-windisk-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	fat := filepath.Join(work, "fat.img")
	if err := sparseFile(fat, p1Size); err != nil {
		return err
	}
	if _, err := runCmd(ctx, "mkfs.vfat", "-F", "32", "-n", "KURAFAT", fat); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	var names []string
	for _, e := range ents {
		names = append(names, filepath.Join(src, e.Name()))
	}
	if len(names) > 0 {
		args := append([]string{"-i", fat, "-s", "-m", "-Q"}, names...)
		if _, err := runCmd(ctx, "mcopy", append(args, "::/")...); err != nil {
			return err
		}
	}

	ntfs := filepath.Join(work, "ntfs.img")
	if err := sparseFile(ntfs, p2Size); err != nil {
		return err
	}
	if _, err := runCmd(ctx, "mkntfs", "-q", "-F", "-Q", "-L", "KuraNTFS", ntfs); err != nil {
		return err
	}
	mnt := filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		return err
	}
	if _, err := runCmd(ctx, "ntfs-3g", ntfs, mnt); err != nil {
		return fmt.Errorf("mounting the NTFS image with ntfs-3g (is FUSE available?): %w", err)
	}
	_, cpErr := runCmd(ctx, "cp", "-R", "-P", "--preserve=timestamps", src+"/.", mnt)
	if _, err := runCmd(ctx, "fusermount", "-u", mnt); err != nil {
		return err
	}
	if cpErr != nil {
		return cpErr
	}

	if err := sparseFile(path, diskSize); err != nil {
		return err
	}
	table := fmt.Sprintf("label: gpt\nstart=%d, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\nstart=%d, size=%d, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
		p1Start/512, p1Size/512, p2Start/512, p2Size/512)
	cmd := exec.CommandContext(ctx, "sfdisk", "-q", path)
	cmd.Stdin = strings.NewReader(table)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("sfdisk: %v: %s", err, out)
	}
	for _, p := range []struct {
		img string
		off int64
	}{{fat, p1Start}, {ntfs, p2Start}} {
		if _, err := runCmd(ctx, "dd", "if="+p.img, "of="+path, "bs=1M", fmt.Sprintf("seek=%d", p.off/mib), "conv=notrunc,sparse", "status=none"); err != nil {
			return err
		}
	}
	return nil
}

func sparseFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
