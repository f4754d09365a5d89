package benchutil

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

// Log writes a benchmark's progress lines, each with the time of day and
// the seconds since the start, to stderr and, after Setup, to OUT/bench.log.
type Log struct {
	prefix string
	Start  time.Time
	file   io.Writer
}

// NewLog starts the clock of a benchmark whose lines begin with [prefix].
func NewLog(prefix string) *Log {
	return &Log{prefix: prefix, Start: time.Now(), file: io.Discard}
}

// Printf writes one line.
func (l *Log) Printf(format string, a ...any) {
	line := fmt.Sprintf("[%s %s +%4.0fs] %s\n", l.prefix, time.Now().Format("15:04:05"), time.Since(l.Start).Seconds(), fmt.Sprintf(format, a...))
	os.Stderr.WriteString(line)
	l.file.Write([]byte(line))
}

// Fatalf writes an error line and exits with status 1.
func (l *Log) Fatalf(format string, a ...any) {
	l.Printf("ERROR: "+format, a...)
	os.Exit(1)
}

// Setup creates the output directory *out with its logs/, makes *out
// absolute, opens bench.log in it, and exits unless the program runs as
// root (why says what needs root). The returned func closes the log.
func (l *Log) Setup(out *string, why string) func() {
	if err := os.MkdirAll(filepath.Join(*out, "logs"), 0o755); err != nil {
		l.Fatalf("%v", err)
	}
	if abs, err := filepath.Abs(*out); err == nil {
		*out = abs
	}
	f, err := os.OpenFile(filepath.Join(*out, "bench.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		l.Fatalf("%v", err)
	}
	l.file = f
	if os.Geteuid() != 0 {
		l.Fatalf("must run as root (%s)", why)
	}
	return func() { f.Close() }
}
