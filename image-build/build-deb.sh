#!/usr/bin/env bash
# Builds the stallnet .deb for one architecture from binaries already built.
#
#   image-build/build-deb.sh ARCH BIN_DIR OUT_DIR
#
# ARCH is amd64 or arm64; BIN_DIR holds `stallnet` and `stallnet-tui` (for example
# target/release, or target/aarch64-unknown-linux-gnu/release from cross-build.sh). The
# package: the binaries (stripped), the systemd units, the sysctl, the default config
# (/usr/share/stallnet/stallnet.toml: the image installs it; a box installed from the
# .deb stays inert until a config is written), examples, the README; maintainer scripts
# create the user and group and purge cleanly. Prints the path of the .deb.
set -euo pipefail

arch=${1:?ARCH (amd64 or arm64)}
bindir=${2:?BIN_DIR}
out=${3:?OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

case "$arch" in
amd64) strip=strip ;;
arm64) strip=aarch64-linux-gnu-strip ;;
*) echo "build-deb: ARCH must be amd64 or arm64, not $arch" >&2; exit 2 ;;
esac
command -v "$strip" >/dev/null || { echo "build-deb: $strip not found (binutils)" >&2; exit 2; }
for b in stallnet stallnet-tui; do
    [ -x "$bindir/$b" ] || { echo "build-deb: $bindir/$b missing: build it first" >&2; exit 2; }
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n1)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"

install -d "$stage/DEBIAN"
for b in stallnet stallnet-tui; do
    install -D -m0755 "$bindir/$b" "$stage/usr/bin/$b"
    "$strip" --strip-unneeded "$stage/usr/bin/$b"
done
for u in "$root"/systemd/*.service; do
    install -D -m0644 "$u" "$stage/lib/systemd/system/$(basename "$u")"
done
install -D -m0644 "$root/systemd/60-stallnet.conf" "$stage/usr/lib/sysctl.d/60-stallnet.conf"
install -D -m0644 "$here/stallnet.toml" "$stage/usr/share/stallnet/stallnet.toml"
install -D -m0644 "$root/README.md" "$stage/usr/share/doc/stallnet/README.md"
install -D -m0644 "$root/docs/CONFIG.md" "$stage/usr/share/doc/stallnet/CONFIG.md"
for e in "$root"/docs/examples/*.toml; do
    install -D -m0644 "$e" "$stage/usr/share/doc/stallnet/examples/$(basename "$e")"
done
cat > "$stage/usr/share/doc/stallnet/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: stallnet
License: $(sed -n 's/^license = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n1)
COPY
for s in postinst prerm postrm; do
    install -m0755 "$here/debian/$s" "$stage/DEBIAN/$s"
done
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: stallnet
Version: $version
Architecture: $arch
Maintainer: stallnet developers <dev@stallnet.invalid>
Section: net
Priority: optional
Installed-Size: $size
Depends: libc6 (>= 2.36), libgcc-s1, adduser, nftables
Recommends: dnsmasq-base, chrony, wpasupplicant, modemmanager
Description: network box for market stalls: bonded uplinks, POS priority, offline sales
 stallnet bonds cellular, venue wifi and ethernet uplinks into one QUIC tunnel to a hub,
 puts card payments and live streams first, keeps tokens, carts and a durable sales
 outbox on the box so sales go on offline, and shows a dashboard on the screen.
 The same binary runs the hub (stallnet-hub.service) on a cloud machine.
CONTROL
mkdir -p "$out"
deb="$out/stallnet_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
