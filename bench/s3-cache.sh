#!/usr/bin/env bash
# The S3 metadata cache (internal/backend/cache) against a store 50 ms
# away: `kura snapshots` and the planning phase of an incremental `kura
# backup image` (from the start of the process to the backup's "planned"
# debug line: config, key, lock, index, parent snapshot and its maps), on a
# repository of 12 restore points on versitygw behind bench/s3delay, with
# the cache disabled (--no-cache), cold (emptied before the command) and
# warm (filled by the command before). The modes are interleaved, RUNS
# times; the table gives the median time (min-max) and the requests the
# command sent, by kind. The backup is interrupted once it has planned, so
# that every run sees the same 12 restore points.
#
#   bench/s3-cache.sh                      # needs scripts/s3servers.sh run once
#   DELAY=100ms RUNS=9 POINTS=24 bench/s3-cache.sh
#
# Variables: DELAY (per request, default 50ms), POINTS (restore points,
# 12), RUNS (per mode, 7), IMAGE_MIB (the image's size, 512; 64 MiB of it
# data), KURA (binary; default: go build ./cmd/kura into the work dir),
# WORKDIR (default: a new temporary directory, removed afterwards unless
# KEEP=1). The results go to $WORKDIR/results.md and stdout.
set -euo pipefail

DELAY=${DELAY:-50ms}
POINTS=${POINTS:-12}
RUNS=${RUNS:-7}
IMAGE_MIB=${IMAGE_MIB:-512}
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH=$PATH:/usr/local/go/bin
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/kura-s3-cache-bench.XXXXXX)}
mkdir -p "$WORKDIR"
proxy_pid=
cleanup() {
	[ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
	[ "${KEEP:-0}" = 1 ] || rm -rf "$WORKDIR"
}
trap cleanup EXIT

KURA=${KURA:-}
if [ -z "$KURA" ]; then
	KURA=$WORKDIR/kura
	(cd "$here" && go build -o "$KURA" ./cmd/kura)
	label="kura $(cd "$here" && git describe --always --dirty)"
else
	label=$KURA
fi
(cd "$here" && go build -o "$WORKDIR/s3delay" ./bench/s3delay)

reqlog=$WORKDIR/requests.log
: >"$reqlog"
"$WORKDIR/s3delay" -delay "$DELAY" -env "$WORKDIR/s3.env" -log "$reqlog" 2>"$WORKDIR/s3delay.log" &
proxy_pid=$!
for _ in $(seq 600); do
	[ -f "$WORKDIR/s3.env" ] && break
	kill -0 "$proxy_pid" 2>/dev/null || { cat "$WORKDIR/s3delay.log"; exit 1; }
	sleep 0.1
done
set -a
# shellcheck disable=SC1091
. "$WORKDIR/s3.env"
set +a
export KURA_PASSWORD=kura-bench KURA_CACHE_DIR=$WORKDIR/cache
slow=$KURA_REPO

# The repository, set up without the delay: POINTS backups of an image
# with a few MiB changed between them.
img=$WORKDIR/vm1.raw
truncate -s "${IMAGE_MIB}M" "$img"
for i in $(seq 0 15); do
	dd if=/dev/urandom of="$img" bs=1M count=4 seek=$((i * IMAGE_MIB / 16)) conv=notrunc status=none
done
export KURA_REPO=$KURA_REPO_DIRECT
"$KURA" --no-cache init >/dev/null
for i in $(seq "$POINTS"); do
	dd if=/dev/urandom of="$img" bs=1M count=2 seek=$(((i * 37) % IMAGE_MIB)) conv=notrunc status=none
	"$KURA" --no-cache -q backup image "$img" --name vm1 >/dev/null
done
export KURA_REPO=$slow
echo "repository: $POINTS restore points of a ${IMAGE_MIB} MiB image, behind $DELAY per request" >&2

now() { date +%s%N; }
reqs() { wc -l <"$reqlog"; }
# kinds FROM TO: the requests of log lines FROM+1..TO, by kind.
kinds() { [ "$2" -gt "$1" ] || { echo none; return; }; sed -n "$(($1 + 1)),$2p" "$reqlog" | awk '{print $1}' | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $2; sep=", "}'; }
flags() { [ "$1" = off ] && echo --no-cache || true; }
prepare() { [ "$1" = cold ] && rm -rf "$KURA_CACHE_DIR" || true; }

snapshots() {
	# shellcheck disable=SC2046
	"$KURA" $(flags "$1") snapshots >/dev/null
	t1=$(now)
	r1=$(reqs)
}
plan() {
	local err=$WORKDIR/backup.err pid at
	: >"$err"
	# --limit-read holds the backup after its plan until it is interrupted:
	# no run adds a restore point.
	# shellcheck disable=SC2046
	"$KURA" $(flags "$1") -v -q backup image "$img" --name vm1 --limit-read 1MiB >/dev/null 2>"$err" &
	pid=$!
	while ! grep -q 'msg=planned' "$err"; do
		kill -0 "$pid" 2>/dev/null || { cat "$err" >&2; exit 1; }
		sleep 0.005
	done
	r1=$(reqs)
	kill -INT "$pid"
	wait "$pid" || true
	if grep -q 'backup done' "$err"; then
		echo "the backup ran to its end: the repository has more restore points now" >&2
		exit 1
	fi
	at=$(grep 'msg=planned' "$err" | sed -E 's/^time=([^ ]+) .*/\1/')
	t1=$(date -d "$at" +%s%N)
}

# Interleaved: each command disabled, cold, then warm (filled by the cold
# run just before).
results=$WORKDIR/raw.tsv
: >"$results"
for run in $(seq "$RUNS"); do
	for cmd in snapshots plan; do
		for mode in off cold warm; do
			prepare "$mode"
			r0=$(reqs)
			t0=$(now)
			"$cmd" "$mode"
			printf '%s\t%s\t%s\t%s\t%s\n' "$cmd" "$mode" $(((t1 - t0) / 1000000)) $((r1 - r0)) "$(kinds "$r0" "$r1")" >>"$results"
		done
	done
	echo "run $run of $RUNS done" >&2
done

{
	echo "$label, $POINTS restore points, versitygw behind $DELAY per request, $RUNS runs per mode (median, min-max)"
	echo
	echo "| command | cache | time (ms) | requests | by kind |"
	echo "| --- | --- | --- | --- | --- |"
	for cmd in snapshots plan; do
		for mode in off cold warm; do
			awk -F'\t' -v c="$cmd" -v m="$mode" '$1 == c && $2 == m {print $3 "\t" $4 "\t" $5}' "$results" | sort -n | awk -F'\t' -v c="$cmd" -v m="$mode" '
				{ t[NR] = $1; r[NR] = $2; k[NR] = $3 }
				END {
					name = (c == "plan") ? "`backup image`, to planned" : "`snapshots`"
					label = (m == "off") ? "disabled" : m
					printf "| %s | %s | %d (%d-%d) | %d | %s |\n", name, label, t[int((NR + 1) / 2)], t[1], t[NR], r[int((NR + 1) / 2)], k[int((NR + 1) / 2)]
				}'
		done
	done
} | tee "$WORKDIR/results.md"
