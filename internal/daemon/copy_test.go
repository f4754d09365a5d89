package daemon

import (
	"slices"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/config"
	"github.com/kura-backup/kura/internal/repo"
)

// planCopy selects by VM and latest, knows a restore point by its id and
// by its origins, leaves out what the retention would forget at once, and
// tells per VM what is pending and the newest restore point in the target.
func TestPlanCopy(t *testing.T) {
	t0 := time.Date(2026, 11, 20, 22, 0, 0, 0, time.UTC)
	at := func(days int) time.Time { return t0.Add(time.Duration(days) * 24 * time.Hour) }
	src := []snapSum{
		{ID: "s-web1", Name: "web01", Time: at(1)},
		{ID: "s-web3", Name: "web01", Time: at(3)},
		{ID: "s-web2", Name: "web01", Time: at(2)},
		{ID: "s-db1", Name: "db01", Time: at(1)},
		// A copy itself: the target has another copy of its original.
		{ID: "s-db2", Name: "db01", Time: at(2), From: []repo.Origin{{Repo: "elsewhere", Snapshot: "x-db2"}}},
		{ID: "s-mail1", Name: "mail", Time: at(1)},
	}
	dst := []snapSum{
		{ID: "t-web1", Name: "web01", Time: at(1), From: []repo.Origin{{Repo: "SRC", Snapshot: "s-web1"}}},
		{ID: "t-web0", Name: "web01", Time: at(0)}, // the target's own backup
		{ID: "t-db2", Name: "db01", Time: at(2), From: []repo.Origin{{Repo: "elsewhere", Snapshot: "x-db2"}}},
		{ID: "t-other", Name: "other", Time: at(5)},
	}
	ids := func(ss []snapSum) []string {
		var out []string
		for _, s := range ss {
			out = append(out, s.ID)
		}
		return out
	}
	for _, tc := range []struct {
		name          string
		job           config.CopyJob
		copy          []string
		present, held int
		pending       map[string]int
		newest        map[string]time.Time
	}{
		{"all", config.CopyJob{}, []string{"s-db1", "s-mail1", "s-web2", "s-web3"}, 2, 0,
			map[string]int{"web01": 2, "db01": 1, "mail": 1, "other": 0},
			map[string]time.Time{"web01": at(1), "db01": at(2), "mail": {}, "other": at(5)}},
		{"vms and latest", config.CopyJob{VMs: []string{"web*", "db01"}, Latest: 1}, []string{"s-web3"}, 1, 0,
			map[string]int{"web01": 1, "db01": 0},
			map[string]time.Time{"web01": at(1), "db01": at(2)}},
		{"latest 2", config.CopyJob{VMs: []string{"web01"}, Latest: 2}, []string{"s-web2", "s-web3"}, 0, 0,
			map[string]int{"web01": 2}, map[string]time.Time{"web01": at(1)}},
		// keep_last 2 over the target's web01 (days 0, 1) and the
		// missing (days 2, 3) keeps days 2 and 3: both are copied; with
		// keep_last 1 only day 3.
		{"retention keeps", config.CopyJob{VMs: []string{"web01"}, Retention: config.Retention{Last: 2}}, []string{"s-web2", "s-web3"}, 1, 0,
			map[string]int{"web01": 2}, map[string]time.Time{"web01": at(1)}},
		{"retention holds", config.CopyJob{VMs: []string{"web01"}, Retention: config.Retention{Last: 1}}, []string{"s-web3"}, 1, 1,
			map[string]int{"web01": 1}, map[string]time.Time{"web01": at(1)}},
		{"nothing selected", config.CopyJob{VMs: []string{"nosuch"}}, nil, 0, 0, map[string]int{}, map[string]time.Time{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := planCopy(&tc.job, "SRC", "DST", src, dst)
			if got := ids(p.copy); len(got) != len(tc.copy) || (len(got) > 0 && !slices.Equal(got, tc.copy)) {
				t.Errorf("copies %v, want %v", got, tc.copy)
			}
			if p.present != tc.present || p.held != tc.held {
				t.Errorf("present %d held %d, want %d, %d", p.present, p.held, tc.present, tc.held)
			}
			if len(p.vms) != len(tc.pending) {
				t.Errorf("VMs %v, want %v", p.vms, tc.pending)
			}
			for vm, n := range tc.pending {
				v := p.vms[vm]
				if v == nil || v.pending != n || !v.newest.Equal(tc.newest[vm]) {
					t.Errorf("%s: %+v, want %d pending, newest %s", vm, v, n, tc.newest[vm])
				}
			}
		})
	}
}
