package childenv

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestSecret(t *testing.T) {
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"KURA_PASSWORD", true},
		{"KURA_NEW_PASSWORD", true},
		{"KURA_PASSWORD_FILE", true},
		{"KURA_NEW_PASSWORD_FILE", true},
		{"KURA_SMTP_SECRET", true},
		{"KURA_API_TOKEN", true},
		{"KURA_MASTER_KEY", true},
		{"kura_password", true},
		{"KURA_REPO", false},
		{"KURA_CACHE", false},
		{"KURA_KEYBOARD", false},
		{"PATH", false},
		{"HOME", false},
		{"PASSWORD", false}, // not kura's: a child may need its own
		{"AWS_SECRET_ACCESS_KEY", true},
		{"AWS_SESSION_TOKEN", true},
		{"AWS_ACCESS_KEY_ID", false}, // an identifier, not a secret
	} {
		if got := Secret(tc.name); got != tc.want {
			t.Errorf("Secret(%s) = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestFilterNeverNil(t *testing.T) {
	if got := Filter([]string{"KURA_PASSWORD=x"}); got == nil || len(got) != 0 {
		t.Fatalf("Filter of only a secret = %#v, want an empty, non-nil slice", got)
	}
	got := Filter([]string{"A=1", "KURA_PASSWORD=x", "KURA_REPO=/r", "KURA_NEW_PASSWORD=y", "B=2=3"})
	if strings.Join(got, " ") != "A=1 KURA_REPO=/r B=2=3" {
		t.Fatalf("Filter = %q", got)
	}
}

// A child started here does not have the password in its environment,
// as the kernel shows it (/proc/PID/environ), and keeps the rest.
func TestChildHasNoSecrets(t *testing.T) {
	t.Setenv("KURA_PASSWORD", "hunter2-secret")
	t.Setenv("KURA_NEW_PASSWORD", "hunter3-secret")
	t.Setenv("KURA_CHILDENV_TEST", "kept")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, c := range [][]string{{"sleep", "5"}} {
		cmd := CommandContext(ctx, c[0], c[1:]...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		environ, err := readEnviron(cmd.Process.Pid)
		cmd.Process.Kill()
		cmd.Wait()
		if err != nil {
			t.Skipf("no /proc: %v", err)
		}
		if bytes.Contains(environ, []byte("hunter")) || bytes.Contains(environ, []byte("KURA_PASSWORD")) {
			t.Errorf("child's environment holds a secret: %q", environ)
		}
		if !bytes.Contains(environ, []byte("KURA_CHILDENV_TEST=kept")) {
			t.Errorf("child's environment lost an ordinary variable: %q", environ)
		}
	}
	// And through Command, printing its environment.
	out, err := Command("env").Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "hunter") || !strings.Contains(string(out), "KURA_CHILDENV_TEST=kept") {
		t.Errorf("env printed %q", out)
	}
}

// readEnviron reads /proc/PID/environ, waiting for the kernel to fill it
// in: exec returns to the parent a moment before the new program's
// environment is set up.
func readEnviron(pid int) ([]byte, error) {
	for i := 0; ; i++ {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
		if err != nil || len(b) > 0 || i == 100 {
			return b, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A kura child that opens an S3 repository itself gets the object store's
// credentials back, and still not the repository password.
func TestForKura(t *testing.T) {
	t.Setenv("KURA_PASSWORD", "pw")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "sk")
	env := strings.Join(ForKura(), "\n")
	if !strings.Contains(env, "AWS_SECRET_ACCESS_KEY=sk") || strings.Contains(env, "KURA_PASSWORD") {
		t.Fatalf("ForKura: %q", env)
	}
	if strings.Contains(strings.Join(Environ(), "\n"), "AWS_SECRET_ACCESS_KEY") {
		t.Fatal("Environ keeps the object store's secret key")
	}
}
