// Package retention decides which restore points a policy keeps: the last
// N, and the newest one of each of the last N hours, days, weeks, months and
// years (the scheme restic and borg use, so it reads the same).
package retention

import (
	"fmt"
	"time"
)

// Policy says how many restore points to keep of each kind. Zero keeps none
// of that kind; a negative count keeps all.
type Policy struct {
	Last, Hourly, Daily, Weekly, Monthly, Yearly int
}

// Empty reports whether the policy keeps nothing (forget refuses it).
func (p Policy) Empty() bool {
	return p.Last == 0 && p.Hourly == 0 && p.Daily == 0 && p.Weekly == 0 && p.Monthly == 0 && p.Yearly == 0
}

// Item is one restore point's time.
type Item struct {
	ID   string
	Time time.Time
}

// Decision is the verdict on one item, with the rules that kept it.
type Decision struct {
	Item
	Keep    bool
	Reasons []string
}

// Apply decides for items (any order) and returns decisions newest first.
func Apply(items []Item, p Policy, loc *time.Location) []Decision {
	ds := make([]Decision, len(items))
	for i, it := range items {
		ds[i] = Decision{Item: it}
	}
	// newest first
	for i := 1; i < len(ds); i++ {
		for j := i; j > 0 && ds[j].Time.After(ds[j-1].Time); j-- {
			ds[j], ds[j-1] = ds[j-1], ds[j]
		}
	}
	type rule struct {
		name  string
		count int
		key   func(time.Time) string
	}
	rules := []rule{
		{"last", p.Last, nil},
		{"hourly", p.Hourly, func(t time.Time) string { return t.Format("2006-01-02 15") }},
		{"daily", p.Daily, func(t time.Time) string { return t.Format("2006-01-02") }},
		{"weekly", p.Weekly, func(t time.Time) string { y, w := t.ISOWeek(); return fmt.Sprintf("%d-%02d", y, w) }},
		{"monthly", p.Monthly, func(t time.Time) string { return t.Format("2006-01") }},
		{"yearly", p.Yearly, func(t time.Time) string { return t.Format("2006") }},
	}
	for _, r := range rules {
		if r.count == 0 {
			continue
		}
		kept := 0
		last := ""
		for i := range ds {
			if r.count > 0 && kept >= r.count {
				break
			}
			if r.key == nil {
				ds[i].Keep = true
				ds[i].Reasons = append(ds[i].Reasons, r.name)
				kept++
				continue
			}
			k := r.key(ds[i].Time.In(loc))
			if k == last {
				continue
			}
			last = k
			ds[i].Keep = true
			ds[i].Reasons = append(ds[i].Reasons, r.name+" "+k)
			kept++
		}
	}
	return ds
}
