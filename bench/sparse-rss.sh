#!/usr/bin/env bash
# Peak memory of backing up and restoring sparse disk images (issue 23):
# for each virtual size, a sparse raw image holding DATA_GIB of random data
# scattered over it in PIECE_MIB pieces is backed up with `kura backup
# image` into a fresh repository and restored with `kura restore --to`;
# /usr/bin/time -v gives each command's peak RSS. The table also shows the
# restore point's metadata: the sealed snapshot manifest and the map blobs
# (plaintext), and checks that the restored file is as sparse as the image.
#
#   bench/sparse-rss.sh                       # builds ./bin/kura, all sizes
#   KURA=/tmp/kura-old LABEL=old bench/sparse-rss.sh
#   SIZES="256G 2T" DATA_GIB=4 bench/sparse-rss.sh
#
# Variables: KURA (binary; default: go build ./cmd/kura into the work dir),
# LABEL (first column), SIZES (truncate sizes; default "256G 2T 8T 16T" —
# ext4's largest file is 16 TiB - 4 KiB, used when 16T does not fit),
# DATA_GIB (default 2), PIECE_MIB (default 4), CHUNK (repository chunk
# size, default kura's), WORKDIR (default /var/tmp/kura-sparse-bench,
# removed afterwards unless KEEP=1).
set -euo pipefail

SIZES=${SIZES:-"256G 2T 8T 16T"}
DATA_GIB=${DATA_GIB:-2}
PIECE_MIB=${PIECE_MIB:-4}
WORKDIR=${WORKDIR:-/var/tmp/kura-sparse-bench}
LABEL=${LABEL:-new}
CHUNK=${CHUNK:-}
export KURA_PASSWORD=${KURA_PASSWORD:-bench}

here=$(cd "$(dirname "$0")/.." && pwd)
if [[ ! -x /usr/bin/time ]]; then
	echo "installing GNU time for peak RSS" >&2
	apt-get install -y -qq time >/dev/null
fi
mkdir -p "$WORKDIR"
cleanup() { [[ ${KEEP:-0} == 1 ]] || rm -rf "$WORKDIR"; }
trap cleanup EXIT
if [[ -z ${KURA:-} ]]; then
	KURA=$WORKDIR/kura
	(cd "$here" && PATH=$PATH:/usr/local/go/bin go build -o "$KURA" ./cmd/kura)
fi

# peak_rss_mib LOG: the "Maximum resident set size" of a time -v log, MiB.
peak_rss_mib() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }
# elapsed_s LOG: wall clock seconds of a time -v log.
elapsed_s() {
	awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; printf "%.1f", s}' "$1"
}

printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' binary "virtual size" data "backup peak RSS" "backup s" \
	"restore peak RSS" "restore s" "map blobs (bytes)" "snapshot object"
printf '|---|---|---|---|---|---|---|---|---|\n'
for size in $SIZES; do
	img=$WORKDIR/disk-$size.raw
	rm -f "$img"
	if ! truncate -s "$size" "$img" 2>/dev/null; then
		bytes=$(numfmt --from=iec "$size")
		truncate -s $((bytes - 4096)) "$img"
	fi
	bytes=$(stat -c %s "$img")
	pieces=$((DATA_GIB * 1024 / PIECE_MIB))
	stride=$((bytes / pieces / (1 << 20))) # MiB from one piece to the next
	((stride >= PIECE_MIB)) || { echo "$DATA_GIB GiB do not fit in $size" >&2; exit 1; }
	gap=$(((stride - PIECE_MIB) / 2))     # each piece in the middle of its stride
	for ((i = 0; i < pieces; i++)); do
		dd if=/dev/urandom of="$img" bs=1M count="$PIECE_MIB" seek=$((i * stride + gap)) conv=notrunc status=none
	done
	[[ $(stat -c %s "$img") == "$bytes" ]] || { echo "the pieces grew the image" >&2; exit 1; }
	repo=$WORKDIR/repo
	rm -rf "$repo" "$WORKDIR/out"
	"$KURA" -q -r "$repo" init ${CHUNK:+--chunk-size "$CHUNK"} >/dev/null
	/usr/bin/time -v -o "$WORKDIR/backup.time" "$KURA" -q -r "$repo" backup image --name disk "$img" >/dev/null
	/usr/bin/time -v -o "$WORKDIR/restore.time" "$KURA" -q -r "$repo" restore disk@latest --to "$WORKDIR/out" >/dev/null
	restored=$(ls "$WORKDIR"/out/*)
	# The restored image must be as big, as sparse, and hold the same bytes.
	[[ $(stat -c %s "$restored") == "$bytes" ]] || { echo "restored size differs" >&2; exit 1; }
	alloc=$(($(stat -c %b "$restored") * 512))
	((alloc <= DATA_GIB * 2 * (1 << 30))) || { echo "restored image is not sparse: $alloc bytes allocated" >&2; exit 1; }
	for ((i = 0; i < pieces; i += pieces / 8 + 1)); do
		cmp -s <(dd if="$img" bs=1M skip=$((i * stride + gap)) count="$PIECE_MIB" status=none) \
			<(dd if="$restored" bs=1M skip=$((i * stride + gap)) count="$PIECE_MIB" status=none) ||
			{ echo "restored data differs at piece $i" >&2; exit 1; }
	done
	meta=$("$KURA" -r "$repo" snapshots --json | python3 -c '
import json, sys
s = json.load(sys.stdin)[-1]
d = s["disks"][0]
# bytes_new is the plaintext of the new blobs: the data chunks (random,
# so all new) and the map blobs.
print(len(d["maps"]), s["stats"]["bytes_new"] - d["data_bytes"])')
	read -r nmaps mapbytes <<<"$meta"
	snapobj=$(stat -c %s "$repo"/snapshots/*)
	printf '| %s | %s | %s GiB | %s MiB | %s | %s MiB | %s | %s (%s) | %s B |\n' "$LABEL" "$size" "$DATA_GIB" \
		"$(peak_rss_mib "$WORKDIR/backup.time")" "$(elapsed_s "$WORKDIR/backup.time")" \
		"$(peak_rss_mib "$WORKDIR/restore.time")" "$(elapsed_s "$WORKDIR/restore.time")" \
		"$nmaps" "$(numfmt --to=iec "$mapbytes")" "$snapobj"
	rm -rf "$img" "$repo" "$WORKDIR/out"
done
