// Package notify tells people that a backup run did not fully succeed: a
// JSON POST to a webhook, an e-mail through an SMTP server. Each sender
// gives up within its timeout; a notification that cannot be delivered is
// an error for the caller to log and count, never a reason to stop
// backing up.
package notify

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/mail"
	"net/smtp"
	"os"
	"strings"
	"time"
)

// Message is one run that failed or left VMs unprotected.
type Message struct {
	Job     string    `json:"job"`
	Run     int64     `json:"run"`
	Status  string    `json:"status"`  // "failed", "partial"
	Summary string    `json:"summary"` // which VMs, and why
	Time    time.Time `json:"time"`
	Host    string    `json:"host"`
}

// Subject is the one line that says what happened.
func (m Message) Subject() string {
	return fmt.Sprintf("kura on %s: job %s run %d %s", m.Host, m.Job, m.Run, m.Status)
}

// DefaultTimeout bounds one delivery when a sender sets none.
const DefaultTimeout = 10 * time.Second

// Webhook posts the message as JSON to URL.
type Webhook struct {
	URL     string
	Timeout time.Duration
}

// Send posts m; any answer but 2xx is an error.
func (w Webhook) Send(ctx context.Context, m Message) error {
	ctx, cancel := context.WithTimeout(ctx, orDefault(w.Timeout))
	defer cancel()
	body, err := json.Marshal(m)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.URL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("webhook %s: %w", w.URL, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "kura")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("webhook: %w", err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("webhook %s answered %s", w.URL, resp.Status)
	}
	return nil
}

// TLS modes of Email.
const (
	TLSStartTLS = "starttls" // upgrade with STARTTLS; fail if the server does not offer it
	TLSImplicit = "tls"      // TLS from the first byte (SMTPS, port 465)
	TLSNone     = "none"     // plain text (a relay on localhost)
)

// Email sends the message through an SMTP server.
type Email struct {
	Server   string // host:port
	From     string
	To       []string
	Username string // AUTH PLAIN when set (over TLS only)
	Password string
	TLS      string // TLSStartTLS (default), TLSImplicit or TLSNone
	// CAFile, when set, is the PEM bundle the server's certificate must
	// chain to instead of the system's roots.
	CAFile  string
	Timeout time.Duration
}

// Send delivers m to every address of To, or fails with what the server
// said.
func (e Email) Send(ctx context.Context, m Message) error {
	ctx, cancel := context.WithTimeout(ctx, orDefault(e.Timeout))
	defer cancel()
	host, _, err := net.SplitHostPort(e.Server)
	if err != nil {
		return fmt.Errorf("e-mail server %q: %w", e.Server, err)
	}
	from, err := mail.ParseAddress(e.From)
	if err != nil {
		return fmt.Errorf("e-mail sender %q: %w", e.From, err)
	}
	var to []*mail.Address
	for _, s := range e.To {
		a, err := mail.ParseAddress(s)
		if err != nil {
			return fmt.Errorf("e-mail recipient %q: %w", s, err)
		}
		to = append(to, a)
	}
	if len(to) == 0 {
		return errors.New("e-mail: no recipient")
	}
	tlsConf := &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	if e.CAFile != "" {
		pem, err := os.ReadFile(e.CAFile)
		if err != nil {
			return fmt.Errorf("e-mail CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("e-mail CA file %s holds no PEM certificate", e.CAFile)
		}
		tlsConf.RootCAs = pool
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", e.Server)
	if err != nil {
		return fmt.Errorf("e-mail server: %w", err)
	}
	defer conn.Close()
	// net/smtp takes no context: the deadline bounds every exchange, and
	// a cancelled ctx closes the connection.
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	mode := e.TLS
	if mode == "" {
		mode = TLSStartTLS
	}
	if mode == TLSImplicit {
		tc := tls.Client(conn, tlsConf)
		if err := tc.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("e-mail server %s: TLS: %w", e.Server, err)
		}
		conn = tc
	}
	c, err := smtp.NewClient(conn, host)
	if err != nil {
		return fmt.Errorf("e-mail server %s: %w", e.Server, ctxErr(ctx, err))
	}
	defer c.Close()
	if err := c.Hello(localName()); err != nil {
		return fmt.Errorf("e-mail server %s: HELO: %w", e.Server, ctxErr(ctx, err))
	}
	if mode == TLSStartTLS {
		if ok, _ := c.Extension("STARTTLS"); !ok {
			return fmt.Errorf("e-mail server %s does not offer STARTTLS: set tls: none for a plain-text relay you trust, or tls: tls for SMTPS", e.Server)
		}
		if err := c.StartTLS(tlsConf); err != nil {
			return fmt.Errorf("e-mail server %s: STARTTLS: %w", e.Server, ctxErr(ctx, err))
		}
	}
	if e.Username != "" {
		if mode == TLSNone {
			return errors.New("e-mail: a username and password are only sent over TLS: set tls: starttls or tls")
		}
		if err := c.Auth(smtp.PlainAuth("", e.Username, e.Password, host)); err != nil {
			return fmt.Errorf("e-mail server %s: login as %s: %w", e.Server, e.Username, ctxErr(ctx, err))
		}
	}
	if err := c.Mail(from.Address); err != nil {
		return fmt.Errorf("e-mail server %s: sender %s: %w", e.Server, from.Address, ctxErr(ctx, err))
	}
	for _, a := range to {
		if err := c.Rcpt(a.Address); err != nil {
			return fmt.Errorf("e-mail server %s: recipient %s: %w", e.Server, a.Address, ctxErr(ctx, err))
		}
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("e-mail server %s: %w", e.Server, ctxErr(ctx, err))
	}
	if _, err := w.Write(compose(from, to, m)); err != nil {
		return fmt.Errorf("e-mail server %s: %w", e.Server, ctxErr(ctx, err))
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("e-mail server %s refused the message: %w", e.Server, ctxErr(ctx, err))
	}
	return c.Quit()
}

// compose writes the message: headers, a blank line, a plain-text body.
func compose(from *mail.Address, to []*mail.Address, m Message) []byte {
	var b bytes.Buffer
	var tos []string
	for _, a := range to {
		tos = append(tos, a.String())
	}
	var id [12]byte
	rand.Read(id[:])
	domain := from.Address[strings.LastIndexByte(from.Address, '@')+1:]
	fmt.Fprintf(&b, "From: %s\r\n", from.String())
	fmt.Fprintf(&b, "To: %s\r\n", strings.Join(tos, ", "))
	fmt.Fprintf(&b, "Subject: %s\r\n", mime.QEncoding.Encode("utf-8", m.Subject()))
	fmt.Fprintf(&b, "Date: %s\r\n", m.Time.Format(time.RFC1123Z))
	fmt.Fprintf(&b, "Message-ID: <%x@%s>\r\n", id, domain)
	b.WriteString("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\nAuto-Submitted: auto-generated\r\n\r\n")
	body := fmt.Sprintf("Job:     %s\nRun:     %d\nStatus:  %s\nHost:    %s\nTime:    %s\n\n%s\n\nSee `kura runs --run %d` on %s for each VM's result.\n",
		m.Job, m.Run, m.Status, m.Host, m.Time.Format(time.RFC3339), m.Summary, m.Run, m.Host)
	// SMTP lines end in CRLF; a line of a single dot would end DATA, but
	// net/smtp's writer escapes it.
	b.WriteString(strings.ReplaceAll(body, "\n", "\r\n"))
	return b.Bytes()
}

func localName() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "localhost"
	}
	return h
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%v)", ctx.Err(), err)
	}
	// The connection's deadline is ctx's: it can fire a moment before
	// ctx reports it.
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	}
	return err
}

func orDefault(d time.Duration) time.Duration {
	if d <= 0 {
		return DefaultTimeout
	}
	return d
}
