package throttle

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Config tunes a [Controller]. The zero value of each field means its
// default, given in brackets.
type Config struct {
	// Threshold is the guest latency above which backups are slowed down
	// and no new backups start [20ms].
	Threshold time.Duration
	// DeviceThreshold is the same limit for the host device's latency
	// (Sample.Device) [Threshold]; negative ignores the device. The
	// device's average includes the backups' own large reads, so on
	// spinning disks it may need to be higher than Threshold.
	DeviceThreshold time.Duration
	// RecoverFactor sets the recovery level: latency below
	// RecoverFactor×Threshold (and RecoverFactor×DeviceThreshold) counts
	// as recovered [0.8]. Between the two levels nothing changes, so a
	// signal hovering near the threshold cannot make the controller flap.
	RecoverFactor float64
	// RecoverTicks is how many consecutive recovered ticks it takes before
	// rates are increased and new backups are allowed again [2].
	RecoverTicks int
	// DecreaseFactor multiplies a backup's rate on each tick above the
	// threshold (the multiplicative decrease) [0.5].
	DecreaseFactor float64
	// Increase is added to each throttled backup's rate, in bytes/s, on
	// each recovered tick once RecoverTicks is reached (the additive
	// increase) [16 MiB/s].
	Increase float64
	// MinRate is the floor, in bytes/s: no decrease goes below it, so a
	// backup always progresses [8 MiB/s].
	MinRate float64
	// MaxRate is the rate, in bytes/s, backups start at and that increases
	// stop at; zero means unlimited [0].
	MaxRate float64
	// MinOps is the number of reads and writes a disk must have done in an
	// interval for its latency to count; a few operations give a noisy
	// average [10].
	MinOps uint64
	// Percentile of the guest disks' interval latencies taken as the
	// interval's guest latency, in (0, 1]: 0.9 means 90% of the busy disks
	// saw at most that latency [0.9]. With fewer than ten busy disks it is
	// the worst disk.
	Percentile float64
	// Smoothing is the weight of the newest interval in the exponentially
	// weighted moving average of the latency, in (0, 1]; 1 is no smoothing
	// [0.5].
	Smoothing float64
}

// Defaults of [Config].
const (
	DefaultThreshold      = 20 * time.Millisecond
	DefaultRecoverFactor  = 0.8
	DefaultRecoverTicks   = 2
	DefaultDecreaseFactor = 0.5
	DefaultIncrease       = 16 * MiB
	DefaultMinRate        = 8 * MiB
	DefaultMinOps         = 10
	DefaultPercentile     = 0.9
	DefaultSmoothing      = 0.5
)

// ErrInvalidConfig is returned by [NewController] for a Config field out of
// range.
var ErrInvalidConfig = errors.New("invalid throttle config")

func (c Config) withDefaults() (Config, error) {
	if c.Threshold == 0 {
		c.Threshold = DefaultThreshold
	}
	if c.DeviceThreshold == 0 {
		c.DeviceThreshold = c.Threshold
	}
	if c.RecoverFactor == 0 {
		c.RecoverFactor = DefaultRecoverFactor
	}
	if c.RecoverTicks == 0 {
		c.RecoverTicks = DefaultRecoverTicks
	}
	if c.DecreaseFactor == 0 {
		c.DecreaseFactor = DefaultDecreaseFactor
	}
	if c.Increase == 0 {
		c.Increase = DefaultIncrease
	}
	if c.MinRate == 0 {
		c.MinRate = DefaultMinRate
	}
	if c.MinOps == 0 {
		c.MinOps = DefaultMinOps
	}
	if c.Percentile == 0 {
		c.Percentile = DefaultPercentile
	}
	if c.Smoothing == 0 {
		c.Smoothing = DefaultSmoothing
	}
	var bad []string
	check := func(ok bool, what string) {
		if !ok {
			bad = append(bad, what)
		}
	}
	check(c.Threshold > 0, "Threshold must be positive")
	check(c.RecoverFactor > 0 && c.RecoverFactor <= 1, "RecoverFactor must be in (0, 1]")
	check(c.RecoverTicks > 0, "RecoverTicks must be positive")
	check(c.DecreaseFactor > 0 && c.DecreaseFactor < 1, "DecreaseFactor must be in (0, 1)")
	check(c.Increase > 0, "Increase must be positive")
	check(c.MinRate > 0, "MinRate must be positive")
	check(c.MaxRate >= 0 && (c.MaxRate == 0 || c.MaxRate >= c.MinRate), "MaxRate must be 0 (unlimited) or at least MinRate")
	check(c.Percentile > 0 && c.Percentile <= 1, "Percentile must be in (0, 1]")
	check(c.Smoothing > 0 && c.Smoothing <= 1, "Smoothing must be in (0, 1]")
	if bad != nil {
		return c, fmt.Errorf("%w: %s", ErrInvalidConfig, strings.Join(bad, "; "))
	}
	return c, nil
}

// Sample is one sampling interval's latencies on a datastore: one Latency
// per guest disk on it (from [BlockLatency]) and, optionally, the host
// device's (from [DiskLatencyFromDiskStats]).
type Sample struct {
	Disks  []Latency
	Device *Latency
}

// Action is a set of things a tick did.
type Action uint8

// Actions of a [Decision]; a tick may combine them (Decrease|Pause when
// latency first passes the threshold, Increase|Resume when it recovers).
const (
	Decrease Action = 1 << iota // rates were multiplied by DecreaseFactor
	Increase                    // rates were raised by Increase
	Pause                       // PauseNewBackups became true
	Resume                      // PauseNewBackups became false
)

// String returns e.g. "decrease+pause", or "none".
func (a Action) String() string {
	if a == 0 {
		return "none"
	}
	var s []string
	for _, n := range []struct {
		a    Action
		name string
	}{{Decrease, "decrease"}, {Increase, "increase"}, {Pause, "pause"}, {Resume, "resume"}} {
		if a&n.a != 0 {
			s = append(s, n.name)
		}
	}
	return strings.Join(s, "+")
}

// Level is where a tick's latency stands against the threshold.
type Level uint8

const (
	// NoData: no disk had enough operations since the last tick and
	// there is no earlier signal.
	NoData Level = iota
	// Over the threshold: slow down.
	Over
	// Between the recovery level and the threshold: hold.
	Hold
	// Under the recovery level.
	Under
)

func (l Level) String() string {
	return [...]string{"no-data", "over", "hold", "under"}[l]
}

// Rate is one backup's rate change in a [Decision], in bytes/s; zero means
// unlimited.
type Rate struct {
	ID       string
	Old, New float64
}

// Decision is what one [Controller.Tick] found and did, for the caller to log
// (it is a [slog.LogValuer]) and count.
type Decision struct {
	Time    time.Time
	Actions Action
	Level   Level
	// Guest is the smoothed guest latency (percentile across disks) and
	// Device the smoothed host device latency; zero if never observed (or,
	// for Device, ignored).
	Guest, Device time.Duration
	// PauseNewBackups is the state after the tick: while true, the caller
	// must start no new backup on the datastore.
	PauseNewBackups bool
	// Rates lists the attached backups' rates by ID, after the tick.
	Rates []Rate
}

// LogValue logs the decision as a group.
func (d Decision) LogValue() slog.Value {
	attrs := []slog.Attr{
		slog.String("action", d.Actions.String()),
		slog.String("level", d.Level.String()),
		slog.Duration("guest_latency", d.Guest),
		slog.Duration("device_latency", d.Device),
		slog.Bool("pause_new_backups", d.PauseNewBackups),
	}
	for _, r := range d.Rates {
		attrs = append(attrs, slog.String("rate."+r.ID, formatRate(r.Old)+" -> "+formatRate(r.New)))
	}
	return slog.GroupValue(attrs...)
}

func formatRate(r float64) string {
	if r <= 0 {
		return "unlimited"
	}
	return strconv.FormatFloat(r/MiB, 'f', 1, 64) + "MiB/s"
}

// Stats are a controller's counters since it was made.
type Stats struct {
	Ticks     uint64
	Decreases uint64 // ticks that lowered at least one rate
	Increases uint64 // ticks that raised at least one rate
	Pauses    uint64 // times PauseNewBackups became true
	Resumes   uint64
	// Paused is the total time PauseNewBackups was true, up to the time
	// passed to Stats.
	Paused time.Duration
}

// Controller decides, for one datastore, how fast the backups reading from it
// may go. It is safe for concurrent use.
//
// The control law, applied on each Tick (see [Config] for the constants):
//
//   - Signal. Each Observe takes, over the guest disks with at least MinOps
//     reads and writes in the interval, the Percentile of their average
//     latency ([Latency.Mean]), and folds it into an exponentially weighted
//     moving average (weight Smoothing; the first value seeds it). The
//     device latency, if given, is smoothed the same way on its own. If no
//     interval counted since the previous tick, the guests (or the device)
//     were idle, the backups cannot have hurt them, and the average decays
//     as if a zero latency had been observed.
//   - Over: guest average > Threshold or device average > DeviceThreshold.
//     Every attached backup's rate becomes max(MinRate, DecreaseFactor ×
//     base), where base is the lower of its rate and the throughput it
//     actually had since the previous tick (so a decrease bites even if the
//     backup was below its limit, or unlimited). A backup that is unlimited
//     and not measured yet (attached before the first tick) goes to
//     MinRate. New backups are paused.
//   - Under: both averages below RecoverFactor × their threshold. After
//     RecoverTicks consecutive such ticks, each limited rate grows by
//     Increase, up to MaxRate; with no MaxRate, a backup that used less
//     than half of its rate since the previous tick is not held back by it
//     and becomes unlimited. New backups are allowed again.
//   - Hold: in between. Nothing changes, and the run of Under ticks
//     restarts.
//
// A backup attached while the datastore is paused starts at MinRate,
// otherwise at MaxRate. The controller owns the rates of attached limiters.
type Controller struct {
	cfg Config

	mu      sync.Mutex
	backups map[string]*backup
	guest   ewma
	device  ewma
	// guestFresh and deviceFresh: an interval counted since the last tick.
	guestFresh, deviceFresh bool
	lastTick                time.Time
	lastObs                 time.Time
	under                   int // consecutive Under ticks
	paused                  bool
	pausedAt                time.Time
	stats                   Stats
}

type backup struct {
	l         *Limiter
	lastBytes uint64
	lastTick  time.Time // start of the throughput measurement; zero: none
}

type ewma struct {
	v     float64 // nanoseconds
	valid bool
}

func (e *ewma) add(x, weight float64) {
	if !e.valid {
		e.v, e.valid = x, true
		return
	}
	e.v = weight*x + (1-weight)*e.v
}

// NewController returns a controller with cfg's zero fields set to their
// defaults, or an error wrapping ErrInvalidConfig.
func NewController(cfg Config) (*Controller, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	return &Controller{cfg: cfg, backups: make(map[string]*backup)}, nil
}

// Config returns the configuration in effect, defaults filled in.
func (c *Controller) Config() Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cfg
}

// SetConfig puts a new configuration in effect from the next Tick (a
// reloaded daemon configuration); the smoothed latency, the pause and the
// backups' current rates carry over.
func (c *Controller) SetConfig(cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cfg = cfg
	return nil
}

// Attach adds a backup reading from the datastore, replacing one with the
// same id, and sets its limiter's rate: MinRate while new backups are
// paused, MaxRate (0: unlimited) otherwise.
func (c *Controller) Attach(id string, l *Limiter) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.paused {
		l.SetRate(c.cfg.MinRate)
	} else {
		l.SetRate(c.cfg.MaxRate)
	}
	// Measured from the previous tick, although it started since: its
	// first throughput is underestimated, which errs on the safe side.
	c.backups[id] = &backup{l: l, lastBytes: l.Bytes(), lastTick: c.lastTick}
}

// Detach removes a backup; its limiter keeps its last rate. Detaching an
// unknown id does nothing.
func (c *Controller) Detach(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.backups, id)
}

// PauseNewBackups reports whether new backups must not start on the
// datastore now.
func (c *Controller) PauseNewBackups() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.paused
}

// Observe feeds one sampling interval, ending at now. Disks with fewer than
// MinOps reads and writes in the interval are ignored; a sample older than
// one already observed is dropped.
func (c *Controller) Observe(now time.Time, s Sample) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now.Before(c.lastObs) {
		return
	}
	c.lastObs = now
	var lat []float64
	for _, d := range s.Disks {
		if d.Ops() >= c.cfg.MinOps {
			lat = append(lat, float64(d.Mean()))
		}
	}
	if len(lat) > 0 {
		c.guest.add(percentile(lat, c.cfg.Percentile), c.cfg.Smoothing)
		c.guestFresh = true
	}
	if s.Device != nil && s.Device.Ops() >= c.cfg.MinOps {
		c.device.add(float64(s.Device.Mean()), c.cfg.Smoothing)
		c.deviceFresh = true
	}
}

// percentile returns the nearest-rank p-th percentile of v (reordered).
func percentile(v []float64, p float64) float64 {
	slices.Sort(v)
	i := int(math.Ceil(p*float64(len(v)))) - 1
	return v[max(0, min(i, len(v)-1))]
}

// Tick applies the control law at time now (see [Controller]) and returns
// what it did. Call it on a fixed control interval, after the Observe calls
// for that interval.
func (c *Controller) Tick(now time.Time) Decision {
	c.mu.Lock()
	defer c.mu.Unlock()
	cfg := &c.cfg
	c.stats.Ticks++
	c.lastTick = now
	// Idle since the last tick: decay towards zero.
	if !c.guestFresh && c.guest.valid {
		c.guest.add(0, cfg.Smoothing)
	}
	if !c.deviceFresh && c.device.valid {
		c.device.add(0, cfg.Smoothing)
	}
	c.guestFresh, c.deviceFresh = false, false

	d := Decision{Time: now, Guest: time.Duration(c.guest.v), Level: NoData}
	useDevice := cfg.DeviceThreshold > 0 && c.device.valid
	if useDevice {
		d.Device = time.Duration(c.device.v)
	}
	if c.guest.valid || useDevice {
		over := c.guest.v > float64(cfg.Threshold) ||
			useDevice && c.device.v > float64(cfg.DeviceThreshold)
		under := c.guest.v < cfg.RecoverFactor*float64(cfg.Threshold) &&
			(!useDevice || c.device.v < cfg.RecoverFactor*float64(cfg.DeviceThreshold))
		switch {
		case over:
			d.Level = Over
		case under:
			d.Level = Under
		default:
			d.Level = Hold
		}
	}

	ids := make([]string, 0, len(c.backups))
	for id := range c.backups {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var changedDown, changedUp bool
	switch d.Level {
	case Over:
		c.under = 0
		if !c.paused {
			c.paused, c.pausedAt = true, now
			d.Actions |= Pause
			c.stats.Pauses++
		}
	case Under:
		c.under++
	default:
		c.under = 0
	}
	recovered := d.Level == Under && c.under >= cfg.RecoverTicks
	for _, id := range ids {
		b := c.backups[id]
		old := b.l.Rate()
		used := b.throughput(now)
		next := old
		switch {
		case d.Level == Over:
			base := old
			if used > 0 && (base <= 0 || used < base) {
				base = used
			}
			if base <= 0 {
				next = cfg.MinRate // unlimited and nothing measured yet
			} else {
				next = math.Max(cfg.MinRate, base*cfg.DecreaseFactor)
			}
			if old > 0 && next > old { // never raise on a decrease
				next = old
			}
		case recovered && old > 0:
			next = old + cfg.Increase
			switch {
			case cfg.MaxRate > 0:
				next = math.Min(next, cfg.MaxRate)
			case used > 0 && used < old/2:
				next = 0 // the limit is not what holds it back
			}
		}
		if next != old {
			b.l.SetRate(next)
			if d.Level == Over {
				changedDown = true
			} else {
				changedUp = true
			}
		}
		d.Rates = append(d.Rates, Rate{ID: id, Old: old, New: next})
	}
	if changedDown {
		d.Actions |= Decrease
		c.stats.Decreases++
	}
	if changedUp {
		d.Actions |= Increase
		c.stats.Increases++
	}
	if recovered && c.paused {
		c.paused = false
		c.stats.Paused += now.Sub(c.pausedAt)
		d.Actions |= Resume
		c.stats.Resumes++
	}
	d.PauseNewBackups = c.paused
	return d
}

// throughput returns the bytes/s the backup read since the previous tick,
// or 0 if unknown (first tick after Attach) or none, and starts the next
// measurement.
func (b *backup) throughput(now time.Time) float64 {
	bytes := b.l.Bytes()
	var r float64
	if !b.lastTick.IsZero() && now.After(b.lastTick) {
		r = float64(bytes-b.lastBytes) / now.Sub(b.lastTick).Seconds()
	}
	b.lastBytes, b.lastTick = bytes, now
	return r
}

// Stats returns the counters, with the time paused counted up to now.
func (c *Controller) Stats(now time.Time) Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	if c.paused && now.After(c.pausedAt) {
		s.Paused += now.Sub(c.pausedAt)
	}
	return s
}
