#!/usr/bin/env bash
# The lab: builds everything and runs edge + hub over two emulated uplinks (wifi, cell)
# with a POS-like and a stream-like traffic source, and opens the dashboard (q quits and
# tears it all down; without a terminal, or with --no-dashboard, it prints the edge's
# state every second until Ctrl-C). Needs root.
#
#   ./tests/lab.sh                          start the lab (in one terminal)
#   ./tests/lab.sh cli uplinks              any stallnet command against the lab's edge
#   ./tests/lab.sh fault blackhole wifi on  silent black hole on wifi (off to clear)
#   ./tests/lab.sh fault carrier cell down  carrier loss on cell (up to restore)
#   ./tests/lab.sh fault shape wifi delay_ms=80 loss=0.02 rate_kbit=5000
#   ./tests/lab.sh fault outage cell 3000   cell dark for 3 s
#   ./tests/lab.sh status                   the edge's full status (JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=/tmp/stallnet-lab.env

link_index() { case "$1" in wifi) echo 1 ;; cell) echo 2 ;; *) echo "unknown uplink $1 (wifi, cell)" >&2; exit 2 ;; esac; }
emu() { # index, command
  . "$env_file"
  python3 - "$DIR/emu$1.sock" "$2" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall((sys.argv[2] + "\n").encode()); print(s.recv(200).decode().strip())
PY
}

case "${1:-start}" in
  start)
    [ "$(id -u)" = 0 ] || { echo "the lab needs root" >&2; exit 1; }
    for t in nft iperf3 ethtool conntrack ping python3; do
      command -v "$t" >/dev/null || { apt-get update -qq; apt-get install -y -qq --no-install-recommends nftables iperf3 ethtool conntrack iputils-ping python3 >/dev/null; break; }
    done
    cargo build --workspace --bins
    shift || true
    exec ./target/debug/stallnet-lab "$@"
    ;;
  cli)
    . "$env_file"; shift; exec ./target/debug/stallnet "$@" --runtime-dir "$DIR/edge-run" ;;
  status)
    . "$env_file"; cat "$DIR/edge-run/status.json" ;;
  fault)
    kind=${2:?fault kind}; name=${3:?uplink}; i=$(link_index "$name")
    case "$kind" in
      blackhole) emu "$i" "set blackhole=$([ "${4:-on}" = on ] && echo 1 || echo 0)" ;;
      carrier) . "$env_file"; ip netns exec "$PREFIX-emu$i" ip link set dev toedge "${4:-down}" ;;
      shape) shift 3; emu "$i" "set $*" ;;
      outage) emu "$i" "outage ${4:-2000}" ;;
      *) echo "fault kinds: blackhole, carrier, shape, outage" >&2; exit 2 ;;
    esac ;;
  *) echo "usage: $0 [start [--no-dashboard]|status|cli …|fault …]" >&2; exit 2 ;;
esac
