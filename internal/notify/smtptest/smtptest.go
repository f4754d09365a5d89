// Package smtptest runs a real SMTP server for tests: aiosmtpd (Debian's
// python3-aiosmtpd, installed by scripts/deps.sh), delivering into a
// Maildir that the test reads back.
package smtptest

import (
	"net"
	"net/mail"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// python is Debian's interpreter, which has the aiosmtpd package (a python3
// earlier in PATH, such as pyenv's, may not).
const python = "/usr/bin/python3"

// Server is a running aiosmtpd.
type Server struct {
	Addr    string // 127.0.0.1:port
	Maildir string
}

// Start runs aiosmtpd on a free local port until the test ends. With a
// certificate and key it offers and requires STARTTLS. Without aiosmtpd the
// test is skipped, or fails when $CI is set.
func Start(t testing.TB, certFile, keyFile string) *Server {
	t.Helper()
	if err := exec.Command(python, "-c", "import aiosmtpd").Run(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("aiosmtpd is not installed (scripts/deps.sh installs python3-aiosmtpd): %v", err)
		}
		t.Skipf("aiosmtpd is not installed: apt-get install python3-aiosmtpd (%v)", err)
	}
	s := &Server{Addr: FreeAddr(t), Maildir: filepath.Join(t.TempDir(), "Maildir")}
	args := []string{"-m", "aiosmtpd", "-n", "-l", s.Addr, "-c", "aiosmtpd.handlers.Mailbox"}
	if certFile != "" {
		args = append(args, "--tlscert", certFile, "--tlskey", keyFile)
	}
	cmd := exec.Command(python, append(args, s.Maildir)...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for end := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", s.Addr); err == nil {
			c.Close()
			return s
		}
		if time.Now().After(end) {
			t.Fatalf("aiosmtpd did not listen on %s: %s", s.Addr, out.String())
		}
	}
}

// Messages returns the messages delivered so far.
func (s *Server) Messages(t testing.TB) []*mail.Message {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(s.Maildir, "new", "*"))
	var ms []*mail.Message
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		m, err := mail.ReadMessage(strings.NewReader(string(b)))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		ms = append(ms, m)
	}
	return ms
}

// FreeAddr returns a local host:port where nothing listens.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}
