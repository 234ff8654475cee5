#!/usr/bin/env bash
# Builds the stallnet SD-card image for the Raspberry Pi 3, 4, 5 and Zero 2 W (arm64)
# from Debian bookworm with the arm64 .deb installed:
#
#   image-build/build-image.sh [--deb DEB] [--out DIR] [--snapshot YYYYMMDDTHHMMSSZ]
#
# Without --deb, the arm64 binaries are cross-compiled (cross-build.sh) and packaged
# (build-deb.sh) first. The output directory (default target/image) receives:
#   stallnet-arm64.img        the card image (write it with dd or Raspberry Pi Imager)
#   vmlinuz, initrd.img       the image's kernel and initrd (for smoke-test.sh)
#   packages.tsv              every package in the image: name, version, architecture
#   package-checksums.txt     SHA-256 of every .deb that went in
#   stallnet-arm64.img.sha256 and build.txt (mirror, date, time taken, sizes)
#
# Reproducibility: packages come from the Debian snapshot of --snapshot (default below)
# when snapshot.debian.org answers, else from deb.debian.org (build.txt says which);
# SOURCE_DATE_EPOCH is fixed to the snapshot date; the lists above record what went in.
#
# Needs root, mmdebstrap, qemu-user-static with binfmt_misc, dosfstools, mtools,
# e2fsprogs and fdisk (`--install-deps` installs them).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
deb=""
out="$root/target/image"
snapshot=20251115T000000Z
install_deps=no
while [ $# -gt 0 ]; do
    case "$1" in
    --deb) deb=$(realpath "$2"); shift 2 ;;
    --out) out=$2; shift 2 ;;
    --snapshot) snapshot=$2; shift 2 ;;
    --install-deps) install_deps=yes; shift ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "build-image: needs root" >&2; exit 2; }
if [ $install_deps = yes ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        mmdebstrap qemu-user-static binfmt-support arch-test dosfstools mtools e2fsprogs fdisk
fi
started=$(date +%s)
mkdir -p "$out"
out=$(realpath "$out")

# arm64 programs run under qemu-user while packages are configured.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
arch-test arm64 >/dev/null || { echo "build-image: cannot run arm64 programs (qemu-user-static, binfmt_misc)" >&2; exit 2; }

if [ -z "$deb" ]; then
    "$here/cross-build.sh"
    deb=$("$here/build-deb.sh" arm64 "$root/target/cross/aarch64-unknown-linux-gnu/release" "$out")
fi
[ "$(dpkg-deb -f "$deb" Architecture)" = arm64 ] || { echo "build-image: $deb is not arm64" >&2; exit 2; }

epoch=$(date -u -d "$(echo "$snapshot" | sed -E 's/^(....)(..)(..)T(..)(..)(..)Z$/\1-\2-\3 \4:\5:\6/')" +%s)
export SOURCE_DATE_EPOCH=$epoch
mirror="http://snapshot.debian.org/archive/debian/$snapshot"
if ! curl -sfI --max-time 15 "$mirror/dists/bookworm/Release" >/dev/null; then
    echo "build-image: snapshot.debian.org does not answer: using deb.debian.org (recorded)" >&2
    mirror="http://deb.debian.org/debian"
fi

work=$(mktemp -d)
fw="$work/firmware"
rootfs="$work/root"
mkdir -p "$fw" "$rootfs"
cleanup() {
    umount "$rootfs/boot/firmware" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
packages=$(grep -v -e '^#' -e '^$' "$here/packages.txt" | paste -sd, -)

# The firmware partition's contents are written by raspi-firmware's kernel hook, which
# insists on /boot/firmware being a mount point: a bind mount of $fw stands in for it.
mmdebstrap --mode=root --variant=minbase --architectures=arm64 \
    --components="main non-free-firmware" \
    --include="$packages" \
    --setup-hook="mkdir -p \"\$1/boot/firmware\" && mount --bind '$fw' \"\$1/boot/firmware\"" \
    --essential-hook="cp -a '$here/rootfs/etc/default/raspi-extra-cmdline' \"\$1/etc/default/\"" \
    --customize-hook="copy-in '$deb' /tmp" \
    --customize-hook="chroot \"\$1\" dpkg -i /tmp/$(basename "$deb")" \
    --customize-hook="cp -a '$here/rootfs/.' \"\$1/\"" \
    --customize-hook="install -m 0640 '$here/stallnet.toml' \"\$1/etc/stallnet/stallnet.toml\" && chroot \"\$1\" chgrp stallnet /etc/stallnet/stallnet.toml" \
    --customize-hook="chroot \"\$1\" systemctl enable stallnet-firstboot.service stallnet-tui@tty1.service systemd-networkd.service" \
    --customize-hook="chroot \"\$1\" systemctl mask systemd-timesyncd.service 2>/dev/null || true" \
    --customize-hook="printf 'nameserver 1.1.1.1\nnameserver 9.9.9.9\n' > \"\$1/etc/resolv.conf\"" \
    --customize-hook="echo stall > \"\$1/etc/hostname\"" \
    --customize-hook="rm -f \"\$1\"/etc/ssh/ssh_host_* && : > \"\$1/etc/machine-id\"" \
    --customize-hook="for k in \"\$1\"/boot/vmlinuz-*; do chroot \"\$1\" /etc/kernel/postinst.d/z50-raspi-firmware \"\${k#\$1/boot/vmlinuz-}\"; done" \
    --customize-hook="chroot \"\$1\" dpkg-query -W -f='\${Package}\t\${Version}\t\${Architecture}\n' > '$out/packages.tsv'" \
    --customize-hook="(cd \"\$1/var/cache/apt/archives\" && sha256sum *.deb) > '$out/package-checksums.txt'; sha256sum '$deb' | sed 's#  .*/#  #' >> '$out/package-checksums.txt'" \
    --customize-hook="cp -L \"\$1\"/boot/vmlinuz-* '$out/vmlinuz' && cp -L \"\$1\"/boot/initrd.img-* '$out/initrd.img'" \
    --customize-hook="umount \"\$1/boot/firmware\"" \
    --skip=cleanup/apt/cache \
    bookworm "$rootfs" "$mirror"
rm -rf "$rootfs/var/cache/apt/archives/"*.deb

# Partitions: FAT32 firmware (256 MiB, label RASPIFIRM) and ext4 root (label RASPIROOT)
# with 25 % room to grow (the Pi's card is larger; grow it with resize2fs if needed).
fat_mb=256
root_mb=$(( $(du -sm "$rootfs" | cut -f1) * 5 / 4 + 200 ))
fat="$work/fat.img"
ext="$work/root.img"
mkfs.vfat -n RASPIFIRM -C "$fat" $((fat_mb * 1024)) >/dev/null
mcopy -s -i "$fat" "$fw"/* ::/
mkfs.ext4 -q -L RASPIROOT -E root_owner=0:0 -d "$rootfs" "$ext" "${root_mb}M"
img="$out/stallnet-arm64.img"
start=8192 # 4 MiB, sectors of 512 bytes
fat_sectors=$((fat_mb * 2048))
root_start=$((start + fat_sectors))
root_sectors=$((root_mb * 2048))
rm -f "$img"
truncate -s $(( (root_start + root_sectors) * 512 )) "$img"
printf 'label: dos\nstart=%d, size=%d, type=c, bootable\nstart=%d, size=%d, type=83\n' \
    $start $fat_sectors $root_start $root_sectors | sfdisk -q "$img"
dd if="$fat" of="$img" bs=512 seek=$start conv=notrunc status=none
dd if="$ext" of="$img" bs=512 seek=$root_start conv=notrunc status=none
(cd "$out" && sha256sum "$(basename "$img")" > "$(basename "$img").sha256")

took=$(( $(date +%s) - started ))
{
    echo "built: $(date -u +%FT%TZ) in ${took} s on $(nproc) cores"
    echo "mirror: $mirror"
    echo "SOURCE_DATE_EPOCH: $epoch ($snapshot)"
    echo "stallnet package: $(basename "$deb")"
    echo "image: $(basename "$img") $(du -h --apparent-size "$img" | cut -f1) (firmware ${fat_mb} MiB, root ${root_mb} MiB)"
    echo "packages: $(wc -l < "$out/packages.tsv")"
} | tee "$out/build.txt"
