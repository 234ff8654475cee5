#!/usr/bin/env bash
# Boots the built image in qemu-system-aarch64 (`virt` machine, the image's own kernel,
# initrd and root file system) and checks over the serial console that stallnet.service
# is active and `stallnet status --json` answers. Slow under emulation (minutes), so it
# is not part of CI; README and docs/BENCHMARKS.md give its timings.
#
#   image-build/smoke-test.sh [IMAGE_DIR]     (default target/image, from build-image.sh)
#
# A copy of the image is booted, with one file added: the check itself
# (/usr/local/sbin/stallnet-smoke), run through systemd.run= on the kernel command line.
# The console log goes to IMAGE_DIR/smoke.log. Exit 0 only if both checks passed.
set -euo pipefail

dir=$(realpath "${1:-$(dirname "$0")/../target/image}")
img="$dir/stallnet-arm64.img"
for f in "$img" "$dir/vmlinuz" "$dir/initrd.img"; do
    [ -s "$f" ] || { echo "smoke-test: $f missing: run build-image.sh" >&2; exit 2; }
done
command -v qemu-system-aarch64 >/dev/null || {
    echo "smoke-test: qemu-system-aarch64 missing (apt-get install qemu-system-arm)" >&2
    exit 2
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp --reflink=auto "$img" "$work/smoke.img"

cat > "$work/stallnet-smoke" <<'SMOKE'
#!/bin/sh
# The smoke test's check (added to a copy of the image by smoke-test.sh only).
exec > /dev/ttyAMA0 2>&1
systemctl start --no-block multi-user.target
i=0
while [ $i -lt 600 ]; do
    if systemctl is-active -q stallnet.service && stallnet status --json > /tmp/status.json 2>/dev/null; then
        break
    fi
    i=$((i + 1))
    sleep 1
done
echo "SMOKE ready-at-uptime $(cut -d' ' -f1 /proc/uptime)"
echo "SMOKE stallnet.service $(systemctl is-active stallnet.service)"
echo "SMOKE stallnet-firstboot.service $(systemctl is-active stallnet-firstboot.service)"
echo "SMOKE stallnet-tui@tty1.service $(systemctl is-active stallnet-tui@tty1.service)"
echo "SMOKE hostname $(hostname)"
echo "SMOKE status-begin"
cat /tmp/status.json 2>/dev/null
echo
echo "SMOKE status-end"
stallnet uplinks 2>&1 || true
systemctl --no-pager --full status stallnet.service 2>&1 | head -15
journalctl --no-pager -b -u stallnet.service 2>&1 | tail -20
SMOKE
# Write the check into the root partition (the second one) without mounting it.
start=$(sfdisk -d "$work/smoke.img" | sed -n 's/.*2 : start= *\([0-9]*\),.*/\1/p')
printf 'cd /usr/local/sbin\nwrite %s stallnet-smoke\nsif stallnet-smoke mode 0100755\n' \
    "$work/stallnet-smoke" > "$work/debugfs.cmd"
debugfs -w -f "$work/debugfs.cmd" "$work/smoke.img?offset=$((start * 512))" >/dev/null 2>&1

log="$dir/smoke.log"
t0=$(date +%s)
timeout 1800 qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 1024 -nographic -no-reboot \
    -kernel "$dir/vmlinuz" -initrd "$dir/initrd.img" \
    -append "root=LABEL=RASPIROOT rw console=ttyAMA0 net.ifnames=0 systemd.run=/usr/local/sbin/stallnet-smoke systemd.run_success_action=poweroff systemd.run_failure_action=poweroff" \
    -drive file="$work/smoke.img",format=raw,if=virtio \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
    -netdev user,id=n1 -device virtio-net-pci,netdev=n1,romfile= \
    </dev/null > "$log" 2>&1 || true
took=$(( $(date +%s) - t0 ))
tr -d '\r' < "$log" > "$log.txt" && mv "$log.txt" "$log"
ready=$(sed -n 's/^SMOKE ready-at-uptime \([0-9.]*\).*/\1/p' "$log" | head -n1)
active=$(sed -n 's/^SMOKE stallnet.service \([a-z]*\).*/\1/p' "$log" | head -n1)
json=$(sed -n '/^SMOKE status-begin/,/^SMOKE status-end/p' "$log" | sed '1d;$d')
echo "qemu run: ${took} s; stallnet ready at uptime ${ready:-?} s; stallnet.service ${active:-?}"
if [ "$active" = active ] && echo "$json" | grep -q '"role": *"edge"'; then
    echo "ok   stallnet.service is active and stallnet status --json answers"
    exit 0
fi
echo "FAIL see $log"
exit 1
