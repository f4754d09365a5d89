#!/usr/bin/env bash
# s3.sh — Kura against restic and kopia on the same S3 server, in one run,
# and the pack size for object storage (docs/BENCHMARKS.md, "Kura on S3
# against restic and kopia").
#
#   bash bench/s3.sh                      # or: make bench-s3
#   BENCH_S3_SIZE=512M bash bench/s3.sh   # a quick run
#
# Steps:
#   0. install peers (bench/install-peers.sh), build kura and bench/s3count,
#      build or reuse the disk (bench/mkdisk.sh: ext4 holding real files from
#      /usr; half the disk by default, the rest sparse), copy it to scratch
#   1. start the S3 server (versitygw, or SeaweedFS `weed mini` with
#      BENCH_S3_SERVER=weed) on free ports of 127.0.0.1, its data in the
#      scratch dir (the same disk as everything else), and the counting proxy
#      (bench/s3count proxy) in front of it; every tool talks to the proxy
#   2. floor: 16 MiB PUTs from /dev/shm, 4 and 8 in flight, through the proxy
#      (and once directly), then GETs of the same objects; and the compute
#      floor of Kura's format (bench/physlimit: hash + compress, and the
#      restore's decode + write)
#   3. for each tool: FULL backup of the raw image into its own bucket;
#      then Kura's full backup without and with the proxy, alternated twice
#      (what the proxy costs)
#   4. scattered writes over BENCH_S3_CHANGE_PCT % of the disk's 64 KiB blocks
#   5. for each tool: SECOND backup, full RESTORE to a file (cmp with the
#      image, untimed; before it a timed sync: restic and kopia leave the
#      restored data in the page cache, Kura fsyncs), bytes stored in the
#      bucket after each backup
#   6. pack sizes: Kura full backup + restore with 8, 16, 24, 32, 64 MiB packs
#   7. copy of a repository to a second bucket: kura copy (skipped while
#      `kura copy --help` fails), restic copy, kopia repository sync-to
#   8. a profiled Kura backup and restore (--cpuprofile; go tool pprof -top)
#   9. report: results.md, results.json (bench/s3report.py)
# Before every measured step: sync, drop the page cache (echo 3 >
# /proc/sys/vm/drop_caches, as root; the report says whether it worked),
# then read the image into the cache for backups, so that the server's
# objects come from its disk and the image's read is not measured. Every
# step runs under /usr/bin/time -v; the server's and the proxy's CPU time
# during the step are read from /proc.
#
# Env:
#   BENCH_S3_SIZE         disk size (2G; K/M/G suffixes, at least 64M)
#   BENCH_S3_DATA         real file data on the disk (half of BENCH_S3_SIZE)
#   BENCH_S3_SERVER       versitygw | weed (versitygw)
#   BENCH_S3_TOOLS        "kura restic kopia"
#   BENCH_S3_CHANGE_PCT   % of the disk's 64 KiB blocks rewritten before the second backup (2)
#   BENCH_S3_PACK_SIZES   Kura pack sizes in MiB to compare ("8 16 24 32 64"; empty: skip)
#   BENCH_S3_FLOOR_MB     MiB the floor PUTs and GETs (the disk size, at least 512)
#   BENCH_S3_DROP_CACHES  1: drop the page cache before each step (1)
#   BENCH_S3_PROXY_CHECK  1: Kura's full backup twice without and twice with the proxy, alternated (1)
#   BENCH_S3_COPY         1: the copy section (1)
#   BENCH_S3_PROFILE      1: a profiled Kura backup and restore (1)
#   BENCH_OUT             output dir ($KURA_CACHE/bench/results-s3/<timestamp>)
#   BENCH_WORK            parent of the scratch dir (/tmp); removed unless BENCH_KEEP=1
#   BENCH_KURA_BIN        use this kura binary instead of building ./cmd/kura
#   BENCH_KURA_COPY_BIN   the kura binary for the copy section (the one above)
#   BENCH_SKIP_INSTALL=1  do not run install-peers.sh
#   BENCH_NICE            nice level of the measured commands (0)
#   KURA_S3_BIN           where the S3 servers are ($KURA_CACHE/s3/bin; scripts/s3servers.sh)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
KCACHE=${KURA_CACHE:-$HOME/.cache/kura}
CACHE=$KCACHE/bench
BIN=$CACHE/bin
S3BIN=${KURA_S3_BIN:-$KCACHE/s3/bin}
SERVER=${BENCH_S3_SERVER:-versitygw}
TOOLS=${BENCH_S3_TOOLS:-kura restic kopia}
CHANGE_PCT=${BENCH_S3_CHANGE_PCT:-2}
PACK_SIZES=${BENCH_S3_PACK_SIZES-8 16 24 32 64}
DROP=${BENCH_S3_DROP_CACHES:-1}
NICE=${BENCH_NICE:-0}
PASSWORD=kura-bench-password
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${BENCH_OUT:-$CACHE/results-s3/$STAMP}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
REC=$OUT/records.jsonl
: >"$REC"
export PATH=$BIN:/usr/local/go/bin:$PATH

T0=$(date +%s)
log() { printf '[s3bench %s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - T0))" "$*" | tee -a "$OUT/bench.log" >&2; }
die() { log "ERROR: $*"; exit 1; }
rec() { printf '%s\n' "${1//$'\n'/}" >>"$REC"; }
jstr() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
py() { python3 -c "$@"; }

mib_of() { # mib_of 512M|2G|1536 -> MiB
	local b
	b=$(numfmt --from=iec "${1^^}") || die "cannot read size '$1'"
	echo $((b >> 20))
}
SIZE_MB=$(mib_of "${BENCH_S3_SIZE:-2G}")
[ "$SIZE_MB" -ge 64 ] || die "BENCH_S3_SIZE must be at least 64M"
DATA_MB=$((SIZE_MB / 2))
[ -z "${BENCH_S3_DATA:-}" ] || DATA_MB=$(mib_of "$BENCH_S3_DATA")
FLOOR_MB=${BENCH_S3_FLOOR_MB:-$((SIZE_MB > 512 ? SIZE_MB : 512))}

# --- 0. setup ------------------------------------------------------------------
log "output: $OUT"
[ "$(id -u)" = 0 ] || log "not root: the page cache cannot be dropped"
if [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
	log "installing peers (bench/install-peers.sh; log: logs/install-peers.log)"
	bash "$HERE/install-peers.sh" >"$OUT/logs/install-peers.log" 2>&1 ||
		die "install-peers.sh failed; see $OUT/logs/install-peers.log"
fi
[ -x /usr/bin/time ] || die "/usr/bin/time missing (apt-get install time)"
case $SERVER in
versitygw) SBIN=$S3BIN/versitygw ;;
weed | seaweedfs) SERVER=weed SBIN=$S3BIN/weed ;;
*) die "BENCH_S3_SERVER=$SERVER: versitygw or weed" ;;
esac
[ -x "$SBIN" ] || die "$SBIN missing: run scripts/s3servers.sh (make deps-test) to build the S3 servers"

declare -A SKIP=()
for t in $TOOLS; do
	case $t in
	kura) ;;
	restic | kopia) [ -x "$BIN/$t" ] || SKIP[$t]="$BIN/$t missing (run bench/install-peers.sh)" ;;
	*) die "unknown tool '$t' in BENCH_S3_TOOLS" ;;
	esac
done

WORK=$(mktemp -d "${BENCH_WORK:-/tmp}/kura-s3bench.XXXXXX")
SHM=$(mktemp -d /dev/shm/kura-s3bench.XXXXXX)
PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do
		for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$p" 2>/dev/null || true
	done
	rm -rf "$SHM"
	if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept scratch dir $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

KURA=${BENCH_KURA_BIN:-$WORK/kura}
if [ -n "${BENCH_KURA_BIN:-}" ]; then
	log "using kura binary $KURA (BENCH_KURA_BIN)"
else
	log "building kura and s3count"
	(cd "$ROOT" && go build -o "$KURA" ./cmd/kura) >"$OUT/logs/kura-build.log" 2>&1 ||
		die "./cmd/kura does not build; see logs/kura-build.log"
fi
(cd "$ROOT" && go build -o "$WORK/s3count" ./bench/s3count && go build -o "$WORK/physlimit" ./bench/physlimit) \
	>"$OUT/logs/helpers-build.log" 2>&1 || die "bench/s3count or bench/physlimit does not build; see logs/helpers-build.log"
S3C=$WORK/s3count

DISKDIR=$CACHE/disk-${SIZE_MB}m-${DATA_MB}m
log "disk: $DISKDIR (bench/mkdisk.sh, cached): ${SIZE_MB} MiB with ~${DATA_MB} MiB of files"
BENCH_SIZE_MB=$SIZE_MB BENCH_DATA_MB=$DATA_MB bash "$HERE/mkdisk.sh" "$DISKDIR" 2>&1 | tee -a "$OUT/bench.log" >&2
IMG=$WORK/disk.raw
cp --sparse=always "$DISKDIR/disk.raw" "$IMG"
sync "$IMG"
ext=$(python3 "$HERE/benchtool.py" extents "$IMG")
disk_size=$(py 'import json,sys; print(json.loads(sys.argv[1])["size"])' "$ext")
disk_alloc=$(py 'import json,sys; print(json.loads(sys.argv[1])["allocated"])' "$ext")

# --- 1. server and proxy ------------------------------------------------------------
export AWS_ACCESS_KEY_ID=kurabench AWS_SECRET_ACCESS_KEY="kura-bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_DEFAULT_REGION AWS_REGION AWS_ENDPOINT_URL
free_ports() { # free_ports N: N distinct free ports of 127.0.0.1 below 55535
	python3 - "$1" <<-'EOF'
		import socket, sys
		n, socks, ports = int(sys.argv[1]), [], []
		while len(ports) < n:
		    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
		    p = s.getsockname()[1]
		    if p < 55535: ports.append(p)
		print(" ".join(map(str, ports)))
	EOF
}
# The server and the proxy run at the measured commands' nice level: on a
# shared machine they are part of what is measured.
NICE_CMD=()
[ "$NICE" = 0 ] || NICE_CMD=(nice -n "$NICE")
SDIR=$WORK/server
mkdir -p "$SDIR/data"
if [ "$SERVER" = versitygw ]; then
	read -r SPORT < <(free_ports 1)
	log "starting versitygw on 127.0.0.1:$SPORT (data in $SDIR/data)"
	"${NICE_CMD[@]}" env ROOT_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" ROOT_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" TMPDIR="$SDIR" \
		"$SBIN" --port "127.0.0.1:$SPORT" posix "$SDIR/data" >"$OUT/logs/server.log" 2>&1 &
else
	read -r -a P < <(free_ports 10)
	SPORT=${P[0]}
	log "starting weed mini on 127.0.0.1:$SPORT (data in $SDIR/data)"
	(cd "$SDIR" && exec "${NICE_CMD[@]}" env TMPDIR="$SDIR" "$SBIN" mini -dir="$SDIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
		-master.telemetry=false -webdav=false -admin.ui=false \
		-s3.port="${P[0]}" -s3.port.grpc="${P[1]}" -s3.port.iceberg=0 -s3.port.lance=0 \
		-master.port="${P[2]}" -master.port.grpc="${P[3]}" -filer.port="${P[4]}" -filer.port.grpc="${P[5]}" \
		-volume.port="${P[6]}" -volume.port.grpc="${P[7]}" -admin.port="${P[8]}" -admin.port.grpc="${P[9]}" \
		-admin.port.legacy=0) >"$OUT/logs/server.log" 2>&1 &
fi
SPID=$!
PIDS+=("$SPID")
SERVER_URL=http://127.0.0.1:$SPORT
"${NICE_CMD[@]}" "$S3C" proxy -upstream "$SERVER_URL" -addr-file "$WORK/proxy.addr" >"$OUT/proxy-final.json" 2>"$OUT/logs/proxy.log" &
PPID_=$!
PIDS+=("$PPID_")
for _ in $(seq 100); do [ -s "$WORK/proxy.addr" ] && break; sleep 0.1; done
[ -s "$WORK/proxy.addr" ] || die "the proxy did not start; see logs/proxy.log"
PROXY_URL=http://$(cat "$WORK/proxy.addr")
PROXY_HOSTPORT=${PROXY_URL#http://}
phase() { curl -fsS "$PROXY_URL/__phase?name=$1" >/dev/null || die "proxy: cannot set phase $1"; }
phase setup
BUCKETS=(floor kura kura-direct1 kura-proxied1 kura-direct2 kura-proxied2 restic kopia kura-prof kura-copy kura-copykey restic-copy kopia-copy)
for ps in $PACK_SIZES; do BUCKETS+=("kura-pack$ps"); done
log "creating buckets (waiting for the server): ${BUCKETS[*]}"
"$S3C" mb -endpoint "$SERVER_URL" -wait 120s "${BUCKETS[@]}" 2>"$OUT/logs/mb.log" ||
	die "cannot create the buckets; server log: $(tail -5 "$OUT/logs/server.log")"
server_ver=$("$SBIN" version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -1 || true)
[ -n "$server_ver" ] || server_ver=$(cat "$SBIN.version" 2>/dev/null | head -1 || true)

ver() { "$@" 2>&1 | head -1 | tr -d '\r' | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1 || true; }
rec "{\"kind\":\"meta\",\"date\":$(jstr "$(date -u +%FT%TZ)"),\"cores\":$(nproc),\"kernel\":$(jstr "$(uname -r)"),
\"cpu\":$(jstr "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"),
\"server\":$(jstr "$SERVER"),\"server_version\":$(jstr "$server_ver"),
\"disk\":$(jstr "ext4, ${SIZE_MB} MiB raw, ~${DATA_MB} MiB of files from /usr"),\"disk_size\":$disk_size,\"disk_allocated\":$disk_alloc,
\"restic_version\":$(jstr "$([ -x "$BIN/restic" ] && ver "$BIN/restic" version)"),
\"kopia_version\":$(jstr "$([ -x "$BIN/kopia" ] && ver "$BIN/kopia" --version)"),
\"kura_version\":$(jstr "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo worktree)"),
\"nice\":$NICE,\"loadavg_start\":$(jstr "$(cut -d' ' -f1-3 /proc/loadavg)")}"

# --- measuring ---------------------------------------------------------------------
HZ=$(getconf CLK_TCK)
cpu_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
proc_cpu() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; } # jiffies of one process
DROPPED=none
drop_caches() {
	sync
	[ "$DROP" = 1 ] || return 0
	if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
		[ "$DROPPED" = failed ] || DROPPED=yes
	else
		DROPPED=failed
	fi
}
prepare() { # prepare backup|restore|other: before a measured step
	drop_caches
	[ "$1" != backup ] || cat "$IMG" >/dev/null
}

# measure ROW STEP CMD...: sets the proxy phase ROW-STEP, runs CMD under
# /usr/bin/time -v, records wall, peak RSS, CPU, the server's and proxy's
# CPU and the rest of the machine's during the step.
measure() {
	local row=$1 step=$2; shift 2
	local tf=$OUT/logs/$row-$step.time lf=$OUT/logs/$row-$step.log
	local t1 t2 b1 b2 s1 s2 p1 p2 rc=0
	log "$row: $step: $*"
	phase "$row-$step"
	b1=$(cpu_busy) s1=$(proc_cpu "$SPID") p1=$(proc_cpu "$PPID_")
	t1=$(date +%s.%N)
	"${NICE_CMD[@]}" /usr/bin/time -v -o "$tf" "$@" >"$lf" 2>&1 || rc=$?
	t2=$(date +%s.%N)
	b2=$(cpu_busy) s2=$(proc_cpu "$SPID") p2=$(proc_cpu "$PPID_")
	phase idle
	local secs rss user sys other scpu pcpu
	secs=$(py "print(round($t2-$t1,3))")
	rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$tf")
	user=$(sed -n 's/.*User time (seconds): //p' "$tf")
	sys=$(sed -n 's/.*System time (seconds): //p' "$tf")
	scpu=$(py "print(round(($s2-$s1)/$HZ,2))")
	pcpu=$(py "print(round(($p2-$p1)/$HZ,2))")
	other=$(py "print(round(max(0.0, ($b2-$b1)/$HZ - ${user:-0} - ${sys:-0} - $scpu - $pcpu), 1))")
	local ok=true
	[ $rc = 0 ] || ok=false
	rec "{\"kind\":\"step\",\"row\":\"$row\",\"step\":\"$step\",\"phase\":\"$row-$step\",\"seconds\":$secs,\"max_rss_kb\":${rss:-null},\"user\":${user:-null},\"sys\":${sys:-null},\"server_cpu\":$scpu,\"proxy_cpu\":$pcpu,\"other_cpu\":$other,\"dropped_cache\":\"$DROPPED\",\"ok\":$ok,\"rc\":$rc}"
	if [ $rc != 0 ]; then
		log "$row: $step FAILED (rc $rc); last lines of $lf:"
		tail -5 "$lf" | sed 's/^/    /' >&2
		return 1
	fi
	log "$row: $step: ${secs}s, peak RSS $((${rss:-0} / 1024)) MiB, CPU ${user}+${sys}s, server ${scpu}s, proxy ${pcpu}s, other ${other} CPU-s"
}
quiet() { # quiet ROW NAME CMD...: untimed helper step with its own log
	local row=$1 name=$2; shift 2
	"$@" >"$OUT/logs/$row-$name.log" 2>&1 || {
		log "$row: $name FAILED: $*"
		tail -5 "$OUT/logs/$row-$name.log" | sed 's/^/    /' >&2
		return 1
	}
}
bucket_size() { # bucket_size ROW STEP BUCKET
	local j
	j=$("$S3C" du -endpoint "$SERVER_URL" -bucket "$3") || { log "du of bucket $3 failed"; return 0; }
	rec "{\"kind\":\"size\",\"row\":\"$1\",\"step\":\"$2\",\"bucket\":\"$3\",\"du\":$j}"
	log "$1: $2: bucket $3: $(py 'import json,sys; d=json.loads(sys.argv[1]); print("%d objects, %.1f MiB" % (d["objects"], d["bytes"]/1048576))' "$j")"
}
# synced ROW: time a sync right after a restore: what the tool left in the
# page cache, written back (restic and kopia do not fsync; Kura does).
synced() {
	local t1 t2 s
	t1=$(date +%s.%N)
	sync
	t2=$(date +%s.%N)
	s=$(py "print(round($t2-$t1,3))")
	rec "{\"kind\":\"sync\",\"row\":\"$1\",\"step\":\"restore\",\"seconds\":$s}"
	log "$1: sync after restore: ${s}s"
}
# verify ROW DIR: the one file restored under DIR equals the image (untimed)
verify() {
	local row=$1 dest=$2 ok=false files
	mapfile -t files < <(find "$dest" -type f)
	if [ ${#files[@]} -eq 1 ] && cmp "${files[0]}" "$IMG" >"$OUT/logs/$row-cmp.log" 2>&1; then
		ok=true
		log "$row: restore verified (cmp equal)"
	else
		log "$row: RESTORE MISMATCH or not one file under $dest: ${files[*]:-none} $(head -1 "$OUT/logs/$row-cmp.log" 2>/dev/null)"
	fi
	rec "{\"kind\":\"check\",\"row\":\"$row\",\"ok\":$ok}"
	rm -rf "$dest"
}

# --- per-tool drivers ----------------------------------------------------------------
# <tool>_init ROW BUCKET [extra init args], <tool>_backup ROW STEP,
# <tool>_restore ROW DIR. Commands run under /usr/bin/time: the environment
# goes in through env(1).
declare -A LOC=()
kura_cmd() { # kura_cmd ROW: array K = the kura command line for ROW's repository
	K=(env -u KURA_CACHE KURA_REPO="${LOC[$1]}" KURA_PASSWORD=$PASSWORD XDG_CACHE_HOME="$WORK/cache-$1" "$KURA")
}
kura_init() { # kura_init ROW BUCKET [URL] [init args...]
	local row=$1 b=$2 url=${3:-$PROXY_URL}
	shift 3 2>/dev/null || shift $#
	LOC[$row]="s3:$url/$b"
	kura_cmd "$row"
	quiet "$row" init "${K[@]}" init "$@"
}
kura_backup() { kura_cmd "$1"; measure "$1" "$2" "${K[@]}" backup image "$IMG" --name bench ${KURA_EXTRA:+$KURA_EXTRA}; }
kura_restore() { kura_cmd "$1"; measure "$1" restore "${K[@]}" restore bench@latest --to "$2" --format raw ${KURA_EXTRA:+$KURA_EXTRA}; }

RESTIC_BASE=(env RESTIC_PASSWORD=$PASSWORD RESTIC_CACHE_DIR="$WORK/cache-restic" RESTIC_PROGRESS_FPS=0.1 "$BIN/restic")
restic_init() { LOC[$1]="s3:$PROXY_URL/$2"; quiet "$1" init "${RESTIC_BASE[@]}" -r "${LOC[$1]}" init; }
restic_backup() { measure "$1" "$2" "${RESTIC_BASE[@]}" -r "${LOC[$1]}" backup --host bench "$IMG"; }
restic_restore() { measure "$1" restore "${RESTIC_BASE[@]}" -r "${LOC[$1]}" restore latest --target "$2" --sparse; }

KOPIA=(env KOPIA_PASSWORD=$PASSWORD KOPIA_CHECK_FOR_UPDATES=false "$BIN/kopia"
	--config-file="$WORK/kopia/repository.config" --log-dir="$WORK/kopia/logs")
kopia_init() {
	LOC[$1]="s3:$PROXY_URL/$2"
	mkdir -p "$WORK/kopia"
	# Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (kopia's flags read them).
	quiet "$1" init "${KOPIA[@]}" repository create s3 --bucket="$2" --endpoint="$PROXY_HOSTPORT" --disable-tls \
		--cache-directory="$WORK/kopia/cache" --no-check-for-updates &&
		quiet "$1" policy "${KOPIA[@]}" policy set --global --compression=zstd-fastest
}
kopia_backup() { measure "$1" "$2" "${KOPIA[@]}" snapshot create "$IMG" --no-progress; }
kopia_restore() {
	local id
	id=$("${KOPIA[@]}" snapshot list "$IMG" --json | python3 -c \
		'import json,sys; s=json.load(sys.stdin); print(max(s, key=lambda x: x["startTime"])["rootEntry"]["obj"])') ||
		{ log "kopia: cannot list snapshots"; return 1; }
	measure "$1" restore "${KOPIA[@]}" snapshot restore "$id" "$2/disk.raw" --write-sparse-files --no-progress
}

declare -A FAILED=()
fail() { FAILED[$1]=1; rec "{\"kind\":\"skip\",\"row\":\"$1\",\"reason\":$(jstr "failed: $2 (see logs/)")}"; log "$1: FAILED at $2; going on without it"; }
active=()
for t in $TOOLS; do
	if [ -n "${SKIP[$t]:-}" ]; then
		rec "{\"kind\":\"skip\",\"row\":\"$t\",\"reason\":$(jstr "${SKIP[$t]}")}"
		log "$t: skipped: ${SKIP[$t]}"
	else
		active+=("$t")
	fi
done
runnable() { [ -z "${FAILED[$1]:-}" ]; }

# --- 2. floors ------------------------------------------------------------------------
log "floor: ${FLOOR_MB} MiB in 16 MiB objects from /dev/shm"
head -c 128M /dev/urandom >"$SHM/src"
floor() { # floor LABEL URL INFLIGHT
	local j p g
	prepare other
	phase "floor-$1-put"
	p=$("${NICE_CMD[@]}" "$S3C" floor -endpoint "$2" -bucket floor -prefix "$1" -src "$SHM/src" -inflight "$3" -total $((FLOOR_MB << 20)) -mode put) ||
		die "floor PUT failed"
	prepare other
	phase "floor-$1-get"
	g=$("${NICE_CMD[@]}" "$S3C" floor -endpoint "$2" -bucket floor -prefix "$1" -src "$SHM/src" -inflight "$3" -total $((FLOOR_MB << 20)) -mode get) ||
		die "floor GET failed"
	phase idle
	j=$(py 'import json,sys; p=json.loads(sys.argv[1]); g=json.loads(sys.argv[2]); p.update({k:v for k,v in g.items() if k.startswith("get_")}); print(json.dumps(p))' "$p" "$g")
	rec "{\"kind\":\"floor\",\"label\":\"$1\",\"via\":\"$4\",\"dropped_cache\":\"$DROPPED\",\"result\":$j}"
	log "floor $1: $(py 'import json,sys; d=json.loads(sys.argv[1]); print("PUT %.1f MiB/s, GET %.1f MiB/s" % (d["put_mib_s"], d["get_mib_s"]))' "$j")"
}
floor proxy4 "$PROXY_URL" 4 proxy
floor proxy8 "$PROXY_URL" 8 proxy
floor direct8 "$SERVER_URL" 8 direct

log "compute floor: bench/physlimit (keyed BLAKE3 + zstd-1 of 256 KiB chunks on 2 workers; restore: decode + write)"
prepare backup
pl=$("${NICE_CMD[@]}" "$WORK/physlimit" -workers 2 -chunk 262144 -restore "$WORK/physlimit-restore.raw" "$IMG" 2>"$OUT/logs/physlimit.err") ||
	die "physlimit failed; see logs/physlimit.err"
rec "{\"kind\":\"physlimit\",\"result\":$pl}"
log "physlimit: $(py 'import json,sys; d=json.loads(sys.argv[1]); print("backup %.2fs, restore decode %.2fs, decode+write %.2fs" % (d["seconds"], d["restore"]["decode_seconds"], d["restore"]["write_seconds"]))' "$pl")"

# --- 3. full backups ---------------------------------------------------------------
for t in "${active[@]}"; do
	if ! "${t}_init" "$t" "$t"; then fail "$t" init; continue; fi
	prepare backup
	if ! "${t}_backup" "$t" full; then fail "$t" "full backup"; continue; fi
	bucket_size "$t" after_full "$t"
done
if [ "${BENCH_S3_PROXY_CHECK:-1}" = 1 ] && [[ " ${active[*]} " == *" kura "* ]]; then
	# Alternated, each into a fresh bucket: direct, through the proxy,
	# direct, through the proxy; so that neither side gets the quieter
	# moment or the emptier server.
	log "kura without and with the proxy, alternated (what counting costs)"
	for i in 1 2; do
		for via in direct proxied; do
			row=kura-$via$i
			url=$SERVER_URL
			[ $via = direct ] || url=$PROXY_URL
			if kura_init "$row" "$row" "$url"; then
				prepare backup
				kura_backup "$row" full || fail "$row" "full backup"
			fi
		done
	done
fi

# --- 4. scattered writes -------------------------------------------------------------
writes=$((disk_size / 65536 * CHANGE_PCT / 100))
log "scattered writes: $writes x 64 KiB (${CHANGE_PCT}% of the disk's 64 KiB blocks), in the allocated extents"
sc=$(BENCH_WRITES=$writes BENCH_WRITE_KIB=64 bash "$HERE/mkdisk.sh" --scatter "$IMG")
sync "$IMG"
rec "{\"kind\":\"meta\",\"scatter\":$sc,\"change_pct\":$CHANGE_PCT}"

# --- 5. second backups, restores ---------------------------------------------------------
for t in "${active[@]}"; do
	runnable "$t" || continue
	prepare backup
	if ! "${t}_backup" "$t" incr; then fail "$t" "second backup"; continue; fi
	bucket_size "$t" after_incr "$t"
done
for t in "${active[@]}"; do
	runnable "$t" || continue
	dest=$WORK/restore-$t
	rm -rf "$dest" && mkdir -p "$dest"
	prepare restore
	if ! "${t}_restore" "$t" "$dest"; then fail "$t" restore; rm -rf "$dest"; continue; fi
	synced "$t"
	verify "$t" "$dest"
done

# --- 6. pack sizes -------------------------------------------------------------------------
if [ -n "$PACK_SIZES" ] && [[ " ${active[*]} " == *" kura "* ]]; then
	log "pack sizes: $PACK_SIZES MiB (full backup of the changed image, restore)"
	for ps in $PACK_SIZES; do
		row=kura-pack$ps
		if ! kura_init "$row" "$row" "$PROXY_URL" --pack-size "${ps}M"; then fail "$row" init; continue; fi
		prepare backup
		if ! kura_backup "$row" full; then fail "$row" "full backup"; continue; fi
		bucket_size "$row" after_full "$row"
		dest=$WORK/restore-$row
		rm -rf "$dest" && mkdir -p "$dest"
		prepare restore
		if ! kura_restore "$row" "$dest"; then fail "$row" restore; rm -rf "$dest"; continue; fi
		synced "$row"
		verify "$row" "$dest"
	done
fi

# --- 7. copy to a second bucket (placeholder for `kura copy`) ------------------------------
# ===================================================================================
# COPY: kura copy --from SRC --to DST  vs  restic copy  vs  kopia repository sync-to.
# `kura copy` is being built; this part skips Kura (with a message) while
# `kura copy --help` fails. Flags as of its branch: --from, --to, the source's
# password from KURA_FROM_PASSWORD (or --from-password-file /
# KURA_FROM_PASSWORD_FILE), the target's from KURA_PASSWORD (set here for
# both). BENCH_KURA_COPY_BIN runs this part with another kura binary. The target is a
# fresh `kura init` (blobs re-encrypted under its own key, like restic copy;
# kopia's sync-to copies the blobs as they are).
# ===================================================================================
if [ "${BENCH_S3_COPY:-1}" = 1 ]; then
	for t in "${active[@]}"; do
		runnable "$t" || continue
		row=$t-copy
		case $t in
		kura)
			KCOPY=${BENCH_KURA_COPY_BIN:-$KURA}
			if ! "$KCOPY" copy --help >/dev/null 2>&1; then
				log "copy: skipping kura: \`kura copy --help\` fails (kura copy is not there yet)"
				rec "{\"kind\":\"skip\",\"row\":\"$row\",\"reason\":\"kura copy is not there yet (kura copy --help fails)\"}"
				continue
			fi
			kura_init "$row" "$row" || { fail "$row" init; continue; }
			kura_cmd "$row"
			K[${#K[@]} - 1]=$KCOPY
			prepare other
			measure "$row" copy env KURA_FROM_PASSWORD=$PASSWORD "${K[@]}" copy --from "${LOC[kura]}" --to "${LOC[$row]}" || { fail "$row" copy; continue; }
			bucket_size "$row" after_copy "$row"
			# The fast path: a target sharing the source's master key
			# (kura init --copy-key-from), blobs sent sealed as they are,
			# as kopia's sync-to does.
			row=kura-copykey
			kura_init "$row" "$row" "$PROXY_URL" --copy-key-from "${LOC[kura]}" || { fail "$row" init; continue; }
			kura_cmd "$row"
			K[${#K[@]} - 1]=$KCOPY
			prepare other
			measure "$row" copy env KURA_FROM_PASSWORD=$PASSWORD "${K[@]}" copy --from "${LOC[kura]}" --to "${LOC[$row]}" || { fail "$row" copy; continue; }
			;;
		restic)
			restic_init "$row" "$row" || { fail "$row" init; continue; }
			prepare other
			measure "$row" copy env RESTIC_FROM_PASSWORD=$PASSWORD "${RESTIC_BASE[@]}" -r "${LOC[$row]}" copy --from-repo "${LOC[restic]}" ||
				{ fail "$row" copy; continue; }
			;;
		kopia)
			prepare other
			measure "$row" copy "${KOPIA[@]}" repository sync-to s3 --bucket="$row" --endpoint="$PROXY_HOSTPORT" --disable-tls --no-progress ||
				{ fail "$row" copy; continue; }
			;;
		esac
		bucket_size "$row" after_copy "$row"
	done
fi

# --- 8. profile -----------------------------------------------------------------------------
if [ "${BENCH_S3_PROFILE:-1}" = 1 ] && [[ " ${active[*]} " == *" kura "* ]]; then
	log "profiled kura backup and restore (--cpuprofile; not part of the tables)"
	if kura_init kura-prof kura-prof "$PROXY_URL"; then
		prepare backup
		KURA_EXTRA="--cpuprofile=$OUT/logs/kura-backup.pprof" kura_backup kura-prof full || true
		dest=$WORK/restore-prof
		mkdir -p "$dest"
		prepare restore
		KURA_EXTRA="--cpuprofile=$OUT/logs/kura-restore.pprof" kura_restore kura-prof "$dest" || true
		rm -rf "$dest"
		for p in backup restore; do
			[ -s "$OUT/logs/kura-$p.pprof" ] || continue
			go tool pprof -top -nodecount=30 "$KURA" "$OUT/logs/kura-$p.pprof" >"$OUT/kura-$p-pprof-top.txt" 2>&1 || true
			go tool pprof -top -cum -nodecount=40 "$KURA" "$OUT/logs/kura-$p.pprof" >"$OUT/kura-$p-pprof-cum.txt" 2>&1 || true
		done
	fi
fi

# --- 9. report -------------------------------------------------------------------------------
curl -fsS "$PROXY_URL/__stats" >"$OUT/proxy-stats.json" || die "cannot read the proxy's counts"
rec "{\"kind\":\"meta\",\"dropped_cache\":\"$DROPPED\",\"loadavg_end\":$(jstr "$(cut -d' ' -f1-3 /proc/loadavg)"),\"total_seconds\":$(($(date +%s) - T0))}"
python3 "$HERE/s3report.py" "$REC" "$OUT/proxy-stats.json" "$OUT" >/dev/null
mkdir -p "$CACHE/results-s3"
ln -sfn "$OUT" "$CACHE/results-s3/latest" 2>/dev/null || true
cat "$OUT/results.md"
log "done in $(($(date +%s) - T0))s: $OUT/results.md, $OUT/results.json"
