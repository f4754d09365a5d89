#!/usr/bin/env bash
# restore-vm.sh — Kura's benchmark for getting VMs back: full VM restore
# (`kura restore`) against restic and virtnbdrestore, instant recovery
# (`kura instant`) against a cold boot from local disks, and single-file
# listing (`kura files ls`), on one libvirt guest, same host, one run.
# See docs/BENCHMARKS.md ("Getting VMs back").
#
#   bash bench/restore-vm.sh
#
# Needs root (libvirt, guests, drop_caches), Debian 12, Go at /usr/local/go.
# It installs virtnbdbackup (bench/install-peers.sh --vm) and restic (built
# as bench/install-peers.sh does), builds kura and bench/restorevm, boots one
# test guest (internal/testvm; the guest image is built on first use by
# scripts/mkguest.sh) with a prefilled data disk (cached under
# $KURA_CACHE/bench/restore-disk), and writes
#   $KURA_CACHE/bench/restore-results/<timestamp>/{results.md,results.json,bench.log,logs/}
# (`latest` links to the newest). Guests, instant-recovery sessions,
# repositories and scratch files are removed at the end, also on failure or
# Ctrl-C.
#
# Environment (defaults in brackets):
#   BENCH_RESTORE_TOOLS      restore rows [kura restic vnb] (kura is always run)
#   BENCH_RESTORE_DATA_MIB   bytes of files on the data disk vdb, MiB [1024]
#   BENCH_RESTORE_DATA_GIB   virtual size of vdb [8]
#   BENCH_RESTORE_RUNS       timed restores per tool; the median is reported [2]
#   BENCH_BOOT_RUNS          cold boot / instant recovery rounds [2]
#   BENCH_LS_RUNS            runs of each `kura files ls` [3]
#   BENCH_BOOT_PING          how the cold boot polls guest-ping every 100 ms: api (one
#                            libvirt connection, as kura instant does) or virsh (a virsh
#                            process per poll, ~0.05 CPU-s each, taken from the guest) [api]
#   BENCH_RESTORE_DD_MIB     read with dd from vdb inside the booted guests [1024]
#   BENCH_RESTORE_SEED       seed of the data disk's files [42]
#   BENCH_RESTORE_MEMORY_MIB, BENCH_RESTORE_CPUS  guest size [1024, 2]
#   BENCH_RESTORE_S3         1: also back the guest up into a repository on a local versitygw
#                            and time instant recovery from there each boot round [1]
#   BENCH_RESTORE_OUT        output directory [$KURA_CACHE/bench/restore-results/<timestamp>]
#   BENCH_WORK               where the scratch directory is made [/tmp]
#   BENCH_KEEP               1 keeps the scratch directory (disks, repositories)
#   BENCH_NICE               nice level of the measured commands [0]
#   BENCH_KURA_BIN           use this kura binary instead of building ./cmd/kura
#   BENCH_SKIP_INSTALL       1: do not install the peers (they must be there)
#   RESTIC_VERSION           restic to build [v0.18.0]
#   KURA_CACHE               cache root [$HOME/.cache/kura]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PATH=/usr/local/go/bin:$PATH
CACHE=${KURA_CACHE:-$HOME/.cache/kura}/bench
BIN=$CACHE/bin
RVBIN=$CACHE/restore-bin
RESTIC_VERSION=${RESTIC_VERSION:-v0.18.0}
mkdir -p "$RVBIN" "$BIN" "$CACHE/restore-results"

log() { printf '[restore-vm.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (libvirt, guests, drop_caches)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86 libvirt-daemon-system)"
command -v virsh >/dev/null || die "virsh missing (apt-get install libvirt-clients libvirt-daemon-system)"

if [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
	log "bench/install-peers.sh --vm"
	bash "$HERE/install-peers.sh" --vm
	# restic as bench/install-peers.sh builds it (without kopia and borg,
	# which this benchmark does not use).
	want=${RESTIC_VERSION#v}
	if [ -x "$BIN/restic" ] && "$BIN/restic" version 2>/dev/null | grep -q "restic $want "; then
		log "restic $want already installed"
	else
		log "building restic $RESTIC_VERSION (go install)"
		GOBIN=$BIN GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
			go install "github.com/restic/restic/cmd/restic@$RESTIC_VERSION"
	fi
fi
if [ "${BENCH_RESTORE_S3:-1}" = 1 ] && [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
	log "scripts/s3servers.sh (the S3 server of the instant-from-S3 rows; built once)"
	bash "$ROOT/scripts/s3servers.sh"
fi
tools=${BENCH_RESTORE_TOOLS:-kura restic vnb}
case " $tools " in *" vnb "*)
	command -v virtnbdbackup >/dev/null && command -v virtnbdrestore >/dev/null ||
		die "virtnbdbackup/virtnbdrestore missing (bash bench/install-peers.sh --vm)" ;;
esac
case " $tools " in *" restic "*)
	[ -x "$BIN/restic" ] || die "$BIN/restic missing (run without BENCH_SKIP_INSTALL=1)" ;;
esac
export BENCH_RESTIC_BIN=$BIN/restic
for t in /usr/bin/time e2fsck debugfs qemu-img; do
	command -v "$t" >/dev/null || die "$t missing (bash bench/install-peers.sh --vm)"
done

if [ -z "${BENCH_KURA_BIN:-}" ]; then
	log "building kura: go build -o $RVBIN/kura ./cmd/kura"
	(cd "$ROOT" && go build -o "$RVBIN/kura.new" ./cmd/kura) || die "./cmd/kura does not build"
	mv "$RVBIN/kura.new" "$RVBIN/kura"
	export BENCH_KURA_BIN=$RVBIN/kura
	v=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
	if [ -n "$(cd "$ROOT" && git status --porcelain --untracked-files=no -- cmd internal go.mod go.sum 2>/dev/null)" ]; then
		v="$v+modified"
	fi
	export BENCH_KURA_VERSION=$v
else
	export BENCH_KURA_VERSION=${BENCH_KURA_VERSION:-"$BENCH_KURA_BIN"}
fi
log "building bench/restorevm"
(cd "$ROOT" && go build -o "$RVBIN/restorebench.new" ./bench/restorevm) || die "bench/restorevm does not build"
mv "$RVBIN/restorebench.new" "$RVBIN/restorebench"

# The scratch directory and the domain names are made here, so that this
# script can clean up even if the benchmark is killed.
export BENCH_RESTORE_RUNID=$$
SCRATCH=$(mktemp -d "${BENCH_WORK:-/tmp}/kura-restorebench.XXXXXX")
export BENCH_RESTORE_SCRATCH=$SCRATCH
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	# The benchmark removes all of this itself; this catches what a killed
	# benchmark left behind.
	for d in $(virsh list --all --name 2>/dev/null | grep -E -- "^kura-rvbench-(ir-|local-)?$BENCH_RESTORE_RUNID\$" || true); do
		log "cleanup: removing leftover domain $d"
		case $d in
		kura-rvbench-ir-*)
			KURA_REPO=$SCRATCH/kura-repo KURA_PASSWORD=kura-bench-password XDG_CACHE_HOME=$SCRATCH/kura-cache \
				"$BENCH_KURA_BIN" instant --stop "$d" >&2 || true ;;
		esac
		virsh destroy "$d" >/dev/null 2>&1 || true
		virsh undefine --checkpoints-metadata --snapshots-metadata "$d" >/dev/null 2>&1 || true
	done
	if [ "${BENCH_KEEP:-0}" != 1 ] && [ -d "$SCRATCH" ]; then
		rm -rf "$SCRATCH"
	fi
	exit $rc
}
trap cleanup EXIT

# internal/testvm finds scripts/mkguest.sh from the working directory.
cd "$ROOT"
"$RVBIN/restorebench" &
child=$!
# On Ctrl-C or TERM the benchmark cleans up and writes a partial report;
# wait for it, then sweep.
trap 'kill -TERM $child 2>/dev/null || true; wait $child || true; exit 130' INT TERM HUP
wait $child
