package guestfs

import (
	"context"
	"io"
	"io/fs"
	"strings"
	"time"
	"unicode/utf16"
)

// FAT12/16/32 reader with VFAT long names. Files are identified by the byte
// offset of their 32-byte short directory entry on the volume; the root
// directory, which has none, by fatRootID.

const fatRootID = 1

type fatFS struct {
	r            io.ReaderAt
	bytesPerSec  int64
	clusterSize  int64
	fatOff       int64 // first FAT
	fatBytes     int64
	rootOff      int64 // FAT12/16 fixed root directory
	rootBytes    int64
	rootCluster  uint32 // FAT32
	dataOff      int64
	clusterCount uint32
	bits         int // 12, 16, 32
	label        string
}

// fatBPB validates a FAT boot sector and returns the parsed geometry.
func fatBPB(b []byte, volSize int64) (*fatFS, error) {
	if len(b) < 512 || b[510] != 0x55 || b[511] != 0xAA {
		return nil, corruptf("vfat boot sector is corrupt (no 0x55AA signature) — the disk image is damaged or is not FAT")
	}
	if b[0] != 0xEB && b[0] != 0xE9 {
		return nil, corruptf("vfat boot sector is corrupt (no jump instruction)")
	}
	f := &fatFS{bytesPerSec: int64(le.Uint16(b[11:]))}
	spc := int64(b[13])
	reserved := int64(le.Uint16(b[14:]))
	nfats := int64(b[16])
	rootEnts := int64(le.Uint16(b[17:]))
	total := int64(le.Uint16(b[19:]))
	if total == 0 {
		total = int64(le.Uint32(b[32:]))
	}
	fatSz := int64(le.Uint16(b[22:]))
	fat32 := fatSz == 0
	if fat32 {
		fatSz = int64(le.Uint32(b[36:]))
	}
	bps := f.bytesPerSec
	switch {
	case bps < 512 || bps > 4096 || bps&(bps-1) != 0:
		return nil, corruptf("vfat boot sector is corrupt (%d bytes per sector)", bps)
	case spc == 0 || spc&(spc-1) != 0:
		return nil, corruptf("vfat boot sector is corrupt (%d sectors per cluster)", spc)
	case reserved == 0 || nfats == 0 || fatSz == 0 || total == 0:
		return nil, corruptf("vfat boot sector is corrupt (geometry)")
	case fat32 && rootEnts != 0:
		return nil, corruptf("vfat boot sector is corrupt (FAT32 with a fixed root directory)")
	}
	f.clusterSize = bps * spc
	f.fatOff = reserved * bps
	f.fatBytes = fatSz * bps
	f.rootOff = f.fatOff + nfats*f.fatBytes
	f.rootBytes = (rootEnts*32 + bps - 1) / bps * bps
	f.dataOff = f.rootOff + f.rootBytes
	if volSize > 0 && total*bps > volSize {
		total = volSize / bps // truncated image: trust what exists
	}
	dataSecs := total - f.dataOff/bps
	if dataSecs <= 0 {
		return nil, corruptf("vfat boot sector is corrupt (no data area)")
	}
	cc := dataSecs / spc
	if cc > 0x0FFFFFF5 {
		cc = 0x0FFFFFF5
	}
	f.clusterCount = uint32(cc)
	labelOff := 43
	switch {
	case fat32:
		f.bits = 32
		f.rootCluster = le.Uint32(b[44:])
		labelOff = 71
	case cc < 4085:
		f.bits = 12
	default:
		f.bits = 16
	}
	if f.fatBytes*8 < (cc+2)*int64(f.bits) {
		return nil, corruptf("vfat boot sector is corrupt (FAT too small for %d clusters)", cc)
	}
	if b[labelOff-5] == 0x29 { // extended boot signature: label present
		f.label = strings.TrimRight(string(b[labelOff:labelOff+11]), " ")
		if f.label == "NO NAME" {
			f.label = ""
		}
	}
	return f, nil
}

func fatProbe(r io.ReaderAt, size int64) (string, bool) {
	b := make([]byte, 512)
	if readFull(r, b, 0) != nil {
		return "", false
	}
	t := string(b[54:62]) + string(b[82:90])
	if !strings.Contains(t, "FAT") {
		return "", false
	}
	f, err := fatBPB(b, size)
	if err != nil {
		return "", false
	}
	return f.label, true
}

func openFAT(r io.ReaderAt, size int64) (*fatFS, error) {
	b := make([]byte, 512)
	if err := readFull(r, b, 0); err != nil {
		return nil, err
	}
	f, err := fatBPB(b, size)
	if err != nil {
		return nil, err
	}
	f.r = r
	return f, nil
}

func (f *fatFS) fsType() string        { return "vfat" }
func (f *fatFS) rootID() uint64        { return fatRootID }
func (f *fatFS) caseInsensitive() bool { return true }

func (f *fatFS) next(c uint32) (uint32, error) {
	var v uint32
	switch f.bits {
	case 12:
		var b [2]byte
		if err := readFull(f.r, b[:], f.fatOff+int64(c)*3/2); err != nil {
			return 0, err
		}
		v = uint32(le.Uint16(b[:]))
		if c&1 != 0 {
			v >>= 4
		}
		v &= 0xFFF
		if v >= 0xFF7 {
			v |= 0x0FFFF000
		}
	case 16:
		var b [2]byte
		if err := readFull(f.r, b[:], f.fatOff+int64(c)*2); err != nil {
			return 0, err
		}
		v = uint32(le.Uint16(b[:]))
		if v >= 0xFFF7 {
			v |= 0x0FFF0000
		}
	default:
		var b [4]byte
		if err := readFull(f.r, b[:], f.fatOff+int64(c)*4); err != nil {
			return 0, err
		}
		v = le.Uint32(b[:]) & 0x0FFFFFFF
	}
	return v, nil
}

// chain maps a cluster chain to extents covering at most maxBytes.
func (f *fatFS) chain(ctx context.Context, start uint32, maxBytes int64, what string) ([]extent, error) {
	var out []extent
	var logical int64
	c := start
	for steps := uint32(0); logical < maxBytes; steps++ {
		if steps&1023 == 0 {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		if c < 2 || c-2 >= f.clusterCount || steps > f.clusterCount {
			return nil, corruptf("vfat %s cluster chain is corrupt (cluster %d)", what, c)
		}
		phys := f.dataOff + int64(c-2)*f.clusterSize
		if k := len(out); k > 0 && out[k-1].phys+out[k-1].length == phys {
			out[k-1].length += f.clusterSize
		} else {
			if len(out) >= maxExtents {
				return nil, corruptf("vfat %s is too fragmented", what)
			}
			out = append(out, extent{logical: logical, phys: phys, length: f.clusterSize})
		}
		logical += f.clusterSize
		if logical >= maxBytes {
			break
		}
		n, err := f.next(c)
		if err != nil {
			return nil, err
		}
		if n >= 0x0FFFFFF8 {
			break
		}
		c = n
	}
	return out, nil
}

type fatDirent struct {
	name string
	raw  [32]byte
	off  int64
}

func (f *fatFS) entry(id uint64) ([]byte, error) {
	b := make([]byte, 32)
	if err := readFull(f.r, b, int64(id)); err != nil {
		return nil, err
	}
	return b, nil
}

func fatCluster(e []byte) uint32 {
	return uint32(le.Uint16(e[20:]))<<16 | uint32(le.Uint16(e[26:]))
}

func fatTime(date, tim uint16) time.Time {
	if date == 0 {
		return time.Time{}
	}
	return time.Date(1980+int(date>>9), time.Month(date>>5&15), int(date&31),
		int(tim>>11), int(tim>>5&63), int(tim&31)*2, 0, time.UTC)
}

func (f *fatFS) stat(ctx context.Context, id uint64) (Entry, error) {
	if id == fatRootID {
		return Entry{Mode: fs.ModeDir | 0o755, Ino: id, Nlink: 1}, nil
	}
	e, err := f.entry(id)
	if err != nil {
		return Entry{}, err
	}
	attr := e[11]
	ent := Entry{Ino: id, Nlink: 1, Size: int64(le.Uint32(e[28:]))}
	if attr&0x10 != 0 {
		ent.Mode = fs.ModeDir | 0o755
		ent.Size = 0
	} else {
		ent.Mode = 0o644
	}
	if attr&0x01 != 0 {
		ent.Mode &^= 0o222
	}
	ent.ModTime = fatTime(le.Uint16(e[24:]), le.Uint16(e[22:]))
	ent.AccessTime = fatTime(le.Uint16(e[18:]), 0)
	ent.ChangeTime = ent.ModTime
	return ent, nil
}

func (f *fatFS) open(ctx context.Context, id uint64) (File, error) {
	e, err := f.entry(id)
	if err != nil {
		return nil, err
	}
	size := int64(le.Uint32(e[28:]))
	if size == 0 {
		return bytesFile(nil), nil
	}
	ext, err := f.chain(ctx, fatCluster(e), size, "file")
	if err != nil {
		return nil, err
	}
	if n := len(ext); n == 0 || ext[n-1].logical+ext[n-1].length < size {
		return nil, corruptf("vfat file cluster chain is shorter than the file size %d", size)
	}
	return newExtentFile(f.r, size, ext)
}

func (f *fatFS) readlink(ctx context.Context, id uint64) (string, error) {
	return "", ErrNotSymlink
}

const fatMaxDir = 2 << 20 // 65536 entries of 32 bytes

func (f *fatFS) list(ctx context.Context, id uint64) ([]dirent, error) {
	var dir File
	if id == fatRootID && f.bits != 32 {
		dir = &section{r: f.r, off: f.rootOff, size: f.rootBytes}
	} else {
		start := f.rootCluster
		if id != fatRootID {
			e, err := f.entry(id)
			if err != nil {
				return nil, err
			}
			if e[11]&0x10 == 0 {
				return nil, ErrNotDir
			}
			start = fatCluster(e)
			if start == 0 {
				return nil, corruptf("vfat directory at byte %d has no clusters", id)
			}
		}
		ext, err := f.chain(ctx, start, fatMaxDir, "directory")
		if err != nil {
			return nil, err
		}
		size := ext[len(ext)-1].logical + ext[len(ext)-1].length
		if size > fatMaxDir {
			size = fatMaxDir
		}
		dir, err = newExtentFile(f.r, size, ext)
		if err != nil {
			return nil, err
		}
	}
	var out []dirent
	var lfn []uint16
	lfnSum, lfnNext := byte(0), 0
	buf := make([]byte, 32*128)
	for base := int64(0); base < dir.Size(); base += int64(len(buf)) {
		n, err := dir.ReadAt(buf, base)
		if n < len(buf) && err != io.EOF {
			return nil, err
		}
		for p := 0; p+32 <= n; p += 32 {
			e := buf[p : p+32]
			if e[0] == 0 {
				return out, nil
			}
			if e[0] == 0xE5 {
				lfn = nil
				continue
			}
			attr := e[11]
			if attr&0x3F == 0x0F { // long name part
				ord := int(e[0] & 0x3F)
				if e[0]&0x40 != 0 {
					lfn = make([]uint16, 13*ord)
					lfnSum, lfnNext = e[13], ord
				}
				if lfn == nil || ord != lfnNext || ord == 0 || e[13] != lfnSum {
					lfn = nil
					continue
				}
				part := lfn[13*(ord-1):]
				for i, o := range []int{1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30} {
					part[i] = le.Uint16(e[o:])
				}
				lfnNext--
				continue
			}
			if attr&0x08 != 0 { // volume label
				lfn = nil
				continue
			}
			name := ""
			if lfn != nil && lfnNext == 0 && fatChecksum(e) == lfnSum {
				for i, c := range lfn {
					if c == 0 {
						lfn = lfn[:i]
						break
					}
				}
				name = string(utf16.Decode(lfn))
			} else {
				name = fatShortName(e)
			}
			lfn = nil
			if name == "." || name == ".." || name == "" || strings.ContainsAny(name, "/\x00") {
				continue
			}
			off, ok := fatEntryOffset(dir, base+int64(p))
			if !ok {
				return nil, corruptf("vfat directory entry outside the volume")
			}
			out = append(out, dirent{name: name, id: uint64(off)})
			if len(out) > maxDirEntries {
				return nil, corruptf("vfat directory has too many entries")
			}
		}
	}
	return out, nil
}

// fatEntryOffset maps an offset within a directory to a volume offset.
func fatEntryOffset(dir File, off int64) (int64, bool) {
	switch d := dir.(type) {
	case *section:
		return d.off + off, true
	case *extentFile:
		for _, e := range d.ext {
			if off >= e.logical && off < e.logical+e.length {
				return e.phys + off - e.logical, true
			}
		}
	}
	return 0, false
}

func fatChecksum(e []byte) byte {
	var s byte
	for i := 0; i < 11; i++ {
		s = (s>>1 | s<<7) + e[i]
	}
	return s
}

func fatShortName(e []byte) string {
	base := []byte(strings.TrimRight(string(e[0:8]), " "))
	ext := strings.TrimRight(string(e[8:11]), " ")
	if len(base) > 0 && base[0] == 0x05 {
		base[0] = 0xE5
	}
	b := string(base)
	if e[12]&0x08 != 0 {
		b = strings.ToLower(b)
	}
	if e[12]&0x10 != 0 {
		ext = strings.ToLower(ext)
	}
	// Short names are in an OEM code page; keep ASCII and replace the rest.
	name := b
	if ext != "" {
		name += "." + ext
	}
	return strings.Map(func(r rune) rune {
		if r >= 0x80 {
			return '_'
		}
		return r
	}, name)
}
