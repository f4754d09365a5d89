package guestfs

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// LVM2: the PV label in one of the first four sectors, the first metadata
// area's current text metadata, and linear logical volumes (any number of
// segments, on any PVs of the VG that are on this disk).

type lvmPV struct {
	off, size int64 // on the disk
	uuid      string
	meta      string // text metadata
	name      string // volume name the PV was found on, for messages
}

const lvmMDAMagic = " LVM2 x[5A%r0N*>"

// lvmProbe returns nil, nil when v holds no LVM label.
func lvmProbe(r io.ReaderAt, v Volume) (*lvmPV, error) {
	sec := make([]byte, 512)
	for s := int64(0); s < 4; s++ {
		if err := readFull(r, sec, s*512); err != nil {
			return nil, nil
		}
		if string(sec[:8]) != "LABELONE" || string(sec[24:32]) != "LVM2 001" {
			continue
		}
		off := int(le.Uint32(sec[20:]))
		if off < 32 || off+40 > 512 {
			return nil, corruptf("PV label is corrupt (header offset %d)", off)
		}
		h := sec[off:]
		pv := &lvmPV{off: v.Offset, size: v.Size, uuid: string(h[:32]), name: v.String()}
		// disk_locn lists: data areas then metadata areas, each ended by
		// a zero entry.
		p, list := 40, 0
		var mdas [][2]int64
		for p+16 <= len(h) && list < 2 {
			o, n := int64(le.Uint64(h[p:])), int64(le.Uint64(h[p+8:]))
			p += 16
			if o == 0 && n == 0 {
				list++
				continue
			}
			if list == 1 {
				mdas = append(mdas, [2]int64{o, n})
			}
		}
		if len(mdas) == 0 {
			return nil, unsupportedf("PV %s has no metadata area", pv.uuid)
		}
		var err error
		for _, m := range mdas {
			if pv.meta, err = lvmReadMDA(r, m[0], v.Size); err == nil {
				return pv, nil
			}
		}
		return nil, err
	}
	return nil, nil
}

func lvmReadMDA(r io.ReaderAt, off, volSize int64) (string, error) {
	h := make([]byte, 512)
	if err := readFull(r, h, off); err != nil {
		return "", err
	}
	if string(h[4:20]) != lvmMDAMagic {
		return "", corruptf("LVM metadata area header is corrupt (bad magic)")
	}
	start, size := int64(le.Uint64(h[24:])), int64(le.Uint64(h[32:]))
	if start != off || size < 1024 || size > volSize || start+size > volSize {
		return "", corruptf("LVM metadata area header is corrupt (area %d+%d)", start, size)
	}
	toff, tsize := int64(le.Uint64(h[40:])), int64(le.Uint64(h[48:]))
	if tsize == 0 || tsize > 4<<20 || tsize > size-512 || toff < 512 || toff >= size {
		return "", corruptf("LVM metadata area is corrupt (text at %d+%d)", toff, tsize)
	}
	text := make([]byte, tsize)
	first := tsize
	if toff+tsize > size { // wraps around the circular buffer
		first = size - toff
	}
	if err := readFull(r, text[:first], start+toff); err != nil {
		return "", err
	}
	if first < tsize {
		if err := readFull(r, text[first:], start+512); err != nil {
			return "", err
		}
	}
	if i := strings.IndexByte(string(text), 0); i >= 0 {
		text = text[:i]
	}
	return string(text), nil
}

// lvmVolumes turns the PVs found on the disk into logical volumes.
func lvmVolumes(ctx context.Context, disk io.ReaderAt, diskSize int64, pvs []*lvmPV) []Volume {
	type vgMeta struct {
		name  string
		seqno int64
		sect  map[string]any
	}
	vgs := map[string]*vgMeta{}
	var out []Volume
	for _, pv := range pvs {
		cfg, err := parseLVMConfig(pv.meta)
		var name string
		var sect map[string]any
		for k, v := range cfg {
			if m, ok := v.(map[string]any); ok && err == nil {
				name, sect = k, m
			}
		}
		if err != nil || sect == nil {
			if err == nil {
				err = corruptf("no volume group section")
			}
			out = append(out, Volume{Name: pv.name, Offset: pv.off, Size: pv.size,
				Err: fmt.Errorf("LVM metadata on %s is unreadable: %w", pv.name, err)})
			continue
		}
		id, _ := sect["id"].(string)
		seq, _ := sect["seqno"].(int64)
		if old, ok := vgs[id]; !ok || old.seqno < seq {
			vgs[id] = &vgMeta{name: name, seqno: seq, sect: sect}
		}
	}
	ids := make([]string, 0, len(vgs))
	for id := range vgs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		vg := vgs[id]
		out = append(out, lvmLVs(vg.name, vg.sect, pvs, diskSize)...)
	}
	return out
}

func lvmLVs(vgName string, vg map[string]any, pvs []*lvmPV, diskSize int64) []Volume {
	extentSize, _ := vg["extent_size"].(int64)
	pvSect, _ := vg["physical_volumes"].(map[string]any)
	lvSect, _ := vg["logical_volumes"].(map[string]any)
	names := make([]string, 0, len(lvSect))
	for n := range lvSect {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []Volume
	for _, n := range names {
		lv, ok := lvSect[n].(map[string]any)
		if !ok || !lvmHas(lv["status"], "VISIBLE") {
			continue
		}
		v := Volume{Name: vgName + "/" + n}
		segs, err := lvmSegments(lv, extentSize, pvSect, pvs, diskSize)
		if err != nil {
			v.Err = fmt.Errorf("LVM volume %s: %w", v.Name, err)
		} else {
			v.segs = segs
			v.Offset = segs[0].pstart
			last := segs[len(segs)-1]
			v.Size = last.lstart + last.size
		}
		out = append(out, v)
	}
	return out
}

func lvmHas(v any, s string) bool {
	l, _ := v.([]any)
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func lvmSegments(lv map[string]any, extentSize int64, pvSect map[string]any, pvs []*lvmPV, diskSize int64) ([]segment, error) {
	if extentSize <= 0 || extentSize > 1<<32 {
		return nil, corruptf("bad extent size %d", extentSize)
	}
	es := extentSize * 512
	var segs []segment
	for k, s := range lv {
		seg, ok := s.(map[string]any)
		if !ok || !strings.HasPrefix(k, "segment") {
			continue
		}
		typ, _ := seg["type"].(string)
		stripeCount, _ := seg["stripe_count"].(int64)
		if typ != "striped" || stripeCount != 1 {
			return nil, unsupportedf("segment type %q with %d stripes (only linear volumes are read; activate it with LVM and image it instead)", typ, stripeCount)
		}
		start, _ := seg["start_extent"].(int64)
		count, _ := seg["extent_count"].(int64)
		stripes, _ := seg["stripes"].([]any)
		if len(stripes) != 2 || count <= 0 || start < 0 || start > 1<<40 || count > 1<<40 {
			return nil, corruptf("segment %s is malformed", k)
		}
		pvName, _ := stripes[0].(string)
		pe, _ := stripes[1].(int64)
		pvm, _ := pvSect[pvName].(map[string]any)
		pvID, _ := pvm["id"].(string)
		peStart, _ := pvm["pe_start"].(int64)
		var pv *lvmPV
		for _, p := range pvs {
			if p.uuid == strings.ReplaceAll(pvID, "-", "") {
				pv = p
			}
		}
		if pv == nil {
			return nil, unsupportedf("it needs physical volume %s, which is not on this disk", pvID)
		}
		pstart := pv.off + peStart*512 + pe*es
		size := count * es
		if pe < 0 || peStart < 0 || pstart+size > pv.off+pv.size || pstart+size > diskSize {
			return nil, corruptf("segment %s lies outside its physical volume", k)
		}
		segs = append(segs, segment{lstart: start * es, pstart: pstart, size: size})
		if len(segs) > 4096 {
			return nil, corruptf("too many segments")
		}
	}
	if len(segs) == 0 {
		return nil, corruptf("no segments")
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i].lstart < segs[j].lstart })
	var next int64
	for _, s := range segs {
		if s.lstart != next {
			return nil, corruptf("segments are not contiguous")
		}
		next += s.size
	}
	return segs, nil
}

// parseLVMConfig parses LVM's text metadata format into nested maps of
// string, int64, []any and map[string]any.
func parseLVMConfig(s string) (map[string]any, error) {
	p := &lvmParser{s: s}
	m, err := p.section(0)
	if err != nil {
		return nil, err
	}
	if p.next() != "" {
		return nil, corruptf("LVM metadata: unexpected %q", p.tok)
	}
	return m, nil
}

type lvmParser struct {
	s    string
	pos  int
	tok  string
	last string // token returned by next: "\"" for a string whose text is in tok
	back bool
}

// next returns the next token; after p.back = true it returns the previous
// one again.
func (p *lvmParser) next() string {
	if p.back {
		p.back = false
		return p.last
	}
	p.last = p.lex()
	return p.last
}

func (p *lvmParser) lex() string {
	for p.pos < len(p.s) {
		c := p.s[p.pos]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			p.pos++
		case c == '#':
			for p.pos < len(p.s) && p.s[p.pos] != '\n' {
				p.pos++
			}
		case strings.IndexByte("={}[],", c) >= 0:
			p.pos++
			p.tok = string(c)
			return p.tok
		case c == '"':
			var b strings.Builder
			p.pos++
			for p.pos < len(p.s) && p.s[p.pos] != '"' {
				if p.s[p.pos] == '\\' && p.pos+1 < len(p.s) {
					p.pos++
				}
				b.WriteByte(p.s[p.pos])
				p.pos++
			}
			p.pos++
			p.tok = b.String()
			return "\"" // marker; the text is in p.tok
		default:
			st := p.pos
			for p.pos < len(p.s) && strings.IndexByte(" \t\r\n#={}[],\"", p.s[p.pos]) < 0 {
				p.pos++
			}
			p.tok = p.s[st:p.pos]
			return p.tok
		}
	}
	p.tok = ""
	return ""
}

func (p *lvmParser) section(depth int) (map[string]any, error) {
	if depth > 16 {
		return nil, corruptf("LVM metadata nests too deep")
	}
	m := map[string]any{}
	for {
		t := p.next()
		if t == "" || t == "}" {
			p.back = true
			return m, nil
		}
		if t == "\"" || strings.IndexByte("={[],", t[0]) >= 0 {
			return nil, corruptf("LVM metadata: unexpected %q", p.tok)
		}
		key := t
		switch p.next() {
		case "{":
			sub, err := p.section(depth + 1)
			if err != nil {
				return nil, err
			}
			if p.next() != "}" {
				return nil, corruptf("LVM metadata: section %s is not closed", key)
			}
			m[key] = sub
		case "=":
			v, err := p.value(depth)
			if err != nil {
				return nil, err
			}
			m[key] = v
		default:
			return nil, corruptf("LVM metadata: expected = or { after %s", key)
		}
		if len(m) > 1<<16 {
			return nil, corruptf("LVM metadata is too large")
		}
	}
}

func (p *lvmParser) value(depth int) (any, error) {
	if depth > 16 {
		return nil, corruptf("LVM metadata nests too deep")
	}
	t := p.next()
	switch {
	case t == "\"":
		return p.tok, nil
	case t == "[":
		var l []any
		for {
			t := p.next()
			if t == "]" {
				return l, nil
			}
			if t == "," {
				continue
			}
			if t == "" || len(l) > 1<<16 {
				return nil, corruptf("LVM metadata: list is not closed")
			}
			p.back = true
			v, err := p.value(depth + 1)
			if err != nil {
				return nil, err
			}
			l = append(l, v)
		}
	case t == "" || strings.IndexByte("={}],", t[0]) >= 0:
		return nil, corruptf("LVM metadata: unexpected %q", t)
	}
	if n, err := strconv.ParseInt(t, 10, 64); err == nil {
		return n, nil
	}
	return t, nil
}
