#!/usr/bin/env bash
# s3-soak.sh — kill -9 backups to a repository on S3 at random moments,
# and copies of it to a second one, round after round, then check that
# nothing a finished backup or copy saved was lost and nothing a killed
# one left behind harms either repository.
#
#   bash scripts/s3-soak.sh            # 30 rounds, about 8 minutes on 2 cores
#   SOAK_ROUNDS=3 bash scripts/s3-soak.sh
#
# It starts a versitygw server (built by scripts/s3servers.sh) on a free
# port of 127.0.0.1 with its data in a scratch directory, creates a
# bucket, and inits a repository in it. Then, SOAK_ROUNDS times:
#   0. (once) backs up the image to the end: the rounds are incremental;
#   1. scribbles on a generated raw image (random 4 MiB blocks, half to
#      twice SOAK_SCRIBBLE_MIB);
#   2. starts `kura backup image` of it and SIGKILLs it after a random
#      0.2–3 s (a backup that finishes first is not killed); every
#      SOAK_FINISH_EVERY-th round lets it finish instead: a killed backup's
#      packs are not reused, so a run of kills makes each next backup
#      longer until none finishes in the window;
#   3. notes which restore point, if any, the round left, and the sha256
#      of the image it was taken from (a killed backup leaves none; one
#      killed just after it saved its snapshot does: the snapshot list is
#      compared before and after each round).
# Afterwards: `kura verify --read-data`, `kura prune`, `kura verify
# --read-data` again, and every restore point is restored and compared,
# by sha256, with the image as it was when that backup ran; the
# repository must hold exactly the restore points the rounds left.
# Exits non-zero on any problem, and says which.
#
# Environment:
#   SOAK_ROUNDS        rounds (30)
#   SOAK_IMAGE_MIB     image size in MiB (1024); half of it random data, so
#                      that a backup takes about as long as the kill window
#   SOAK_SCRIBBLE_MIB  MiB of new random data per round, on average (48)
#   SOAK_KILL_MIN_MS, SOAK_KILL_MAX_MS   the kill's random moment (200, 3000)
#   SOAK_FINISH_EVERY  every this many rounds a backup is not killed (5; 0 never)
#   SOAK_SEED          seed of the kill moments and scribbles (random; printed)
#   SOAK_WORK          parent of the scratch directory (/tmp); kept if SOAK_KEEP=1
#   KURA_BIN           the kura binary (default: built from ./cmd/kura)
#   KURA_S3_BIN        where versitygw is (~/.cache/kura/s3/bin)
#   SOAK_COPY          1: copy to a second repository each round (1)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${SOAK_ROUNDS:-30}
SIZE_MIB=${SOAK_IMAGE_MIB:-1024}
SCRIBBLE_MIB=${SOAK_SCRIBBLE_MIB:-48}
KILL_MIN_MS=${SOAK_KILL_MIN_MS:-200}
KILL_MAX_MS=${SOAK_KILL_MAX_MS:-3000}
FINISH_EVERY=${SOAK_FINISH_EVERY:-5}
COPY=${SOAK_COPY:-1}
SEED=${SOAK_SEED:-$((RANDOM * 32768 + RANDOM))}
S3BIN=${KURA_S3_BIN:-$HOME/.cache/kura/s3/bin}
export PATH="$PATH:/usr/local/go/bin"

RANDOM=$SEED
T0=$SECONDS
log() { printf '[soak +%4ss] %s\n' "$((SECONDS - T0))" "$*" >&2; }
problems=0
problem() {
  log "PROBLEM: $*"
  problems=$((problems + 1))
}

[ -x "$S3BIN/versitygw" ] || { echo "s3-soak: $S3BIN/versitygw is missing: run scripts/s3servers.sh" >&2; exit 2; }
command -v curl >/dev/null || { echo "s3-soak: curl is needed (to create the bucket)" >&2; exit 2; }

WORK=$(mktemp -d "${SOAK_WORK:-/tmp}/kura-soak.XXXXXX")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "${SOAK_KEEP:-0}" = 1 ]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

KURA=${KURA_BIN:-}
if [ -z "$KURA" ]; then
  KURA=$WORK/kura
  (cd "$ROOT" && go build -o "$KURA" ./cmd/kura)
fi

# A free port: one nothing answers on, in a range below the ephemeral one.
port=""
for _ in $(seq 1 50); do
  p=$((20000 + RANDOM % 12000))
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    port=$p
    break
  fi
done
[ -n "$port" ] || { echo "s3-soak: no free port found" >&2; exit 2; }

ACCESS=soakaccess
SECRET=soak-secret-$$-$RANDOM
BUCKET=kura-soak
ENDPOINT=http://127.0.0.1:$port
mkdir -p "$WORK/s3/data" "$WORK/s3/versions"
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
  ROOT_ACCESS_KEY_ID=$ACCESS ROOT_SECRET_ACCESS_KEY=$SECRET \
  "$S3BIN/versitygw" --port "127.0.0.1:$port" posix --versioning-dir "$WORK/s3/versions" "$WORK/s3/data" \
  >"$WORK/server.log" 2>&1 &
server_pid=$!
s3curl() {
  curl -sS -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS:$SECRET" \
    -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" "$@"
}
up=""
for _ in $(seq 1 100); do
  if [ "$(s3curl "$ENDPOINT/" 2>/dev/null)" = 200 ]; then
    up=1
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$up" ] || { echo "s3-soak: versitygw did not come up:" >&2; tail -20 "$WORK/server.log" >&2; exit 2; }
code=$(s3curl -X PUT "$ENDPOINT/$BUCKET")
[ "$code" = 200 ] || { echo "s3-soak: creating the bucket: HTTP $code" >&2; exit 2; }

export KURA_REPO="s3:$ENDPOINT/$BUCKET/soak"
COPY_REPO="s3:$ENDPOINT/$BUCKET/copy"
export KURA_PASSWORD="soak password"
export KURA_CACHE_DIR=$WORK/cache # the S3 metadata cache: with the scratch, not in the home
export AWS_ACCESS_KEY_ID=$ACCESS AWS_SECRET_ACCESS_KEY=$SECRET
unset AWS_SESSION_TOKEN AWS_PROFILE AWS_SHARED_CREDENTIALS_FILE
log "seed $SEED, $ROUNDS rounds, $SIZE_MIB MiB image, versitygw at $ENDPOINT, work $WORK"
"$KURA" init --chunk-size 256K >/dev/null
if [ "$COPY" = 1 ]; then
  "$KURA" --repo "$COPY_REPO" init --chunk-size 256K >/dev/null
fi

IMG=$WORK/soak.raw
truncate -s "${SIZE_MIB}M" "$IMG"
# write_random N: N MiB of random data in 4 MiB blocks at random offsets.
write_random() {
  local i
  for ((i = 0; i < $1; i += 4)); do
    dd if=/dev/urandom of="$IMG" bs=4M count=1 seek=$(((RANDOM * 32768 + RANDOM) % (SIZE_MIB / 4))) conv=notrunc status=none
  done
}
# Half of it random data (the first half), the rest a hole.
dd if=/dev/urandom of="$IMG" bs=1M count=$((SIZE_MIB / 2)) conv=notrunc status=none

# snapshot_ids prints the repository's restore point ids, one a line.
snapshot_ids() {
  "$KURA" snapshots --json | grep -oE '^    "id": "[0-9a-f]{64}"' | grep -oE '[0-9a-f]{64}' || true
}

# copy_ids prints the target's restore points, each with the source
# snapshot it was copied from: "TARGET_ID SOURCE_ID" a line.
copy_ids() {
  "$KURA" --repo "$COPY_REPO" snapshots --json | awk '
    /^    "id": "/ { gsub(/[",]/, "", $2); id = $2; from = "" }
    /"snapshot": "/ { if (id != "" && from == "") { gsub(/[",]/, "", $2); from = $2; print id, from } }'
}

# copy_round copies every restore point to the second repository; killed
# after ms milliseconds unless told to finish. It says what happened.
copy_round() { # finish ms
  [ "$COPY" = 1 ] || return 0
  "$KURA" copy --to "$COPY_REPO" -q >"$WORK/copy.out" 2>"$WORK/copy.err" &
  local pid=$! rc=0 what="finished"
  if [ "$1" != 1 ]; then
    sleep "$(printf '%d.%03d' $(($2 / 1000)) $(($2 % 1000)))"
    if kill -KILL "$pid" 2>/dev/null; then
      what="killed after $2 ms"
    fi
  fi
  { wait "$pid"; } 2>/dev/null || rc=$?
  case $rc in
  0 | 137) ;;
  *) problem "round $round: the copy failed (exit $rc): $(tr '\n' ' ' <"$WORK/copy.err")" ;;
  esac
  copy_what="copy $what (exit $rc)"
}

declare -A states=() # restore point id -> sha256 of the image it was taken from
declare -A known=()  # ids seen so far

# A first backup that runs to the end, so that the rounds are incremental
# backups (they read the whole image but store only what changed) that
# the kill finds sometimes running, sometimes done.
sum=$(sha256sum "$IMG" | cut -d' ' -f1)
"$KURA" backup image "$IMG" --name soak -q >/dev/null
for id in $(snapshot_ids); do
  known[$id]=1
  states[$id]=$sum
done
killed=0 finished=0
for ((round = 1; round <= ROUNDS; round++)); do
  # Between half and twice SOAK_SCRIBBLE_MIB: backups of varied length.
  write_random $((SCRIBBLE_MIB / 2 + RANDOM % (SCRIBBLE_MIB * 3 / 2 + 1)))
  sum=$(sha256sum "$IMG" | cut -d' ' -f1)
  ms=$((KILL_MIN_MS + RANDOM % (KILL_MAX_MS - KILL_MIN_MS + 1)))
  copy_ms=$((KILL_MIN_MS + RANDOM % (KILL_MAX_MS - KILL_MIN_MS + 1)))
  finish=0
  if [ "$FINISH_EVERY" -gt 0 ] && [ $((round % FINISH_EVERY)) = 0 ]; then
    finish=1
  fi
  "$KURA" backup image "$IMG" --name soak -q >"$WORK/backup.out" 2>"$WORK/backup.err" &
  pid=$!
  started=$SECONDS
  if [ "$finish" = 1 ]; then
    what="not killed"
  else
    sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
    what="finished before the kill"
    if kill -KILL "$pid" 2>/dev/null; then
      what="killed after $ms ms"
    fi
  fi
  rc=0
  { wait "$pid"; } 2>/dev/null || rc=$? # no "Killed" line from bash
  [ "$what" = "killed after $ms ms" ] || what="$what, $((SECONDS - started)) s"
  case $rc in
  0) finished=$((finished + 1)) ;;
  137) killed=$((killed + 1)) ;;
  *) problem "round $round: the backup failed (exit $rc): $(tr '\n' ' ' <"$WORK/backup.err")" ;;
  esac
  new=()
  for id in $(snapshot_ids); do
    if [ -z "${known[$id]:-}" ]; then
      known[$id]=1
      states[$id]=$sum
      new+=("${id:0:8}")
    fi
  done
  if [ "$rc" = 0 ] && [ "${#new[@]}" != 1 ]; then
    problem "round $round: a finished backup left ${#new[@]} new restore points"
  elif [ "${#new[@]}" -gt 1 ]; then
    problem "round $round: ${#new[@]} new restore points from one backup"
  fi
  copy_what=""
  copy_round "$finish" "$copy_ms"
  log "round $round: $what (exit $rc), new restore point: ${new[*]:-none}${copy_what:+; $copy_what}"
done
log "$killed backups killed, $finished finished, ${#states[@]} restore points"

# check_repo LABEL: verify, prune, verify again in --repo "$REPO".
check_repo() {
  local out
  for step in verify prune verify; do
    if [ "$step" = prune ]; then
      if ! out=$("$KURA" --repo "$REPO" prune 2>&1); then
        problem "$1: prune failed: $out"
      else
        log "$1: $(tr '\n' ' ' <<<"$out")"
      fi
      continue
    fi
    if ! out=$("$KURA" --repo "$REPO" verify --read-data 2>&1); then
      problem "$1: verify --read-data failed: $out"
    elif ! grep -q "no problems found" <<<"$out"; then
      problem "$1: verify --read-data: $out"
    fi
  done
}

# check_restore LABEL ID WANT: restores ID of --repo "$REPO" and compares
# it with the sha256 WANT.
check_restore() {
  local out got
  rm -rf "$WORK/restore"
  if ! out=$("$KURA" --repo "$REPO" restore "$2" --to "$WORK/restore" -q 2>&1); then
    problem "$1: restoring ${2:0:8}: $out"
    return
  fi
  got=$(sha256sum "$WORK/restore/soak.raw" | cut -d' ' -f1)
  [ "$got" = "$3" ] || problem "$1: restore point ${2:0:8} restores to other bytes than its backup read"
}

REPO=$KURA_REPO
check_repo source
have=$(snapshot_ids | sort)
want=$(printf '%s\n' "${!states[@]}" | sort)
[ "$have" = "$want" ] || problem "the repository holds other restore points than the rounds left: have [$(echo $have)] want [$(echo $want)]"
for id in $have; do
  check_restore source "$id" "${states[$id]:-}"
done
log "source: restored and compared ${#states[@]} restore points"

if [ "$COPY" = 1 ]; then
  round=last
  copy_round 1 0
  log "last $copy_what"
  REPO=$COPY_REPO
  check_repo copy
  copied=$(copy_ids)
  from=$(awk '{print $2}' <<<"$copied" | sort)
  [ "$from" = "$want" ] || problem "the copy holds copies of other restore points than the source: [$(echo $from)], want [$(echo $want)]"
  n=0
  while read -r id src; do
    [ -n "$id" ] || continue
    check_restore copy "$id" "${states[$src]:-}"
    n=$((n + 1))
  done <<<"$copied"
  log "copy: restored and compared $n restore points"
fi

if [ "$problems" -gt 0 ]; then
  log "FAILED: $problems problems (seed $SEED)"
  exit 1
fi
also=""
[ "$COPY" = 1 ] && also=", in the copy too"
log "OK: $ROUNDS rounds ($killed backups killed), verify clean before and after prune, every restore point byte for byte$also"
