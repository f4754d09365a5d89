package guestfs

import (
	"context"
	"io"
	"time"
)

// XFS v5 (CRC-enabled) reader: inodes v3, local/extents/btree data forks,
// shortform, block, leaf and node directories, local and remote symlinks.
// The log is not replayed; realtime files are not supported.

const (
	xfsIncompatFtype   = 0x1
	xfsIncompatNrext64 = 0x20
	xfsDirLeafOffset   = int64(32) << 30 // dir data blocks live below this byte offset
	xfsInodeCoreV3     = 176
	xfsFlag2Bigtime    = 1 << 3
	xfsFlag2Nrext64    = 1 << 4
	xfsFlagRealtime    = 0x1
)

type xfsFS struct {
	r          io.ReaderAt
	blockSize  int64
	dblocks    uint64
	agBlocks   uint32
	agCount    uint32
	inodeSize  int64
	inoPBLog   uint
	agBlkLog   uint
	dirBlkSize int64
	rootIno    uint64
	incompat   uint32
	label      string
}

func xfsProbe(r io.ReaderAt) (label string, ok bool) {
	sb := make([]byte, 512)
	if readFull(r, sb, 0) != nil || string(sb[:4]) != "XFSB" {
		return "", false
	}
	return cstring(sb[108:120]), true
}

func openXFS(r io.ReaderAt, size int64) (*xfsFS, error) {
	sb := make([]byte, 512)
	if err := readFull(r, sb, 0); err != nil {
		return nil, err
	}
	if string(sb[:4]) != "XFSB" {
		return nil, corruptf("xfs superblock is corrupt (bad magic) — the disk image is damaged or is not xfs")
	}
	if v := be.Uint16(sb[100:]) & 0xF; v != 5 {
		return nil, unsupportedf("xfs version %d filesystem (only v5, the mkfs.xfs default since 2015, is read)", v)
	}
	f := &xfsFS{
		r:         r,
		blockSize: int64(be.Uint32(sb[4:])),
		dblocks:   be.Uint64(sb[8:]),
		rootIno:   be.Uint64(sb[56:]),
		agBlocks:  be.Uint32(sb[84:]),
		agCount:   be.Uint32(sb[88:]),
		inodeSize: int64(be.Uint16(sb[104:])),
		label:     cstring(sb[108:120]),
		inoPBLog:  uint(sb[123]),
		agBlkLog:  uint(sb[124]),
		incompat:  be.Uint32(sb[216:]),
	}
	blockLog := uint(sb[120])
	inodeLog := uint(sb[122])
	dirBlkLog := uint(sb[192])
	switch {
	case blockLog < 9 || blockLog > 16 || f.blockSize != 1<<blockLog:
		return nil, corruptf("xfs superblock is corrupt (block size %d)", f.blockSize)
	case inodeLog < 8 || inodeLog > 11 || f.inodeSize != 1<<inodeLog || f.inodeSize > f.blockSize:
		return nil, corruptf("xfs superblock is corrupt (inode size %d)", f.inodeSize)
	case f.inoPBLog != blockLog-inodeLog:
		return nil, corruptf("xfs superblock is corrupt (inodes per block)")
	case f.agBlocks == 0 || f.agCount == 0 || f.agBlkLog > 31 || uint64(f.agBlocks) > 1<<f.agBlkLog:
		return nil, corruptf("xfs superblock is corrupt (allocation group geometry)")
	case dirBlkLog > 6 || blockLog+dirBlkLog > 16:
		return nil, corruptf("xfs superblock is corrupt (directory block size)")
	case f.dblocks == 0 || f.dblocks > uint64(f.agCount)*uint64(f.agBlocks):
		return nil, corruptf("xfs superblock is corrupt (block count %d)", f.dblocks)
	}
	f.dirBlkSize = f.blockSize << dirBlkLog
	return f, nil
}

func (f *xfsFS) fsType() string        { return "xfs" }
func (f *xfsFS) rootID() uint64        { return f.rootIno }
func (f *xfsFS) caseInsensitive() bool { return false }

// fsbToByte converts an AG-encoded filesystem block number to a byte offset.
func (f *xfsFS) fsbToByte(fsb uint64) (int64, bool) {
	ag := fsb >> f.agBlkLog
	agb := fsb & (1<<f.agBlkLog - 1)
	if ag >= uint64(f.agCount) || agb >= uint64(f.agBlocks) {
		return 0, false
	}
	blk := ag*uint64(f.agBlocks) + agb
	if blk >= f.dblocks {
		return 0, false
	}
	return int64(blk) * f.blockSize, true
}

type xfsInode struct {
	ino      uint64
	raw      []byte
	mode     uint16
	format   byte
	size     int64
	nextents uint64
	flags    uint16
	flags2   uint64
	fork     []byte // data fork bytes
}

func (f *xfsFS) inode(ino uint64) (*xfsInode, error) {
	agb := ino >> f.inoPBLog
	off, ok := f.fsbToByte(agb)
	if !ok {
		return nil, corruptf("xfs inode number %d out of range", ino)
	}
	off += int64(ino&(1<<f.inoPBLog-1)) * f.inodeSize
	raw, err := readAt(f.r, off, int(f.inodeSize))
	if err != nil {
		return nil, err
	}
	if be.Uint16(raw[0:]) != 0x494E || raw[4] != 3 {
		return nil, corruptf("xfs inode %d is corrupt (bad magic or version)", ino)
	}
	if be.Uint64(raw[152:]) != ino {
		return nil, corruptf("xfs inode %d is corrupt (records inode number %d)", ino, be.Uint64(raw[152:]))
	}
	in := &xfsInode{
		ino:    ino,
		raw:    raw,
		mode:   be.Uint16(raw[2:]),
		format: raw[5],
		size:   int64(be.Uint64(raw[56:])),
		flags:  be.Uint16(raw[90:]),
		flags2: be.Uint64(raw[120:]),
	}
	if in.mode == 0 {
		return nil, corruptf("xfs inode %d is free but is linked from a directory", ino)
	}
	if in.size < 0 {
		return nil, corruptf("xfs inode %d is corrupt (size)", ino)
	}
	if in.flags2&xfsFlag2Nrext64 != 0 {
		in.nextents = be.Uint64(raw[24:])
	} else {
		in.nextents = uint64(be.Uint32(raw[76:]))
	}
	forkSize := f.inodeSize - xfsInodeCoreV3
	if fo := int64(raw[82]); fo != 0 {
		if fo*8 > forkSize {
			return nil, corruptf("xfs inode %d is corrupt (attribute fork offset)", ino)
		}
		forkSize = fo * 8
	}
	in.fork = raw[xfsInodeCoreV3 : xfsInodeCoreV3+forkSize]
	return in, nil
}

func (in *xfsInode) time(off int) time.Time {
	if in.flags2&xfsFlag2Bigtime != 0 {
		ns := be.Uint64(in.raw[off:])
		return time.Unix(int64(ns/1e9)-(1<<31), int64(ns%1e9)).UTC()
	}
	nsec := int64(be.Uint32(in.raw[off+4:]))
	if nsec >= 1e9 {
		nsec = 0
	}
	return time.Unix(int64(int32(be.Uint32(in.raw[off:]))), nsec).UTC()
}

func (f *xfsFS) stat(ctx context.Context, id uint64) (Entry, error) {
	in, err := f.inode(id)
	if err != nil {
		return Entry{}, err
	}
	return Entry{
		Mode:       unixMode(uint32(in.mode)),
		UID:        be.Uint32(in.raw[8:]),
		GID:        be.Uint32(in.raw[12:]),
		Size:       in.size,
		AccessTime: in.time(32),
		ModTime:    in.time(40),
		ChangeTime: in.time(48),
		Ino:        id,
		Nlink:      be.Uint32(in.raw[16:]),
	}, nil
}

// mapping decodes the data fork of an extents or btree inode.
func (f *xfsFS) mapping(ctx context.Context, in *xfsInode) ([]extent, error) {
	var out []extent
	addRec := func(rec []byte) error {
		l0, l1 := be.Uint64(rec), be.Uint64(rec[8:])
		unwritten := l0>>63 != 0
		startOff := (l0 &^ (1 << 63)) >> 9
		startBlk := (l0&0x1FF)<<43 | l1>>21
		count := l1 & 0x1FFFFF
		if count == 0 {
			return corruptf("xfs inode %d has an empty extent", in.ino)
		}
		phys, ok := f.fsbToByte(startBlk)
		end, ok2 := f.fsbToByte(startBlk + count - 1)
		if !ok || !ok2 || end < phys {
			return corruptf("xfs inode %d maps data beyond the filesystem end", in.ino)
		}
		if startOff > 1<<53/uint64(f.blockSize) {
			return corruptf("xfs inode %d extent offset out of range", in.ino)
		}
		if len(out) >= maxExtents {
			return corruptf("xfs inode %d has more than %d extents", in.ino, maxExtents)
		}
		out = append(out, extent{logical: int64(startOff) * f.blockSize, phys: phys, length: int64(count) * f.blockSize, zero: unwritten})
		return nil
	}
	switch in.format {
	case 2: // extents
		if in.nextents*16 > uint64(len(in.fork)) {
			return nil, corruptf("xfs inode %d is corrupt (%d extents do not fit in the inode)", in.ino, in.nextents)
		}
		for i := uint64(0); i < in.nextents; i++ {
			if err := addRec(in.fork[i*16:]); err != nil {
				return nil, err
			}
		}
		return out, nil
	case 3: // btree: root in the inode
		if len(in.fork) < 4 {
			return nil, corruptf("xfs inode %d btree root is corrupt", in.ino)
		}
		level := int(be.Uint16(in.fork[0:]))
		numrecs := int(be.Uint16(in.fork[2:]))
		maxrecs := (len(in.fork) - 4) / 16
		if level == 0 || level > 9 || numrecs > maxrecs {
			return nil, corruptf("xfs inode %d btree root is corrupt (level %d, %d records)", in.ino, level, numrecs)
		}
		budget := 1 << 16
		for i := 0; i < numrecs; i++ {
			ptr := be.Uint64(in.fork[4+maxrecs*8+i*8:])
			if err := f.walkBmbt(ctx, in, ptr, level-1, &budget, addRec); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, corruptf("xfs inode %d has data fork format %d where extents were expected", in.ino, in.format)
}

func (f *xfsFS) walkBmbt(ctx context.Context, in *xfsInode, fsb uint64, level int, budget *int, addRec func([]byte) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if *budget--; *budget < 0 {
		return corruptf("xfs inode %d extent btree is too large", in.ino)
	}
	off, ok := f.fsbToByte(fsb)
	if !ok {
		return corruptf("xfs inode %d extent btree points beyond the filesystem end", in.ino)
	}
	b, err := readAt(f.r, off, int(f.blockSize))
	if err != nil {
		return err
	}
	const hdr = 72
	if string(b[:4]) != "BMA3" || int(be.Uint16(b[4:])) != level || be.Uint64(b[56:]) != in.ino {
		return corruptf("xfs inode %d extent btree block is corrupt (bad magic, level or owner)", in.ino)
	}
	numrecs := int(be.Uint16(b[6:]))
	if level == 0 {
		if hdr+numrecs*16 > len(b) {
			return corruptf("xfs inode %d extent btree leaf is corrupt", in.ino)
		}
		for i := 0; i < numrecs; i++ {
			if err := addRec(b[hdr+i*16:]); err != nil {
				return err
			}
		}
		return nil
	}
	maxrecs := (len(b) - hdr) / 16
	if numrecs > maxrecs {
		return corruptf("xfs inode %d extent btree node is corrupt", in.ino)
	}
	for i := 0; i < numrecs; i++ {
		if err := f.walkBmbt(ctx, in, be.Uint64(b[hdr+maxrecs*8+i*8:]), level-1, budget, addRec); err != nil {
			return err
		}
	}
	return nil
}

func (f *xfsFS) open(ctx context.Context, id uint64) (File, error) {
	in, err := f.inode(id)
	if err != nil {
		return nil, err
	}
	if in.flags&xfsFlagRealtime != 0 {
		return nil, unsupportedf("xfs inode %d is on the realtime device", id)
	}
	if in.format == 1 {
		if in.size > int64(len(in.fork)) {
			return nil, corruptf("xfs inode %d local data is larger than the inode", id)
		}
		return bytesFile(in.fork[:in.size]), nil
	}
	ext, err := f.mapping(ctx, in)
	if err != nil {
		return nil, err
	}
	return newExtentFile(f.r, in.size, ext)
}

func (f *xfsFS) readlink(ctx context.Context, id uint64) (string, error) {
	in, err := f.inode(id)
	if err != nil {
		return "", err
	}
	if in.size > maxSymlink {
		return "", corruptf("xfs symlink inode %d is %d bytes long", id, in.size)
	}
	if in.format == 1 {
		if in.size > int64(len(in.fork)) {
			return "", corruptf("xfs symlink inode %d is corrupt", id)
		}
		return string(in.fork[:in.size]), nil
	}
	ext, err := f.mapping(ctx, in)
	if err != nil {
		return "", err
	}
	// Remote symlink: each filesystem block starts with a 56-byte XSLM
	// header giving the bytes it holds.
	var target []byte
	for _, e := range ext {
		for o := int64(0); o < e.length && int64(len(target)) < in.size; o += f.blockSize {
			b, err := readAt(f.r, e.phys+o, int(f.blockSize))
			if err != nil {
				return "", err
			}
			if string(b[:4]) != "XSLM" {
				return "", corruptf("xfs symlink inode %d block is corrupt (bad magic)", id)
			}
			n := int64(be.Uint32(b[8:]))
			if n > f.blockSize-56 || n > in.size-int64(len(target)) {
				return "", corruptf("xfs symlink inode %d block is corrupt (length)", id)
			}
			target = append(target, b[56:56+n]...)
		}
	}
	if int64(len(target)) != in.size {
		return "", corruptf("xfs symlink inode %d is shorter than its size", id)
	}
	return string(target), nil
}

func (f *xfsFS) list(ctx context.Context, id uint64) ([]dirent, error) {
	in, err := f.inode(id)
	if err != nil {
		return nil, err
	}
	if in.mode&0o170000 != 0o040000 {
		return nil, ErrNotDir
	}
	ftype := 0
	if f.incompat&xfsIncompatFtype != 0 {
		ftype = 1
	}
	var out []dirent
	if in.format == 1 {
		// Shortform: count, i8count, parent, then entries.
		b := in.fork
		if len(b) < 6 {
			return nil, corruptf("xfs directory inode %d is corrupt", id)
		}
		count := int(b[0])
		inoSize := 4
		if b[1] != 0 {
			inoSize = 8
			count = int(b[1])
		}
		p := 2 + inoSize
		for i := 0; i < count; i++ {
			if p+3 > len(b) {
				return nil, corruptf("xfs directory inode %d shortform entry %d is corrupt", id, i)
			}
			n := int(b[p])
			end := p + 3 + n + ftype + inoSize
			if n == 0 || end > len(b) {
				return nil, corruptf("xfs directory inode %d shortform entry %d is corrupt", id, i)
			}
			name := string(b[p+3 : p+3+n])
			ib := b[p+3+n+ftype : end]
			var ino uint64
			if inoSize == 4 {
				ino = uint64(be.Uint32(ib))
			} else {
				ino = be.Uint64(ib)
			}
			out = append(out, dirent{name: name, id: ino})
			p = end
		}
		return out, nil
	}
	ext, err := f.mapping(ctx, in)
	if err != nil {
		return nil, err
	}
	file, err := newExtentFile(f.r, xfsDirLeafOffset, ext)
	if err != nil {
		return nil, err
	}
	blk := make([]byte, f.dirBlkSize)
	done := int64(-1) // last directory block parsed; one may span extents
	for _, e := range ext {
		if e.logical >= xfsDirLeafOffset {
			break
		}
		// Directory blocks covered by this extent.
		first := e.logical / f.dirBlkSize * f.dirBlkSize
		for o := first; o < e.logical+e.length && o < xfsDirLeafOffset; o += f.dirBlkSize {
			if o <= done {
				continue
			}
			done = o
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if _, err := file.ReadAt(blk, o); err != nil {
				return nil, err
			}
			if err := f.parseDirData(in, blk, ftype, &out); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

func (f *xfsFS) parseDirData(in *xfsInode, b []byte, ftype int, out *[]dirent) error {
	const hdr = 64
	end := len(b)
	switch string(b[:4]) {
	case "XDB3":
		count := int(be.Uint32(b[len(b)-8:]))
		end = len(b) - 8 - count*8
		if end < hdr {
			return corruptf("xfs directory inode %d block is corrupt (leaf count)", in.ino)
		}
	case "XDD3":
	default:
		return corruptf("xfs directory inode %d data block is corrupt (bad magic)", in.ino)
	}
	if be.Uint64(b[40:]) != in.ino {
		return corruptf("xfs directory inode %d data block belongs to inode %d", in.ino, be.Uint64(b[40:]))
	}
	for p := hdr; p < end; {
		if p+16 > end { // smallest entry: 8+1+1(+1)+2, 8-aligned
			return corruptf("xfs directory inode %d block is corrupt (entry at %d)", in.ino, p)
		}
		if be.Uint16(b[p:]) == 0xFFFF { // unused space
			n := int(be.Uint16(b[p+2:]))
			if n < 8 || n%8 != 0 || p+n > end {
				return corruptf("xfs directory inode %d block is corrupt (free space at %d)", in.ino, p)
			}
			p += n
			continue
		}
		ino := be.Uint64(b[p:])
		n := int(b[p+8])
		size := (8 + 1 + n + ftype + 2 + 7) &^ 7
		if n == 0 || p+size > end {
			return corruptf("xfs directory inode %d block is corrupt (entry at %d)", in.ino, p)
		}
		name := string(b[p+9 : p+9+n])
		if name != "." && name != ".." {
			if len(*out) >= maxDirEntries {
				return corruptf("xfs directory inode %d has too many entries", in.ino)
			}
			*out = append(*out, dirent{name: name, id: ino})
		}
		p += size
	}
	return nil
}
