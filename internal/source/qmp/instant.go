package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/kura-backup/kura/internal/childenv"
)

// What a VM running from a restore point needs from QEMU itself: starting
// it from a saved command line, moving its disks to local files while it
// runs, and ending it.

// SavedCommandLine returns the QEMU command line kept in a configuration
// Config returned, or an error that says why there is none.
func SavedCommandLine(config string) ([]string, error) {
	var cfg vmConfig
	if err := json.Unmarshal([]byte(config), &cfg); err != nil {
		return nil, fmt.Errorf("reading the saved QEMU configuration: %w", err)
	}
	if len(cfg.Cmdline) == 0 {
		return nil, errors.New("the backup kept no QEMU command line (kura could not read /proc/PID/cmdline of the VM's QEMU when it backed it up)")
	}
	return cfg.Cmdline, nil
}

// Start runs args (args[0] the emulator) as a process of its own session
// that outlives the caller, its output appended to logPath, and waits until
// QEMU listens on qmpSocket. It returns QEMU's pid; when QEMU ends first,
// the error carries the end of its output.
func Start(ctx context.Context, args []string, logPath, qmpSocket string) (int, error) {
	bin, err := exec.LookPath(args[0])
	if err != nil {
		return 0, fmt.Errorf("the VM's emulator %s: %w (install it, for example apt-get install qemu-system-x86)", args[0], err)
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	c := childenv.Command(bin, args[1:]...)
	c.Stdout, c.Stderr = logf, logf
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		return 0, fmt.Errorf("starting %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- c.Wait() }()
	for {
		if fi, err := os.Stat(qmpSocket); err == nil && fi.Mode()&os.ModeSocket != 0 {
			pid := c.Process.Pid // Release sets it to -1
			c.Process.Release()
			return pid, nil
		}
		select {
		case err := <-exited:
			out, _ := os.ReadFile(logPath)
			return 0, fmt.Errorf("QEMU ended before it started the VM (%v): %s", err, lastLines(string(out), 5))
		case <-ctx.Done():
			c.Process.Kill()
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// Quit ends the QEMU behind socket at once (the guest is not shut down)
// and waits up to 10 s for the socket's peer process to go.
func Quit(ctx context.Context, socket string) error {
	c, err := Dial(ctx, socket)
	if err != nil {
		return err
	}
	pid := c.PeerPID()
	err = c.Execute(ctx, "quit", nil, nil)
	c.Close()
	if err != nil {
		return fmt.Errorf("asking QEMU to quit: %w", err)
	}
	for end := time.Now().Add(10 * time.Second); pid > 0 && time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if syscall.Kill(pid, 0) != nil {
			return nil
		}
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err != nil || strings.Contains(string(st), ") Z ") {
			return nil
		}
	}
	if pid > 0 {
		return fmt.Errorf("QEMU (pid %d) did not end within 10 s of quit", pid)
	}
	return nil
}

// MoveDisk copies the whole chain of the disk whose top image is image (a
// VM running from a restore point: an overlay over kura's NBD export) to a
// new standalone file dest of format, while the guest runs, and switches
// the disk onto it (drive-mirror, then block-job-complete). progress, if
// not nil, is called with the job's offset and length.
func MoveDisk(ctx context.Context, socket, image, dest, format string, progress func(cur, end uint64)) error {
	c, err := Dial(ctx, socket)
	if err != nil {
		return err
	}
	defer c.Close()
	blocks, err := queryBlock(ctx, c)
	if err != nil {
		return err
	}
	device := ""
	for _, b := range blocks {
		if b.Inserted != nil && (b.Inserted.Image.Filename == image || b.Inserted.File == image) {
			device = b.Device
			if device == "" {
				device = b.Inserted.NodeName
			}
		}
	}
	if device == "" {
		return fmt.Errorf("no disk of the VM reads %s", image)
	}
	job := "kura-move-" + sanitizeID(device)
	if err := c.Execute(ctx, "drive-mirror", map[string]any{
		"job-id": job, "device": device, "target": dest, "format": format,
		"sync": "full", "mode": "absolute-paths", "auto-dismiss": false,
	}, nil); err != nil {
		return fmt.Errorf("starting the copy of %s to %s: %w", device, dest, err)
	}
	// From here the job must not be left behind.
	ok := false
	defer func() {
		if !ok {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			c.Execute(cctx, "block-job-cancel", map[string]any{"device": job, "force": true}, nil)
			waitConcluded(cctx, c, job)
			c.Execute(cctx, "job-dismiss", map[string]any{"id": job}, nil)
			os.Remove(dest)
		}
	}()
	type blockJob struct {
		Device string `json:"device"`
		Len    uint64 `json:"len"`
		Offset uint64 `json:"offset"`
		Ready  bool   `json:"ready"`
		Status string `json:"status"`
	}
	for {
		var js []blockJob
		if err := c.Execute(ctx, "query-block-jobs", nil, &js); err != nil {
			return fmt.Errorf("following the copy of %s: %w", device, err)
		}
		var j *blockJob
		for i := range js {
			if js[i].Device == job {
				j = &js[i]
			}
		}
		if j == nil {
			// It concluded before it was ready: an error.
			st, err := waitConcluded(ctx, c, job)
			if err == nil {
				err = fmt.Errorf("copying %s to %s: %s", device, dest, st.Error)
			}
			return err
		}
		if progress != nil {
			progress(j.Offset, j.Len)
		}
		if j.Ready {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err := c.Execute(ctx, "block-job-complete", map[string]any{"device": job}, nil); err != nil {
		return fmt.Errorf("switching %s to %s: %w", device, dest, err)
	}
	st, err := waitConcluded(ctx, c, job)
	if err != nil {
		return err
	}
	if st.Error != "" {
		return fmt.Errorf("switching %s to %s: %s", device, dest, st.Error)
	}
	ok = true
	c.Execute(ctx, "job-dismiss", map[string]any{"id": job}, nil)
	blocks, err = queryBlock(ctx, c)
	if err != nil {
		return err
	}
	for _, b := range blocks {
		if b.Inserted != nil && b.Inserted.Image.Filename == dest {
			if bf := b.Inserted.Image.BackingFilename; bf != "" {
				return fmt.Errorf("disk %s still reads %s through %s after the switch", device, bf, dest)
			}
			return nil
		}
	}
	return fmt.Errorf("disk %s does not read %s alone after the switch: look at query-block", device, dest)
}

// waitConcluded waits until job is concluded and returns its state.
func waitConcluded(ctx context.Context, c *Client, job string) (jobInfo, error) {
	for {
		js, err := queryJobs(ctx, c)
		if err != nil {
			return jobInfo{}, err
		}
		found := false
		for _, j := range js {
			if j.ID == job {
				found = true
				if j.Status == "concluded" || j.Status == "null" {
					return j, nil
				}
			}
		}
		if !found {
			return jobInfo{}, fmt.Errorf("block job %s is gone", job)
		}
		select {
		case <-ctx.Done():
			return jobInfo{}, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func sanitizeID(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' {
			return r
		}
		return '-'
	}, s)
}
