package retention

import (
	"fmt"
	"testing"
	"time"
)

func TestApply(t *testing.T) {
	base := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	// One backup every 6 hours for 60 days, oldest first.
	var items []Item
	for i := 0; i < 240; i++ {
		tm := base.Add(-time.Duration(239-i) * 6 * time.Hour)
		items = append(items, Item{ID: fmt.Sprint(i), Time: tm})
	}
	cases := []struct {
		name string
		p    Policy
		want int
	}{
		{"last 3", Policy{Last: 3}, 3},
		{"daily 7", Policy{Daily: 7}, 7},
		{"last 3 overlaps daily 7", Policy{Last: 3, Daily: 7}, 9},
		{"weekly 4", Policy{Weekly: 4}, 4},
		{"monthly 6 over 60 days", Policy{Monthly: 6}, 3},
		{"all kept with negative", Policy{Last: -1}, 240},
		{"nothing", Policy{}, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ds := Apply(items, tc.p, time.UTC)
			kept := 0
			for _, d := range ds {
				if d.Keep {
					kept++
				}
			}
			if kept != tc.want {
				t.Fatalf("kept %d, want %d", kept, tc.want)
			}
			if tc.p.Last > 0 && (!ds[0].Keep || ds[0].ID != "239") {
				t.Fatalf("newest not kept first: %+v", ds[0])
			}
		})
	}
}

func TestDailyKeepsNewestOfEachDay(t *testing.T) {
	day := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	items := []Item{{"a", day.Add(1 * time.Hour)}, {"b", day.Add(23 * time.Hour)}, {"c", day.Add(25 * time.Hour)}}
	ds := Apply(items, Policy{Daily: 2}, time.UTC)
	got := map[string]bool{}
	for _, d := range ds {
		got[d.ID] = d.Keep
	}
	if !got["b"] || !got["c"] || got["a"] {
		t.Fatalf("kept %v, want b and c", got)
	}
}
