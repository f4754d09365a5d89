package buildinfo

import (
	"encoding/json"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

func TestFromBuildInfo(t *testing.T) {
	bi := &debug.BuildInfo{
		GoVersion: "go1.99.1",
		Main:      debug.Module{Path: "github.com/kura-backup/kura", Version: "(devel)"},
		Settings: []debug.BuildSetting{
			{Key: "GOOS", Value: "linux"},
			{Key: "GOARCH", Value: "arm64"},
			{Key: "vcs", Value: "git"},
			{Key: "vcs.revision", Value: "0123456789abcdef0123456789abcdef01234567"},
			{Key: "vcs.time", Value: "2026-12-01T10:00:00Z"},
			{Key: "vcs.modified", Value: "true"},
		},
	}
	in := fromBuildInfo("v1.2.3", bi)
	if in.Version != "v1.2.3" || in.GoVersion != "go1.99.1" || in.OS != "linux" || in.Arch != "arm64" ||
		in.Commit != "0123456789abcdef0123456789abcdef01234567" || in.CommitAt != "2026-12-01T10:00:00Z" ||
		in.Modified == nil || !*in.Modified || in.Module != "" {
		t.Fatalf("fromBuildInfo = %+v", in)
	}
	want := "kura v1.2.3 (commit 0123456789ab, 2026-12-01T10:00:00Z, modified) go1.99.1 linux/arm64"
	if got := in.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	wantJSON := `{"version":"v1.2.3","commit":"0123456789abcdef0123456789abcdef01234567","commit_time":"2026-12-01T10:00:00Z","modified":true,"go_version":"go1.99.1","os":"linux","arch":"arm64"}`
	if string(b) != wantJSON {
		t.Errorf("JSON = %s, want %s", b, wantJSON)
	}
}

// A clean tree says modified: false (not omitted), so that scripts can
// tell "clean" from "unknown".
func TestCleanTree(t *testing.T) {
	bi := &debug.BuildInfo{Settings: []debug.BuildSetting{{Key: "vcs.modified", Value: "false"}}}
	b, _ := json.Marshal(fromBuildInfo("dev", bi))
	if !strings.Contains(string(b), `"modified":false`) {
		t.Errorf("JSON = %s, want modified:false", b)
	}
	if s := fromBuildInfo("dev", bi).String(); strings.Contains(s, "modified") {
		t.Errorf("String() = %q mentions modified for a clean tree", s)
	}
}

// Without VCS stamps (-buildvcs=false) or build info at all, the output
// still names the version and platform.
func TestNoBuildInfo(t *testing.T) {
	in := fromBuildInfo("dev", nil)
	want := "kura dev " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH
	if got := in.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	b, _ := json.Marshal(in)
	if strings.Contains(string(b), "commit") || strings.Contains(string(b), "modified") {
		t.Errorf("JSON = %s has VCS fields without VCS info", b)
	}
}

func TestGet(t *testing.T) {
	if in := Get(); in.Version != Version || in.GoVersion == "" {
		t.Errorf("Get() = %+v", in)
	}
}
