package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// maxWorkers bounds --workers: more goroutines than this only add memory.
const maxWorkers = 1024

// rangeKey is the flag annotation that holds a numeric flag's valid
// range: its minimum, its maximum and how to say it ("1 to 1024").
const rangeKey = "kura-range"

// numRange declares the values a numeric flag (int, int64, float64)
// accepts when it is given. A flag left out keeps its default, which may
// lie outside the range (0 for "choose for me"): hint says so.
func numRange(f *pflag.FlagSet, name string, lo, hi float64, hint string) {
	mustAnnotate(f, name, []string{strconv.FormatFloat(lo, 'f', -1, 64), strconv.FormatFloat(hi, 'f', -1, 64), hint})
}

// durRange declares the durations a duration flag accepts when given.
func durRange(f *pflag.FlagSet, name string, lo, hi time.Duration, hint string) {
	mustAnnotate(f, name, []string{shortDur(lo), shortDur(hi), hint})
}

func mustAnnotate(f *pflag.FlagSet, name string, v []string) {
	if err := f.SetAnnotation(name, rangeKey, v); err != nil {
		panic(fmt.Sprintf("flag range for --%s: %v", name, err)) // a programming error
	}
}

// checkRanges refuses a numeric flag given outside its declared range
// with one line naming the flag and the range: --workers 0, --keep-last
// -1, --timeout -5s mean nothing and must not be taken as "default" or
// "everything".
func checkRanges(cmd *cobra.Command) error {
	var err error
	cmd.Flags().Visit(func(f *pflag.Flag) {
		r, ok := f.Annotations[rangeKey]
		if !ok || err != nil || len(r) != 3 {
			return
		}
		err = checkRange(f, r[0], r[1], r[2])
	})
	return err
}

func checkRange(f *pflag.Flag, lo, hi, hint string) error {
	bad := func() error {
		msg := fmt.Sprintf("--%s %s: use %s to %s", f.Name, f.Value.String(), lo, hi)
		if hint != "" {
			msg += " (" + hint + ")"
		}
		return fmt.Errorf("%s", msg)
	}
	if f.Value.Type() == "duration" {
		v, err1 := time.ParseDuration(f.Value.String())
		l, err2 := time.ParseDuration(lo)
		h, err3 := time.ParseDuration(hi)
		if err1 != nil || err2 != nil || err3 != nil {
			return bad()
		}
		if v < l || v > h {
			return bad()
		}
		return nil
	}
	v, err1 := strconv.ParseFloat(f.Value.String(), 64)
	l, err2 := strconv.ParseFloat(lo, 64)
	h, err3 := strconv.ParseFloat(hi, 64)
	if err1 != nil || err2 != nil || err3 != nil || v < l || v > h || v != v {
		return bad()
	}
	return nil
}

// shortDur writes d without trailing zero units: 24h, 1m, 1h30m, 1s.
func shortDur(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
