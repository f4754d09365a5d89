package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/kura-backup/kura/internal/buildinfo"
)

// kura version, kura --version and kura version --json say the same
// thing, in process (no repository, no password needed).
func TestVersionCommand(t *testing.T) {
	want := buildinfo.Get().String() + "\n"
	for _, args := range [][]string{{"version"}, {"--version"}} {
		var out, errb bytes.Buffer
		a := &app{stdout: &out, stderr: &errb}
		root := a.rootCmd()
		root.SetOut(&out)
		root.SetArgs(args)
		if err := root.Execute(); err != nil {
			t.Fatalf("kura %s: %v (%s)", strings.Join(args, " "), err, errb.String())
		}
		if out.String() != want {
			t.Errorf("kura %s = %q, want %q", strings.Join(args, " "), out.String(), want)
		}
	}

	var out bytes.Buffer
	a := &app{stdout: &out, stderr: &out}
	root := a.rootCmd()
	root.SetArgs([]string{"version", "--json"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	var got buildinfo.Info
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("kura version --json: %v: %s", err, out.String())
	}
	if got.Version != buildinfo.Version || got.GoVersion == "" || got.OS == "" || got.Arch == "" {
		t.Errorf("kura version --json = %+v", got)
	}
}
