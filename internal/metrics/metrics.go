// Package metrics keeps the kura daemon's counters and gauges and serves
// them in the Prometheus text exposition format (version 0.0.4) on
// /metrics. It is deliberately small: labelled counters and gauges,
// nothing else, no global registry.
package metrics

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// Registry holds metric families. It is safe for concurrent use.
type Registry struct {
	mu       sync.Mutex
	families map[string]*family
}

type family struct {
	name, help, typ string
	labels          []string
	values          map[string]*sample // by joined label values
}

type sample struct {
	labelValues []string
	v           float64
}

// New returns an empty registry.
func New() *Registry { return &Registry{families: map[string]*family{}} }

// Vec is one metric family; its methods set or add to the sample with
// the given label values (in the order the labels were declared).
type Vec struct {
	r *Registry
	f *family
}

// Counter declares a counter family (it only goes up).
func (r *Registry) Counter(name, help string, labels ...string) *Vec {
	return r.declare(name, help, "counter", labels)
}

// Gauge declares a gauge family.
func (r *Registry) Gauge(name, help string, labels ...string) *Vec {
	return r.declare(name, help, "gauge", labels)
}

func (r *Registry) declare(name, help, typ string, labels []string) *Vec {
	r.mu.Lock()
	defer r.mu.Unlock()
	f, ok := r.families[name]
	if !ok {
		f = &family{name: name, help: help, typ: typ, labels: labels, values: map[string]*sample{}}
		r.families[name] = f
	}
	if f.typ != typ || len(f.labels) != len(labels) {
		panic(fmt.Sprintf("metrics: %s declared twice differently", name))
	}
	return &Vec{r: r, f: f}
}

func (v *Vec) sample(values []string) *sample {
	if len(values) != len(v.f.labels) {
		panic(fmt.Sprintf("metrics: %s takes %d label values, got %d", v.f.name, len(v.f.labels), len(values)))
	}
	key := strings.Join(values, "\xff")
	s, ok := v.f.values[key]
	if !ok {
		s = &sample{labelValues: append([]string(nil), values...)}
		v.f.values[key] = s
	}
	return s
}

// Add adds d (≥ 0 for counters) to the sample.
func (v *Vec) Add(d float64, labelValues ...string) {
	if v.f.typ == "counter" && d < 0 {
		panic("metrics: counters only go up")
	}
	v.r.mu.Lock()
	defer v.r.mu.Unlock()
	v.sample(labelValues).v += d
}

// Inc adds 1.
func (v *Vec) Inc(labelValues ...string) { v.Add(1, labelValues...) }

// Set sets a gauge.
func (v *Vec) Set(x float64, labelValues ...string) {
	v.r.mu.Lock()
	defer v.r.mu.Unlock()
	v.sample(labelValues).v = x
}

// Delete removes one sample (a VM that is gone).
func (v *Vec) Delete(labelValues ...string) {
	v.r.mu.Lock()
	defer v.r.mu.Unlock()
	delete(v.f.values, strings.Join(labelValues, "\xff"))
}

// Value returns a sample's value (0 if unset).
func (v *Vec) Value(labelValues ...string) float64 {
	v.r.mu.Lock()
	defer v.r.mu.Unlock()
	if s, ok := v.f.values[strings.Join(labelValues, "\xff")]; ok {
		return s.v
	}
	return 0
}

// WriteTo writes every family in the text exposition format, sorted.
func (r *Registry) WriteTo(w io.Writer) (int64, error) {
	r.mu.Lock()
	var b strings.Builder
	names := make([]string, 0, len(r.families))
	for n := range r.families {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		f := r.families[n]
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", f.name, escapeHelp(f.help), f.name, f.typ)
		keys := make([]string, 0, len(f.values))
		for k := range f.values {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			s := f.values[k]
			b.WriteString(f.name)
			if len(f.labels) > 0 {
				b.WriteByte('{')
				for i, l := range f.labels {
					if i > 0 {
						b.WriteByte(',')
					}
					fmt.Fprintf(&b, "%s=\"%s\"", l, escapeLabel(s.labelValues[i]))
				}
				b.WriteByte('}')
			}
			b.WriteByte(' ')
			b.WriteString(formatFloat(s.v))
			b.WriteByte('\n')
		}
	}
	r.mu.Unlock()
	n, err := io.WriteString(w, b.String())
	return int64(n), err
}

// Handler serves the registry on GET /metrics.
func (r *Registry) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		r.WriteTo(w)
	})
}

func formatFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

func escapeHelp(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(s)
}

func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`).Replace(s)
}
