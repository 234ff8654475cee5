#!/usr/bin/env bash
# Checks the unit files: `systemd-analyze verify` must print nothing, and the exposure
# score of `systemd-analyze security --offline=yes` must stay under each unit's target
# (edge daemon <= 3.0, hub <= 3.0, dashboard and clock lower than the edge).
#
#   systemd/check.sh BIN_DIR
#
# verify insists that ExecStart's program exists, so the units are checked as copies that
# point into BIN_DIR (the .deb test checks that the binaries land in /usr/bin). Prints the
# scores; exit 0 only if all is well.
set -euo pipefail

bindir=$(realpath "${1:?BIN_DIR (holding stallnet and stallnet-tui)}")
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for u in "$here"/*.service; do
    sed "s#/usr/bin/#$bindir/#g" "$u" > "$work/$(basename "$u")"
done
cp "$work/stallnet-tui@.service" "$work/stallnet-tui@tty1.service"
cd "$work"
fail=0
out=$(systemd-analyze verify ./stallnet.service ./stallnet-hub.service \
    ./stallnet-tui@.service ./stallnet-clock.service 2>&1) || fail=1
if [ -n "$out" ] || [ $fail = 1 ]; then
    echo "FAIL systemd-analyze verify:"
    echo "$out"
    fail=1
else
    echo "ok   systemd-analyze verify: clean"
fi
score() {
    systemd-analyze security --offline=yes "./$1" 2>&1 |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p'
}
edge=$(score stallnet.service)
for pair in "stallnet.service 3.0" "stallnet-hub.service 3.0" \
    "stallnet-tui@tty1.service $edge" "stallnet-clock.service $edge"; do
    set -- $pair
    s=$(score "$1")
    if [ -n "$s" ] && awk -v s="$s" -v max="$2" 'BEGIN { exit !(s <= max) }'; then
        echo "ok   $1 exposure $s (target <= $2)"
    else
        echo "FAIL $1 exposure ${s:-?} (target <= $2)"
        fail=1
    fi
done
exit $fail
