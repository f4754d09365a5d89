// Package units parses the sizes and rates users write in flags and in
// the configuration file ("256KiB", "1.5GB", "50MiB/s"), strictly: the
// whole string must be a number and one known unit, or it is an error
// that names the accepted forms. ("1MB" used to be read as 1 byte by a
// parser that stopped at the first letter.)
package units

import (
	"errors"
	"fmt"
	"math"
	"strings"
)

// Forms describes what ParseSize accepts, for error messages.
const Forms = "a number of bytes with an optional unit: K, KiB, M, MiB, G, GiB, T, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), like 256KiB or 1.5GB"

// ErrSyntax is wrapped by the errors of ParseSize and ParseRate.
var ErrSyntax = errors.New("not a size")

// units maps an upper-cased unit to its multiplier.
var units = map[string]int64{
	"": 1, "B": 1,
	"K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
	"G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40,
	"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
}

// ParseSize reads a size in bytes: digits, optionally a fraction
// (".5"), optionally spaces and a unit (case does not matter: 64k and
// 64KiB are the same). The result must be a whole number of bytes that
// fits an int64. Zero is accepted; callers refuse it where it means
// nothing.
func ParseSize(s string) (int64, error) {
	bad := func(why string) (int64, error) {
		return 0, fmt.Errorf("%q is %w (%s): use %s", s, ErrSyntax, why, Forms)
	}
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && (t[i] >= '0' && t[i] <= '9' || t[i] == '.') {
		i++
	}
	num, unit := t[:i], strings.ToUpper(strings.TrimSpace(t[i:]))
	if num == "" {
		if strings.HasPrefix(t, "-") {
			return bad("negative")
		}
		return bad("no number")
	}
	mult, ok := units[unit]
	if !ok {
		return bad(fmt.Sprintf("unknown unit %q", t[i:]))
	}
	whole, frac, hasDot := strings.Cut(num, ".")
	if strings.Contains(frac, ".") || whole == "" && frac == "" || hasDot && frac == "" {
		return bad("malformed number")
	}
	var n int64
	for _, c := range whole {
		if n > (math.MaxInt64-9)/10 {
			return bad("too large")
		}
		n = n*10 + int64(c-'0')
	}
	if n > math.MaxInt64/mult {
		return bad("too large")
	}
	n *= mult
	if frac != "" {
		// frac/10^len(frac) of mult must be whole bytes.
		if len(frac) > 12 {
			return bad("too many decimals")
		}
		var f, den int64 = 0, 1
		for _, c := range frac {
			f, den = f*10+int64(c-'0'), den*10
		}
		// mult ≤ 2^40 and f < 10^12: f*mult may overflow; divide first
		// when possible.
		if mult%den == 0 {
			f *= mult / den
		} else {
			if f > math.MaxInt64/mult || f*mult%den != 0 {
				return bad("not a whole number of bytes")
			}
			f = f * mult / den
		}
		if n > math.MaxInt64-f {
			return bad("too large")
		}
		n += f
	}
	return n, nil
}

// ParseRate reads a rate in bytes per second: a size as ParseSize reads
// it, optionally followed by "/s" ("50MiB/s", "200MB"). Zero is refused:
// a rate limit of nothing would stall forever.
func ParseRate(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(t, "/s")
	n, err := ParseSize(t)
	if err != nil {
		return 0, fmt.Errorf("%q is not a rate: use a size per second, %s, optionally with /s", s, Forms)
	}
	if n == 0 {
		return 0, fmt.Errorf("%q is not a rate: it must be more than 0 bytes per second (leave the limit out for none)", s)
	}
	return n, nil
}

// FormatSize writes n bytes for people, in binary units: "512 B",
// "12.3 MiB".
func FormatSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
