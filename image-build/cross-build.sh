#!/usr/bin/env bash
# Cross-compiles the workspace's binaries for the Raspberry Pi (aarch64) with Debian's
# toolchain (rustup cannot add targets here; DEVELOPERS.md):
#
#   image-build/cross-build.sh [--install-toolchain]
#
# --install-toolchain first installs rustc-web, cargo-web, libstd-rust-web-dev:arm64 and
# gcc-aarch64-linux-gnu (adding the arm64 architecture). The binaries land in
# target/cross/aarch64-unknown-linux-gnu/release (a target directory of their own: the
# Debian compiler's artifacts never mix with the rustup toolchain's).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --install-toolchain ]; then
    dpkg --add-architecture arm64
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
for t in /usr/bin/rustc /usr/bin/cargo aarch64-linux-gnu-gcc; do
    command -v "$t" >/dev/null || {
        echo "cross-build: $t missing: run with --install-toolchain" >&2
        exit 2
    }
done
# The linker for the target is in .cargo/config.toml; the C parts (ring) need the cross gcc.
export RUSTC=/usr/bin/rustc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_DIR=target/cross
/usr/bin/cargo build --release --locked --target aarch64-unknown-linux-gnu \
    -p stallnet -p stallnet-tui --bins
ls -l target/cross/aarch64-unknown-linux-gnu/release/stallnet \
    target/cross/aarch64-unknown-linux-gnu/release/stallnet-tui
