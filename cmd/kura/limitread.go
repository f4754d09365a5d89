package main

import (
	"context"
	"fmt"

	"github.com/spf13/pflag"

	"github.com/kura-backup/kura/internal/throttle"
	"github.com/kura-backup/kura/internal/units"
)

// limitReadFlag adds --limit-read: the most a backup command reads from
// its disks per second, all its disks and VMs together, so that a backup
// started by hand leaves the datastore's throughput to the guests.
func limitReadFlag(f *pflag.FlagSet, s *string) {
	f.StringVar(s, "limit-read", "", "read at most `RATE` per second from the disks, all of them together (e.g. 50MiB; default: unlimited)")
}

// readGate returns the backup.Options.ReadGate that paces reads to the
// --limit-read value s (nil for ""), or an error naming the flag.
func readGate(s string) (func(context.Context, int) (func(bool), error), error) {
	if s == "" {
		return nil, nil
	}
	rate, err := units.ParseRate(s)
	if err != nil {
		return nil, fmt.Errorf("--limit-read: %w", err)
	}
	return throttle.ReadGate(throttle.NewLimiter(float64(rate), nil), nil), nil
}
