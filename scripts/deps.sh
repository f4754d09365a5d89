#!/usr/bin/env bash
# Installs what Kura needs on a Debian 12 machine: QEMU tools (the NBD data
# path for image formats), libvirt (live VM backup), debootstrap (test
# guests), aiosmtpd (a real SMTP server for the e-mail notification test),
# fuse3 (the scheduler benchmark's modelled datastore, bench/internal/slowfs),
# and the Go modules; with --s3 (make test) also the two S3 servers the S3
# backend is tested against (scripts/s3servers.sh: built once into
# ~/.cache/kura/s3, about 8 minutes on 2 cores the first time, which
# `make demo` need not wait for). Idempotent; quiet when all is present.
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin"
pkgs=(qemu-utils qemu-system-x86 qemu-block-extra libvirt-daemon-system libvirt-clients
      nbdkit libnbd-bin debootstrap e2fsprogs xfsprogs time
      dosfstools mtools ntfs-3g lvm2 fdisk gdisk
      python3-aiosmtpd fuse3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v go >/dev/null; then
  echo "deps: Go is not installed: install Go 1.26 or newer (https://go.dev/dl) into /usr/local/go" >&2
  exit 1
fi
cd "$(dirname "$0")/.."
go mod download
if [ "${1:-}" = "--s3" ]; then
  bash scripts/s3servers.sh
fi
