// Package throttle keeps backups from hurting the latency of the guests whose
// disks they read.
//
// It owns three things: a token-bucket [Limiter] that paces one backup's
// reads, a [Controller] per datastore that turns latency observations into
// AIMD rate changes for the limiters attached to it and into a "start no new
// backups" flag, and helpers ([BlockLatency], [DiskLatencyFromDiskStats]) that
// turn cumulative QEMU blockstats and /proc/diskstats counters into interval
// latencies.
//
// The package does no I/O and reads no clock of its own in the controller:
// callers sample QMP query-blockstats (or libvirt block stats) and
// /proc/diskstats, pass the deltas to [Controller.Observe], call
// [Controller.Tick] on their control interval with the current time, and log
// and count the returned [Decision]. It knows nothing of VMs, NBD, the
// scheduler or metrics exporters; the Limiter's only dependency on time is
// the [Clock] it is given.
package throttle
