#!/usr/bin/env bash
# Installs and purges a stallnet .deb in a fresh Debian bookworm chroot and checks what
# it leaves: after install the binaries run, the units and sysctl are in place, the
# user and group exist, the daemon and clock units are enabled, /etc/stallnet belongs to
# group stallnet; after purge not one file, user, group or unit link of stallnet is left.
#
#   image-build/test-deb.sh DEB
#
# The chroot is built with mmdebstrap (minbase + adduser, nftables, init-system-helpers)
# and cached as a tarball in $STALLNET_CHROOT_CACHE (default: target/ci-cache in the
# checkout, so a fresh clone builds its own and nothing outside the repository is used).
# Needs root. Exit status 0 only if every check passed.
set -euo pipefail

deb=$(realpath "${1:?DEB}")
cache=${STALLNET_CHROOT_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/target/ci-cache}
tarball="$cache/bookworm-$(dpkg --print-architecture).tar"
[ "$(id -u)" = 0 ] || { echo "test-deb: needs root (chroot)" >&2; exit 2; }
command -v mmdebstrap >/dev/null || { echo "test-deb: mmdebstrap missing (apt-get install mmdebstrap)" >&2; exit 2; }

if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    # --format=tar: mmdebstrap otherwise picks the format from the name's extension, and
    # a temporary name without ".tar" would give a directory.
    rm -rf "$tarball.tmp"
    mmdebstrap --quiet --format=tar --variant=minbase --include=adduser,nftables,init-system-helpers \
        bookworm "$tarball.tmp" http://deb.debian.org/debian
    tar -tf "$tarball.tmp" >/dev/null
    mv "$tarball.tmp" "$tarball"
fi
root=$(mktemp -d)
cleanup() {
    for m in proc dev; do umount -l "$root/$m" 2>/dev/null || true; done
    rm -rf "$root"
}
trap cleanup EXIT
tar -C "$root" -xf "$tarball"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
cp "$deb" "$root/tmp/stallnet.deb"

fail=0
check() {
    local what=$1; shift
    if "$@" >/dev/null 2>&1; then
        echo "ok   $what"
    else
        echo "FAIL $what"
        fail=1
    fi
}
inroot() { chroot "$root" "$@"; }

before=$(cd "$root" && find . -xdev \( -path ./proc -o -path ./dev -o -path ./tmp -o -path ./var/cache -o -path ./var/log \) -prune -o -print | sort)

check "installs (dpkg -i)" inroot dpkg -i /tmp/stallnet.deb
check "stallnet runs" inroot /usr/bin/stallnet --version
check "stallnet-tui runs" inroot /usr/bin/stallnet-tui --help
check "default config is valid" inroot /usr/bin/stallnet config validate /usr/share/stallnet/stallnet.toml
check "user stallnet exists" inroot getent passwd stallnet
check "group stallnet exists" inroot getent group stallnet
check "user has no login shell" sh -c "chroot '$root' getent passwd stallnet | grep -q ':/usr/sbin/nologin$'"
check "edge unit installed" test -f "$root/lib/systemd/system/stallnet.service"
check "hub unit installed" test -f "$root/lib/systemd/system/stallnet-hub.service"
check "dashboard unit installed" test -f "$root/lib/systemd/system/stallnet-tui@.service"
check "clock unit installed" test -f "$root/lib/systemd/system/stallnet-clock.service"
check "edge daemon enabled" test -L "$root/etc/systemd/system/multi-user.target.wants/stallnet.service"
check "clock restore enabled" test -L "$root/etc/systemd/system/sysinit.target.wants/stallnet-clock.service"
check "hub not enabled" test ! -e "$root/etc/systemd/system/multi-user.target.wants/stallnet-hub.service"
check "sysctl for forwarding" grep -q "net.ipv4.ip_forward = 1" "$root/usr/lib/sysctl.d/60-stallnet.conf"
check "/etc/stallnet is root:stallnet 0770" sh -c "[ \"\$(chroot '$root' stat -c '%U:%G %a' /etc/stallnet)\" = 'root:stallnet 770' ]"
check "no config written (inert until configured)" test ! -e "$root/etc/stallnet/stallnet.toml"
check "reinstall (upgrade path) works" inroot dpkg -i /tmp/stallnet.deb
# What the daemon would have created, to be purged too.
inroot sh -c 'echo key > /var/lib/stallnet/device.key; echo x > /etc/stallnet/stallnet.toml'
check "purges (dpkg --purge)" inroot dpkg --purge stallnet
check "user removed" sh -c "! chroot '$root' getent passwd stallnet"
check "group removed" sh -c "! chroot '$root' getent group stallnet"
after=$(cd "$root" && find . -xdev \( -path ./proc -o -path ./dev -o -path ./tmp -o -path ./var/cache -o -path ./var/log \) -prune -o -print | sort)
# Not ours: dpkg's database, the backups shadow-utils keep of the account files, and
# adduser's lock directory.
left=$(comm -13 <(echo "$before") <(echo "$after") | grep -v -e '^./var/lib/dpkg/' \
    -e '^./var/lib/systemd/deb-systemd-helper' -e '^./etc/g\?shadow-$' \
    -e '^./etc/passwd-$' -e '^./etc/group-$' -e '^./run/adduser$' || true)
if [ -z "$left" ]; then
    echo "ok   nothing left after purge"
else
    echo "FAIL left after purge:"
    echo "$left" | sed 's/^/       /'
    fail=1
fi
exit $fail
