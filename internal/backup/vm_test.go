package backup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/source"
)

// fakeVM stands in for a driver in this unit test of RunVM's bookkeeping;
// the drivers themselves are tested against real VMs in their packages.
type fakeVM struct {
	disk      *trackedDisk
	captures  []source.CaptureOptions
	sinces    []string // what SinceCheckpoint said, per capture
	ended     []bool
	seq       int
	failRead  bool
	lastSince string
	noAgent   bool
}

func (v *fakeVM) Name() string { return "web01" }
func (v *fakeVM) Config(ctx context.Context) (string, string, error) {
	return "libvirt-xml", "<domain><name>web01</name></domain>", nil
}
func (v *fakeVM) Capture(ctx context.Context, o source.CaptureOptions) (source.Capture, error) {
	v.captures = append(v.captures, o)
	if v.noAgent && o.Mode == source.ModeApp {
		return nil, errors.New("guest agent not connected or not responding")
	}
	// As the drivers do: the parent is asked for before the instant.
	since, err := o.SinceCheckpoint(ctx)
	if err != nil {
		return nil, err
	}
	v.sinces = append(v.sinces, since)
	v.seq++
	return &fakeCapture{vm: v, cp: fmt.Sprintf("kura-%d", v.seq), since: since}, nil
}

type fakeCapture struct {
	vm    *fakeVM
	cp    string
	since string
}

func (c *fakeCapture) Disks() []source.Disk {
	if c.vm.failRead {
		return []source.Disk{&failingDisk{c.vm.disk.memDisk}}
	}
	return []source.Disk{c.vm.disk}
}
func (c *fakeCapture) Checkpoint() string { return c.cp }
func (c *fakeCapture) Notes() []source.DiskNote {
	if c.since == "" {
		return []source.DiskNote{{Disk: "vda", Read: "full", Reason: "no checkpoint"}}
	}
	return []source.DiskNote{{Disk: "vda", Read: "changed"}}
}
func (c *fakeCapture) Mode() string {
	if c.vm.noAgent {
		return source.ModeCrash
	}
	return source.ModeApp
}
func (c *fakeCapture) FreezeWindow() time.Duration { return 42 * time.Millisecond }
func (c *fakeCapture) Pause() time.Duration        { return 0 }
func (c *fakeCapture) FreezeParts() source.FreezeParts {
	return source.FreezeParts{Freeze: 20 * time.Millisecond, Instant: 15 * time.Millisecond, Thaw: 7 * time.Millisecond}
}
func (c *fakeCapture) End(ctx context.Context, ok bool) error {
	c.vm.ended = append(c.vm.ended, ok)
	return nil
}

func TestRunVMChainsCheckpoints(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	d := &trackedDisk{memDisk: memDisk{name: "vda", data: bytes.Repeat([]byte("web01 "), 1<<20)}}
	vm := &fakeVM{disk: d}

	var stored []string // what Stored saw, and whether End had run by then
	s1, err := RunVM(ctx, r, vm, VMOptions{Source: "libvirt", Stored: func(s *repo.Snapshot) {
		stored = append(stored, fmt.Sprintf("%s ended=%d", s.ID, len(vm.ended)))
	}})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{s1.ID + " ended=0"}; fmt.Sprint(stored) != fmt.Sprint(want) {
		t.Fatalf("Stored calls %v, want %v (before End)", stored, want)
	}
	if s1.Kind != "full" || s1.Checkpoint != "kura-1" || s1.Mode != "app" || s1.Stats.FreezeMillis != 42 || s1.Stats.FreezeCallMillis != 20 || s1.Stats.InstantMillis != 15 || s1.Stats.ThawCallMillis != 7 || s1.Config == nil || s1.Disks[0].Read != "full (no checkpoint)" {
		t.Fatalf("first: %+v", s1)
	}
	d.dirty = map[int64]bool{3: true}
	d.data[3*64<<10] = 'X'
	s2, err := RunVM(ctx, r, vm, VMOptions{Source: "libvirt"})
	if err != nil {
		t.Fatal(err)
	}
	if vm.sinces[1] != "kura-1" || s2.Kind != "incremental" || s2.Parent != s1.ID {
		t.Fatalf("second: since %q kind %q", vm.sinces[1], s2.Kind)
	}
	if got := restoreMem(t, r, s2.Disks[0]); !bytes.Equal(got, d.data) {
		t.Fatal("incremental restore point differs")
	}
	// --full ignores tracking once.
	s3, err := RunVM(ctx, r, vm, VMOptions{Source: "libvirt", Full: true})
	if err != nil || vm.sinces[2] != "" || s3.Kind != "full" {
		t.Fatalf("full: %v since %q kind %q", err, vm.sinces[2], s3.Kind)
	}
	// A failed read ends the capture with ok=false and writes no snapshot.
	vm.failRead = true
	before, _ := r.SnapshotIDs(ctx)
	if _, err := RunVM(ctx, r, vm, VMOptions{Source: "libvirt"}); err == nil {
		t.Fatal("backup of a failing disk succeeded")
	}
	after, _ := r.SnapshotIDs(ctx)
	if len(after) != len(before) {
		t.Fatal("failed backup wrote a snapshot")
	}
	want := []bool{true, true, true, false}
	if fmt.Sprint(vm.ended) != fmt.Sprint(want) {
		t.Fatalf("End calls %v, want %v", vm.ended, want)
	}
}

// A repository that cannot be opened (a wrong password) stops the backup
// before the driver's instant, and its error is the one returned.
func TestRunVMOpeningFails(t *testing.T) {
	ctx := context.Background()
	vm := &fakeVM{disk: &trackedDisk{memDisk: memDisk{name: "vda", data: bytes.Repeat([]byte("x"), 1<<20)}}}
	wrong := errors.New("wrong password")
	_, err := RunVMOpening(ctx, func(context.Context) (*repo.Repo, error) { return nil, wrong }, vm, VMOptions{Source: "libvirt"})
	if err != wrong {
		t.Fatalf("RunVMOpening: %v, want the open error itself", err)
	}
	if len(vm.captures) != 1 || vm.seq != 0 || len(vm.ended) != 0 {
		t.Fatalf("captures asked %d, made %d, ended %v: want one asked, none made", len(vm.captures), vm.seq, vm.ended)
	}
}

func TestRunVMFallsBackToCrashUnlessAppRequired(t *testing.T) {
	ctx := context.Background()
	r := testRepo(t)
	vm := &fakeVM{disk: &trackedDisk{memDisk: memDisk{name: "vda", data: bytes.Repeat([]byte("x"), 1<<20)}}, noAgent: true}
	s, err := RunVM(ctx, r, vm, VMOptions{Source: "libvirt", Mode: source.ModeApp})
	if err != nil {
		t.Fatal(err)
	}
	if s.Mode != source.ModeCrash || s.Stats.Note == "" || vm.captures[0].Mode != "" {
		t.Fatalf("fallback: mode %q note %q asked %q", s.Mode, s.Stats.Note, vm.captures[0].Mode)
	}
	n, _ := r.SnapshotIDs(ctx)
	if _, err := RunVM(ctx, r, vm, VMOptions{Source: "libvirt", RequireApp: true}); err == nil {
		t.Fatal("--require-app backup succeeded without an agent")
	}
	if vm.captures[1].Mode != source.ModeApp {
		t.Fatalf("--require-app asked the driver for mode %q", vm.captures[1].Mode)
	}
	if m, _ := r.SnapshotIDs(ctx); len(m) != len(n) {
		t.Fatal("a failed --require-app backup wrote a snapshot")
	}
}

// oddVM is a fakeVM whose domain name cannot be a restore point name.
type oddVM struct {
	*fakeVM
	name string
}

func (v oddVM) Name() string { return v.name }

// A VM whose name is not a valid restore point name is refused before it
// is touched (no capture, no freeze), with the rule in the error.
func TestRunVMRefusesBadNameFirst(t *testing.T) {
	ctx := context.Background()
	for _, name := range []string{"web@01", "a/b", "bad\nname"} {
		vm := &fakeVM{disk: &trackedDisk{memDisk: memDisk{name: "vda", data: bytes.Repeat([]byte("x"), 1<<20)}}}
		opened := false
		_, err := RunVMOpening(ctx, func(context.Context) (*repo.Repo, error) { opened = true; return nil, errors.New("unused") }, oddVM{vm, name}, VMOptions{Source: "libvirt"})
		if !errors.Is(err, repo.ErrBadName) {
			t.Errorf("%q: err %v, want ErrBadName", name, err)
		}
		if len(vm.captures) != 0 || opened {
			t.Errorf("%q: %d captures asked, repository opened %v: want the VM untouched", name, len(vm.captures), opened)
		}
	}
}
