package daemon

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// setNice puts every thread of this process at CPU priority nice.
//
// Why: a backup's own work (hashing, compressing, encrypting, writing the
// repository) competes with the guests for the host's CPU, and a guest
// waiting for a core sees its I/O slow down. bench/sched.sh measured it:
// backups reading 10 MiB/s from copies off the datastore raised the
// guests' p99 I/O latency by 32–43% at nice 0 and by 5–8% at nice 19.
//
// Linux keeps a nice value per thread, and a new thread takes its
// creator's, so every thread is set, and the list is read again until no
// new one appeared (the Go runtime may start threads meanwhile).
func setNice(nice int) error {
	done := map[int]bool{}
	for range 5 {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("listing the daemon's threads: %w", err)
		}
		fresh := false
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || done[tid] {
				continue
			}
			fresh = true
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("setting the CPU priority (limits.nice %d) of thread %d: %w", nice, tid, err)
			}
			done[tid] = true
		}
		if !fresh {
			return nil
		}
	}
	return nil
}
