#!/usr/bin/env bash
# Reading a restore point straight from the repository: what `kura export`
# (and so `kura instant` and `kura verify --boot`) and `kura restore` cost,
# on one disk image, with the host's page cache dropped before each step.
#
#   bash bench/export.sh                       # this tree
#   BENCH_BASE_REV=02752b1 bash bench/export.sh # and an older commit, same data, same run
#
# Steps, each BENCH_EXPORT_RUNS times per kura build:
#   nbdcopy   whole disk from the export to null: (4 connections, many
#             requests in flight; zero chunks are skipped as holes)
#   qd1       1024 reads of 1 MiB, one at a time, through a qcow2 overlay
#             over the export (qemu-img bench): what a guest running from
#             the restore point sees when it streams its disk
#   restore   kura restore of the disk to a sparse raw file, sync included
# For the export steps it also reports the CPU seconds `kura export` used.
#
# The image is BENCH_EXPORT_IMAGE (default: the data disk that
# bench/restore-vm.sh builds and caches, 8 GiB with 1.1 GB of files; run
# that once first, or name any raw or qcow2 image).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
cache=${KURA_CACHE:-$HOME/.cache/kura}
image=${BENCH_EXPORT_IMAGE:-$(ls "$cache"/bench/restore-disk/*.qcow2 2>/dev/null | head -1 || true)}
runs=${BENCH_EXPORT_RUNS:-3}
work=${BENCH_WORK:-/var/tmp/kura-export-bench}
cachemib=${BENCH_EXPORT_CACHE_MIB:-64}
if [ -z "$image" ] || [ ! -f "$image" ]; then
  echo "export.sh: no image: run bash bench/restore-vm.sh once (it builds the data disk) or set BENCH_EXPORT_IMAGE" >&2
  exit 1
fi
for t in nbdcopy qemu-img; do
  command -v $t >/dev/null || { echo "export.sh: $t is missing: bash scripts/deps.sh" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "export.sh: run as root (it drops the page cache)" >&2; exit 1; }

rm -rf "$work"; mkdir -p "$work"
trap 'pkill -f "$work/nbd.sock" 2>/dev/null || true; rm -rf "$work"' EXIT
export KURA_PASSWORD=bench

builds=("this:$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- cmd internal || echo +modified)")
go build -o "$work/kura-this" ./cmd/kura
if [ -n "${BENCH_BASE_REV:-}" ]; then
  git worktree add -q --detach "$work/base-src" "$BENCH_BASE_REV"
  (cd "$work/base-src" && go build -o "$work/kura-base" ./cmd/kura)
  git worktree remove --force "$work/base-src"
  builds+=("base:$BENCH_BASE_REV")
fi

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cpu_of() { awk '{printf "%.2f", ($14+$15)/100}' /proc/$1/stat; }

"$work/kura-this" --repo "$work/repo" init >/dev/null
"$work/kura-this" --repo "$work/repo" backup image "$image" --name disk >/dev/null
echo "# kura export / restore read path, $(date -u +%FT%TZ), $(nproc) cores, image $image ($(du -h --apparent-size "$image" | cut -f1) virtual, $(du -h "$image" | cut -f1) allocated), export cache $cachemib MiB"
echo
echo "| build | step | run | wall s | export CPU s |"
echo "|---|---|---|---|---|"
for b in "${builds[@]}"; do
  tag=${b%%:*}; label=${b#*:}; k="$work/kura-$tag"
  for run in $(seq "$runs"); do
    for step in nbdcopy qd1; do
      "$k" --repo "$work/repo" export disk@latest --socket "$work/nbd.sock" --cache "$cachemib" > "$work/export.log" 2>&1 &
      exp=$!
      for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && grep -q 'nbd+unix' "$work/export.log" && break; sleep 0.1; done
      uri=$(grep -o 'nbd+unix://[^ ]*' "$work/export.log" | head -1)
      rm -f "$work/ov.qcow2"
      [ $step = qd1 ] && qemu-img create -q -f qcow2 -u -F raw -b "$uri" "$work/ov.qcow2" 8G
      drop
      start=$(date +%s.%N)
      if [ $step = nbdcopy ]; then
        nbdcopy "$uri" null:
      else
        qemu-img bench -f qcow2 -c 1024 -s 1M -d 1 "$work/ov.qcow2" >/dev/null
      fi
      end=$(date +%s.%N)
      cpu=$(cpu_of $exp)
      kill -INT $exp; wait $exp || true
      printf '| %s | %s | %d | %.2f | %s |\n' "$label" $step "$run" "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')" "$cpu"
    done
    rm -f "$work/out.raw"; drop
    start=$(date +%s.%N)
    "$k" --repo "$work/repo" restore disk@latest --to "$work/out.raw" >/dev/null
    sync
    end=$(date +%s.%N)
    printf '| %s | restore | %d | %.2f | |\n' "$label" "$run" "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')"
  done
done
