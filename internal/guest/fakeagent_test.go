package guest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// fakeAgent is an in-process QEMU guest agent on a unix socket: enough of
// the QGA protocol for the freezer and the watchdog (guest-sync-delimited,
// guest-ping, guest-fsfreeze-*), run one command at a time like qemu-ga, and
// able to hang on a command until the test releases it.
type fakeAgent struct {
	path string
	ln   net.Listener

	exec sync.Mutex // held while a command runs, as qemu-ga runs one at a time

	mu     sync.Mutex
	frozen bool
	hang   map[string]chan struct{} // commands that wait for the channel
	silent bool                     // read requests, answer nothing
	junk   string                   // written before each sync reply
	log    []string
}

func newFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	dir, err := os.MkdirTemp("", "qga")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	a := &fakeAgent{path: filepath.Join(dir, "qga.sock"), hang: map[string]chan struct{}{}}
	if a.ln, err = net.Listen("unix", a.path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.ln.Close() })
	go a.serve()
	return a
}

func (a *fakeAgent) serve() {
	for {
		c, err := a.ln.Accept()
		if err != nil {
			return
		}
		go a.handle(c)
	}
}

func (a *fakeAgent) isFrozen() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.frozen
}

func (a *fakeAgent) setFrozen(f bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.frozen = f
}

// hangOn makes cmd wait until the returned function is called.
func (a *fakeAgent) hangOn(cmd string) (release func()) {
	ch := make(chan struct{})
	a.mu.Lock()
	a.hang[cmd] = ch
	a.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			a.mu.Lock()
			delete(a.hang, cmd)
			a.mu.Unlock()
			close(ch)
		})
	}
}

func (a *fakeAgent) commands() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.log...)
}

func (a *fakeAgent) handle(c net.Conn) {
	defer c.Close()
	rd := bufio.NewReader(c)
	for {
		line, err := rd.ReadBytes('\n')
		if err != nil {
			return
		}
		line = bytes.TrimLeft(line, "\xff")
		var req struct {
			Execute   string `json:"execute"`
			Arguments struct {
				ID uint64 `json:"id"`
			} `json:"arguments"`
		}
		if json.Unmarshal(line, &req) != nil {
			continue
		}
		a.mu.Lock()
		silent, junk := a.silent, a.junk
		a.log = append(a.log, req.Execute)
		a.mu.Unlock()
		if silent {
			continue
		}
		reply := a.run(req.Execute, req.Arguments.ID, junk)
		c.Write(reply) // the client may be gone
	}
}

// run executes one command like qemu-ga: serially, maybe hanging first.
func (a *fakeAgent) run(cmd string, id uint64, junk string) []byte {
	a.exec.Lock()
	defer a.exec.Unlock()
	a.mu.Lock()
	ch := a.hang[cmd]
	a.mu.Unlock()
	if ch != nil {
		<-ch
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	ret := func(v any) []byte {
		b, _ := json.Marshal(map[string]any{"return": v})
		return append(b, '\n')
	}
	fail := func(desc string) []byte {
		b, _ := json.Marshal(map[string]any{"error": map[string]string{"class": "GenericError", "desc": desc}})
		return append(b, '\n')
	}
	switch cmd {
	case "guest-sync-delimited":
		return append([]byte(junk+"\xff"), ret(id)...)
	case cmdPing:
		return ret(struct{}{})
	case cmdStatus:
		if a.frozen {
			return ret(StatusFrozen)
		}
		return ret(StatusThawed)
	case cmdFreeze:
		if a.frozen {
			return fail("Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state")
		}
		a.frozen = true
		return ret(2)
	case cmdThaw:
		if !a.frozen {
			return ret(0)
		}
		a.frozen = false
		return ret(2)
	}
	return fail(fmt.Sprintf("The command %s has not been found", cmd))
}
