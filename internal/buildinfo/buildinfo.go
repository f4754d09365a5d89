// Package buildinfo says which build of kura is running: the release
// version (set at link time) and what the Go toolchain recorded in the
// binary (commit, commit time, whether the tree had local changes, Go
// version, OS and architecture).
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
)

// Version is the release version, set at link time:
//
//	go build -ldflags "-X github.com/kura-backup/kura/internal/buildinfo.Version=v1.2.3"
//
// make build sets it from `git describe --always --dirty`.
var Version = "dev"

// Info describes one build. Fields the toolchain did not record (a build
// with -buildvcs=false, or outside a git checkout) are empty.
type Info struct {
	Version   string `json:"version"`
	Commit    string `json:"commit,omitempty"`
	CommitAt  string `json:"commit_time,omitempty"`
	Modified  *bool  `json:"modified,omitempty"`
	GoVersion string `json:"go_version"`
	OS        string `json:"os"`
	Arch      string `json:"arch"`
	Module    string `json:"module_version,omitempty"`
}

// Get returns the running binary's build information.
func Get() Info {
	bi, _ := debug.ReadBuildInfo()
	return fromBuildInfo(Version, bi)
}

// fromBuildInfo is Get on given inputs, for tests. bi may be nil (a
// binary built without module support).
func fromBuildInfo(version string, bi *debug.BuildInfo) Info {
	in := Info{Version: version, GoVersion: runtime.Version(), OS: runtime.GOOS, Arch: runtime.GOARCH}
	if bi == nil {
		return in
	}
	if bi.GoVersion != "" {
		in.GoVersion = bi.GoVersion
	}
	// "(devel)" is what go build records for the main module; a real
	// version appears with go install module@version.
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		in.Module = v
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Commit = s.Value
		case "vcs.time":
			in.CommitAt = s.Value
		case "vcs.modified":
			m := s.Value == "true"
			in.Modified = &m
		case "GOOS":
			in.OS = s.Value
		case "GOARCH":
			in.Arch = s.Value
		}
	}
	return in
}

// String is the human-readable form, one line:
//
//	kura v1.2.3 (commit 0123abcd4567, 2026-12-01T10:00:00Z, modified) go1.26.8 linux/amd64
func (in Info) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "kura %s", in.Version)
	if in.Module != "" && in.Module != in.Version {
		fmt.Fprintf(&b, " (module %s)", in.Module)
	}
	var vcs []string
	if in.Commit != "" {
		c := in.Commit
		if len(c) > 12 {
			c = c[:12]
		}
		vcs = append(vcs, "commit "+c)
	}
	if in.CommitAt != "" {
		vcs = append(vcs, in.CommitAt)
	}
	if in.Modified != nil && *in.Modified {
		vcs = append(vcs, "modified")
	}
	if len(vcs) > 0 {
		fmt.Fprintf(&b, " (%s)", strings.Join(vcs, ", "))
	}
	fmt.Fprintf(&b, " %s %s/%s", in.GoVersion, in.OS, in.Arch)
	return b.String()
}
