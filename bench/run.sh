#!/usr/bin/env bash
# run.sh — Kura vs restic / kopia / borg on the same VM disk, in one run.
#
#   bash bench/run.sh
#
# Steps (see docs/BENCHMARKS.md):
#   0. install peers (bench/install-peers.sh), build kura and physlimit,
#      build or reuse the reference disk (bench/mkdisk.sh), copy it to a
#      scratch dir and read it into the page cache
#   1. physical limit: keyed BLAKE3 + zstd-1 of the image's non-zero chunks
#      on 2 workers (bench/physlimit); once, the restore floor too: open,
#      decompress and check every chunk, then also write it and fsync
#   2. for each tool: init an encrypted repository on local disk, FULL backup
#      of the raw image, repository size
#   3. apply 100 MiB of scattered random writes to the image (mkdisk.sh --scatter)
#   4. for each tool: SECOND backup, RESTORE of the latest backup to a file
#      (then a timed `sync`: the time until the restored data is on disk),
#      cmp against the modified image, repository size
#   5. write results.md, results.json (and records.jsonl, logs/) to the output dir
# Every backup and restore runs under /usr/bin/time -v (peak RSS, CPU time).
#
# Env:
#   BENCH_SIZE_GB   disk size in GiB (8)           BENCH_DATA_GB  real file data in GiB (2)
#   BENCH_TOOLS     "kura restic kopia borg"       BENCH_QCOW2    1: extra "kura-qcow2" row (1)
#   BENCH_OUT       output dir ($KURA_CACHE/bench/results/<timestamp>)
#   BENCH_WORK      parent of the scratch dir (/tmp); scratch is removed unless BENCH_KEEP=1
#   BENCH_KURA_BIN  use this kura binary instead of building ./cmd/kura
#   BENCH_SKIP_INSTALL=1  do not run install-peers.sh (peers must be in $KURA_CACHE/bench/bin)
#   BENCH_BORG_COMPRESSION (zstd,1)  BENCH_BORG_ENCRYPTION (repokey-blake2)
#   BENCH_SEED, BENCH_WRITES, BENCH_WRITE_KIB, BENCH_SCATTER_REGION: see mkdisk.sh
#   BENCH_NICE      nice level for the measured commands (0). On a shared machine a
#                   negative value (e.g. -10, needs root) keeps other load from skewing
#                   the timings; the "other CPU" column shows how busy the machine was.
#   BENCH_PHYSLIMIT_RUNS  physlimit repetitions, best one reported (3)
#   KURA_CACHE      cache root ($HOME/.cache/kura); peers, disk and results live in $KURA_CACHE/bench
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${KURA_CACHE:-$HOME/.cache/kura}/bench
BIN=$CACHE/bin
SIZE_GB=${BENCH_SIZE_GB:-8}
DATA_GB=${BENCH_DATA_GB:-2}
TOOLS=${BENCH_TOOLS:-kura restic kopia borg}
QCOW2=${BENCH_QCOW2:-1}
BORG_COMPRESSION=${BENCH_BORG_COMPRESSION:-zstd,1}
BORG_ENCRYPTION=${BENCH_BORG_ENCRYPTION:-repokey-blake2}
NICE=${BENCH_NICE:-0}
PL_RUNS=${BENCH_PHYSLIMIT_RUNS:-3}
PASSWORD=kura-bench-password
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${BENCH_OUT:-$CACHE/results/$STAMP}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
REC=$OUT/records.jsonl
: >"$REC"
export PATH=$BIN:/usr/local/go/bin:$PATH

T0=$(date +%s)
log() { printf '[bench %s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - T0))" "$*" | tee -a "$OUT/bench.log" >&2; }
die() { log "ERROR: $*"; exit 1; }
rec() { printf '%s\n' "${1//$'\n'/}" >>"$REC"; } # one JSON object per line
jstr() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

# --- 0. setup ------------------------------------------------------------------
log "output: $OUT"
if [ "${BENCH_SKIP_INSTALL:-0}" != 1 ]; then
	log "installing peers (bench/install-peers.sh; log: logs/install-peers.log)"
	bash "$HERE/install-peers.sh" >"$OUT/logs/install-peers.log" 2>&1 ||
		die "install-peers.sh failed; see $OUT/logs/install-peers.log"
fi
[ -x /usr/bin/time ] || die "/usr/bin/time missing (apt-get install time)"

declare -A SKIP=()
active=()
for t in $TOOLS; do
	case $t in
	kura) ;;
	restic | kopia) [ -x "$BIN/$t" ] || { SKIP[$t]="$BIN/$t missing (run bench/install-peers.sh)"; } ;;
	borg) command -v borg >/dev/null || SKIP[$t]="borg missing (apt-get install borgbackup)" ;;
	*) die "unknown tool '$t' in BENCH_TOOLS" ;;
	esac
	active+=("$t")
done

KURA=$BIN/kura
case " $TOOLS " in *" kura "*)
	if [ -n "${BENCH_KURA_BIN:-}" ]; then
		KURA=$BENCH_KURA_BIN
		log "using kura binary $KURA (BENCH_KURA_BIN)"
		[ -x "$KURA" ] || SKIP[kura]="BENCH_KURA_BIN=$KURA is not executable"
	elif log "building kura: go build -o $BIN/kura ./cmd/kura" &&
		(cd "$ROOT" && go build -o "$BIN/kura.new" ./cmd/kura) >"$OUT/logs/kura-build.log" 2>&1; then
		mv "$BIN/kura.new" "$BIN/kura"
	else
		SKIP[kura]="kura CLI does not build yet (logs/kura-build.log)"
		log "SKIPPING KURA: ./cmd/kura does not build: $(head -3 "$OUT/logs/kura-build.log" | tr '\n' ' ')"
	fi
	if [ -z "${SKIP[kura]:-}" ] && [ "$QCOW2" = 1 ]; then active+=(kura-qcow2); fi
	;;
esac

log "building physlimit"
(cd "$ROOT" && go build -o "$BIN/physlimit" ./bench/physlimit) >"$OUT/logs/physlimit-build.log" 2>&1 ||
	die "physlimit does not build; see $OUT/logs/physlimit-build.log"

DISKDIR=$CACHE/disk-${SIZE_GB}g-${DATA_GB}g
log "reference disk: $DISKDIR (bench/mkdisk.sh; cached)"
BENCH_SIZE_GB=$SIZE_GB BENCH_DATA_GB=$DATA_GB bash "$HERE/mkdisk.sh" "$DISKDIR" 2>&1 | tee -a "$OUT/bench.log" >&2

WORK=$(mktemp -d "${BENCH_WORK:-/tmp}/kura-bench.XXXXXX")
cleanup() {
	if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept scratch dir $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
IMG=$WORK/disk.raw
QIMG=$WORK/qcow2/disk.qcow2
mkdir -p "$WORK/qcow2"
log "copying the disk to scratch dir $WORK"
cp --sparse=always "$DISKDIR/disk.raw" "$IMG"
sync "$IMG"
case " ${active[*]} " in *" kura-qcow2 "*) cp "$DISKDIR/disk.qcow2" "$QIMG" ;; esac

precache() { # read images into the page cache
	cat "$IMG" >/dev/null
	[ ! -f "$QIMG" ] || cat "$QIMG" >/dev/null
}
precache

ext=$(python3 "$HERE/benchtool.py" extents "$IMG")
disk_size=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["size"])' "$ext")
disk_alloc=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["allocated"])' "$ext")
disk_extents=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["extents"])' "$ext")

ver() { "$@" 2>&1 | head -1 | tr -d '\r' | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1 || true; }
kura_ver=pending
[ -n "${SKIP[kura]:-}" ] || kura_ver=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo worktree)
rec "{\"kind\":\"meta\",\"date\":$(jstr "$(date -u +%FT%TZ)"),\"host\":$(jstr "$(hostname)"),\"cores\":$(nproc),
\"kernel\":$(jstr "$(uname -r)"),\"cpu\":$(jstr "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"),
\"disk\":$(jstr "ext4, ${SIZE_GB} GiB raw, ~${DATA_GB} GiB of files from /usr"),\"disk_size\":$disk_size,
\"disk_allocated\":$disk_alloc,\"disk_extents\":$disk_extents,
\"restic_version\":$(jstr "$([ -x "$BIN/restic" ] && ver "$BIN/restic" version)"),
\"kopia_version\":$(jstr "$([ -x "$BIN/kopia" ] && ver "$BIN/kopia" --version)"),
\"borg_version\":$(jstr "$(command -v borg >/dev/null && ver borg --version)"),
\"kura_version\":$(jstr "$kura_ver"),
\"borg_settings\":$(jstr "--compression $BORG_COMPRESSION, -e $BORG_ENCRYPTION"),
\"kopia_settings\":\"compression zstd-fastest (global policy), defaults otherwise\",
\"restic_settings\":\"repo v2, compression auto (default), defaults otherwise\",
\"nice\":$NICE,\"loadavg_start\":$(jstr "$(cut -d' ' -f1-3 /proc/loadavg)")}"
log "disk: size $disk_size, allocated $disk_alloc in $disk_extents extents"

cpu_busy() { # busy CPU jiffies of the whole machine
	awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat
}
HZ=$(getconf CLK_TCK)
NICE_CMD=()
[ "$NICE" = 0 ] || NICE_CMD=(nice -n "$NICE")

# measure ROW STEP CMD... : run CMD under /usr/bin/time -v, record wall/RSS/CPU,
# and the CPU time the rest of the machine used meanwhile (noise indicator).
measure() {
	local row=$1 step=$2; shift 2
	local tf=$OUT/logs/$row-$step.time lf=$OUT/logs/$row-$step.log
	local t1 t2 b1 b2 rc=0
	log "$row: $step: $*"
	b1=$(cpu_busy)
	t1=$(date +%s.%N)
	"${NICE_CMD[@]}" /usr/bin/time -v -o "$tf" "$@" >"$lf" 2>&1 || rc=$?
	t2=$(date +%s.%N)
	b2=$(cpu_busy)
	local secs rss user sys other
	secs=$(python3 -c "print(round($t2-$t1,3))")
	rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$tf")
	user=$(sed -n 's/.*User time (seconds): //p' "$tf")
	sys=$(sed -n 's/.*System time (seconds): //p' "$tf")
	other=$(python3 -c "print(round(max(0.0, ($b2-$b1)/$HZ - ${user:-0} - ${sys:-0}), 1))")
	local ok=true
	[ $rc = 0 ] || ok=false
	rec "{\"kind\":\"step\",\"row\":\"$row\",\"step\":\"$step\",\"seconds\":$secs,\"max_rss_kb\":${rss:-null},\"user\":${user:-null},\"sys\":${sys:-null},\"other_cpu\":$other,\"ok\":$ok,\"rc\":$rc}"
	if [ $rc != 0 ]; then
		log "$row: $step FAILED (rc $rc); last lines of $lf:"
		tail -5 "$lf" | sed 's/^/    /' >&2
		return 1
	fi
	log "$row: $step: ${secs}s, peak RSS $((${rss:-0} / 1024)) MiB, CPU ${user}+${sys}s, other load ${other} CPU-s"
}
quiet() { # quiet ROW NAME CMD... : untimed helper step with its own log
	local row=$1 name=$2; shift 2
	"$@" >"$OUT/logs/$row-$name.log" 2>&1 || {
		log "$row: $name FAILED: $*"
		tail -5 "$OUT/logs/$row-$name.log" | sed 's/^/    /' >&2
		return 1
	}
}

# --- per-tool drivers ------------------------------------------------------------
# Each tool gets: <tool>_init, <tool>_backup LABEL, <tool>_restore DEST (restores
# the latest backup under DEST), and REPO[row]. Rows: kura, kura-qcow2, restic,
# kopia, borg.
declare -A REPO=()
for r in "${active[@]}"; do REPO[$r]=$WORK/repo-$r; done

# Commands run under /usr/bin/time, so the environment is passed with env(1)
# in arrays rather than through shell functions.

# kura — driven through its CLI; cache isolated to the scratch dir.
kura_cmd() { # kura_cmd ROW: sets array K to the kura command line for ROW
	K=(env -u KURA_CACHE KURA_REPO="${REPO[$1]}" KURA_PASSWORD=$PASSWORD XDG_CACHE_HOME="$WORK/cache-$1" "$KURA")
}
kura_src() { if [ "$1" = kura-qcow2 ]; then echo "$QIMG"; else echo "$IMG"; fi; }
kura_init() { kura_cmd "$1"; quiet "$1" init "${K[@]}" init; }
kura_backup() { kura_cmd "$1"; measure "$1" "$2" "${K[@]}" backup image "$(kura_src "$1")" --name bench; }
kura_restore() { kura_cmd "$1"; measure "$1" restore "${K[@]}" restore bench@latest --to "$2" --format raw; }
kura_extra() {
	local row=$1 s
	kura_cmd "$row"
	if s=$("${K[@]}" stats --json 2>"$OUT/logs/$row-stats.err"); then
		printf '%s\n' "$s" >"$OUT/logs/$row-stats.json"
		if python3 -c 'import json,sys; json.loads(sys.argv[1])' "$s" 2>/dev/null; then
			rec "{\"kind\":\"extra\",\"row\":\"$row\",\"data\":{\"kura_stats\":$s}}"
		fi
	else
		log "$row: kura stats --json failed (logs/$row-stats.err)"
	fi
}

# restic — file-path backup of the image (so the snapshot holds disk.raw).
RESTIC=(env RESTIC_REPOSITORY="$WORK/repo-restic" RESTIC_PASSWORD=$PASSWORD RESTIC_CACHE_DIR="$WORK/cache-restic"
	RESTIC_PROGRESS_FPS=0.1 "$BIN/restic")
restic_init() { quiet restic init "${RESTIC[@]}" init; }
restic_backup() { measure restic "$2" "${RESTIC[@]}" backup --host bench "$IMG"; }
restic_restore() { measure restic restore "${RESTIC[@]}" restore latest --target "$2" --sparse; }

# kopia — single-file snapshot; config, cache and logs in the scratch dir.
KOPIA=(env KOPIA_PASSWORD=$PASSWORD KOPIA_CHECK_FOR_UPDATES=false "$BIN/kopia"
	--config-file="$WORK/kopia/repository.config" --log-dir="$WORK/kopia/logs")
kopia_init() {
	mkdir -p "$WORK/kopia" "${REPO[kopia]}"
	quiet kopia init "${KOPIA[@]}" repository create filesystem --path="${REPO[kopia]}" \
		--cache-directory="$WORK/kopia/cache" --no-check-for-updates &&
		quiet kopia policy "${KOPIA[@]}" policy set --global --compression=zstd-fastest
}
kopia_backup() { measure kopia "$2" "${KOPIA[@]}" snapshot create "$IMG" --no-progress; }
kopia_restore() {
	local id
	id=$("${KOPIA[@]}" snapshot list "$IMG" --json | python3 -c \
		'import json,sys; s=json.load(sys.stdin); print(max(s, key=lambda x: x["startTime"])["rootEntry"]["obj"])') ||
		{ log "kopia: cannot list snapshots"; return 1; }
	measure kopia restore "${KOPIA[@]}" snapshot restore "$id" "$2/disk.raw" --write-sparse-files --no-progress
}

# borg — archive of the image file; BORG_BASE_DIR keeps keys/cache in the scratch dir.
BORG=(env BORG_REPO="$WORK/repo-borg" BORG_PASSPHRASE=$PASSWORD BORG_BASE_DIR="$WORK/borg-base"
	BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=no borg)
borg_init() { quiet borg init "${BORG[@]}" init --encryption="$BORG_ENCRYPTION"; }
borg_backup() { measure borg "$2" "${BORG[@]}" create --compression "$BORG_COMPRESSION" "::$2" "$IMG"; }
borg_restore() { (cd "$2" && measure borg restore "${BORG[@]}" extract --sparse ::incr); }

driver() { case $1 in kura | kura-qcow2) echo kura ;; *) echo "$1" ;; esac; }

repo_size() { # repo_size ROW STEP
	local b
	b=$(du -sb "${REPO[$1]}" | cut -f1)
	rec "{\"kind\":\"size\",\"row\":\"$1\",\"step\":\"$2\",\"bytes\":$b}"
	log "$1: $2: $(python3 -c "print(round($b/1048576,1))") MiB"
}

declare -A FAILED=()
fail() { FAILED[$1]=1; rec "{\"kind\":\"skip\",\"row\":\"$1\",\"reason\":$(jstr "failed: $2 (see logs/)")}"; log "$1: FAILED at $2; continuing with the other tools"; }

for r in "${active[@]}"; do
	if [ -n "${SKIP[$(driver "$r")]:-}" ]; then
		rec "{\"kind\":\"skip\",\"row\":\"$r\",\"reason\":$(jstr "${SKIP[$(driver "$r")]}")}"
		log "$r: skipped: ${SKIP[$(driver "$r")]}"
	fi
done
runnable() { [ -z "${SKIP[$(driver "$1")]:-}" ] && [ -z "${FAILED[$1]:-}" ]; }

# --- 1. physical limit -----------------------------------------------------------------
precache
log "physlimit on $IMG (2 workers, best of $PL_RUNS)"
best=
restorefloor=null
for i in $(seq "$PL_RUNS"); do
	extra=()
	[ "$i" != 1 ] || extra=(-restore "$WORK/physlimit-restore.raw") # the restore floor, once
	pl=$("${NICE_CMD[@]}" "$BIN/physlimit" -workers 2 -chunk "${BENCH_CHUNK:-262144}" "${extra[@]}" "$IMG" 2>"$OUT/logs/physlimit.err") || die "physlimit failed"
	printf '%s\n' "$pl" >>"$OUT/logs/physlimit.jsonl"
	[ "$i" != 1 ] || restorefloor=$(python3 -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1]).get("restore")))' "$pl")
	s=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$pl")
	log "physlimit run $i: ${s}s"
	if [ -z "$best" ] || python3 -c "import sys; sys.exit(0 if $s < $best else 1)"; then best=$s; bestpl=$pl; fi
done
bestpl=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["restore"]=json.loads(sys.argv[2]); print(json.dumps(d))' "$bestpl" "$restorefloor")
rec "{\"kind\":\"physlimit\",\"runs\":$PL_RUNS,$(printf '%s' "$bestpl" | sed 's/^{//')"
log "physlimit: $bestpl"

# --- 2. full backups ---------------------------------------------------------------------
for r in "${active[@]}"; do
	runnable "$r" || continue
	d=$(driver "$r")
	if ! "${d}_init" "$r"; then fail "$r" init; continue; fi
	precache
	if ! "${d}_backup" "$r" full; then fail "$r" "full backup"; continue; fi
	repo_size "$r" repo_after_full_bytes
done

# --- 3. scattered writes ------------------------------------------------------------------
log "applying scattered writes to $IMG"
sc=$(bash "$HERE/mkdisk.sh" --scatter "$IMG")
log "scatter: $sc"
sync "$IMG"
scatter_desc=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("%d x %d KiB random writes (%d MiB), seed %d, offsets in %s extents" % (d["writes"], d["block_size"]//1024, d["bytes"]>>20, d["seed"], d["region"]))' "$sc")
rec "{\"kind\":\"meta\",\"scatter\":$sc,\"scatter_desc\":$(jstr "$scatter_desc")}"
if [ -f "$QIMG" ]; then
	log "rebuilding $QIMG from the modified raw image (qemu-img convert)"
	rm -f "$QIMG"
	qemu-img convert -f raw -O qcow2 "$IMG" "$QIMG"
fi

# --- 4. second backups, restores, checks ----------------------------------------------
for r in "${active[@]}"; do
	runnable "$r" || continue
	d=$(driver "$r")
	precache
	if ! "${d}_backup" "$r" incr; then fail "$r" "second backup"; continue; fi
	repo_size "$r" repo_bytes
	dest=$WORK/restore-$r
	rm -rf "$dest" && mkdir -p "$dest"
	sync # nothing of earlier steps is left to write back during this one
	if ! "${d}_restore" "$r" "$dest"; then fail "$r" restore; rm -rf "$dest"; continue; fi
	# Time to durable: what the tool left in the page cache, written back.
	t1=$(date +%s.%N)
	sync
	t2=$(date +%s.%N)
	syncs=$(python3 -c "print(round($t2-$t1,3))")
	rec "{\"kind\":\"sync\",\"row\":\"$r\",\"step\":\"restore\",\"seconds\":$syncs}"
	log "$r: sync after restore: ${syncs}s"
	mapfile -t files < <(find "$dest" -type f)
	ok=false
	if [ ${#files[@]} -eq 1 ]; then
		log "$r: cmp ${files[0]#"$WORK"/} vs modified image"
		if cmp "${files[0]}" "$IMG" >"$OUT/logs/$r-cmp.log" 2>&1; then ok=true; else log "$r: RESTORE MISMATCH: $(head -1 "$OUT/logs/$r-cmp.log")"; fi
	else
		log "$r: expected one restored file under $dest, found ${#files[@]}: ${files[*]:-none}"
	fi
	rec "{\"kind\":\"check\",\"row\":\"$r\",\"ok\":$ok}"
	[ "$ok" = true ] && log "$r: restore verified (cmp equal)"
	rm -rf "$dest"
	[ "$d" = kura ] && kura_extra "$r"
done

# --- 5. report --------------------------------------------------------------------
rec "{\"kind\":\"meta\",\"loadavg_end\":$(jstr "$(cut -d' ' -f1-3 /proc/loadavg)"),\"total_seconds\":$(($(date +%s) - T0))}"
python3 "$HERE/benchtool.py" report "$REC" "$OUT" >/dev/null
ln -sfn "$OUT" "$CACHE/results/latest" 2>/dev/null || true
cat "$OUT/results.md"
log "done in $(($(date +%s) - T0))s: $OUT/results.md, $OUT/results.json"
