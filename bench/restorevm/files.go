package main

import (
	"context"
	"fmt"
	"strings"
)

// listings times `kura files ls` of the root disk's /etc and of a directory
// of the data disk, LsRuns times each, the page cache dropped before each.
func (b *bench) listings(ctx context.Context) error {
	cases := []struct {
		label, what string
		args        []string
	}{
		{"etc", "/etc on the root disk (vda)", []string{b.guestName + "@latest", "/etc"}},
		{"data", b.cfg.LsDir + " on the data disk (vdb)", []string{b.guestName + "@latest", "--disk", "vdb", b.cfg.LsDir}},
	}
	env, unset := b.kuraEnv()
	for _, c := range cases {
		ls := Listing{What: c.what, Command: "kura files ls " + strings.Join(c.args, " ")}
		for i := 1; i <= b.cfg.LsRuns; i++ {
			if err := dropCaches(ctx); err != nil {
				return err
			}
			argv := append([]string{b.cfg.Kura, "-q", "files", "ls"}, c.args...)
			m, out, err := b.measure(ctx, fmt.Sprintf("files-ls-%s-%d", c.label, i), false, env, unset, argv...)
			if err != nil {
				return err
			}
			ls.Runs = append(ls.Runs, m.Seconds)
			ls.Entries = len(strings.Split(strings.TrimSpace(out), "\n"))
		}
		ls.Median = median(ls.Runs)
		if ls.Entries < 10 {
			return fmt.Errorf("%s listed only %d lines: see logs/files-ls-%s-*.log", ls.Command, ls.Entries, c.label)
		}
		logf("%s: median %.2f s over %d runs, %d lines", ls.Command, ls.Median, len(ls.Runs), ls.Entries)
		b.res.Listings = append(b.res.Listings, ls)
	}
	return nil
}
