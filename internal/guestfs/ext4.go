package guestfs

import (
	"bytes"
	"context"
	"io"
	"time"
)

// ext2/3/4 reader: superblock, group descriptors (incl. meta_bg), inodes,
// extent trees and classic block maps, linear directory blocks (htree
// directories read linearly), inline data and fast symlinks. The journal is
// not replayed.

const (
	ext4Magic = 0xEF53

	ext4IncompatFiletype   = 0x2
	ext4IncompatJournalDev = 0x8
	ext4IncompatMetaBG     = 0x10
	ext4Incompat64Bit      = 0x80
	ext4IncompatInlineData = 0x8000
	ext4RoCompatSparse     = 0x1

	ext4FlagEncrypt    = 0x800
	ext4FlagExtents    = 0x80000
	ext4FlagInlineData = 0x10000000

	ext4RootIno = 2
)

type ext4FS struct {
	r io.ReaderAt

	blockSize      int64
	blocksCount    uint64
	inodesCount    uint32
	inodesPerGroup uint32
	blocksPerGroup uint32
	firstDataBlock uint32
	inodeSize      int64
	descSize       int64
	groups         uint64
	incompat       uint32
	roCompat       uint32
	firstMetaBG    uint32
	label          string
}

// ext4Probe checks the superblock magic at 1080.
func ext4Probe(r io.ReaderAt) (label string, ok bool) {
	sb := make([]byte, 1024)
	if readFull(r, sb, 1024) != nil || le.Uint16(sb[0x38:]) != ext4Magic {
		return "", false
	}
	return cstring(sb[0x78:0x88]), true
}

func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(bytes.TrimRight(b, " "))
}

func openExt4(r io.ReaderAt, size int64) (*ext4FS, error) {
	sb := make([]byte, 1024)
	if err := readFull(r, sb, 1024); err != nil {
		return nil, err
	}
	if le.Uint16(sb[0x38:]) != ext4Magic {
		return nil, corruptf("ext4 superblock is corrupt (bad magic) — the disk image is damaged or is not ext2/3/4")
	}
	f := &ext4FS{r: r}
	logBS := le.Uint32(sb[0x18:])
	if logBS > 6 {
		return nil, corruptf("ext4 superblock is corrupt (block size 2^%d KiB)", logBS)
	}
	f.blockSize = 1024 << logBS
	f.inodesCount = le.Uint32(sb[0:])
	f.blocksCount = uint64(le.Uint32(sb[0x4:]))
	f.firstDataBlock = le.Uint32(sb[0x14:])
	f.blocksPerGroup = le.Uint32(sb[0x20:])
	f.inodesPerGroup = le.Uint32(sb[0x28:])
	f.incompat = le.Uint32(sb[0x60:])
	f.roCompat = le.Uint32(sb[0x64:])
	f.label = cstring(sb[0x78:0x88])
	f.inodeSize = 128
	if le.Uint32(sb[0x4C:]) >= 1 {
		f.inodeSize = int64(le.Uint16(sb[0x58:]))
	}
	f.descSize = 32
	if f.incompat&ext4Incompat64Bit != 0 {
		f.blocksCount |= uint64(le.Uint32(sb[0x150:])) << 32
		f.descSize = int64(le.Uint16(sb[0xFE:]))
	}
	f.firstMetaBG = le.Uint32(sb[0x104:])
	switch {
	case f.incompat&ext4IncompatJournalDev != 0:
		return nil, unsupportedf("ext4 external journal device (no files)")
	case f.inodeSize < 128 || f.inodeSize > f.blockSize || f.inodeSize&(f.inodeSize-1) != 0:
		return nil, corruptf("ext4 superblock is corrupt (inode size %d)", f.inodeSize)
	case f.descSize < 32 || f.descSize > 1024 || f.descSize&(f.descSize-1) != 0:
		return nil, corruptf("ext4 superblock is corrupt (group descriptor size %d)", f.descSize)
	case f.blocksPerGroup == 0 || f.inodesPerGroup == 0 || f.blocksPerGroup > 8*uint32(f.blockSize)*16:
		return nil, corruptf("ext4 superblock is corrupt (blocks/inodes per group %d/%d)", f.blocksPerGroup, f.inodesPerGroup)
	case f.blocksCount <= uint64(f.firstDataBlock):
		return nil, corruptf("ext4 superblock is corrupt (block count %d)", f.blocksCount)
	}
	f.groups = (f.blocksCount - uint64(f.firstDataBlock) + uint64(f.blocksPerGroup) - 1) / uint64(f.blocksPerGroup)
	if uint64(f.inodesCount) > f.groups*uint64(f.inodesPerGroup) {
		return nil, corruptf("ext4 superblock is corrupt (inode count %d)", f.inodesCount)
	}
	return f, nil
}

func (f *ext4FS) fsType() string        { return "ext4" }
func (f *ext4FS) rootID() uint64        { return ext4RootIno }
func (f *ext4FS) caseInsensitive() bool { return false }

func isPowerOf(n, p uint64) bool {
	for n > 1 && n%p == 0 {
		n /= p
	}
	return n == 1
}

func (f *ext4FS) groupHasSuper(g uint64) bool {
	if f.roCompat&ext4RoCompatSparse == 0 || g <= 1 {
		return true
	}
	return isPowerOf(g, 3) || isPowerOf(g, 5) || isPowerOf(g, 7)
}

// inodeTable returns the first block of group g's inode table.
func (f *ext4FS) inodeTable(g uint64) (uint64, error) {
	perBlock := uint64(f.blockSize / f.descSize)
	var blk uint64
	if f.incompat&ext4IncompatMetaBG != 0 && g/perBlock >= uint64(f.firstMetaBG) {
		first := g / perBlock * perBlock
		blk = uint64(f.firstDataBlock) + first*uint64(f.blocksPerGroup)
		if f.groupHasSuper(first) {
			blk++
		}
	} else {
		blk = uint64(f.firstDataBlock) + 1 + g/perBlock
	}
	off := int64(blk)*f.blockSize + int64(g%perBlock)*f.descSize
	d := make([]byte, f.descSize)
	if err := readFull(f.r, d, off); err != nil {
		return 0, err
	}
	t := uint64(le.Uint32(d[0x8:]))
	if f.descSize >= 64 {
		t |= uint64(le.Uint32(d[0x28:])) << 32
	}
	if t == 0 || t >= f.blocksCount {
		return 0, corruptf("ext4 group %d descriptor is corrupt (inode table at block %d)", g, t)
	}
	return t, nil
}

type ext4Inode struct {
	ino   uint64
	raw   []byte
	mode  uint16
	flags uint32
	size  int64
}

func (f *ext4FS) inode(ino uint64) (*ext4Inode, error) {
	if ino < 1 || ino > uint64(f.inodesCount) {
		return nil, corruptf("ext4 inode number %d out of range", ino)
	}
	g := (ino - 1) / uint64(f.inodesPerGroup)
	idx := (ino - 1) % uint64(f.inodesPerGroup)
	t, err := f.inodeTable(g)
	if err != nil {
		return nil, err
	}
	raw, err := readAt(f.r, int64(t)*f.blockSize+int64(idx)*f.inodeSize, int(f.inodeSize))
	if err != nil {
		return nil, err
	}
	in := &ext4Inode{ino: ino, raw: raw, mode: le.Uint16(raw[0:]), flags: le.Uint32(raw[0x20:])}
	in.size = int64(uint64(le.Uint32(raw[0x4:])) | uint64(le.Uint32(raw[0x6C:]))<<32)
	if in.size < 0 {
		return nil, corruptf("ext4 inode %d is corrupt (size)", ino)
	}
	if in.mode == 0 {
		return nil, corruptf("ext4 inode %d is not in use (mode 0) but is linked from a directory", ino)
	}
	return in, nil
}

func (in *ext4Inode) extraTime(off, extraOff int) time.Time {
	sec := int64(int32(le.Uint32(in.raw[off:])))
	var nsec int64
	if len(in.raw) >= 128+4 {
		extra := int(le.Uint16(in.raw[0x80:]))
		if 128+extra >= extraOff+4 && extraOff+4 <= len(in.raw) {
			x := le.Uint32(in.raw[extraOff:])
			sec += int64(x&3) << 32
			nsec = int64(x >> 2)
			if nsec >= 1e9 {
				nsec = 0
			}
		}
	}
	return time.Unix(sec, nsec).UTC()
}

func (f *ext4FS) stat(ctx context.Context, id uint64) (Entry, error) {
	in, err := f.inode(id)
	if err != nil {
		return Entry{}, err
	}
	r := in.raw
	e := Entry{
		Mode:       unixMode(uint32(in.mode)),
		UID:        uint32(le.Uint16(r[0x2:])) | uint32(le.Uint16(r[0x78:]))<<16,
		GID:        uint32(le.Uint16(r[0x18:])) | uint32(le.Uint16(r[0x7A:]))<<16,
		Size:       in.size,
		AccessTime: in.extraTime(0x8, 0x8C),
		ChangeTime: in.extraTime(0xC, 0x84),
		ModTime:    in.extraTime(0x10, 0x88),
		Ino:        id,
		Nlink:      uint32(le.Uint16(r[0x1A:])),
	}
	return e, nil
}

// mapping returns the extents of an inode's data, limited to its size.
func (f *ext4FS) mapping(ctx context.Context, in *ext4Inode) ([]extent, error) {
	nblocks := (in.size + f.blockSize - 1) / f.blockSize
	var out []extent
	add := func(lblk, pblk, n uint64, zero bool) error {
		if lblk >= uint64(nblocks) {
			return nil
		}
		if n > uint64(nblocks)-lblk {
			n = uint64(nblocks) - lblk
		}
		if !zero && (pblk >= f.blocksCount || n > f.blocksCount-pblk) {
			return corruptf("ext4 inode %d maps data to block %d, beyond the filesystem end", in.ino, pblk)
		}
		if k := len(out); k > 0 && !zero && !out[k-1].zero &&
			out[k-1].logical+out[k-1].length == int64(lblk)*f.blockSize &&
			out[k-1].phys+out[k-1].length == int64(pblk)*f.blockSize {
			out[k-1].length += int64(n) * f.blockSize
			return nil
		}
		if len(out) >= maxExtents {
			return corruptf("ext4 inode %d has more than %d extents", in.ino, maxExtents)
		}
		out = append(out, extent{logical: int64(lblk) * f.blockSize, phys: int64(pblk) * f.blockSize, length: int64(n) * f.blockSize, zero: zero})
		return nil
	}
	if in.flags&ext4FlagExtents != 0 {
		budget := 1 << 16 // extent tree blocks read for one file
		if err := f.walkExtents(ctx, in, in.raw[0x28:0x28+60], -1, &budget, add); err != nil {
			return nil, err
		}
		return out, nil
	}
	// Classic block map: 12 direct, single, double, triple indirect.
	var lblk uint64
	budget := 1 << 16
	var walk func(blk uint64, level int) error
	per := uint64(f.blockSize / 4)
	span := func(level int) uint64 {
		s := uint64(1)
		for i := 0; i < level; i++ {
			s *= per
		}
		return s
	}
	walk = func(blk uint64, level int) error {
		if lblk >= uint64(nblocks) {
			return nil
		}
		if blk == 0 {
			lblk += span(level)
			return nil
		}
		if level == 0 {
			err := add(lblk, blk, 1, false)
			lblk++
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if budget--; budget < 0 {
			return corruptf("ext4 inode %d has too many indirect blocks", in.ino)
		}
		if blk >= f.blocksCount {
			return corruptf("ext4 inode %d indirect block %d beyond the filesystem end", in.ino, blk)
		}
		b, err := readAt(f.r, int64(blk)*f.blockSize, int(f.blockSize))
		if err != nil {
			return err
		}
		for i := uint64(0); i < per && lblk < uint64(nblocks); i++ {
			if err := walk(uint64(le.Uint32(b[i*4:])), level-1); err != nil {
				return err
			}
		}
		return nil
	}
	for i := 0; i < 15; i++ {
		level := 0
		if i >= 12 {
			level = i - 11
		}
		if err := walk(uint64(le.Uint32(in.raw[0x28+4*i:])), level); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (f *ext4FS) walkExtents(ctx context.Context, in *ext4Inode, node []byte, wantDepth int, budget *int, add func(l, p, n uint64, zero bool) error) error {
	if len(node) < 12 || le.Uint16(node[0:]) != 0xF30A {
		return corruptf("ext4 inode %d extent tree is corrupt (bad magic)", in.ino)
	}
	entries := int(le.Uint16(node[2:]))
	depth := int(le.Uint16(node[6:]))
	if depth > 5 || (wantDepth >= 0 && depth != wantDepth) || 12+12*entries > len(node) {
		return corruptf("ext4 inode %d extent tree is corrupt (depth %d, %d entries)", in.ino, depth, entries)
	}
	for i := 0; i < entries; i++ {
		e := node[12+12*i:]
		if depth == 0 {
			lblk := uint64(le.Uint32(e[0:]))
			n := uint64(le.Uint16(e[4:]))
			unwritten := false
			if n > 32768 {
				n -= 32768
				unwritten = true
			}
			pblk := uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))
			if err := add(lblk, pblk, n, unwritten); err != nil {
				return err
			}
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if *budget--; *budget < 0 {
			return corruptf("ext4 inode %d extent tree is too large", in.ino)
		}
		child := uint64(le.Uint32(e[4:])) | uint64(le.Uint16(e[8:]))<<32
		if child >= f.blocksCount {
			return corruptf("ext4 inode %d extent tree points beyond the filesystem end", in.ino)
		}
		b, err := readAt(f.r, int64(child)*f.blockSize, int(f.blockSize))
		if err != nil {
			return err
		}
		if err := f.walkExtents(ctx, in, b, depth-1, budget, add); err != nil {
			return err
		}
	}
	return nil
}

// inlineData returns the data of an inode with the inline-data flag: the
// 60 bytes of i_block followed by the system.data extended attribute.
func (f *ext4FS) inlineData(in *ext4Inode) ([]byte, error) {
	data := append([]byte(nil), in.raw[0x28:0x28+60]...)
	extra := 0
	if len(in.raw) > 0x82 {
		extra = int(le.Uint16(in.raw[0x80:]))
	}
	start := 128 + extra
	if start+4 <= len(in.raw) && le.Uint32(in.raw[start:]) == 0xEA020000 {
		base := start + 4
		p := base
		for p+16 <= len(in.raw) {
			nameLen := int(in.raw[p])
			if nameLen == 0 && in.raw[p+1] == 0 && le.Uint16(in.raw[p+2:]) == 0 {
				break
			}
			idx := in.raw[p+1]
			voff := int(le.Uint16(in.raw[p+2:]))
			vsize := int(le.Uint32(in.raw[p+8:]))
			if p+16+nameLen > len(in.raw) {
				break
			}
			name := string(in.raw[p+16 : p+16+nameLen])
			if idx == 7 && name == "data" {
				if base+voff+vsize > len(in.raw) || vsize < 0 {
					return nil, corruptf("ext4 inode %d inline data attribute is corrupt", in.ino)
				}
				data = append(data, in.raw[base+voff:base+voff+vsize]...)
				break
			}
			p += (16 + nameLen + 3) &^ 3
		}
	}
	if int64(len(data)) > in.size {
		data = data[:in.size]
	}
	return data, nil
}

func (f *ext4FS) file(ctx context.Context, in *ext4Inode) (File, error) {
	if in.flags&ext4FlagEncrypt != 0 {
		return nil, unsupportedf("ext4 inode %d is encrypted (fscrypt)", in.ino)
	}
	if in.flags&ext4FlagInlineData != 0 {
		d, err := f.inlineData(in)
		if err != nil {
			return nil, err
		}
		if int64(len(d)) < in.size {
			return nil, corruptf("ext4 inode %d inline data is shorter than its size", in.ino)
		}
		return bytesFile(d), nil
	}
	ext, err := f.mapping(ctx, in)
	if err != nil {
		return nil, err
	}
	return newExtentFile(f.r, in.size, ext)
}

func (f *ext4FS) open(ctx context.Context, id uint64) (File, error) {
	in, err := f.inode(id)
	if err != nil {
		return nil, err
	}
	return f.file(ctx, in)
}

func (f *ext4FS) readlink(ctx context.Context, id uint64) (string, error) {
	in, err := f.inode(id)
	if err != nil {
		return "", err
	}
	if in.size > maxSymlink {
		return "", corruptf("ext4 symlink inode %d is %d bytes long", id, in.size)
	}
	if in.flags&(ext4FlagExtents|ext4FlagInlineData) == 0 && in.size < 60 {
		return string(in.raw[0x28 : 0x28+in.size]), nil
	}
	file, err := f.file(ctx, in)
	if err != nil {
		return "", err
	}
	b, err := readAllFile(file, maxSymlink)
	return string(b), err
}

func (f *ext4FS) list(ctx context.Context, id uint64) ([]dirent, error) {
	in, err := f.inode(id)
	if err != nil {
		return nil, err
	}
	if in.mode&0o170000 != 0o040000 {
		return nil, ErrNotDir
	}
	if in.flags&ext4FlagEncrypt != 0 {
		return nil, unsupportedf("ext4 directory inode %d is encrypted (fscrypt)", id)
	}
	var out []dirent
	if in.flags&ext4FlagInlineData != 0 {
		d, err := f.inlineData(in)
		if err != nil {
			return nil, err
		}
		if len(d) < 4 {
			return nil, corruptf("ext4 directory inode %d inline data is too short", id)
		}
		// The first four bytes are the parent's inode number; then entries
		// follow in i_block and continue in the attribute value.
		if len(d) > 60 {
			if err := f.parseDirBlock(in, d[4:60], &out); err != nil {
				return nil, err
			}
			return out, f.parseDirBlock(in, d[60:], &out)
		}
		return out, f.parseDirBlock(in, d[4:], &out)
	}
	if in.size > 1<<30 {
		return nil, corruptf("ext4 directory inode %d is %d bytes long", id, in.size)
	}
	file, err := f.file(ctx, in)
	if err != nil {
		return nil, err
	}
	blk := make([]byte, f.blockSize)
	for off := int64(0); off < in.size; off += f.blockSize {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n, err := file.ReadAt(blk, off)
		if n < len(blk) && err != io.EOF {
			return nil, err
		}
		if err := f.parseDirBlock(in, blk[:n], &out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (f *ext4FS) parseDirBlock(in *ext4Inode, b []byte, out *[]dirent) error {
	for p := 0; p+8 <= len(b); {
		ino := le.Uint32(b[p:])
		recLen := int(le.Uint16(b[p+4:]))
		if recLen == 0 || recLen == 65535 && f.blockSize == 65536 {
			if f.blockSize >= 65536 {
				recLen = 65536
			}
		}
		nameLen := int(b[p+6])
		if f.incompat&ext4IncompatFiletype == 0 {
			nameLen = int(le.Uint16(b[p+6:]))
		}
		if recLen < 8 || recLen%4 != 0 || p+recLen > len(b) || 8+nameLen > recLen {
			return corruptf("ext4 directory inode %d is corrupt (entry at byte %d)", in.ino, p)
		}
		if ino != 0 && nameLen > 0 {
			if uint64(ino) > uint64(f.inodesCount) {
				return corruptf("ext4 directory inode %d is corrupt (entry names inode %d)", in.ino, ino)
			}
			name := string(b[p+8 : p+8+nameLen])
			if name != "." && name != ".." {
				if len(*out) >= maxDirEntries {
					return corruptf("ext4 directory inode %d has too many entries", in.ino)
				}
				*out = append(*out, dirent{name: name, id: uint64(ino)})
			}
		}
		p += recLen
	}
	return nil
}
