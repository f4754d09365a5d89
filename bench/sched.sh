#!/usr/bin/env bash
# sched.sh — the benchmark that shows why Kura's scheduler exists: test
# guests on one datastore whose I/O is limited, each running a
# latency-measuring fio workload, protected with three strategies in one
# run — all at once with no control (`kura backup vm A B C --parallel N`),
# naive sequential (one `kura backup vm` after the other), and Kura's
# scheduler with latency control (`kura server` + `kura run-now`). It reports
# each guest's p50/p99 I/O latency during the backups against its idle
# baseline, the time to protect every VM, and a PNG of the guests' latency
# over time per strategy. See docs/BENCHMARKS.md ("Protecting every VM at
# once: the scheduler under I/O contention").
#
#   bash bench/sched.sh
#
# Needs root, Debian 12, libvirt + QEMU, Go at /usr/local/go, cgroup v1 blkio
# (/sys/fs/cgroup/blkio). It builds kura and bench/schedbench, boots fresh
# test guests (internal/testvm; the guest image is built on first use by
# scripts/mkguest.sh), restarts each with its disks at cache=none, moves
# their QEMU processes into one blkio cgroup throttling the device that holds
# the images (the "datastore"), and writes
#   $KURA_CACHE/bench/sched-results/<timestamp>/{results.md,results.json,latency-*.png,bench.log,logs/}
# (`latest` links to the newest). Guests, the cgroup, repositories and
# scratch files are removed at the end, also on failure or Ctrl-C.
#
# Environment (defaults in brackets):
#   BENCH_SCHED_GUESTS            test guests [3]
#   BENCH_SCHED_STRATEGIES        phases, in order [all-at-once sequential scheduler]
#                                 (also scheduler-pdN: the scheduler with per_datastore N)
#                                 (each optionally with -overlay: kura captures with `--capture overlay`,
#                                 the job with `capture: overlay`; and then -nice: kura at nice 19)
#   BENCH_SCHED_DATA_MIB          random files on each guest's data disk, MiB [256]
#   BENCH_SCHED_FIO_MIB           fio's file on the data disk, MiB [64]
#   BENCH_SCHED_DATA_GIB          virtual size of the data disk [2]
#   BENCH_SCHED_FIO_READ_IOPS     fio's 4 KiB random reads per second per guest [40]
#   BENCH_SCHED_FIO_WRITE_IOPS    fio's 4 KiB random writes per second per guest [40]
#                                 (either at 0: fio only reads, or only writes; a guest
#                                 that only reads shows the backups without copy-before-write)
#   BENCH_SCHED_LIMIT_READ_MIBS   datastore read limit, MiB/s (blkio read_bps_device; 0: none) [32]
#   BENCH_SCHED_LIMIT_WRITE_MIBS  datastore write limit, MiB/s [32]
#   BENCH_SCHED_LIMIT_READ_IOPS, BENCH_SCHED_LIMIT_WRITE_IOPS  IOPS limits [0: none]
#   BENCH_SCHED_LIMIT_SCOPE       shared (one cgroup, one budget for all guests) or per-vm [shared]
#   BENCH_SCHED_IOTHREAD          1: the guests' disks (and their backup exports) served in an I/O thread [0]
#   BENCH_SCHED_CACHE             cache mode of the guests' disks: none, directsync, writeback, default [none]
#   BENCH_SCHED_WARMUP_S          fio in every guest before the first phase, not measured [30]
#   BENCH_SCHED_BASELINE_S        idle lead-in (fio, no backup) before each strategy [20]
#   BENCH_SCHED_SETTLE_S          pause between phases [5]
#   BENCH_SCHED_PER_HOST          the scheduler's limits.per_host [3]
#   BENCH_SCHED_PER_DATASTORE     the scheduler's limits.per_datastore [3]
#   BENCH_SCHED_THRESHOLD_MS      latency.threshold; 0: X × the median over the earlier
#                                 phases' idle lead-ins of the highest guest p99 there [0]
#   BENCH_SCHED_THRESHOLD_X       that X [1.2]
#   BENCH_SCHED_INTERVAL_S        latency.interval, seconds [1]
#   BENCH_SCHED_MIN_RATE          latency.min_rate: a throttled backup's floor per second [2MiB]
#   BENCH_SCHED_INCREASE          latency.increase: added per recovered interval [4MiB]
#                                 (both sized for the default 32 MiB/s datastore and 3 backups:
#                                 the floor of all three together stays under a fifth of it)
#   BENCH_SCHED_MEMORY_MIB, BENCH_SCHED_CPUS  guest size [768, 1]
#   BENCH_SCHED_SEED              seed of the data disk's files [42]
#   BENCH_SCHED_OUT               output directory [$KURA_CACHE/bench/sched-results/<timestamp>]
#   BENCH_SCHED_MAX_READS         latency.max_reads: backup reads in flight on the datastore, fixed (or the read window's cap) [0: none]
#   BENCH_SCHED_OFF_RATE          the off-datastore strategy's --limit-read, e.g. 10MiB [none]
#   BENCH_SCHED_OFF_WORKERS       the off-/on-datastore strategies' --workers (reads in flight), e.g. 3 [kura's default]
#   BENCH_SCHED_SCRATCH           datastore: kura's scratch directory (copy-before-write images, overlays) on the datastore [/var/tmp]
#   BENCH_SCHED_READ_SIZE         latency.read_size: backup reads split into requests of this size, e.g. 32KiB [whole chunks]
#   BENCH_SCHED_BANDWIDTH         limits.bandwidth: each backup's read rate in the scheduler phases, e.g. 8.5MiB [none]
#   BENCH_SCHED_KURA_FLAGS        extra global kura flags, e.g. -v
#   BENCH_WORK                    where the scratch directory (guest disks, repositories) is made;
#                                 must be on a block device (not tmpfs) [/var/tmp]
#   BENCH_KEEP                    1 keeps the scratch directory
#   BENCH_KURA_BIN                use this kura binary instead of building ./cmd/kura
#   KURA_CACHE                    cache root [$HOME/.cache/kura]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PATH=/usr/local/go/bin:$PATH
CACHE=${KURA_CACHE:-$HOME/.cache/kura}/bench
BIN=$CACHE/sched-bin
RESULTS=$CACHE/sched-results
mkdir -p "$BIN" "$RESULTS"

log() { printf '[sched.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (libvirt, guests, cgroups)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86 libvirt-daemon-system)"
command -v virsh >/dev/null || die "virsh missing (apt-get install libvirt-clients libvirt-daemon-system)"
[ -e /sys/fs/cgroup/blkio/blkio.throttle.read_bps_device ] || die "no cgroup v1 blkio throttle at /sys/fs/cgroup/blkio: this benchmark limits the datastore with it"

WORK=${BENCH_WORK:-/var/tmp}
mkdir -p "$WORK"
if [ "$(stat -f -c %T "$WORK")" = tmpfs ]; then
	die "BENCH_WORK=$WORK is on tmpfs: a blkio limit does nothing there; choose a directory on a disk"
fi
export BENCH_WORK=$WORK

if [ -z "${BENCH_KURA_BIN:-}" ]; then
	log "building kura: go build -o $BIN/kura ./cmd/kura"
	(cd "$ROOT" && go build -o "$BIN/kura.new" ./cmd/kura) || die "./cmd/kura does not build"
	mv "$BIN/kura.new" "$BIN/kura"
	export BENCH_KURA_BIN=$BIN/kura
	v=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
	if [ -n "$(cd "$ROOT" && git status --porcelain --untracked-files=no -- cmd internal go.mod go.sum 2>/dev/null)" ]; then
		v="$v+modified"
	fi
	export BENCH_KURA_VERSION=$v
else
	export BENCH_KURA_VERSION=${BENCH_KURA_VERSION:-"$BENCH_KURA_BIN"}
fi
log "building bench/schedbench"
(cd "$ROOT" && go build -o "$BIN/schedbench.new" ./bench/schedbench) || die "bench/schedbench does not build"
mv "$BIN/schedbench.new" "$BIN/schedbench"

if [ -z "${BENCH_SCHED_OUT:-}" ]; then
	export BENCH_SCHED_OUT=$RESULTS/$(date +%Y%m%d-%H%M%S)
	mkdir -p "$BENCH_SCHED_OUT"
	ln -sfn "$BENCH_SCHED_OUT" "$RESULTS/latest"
fi
mkdir -p "$BENCH_SCHED_OUT"

# The program removes its guests, cgroup and scratch directory itself on
# exit, error or SIGINT/SIGTERM; pass those signals on and wait for it.
cd "$ROOT" # internal/testvm finds scripts/mkguest.sh from the working directory
"$BIN/schedbench" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' INT TERM
rc=0
while :; do
	wait $pid && rc=0 || rc=$?
	kill -0 $pid 2>/dev/null || break # wait returns early when a trapped signal arrives
done
trap - INT TERM
log "results: $BENCH_SCHED_OUT (also $RESULTS/latest)"
exit $rc
