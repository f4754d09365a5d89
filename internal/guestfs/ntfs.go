package guestfs

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"sort"
	"strings"
	"time"
	"unicode/utf16"
)

// NTFS reader: MFT records with update-sequence fixups, attribute lists,
// resident and non-resident attributes (runlists, sparse runs, initialized
// size), $I30 directory indexes (root and allocation blocks, filtered by the
// index bitmap) and reparse-point symlinks and junctions. Compressed and
// encrypted data is reported as unsupported.

const (
	ntfsAttrStdInfo    = 0x10
	ntfsAttrList       = 0x20
	ntfsAttrFileName   = 0x30
	ntfsAttrVolName    = 0x60
	ntfsAttrData       = 0x80
	ntfsAttrIndexRoot  = 0x90
	ntfsAttrIndexAlloc = 0xA0
	ntfsAttrBitmap     = 0xB0
	ntfsAttrReparse    = 0xC0
	ntfsRootRecord     = 5
	ntfsFirstUser      = 24 // records below are metafiles, hidden in listings

	ntfsTagSymlink  = 0xA000000C
	ntfsTagJunction = 0xA0000003
	ntfsTagLX       = 0xA000001D
)

type ntfsFS struct {
	r             io.ReaderAt
	clusterSize   int64
	recordSize    int64
	totalClusters int64
	mft           *extentFile
	label         string
}

func ntfsProbe(r io.ReaderAt) (string, bool) {
	b := make([]byte, 512)
	if readFull(r, b, 0) != nil || string(b[3:11]) != "NTFS    " {
		return "", false
	}
	return "", true
}

type ntfsAttr struct {
	typ         uint32
	name        string
	nonResident bool
	flags       uint16
	value       []byte // resident value
	startVCN    int64
	runs        []byte
	dataSize    int64
	initSize    int64
	compUnit    uint16
}

func openNTFS(r io.ReaderAt, size int64) (*ntfsFS, error) {
	b := make([]byte, 512)
	if err := readFull(r, b, 0); err != nil {
		return nil, err
	}
	if string(b[3:11]) != "NTFS    " {
		return nil, corruptf("ntfs boot sector is corrupt (bad OEM id) — the disk image is damaged or is not NTFS")
	}
	bps := int64(le.Uint16(b[11:]))
	spc := int64(b[13])
	if spc > 128 {
		if 256-spc > 12 {
			return nil, corruptf("ntfs boot sector is corrupt (sectors per cluster)")
		}
		spc = 1 << (256 - spc)
	}
	if bps < 256 || bps > 4096 || bps&(bps-1) != 0 || spc == 0 || spc&(spc-1) != 0 || bps*spc > 2<<20 {
		return nil, corruptf("ntfs boot sector is corrupt (geometry %d×%d)", bps, spc)
	}
	f := &ntfsFS{r: r, clusterSize: bps * spc}
	f.totalClusters = int64(le.Uint64(b[0x28:])) * bps / f.clusterSize
	if size > 0 && f.totalClusters > size/f.clusterSize+1 {
		f.totalClusters = size/f.clusterSize + 1
	}
	recSize, err := ntfsUnitSize(int8(b[0x40]), f.clusterSize)
	if err != nil {
		return nil, err
	}
	f.recordSize = recSize
	mftLCN := int64(le.Uint64(b[0x30:]))
	if mftLCN <= 0 || mftLCN >= f.totalClusters {
		return nil, corruptf("ntfs boot sector is corrupt ($MFT at cluster %d)", mftLCN)
	}
	// Bootstrap: read record 0 directly, map $MFT's $DATA, then reload it
	// with its attribute list (a fragmented $MFT has extension records).
	rec, err := readAt(r, mftLCN*f.clusterSize, int(f.recordSize))
	if err != nil {
		return nil, err
	}
	if err := ntfsFixup(rec, "FILE"); err != nil {
		return nil, corruptf("ntfs $MFT record 0 is corrupt (%v)", err)
	}
	attrs, err := ntfsParseAttrs(rec)
	if err != nil {
		return nil, err
	}
	f.mft, err = f.stream(context.Background(), attrs, ntfsAttrData, "", 0)
	if err != nil {
		return nil, corruptf("ntfs $MFT data is corrupt: %v", err)
	}
	if f.mft.size < 16*f.recordSize {
		return nil, corruptf("ntfs $MFT is too small (%d bytes)", f.mft.size)
	}
	if all, err := f.attrs(context.Background(), 0); err == nil {
		if m, err := f.stream(context.Background(), all, ntfsAttrData, "", 0); err == nil {
			f.mft = m
		}
	}
	if vol, err := f.attrs(context.Background(), 3); err == nil {
		for _, a := range vol {
			if a.typ == ntfsAttrVolName && !a.nonResident {
				f.label = utf16String(a.value)
			}
		}
	}
	return f, nil
}

func ntfsUnitSize(v int8, clusterSize int64) (int64, error) {
	var n int64
	if v < 0 {
		if v < -20 || v > -9 {
			return 0, corruptf("ntfs boot sector is corrupt (record size 2^%d)", -v)
		}
		n = 1 << uint(-v)
	} else {
		n = int64(v) * clusterSize
	}
	if n < 512 || n > 64<<10 || n&(n-1) != 0 {
		return 0, corruptf("ntfs boot sector is corrupt (record size %d)", n)
	}
	return n, nil
}

func utf16String(b []byte) string {
	u := make([]uint16, len(b)/2)
	for i := range u {
		u[i] = le.Uint16(b[2*i:])
	}
	return string(utf16.Decode(u))
}

// ntfsFixup checks the magic and applies the update sequence array.
func ntfsFixup(b []byte, magic string) error {
	if len(b) < 48 || string(b[:4]) != magic {
		return corruptf("bad magic")
	}
	usaOff := int(le.Uint16(b[4:]))
	usaCount := int(le.Uint16(b[6:]))
	if usaCount < 2 || usaOff+2*usaCount > len(b) || (usaCount-1)*512 > len(b) {
		return corruptf("bad update sequence array")
	}
	for i := 1; i < usaCount; i++ {
		end := i*512 - 2
		if b[end] != b[usaOff] || b[end+1] != b[usaOff+1] {
			return corruptf("torn write (update sequence mismatch in sector %d)", i-1)
		}
		b[end], b[end+1] = b[usaOff+2*i], b[usaOff+2*i+1]
	}
	return nil
}

func ntfsParseAttrs(rec []byte) ([]ntfsAttr, error) {
	var out []ntfsAttr
	p := int(le.Uint16(rec[0x14:]))
	used := int(le.Uint32(rec[0x18:]))
	if used > len(rec) {
		used = len(rec)
	}
	for i := 0; p+8 <= used; i++ {
		typ := le.Uint32(rec[p:])
		if typ == 0xFFFFFFFF {
			break
		}
		n := int(le.Uint32(rec[p+4:]))
		if n < 24 || p+n > used || n%8 != 0 || i > 256 {
			return nil, corruptf("ntfs attribute at byte %d is corrupt", p)
		}
		a := rec[p : p+n]
		at := ntfsAttr{typ: typ, nonResident: a[8] != 0, flags: le.Uint16(a[12:])}
		nameLen, nameOff := int(a[9]), int(le.Uint16(a[10:]))
		if nameLen > 0 {
			if nameOff+2*nameLen > n {
				return nil, corruptf("ntfs attribute name is corrupt")
			}
			at.name = utf16String(a[nameOff : nameOff+2*nameLen])
		}
		if !at.nonResident {
			vlen, voff := int(le.Uint32(a[16:])), int(le.Uint16(a[20:]))
			if voff+vlen > n || vlen < 0 {
				return nil, corruptf("ntfs resident attribute is corrupt")
			}
			at.value = a[voff : voff+vlen]
		} else {
			if n < 64 {
				return nil, corruptf("ntfs non-resident attribute is too short")
			}
			at.startVCN = int64(le.Uint64(a[16:]))
			roff := int(le.Uint16(a[32:]))
			at.compUnit = le.Uint16(a[34:])
			at.dataSize = int64(le.Uint64(a[48:]))
			at.initSize = int64(le.Uint64(a[56:]))
			if roff > n || at.startVCN < 0 || at.dataSize < 0 || at.initSize < 0 {
				return nil, corruptf("ntfs non-resident attribute is corrupt")
			}
			at.runs = a[roff:]
		}
		out = append(out, at)
		p += n
	}
	return out, nil
}

// record reads MFT record n with fixups applied.
func (f *ntfsFS) record(n uint64) ([]byte, error) {
	off := int64(n) * f.recordSize
	if n > 1<<40 || off+f.recordSize > f.mft.size {
		return nil, corruptf("ntfs MFT record %d is beyond the end of $MFT", n)
	}
	rec := make([]byte, f.recordSize)
	if _, err := f.mft.ReadAt(rec, off); err != nil && err != io.EOF {
		return nil, err
	}
	if err := ntfsFixup(rec, "FILE"); err != nil {
		return nil, corruptf("ntfs MFT record %d is corrupt (%v)", n, err)
	}
	if le.Uint16(rec[0x16:])&1 == 0 {
		return nil, corruptf("ntfs MFT record %d is not in use but is referenced", n)
	}
	return rec, nil
}

// attrs returns all attributes of a file, following its attribute list.
func (f *ntfsFS) attrs(ctx context.Context, n uint64) ([]ntfsAttr, error) {
	rec, err := f.record(n)
	if err != nil {
		return nil, err
	}
	if base := le.Uint64(rec[0x20:]) & (1<<48 - 1); base != 0 {
		return nil, corruptf("ntfs MFT record %d is an extension record, not a file", n)
	}
	attrs, err := ntfsParseAttrs(rec)
	if err != nil {
		return nil, corruptf("ntfs MFT record %d: %v", n, err)
	}
	var list []byte
	for _, a := range attrs {
		if a.typ != ntfsAttrList {
			continue
		}
		if !a.nonResident {
			list = a.value
		} else {
			s, err := f.stream(ctx, []ntfsAttr{a}, ntfsAttrList, a.name, 0)
			if err != nil {
				return nil, err
			}
			list, err = readAllFile(s, 1<<20)
			if err != nil {
				return nil, err
			}
		}
	}
	if list == nil {
		return attrs, nil
	}
	seen := map[uint64]bool{n: true}
	for p := 0; p+26 <= len(list); {
		l := int(le.Uint16(list[p+4:]))
		if l < 26 || p+l > len(list) {
			return nil, corruptf("ntfs MFT record %d attribute list is corrupt", n)
		}
		ref := le.Uint64(list[p+16:]) & (1<<48 - 1)
		p += l
		if seen[ref] {
			continue
		}
		if len(seen) > 1024 {
			return nil, corruptf("ntfs MFT record %d has too many extension records", n)
		}
		seen[ref] = true
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		ext, err := f.record(ref)
		if err != nil {
			return nil, err
		}
		if le.Uint64(ext[0x20:])&(1<<48-1) != n {
			return nil, corruptf("ntfs MFT record %d lists record %d which belongs to another file", n, ref)
		}
		more, err := ntfsParseAttrs(ext)
		if err != nil {
			return nil, corruptf("ntfs MFT record %d: %v", ref, err)
		}
		attrs = append(attrs, more...)
	}
	return attrs, nil
}

// stream returns the contents of the attribute of the given type and name
// (resident, or non-resident assembled from all its pieces).
func (f *ntfsFS) stream(ctx context.Context, attrs []ntfsAttr, typ uint32, name string, id uint64) (*extentFile, error) {
	var pieces []ntfsAttr
	for _, a := range attrs {
		if a.typ == typ && a.name == name {
			if !a.nonResident {
				return &extentFile{r: bytesFile(a.value), size: int64(len(a.value)), initSize: int64(len(a.value)),
					ext: []extent{{logical: 0, phys: 0, length: int64(len(a.value))}}}, nil
			}
			pieces = append(pieces, a)
		}
	}
	if len(pieces) == 0 {
		return nil, ErrNotExist
	}
	sort.Slice(pieces, func(i, j int) bool { return pieces[i].startVCN < pieces[j].startVCN })
	first := pieces[0]
	if first.startVCN != 0 {
		return nil, corruptf("ntfs MFT record %d attribute 0x%x has no first piece", id, typ)
	}
	if first.flags&0x0001 != 0 { // sparse files may have a compression unit too

		return nil, unsupportedf("ntfs MFT record %d: compressed data", id)
	}
	if first.flags&0x4000 != 0 {
		return nil, unsupportedf("ntfs MFT record %d: encrypted data (EFS)", id)
	}
	var ext []extent
	for _, p := range pieces {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if err := f.decodeRuns(p.runs, p.startVCN, &ext); err != nil {
			return nil, corruptf("ntfs MFT record %d attribute 0x%x runlist is corrupt: %v", id, typ, err)
		}
	}
	ef, err := newExtentFile(f.r, first.dataSize, ext)
	if err != nil {
		return nil, err
	}
	if first.initSize < ef.initSize {
		ef.initSize = first.initSize
	}
	return ef, nil
}

func (f *ntfsFS) decodeRuns(b []byte, vcn int64, out *[]extent) error {
	var lcn int64
	for p := 0; p < len(b) && b[p] != 0; {
		ls, os := int(b[p]&0xF), int(b[p]>>4)
		p++
		if ls == 0 || ls > 8 || os > 8 || p+ls+os > len(b) {
			return corruptf("bad run header")
		}
		var length int64
		for i := ls - 1; i >= 0; i-- {
			length = length<<8 | int64(b[p+i])
		}
		p += ls
		if length <= 0 || length > 1<<40 || vcn+length > 1<<44 {
			return corruptf("bad run length %d", length)
		}
		e := extent{logical: vcn * f.clusterSize, length: length * f.clusterSize}
		if os == 0 {
			e.zero = true
		} else {
			var off int64
			for i := os - 1; i >= 0; i-- {
				off = off<<8 | int64(b[p+i])
			}
			if b[p+os-1]&0x80 != 0 && os < 8 { // sign-extend
				off -= 1 << (8 * os)
			}
			p += os
			lcn += off
			if lcn < 0 || lcn+length > f.totalClusters {
				return corruptf("run at cluster %d+%d is outside the volume", lcn, length)
			}
			e.phys = lcn * f.clusterSize
		}
		if len(*out) >= maxExtents {
			return corruptf("too many runs")
		}
		*out = append(*out, e)
		vcn += length
	}
	return nil
}

func (f *ntfsFS) fsType() string        { return "ntfs" }
func (f *ntfsFS) rootID() uint64        { return ntfsRootRecord }
func (f *ntfsFS) caseInsensitive() bool { return true }

// ntfsTime converts 100 ns intervals since 1601 to a time.
func ntfsTime(v uint64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	const epochDiff = 116444736000000000 // 1601 to 1970 in 100 ns
	t := int64(v) - epochDiff
	if int64(v) < 0 {
		return time.Time{}
	}
	return time.Unix(t/1e7, t%1e7*100).UTC()
}

func (f *ntfsFS) stat(ctx context.Context, id uint64) (Entry, error) {
	rec, err := f.record(id)
	if err != nil {
		return Entry{}, err
	}
	attrs, err := f.attrs(ctx, id)
	if err != nil {
		return Entry{}, err
	}
	e := Entry{Ino: id, Mode: 0o644}
	isDir := le.Uint16(rec[0x16:])&2 != 0
	sysFile := false
	if isDir {
		e.Mode = fs.ModeDir | 0o755
	}
	for _, a := range attrs {
		switch a.typ {
		case ntfsAttrStdInfo:
			if len(a.value) >= 48 {
				v := a.value
				e.ModTime = ntfsTime(le.Uint64(v[8:]))
				e.ChangeTime = ntfsTime(le.Uint64(v[16:]))
				e.AccessTime = ntfsTime(le.Uint64(v[24:]))
				if le.Uint32(v[32:])&1 != 0 {
					e.Mode &^= 0o222
				}
				sysFile = le.Uint32(v[32:])&4 != 0
			}
		case ntfsAttrFileName:
			if len(a.value) >= 66 && a.value[65] != 2 { // not a DOS-only name
				e.Nlink++
			}
		case ntfsAttrData:
			if a.name == "" && !isDir {
				if a.nonResident && a.startVCN == 0 {
					e.Size = a.dataSize
				} else if !a.nonResident {
					e.Size = int64(len(a.value))
				}
			}
		case ntfsAttrReparse:
			if len(a.value) >= 4 {
				switch le.Uint32(a.value) {
				case ntfsTagSymlink, ntfsTagJunction, ntfsTagLX:
					e.Mode = fs.ModeSymlink | 0o777
					e.Size = 0
				}
			}
		}
	}
	if e.Nlink == 0 {
		e.Nlink = 1
	}
	if e.Mode.IsRegular() && sysFile && e.Size >= 8 && e.Size <= 8+2*maxSymlink {
		if _, ok, err := f.interix(ctx, attrs, id); err != nil {
			return Entry{}, err
		} else if ok {
			e.Mode = fs.ModeSymlink | 0o777
		}
	}
	return e, nil
}

// interix returns the target of an Interix-style symlink (what ntfs-3g
// creates for most symlinks): a system file whose data is "IntxLNK\x01"
// followed by the UTF-16 target.
func (f *ntfsFS) interix(ctx context.Context, attrs []ntfsAttr, id uint64) (string, bool, error) {
	s, err := f.stream(ctx, attrs, ntfsAttrData, "", id)
	if err != nil {
		if err == ErrNotExist || errors.Is(err, ErrUnsupported) {
			return "", false, nil
		}
		return "", false, err
	}
	if s.size < 8 || s.size > 8+2*maxSymlink {
		return "", false, nil
	}
	b, err := readAllFile(s, 8+2*maxSymlink)
	if err != nil {
		return "", false, err
	}
	if string(b[:8]) != "IntxLNK\x01" {
		return "", false, nil
	}
	return utf16String(b[8:]), true, nil
}

func (f *ntfsFS) open(ctx context.Context, id uint64) (File, error) {
	attrs, err := f.attrs(ctx, id)
	if err != nil {
		return nil, err
	}
	s, err := f.stream(ctx, attrs, ntfsAttrData, "", id)
	if err == ErrNotExist {
		return bytesFile(nil), nil
	}
	if err != nil {
		return nil, err
	}
	if s.r == nil || s.size > 1<<50 {
		return nil, corruptf("ntfs MFT record %d data size is corrupt", id)
	}
	return s, nil
}

func (f *ntfsFS) readlink(ctx context.Context, id uint64) (string, error) {
	attrs, err := f.attrs(ctx, id)
	if err != nil {
		return "", err
	}
	for _, a := range attrs {
		if a.typ != ntfsAttrReparse || a.nonResident || len(a.value) < 8 {
			continue
		}
		v := a.value
		tag := le.Uint32(v)
		dlen := int(le.Uint16(v[4:]))
		if 8+dlen > len(v) {
			return "", corruptf("ntfs MFT record %d reparse point is corrupt", id)
		}
		d := v[8 : 8+dlen]
		switch tag {
		case ntfsTagLX:
			if len(d) < 4 {
				return "", corruptf("ntfs MFT record %d symlink is corrupt", id)
			}
			return string(d[4:]), nil
		case ntfsTagSymlink, ntfsTagJunction:
			hdr := 8
			if tag == ntfsTagSymlink {
				hdr = 12
			}
			if len(d) < hdr {
				return "", corruptf("ntfs MFT record %d symlink is corrupt", id)
			}
			buf := d[hdr:]
			get := func(o, l int) (string, bool) {
				if o+l > len(buf) || l%2 != 0 {
					return "", false
				}
				return utf16String(buf[o : o+l]), true
			}
			target, ok := get(int(le.Uint16(d[4:])), int(le.Uint16(d[6:]))) // print name
			if !ok || target == "" {
				target, ok = get(int(le.Uint16(d[0:])), int(le.Uint16(d[2:]))) // substitute name
				target = strings.TrimPrefix(target, `\??\`)
			}
			if !ok {
				return "", corruptf("ntfs MFT record %d symlink is corrupt", id)
			}
			return strings.ReplaceAll(target, `\`, "/"), nil
		}
	}
	if target, ok, err := f.interix(ctx, attrs, id); err != nil || ok {
		return target, err
	}
	return "", ErrNotSymlink
}

func (f *ntfsFS) list(ctx context.Context, id uint64) ([]dirent, error) {
	attrs, err := f.attrs(ctx, id)
	if err != nil {
		return nil, err
	}
	var root []byte
	for _, a := range attrs {
		if a.typ == ntfsAttrIndexRoot && a.name == "$I30" && !a.nonResident {
			root = a.value
		}
	}
	if root == nil {
		return nil, ErrNotDir
	}
	if len(root) < 32 {
		return nil, corruptf("ntfs directory %d index root is corrupt", id)
	}
	blockSize := int64(le.Uint32(root[8:]))
	var out []dirent
	seen := map[dirent]bool{}
	if err := f.parseIndex(root[16:], id, &out, seen); err != nil {
		return nil, err
	}
	alloc, err := f.stream(ctx, attrs, ntfsAttrIndexAlloc, "$I30", id)
	if err == ErrNotExist {
		return out, nil
	}
	if err != nil {
		return nil, err
	}
	if blockSize < 512 || blockSize > 64<<10 || blockSize&(blockSize-1) != 0 {
		return nil, corruptf("ntfs directory %d index block size %d is corrupt", id, blockSize)
	}
	var bitmap []byte
	if bm, err := f.stream(ctx, attrs, ntfsAttrBitmap, "$I30", id); err == nil {
		if bitmap, err = readAllFile(bm, 1<<20); err != nil {
			return nil, err
		}
	}
	blk := make([]byte, blockSize)
	for i := int64(0); i*blockSize < alloc.size; i++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if bitmap != nil && i/8 >= int64(len(bitmap)) {
			break // no block past the bitmap is in use, however large the stream claims to be
		}
		if bitmap != nil && bitmap[i/8]&(1<<(i%8)) == 0 {
			continue
		}
		if n, err := alloc.ReadAt(blk, i*blockSize); n < len(blk) {
			if err == nil || err == io.EOF {
				break
			}
			return nil, err
		}
		if err := ntfsFixup(blk, "INDX"); err != nil {
			return nil, corruptf("ntfs directory %d index block %d is corrupt (%v)", id, i, err)
		}
		if err := f.parseIndex(blk[0x18:], id, &out, seen); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// parseIndex reads the entries of one index node (b starts at its header).
func (f *ntfsFS) parseIndex(b []byte, dir uint64, out *[]dirent, seen map[dirent]bool) error {
	start, end := int(le.Uint32(b[0:])), int(le.Uint32(b[4:]))
	if end > len(b) || start < 16 || start > end {
		return corruptf("ntfs directory %d index node header is corrupt", dir)
	}
	for p := start; p+16 <= end; {
		l := int(le.Uint16(b[p+8:]))
		keyLen := int(le.Uint16(b[p+10:]))
		flags := le.Uint16(b[p+12:])
		if l < 16 || p+l > end {
			return corruptf("ntfs directory %d index entry is corrupt", dir)
		}
		if flags&2 != 0 {
			break
		}
		key := b[p+16 : p+l]
		if keyLen < 66 || keyLen > len(key) || 66+2*int(key[64]) > keyLen {
			return corruptf("ntfs directory %d index entry key is corrupt", dir)
		}
		if key[65] != 2 { // skip DOS-only 8.3 names
			ref := le.Uint64(b[p:]) & (1<<48 - 1)
			name := utf16String(key[66 : 66+2*int(key[64])])
			d := dirent{name: name, id: ref, hidden: ref < ntfsFirstUser}
			if !seen[d] && name != "" && !strings.ContainsAny(name, "/\x00") {
				seen[d] = true
				if len(*out) >= maxDirEntries {
					return corruptf("ntfs directory %d has too many entries", dir)
				}
				*out = append(*out, d)
			}
		}
		p += l
	}
	return nil
}
