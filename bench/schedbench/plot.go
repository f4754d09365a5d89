package main

import (
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"sort"
	"strings"
	"time"
)

// The plots are drawn with the standard library only: lines, rectangles and
// a 5×7 bitmap font (upper case, digits and a few signs).

var (
	white     = color.RGBA{255, 255, 255, 255}
	black     = color.RGBA{0, 0, 0, 255}
	gray      = color.RGBA{150, 150, 150, 255}
	lightGray = color.RGBA{235, 235, 235, 255}
	gridGray  = color.RGBA{215, 215, 215, 255}
	pausedRed = color.RGBA{255, 225, 225, 255}
	mergeBlue = color.RGBA{220, 232, 250, 255}
	guestCols = []color.RGBA{{31, 119, 180, 255}, {255, 127, 14, 255}, {44, 160, 44, 255}, {214, 39, 40, 255},
		{148, 103, 189, 255}, {140, 86, 75, 255}, {227, 119, 194, 255}, {23, 190, 207, 255}}
)

type canvas struct{ *image.RGBA }

func (c canvas) rect(x0, y0, x1, y1 int, col color.RGBA) {
	for y := max(y0, 0); y < min(y1, c.Rect.Dy()); y++ {
		for x := max(x0, 0); x < min(x1, c.Rect.Dx()); x++ {
			c.SetRGBA(x, y, col)
		}
	}
}

// line draws a line of width w (Bresenham, square pen); dash > 0 draws
// dash pixels on, dash off.
func (c canvas) line(x0, y0, x1, y1, w int, col color.RGBA, dash int) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for i := 0; ; i++ {
		if dash == 0 || (i/dash)%2 == 0 {
			c.rect(x0-w/2, y0-w/2, x0-w/2+w, y0-w/2+w, col)
		}
		if x0 == x1 && y0 == y1 {
			return
		}
		e2 := 2 * e
		if e2 >= dy {
			e += dy
			x0 += sx
		}
		if e2 <= dx {
			e += dx
			y0 += sy
		}
	}
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

func sign(x int) int {
	switch {
	case x > 0:
		return 1
	case x < 0:
		return -1
	}
	return 0
}

// glyphs: 7 rows of 5 bits each.
var glyphs = map[rune][7]byte{
	'0': {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}, '1': {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E},
	'2': {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}, '3': {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E},
	'4': {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}, '5': {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E},
	'6': {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}, '7': {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08},
	'8': {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}, '9': {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C},
	'A': {0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11}, 'B': {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E},
	'C': {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E}, 'D': {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C},
	'E': {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F}, 'F': {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10},
	'G': {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F}, 'H': {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11},
	'I': {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}, 'J': {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C},
	'K': {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}, 'L': {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F},
	'M': {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11}, 'N': {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11},
	'O': {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}, 'P': {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10},
	'Q': {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D}, 'R': {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11},
	'S': {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E}, 'T': {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},
	'U': {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}, 'V': {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04},
	'W': {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A}, 'X': {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11},
	'Y': {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04}, 'Z': {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F},
	' ': {}, '.': {0, 0, 0, 0, 0, 0x0C, 0x0C}, '-': {0, 0, 0, 0x1F, 0, 0, 0},
	':': {0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0}, '%': {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03},
	'(': {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}, ')': {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08},
	'/': {0, 0x01, 0x02, 0x04, 0x08, 0x10, 0}, ',': {0, 0, 0, 0, 0x0C, 0x04, 0x08},
	'=': {0, 0, 0x1F, 0, 0x1F, 0, 0}, '+': {0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0},
	'_': {0, 0, 0, 0, 0, 0, 0x1F}, '>': {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08},
	'<': {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02}, '*': {0, 0x11, 0x0A, 0x1F, 0x0A, 0x11, 0},
}

const fontScale = 2

// text draws s with its top left corner at (x, y); it returns the width.
func (c canvas) text(x, y int, s string, col color.RGBA) int {
	x0 := x
	for _, r := range strings.ToUpper(s) {
		if r == '×' {
			r = 'X'
		}
		g, ok := glyphs[r]
		if !ok {
			g = glyphs['*']
		}
		for row := 0; row < 7; row++ {
			for bit := 0; bit < 5; bit++ {
				if g[row]&(0x10>>bit) != 0 {
					c.rect(x+bit*fontScale, y+row*fontScale, x+(bit+1)*fontScale, y+(row+1)*fontScale, col)
				}
			}
		}
		x += 6 * fontScale
	}
	return x - x0
}

func textWidth(s string) int { return len([]rune(s)) * 6 * fontScale }

// bucketP99 is the p99 of the latencies completed in each 1 s bucket from
// start, in ms (NaN where the bucket is empty).
func bucketP99(s []latSample, start time.Time, n int) []float64 {
	b := make([][]float64, n)
	for _, x := range s {
		i := int(x.at.Sub(start) / time.Second)
		if i >= 0 && i < n {
			b[i] = append(b[i], x.lat.Seconds()*1000)
		}
	}
	out := make([]float64, n)
	for i, v := range b {
		if len(v) == 0 {
			out[i] = math.NaN()
			continue
		}
		sort.Float64s(v)
		out[i] = rank(v, 99)
	}
	return out
}

// plotPhase draws one strategy: each guest's p99 latency per second (log
// scale) over the whole phase, and below it the datastore's read
// throughput (and, for the scheduler, when new backups were paused).
func (b *bench) plotPhase(ph *Phase, path string) error {
	const W, H = 1400, 820
	const left, right, top = 110, 30, 70
	const midTop, midBot = 520, 590 // gap between the panels
	const bot = 750
	c := canvas{image.NewRGBA(image.Rect(0, 0, W, H))}
	c.rect(0, 0, W, H, white)
	span := ph.FioEnd.Sub(ph.FioStart)
	if span <= 0 {
		return fmt.Errorf("empty phase")
	}
	n := int(span/time.Second) + 1
	secs := span.Seconds()
	xOf := func(t time.Time) int {
		return left + int(float64(W-left-right)*t.Sub(ph.FioStart).Seconds()/secs)
	}

	series := make([][]float64, len(ph.Guests))
	lo, hi := math.Inf(1), math.Inf(-1)
	for i, g := range ph.Guests {
		series[i] = bucketP99(g.series, ph.FioStart, n)
		for _, v := range series[i] {
			if !math.IsNaN(v) && v > 0 {
				lo, hi = math.Min(lo, v), math.Max(hi, v)
			}
		}
	}
	if math.IsInf(lo, 1) {
		return fmt.Errorf("no samples")
	}
	if ph.ThresholdMS > 0 {
		hi = math.Max(hi, ph.ThresholdMS)
	}
	dlo, dhi := math.Floor(math.Log10(lo)), math.Ceil(math.Log10(hi))
	if dhi <= dlo {
		dhi = dlo + 1
	}
	yOf := func(v float64) int {
		f := (math.Log10(v) - dlo) / (dhi - dlo)
		return midTop - int(f*float64(midTop-top))
	}

	// Shading: paused (scheduler), idle lead-in, backup window.
	for i, m := range ph.Metrics {
		if m.Paused {
			x0 := xOf(m.At.Add(-time.Second))
			if i > 0 {
				x0 = xOf(ph.Metrics[i-1].At)
			}
			c.rect(x0, top, xOf(m.At), midTop, pausedRed)
			c.rect(x0, midBot, xOf(m.At), bot, pausedRed)
		}
	}
	c.rect(xOf(ph.IdleFrom), top, xOf(ph.IdleTo), midTop, lightGray)
	// The overlay method's merges, any VM's.
	for _, u := range unionOf(ph.Steps) {
		c.rect(xOf(u.From), top, xOf(u.To), midTop, mergeBlue)
	}
	// Grid and y labels (decades).
	for d := dlo; d <= dhi; d++ {
		y := yOf(math.Pow(10, d))
		c.line(left, y, W-right, y, 1, gridGray, 0)
		lab := strings.TrimRight(strings.TrimRight(fmt.Sprintf("%.3f", math.Pow(10, d)), "0"), ".")
		c.text(left-10-textWidth(lab), y-7, lab, black)
	}
	c.text(10, top-30, "P99 MS", black)
	// x ticks every 10 or 30 s.
	step := 10.0
	if secs > 400 {
		step = 60
	} else if secs > 150 {
		step = 30
	}
	for s := 0.0; s <= secs; s += step {
		x := left + int(float64(W-left-right)*s/secs)
		c.line(x, midTop, x, midTop+6, 1, black, 0)
		c.line(x, bot, x, bot+6, 1, black, 0)
		lab := fmt.Sprintf("%.0f", s)
		c.text(x-textWidth(lab)/2, bot+12, lab, black)
	}
	c.text(W/2-textWidth("SECONDS")/2, bot+40, "SECONDS", black)
	// Backup window.
	for _, t := range []time.Time{ph.Start, ph.End} {
		c.line(xOf(t), top, xOf(t), bot, 2, black, 6)
	}
	// Threshold and the daemon's smoothed signal.
	if ph.ThresholdMS > 0 {
		y := yOf(ph.ThresholdMS)
		c.line(left, y, W-right, y, 1, gray, 4)
		c.text(W-right-textWidth("THRESHOLD")-4, y-18, "THRESHOLD", gray)
		px, py := -1, 0
		for _, m := range ph.Metrics {
			if m.LatencyMS <= 0 {
				px = -1
				continue
			}
			x, y := xOf(m.At), yOf(math.Max(m.LatencyMS, math.Pow(10, dlo)))
			if px >= 0 {
				c.line(px, py, x, y, 1, black, 0)
			}
			px, py = x, y
		}
	}
	// Guest lines.
	for i, s := range series {
		col := guestCols[i%len(guestCols)]
		px, py := -1, 0
		for k, v := range s {
			if math.IsNaN(v) {
				px = -1
				continue
			}
			x := xOf(ph.FioStart.Add(time.Duration(k)*time.Second + 500*time.Millisecond))
			y := yOf(math.Max(v, math.Pow(10, dlo)))
			if px >= 0 {
				c.line(px, py, x, y, 2, col, 0)
			}
			px, py = x, y
		}
	}
	// Axes.
	c.line(left, top, left, midTop, 1, black, 0)
	c.line(left, midTop, W-right, midTop, 1, black, 0)

	// Bottom panel: read throughput.
	maxR := float64(b.cfg.LimitReadMiBs)
	for _, s := range ph.IO {
		maxR = math.Max(maxR, s.ReadMiBs)
	}
	maxR = math.Max(1, math.Ceil(maxR/8)*8)
	yR := func(v float64) int { return bot - int(v/maxR*float64(bot-midBot)) }
	for _, v := range []float64{0, maxR / 2, maxR} {
		c.line(left, yR(v), W-right, yR(v), 1, gridGray, 0)
		lab := fmt.Sprintf("%.0f", v)
		c.text(left-10-textWidth(lab), yR(v)-7, lab, black)
	}
	if b.cfg.LimitReadMiBs > 0 {
		c.line(left, yR(float64(b.cfg.LimitReadMiBs)), W-right, yR(float64(b.cfg.LimitReadMiBs)), 1, gray, 4)
	}
	px, py := -1, 0
	for _, s := range ph.IO {
		x, y := xOf(s.At.Add(-500*time.Millisecond)), yR(s.ReadMiBs)
		if px >= 0 {
			c.line(px, py, x, y, 2, guestCols[0], 0)
		}
		px, py = x, y
	}
	c.line(left, midBot, left, bot, 1, black, 0)
	c.line(left, bot, W-right, bot, 1, black, 0)
	c.text(10, midBot-24, "DATASTORE READ MIB/S", black)

	// Title and legend.
	title := fmt.Sprintf("%s: %d GUESTS, ALL PROTECTED IN %.0f S", strings.ToUpper(ph.Strategy), len(ph.Guests), ph.Seconds)
	c.text(left, 12, title, black)
	x := left
	for i, g := range ph.Guests {
		col := guestCols[i%len(guestCols)]
		c.rect(x, 44, x+24, 50, col)
		x += 30
		x += c.text(x, 40, shortName(g.Guest), black) + 24
	}
	c.rect(x, 40, x+24, 54, lightGray)
	x += 30
	x += c.text(x, 40, "IDLE LEAD-IN", black) + 24
	c.line(x, 47, x+24, 47, 2, black, 6)
	x += 30
	x += c.text(x, 40, "BACKUPS START/END", black) + 24
	if len(ph.Steps) > 0 {
		c.rect(x, 40, x+24, 54, mergeBlue)
		x += 30
		x += c.text(x, 40, "MERGES", black) + 24
	}
	if len(ph.Metrics) > 0 {
		c.rect(x, 40, x+24, 54, pausedRed)
		x += 30
		x += c.text(x, 40, "PAUSED", black) + 24
		c.line(x, 47, x+24, 47, 1, black, 0)
		x += 30
		c.text(x, 40, "KURA SIGNAL", black)
	}

	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, c.RGBA); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
