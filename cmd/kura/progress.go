package main

import (
	"fmt"
	"io"
	"time"

	"github.com/kura-backup/kura/internal/units"
)

// progressLine redraws one status line on a terminal until stop is called.
func progressLine(w io.Writer, on bool, render func() string) (stop func()) {
	if !on {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				fmt.Fprint(w, "\r\033[K")
				return
			case <-t.C:
				fmt.Fprint(w, "\r\033[K"+render())
			}
		}
	}()
	return func() { close(done); <-finished }
}

// rateLine formats done/total bytes with rate and ETA.
func rateLine(verb string, done, total int64, started time.Time) string {
	el := time.Since(started).Seconds()
	rate := 0.0
	if el > 0 {
		rate = float64(done) / el
	}
	eta := "?"
	if rate > 0 && total >= done {
		eta = time.Duration(float64(total-done) / rate * float64(time.Second)).Round(time.Second).String()
	}
	pct := 0.0
	if total > 0 {
		pct = 100 * float64(done) / float64(total)
	}
	return fmt.Sprintf("%s %s / %s (%.0f%%)  %s/s  ETA %s", verb, humanBytes(done), humanBytes(total), pct, humanBytes(int64(rate)), eta)
}

func humanBytes(n int64) string { return units.FormatSize(n) }
