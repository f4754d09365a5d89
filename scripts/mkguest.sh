#!/usr/bin/env bash
# mkguest.sh — build (and cache) the small Debian guest that Kura's integration
# tests, demo and benchmarks boot under QEMU or libvirt (see internal/testvm).
#
#   scripts/mkguest.sh [OUT_DIR]
#   scripts/mkguest.sh --stamp      print the version stamp and exit
#
# OUT_DIR defaults to ${KURA_CACHE:-$HOME/.cache/kura}/guest and must lie outside
# the repository. It receives
#
#   vmlinuz      the guest kernel (Debian's linux-image-cloud-amd64)
#   initrd.img   its initramfs (MODULES=list: virtio-pci, virtio-blk, virtio-scsi,
#                sd_mod, ext4), enough to mount the root disk
#   root.qcow2   the root filesystem: ext4 without a partition table, 2 GiB
#                virtual; boot with "root=/dev/vda rw console=ttyS0"
#   VERSION      the stamp below; nothing is rebuilt while it matches
#
# The guest has
#   - an empty root password (log in on the serial console as root);
#   - qemu-guest-agent on the virtio-serial port org.qemu.guest_agent.0;
#   - the filesystems labelled kuradata, kuradata2, kuradata3 and kuradata4
#     mounted on /data, /data2, /data3 and /data4 when their disk appears (at
#     boot or hot-plugged; a udev rule starts the mount unit);
#   - fio, for the benchmarks' guest I/O latency measurements;
#   - /usr/local/bin/kura-workload (run it through guest-exec):
#       kura-workload write DIR N SEED   write N files of 1 MiB of random data
#                                        named wSEED-NNNNN.bin, record their
#                                        sha256 in DIR/MANIFEST.sha256, sync
#       kura-workload verify DIR         check DIR/MANIFEST.sha256: prints OK,
#                                        or the failures and exits 1
#       kura-workload waitmount DIR... [-t SECONDS]
#                                        wait until each DIR is a mount point
#
# It runs unattended as root and installs its own prerequisites with apt-get. A
# build takes 3 to 6 minutes on a two-core machine (debootstrap's package
# configuration dominates; the .debs are kept in $KURA_CACHE/debs for the next
# build). Builds of one OUT_DIR are serialised with flock. Environment:
#   KURA_MIRROR   Debian mirror (default: the first URIs of
#                 /etc/apt/sources.list.d/debian.sources, else deb.debian.org)
#   KURA_REBUILD  1 rebuilds even when VERSION matches
set -euo pipefail

# Bump when anything that ends up in the guest changes; internal/testvm reads it
# from here to decide whether the cached guest is current.
GUEST_VERSION=4
SUITE=bookworm
PACKAGES=systemd-sysv,udev,qemu-guest-agent,linux-image-cloud-amd64,e2fsprogs,xfsprogs,util-linux,kmod,procps,fio
ROOT_SIZE=2G
STAMP="kura-guest ${GUEST_VERSION} ${SUITE} ${PACKAGES} root=${ROOT_SIZE}"
if [ "${1:-}" = --stamp ]; then # what VERSION holds when the guest is current
	echo "$STAMP"
	exit 0
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
log() { printf '[mkguest %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

OUT_DIR=${1:-${KURA_CACHE:-$HOME/.cache/kura}/guest}
mkdir -p "$(dirname "$OUT_DIR")"
OUT_DIR=$(cd "$(dirname "$OUT_DIR")" && pwd)/$(basename "$OUT_DIR")
case "$OUT_DIR/" in
"$REPO"/*) die "OUT_DIR $OUT_DIR is inside the repository $REPO: guest images must not be committed; use a directory outside it (default \$HOME/.cache/kura/guest)" ;;
esac

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot and mkfs need it); try: sudo $0 $*"

current() {
	[ "${KURA_REBUILD:-0}" != 1 ] &&
		[ -s "$OUT_DIR/vmlinuz" ] && [ -s "$OUT_DIR/initrd.img" ] && [ -s "$OUT_DIR/root.qcow2" ] &&
		[ "$(cat "$OUT_DIR/VERSION" 2>/dev/null)" = "$STAMP" ]
}

if current; then
	log "guest in $OUT_DIR is current ($STAMP)"
	exit 0
fi

# Prerequisites, installed only when missing.
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs) # internal/testvm formats xfs data disks on the host
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v flock >/dev/null || need+=(util-linux)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ ${#need[@]} -gt 0 ]; then
	log "installing prerequisites: ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# One build at a time per OUT_DIR (parallel test packages may all ask for it).
exec 9>"$OUT_DIR.lock"
log "waiting for lock $OUT_DIR.lock"
flock 9
if current; then
	log "guest in $OUT_DIR was built meanwhile ($STAMP)"
	exit 0
fi

MIRROR=${KURA_MIRROR:-}
if [ -z "$MIRROR" ] && [ -r /etc/apt/sources.list.d/debian.sources ]; then
	MIRROR=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}

WORK=$(mktemp -d "$OUT_DIR.build.XXXXXX")
STAGE=$WORK/root
cleanup() {
	local m
	# debootstrap mounts proc/sys inside the target; never leave them behind.
	awk -v s="$STAGE" 'index($2, s) == 1 { print $2 }' /proc/self/mounts | sort -r |
		while read -r m; do umount -l "$m" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

# A small initramfs, built once: only the drivers that find a virtio root disk.
# The files are in place before debootstrap installs initramfs-tools, and
# INITRD=No stops the kernel's postinst hook from building a first one with
# MODULES=most (each build takes close to a minute where exec is slow).
mkdir -p "$STAGE/etc/initramfs-tools/conf.d" "$STAGE/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\n' >"$STAGE/etc/initramfs-tools/conf.d/kura.conf"
printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod crc32c_generic ext4 \
	>"$STAGE/usr/share/initramfs-tools/modules.d/kura"

t0=$SECONDS
DEBS=${KURA_CACHE:-$HOME/.cache/kura}/debs
mkdir -p "$DEBS"
log "debootstrap $SUITE from $MIRROR into $STAGE (packages cached in $DEBS; 3 to 5 minutes)"
INITRD=No debootstrap --variant=minbase --cache-dir="$DEBS" --include="$PACKAGES" \
	"$SUITE" "$STAGE" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
	{ tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above); check that $MIRROR is reachable"; }
log "debootstrap done in $((SECONDS - t0)) s"
if ! compgen -G "$STAGE/boot/initrd.img-*" >/dev/null; then
	kver=$(basename "$(find "$STAGE/lib/modules" -mindepth 1 -maxdepth 1 | sort | tail -n 1)")
	log "building the initramfs for $kver"
	chroot "$STAGE" update-initramfs -c -k "$kver" >&2
fi

log "configuring the guest"
echo kura-guest >"$STAGE/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tkura-guest\n' >"$STAGE/etc/hosts"
# A fixed machine-id: an empty one would make systemd treat every boot as the
# first (preset-all, systemd-firstboot prompts on the console).
echo 6b7572612d67756573742d6d61636869 >"$STAGE/etc/machine-id"
chroot "$STAGE" passwd -d root >/dev/null

cat >"$STAGE/etc/fstab" <<'EOF'
# Root is the whole virtio-blk disk vda (no partition table), mounted rw by
# the kernel command line. Data disks are mounted by udev, see below.
/dev/vda  /  ext4  rw,errors=remount-ro  0 0
EOF
# Data filesystems are mounted by label, on any bus, when udev sees them (at
# boot or hot-plugged): a udev rule pulls in the mount unit. Nothing waits for
# a disk that is not there (an fstab entry with nofail would still hold a
# device job for 90 s, and a shorter timeout fires too early under TCG).
: >"$STAGE/etc/udev/rules.d/90-kura-data.rules"
for n in "" 2 3 4; do
	mkdir -p "$STAGE/data$n"
	cat >"$STAGE/etc/systemd/system/data$n.mount" <<EOF
[Unit]
Description=Kura test data filesystem (label kuradata$n)
[Mount]
What=/dev/disk/by-label/kuradata$n
Where=/data$n
Options=defaults
EOF
	printf 'SUBSYSTEM=="block", ENV{ID_FS_LABEL}=="kuradata%s", TAG+="systemd", ENV{SYSTEMD_WANTS}+="data%s.mount"\n' "$n" "$n" \
		>>"$STAGE/etc/udev/rules.d/90-kura-data.rules"
done

# The guest agent on the virtio-serial channel org.qemu.guest_agent.0. It
# starts as soon as the local filesystems are and its port appears, without
# waiting for sysinit.target (journald, tmpfiles, …): seconds sooner under TCG.
# Data filesystems may still be mounting then (internal/testvm waits for them).
mkdir -p "$STAGE/etc/systemd/system/qemu-guest-agent.service.d"
cat >"$STAGE/etc/systemd/system/qemu-guest-agent.service.d/kura.conf" <<'EOF'
[Unit]
DefaultDependencies=no
After=local-fs.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart=
ExecStart=/usr/sbin/qemu-ga --method=virtio-serial --path=/dev/virtio-ports/org.qemu.guest_agent.0
Restart=always
RestartSec=1
EOF
mkdir -p "$STAGE/etc/systemd/system/multi-user.target.wants"
ln -sf /lib/systemd/system/qemu-guest-agent.service \
	"$STAGE/etc/systemd/system/multi-user.target.wants/qemu-guest-agent.service"

# Nothing periodic may run behind a test's back, and nothing that is not needed
# runs at boot: under TCG every unit costs a second or two. Every boot of a test
# guest is its first (a fresh overlay), so the "after an update" units go too.
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
	e2scrub_reap.service fstrim.timer xfs_scrub_all.timer systemd-firstboot.service \
	systemd-timesyncd.service man-db.timer logrotate.timer systemd-tmpfiles-clean.timer \
	getty-static.service systemd-random-seed.service systemd-binfmt.service \
	proc-sys-fs-binfmt_misc.automount dev-hugepages.mount dev-mqueue.mount \
	sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
	modprobe@fuse.service modprobe@dm_mod.service modprobe@loop.service modprobe@configfs.service \
	modprobe@efi_pstore.service modprobe@drm.service \
	ldconfig.service systemd-hwdb-update.service systemd-journal-catalog-update.service \
	systemd-update-done.service systemd-sysusers.service systemd-pstore.service \
	systemd-update-utmp.service systemd-update-utmp-runlevel.service; do
	ln -sf /dev/null "$STAGE/etc/systemd/system/$u"
done
# Generators for what this guest does not have (GPT auto-mounts, LUKS, verity,
# hibernation, SysV scripts, rc.local, …): each costs time at every boot.
mkdir -p "$STAGE/etc/systemd/system-generators"
for gen in systemd-gpt-auto-generator systemd-bless-boot-generator systemd-cryptsetup-generator \
	systemd-hibernate-resume-generator systemd-veritysetup-generator systemd-integritysetup-generator \
	systemd-system-update-generator systemd-sysv-generator systemd-rc-local-generator; do
	ln -sf /dev/null "$STAGE/etc/systemd/system-generators/$gen"
done
# Drivers for hardware a test guest never uses (qemu64 advertises SVM, so kvm_amd
# would load; the i440fx IDE controller has no disks).
printf 'blacklist %s\n' kvm kvm_amd kvm_intel irqbypass powernow_k8 acpi_cpufreq ata_piix ata_generic \
	pata_acpi libata serio_raw pcspkr floppy >"$STAGE/etc/modprobe.d/kura-blacklist.conf"
# Journal in memory only: keeps the root overlay small and boots faster.
mkdir -p "$STAGE/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' >"$STAGE/etc/systemd/journald.conf.d/kura.conf"

cat >"$STAGE/usr/local/bin/kura-workload" <<'EOF'
#!/bin/sh
# kura-workload — known data in a guest filesystem, for Kura's tests.
#   kura-workload write DIR N SEED   N files of 1 MiB random data (wSEED-NNNNN.bin),
#                                    sha256 recorded in DIR/MANIFEST.sha256, synced
#   kura-workload verify DIR         check DIR/MANIFEST.sha256; print OK or failures
#   kura-workload waitmount DIR... [-t SECONDS]  wait until each DIR is mounted
set -eu
usage() { echo "usage: kura-workload write DIR N SEED | verify DIR | waitmount DIR... [-t SECONDS]" >&2; exit 2; }
[ $# -ge 1 ] || usage
cmd=$1; shift
case "$cmd" in
write)
	[ $# -eq 3 ] || usage
	dir=$1 n=$2 seed=$3
	mkdir -p "$dir"
	cd "$dir"
	new=$(mktemp .new.XXXXXX)
	i=1
	while [ "$i" -le "$n" ]; do
		f=$(printf 'w%s-%05d.bin' "$seed" "$i")
		head -c 1048576 /dev/urandom >".$f.tmp"
		mv -f ".$f.tmp" "$f"
		echo "$f" >>"$new"
		i=$((i + 1))
	done
	# Keep the manifest lines of files not rewritten now, add the new ones.
	touch MANIFEST.sha256
	{
		awk 'NR == FNR { w[$1] = 1; next } !(($2 in w) || (substr($2, 2) in w))' "$new" MANIFEST.sha256
		[ ! -s "$new" ] || xargs sha256sum <"$new"
	} | sort -k 2 >.MANIFEST.tmp
	mv -f .MANIFEST.tmp MANIFEST.sha256
	rm -f "$new"
	sync -f . 2>/dev/null || sync
	echo "wrote $n files to $dir"
	;;
verify)
	[ $# -eq 1 ] || usage
	cd "$1"
	[ -s MANIFEST.sha256 ] || { echo "FAIL: $1/MANIFEST.sha256 missing or empty"; exit 1; }
	if out=$(sha256sum --quiet -c MANIFEST.sha256 2>&1); then
		echo "OK $(wc -l <MANIFEST.sha256) files"
	else
		printf '%s\n' "$out"
		exit 1
	fi
	;;
waitmount)
	t=60 dirs=""
	while [ $# -gt 0 ]; do
		case "$1" in
		-t) t=$2; shift 2 ;;
		*) dirs="$dirs $1"; shift ;;
		esac
	done
	end=$(($(date +%s) + t))
	for d in $dirs; do
		until mountpoint -q "$d"; do
			if [ "$(date +%s)" -ge "$end" ]; then echo "FAIL: $d not mounted after ${t}s" >&2; exit 1; fi
			sleep 0.1
		done
	done
	echo OK
	;;
*) usage ;;
esac
EOF
chmod 0755 "$STAGE/usr/local/bin/kura-workload"

log "trimming (docs, locales, apt caches)"
rm -rf "$STAGE"/usr/share/doc/* "$STAGE"/usr/share/man/* "$STAGE"/usr/share/info/* \
	"$STAGE"/var/cache/apt/*.bin "$STAGE"/var/cache/apt/archives/*.deb "$STAGE"/var/lib/apt/lists/* \
	"$STAGE"/var/log/*.log "$STAGE"/var/cache/debconf/*-old
find "$STAGE/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +

NEW=$WORK/out
mkdir -p "$NEW"
kernel=$(find "$STAGE/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n 1)
initrd=$(find "$STAGE/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -n 1)
[ -n "$kernel" ] || die "no kernel in $STAGE/boot: did linux-image-cloud-amd64 install?"
[ -n "$initrd" ] || die "no initrd in $STAGE/boot: did initramfs-tools run?"
log "kernel $(basename "$kernel"), initrd $(basename "$initrd")"
install -m 0644 "$kernel" "$NEW/vmlinuz"
install -m 0644 "$initrd" "$NEW/initrd.img"

log "making the root filesystem ($ROOT_SIZE ext4, from $(du -sh "$STAGE" | cut -f1) of files)"
mkfs.ext4 -q -F -L kuraroot -d "$STAGE" "$WORK/root.img" "$ROOT_SIZE" >/dev/null
qemu-img convert -f raw -O qcow2 "$WORK/root.img" "$NEW/root.qcow2"
rm -f "$WORK/root.img"
echo "$STAMP" >"$NEW/VERSION"

# Swap the new outputs in; a running guest keeps its open (unlinked) backing file.
if [ -e "$OUT_DIR" ] && [ -n "$(ls -A "$OUT_DIR")" ] && ! grep -qs '^kura-guest ' "$OUT_DIR/VERSION"; then
	die "$OUT_DIR exists, is not empty and holds no earlier guest (no VERSION): refusing to replace it; choose another OUT_DIR"
fi
rm -rf "$OUT_DIR.old"
[ ! -e "$OUT_DIR" ] || mv "$OUT_DIR" "$OUT_DIR.old"
mv "$NEW" "$OUT_DIR"
rm -rf "$OUT_DIR.old"
log "done in $((SECONDS - t0)) s: $(cd "$OUT_DIR" && du -h vmlinuz initrd.img root.qcow2 | tr '\t\n' ': ')"
