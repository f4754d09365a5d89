#!/usr/bin/env bash
# Kura demo: builds a small guest disk, backs it up, changes it, backs it up
# again, restores it and checks the restored disk is identical. Everything
# lives in a temporary directory that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
KURA=${KURA:-$PWD/bin/kura}
work=$(mktemp -d /tmp/kura-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export KURA_REPO="$work/repo" KURA_PASSWORD="demo-password"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building a guest disk: ext4 filesystem with real files, 2 GiB virtual, as qcow2"
mkdir -p "$work/fs"
cp -a /usr/share/doc /usr/share/perl "$work/fs/" 2>/dev/null || true
cp -a /usr/lib/x86_64-linux-gnu/perl* "$work/fs/" 2>/dev/null || true
truncate -s 2G "$work/disk.raw"
mkfs.ext4 -q -F -d "$work/fs" "$work/disk.raw"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/vm1-disk0.qcow2"
rm -f "$work/disk.raw"
qemu-img info "$work/vm1-disk0.qcow2" | grep -E 'virtual size|disk size'

step "kura init"
$KURA init

step "kura backup image vm1-disk0.qcow2 --name vm1   (first, full)"
$KURA backup image "$work/vm1-disk0.qcow2" --name vm1

step "changing the disk: 64 MiB of new data in 16 places"
for i in $(seq 0 15); do
  qemu-io -f qcow2 -c "write -P $((i + 17)) $((i * 97 + 300))M 4M" "$work/vm1-disk0.qcow2" >/dev/null
done
echo "done"

step "kura backup image vm1-disk0.qcow2 --name vm1   (second: unchanged chunks are reused)"
$KURA backup image "$work/vm1-disk0.qcow2" --name vm1

step "kura snapshots"
$KURA snapshots

step "kura restore vm1@latest --to restore/ --format qcow2"
$KURA restore vm1@latest --to "$work/restore" --format qcow2

step "checking the restored disk against the original"
qemu-img compare "$work/vm1-disk0.qcow2" "$work/restore/vm1-disk0.qcow2"

step "kura verify --read-data"
$KURA verify --read-data

step "kura stats"
$KURA stats
printf '\n\033[1mdemo finished: backed up, changed, backed up again, restored and verified\033[0m\n'
