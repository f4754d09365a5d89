// Package childenv starts the programs kura runs (qemu-storage-daemon,
// qemu-img, QEMU, fusermount, the thaw watchdog, kura itself for
// exports) with kura's environment less its secrets: a child has no use
// for the repository password, and whatever it leaves in a core dump,
// a log of its environment or /proc/PID/environ (readable by its user)
// must not hold it.
//
// exec.Cmd with a nil Env inherits everything, so every child is made
// here, or given Environ() as its Env.
package childenv

import (
	"context"
	"os"
	"os/exec"
	"strings"
)

// storageSecrets are the object store's credentials (an S3 repository):
// no child but a kura that opens the repository itself needs them.
var storageSecrets = []string{"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}

// Secret reports whether the environment variable called name holds, or
// points at, one of kura's secrets: KURA_PASSWORD, KURA_NEW_PASSWORD,
// their _FILE forms, any KURA_ variable named for a password, a secret, a
// token or a key, and the object store's secret key and session token.
func Secret(name string) bool {
	n := strings.ToUpper(name)
	if storageSecret(n) {
		return true
	}
	if !strings.HasPrefix(n, "KURA_") {
		return false
	}
	for _, w := range []string{"PASSWORD", "PASSPHRASE", "SECRET", "TOKEN", "CREDENTIAL"} {
		if strings.Contains(n, w) {
			return true
		}
	}
	return strings.HasSuffix(n, "_KEY") || strings.Contains(n, "_KEY_")
}

// Filter returns env (as os.Environ writes it) without its secrets. It
// never returns nil, which exec.Cmd would read as "inherit everything".
func Filter(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if !Secret(name) {
			out = append(out, kv)
		}
	}
	return out
}

func storageSecret(name string) bool {
	for _, s := range storageSecrets {
		if name == s {
			return true
		}
	}
	return false
}

// ForKura is the environment of a kura child that opens the repository
// itself (the export instant recovery starts): Environ plus the object
// store's credentials, never the repository password (the child gets the
// unlocked key through a pipe).
func ForKura() []string {
	env := Environ()
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); storageSecret(strings.ToUpper(name)) {
			env = append(env, kv)
		}
	}
	return env
}

// Environ is this process's environment without its secrets.
func Environ() []string { return Filter(os.Environ()) }

// Command is exec.Command with Env set to Environ().
func Command(name string, args ...string) *exec.Cmd {
	c := exec.Command(name, args...)
	c.Env = Environ()
	return c
}

// CommandContext is exec.CommandContext with Env set to Environ().
func CommandContext(ctx context.Context, name string, args ...string) *exec.Cmd {
	c := exec.CommandContext(ctx, name, args...)
	c.Env = Environ()
	return c
}
