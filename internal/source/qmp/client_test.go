package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

const testGreeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}`

// fakeQEMU serves QMP on a unix socket: it greets, then answers each
// command with handle's reply (a JSON value for "return", an error, or
// nothing to stay silent), echoing the id.
type fakeQEMU struct {
	path   string
	ln     net.Listener
	handle func(cmd string, args json.RawMessage, send func(string)) (ret any, err *qmpErr, silent bool)
	wg     sync.WaitGroup
}

type qmpErr struct{ Class, Desc string }

func newFakeQEMU(t *testing.T, greet bool, handle func(cmd string, args json.RawMessage, send func(string)) (any, *qmpErr, bool)) *fakeQEMU {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeQEMU{path: path, ln: ln, handle: handle}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer conn.Close()
				if !greet {
					conn.Read(make([]byte, 1)) // hold the client, like a busy QEMU
					return
				}
				f.serve(conn)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); f.wg.Wait() })
	return f
}

func (f *fakeQEMU) serve(conn net.Conn) {
	var wmu sync.Mutex
	send := func(s string) {
		wmu.Lock()
		defer wmu.Unlock()
		conn.Write([]byte(s + "\n"))
	}
	send(testGreeting)
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var req struct {
			Execute string          `json:"execute"`
			Args    json.RawMessage `json:"arguments"`
			ID      json.RawMessage `json:"id"`
		}
		if err := json.Unmarshal(line, &req); err != nil {
			return
		}
		if req.Execute == "qmp_capabilities" {
			send(fmt.Sprintf(`{"return": {}, "id": %s}`, req.ID))
			continue
		}
		go func() {
			ret, qe, silent := f.handle(req.Execute, req.Args, send)
			switch {
			case silent:
			case qe != nil:
				send(fmt.Sprintf(`{"error": {"class": %q, "desc": %q}, "id": %s}`, qe.Class, qe.Desc, req.ID))
			default:
				b, _ := json.Marshal(ret)
				send(fmt.Sprintf(`{"return": %s, "id": %s}`, b, req.ID))
			}
		}()
	}
}

func TestClientExecute(t *testing.T) {
	f := newFakeQEMU(t, true, func(cmd string, args json.RawMessage, send func(string)) (any, *qmpErr, bool) {
		switch cmd {
		case "echo":
			var a struct {
				N     int `json:"n"`
				Delay int `json:"delay"`
			}
			json.Unmarshal(args, &a)
			time.Sleep(time.Duration(a.Delay) * time.Millisecond)
			send(`{"event": "TICK", "data": {"n": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}`)
			return map[string]int{"n": a.N}, nil, false
		case "fail":
			return nil, &qmpErr{"DeviceNotFound", "Failed to find node with node-name='x'"}, false
		case "hang":
			return nil, nil, true
		}
		return nil, &qmpErr{"CommandNotFound", "The command " + cmd + " has not been found"}, false
	})
	ctx := context.Background()
	c, err := Dial(ctx, f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v := c.Greeting().VersionString(); v != "7.2.22" {
		t.Errorf("version %q, want 7.2.22", v)
	}

	tests := []struct {
		name    string
		cmd     string
		args    any
		timeout time.Duration
		want    int
		check   func(error) bool
	}{
		{name: "return value", cmd: "echo", args: map[string]int{"n": 7}, want: 7},
		{name: "QEMU error", cmd: "fail", check: func(err error) bool {
			var qe *Error
			return errors.As(err, &qe) && qe.Class == "DeviceNotFound" && isNotFound(err)
		}},
		{name: "unknown command", cmd: "nope", check: func(err error) bool {
			var qe *Error
			return errors.As(err, &qe) && qe.Class == "CommandNotFound" && !isNotFound(err)
		}},
		{name: "no answer times out", cmd: "hang", timeout: 50 * time.Millisecond, check: func(err error) bool {
			return errors.Is(err, context.DeadlineExceeded)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cctx := ctx
			if tt.timeout > 0 {
				var cancel context.CancelFunc
				cctx, cancel = context.WithTimeout(ctx, tt.timeout)
				defer cancel()
			}
			var got struct {
				N int `json:"n"`
			}
			err := c.Execute(cctx, tt.cmd, tt.args, &got)
			if tt.check != nil {
				if !tt.check(err) {
					t.Fatalf("error %v is not the expected one", err)
				}
				return
			}
			if err != nil || got.N != tt.want {
				t.Fatalf("got %d, %v; want %d", got.N, err, tt.want)
			}
		})
	}

	// Concurrent commands each get their own reply, whatever the order
	// QEMU answers in.
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var got struct {
				N int `json:"n"`
			}
			err := c.Execute(ctx, "echo", map[string]int{"n": i, "delay": (20 - i) * 2}, &got)
			if err == nil && got.N != i {
				err = fmt.Errorf("command %d got reply %d", i, got.N)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if ev := c.Events(); len(ev) == 0 || ev[0].Name != "TICK" || ev[0].Time.Unix() != 1 {
		t.Errorf("events %+v, want TICK events", ev)
	}
	// The client still works after a timed-out command.
	if err := c.Execute(ctx, "echo", map[string]int{"n": 1}, nil); err != nil {
		t.Errorf("after a timeout: %v", err)
	}
}

func TestClientConnectionLost(t *testing.T) {
	f := newFakeQEMU(t, true, func(cmd string, args json.RawMessage, send func(string)) (any, *qmpErr, bool) {
		return nil, nil, true // never answers; the test closes the listener's conns
	})
	ctx := context.Background()
	c, err := Dial(ctx, f.path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Execute(ctx, "hang", nil, nil) }()
	time.Sleep(50 * time.Millisecond)
	c.conn.(*net.UnixConn).CloseRead() // as if QEMU hung up
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Errorf("pending command: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pending command did not fail when the connection went away")
	}
	if err := c.Execute(ctx, "later", nil, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("later command: %v, want ErrClosed", err)
	}
	c.Close()
}

func TestDialBusySocket(t *testing.T) {
	f := newFakeQEMU(t, false, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, f.path)
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("Dial to a socket that never greets: %v, want ErrBusy", err)
	}
}

func TestDialNotQMP(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err == nil {
			conn.Write([]byte("hello\n"))
			time.Sleep(100 * time.Millisecond)
			conn.Close()
		}
	}()
	if _, err := Dial(context.Background(), path); err == nil {
		t.Fatal("Dial to a non-QMP socket succeeded")
	}
	if _, err := Dial(context.Background(), filepath.Join(t.TempDir(), "missing.sock")); err == nil {
		t.Fatal("Dial to a missing socket succeeded")
	}
}
