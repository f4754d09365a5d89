package guestfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Partition tables: MBR (primary, extended and logical partitions) and GPT,
// with 512-byte sectors (GPT is also looked for with 4096-byte sectors).

const (
	maxPartitions = 256
	maxLogical    = 128
)

type partition struct {
	name     string
	off, len int64
	typ      string // MBR type byte or GPT type GUID, for messages
}

// Probe finds the volumes on a disk: partitions of an MBR (including
// logical partitions in an extended one) or GPT partition table, LVM2
// logical volumes on physical volumes found on a partition or the whole
// disk, and a filesystem spanning the whole disk. Each volume's FSType says
// what it holds; volumes that cannot be read (swap, an unknown filesystem,
// a non-linear LVM volume) are returned with FSType "" and Err set. Probe
// fails only when the disk cannot be read or holds nothing recognisable.
func Probe(ctx context.Context, disk io.ReaderAt, size int64) (vols []Volume, err error) {
	defer guard(&err)
	if size < 512 {
		return nil, fmt.Errorf("guestfs: disk of %d bytes is too small to hold a filesystem: %w", size, ErrCorrupt)
	}
	disk = newPageCache(disk, size, 1<<20)
	parts, err := partitions(ctx, disk, size)
	if err != nil {
		return nil, fmt.Errorf("guestfs: reading the partition table: %w", err)
	}
	var pvs []*lvmPV
	if parts == nil {
		v, pv := probeVolume(disk, size, Volume{Size: size})
		if pv != nil {
			pvs = append(pvs, pv)
		} else {
			vols = append(vols, v)
		}
	}
	for _, p := range parts {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		v, pv := probeVolume(disk, size, Volume{Name: p.name, Offset: p.off, Size: p.len})
		if pv != nil {
			pvs = append(pvs, pv)
			continue
		}
		if v.FSType == "" && errors.Is(v.Err, ErrUnsupported) {
			v.Err = fmt.Errorf("%w (partition type %s)", v.Err, p.typ)
		}
		vols = append(vols, v)
	}
	if len(pvs) > 0 {
		lvs := lvmVolumes(ctx, disk, size, pvs)
		for i := range lvs {
			if lvs[i].Err == nil {
				lvs[i], _ = probeVolume(disk, size, lvs[i])
			}
		}
		vols = append(vols, lvs...)
	}
	if len(vols) == 0 {
		return nil, fmt.Errorf("guestfs: no partition table, filesystem or LVM volume found on the disk: %w", ErrUnsupported)
	}
	return vols, nil
}

// probeVolume identifies the filesystem (or LVM PV) in v.
func probeVolume(disk io.ReaderAt, diskSize int64, v Volume) (Volume, *lvmPV) {
	if len(v.segs) == 0 && (v.Offset < 0 || v.Offset+v.Size > diskSize || v.Size <= 0) {
		v.Err = corruptf("%s lies outside the disk (bytes %d+%d of %d)", v, v.Offset, v.Size, diskSize)
		return v, nil
	}
	r := volumeReader(disk, v)
	if label, ok := xfsProbe(r); ok {
		v.FSType, v.Label = "xfs", label
	} else if label, ok := ext4Probe(r); ok {
		v.FSType, v.Label = "ext4", label
	} else if _, ok := ntfsProbe(r); ok {
		v.FSType = "ntfs"
		if f, err := openNTFS(r, v.Size); err == nil {
			v.Label = f.label
		}
	} else if label, ok := fatProbe(r, v.Size); ok {
		v.FSType, v.Label = "vfat", label
	} else if len(v.segs) == 0 {
		if pv, err := lvmProbe(r, v); err == nil && pv != nil {
			return v, pv
		} else if err != nil {
			v.Err = fmt.Errorf("LVM physical volume: %w", err)
			return v, nil
		}
	}
	if v.FSType == "" {
		what := "no supported filesystem (ext2/3/4, xfs, vfat, ntfs) or LVM found"
		b := make([]byte, 16)
		if readFull(r, b[:10], 4086) == nil && string(b[:10]) == "SWAPSPACE2" {
			what = "swap space, holds no files"
		}
		v.Err = fmt.Errorf("%s: %w", what, ErrUnsupported)
	}
	return v, nil
}

// partitions returns nil when the disk has no partition table.
func partitions(ctx context.Context, disk io.ReaderAt, size int64) ([]partition, error) {
	mbr := make([]byte, 512)
	if err := readFull(disk, mbr, 0); err != nil {
		return nil, err
	}
	if mbr[510] != 0x55 || mbr[511] != 0xAA {
		return nil, nil
	}
	for i := 0; i < 4; i++ {
		if mbr[446+16*i+4] == 0xEE {
			for _, ss := range []int64{512, 4096} {
				parts, err := gptPartitions(ctx, disk, size, ss)
				if err == nil {
					return parts, nil
				}
				if ss == 4096 {
					return nil, err
				}
			}
		}
	}
	// A FAT or NTFS boot sector also ends in 0x55AA: a whole-disk
	// filesystem wins over a partition table that does not make sense.
	if _, ok := ntfsProbe(disk); ok {
		return nil, nil
	}
	if _, ok := fatProbe(disk, size); ok {
		return nil, nil
	}
	var parts []partition
	sectors := size / 512
	for i := 0; i < 4; i++ {
		e := mbr[446+16*i:]
		typ := e[4]
		start, n := int64(le.Uint32(e[8:])), int64(le.Uint32(e[12:]))
		if e[0]&0x7F != 0 {
			return nil, nil // not a partition table
		}
		if typ == 0 || n == 0 {
			continue
		}
		if start == 0 || start >= sectors {
			return nil, corruptf("MBR partition %d starts outside the disk", i+1)
		}
		if start+n > sectors {
			n = sectors - start // truncated image
		}
		if typ == 0x05 || typ == 0x0F || typ == 0x85 {
			logical, err := ebrChain(ctx, disk, size, start)
			if err != nil {
				return nil, err
			}
			parts = append(parts, logical...)
			continue
		}
		parts = append(parts, partition{name: fmt.Sprintf("p%d", i+1), off: start * 512, len: n * 512, typ: fmt.Sprintf("0x%02x", typ)})
	}
	if len(parts) == 0 {
		return nil, nil
	}
	return parts, nil
}

// ebrChain walks the linked list of extended boot records.
func ebrChain(ctx context.Context, disk io.ReaderAt, size int64, extStart int64) ([]partition, error) {
	var out []partition
	seen := map[int64]bool{}
	sectors := size / 512
	ebr := extStart
	for i := 0; ; i++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if i >= maxLogical || seen[ebr] {
			return nil, corruptf("extended partition chain loops or is too long")
		}
		seen[ebr] = true
		b := make([]byte, 512)
		if err := readFull(disk, b, ebr*512); err != nil {
			return nil, err
		}
		if b[510] != 0x55 || b[511] != 0xAA {
			return nil, corruptf("extended boot record at sector %d has no signature", ebr)
		}
		e := b[446:]
		if typ := e[4]; typ != 0 {
			start := ebr + int64(le.Uint32(e[8:]))
			n := int64(le.Uint32(e[12:]))
			if start >= sectors || n == 0 {
				return nil, corruptf("logical partition %d lies outside the disk", 5+len(out))
			}
			if start+n > sectors {
				n = sectors - start
			}
			out = append(out, partition{name: fmt.Sprintf("p%d", 5+len(out)), off: start * 512, len: n * 512, typ: fmt.Sprintf("0x%02x", typ)})
		}
		next := b[446+16:]
		if next[4] == 0 || le.Uint32(next[8:]) == 0 {
			return out, nil
		}
		ebr = extStart + int64(le.Uint32(next[8:]))
		if ebr >= sectors {
			return nil, corruptf("extended partition chain points outside the disk")
		}
	}
}

func gptPartitions(ctx context.Context, disk io.ReaderAt, size, ss int64) ([]partition, error) {
	h := make([]byte, 92)
	if err := readFull(disk, h, ss); err != nil {
		return nil, err
	}
	if string(h[:8]) != "EFI PART" {
		return nil, corruptf("GPT header is missing (protective MBR without \"EFI PART\")")
	}
	entriesLBA := int64(le.Uint64(h[72:]))
	count := int64(le.Uint32(h[80:]))
	esize := int64(le.Uint32(h[84:]))
	if esize < 128 || esize > 4096 || esize%8 != 0 || count > 1024 || entriesLBA <= 1 || entriesLBA*ss >= size {
		return nil, corruptf("GPT header is corrupt (entries at LBA %d, %d×%d bytes)", entriesLBA, count, esize)
	}
	tbl, err := readAt(disk, entriesLBA*ss, int(count*esize))
	if err != nil {
		return nil, err
	}
	var out []partition
	for i := int64(0); i < count; i++ {
		e := tbl[i*esize:]
		if allZero(e[:16]) {
			continue
		}
		first, last := int64(le.Uint64(e[32:])), int64(le.Uint64(e[40:]))
		if first <= 0 || last < first || first >= size/ss {
			return nil, corruptf("GPT partition %d lies outside the disk", i+1)
		}
		if last >= size/ss {
			last = size/ss - 1 // truncated image
		}
		out = append(out, partition{name: fmt.Sprintf("p%d", i+1), off: first * ss, len: (last - first + 1) * ss, typ: guidString(e[:16])})
		if len(out) > maxPartitions {
			return nil, corruptf("GPT has too many partitions")
		}
	}
	return out, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func guidString(b []byte) string {
	return fmt.Sprintf("%08X-%04X-%04X-%X-%X", le.Uint32(b), le.Uint16(b[4:]), le.Uint16(b[6:]), b[8:10], b[10:16])
}

// Open opens the filesystem of a volume returned by Probe. The FS reads
// disk lazily and caches up to 8 MiB of metadata.
func Open(ctx context.Context, disk io.ReaderAt, size int64, v Volume) (_ FS, err error) {
	defer func() {
		if err != nil {
			var ce *corruptError
			if errors.As(err, &ce) && !strings.Contains(err.Error(), "—") {
				err = fmt.Errorf("guestfs: %s: %w — the disk image is damaged or is not %s", v, err, v.FSType)
			} else {
				err = fmt.Errorf("guestfs: %s: %w", v, err)
			}
		}
	}()
	defer guard(&err)
	if v.FSType == "" {
		if v.Err != nil {
			return nil, v.Err
		}
		return nil, unsupportedf("no filesystem type given")
	}
	if len(v.segs) == 0 && (v.Offset < 0 || v.Size <= 0 || v.Offset+v.Size > size) {
		return nil, fmt.Errorf("volume lies outside the disk (bytes %d+%d of %d): %w", v.Offset, v.Size, size, ErrCorrupt)
	}
	r := newPageCache(volumeReader(disk, v), v.Size, 8<<20)
	var d driver
	switch v.FSType {
	case "ext4", "ext3", "ext2":
		d, err = openExt4(r, v.Size)
	case "xfs":
		d, err = openXFS(r, v.Size)
	case "vfat":
		d, err = openFAT(r, v.Size)
	case "ntfs":
		d, err = openNTFS(r, v.Size)
	default:
		return nil, unsupportedf("filesystem type %q", v.FSType)
	}
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return newFS(d, v.String()), nil
}
