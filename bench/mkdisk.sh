#!/usr/bin/env bash
# mkdisk.sh — build (and cache) the benchmark's reference disk.
#
#   bench/mkdisk.sh OUT_DIR
#       OUT_DIR/disk.raw    BENCH_SIZE_GB (default 8) GiB sparse raw image holding
#                           an ext4 filesystem with ~BENCH_DATA_GB (default 2) GiB
#                           of real files copied from /usr (mkfs.ext4 -d)
#       OUT_DIR/disk.qcow2  the same disk as qcow2 (qemu-img convert -O qcow2)
#       OUT_DIR/disk.json   parameters and extent statistics
#     Nothing is rebuilt when disk.json already matches the parameters.
#     BENCH_SIZE_MB and BENCH_DATA_MB, when set, give the sizes in MiB instead
#     (smaller disks: bench/s3.sh with BENCH_S3_SIZE=512M).
#
#   bench/mkdisk.sh --scatter IMAGE
#       apply the "100 MiB of scattered random writes" in place to IMAGE (a raw
#       image; work on a copy): BENCH_WRITES (1600) writes of BENCH_WRITE_KIB (64)
#       KiB at distinct 64 KiB-aligned offsets chosen from BENCH_SEED (42) among
#       the blocks that lie inside the image's allocated extents (the used part of
#       the filesystem). BENCH_SCATTER_REGION=whole picks from the whole disk
#       instead. The data is incompressible pseudo-random bytes from the same
#       seed (byte-identical reruns); BENCH_URANDOM=1 uses /dev/urandom.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '[mkdisk %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ "${1:-}" = --scatter ]; then
	[ $# -eq 2 ] || die "usage: $0 --scatter IMAGE"
	args=(--count "${BENCH_WRITES:-1600}" --block-size $((${BENCH_WRITE_KIB:-64} * 1024))
		--seed "${BENCH_SEED:-42}" --region "${BENCH_SCATTER_REGION:-allocated}")
	[ "${BENCH_URANDOM:-0}" = 1 ] && args+=(--urandom)
	exec python3 "$HERE/benchtool.py" scatter "$2" "${args[@]}"
fi

[ $# -eq 1 ] || die "usage: $0 OUT_DIR | $0 --scatter IMAGE"
OUT=$1
SIZE_GB=${BENCH_SIZE_GB:-8}
DATA_GB=${BENCH_DATA_GB:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
params="size_gb=$SIZE_GB data_gb=$DATA_GB v=1"
SIZE_MB=$((SIZE_GB * 1024))
DATA_MB=$((DATA_GB * 1024))
if [ -n "${BENCH_SIZE_MB:-}" ] || [ -n "${BENCH_DATA_MB:-}" ]; then
	SIZE_MB=${BENCH_SIZE_MB:-$SIZE_MB}
	DATA_MB=${BENCH_DATA_MB:-$DATA_MB}
	params="size_mb=$SIZE_MB data_mb=$DATA_MB v=1"
fi

if [ -f "$OUT/disk.json" ] && [ -f "$OUT/disk.raw" ] && [ -f "$OUT/disk.qcow2" ] &&
	grep -qF "\"params\": \"$params\"" "$OUT/disk.json"; then
	log "cached: $OUT/disk.raw, $OUT/disk.qcow2 ($params)"
	exit 0
fi

command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (run bench/install-peers.sh)"
command -v qemu-img >/dev/null || die "qemu-img missing (run bench/install-peers.sh)"
[ "$DATA_MB" -lt "$SIZE_MB" ] || die "the data (BENCH_DATA_GB/MB) must be smaller than the disk (BENCH_SIZE_GB/MB)"

rm -f "$OUT/disk.json" "$OUT/disk.raw" "$OUT/disk.qcow2"
stage=$OUT/stage.tmp
rm -rf "$stage"
target=$((DATA_MB * 1024 * 1024))
log "staging ~${DATA_MB} MiB of real files from /usr into $stage"
stage_json=$(python3 "$HERE/benchtool.py" stage "$stage" "$target")
log "staged: $stage_json"

log "mkfs.ext4 -d into ${SIZE_MB} MiB sparse image"
truncate -s "${SIZE_MB}M" "$OUT/disk.raw.tmp"
# Fixed UUID, hash seed and clock make the image reproducible on one machine.
E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L kurabench -m 1 \
	-U 6b757261-6265-6e63-6800-000000000001 \
	-E hash_seed=6b757261-6265-6e63-6800-000000000002,root_owner=0:0 \
	-d "$stage" "$OUT/disk.raw.tmp"
rm -rf "$stage"
# Flush before anything looks at the extents: delayed allocation on the host
# file system can make SEEK_DATA under-report data that is still dirty.
sync "$OUT/disk.raw.tmp"
mv "$OUT/disk.raw.tmp" "$OUT/disk.raw"

log "qemu-img convert -O qcow2"
qemu-img convert -f raw -O qcow2 "$OUT/disk.raw" "$OUT/disk.qcow2.tmp"
mv "$OUT/disk.qcow2.tmp" "$OUT/disk.qcow2"

ext=$(python3 "$HERE/benchtool.py" extents "$OUT/disk.raw")
qsize=$(stat -c %s "$OUT/disk.qcow2")
cat >"$OUT/disk.json" <<EOF
{"params": "$params", "stage": $stage_json, "raw": $ext, "qcow2_file_bytes": $qsize}
EOF
log "done: $(cat "$OUT/disk.json")"
