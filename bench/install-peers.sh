#!/usr/bin/env bash
# install-peers.sh — install the peer backup tools the benchmark compares
# Kura against, plus the system tools the benchmark uses. Idempotent: every
# step is skipped when its result is already there.
#
#   restic 0.18.0   go install github.com/restic/restic/cmd/restic@v0.18.0
#   kopia  0.21.1   built from a scratch module requiring github.com/kopia/kopia v0.21.1
#                   (kopia's go.mod has replace directives, so `go install ...@v0.21.1`
#                   is refused; a scratch main module works around that)
#   borg   1.2.x    Debian's borgbackup package
#   virtnbdbackup   Debian's virtnbdbackup package (live-VM benchmark, bench/vm.sh)
#   qemu-utils, e2fsprogs, time (/usr/bin/time -v for peak RSS), python3
#
#   install-peers.sh          everything
#   install-peers.sh --vm     only what bench/vm.sh needs (virtnbdbackup and the
#                             system tools; no restic, kopia or borg)
#
# Everything built here lives OUTSIDE the repository, under
#   ${KURA_CACHE:-$HOME/.cache/kura}/bench/bin
# Nothing from the peers is copied into the repository.
#
# Env: KURA_CACHE (cache root), RESTIC_VERSION, KOPIA_VERSION,
#      BENCH_SKIP_APT=1 (do not touch apt; fail later if a tool is missing).
set -euo pipefail

RESTIC_VERSION=${RESTIC_VERSION:-v0.18.0}
KOPIA_VERSION=${KOPIA_VERSION:-v0.21.1}
CACHE=${KURA_CACHE:-$HOME/.cache/kura}/bench
BIN=$CACHE/bin
mkdir -p "$BIN"

log() { printf '[install-peers %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ONLY_VM=0
case "${1:-}" in
--vm) ONLY_VM=1 ;;
"") ;;
*) die "unknown argument '$1' (use --vm, or nothing)" ;;
esac

command -v go >/dev/null || { [ -x /usr/local/go/bin/go ] && export PATH=/usr/local/go/bin:$PATH; }
command -v go >/dev/null || die "go not found (expected /usr/local/go/bin/go)"

# --- apt packages --------------------------------------------------------
apt_updated=0
apt_need() { # apt_need PACKAGE PROBE-COMMAND...
	local pkg=$1; shift
	if "$@" >/dev/null 2>&1; then return 0; fi
	[ "${BENCH_SKIP_APT:-0}" = 1 ] && die "$pkg missing and BENCH_SKIP_APT=1"
	local sudo=
	[ "$(id -u)" = 0 ] || sudo=sudo
	if [ $apt_updated = 0 ]; then
		log "apt-get update"
		$sudo apt-get update -qq
		apt_updated=1
	fi
	log "apt-get install $pkg"
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$pkg" >/dev/null
	"$@" >/dev/null 2>&1 || die "$pkg installed but probe '$*' still fails"
}
apt_need qemu-utils  qemu-img --version
apt_need e2fsprogs   mkfs.ext4 -V
apt_need time        test -x /usr/bin/time
apt_need python3     python3 --version
apt_need virtnbdbackup virtnbdbackup -V
log "virtnbdbackup: $(virtnbdbackup -V 2>&1 | head -1)"
if [ "$ONLY_VM" = 1 ]; then
	apt_need e2fsprogs debugfs -V # restore checks of bench/vm.sh
	log "peers for bench/vm.sh ready"
	exit 0
fi
apt_need borgbackup  borg --version
log "borg: $(borg --version)"

# --- restic ----------------------------------------------------------------
want_restic=${RESTIC_VERSION#v}
if [ -x "$BIN/restic" ] && "$BIN/restic" version 2>/dev/null | grep -q "restic $want_restic "; then
	log "restic $want_restic already installed"
else
	log "building restic $RESTIC_VERSION (go install)"
	GOBIN=$BIN GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
		go install "github.com/restic/restic/cmd/restic@$RESTIC_VERSION"
fi
log "restic: $("$BIN/restic" version)"

# --- kopia -----------------------------------------------------------------
want_kopia=${KOPIA_VERSION#v}
kopia_ok() {
	[ -x "$BIN/kopia" ] && [ -f "$BIN/kopia.version" ] && [ "$(cat "$BIN/kopia.version")" = "$KOPIA_VERSION" ]
}
if kopia_ok; then
	log "kopia $want_kopia already installed"
else
	mod=$CACHE/kopia-build
	mkdir -p "$mod"
	log "building kopia $KOPIA_VERSION from scratch module $mod"
	cat >"$mod/go.mod" <<-EOF
	module kurabench/kopiabuild

	go 1.24
	EOF
	# A tools.go-style import makes `go mod tidy` keep kopia's dependencies.
	cat >"$mod/tools.go" <<-EOF
	//go:build tools

	package tools

	import _ "github.com/kopia/kopia"
	EOF
	(
		cd "$mod"
		export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
		go get "github.com/kopia/kopia@$KOPIA_VERSION"
		go mod tidy
		# kopia's version string is normally set by its Makefile through ldflags.
		GOBIN=$BIN CGO_ENABLED=0 go install \
			-ldflags "-X github.com/kopia/kopia/repo.BuildVersion=$want_kopia -X github.com/kopia/kopia/repo.BuildInfo=kura-bench" \
			github.com/kopia/kopia
	)
	echo "$KOPIA_VERSION" >"$BIN/kopia.version"
fi
log "kopia: $("$BIN/kopia" --version 2>&1 | head -1)"

log "peers ready in $BIN"
echo "$BIN"
