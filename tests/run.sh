#!/usr/bin/env bash
# The whole test suite: installs what it lacks (Debian packages), builds every binary,
# then runs unit, simulator and end-to-end tests. Needs root (network namespaces, TUN).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "tests/run.sh: the end-to-end tests need root (network namespaces, TUN devices)" >&2
  exit 1
fi

need=()
command -v nft >/dev/null || need+=(nftables)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ethtool >/dev/null || need+=(ethtool)
command -v conntrack >/dev/null || need+=(conntrack)
command -v ping >/dev/null || need+=(iputils-ping)
command -v ip >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v nats-server >/dev/null || need+=(nats-server)
command -v curl >/dev/null || need+=(curl)
command -v tmux >/dev/null || need+=(tmux)
command -v busybox >/dev/null || need+=(busybox)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v strip >/dev/null || need+=(binutils)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
modprobe tun 2>/dev/null || true
[ -c /dev/net/tun ] || { echo "tests/run.sh: /dev/net/tun is missing" >&2; exit 1; }

cargo build --workspace --bins
# End-to-end tests each build a topology of ~10 namespaces; two at a time fit 2 cores.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast -- --test-threads 2 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
