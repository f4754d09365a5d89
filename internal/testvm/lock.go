package testvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Tests that talk to libvirt share libvirtd with every other test binary
// that runs at the same time (go test runs packages in parallel). A test
// that restarts libvirtd would break them, so libvirtd has a reader-writer
// lock across processes, two flock files in /run/lock (one libvirtd per
// host, one lock per host):
//
//   - libvirtd-users.lock: every libvirt user holds it shared (StartLibvirt
//     takes it for the guest's lifetime, Destroy releases it); a test that
//     restarts libvirtd holds it exclusively.
//   - libvirtd-turnstile.lock: the exclusive taker holds it while it waits,
//     so that new users queue behind it instead of starving it.
//
// Within one process the lock is counted: the process takes the shared
// flock once, for its first user, and drops it with its last. A process
// that holds the lock exclusively can still start guests (they count
// without touching the flock), so a restart test can take the exclusive
// lock first and then boot its own guest.
const (
	usersLockName     = "libvirtd-users.lock"
	turnstileLockName = "libvirtd-turnstile.lock"
	lockPoll          = 100 * time.Millisecond
)

var libvirtdLock struct {
	mu        sync.Mutex
	f         *os.File // the users lock, open while shared > 0 or exclusive
	shared    int      // holders of the shared lock in this process
	exclusive bool
	guests    map[*Guest]func()
}

// LockLibvirtdShared holds libvirtd against restarts by other tests (see
// LockLibvirtdExclusive) until release is called. StartLibvirt takes it for
// each guest; call it directly for libvirt work without a testvm guest.
// release may be called more than once.
func LockLibvirtdShared(ctx context.Context) (release func(), err error) {
	l := &libvirtdLock
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.shared == 0 && !l.exclusive {
		f, err := openLock(usersLockName)
		if err != nil {
			return nil, err
		}
		// Queue behind a restart that is waiting for the lock.
		turn, err := openLock(turnstileLockName)
		if err != nil {
			f.Close()
			return nil, err
		}
		err = flockWait(ctx, turn, syscall.LOCK_EX, turnstileLockName)
		if err == nil {
			err = flockWait(ctx, f, syscall.LOCK_SH, usersLockName)
		}
		turn.Close()
		if err != nil {
			f.Close()
			return nil, err
		}
		l.f = f
	}
	l.shared++
	var once sync.Once
	return func() { once.Do(releaseShared) }, nil
}

func releaseShared() {
	l := &libvirtdLock
	l.mu.Lock()
	defer l.mu.Unlock()
	l.shared--
	if l.shared == 0 && !l.exclusive {
		l.f.Close() // releases the flock
		l.f = nil
	}
}

// LockLibvirtdExclusive waits until no other process uses libvirtd through
// testvm and keeps new users waiting until release is called: hold it
// around RestartLibvirtd. Guests of this process keep running (their shared
// hold turns into the exclusive one), and this process may start guests
// while it holds the lock. It fails if this process already holds it.
func LockLibvirtdExclusive(ctx context.Context) (release func(), err error) {
	l := &libvirtdLock
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.exclusive {
		return nil, errors.New("testvm: this process already holds libvirtd exclusively")
	}
	turn, err := openLock(turnstileLockName)
	if err != nil {
		return nil, err
	}
	defer turn.Close()
	if err := flockWait(ctx, turn, syscall.LOCK_EX, turnstileLockName); err != nil {
		return nil, err
	}
	f := l.f
	if f == nil {
		if f, err = openLock(usersLockName); err != nil {
			return nil, err
		}
	}
	// With guests of this process holding f shared, this converts the lock.
	// A conversion that has to wait drops the shared lock first (flock(2)),
	// so keep it while waiting by taking it again after each try.
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if l.shared > 0 {
			syscall.Flock(int(f.Fd()), syscall.LOCK_SH)
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			if l.f == nil {
				f.Close()
			}
			return nil, fmt.Errorf("locking %s: %w", usersLockName, err)
		}
		select {
		case <-ctx.Done():
			if l.f == nil {
				f.Close()
			}
			return nil, fmt.Errorf("waiting for the other tests that use libvirtd to end (lock %s): %w", usersLockName, ctx.Err())
		case <-time.After(lockPoll):
		}
	}
	l.f, l.exclusive = f, true
	var once sync.Once
	return func() { once.Do(releaseExclusive) }, nil
}

func releaseExclusive() {
	l := &libvirtdLock
	l.mu.Lock()
	defer l.mu.Unlock()
	l.exclusive = false
	if l.shared > 0 {
		syscall.Flock(int(l.f.Fd()), syscall.LOCK_SH) // a downgrade never waits
		return
	}
	l.f.Close()
	l.f = nil
}

// holdsLibvirtdExclusive reports whether this process holds the exclusive
// lock.
func holdsLibvirtdExclusive() bool {
	l := &libvirtdLock
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.exclusive
}

// holdLibvirtdFor keeps a shared hold (release) for g until
// releaseGuestLock.
func holdLibvirtdFor(g *Guest, release func()) {
	l := &libvirtdLock
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.guests == nil {
		l.guests = map[*Guest]func(){}
	}
	l.guests[g] = release
}

func releaseGuestLock(g *Guest) {
	l := &libvirtdLock
	l.mu.Lock()
	release := l.guests[g]
	delete(l.guests, g)
	l.mu.Unlock()
	if release != nil {
		release()
	}
}

// RestartLibvirtd stops libvirtd, leaves it down for down, and starts it
// again as EnsureLibvirtd does, waiting until virsh connects. Running guests
// keep running (libvirtd reconnects to their QEMU processes). The caller
// must hold LockLibvirtdExclusive. libvirtd is started again even when ctx
// ends while it is down.
func RestartLibvirtd(ctx context.Context, down time.Duration) error {
	if !holdsLibvirtdExclusive() {
		return errors.New("testvm: RestartLibvirtd needs LockLibvirtdExclusive: other tests may be using libvirtd")
	}
	if err := StopLibvirtd(ctx); err != nil {
		// It may be half down: make sure it runs.
		return errors.Join(err, startLibvirtdAgain(ctx))
	}
	select {
	case <-ctx.Done():
	case <-time.After(down):
	}
	return startLibvirtdAgain(ctx)
}

// StopLibvirtd stops libvirtd and waits until it is gone; start it again
// with EnsureLibvirtd. The caller must hold LockLibvirtdExclusive.
func StopLibvirtd(ctx context.Context) error {
	if !holdsLibvirtdExclusive() {
		return errors.New("testvm: StopLibvirtd needs LockLibvirtdExclusive: other tests may be using libvirtd")
	}
	cache, err := CacheDir()
	if err != nil {
		return err
	}
	// EnsureLibvirtd of other processes waits while libvirtd stops.
	unlock, err := lockFile(ctx, filepath.Join(cache, "libvirtd.lock"))
	if err != nil {
		return err
	}
	defer unlock()
	if isDir("/run/systemd/system") {
		if _, err := runCmd(ctx, "systemctl", "stop", "libvirtd.service"); err != nil {
			return fmt.Errorf("stopping libvirtd: %w", err)
		}
		return nil
	}
	pid := readPIDFile(libvirtdPID)
	if !processAlive(pid) {
		return fmt.Errorf("stopping libvirtd: no running libvirtd in %s (not started by testvm.EnsureLibvirtd?)", libvirtdPID)
	}
	if err := stopDaemon(ctx, libvirtdPID, "libvirtd"); err != nil {
		return err
	}
	for deadline := time.Now().Add(libvirtTimeout); socketAnswers(libvirtSocket); {
		if time.Now().After(deadline) {
			return fmt.Errorf("stopping libvirtd: %s still answers after pid %d ended", libvirtSocket, pid)
		}
		time.Sleep(lockPoll)
	}
	return nil
}

// startLibvirtdAgain is EnsureLibvirtd with a context of its own, so that
// libvirtd runs again whatever became of ctx.
func startLibvirtdAgain(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*libvirtTimeout)
	defer cancel()
	if err := EnsureLibvirtd(sctx); err != nil {
		return fmt.Errorf("starting libvirtd again: %w", err)
	}
	return nil
}

func openLock(name string) (*os.File, error) {
	// libvirtd is one per host, so its lock is too: not in CacheDir, which
	// differs between processes with different KURA_CACHE (a CI run beside
	// a benchmark).
	dir := "/run/lock"
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = os.TempDir()
	}
	path := filepath.Join(dir, "kura-"+name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening lock %s: %w", path, err)
	}
	return f, nil
}

// flockWait takes flock how on f, polling so that ctx can end the wait.
func flockWait(ctx context.Context, f *os.File, how int, name string) error {
	for {
		err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("locking %s: %w", name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for lock %s (a test is restarting libvirtd): %w", name, ctx.Err())
		case <-time.After(lockPoll):
		}
	}
}
