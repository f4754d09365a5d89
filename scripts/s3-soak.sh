#!/usr/bin/env bash
# s3-soak.sh — kill -9 backups to a repository on S3 at random moments,
# round after round, then check that nothing a finished backup saved was
# lost and nothing a killed one left behind harms the repository.
#
#   bash scripts/s3-soak.sh            # 30 rounds, about 2–4 minutes
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
#   SOAK_COPY_CMD      see copy_round below: the hook for `kura copy`
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${SOAK_ROUNDS:-30}
SIZE_MIB=${SOAK_IMAGE_MIB:-1024}
SCRIBBLE_MIB=${SOAK_SCRIBBLE_MIB:-48}
KILL_MIN_MS=${SOAK_KILL_MIN_MS:-200}
KILL_MAX_MS=${SOAK_KILL_MAX_MS:-3000}
FINISH_EVERY=${SOAK_FINISH_EVERY:-5}
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
export KURA_PASSWORD="soak password"
export AWS_ACCESS_KEY_ID=$ACCESS AWS_SECRET_ACCESS_KEY=$SECRET
unset AWS_SESSION_TOKEN AWS_PROFILE AWS_SHARED_CREDENTIALS_FILE
log "seed $SEED, $ROUNDS rounds, $SIZE_MIB MiB image, versitygw at $ENDPOINT, work $WORK"
"$KURA" init --chunk-size 256K >/dev/null

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

# copy_round is the hook for `kura copy` (offsite copies): when it lands,
# set SOAK_COPY_CMD to a command that copies this repository's restore
# points to a second one (say `$KURA copy --to s3:$ENDPOINT/$BUCKET/copy`,
# in whatever form the command takes), and each round runs it after the
# backup, killed at the same kind of random moment. Then extend the final
# check to verify the second repository and restore its restore points
# against states[] (they keep their ids when copied). Empty: nothing.
copy_round() {
  [ -n "${SOAK_COPY_CMD:-}" ] || return 0
  bash -c "$SOAK_COPY_CMD" >"$WORK/copy.out" 2>&1 &
  local pid=$! ms=$((KILL_MIN_MS + RANDOM % (KILL_MAX_MS - KILL_MIN_MS + 1)))
  sleep "$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
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
  "$KURA" backup image "$IMG" --name soak -q >"$WORK/backup.out" 2>"$WORK/backup.err" &
  pid=$!
  started=$SECONDS
  if [ "$FINISH_EVERY" -gt 0 ] && [ $((round % FINISH_EVERY)) = 0 ]; then
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
  log "round $round: $what (exit $rc), new restore point: ${new[*]:-none}"
  copy_round
done
log "$killed backups killed, $finished finished, ${#states[@]} restore points"

check_verify() {
  local out
  if ! out=$("$KURA" verify --read-data 2>&1); then
    problem "$1: verify --read-data failed: $out"
  elif ! grep -q "no problems found" <<<"$out"; then
    problem "$1: verify --read-data: $out"
  fi
}
check_verify "after the rounds"
if ! out=$("$KURA" prune 2>&1); then
  problem "prune failed: $out"
else
  log "prune: $(tr '\n' ' ' <<<"$out")"
fi
check_verify "after prune"

have=$(snapshot_ids | sort)
want=$(printf '%s\n' "${!states[@]}" | sort)
[ "$have" = "$want" ] || problem "the repository holds other restore points than the rounds left: have [$(echo $have)] want [$(echo $want)]"
for id in $have; do
  rm -rf "$WORK/restore"
  if ! out=$("$KURA" restore "$id" --to "$WORK/restore" -q 2>&1); then
    problem "restoring ${id:0:8}: $out"
    continue
  fi
  got=$(sha256sum "$WORK/restore/soak.raw" | cut -d' ' -f1)
  [ "$got" = "${states[$id]:-}" ] || problem "restore point ${id:0:8} restores to other bytes than its backup read"
done
log "restored and compared ${#states[@]} restore points"

if [ "$problems" -gt 0 ]; then
  log "FAILED: $problems problems (seed $SEED)"
  exit 1
fi
log "OK: $ROUNDS rounds ($killed killed), verify clean before and after prune, every restore point byte for byte"
