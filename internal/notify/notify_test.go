package notify

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/notify/smtptest"
)

var msg = Message{Job: "nightly", Run: 42, Status: "partial", Summary: "2 of 3 VMs backed up; db01: not found",
	Time: time.Date(2026, 11, 26, 3, 0, 0, 0, time.UTC), Host: "host1"}

func TestWebhook(t *testing.T) {
	var got Message
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, "bad request", 400)
			return
		}
		json.NewDecoder(r.Body).Decode(&got)
	}))
	defer ok.Close()
	refusing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "nope", http.StatusInternalServerError)
	}))
	defer refusing.Close()
	release := make(chan struct{})
	hanging := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	defer hanging.Close()
	defer close(release)
	closed := "http://" + closedPort(t)

	if err := (Webhook{URL: ok.URL}).Send(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
	if got != msg {
		t.Errorf("the webhook received %+v, want %+v", got, msg)
	}
	tests := []struct {
		name, url, want string
	}{
		{"refused", refusing.URL, "500"},
		{"unreachable", closed, "refused"},
		{"hangs", hanging.URL, "deadline"},
		{"bad url", "::nope", "missing protocol scheme"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			err := Webhook{URL: tt.url, Timeout: 300 * time.Millisecond}.Send(context.Background(), msg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Send: %v, want an error with %q", err, tt.want)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("Send took %s with a 300 ms timeout", d)
			}
		})
	}
}

func closedPort(t *testing.T) string { return smtptest.FreeAddr(t) }

func TestEmail(t *testing.T) {
	srv := smtptest.Start(t, "", "")
	e := Email{Server: srv.Addr, From: "Kura <kura@host1.example>", To: []string{"ops@example.com", "Backup Admin <admin@example.com>"}, TLS: TLSNone}
	if err := e.Send(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
	ms := srv.Messages(t)
	if len(ms) != 1 {
		t.Fatalf("%d messages delivered, want 1", len(ms))
	}
	m := ms[0]
	if s := m.Header.Get("Subject"); s != "kura on host1: job nightly run 42 partial" {
		t.Errorf("Subject %q", s)
	}
	to, err := m.Header.AddressList("To")
	if err != nil || len(to) != 2 || to[1].Address != "admin@example.com" {
		t.Errorf("To %v (%v)", to, err)
	}
	body, _ := io.ReadAll(m.Body)
	for _, want := range []string{"db01: not found", "Run:     42", "kura runs --run 42"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("body lacks %q:\n%s", want, body)
		}
	}

	// STARTTLS required, and not offered by this server.
	e.TLS = ""
	if err := e.Send(context.Background(), msg); err == nil || !strings.Contains(err.Error(), "does not offer STARTTLS") {
		t.Errorf("Send without STARTTLS offered: %v", err)
	}
	// No password over plain text.
	e.TLS, e.Username, e.Password = TLSNone, "kura", "secret"
	if err := e.Send(context.Background(), msg); err == nil || !strings.Contains(err.Error(), "only sent over TLS") {
		t.Errorf("Send with a password in plain text: %v", err)
	}
	if n := len(srv.Messages(t)); n != 1 {
		t.Errorf("%d messages after the refusals, want 1", n)
	}
}

func TestEmailStartTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := selfSigned(t, dir)
	srv := smtptest.Start(t, certFile, keyFile)
	e := Email{Server: srv.Addr, From: "kura@host1.example", To: []string{"ops@example.com"}, CAFile: certFile}
	if err := e.Send(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
	if n := len(srv.Messages(t)); n != 1 {
		t.Fatalf("%d messages delivered, want 1", n)
	}
	// The server's certificate is checked.
	e.CAFile = ""
	if err := e.Send(context.Background(), msg); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("Send to an untrusted certificate: %v", err)
	}
}

func TestEmailErrors(t *testing.T) {
	// A server that accepts and never greets.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	tests := []struct {
		name string
		e    Email
		want string
	}{
		{"silent server", Email{Server: l.Addr().String(), From: "k@x.example", To: []string{"o@x.example"}, TLS: TLSNone, Timeout: 300 * time.Millisecond}, "deadline"},
		{"nothing listens", Email{Server: closedPort(t), From: "k@x.example", To: []string{"o@x.example"}, TLS: TLSNone}, "refused"},
		{"no port", Email{Server: "mail.example", From: "k@x.example", To: []string{"o@x.example"}}, "missing port"},
		{"bad sender", Email{Server: "127.0.0.1:25", From: "not an address", To: []string{"o@x.example"}}, "sender"},
		{"bad recipient", Email{Server: "127.0.0.1:25", From: "k@x.example", To: []string{"@@"}}, "recipient"},
		{"no recipient", Email{Server: "127.0.0.1:25", From: "k@x.example"}, "no recipient"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			err := tt.e.Send(context.Background(), msg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Send: %v, want an error with %q", err, tt.want)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("Send took %s", d)
			}
		})
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return certFile, keyFile
}
