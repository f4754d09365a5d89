package main

import (
	"context"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/kura-backup/kura/internal/source/libvirt"
	"github.com/kura-backup/kura/internal/testvm"
)

// boots defines a local copy of the VM from the restore point and, for
// BootRuns rounds, measures its cold boot and an instant recovery, each
// followed by a sequential read of the data disk inside the guest.
func (b *bench) boots(ctx context.Context) error {
	dest := filepath.Join(b.work, "local")
	if err := os.MkdirAll(dest, 0o755); err != nil {
		return err
	}
	for _, d := range b.disks {
		if d.Target == "vdb" {
			n, err := allocatedIn(ctx, d.Raw, int64(b.cfg.DDMiB)*MiB)
			if err != nil {
				return err
			}
			b.res.DDAllocated = n
		}
	}
	env, unset := b.kuraEnv()
	if err := dropCaches(ctx); err != nil {
		return err
	}
	b.localDefined = true // the command may define it and then fail
	m, _, err := b.measure(ctx, "restore-define-local", true, env, unset,
		b.cfg.Kura, "-q", "restore", b.guestName+"@latest", "--define", "--as", b.localName, "--to", dest, "--format", "qcow2")
	if err != nil {
		return err
	}
	b.res.LocalRestore = &m
	if out, err := benchutil.Run(ctx, "virsh", "domblklist", b.localName); err == nil {
		logf("%s disks:\n%s", b.localName, strings.TrimSpace(out))
	}
	for i := 1; i <= b.cfg.BootRuns; i++ {
		br := BootRun{Run: i}
		err := b.bootPair(ctx, &br)
		b.res.Boots = append(b.res.Boots, br)
		if err != nil {
			return fmt.Errorf("boot round %d: %w", i, err)
		}
	}
	if err := removeDomain(ctx, b.localName); err != nil {
		return err
	}
	b.localDefined = false
	os.RemoveAll(dest)
	return nil
}

var answeredRE = regexp.MustCompile(`guest agent answered (\S+) after the command started`)

func (b *bench) bootPair(ctx context.Context, br *BootRun) error {
	// Cold boot of the local copy.
	if err := dropCaches(ctx); err != nil {
		return err
	}
	br.ColdOthers = b.otherGuests(ctx)
	start := time.Now()
	if _, err := benchutil.Run(ctx, "virsh", "start", b.localName); err != nil {
		return err
	}
	d, err := b.waitPing(ctx, b.localName, start)
	if err != nil {
		return err
	}
	br.ColdS = d.Seconds()
	logf("cold boot #%d of %s: guest agent answered %.2f s after virsh start", br.Run, b.localName, br.ColdS)
	if br.DDLocal, err = b.guestRead(ctx, b.localName, fmt.Sprintf("dd-local-%d", br.Run)); err != nil {
		return err
	}
	if err := b.shutdown(ctx, b.localName); err != nil {
		return err
	}

	// Instant recovery from the repository.
	env, unset := b.kuraEnv()
	if err := dropCaches(ctx); err != nil {
		return err
	}
	br.InstantOthers = b.otherGuests(ctx)
	b.irRunning = true
	m, out, err := b.measure(ctx, fmt.Sprintf("instant-%d", br.Run), false, env, unset,
		b.cfg.Kura, "instant", b.guestName+"@latest", "--as", b.irName, "--dir", filepath.Join(b.work, fmt.Sprintf("ir-%d", br.Run)))
	if err != nil {
		return err
	}
	br.Instant = m
	if mm := answeredRE.FindStringSubmatch(out); mm != nil {
		if d, err := time.ParseDuration(mm[1]); err == nil {
			br.InstantAnsweredS = d.Seconds()
		}
	}
	if br.InstantAnsweredS == 0 {
		return fmt.Errorf("kura instant did not say when the guest agent answered; see %s:\n%s", m.Log, benchutil.LastLines(out, 10))
	}
	logf("instant recovery #%d: command %.2f s, guest agent answered %.2f s after it started", br.Run, m.Seconds, br.InstantAnsweredS)
	if br.DDInstant, err = b.guestRead(ctx, b.irName, fmt.Sprintf("dd-instant-%d", br.Run)); err != nil {
		return err
	}
	if _, err := b.kura(ctx, "instant", "--stop", b.irName); err != nil {
		return err
	}
	b.irRunning = false
	if b.s3 == nil {
		return nil
	}

	// Instant recovery from the repository on S3.
	env, unset = b.kuraS3Env()
	if err := dropCaches(ctx); err != nil {
		return err
	}
	b.irRunning = true
	m, out, err = b.measure(ctx, fmt.Sprintf("instant-s3-%d", br.Run), false, env, unset,
		b.cfg.Kura, "instant", b.guestName+"@latest", "--as", b.irName, "--dir", filepath.Join(b.work, fmt.Sprintf("ir-s3-%d", br.Run)))
	if err != nil {
		return err
	}
	br.InstantS3 = &m
	if mm := answeredRE.FindStringSubmatch(out); mm != nil {
		if d, err := time.ParseDuration(mm[1]); err == nil {
			br.InstantS3AnsweredS = d.Seconds()
		}
	}
	logf("instant recovery from S3 #%d: command %.2f s, guest agent answered %.2f s after it started", br.Run, m.Seconds, br.InstantS3AnsweredS)
	if br.DDInstantS3, err = b.guestRead(ctx, b.irName, fmt.Sprintf("dd-instant-s3-%d", br.Run)); err != nil {
		return err
	}
	if _, err := runEnv(ctx, env, unset, b.cfg.Kura, "instant", "--stop", b.irName); err != nil {
		return err
	}
	b.irRunning = false
	return nil
}

// waitPing polls the guest agent of domain name with guest-ping every
// 100 ms and returns how long after start it first answered. With
// BENCH_BOOT_PING=api (the default) it asks through one libvirt connection
// kept open, as `kura instant` does; with "virsh" it runs `virsh
// qemu-agent-command` each time, whose start-up costs about 0.05 CPU-seconds
// a call: a third of a core at this rate, taken from the guest it times.
func (b *bench) waitPing(ctx context.Context, name string, start time.Time) (time.Duration, error) {
	deadline := start.Add(5 * time.Minute)
	ping := func(ctx context.Context) error {
		_, err := benchutil.Run(ctx, "virsh", "qemu-agent-command", name, `{"execute":"guest-ping"}`)
		return err
	}
	if b.cfg.BootPing == "api" {
		conn, err := libvirt.Connect(ctx, "qemu:///system")
		if err != nil {
			return 0, err
		}
		defer conn.Close()
		ping = func(ctx context.Context) error { return conn.AgentPing(ctx, name) }
	}
	for {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := ping(pctx)
		cancel()
		if err == nil {
			return time.Since(start), nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("the guest agent of %s did not answer within 5 minutes: %v", name, err)
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return 0, err
		}
	}
}

var ddRE = regexp.MustCompile(`(\d+) bytes .* copied, ([0-9.e+-]+) s`)

// guestRead waits until the guest has finished booting, drops the host's
// page cache and reads DDMiB MiB of the data disk sequentially in the guest
// with O_DIRECT.
func (b *bench) guestRead(ctx context.Context, name, label string) (*DDResult, error) {
	// The handle is not destroyed: that would undefine the domain. Its
	// hold on libvirtd's lock ends with this process.
	g, err := testvm.AttachLibvirt(ctx, name)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	st, _ := g.ExecFull(wctx, nil, "/bin/sh", "-c", "systemctl is-system-running --wait || true")
	cancel()
	if err := dropCaches(ctx); err != nil {
		return nil, err
	}
	cmd := fmt.Sprintf("dd if=/dev/vdb of=/dev/null bs=1M count=%d iflag=direct", b.cfg.DDMiB)
	t := time.Now()
	r, err := g.ExecFull(ctx, nil, "/bin/sh", "-c", cmd)
	wall := time.Since(t)
	if err != nil {
		return nil, err
	}
	os.WriteFile(filepath.Join(b.cfg.Out, "logs", label+".log"), []byte(cmd+"\n"+r.Stdout+r.Stderr), 0o644)
	if r.ExitCode != 0 {
		return nil, fmt.Errorf("%s: %s: exit %d: %s", name, cmd, r.ExitCode, strings.TrimSpace(r.Stderr))
	}
	mm := ddRE.FindStringSubmatch(r.Stderr)
	if mm == nil {
		return nil, fmt.Errorf("%s: %s: no \"copied\" line in %q", name, cmd, r.Stderr)
	}
	n, _ := strconv.ParseInt(mm[1], 10, 64)
	s, _ := strconv.ParseFloat(mm[2], 64)
	res := &DDResult{Bytes: n, Seconds: s, HostWallS: wall.Seconds(), GuestState: strings.TrimSpace(st.Stdout)}
	if s > 0 {
		res.MBps = float64(n) / 1e6 / s
	}
	logf("%s: %s: %.1f MB in %.2f s, %.0f MB/s (guest state before: %s)", name, cmd, float64(n)/1e6, s, res.MBps, res.GuestState)
	return res, nil
}
