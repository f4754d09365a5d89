package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kura-backup/kura/internal/config"
	"github.com/kura-backup/kura/internal/source/libvirt"
)

func TestSelects(t *testing.T) {
	web := libvirt.DomainInfo{Name: "web01", Tags: []string{"frontend"}}
	db := libvirt.DomainInfo{Name: "db01", Tags: []string{"database", "critical"}}
	tests := []struct {
		name    string
		job     config.Job
		web, db bool
	}{
		{"all", config.Job{All: true}, true, true},
		{"exact name", config.Job{VMs: []string{"db01"}}, false, true},
		{"glob", config.Job{VMs: []string{"web*"}}, true, false},
		{"glob that matches nothing", config.Job{VMs: []string{"mail?"}}, false, false},
		{"tag", config.Job{Tags: []string{"critical"}}, false, true},
		{"name or tag", config.Job{VMs: []string{"web01"}, Tags: []string{"database"}}, true, true},
		{"nothing", config.Job{}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := selects(&tt.job, web); got != tt.web {
				t.Errorf("selects web01 = %v, want %v", got, tt.web)
			}
			if got := selects(&tt.job, db); got != tt.db {
				t.Errorf("selects db01 = %v, want %v", got, tt.db)
			}
		})
	}
}

// Disks on one filesystem share a datastore named after its block device
// (the one /proc/diskstats counts); a path that does not exist is unknown.
func TestDatastoreOf(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	os.WriteFile(a, nil, 0o600)
	os.WriteFile(b, nil, 0o600)
	na, da := datastoreOf(a)
	nb, db := datastoreOf(b)
	if na != nb || da != db || na == "" || na == "unknown" {
		t.Errorf("datastores of two files in one directory: %q (%q) and %q (%q)", na, da, nb, db)
	}
	if da != "" && !strings.Contains(string(must(os.ReadFile("/proc/diskstats"))), " "+da+" ") {
		t.Errorf("device %q is not in /proc/diskstats", da)
	}
	if n, d := datastoreOf(filepath.Join(dir, "missing")); n != "unknown" || d != "" {
		t.Errorf("datastore of a missing file: %q, %q", n, d)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
