package qemuargs

import "strings"

// kvList is a QEMU option argument: key=value pairs separated by commas,
// with ",," standing for a comma inside a value. Its order is kept.
type kvList struct {
	keys, vals []string
}

// parseKV splits s. A first element without '=' is the value of implied
// (QEMU's implied key, such as a -device's driver); with implied "" it is
// kept under the key "".
func parseKV(s, implied string) *kvList {
	kv := &kvList{}
	var elems []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			elems = append(elems, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	elems = append(elems, cur.String())
	for i, e := range elems {
		k, v, ok := strings.Cut(e, "=")
		if !ok {
			if i == 0 {
				k, v = implied, e
			} else {
				k, v = e, "" // a bare flag such as "server" in old syntax
			}
			kv.keys = append(kv.keys, k)
			kv.vals = append(kv.vals, v)
			kv.markBare(len(kv.keys)-1, i == 0)
			continue
		}
		kv.keys = append(kv.keys, k)
		kv.vals = append(kv.vals, v)
	}
	return kv
}

// bare marks elements written without '=' so that String writes them the
// same way; kept as a key prefix that cannot occur in QEMU keys.
const bareMark = "\x00"

func (kv *kvList) markBare(i int, first bool) {
	if first {
		kv.keys[i] = bareMark + kv.keys[i]
		return
	}
	kv.keys[i] = bareMark + bareMark + kv.keys[i]
}

func (kv *kvList) index(key string) int {
	for i, k := range kv.keys {
		if strings.TrimLeft(k, bareMark) == key && !strings.HasPrefix(k, bareMark+bareMark) {
			return i
		}
	}
	return -1
}

func (kv *kvList) get(key string) string {
	if i := kv.index(key); i >= 0 {
		return kv.vals[i]
	}
	return ""
}

func (kv *kvList) set(key, val string) {
	if i := kv.index(key); i >= 0 {
		kv.vals[i] = val
		return
	}
	kv.keys = append(kv.keys, key)
	kv.vals = append(kv.vals, val)
}

func (kv *kvList) del(key string) {
	if i := kv.index(key); i >= 0 {
		kv.keys = append(kv.keys[:i], kv.keys[i+1:]...)
		kv.vals = append(kv.vals[:i], kv.vals[i+1:]...)
	}
}

func (kv *kvList) delPrefix(prefix string) {
	for i := 0; i < len(kv.keys); i++ {
		if strings.HasPrefix(kv.keys[i], prefix) {
			kv.keys = append(kv.keys[:i], kv.keys[i+1:]...)
			kv.vals = append(kv.vals[:i], kv.vals[i+1:]...)
			i--
		}
	}
}

// String writes the list back in QEMU's syntax.
func (kv *kvList) String() string {
	var b strings.Builder
	for i, k := range kv.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		switch {
		case strings.HasPrefix(k, bareMark+bareMark):
			b.WriteString(escape(strings.TrimLeft(k, bareMark)))
		case strings.HasPrefix(k, bareMark):
			b.WriteString(escape(kv.vals[i]))
		default:
			b.WriteString(k)
			b.WriteByte('=')
			b.WriteString(escape(kv.vals[i]))
		}
	}
	return b.String()
}

// escape doubles the commas of a value.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }
