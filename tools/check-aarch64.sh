#!/usr/bin/env bash
# Builds the crate for 64-bit ARM Linux (Graviton, Ampere, Apple silicon under Linux) and runs its CPU tests
# there under QEMU's user-mode emulation: the x86-only code (AVX-512, AVX2, AMX) must stay behind its cfgs,
# and the portable kernels must match the same references.
#
# Needs: rustup's aarch64-unknown-linux-gnu target, an aarch64 C/C++ cross compiler (libjpeg-turbo and the
# kernels' host emulation are C/C++), and qemu-aarch64 to run the tests. On Debian:
#   rustup target add aarch64-unknown-linux-gnu
#   apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user
#
# The command-line tests run the cross-compiled binary through QEMU too (`WEMOE_TEST_RUNNER`, read by
# tests/common). Left out: the NVRTC suites and `doctor`'s kernel table (NVRTC's PyPI wheel is x86-64 only),
# the CUDA emulation (every kernel's blocks on host threads: hours under QEMU) and the demo (minutes natively).
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
missing=()
rustup target list --installed 2>/dev/null | grep -qx "$target" || missing+=("rustup target $target")
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=("aarch64-linux-gnu-gcc")
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=("aarch64-linux-gnu-g++")
command -v qemu-aarch64 >/dev/null || missing+=("qemu-aarch64")
if ((${#missing[@]})); then
    echo "check-aarch64: missing ${missing[*]} (see the top of $0)" >&2
    exit 1
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"

echo "== clippy for $target"
cargo clippy --target "$target" --all-targets -- -D warnings

echo "== tests on $target under QEMU"
export WEMOE_TEST_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --target "$target" --lib --test adapt_fusionbench --test wemoe_fusionbench --test parity_transformers \
    --test heads_tool --test hub_cache --test readme_fusionbench --test pytorch_checkpoints --test zero_shot_heads --test ties_merging --test adamerging --test cli --test bad_input --test corrupted_inputs --test adapt_cli -- --skip doctor_runs_on_a_fresh_clone
