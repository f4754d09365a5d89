package throttle

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"
)

// autoClock is a Clock for one goroutine on which sleeping takes no real
// time: Sleep moves the clock forward and returns.
type autoClock struct{ now time.Time }

func (c *autoClock) Now() time.Time { return c.now }
func (c *autoClock) Sleep(ctx context.Context, d time.Duration) error {
	c.now = c.now.Add(max(d, 0))
	return ctx.Err()
}

// read passes bytes through l as a backup reader would.
func read(t *testing.T, l *Limiter, bytes float64) {
	t.Helper()
	if err := l.Wait(context.Background(), int(bytes)); err != nil {
		t.Fatal(err)
	}
}

func msDur(ms float64) time.Duration { return time.Duration(ms * float64(time.Millisecond)) }

// guests is a sample of guest disks whose interval latency is ms each, with
// 100 reads and 100 writes apiece.
func guests(ms ...float64) *Sample {
	s := &Sample{}
	for i, m := range ms {
		s.Disks = append(s.Disks, Latency{Disk: fmt.Sprintf("vm%d/vda", i),
			ReadOps: 100, WriteOps: 100, Read: msDur(m), Write: msDur(m)})
	}
	return s
}

// idle is a sample in which the guests did no I/O.
func idle() *Sample {
	return &Sample{Disks: []Latency{{Disk: "vm0/vda"}, {Disk: "vm1/vda"}}}
}

func withDevice(s *Sample, ops uint64, ms float64) *Sample {
	s.Device = &Latency{Disk: "sdb", ReadOps: ops, Read: msDur(ms)}
	return s
}

const (
	unlimited = 0.0
	detached  = -1.0 // the backup is not attached at this step
)

// step is one control interval of a recorded series: what was observed
// during it (nil: Observe not called) and the decision of the tick that
// ends it.
type step struct {
	sample *Sample
	want   Action
	level  Level
	pause  bool
	rate   float64 // MiB/s of the backup after the tick
}

const (
	none     Action = 0
	anyLevel Level  = 255 // not checked
)

func TestControllerSeries(t *testing.T) {
	cases := []struct {
		name     string
		cfg      Config
		attachAt int     // step at whose start the backup is attached
		speed    float64 // MiB/s the backup reads at when its limit allows
		steps    []step
	}{{
		name: "backup start pushes latency to 40ms, throttled, recovers additively", attachAt: 2, speed: 200,
		steps: []step{
			{guests(2, 1.5), none, Under, false, detached},
			{guests(1.8, 2.2), none, Under, false, detached},
			// The backup starts reading at 200 MiB/s.
			{guests(40, 6), Decrease | Pause, Over, true, 100},
			{guests(40, 8), Decrease, Over, true, 50},
			{guests(24, 5), Decrease, Over, true, 25},
			{guests(10, 4), none, Hold, true, 25},
			{guests(5, 3), none, Under, true, 25},
			{guests(3, 2), Increase | Resume, Under, false, 41},
			{guests(4, 2), Increase, Under, false, 57},
			{guests(6, 2), Increase, Under, false, 73},
			{idle(), Increase, Under, false, 89},
			{guests(8, 3), Increase, Under, false, 105},
			{guests(18, 3), Increase, Under, false, 121},
			// Latency creeps back up: a second, smaller cycle.
			{guests(26, 4), none, Hold, false, 121},
			{guests(28, 4), Decrease | Pause, Over, true, 60.5},
			{guests(12, 3), none, Hold, true, 60.5},
			{guests(8, 3), none, Under, true, 60.5},
			{guests(6, 2), Increase | Resume, Under, false, 76.5},
		},
	}, {
		name: "noisy but under the threshold: no decision", attachAt: 0, speed: 200,
		steps: func() []step {
			var s []step
			for _, ms := range []float64{4, 12, 6, 15, 3, 25, 5, 14, 8, 18, 2, 16, 19, 7} {
				smp := guests(ms, ms/3)
				// A disk with too few operations, however slow, is not counted.
				smp.Disks = append(smp.Disks, Latency{Disk: "vm9/vda", ReadOps: 3, WriteOps: 2, Read: time.Second})
				s = append(s, step{smp, none, anyLevel, false, unlimited})
			}
			return s
		}(),
	}, {
		name: "hovering around the threshold: one pause, rates floored, no flapping",
		cfg:  Config{MaxRate: 64 * MiB}, attachAt: 0, speed: 200,
		steps: []step{
			{guests(24), Decrease | Pause, Over, true, 32}, // no throughput measured yet: from the rate
			{guests(17), Decrease, Over, true, 16},
			{guests(23), Decrease, Over, true, 8},
			{guests(18), none, Hold, true, 8},
			{guests(22), none, Over, true, 8}, // at the floor already
			{guests(17), none, Hold, true, 8},
			{guests(21), none, Hold, true, 8},
			{guests(24), none, Over, true, 8},
			{guests(15), none, Hold, true, 8},
			{guests(14), none, Hold, true, 8},
			{guests(12), none, Under, true, 8},
			{guests(19), none, Hold, true, 8}, // the run of recovered ticks restarts
			{guests(9), none, Under, true, 8},
			{guests(6), Increase | Resume, Under, false, 24},
			{guests(5), Increase, Under, false, 40},
			{guests(5), Increase, Under, false, 56},
			{guests(5), Increase, Under, false, 64}, // MaxRate
			{guests(5), none, Under, false, 64},
		},
	}, {
		name: "intervals with too few or no operations", attachAt: 0, speed: 100,
		steps: []step{
			{guests(2), none, Under, false, unlimited},
			{&Sample{Disks: []Latency{{ReadOps: 4, Read: 400 * time.Millisecond}, {WriteOps: 5, Write: time.Second}}},
				none, Under, false, unlimited},
			{guests(45), Decrease | Pause, Over, true, 50},
			{idle(), none, Under, true, 50}, // idle guests: the average decays
			{nil, Increase | Resume, Under, false, 66},
		},
	}, {
		name: "backup slower than its limit: the limit is lifted", attachAt: 0, speed: 30,
		steps: []step{
			{guests(40), Decrease | Pause, Over, true, 8}, // unlimited, not measured yet: the floor
			{guests(3), none, Over, true, 8},
			{guests(2), none, Under, true, 8},
			{guests(2), Increase | Resume, Under, false, 24},
			{guests(2), Increase, Under, false, 40},
			{guests(2), Increase, Under, false, 56}, // read 30 of 40 MiB/s
			{guests(2), Increase, Under, false, 72},
			{guests(2), Increase, Under, false, unlimited}, // read 30 of 56: under half
		},
	}, {
		name: "device latency over its threshold", attachAt: 0, speed: 100,
		steps: []step{
			// Unlimited and not yet measured: straight to the floor.
			{withDevice(guests(3), 500, 35), Decrease | Pause, Over, true, 8},
			{withDevice(guests(3), 500, 30), none, Over, true, 8},
			{withDevice(guests(3), 5, 300), none, Hold, true, 8}, // too few device operations: decays
			{withDevice(guests(3), 500, 4), none, Under, true, 8},
			{withDevice(guests(3), 500, 3), Increase | Resume, Under, false, 24},
		},
	}, {
		name: "device ignored", cfg: Config{DeviceThreshold: -1}, attachAt: 0, speed: 100,
		steps: []step{
			{withDevice(guests(3), 500, 35), none, Under, false, unlimited},
			{withDevice(guests(3), 500, 60), none, Under, false, unlimited},
		},
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := NewController(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			clk := &autoClock{now: epoch}
			l := NewLimiter(unlimited, clk)
			now := epoch
			for i, st := range tc.steps {
				if i == tc.attachAt {
					c.Attach("vm1", l)
				}
				if i >= tc.attachAt {
					// The backup reads for one second at its limit or its speed.
					r := tc.speed * MiB
					if lim := l.Rate(); lim > 0 {
						r = min(r, lim)
					}
					read(t, l, r)
				}
				now = now.Add(time.Second)
				if st.sample != nil {
					c.Observe(now, *st.sample)
				}
				d := c.Tick(now)
				var rate float64 = detached
				for _, r := range d.Rates {
					if r.ID == "vm1" {
						rate = r.New / MiB
					}
				}
				level := st.level
				if level == anyLevel {
					level = d.Level
				}
				if d.Actions != st.want || d.Level != level || d.PauseNewBackups != st.pause ||
					math.Abs(rate-st.rate) > 1e-9 || c.PauseNewBackups() != st.pause {
					t.Errorf("step %d: got %v, %v, pause %v, rate %v MiB/s (guest %v, device %v); want %v, %v, pause %v, rate %v MiB/s",
						i, d.Actions, d.Level, d.PauseNewBackups, rate, d.Guest, d.Device, st.want, level, st.pause, st.rate)
				}
				if st.rate != detached {
					if got := l.Rate() / MiB; math.Abs(got-st.rate) > 1e-9 {
						t.Errorf("step %d: limiter rate %v MiB/s, decision says %v", i, got, st.rate)
					}
				}
			}
		})
	}
}

func TestControllerStats(t *testing.T) {
	c, err := NewController(Config{})
	if err != nil {
		t.Fatal(err)
	}
	c.Attach("a", NewLimiter(unlimited, nil))
	now := epoch
	tick := func(ms float64) {
		now = now.Add(time.Second)
		c.Observe(now, *guests(ms))
		c.Tick(now)
	}
	for _, ms := range []float64{2, 40, 40, 10, 4, 3, 3, 50, 40} {
		tick(ms)
	}
	// Paused at 2 s, resumed at 6 s; paused again at 8 s, still paused.
	got := c.Stats(now.Add(500 * time.Millisecond))
	want := Stats{Ticks: 9, Decreases: 3, Increases: 2, Pauses: 2, Resumes: 1, Paused: 4*time.Second + 1500*time.Millisecond}
	if got != want {
		t.Errorf("Stats = %+v, want %+v", got, want)
	}
}

func TestControllerDetachDuringDecrease(t *testing.T) {
	c, err := NewController(Config{})
	if err != nil {
		t.Fatal(err)
	}
	a, b := NewLimiter(128*MiB, nil), NewLimiter(128*MiB, nil)
	c.Attach("a", a)
	c.Attach("b", b)
	now := epoch.Add(time.Second)
	c.Observe(now, *guests(40))
	if d := c.Tick(now); d.Actions != Decrease|Pause || len(d.Rates) != 2 {
		t.Fatalf("first tick: %v with %d rates, want decrease+pause of both", d.Actions, len(d.Rates))
	}
	c.Detach("b")
	c.Detach("nonexistent")
	now = now.Add(time.Second)
	c.Observe(now, *guests(40))
	d := c.Tick(now)
	if len(d.Rates) != 1 || d.Rates[0].ID != "a" {
		t.Errorf("after Detach(b), decision rates %+v, want only a", d.Rates)
	}
	if a.Rate() != 8*MiB || b.Rate() != 8*MiB {
		// Unlimited (MaxRate 0) and not measured: the first decrease is to
		// the floor; b keeps its rate once detached.
		t.Errorf("rates a %v, b %v MiB/s; want 8 and 8", a.Rate()/MiB, b.Rate()/MiB)
	}

	// Backups come and go while ticks decrease their rates.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 2 {
		wg.Go(func() {
			l := NewLimiter(0, nil)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := fmt.Sprintf("w%d-%d", w, i%4)
				c.Attach(id, l)
				_ = l.Wait(context.Background(), MiB)
				c.Detach(id)
			}
		})
	}
	for range 300 {
		now = now.Add(time.Second)
		c.Observe(now, *guests(45))
		d := c.Tick(now)
		for _, r := range d.Rates {
			if r.New < 8*MiB {
				t.Errorf("rate of %s went to %v MiB/s, below the floor", r.ID, r.New/MiB)
			}
		}
	}
	close(stop)
	wg.Wait()
}

func TestDecisionLogValue(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	d := Decision{Actions: Decrease | Pause, Level: Over, Guest: 21 * time.Millisecond, PauseNewBackups: true,
		Rates: []Rate{{ID: "vm1", Old: unlimited, New: 100 * MiB}}}
	log.Info("throttle", "decision", d)
	for _, want := range []string{"decision.action=decrease+pause", "decision.level=over",
		"decision.guest_latency=21ms", "decision.pause_new_backups=true", `decision.rate.vm1="unlimited -> 100.0MiB/s"`} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("log line %q lacks %q", buf.String(), want)
		}
	}
}

func TestNewControllerConfig(t *testing.T) {
	c, err := NewController(Config{})
	if err != nil {
		t.Fatal(err)
	}
	got := c.Config()
	want := Config{Threshold: 20 * time.Millisecond, DeviceThreshold: 20 * time.Millisecond, RecoverFactor: 0.8,
		RecoverTicks: 2, DecreaseFactor: 0.5, Increase: 16 * MiB, MinRate: 8 * MiB, MinOps: 10,
		Percentile: 0.9, Smoothing: 0.5}
	if got != want {
		t.Errorf("defaults %+v, want %+v", got, want)
	}
	for _, bad := range []Config{
		{DecreaseFactor: 1}, {RecoverFactor: 1.5}, {MinRate: -1}, {MaxRate: 4 * MiB},
		{Percentile: 2}, {Smoothing: -0.1}, {Threshold: -time.Millisecond},
	} {
		if _, err := NewController(bad); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("NewController(%+v) = %v, want ErrInvalidConfig", bad, err)
		}
	}
}

// TestControllerClosedLoop runs the controller against a model datastore
// whose guest latency grows with the backups' total throughput, with noise,
// and checks what the control law promises: rates stay within the floor,
// latency is held near the threshold, and the backups still progress.
func TestControllerClosedLoop(t *testing.T) {
	c, err := NewController(Config{})
	if err != nil {
		t.Fatal(err)
	}
	const speed = 150 * MiB // each backup's own limit (NBD, compression)
	rng := rand.New(rand.NewPCG(1, 2))
	clk := &autoClock{now: epoch}
	ls := []*Limiter{NewLimiter(0, clk), NewLimiter(0, clk)}
	for i, l := range ls {
		c.Attach(fmt.Sprint("b", i), l)
	}
	now := epoch
	var latSum, readSum float64
	const ticks, warmup = 300, 20
	for i := range ticks {
		var total float64
		for _, l := range ls {
			r := float64(speed)
			if lim := l.Rate(); lim > 0 {
				r = min(r, lim)
			}
			read(t, l, r)
			total += r
		}
		// 2 ms idle, 20 ms at 150 MiB/s in total, ±3 ms of noise.
		lat := 2 + 0.12*total/MiB + (rng.Float64()*6 - 3)
		now = now.Add(time.Second)
		c.Observe(now, *guests(lat, lat/2))
		d := c.Tick(now)
		for _, r := range d.Rates {
			if r.New != unlimited && r.New < DefaultMinRate {
				t.Fatalf("tick %d: %s at %v MiB/s, below the floor", i, r.ID, r.New/MiB)
			}
		}
		if i >= warmup {
			latSum += lat
			readSum += total
		}
	}
	n := float64(ticks - warmup)
	if mean := latSum / n; mean > 20 {
		t.Errorf("mean guest latency %.1fms under control, want at most the 20ms threshold", mean)
	}
	if mean := readSum / n / MiB; mean < 100 {
		t.Errorf("backups read %.0f MiB/s on average, want at least 100 of the 150 the threshold allows", mean)
	}
	t.Logf("mean latency %.1fms, mean read %.0f MiB/s, %+v", latSum/n, readSum/n/MiB, c.Stats(now))
}

// A reloaded configuration takes effect at the next tick: latency that was
// under the old threshold pauses new backups under a lower one.
func TestControllerSetConfig(t *testing.T) {
	c, err := NewController(Config{Threshold: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1000, 0)
	c.Observe(now, *guests(5, 5))
	if d := c.Tick(now); d.PauseNewBackups {
		t.Fatalf("5 ms under a 20 ms threshold paused: %+v", d)
	}
	if err := c.SetConfig(Config{Threshold: time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if c.Config().Threshold != time.Millisecond {
		t.Errorf("Config after SetConfig: %+v", c.Config())
	}
	now = now.Add(time.Second)
	c.Observe(now, *guests(5, 5))
	if d := c.Tick(now); !d.PauseNewBackups || d.Actions&Pause == 0 {
		t.Errorf("5 ms over a 1 ms threshold did not pause: %+v", d)
	}
	if err := c.SetConfig(Config{Threshold: -time.Second}); err == nil {
		t.Errorf("SetConfig accepted a negative threshold")
	}
}
