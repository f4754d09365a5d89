package s3test

import (
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Link is how a Shaper distorts a connection, in each direction.
type Link struct {
	// Delay is the one-way delay added to every byte (a round trip takes
	// twice as long, and a new connection's first request a round trip
	// more, for the TCP handshake).
	Delay time.Duration
	// Rate is the link's capacity in bits per second, in each direction,
	// shared by all connections through the shaper; 0 is unlimited.
	Rate float64
	// Loss is the fraction of 1460-byte segments lost. TCP hides a loss
	// from the program as delay: the segment is sent again after a
	// retransmission timeout, and everything behind it waits (in order).
	// That is what the shaper does: a lost segment arrives LossDelay
	// late, and so does everything after it on its connection. (Real
	// packet loss needs tc netem, which not every kernel has.)
	Loss float64
	// LossDelay is a lost segment's extra delay; default 200 ms, Linux's
	// smallest retransmission timeout.
	LossDelay time.Duration
	// DropConn is the probability that a connection is cut (a reset, as
	// by a broken NAT or a rebooting middlebox) after a random number of
	// bytes below DropWithin (default 4 MiB) in both directions; 0 never.
	DropConn   float64
	DropWithin int64
	// CutOnce, when above 0, cuts the first connection that carries that
	// many bytes, and no other: one retry, for sure, for a test.
	CutOnce int64
	// Seed makes the shaper's random choices repeatable.
	Seed uint64
}

// Shaper is a TCP proxy that makes the way to a server slow and lossy: a
// one-way delay, a bandwidth limit, lost segments (as the retransmission
// delay they cost) and now and then a cut connection, for tests and
// benchmarks of kura on a bad network without tc netem.
type Shaper struct {
	// Addr is where to connect instead of the server: "127.0.0.1:PORT".
	Addr string

	link   Link
	target string
	ln     net.Listener
	up     *direction // client to server
	down   *direction // server to client
	mu     sync.Mutex
	rnd    *rand.Rand
	conns  map[net.Conn]struct{}
	closed bool
	// cutDone is set once CutOnce has cut its connection.
	cutDone atomic.Bool
	wg      sync.WaitGroup
	stats   ShaperStats
}

// ShaperStats counts what a Shaper did.
type ShaperStats struct {
	Conns, Dropped     int64
	BytesUp, BytesDown int64
	LostUp, LostDown   int64 // segments delayed as lost
	// MaxQueueUp and MaxQueueDown are the longest a read waited for the
	// link (the bandwidth limit at work).
	MaxQueueUp, MaxQueueDown time.Duration
}

// direction is one way of the link: the time its wire is free again, for
// the bandwidth limit shared by every connection.
type direction struct {
	mu    sync.Mutex
	free  time.Time
	bytes atomic.Int64
	lost  atomic.Int64
}

const segmentSize = 1460

// NewShaper listens on a free port of 127.0.0.1 and forwards each
// connection to target ("host:port") through link. Close stops it.
func NewShaper(target string, link Link) (*Shaper, error) {
	if link.LossDelay <= 0 {
		link.LossDelay = 200 * time.Millisecond
	}
	if link.DropWithin <= 0 {
		link.DropWithin = 4 << 20
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &Shaper{Addr: ln.Addr().String(), link: link, target: target, ln: ln,
		up: &direction{}, down: &direction{}, rnd: rand.New(rand.NewPCG(link.Seed, 0x5ba9e)),
		conns: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// Shaped returns a Shaper in front of the server; its Endpoint method
// gives the URL to use instead of the server's.
func (s *Server) Shaped(link Link) (*Shaper, error) {
	host := strings.TrimPrefix(strings.TrimPrefix(s.Endpoint, "http://"), "https://")
	return NewShaper(host, link)
}

// Endpoint is the shaper's address as an http:// URL.
func (s *Shaper) Endpoint() string { return "http://" + s.Addr }

// Stats returns what the shaper has done so far.
func (s *Shaper) Stats() ShaperStats {
	s.mu.Lock()
	st := s.stats
	s.mu.Unlock()
	st.BytesUp, st.BytesDown = s.up.bytes.Load(), s.down.bytes.Load()
	st.LostUp, st.LostDown = s.up.lost.Load(), s.down.lost.Load()
	return st
}

// Close stops listening and cuts every connection.
func (s *Shaper) Close() error {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	err := s.ln.Close()
	s.wg.Wait()
	return err
}

func (s *Shaper) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go s.serve(c)
	}
}

// track adds c to the connections Close cuts; false when closed.
func (s *Shaper) track(cs ...net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	for _, c := range cs {
		s.conns[c] = struct{}{}
	}
	return true
}

func (s *Shaper) untrack(cs ...net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range cs {
		delete(s.conns, c)
	}
}

// chance draws from the shaper's random source.
func (s *Shaper) chance() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rnd.Float64()
}

func (s *Shaper) serve(client net.Conn) {
	defer s.wg.Done()
	server, err := net.Dial("tcp", s.target)
	if err != nil {
		client.Close()
		return
	}
	if !s.track(client, server) {
		client.Close()
		server.Close()
		return
	}
	defer s.untrack(client, server)
	s.mu.Lock()
	s.stats.Conns++
	s.mu.Unlock()
	// A connection to cut: after this many bytes, both ways together.
	budget := &cutBudget{once: s.link.CutOnce > 0 && !s.cutDone.Load(), done: &s.cutDone}
	budget.left.Store(-1)
	switch {
	case budget.once:
		budget.left.Store(s.link.CutOnce)
	case s.link.DropConn > 0 && s.chance() < s.link.DropConn:
		s.mu.Lock()
		budget.left.Store(s.rnd.Int64N(s.link.DropWithin))
		s.mu.Unlock()
	}
	cut := func() {
		for _, c := range []net.Conn{client, server} {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0) // a reset, not an orderly close
			}
			c.Close()
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	var dropped atomic.Bool
	pump := func(src, dst net.Conn, d *direction, handshake time.Duration) {
		defer wg.Done()
		if s.pump(src, dst, d, handshake, budget) {
			if !dropped.Swap(true) {
				s.mu.Lock()
				s.stats.Dropped++
				s.mu.Unlock()
			}
			cut()
			return
		}
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}
	go pump(client, server, s.up, 2*s.link.Delay)
	go pump(server, client, s.down, 0)
	wg.Wait()
	client.Close()
	server.Close()
}

// cutBudget is what a connection may carry before it is cut.
type cutBudget struct {
	left atomic.Int64 // bytes; below 0 never
	once bool         // CutOnce's: only the first connection to reach it is cut
	done *atomic.Bool
}

// spend counts n bytes and reports whether the connection is to be cut.
func (b *cutBudget) spend(n int) bool {
	if b.left.Load() < 0 || b.left.Add(-int64(n)) >= 0 {
		return false
	}
	if b.once && !b.done.CompareAndSwap(false, true) {
		b.left.Store(-1) // another connection was cut first
		return false
	}
	return true
}

type segment struct {
	data []byte
	due  time.Time
}

// pump copies src to dst through d until src ends; extra delays the first
// bytes (the handshake's round trip). It reports whether it cut the
// connection (budget reached).
func (s *Shaper) pump(src, dst net.Conn, d *direction, extra time.Duration, budget *cutBudget) (cut bool) {
	q := make(chan segment, 32) // up to 512 KiB queued: the link's buffer
	stop := make(chan struct{})
	var cutFlag atomic.Bool
	go func() {
		defer close(q)
		var last time.Time
		for {
			buf := make([]byte, 16<<10)
			n, err := src.Read(buf)
			if n > 0 {
				if budget.spend(n) {
					cutFlag.Store(true)
					return
				}
				due := s.schedule(d, n).Add(extra)
				extra = 0
				if due.Before(last) {
					due = last // in order: behind a late segment, everything waits
				}
				last = due
				select {
				case q <- segment{buf[:n], due}:
				case <-stop:
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	defer close(stop)
	for seg := range q {
		if w := time.Until(seg.due); w > 0 {
			time.Sleep(w)
		}
		if _, err := dst.Write(seg.data); err != nil {
			return cutFlag.Load() // dst is gone: nothing more to deliver
		}
		d.bytes.Add(int64(len(seg.data)))
	}
	return cutFlag.Load()
}

// schedule returns when n bytes read now arrive at the other end: after
// the link has sent what is queued before them and them (Rate), the
// one-way delay, and the retransmission delay of any segment lost.
func (s *Shaper) schedule(d *direction, n int) time.Time {
	now := time.Now()
	d.mu.Lock()
	start := d.free
	if start.Before(now) {
		start = now
	}
	sent := start
	if s.link.Rate > 0 {
		sent = start.Add(time.Duration(float64(n*8) / s.link.Rate * float64(time.Second)))
	}
	d.free = sent
	d.mu.Unlock()
	due := sent.Add(s.link.Delay)
	if s.link.Loss > 0 {
		for seg := 0; seg < n; seg += segmentSize {
			if s.chance() < s.link.Loss {
				d.lost.Add(1)
				due = due.Add(s.link.LossDelay)
			}
		}
	}
	if q := sent.Sub(now); q > 0 {
		s.mu.Lock()
		if d == s.up {
			s.stats.MaxQueueUp = max(s.stats.MaxQueueUp, q)
		} else {
			s.stats.MaxQueueDown = max(s.stats.MaxQueueDown, q)
		}
		s.mu.Unlock()
	}
	return due
}
