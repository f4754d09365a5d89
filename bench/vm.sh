#!/usr/bin/env bash
# vm.sh — Kura's live-VM benchmark: `kura backup vm` against virtnbdbackup
# (Debian package; -l full then -l inc, with and without -z) on the same
# libvirt guest, same host, one run. See docs/BENCHMARKS.md ("Live VMs").
#
#   bash bench/vm.sh
#
# Needs root (libvirt, guests), Debian 12, Go at /usr/local/go. It installs
# virtnbdbackup (bench/install-peers.sh --vm), builds kura and bench/vm, boots
# one fresh test guest per tool (internal/testvm; the guest image is built on
# first use by scripts/mkguest.sh), and writes
#   $KURA_CACHE/bench/vm-results/<timestamp>/{results.md,results.json,bench.log,logs/}
# (`latest` links to the newest). Guests, repositories and scratch files are
# removed at the end, also on failure or Ctrl-C.
#
# Environment (defaults in brackets):
#   BENCH_VM_TOOLS          rows to run [kura vnb vnb-z]
#   BENCH_VM_ALLOC_MB       allocated bytes of the guest's two disks, 10^6 [1280]
#   BENCH_VM_DATA_GIB       virtual size of the data disk vdb [8]
#   BENCH_VM_INC_MIB        written by the guest before the measured incremental [100]
#   BENCH_VM_FIO_IOPS       guest writes during the baseline and full backups [512] (4 KiB each)
#   BENCH_VM_FIO_LIGHT_IOPS guest writes during the freeze series [64]
#   BENCH_VM_FIO_MIB        size of fio's file on vdb [256]
#   BENCH_VM_BASELINE_S     length of the idle latency baseline [15]
#   BENCH_VM_FREEZE_RUNS    kura incremental backups in the freeze series [50]
#   BENCH_VM_VNB_FREEZE_RUNS  virtnbdbackup incremental backups in its series [10]
#   BENCH_VM_RESTORE_CHECK  rows whose data disk is restored and checked [kura vnb-z]
#   BENCH_VM_SEED           seed of the data disk's files [42] (the incremental's come from the guest's /dev/urandom)
#   BENCH_VM_MEMORY_MIB, BENCH_VM_CPUS  guest size [1024, 2]
#   BENCH_VM_OUT            output directory [$KURA_CACHE/bench/vm-results/<timestamp>]
#   BENCH_WORK              where the scratch directory is made [/tmp]
#   BENCH_KEEP              1 keeps the scratch directory (guest disks, repositories)
#   BENCH_NICE              nice level of the measured commands [0]
#   BENCH_KURA_BIN          use this kura binary instead of building ./cmd/kura
#   BENCH_VM_KURA_FLAGS     extra kura flags for every `kura backup vm`, e.g. -v (debug log in logs/)
#   BENCH_SKIP_INSTALL      1: do not run install-peers.sh
#   KURA_CACHE              cache root [$HOME/.cache/kura]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PATH=/usr/local/go/bin:$PATH
CACHE=${KURA_CACHE:-$HOME/.cache/kura}/bench
VMBIN=$CACHE/vm-bin
mkdir -p "$VMBIN" "$CACHE/vm-results"

log() { printf '[vm.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (libvirt, guests)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86 libvirt-daemon-system)"
command -v virsh >/dev/null || die "virsh missing (apt-get install libvirt-clients libvirt-daemon-system)"

if [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
	log "bench/install-peers.sh --vm"
	bash "$HERE/install-peers.sh" --vm
fi
command -v virtnbdbackup >/dev/null || die "virtnbdbackup missing (bash bench/install-peers.sh --vm)"
[ -x /usr/bin/time ] || die "/usr/bin/time missing (apt-get install time)"

if [ -z "${BENCH_KURA_BIN:-}" ]; then
	log "building kura: go build -o $VMBIN/kura ./cmd/kura"
	(cd "$ROOT" && go build -o "$VMBIN/kura.new" ./cmd/kura) || die "./cmd/kura does not build"
	mv "$VMBIN/kura.new" "$VMBIN/kura"
	export BENCH_KURA_BIN=$VMBIN/kura
	v=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
	if [ -n "$(cd "$ROOT" && git status --porcelain --untracked-files=no -- cmd internal go.mod go.sum 2>/dev/null)" ]; then
		v="$v+modified"
	fi
	export BENCH_KURA_VERSION=$v
else
	export BENCH_KURA_VERSION=${BENCH_KURA_VERSION:-"$BENCH_KURA_BIN"}
fi
log "building bench/vm"
(cd "$ROOT" && go build -o "$VMBIN/vmbench.new" ./bench/vm) || die "bench/vm does not build"
mv "$VMBIN/vmbench.new" "$VMBIN/vmbench"

export BENCH_VM_VNB_WRAPPER=$HERE/vm/vnb_freeze.py
# internal/testvm finds scripts/mkguest.sh from the working directory.
cd "$ROOT"
exec "$VMBIN/vmbench"
