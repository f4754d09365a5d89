#!/usr/bin/env bash
# s3-link.sh — Kura's backup to S3 over a slow, lossy link, as a fraction of
# the link's rate, beside what any client gets through the same link (PUTs
# of 16 MiB, 1 and 8 in flight) and restic's backup of the same image
# (docs/BENCHMARKS.md, "Kura over a slow link").
#
#   bash bench/s3-link.sh
#
# The link is a shaper in front of a versitygw server on this host
# (internal/backend/s3/s3test: one-way delay, a rate shared by every
# connection, lost segments as the retransmission delay they cost; tc netem
# is not on every kernel). The image is incompressible, so bytes on the wire
# are the image's bytes.
#
# Env (defaults in brackets):
#   BENCH_LINK_MBIT            link rate, Mbit/s [20]
#   BENCH_LINK_DELAY_MS        one-way delay [50]
#   BENCH_LINK_LOSS            fraction of segments lost [0.01]
#   BENCH_LINK_MIB             image size [384]
#   BENCH_LINK_FLOOR_INFLIGHT  floor rows: PUTs in flight ["1 8"]
#   BENCH_RESTIC_BIN           restic to compare ($KURA_CACHE/bench/bin/restic if there; "" skips)
#   BENCH_WORK                 scratch parent [/tmp]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PATH=/usr/local/go/bin:$PATH
KCACHE=${KURA_CACHE:-$HOME/.cache/kura}
OUT=$KCACHE/bench/results-s3link/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
bash "$ROOT/scripts/s3servers.sh" >&2
go build -o "$OUT/kura" "$ROOT/cmd/kura"
go build -o "$OUT/s3link" "$ROOT/bench/s3link"
if [ -z "${BENCH_RESTIC_BIN+x}" ] && [ -x "$KCACHE/bench/bin/restic" ]; then
	export BENCH_RESTIC_BIN=$KCACHE/bench/bin/restic
fi
export BENCH_LINK_MIB=${BENCH_LINK_MIB:-384}
BENCH_KURA_BIN=$OUT/kura "$OUT/s3link" >"$OUT/results.json" 2> >(tee "$OUT/bench.log" >&2)
rm -f "$OUT/kura" "$OUT/s3link"
echo "results: $OUT/results.json" >&2
cat "$OUT/results.json"
