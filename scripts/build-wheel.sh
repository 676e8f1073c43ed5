#!/usr/bin/env bash
# The `segk` wheel: the segk binary (pip puts it on PATH) and the Python module `segk`
# (prediction of numpy arrays), one abi3 wheel for CPython 3.9 and newer, built by maturin.
#   bash scripts/build-wheel.sh [OUT_DIR]              a wheel for this machine (what CI tests):
#                                                      the release binary as built here
#   PORTABLE=1 bash scripts/build-wheel.sh [OUT_DIR]   manylinux_2_28 (glibc 2.28, linked by zig),
#                                                      CUDA kernels embedded (nvcc 13.0 wheels)
# Prints the wheel's path on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-target/wheels}")
cache="$HOME/.cache/segk"
venv="$cache/maturin-venv"
if [ ! -x "$venv/bin/maturin" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "maturin>=1.7,<2"
fi
# maturin --zig finds zig through the ziglang package of its own Python.
[ -z "${PORTABLE:-}" ] || "$venv/bin/python" -c 'import ziglang' 2>/dev/null || "$venv/bin/pip" install -q --disable-pip-version-check ziglang
# One version: the wheel's comes from python/Cargo.toml, which must follow segk's.
v_segk=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
v_py=$(sed -n 's/^version = "\(.*\)"/\1/p' python/Cargo.toml | head -1)
[ "$v_segk" = "$v_py" ] || { echo "python/Cargo.toml's version $v_py is not segk's $v_segk" >&2; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/segk/target}"
data=python/segk.data/scripts
rm -rf python/segk.data
mkdir -p "$data"
if [ -n "${PORTABLE:-}" ]; then
  env -u CARGO_TARGET_DIR bash scripts/build-portable.sh >&2
  cp target/x86_64-unknown-linux-gnu/release/segk "$data/segk"
  chmod +x "$data/segk"
  export PATH="$cache/zig-venv/bin:$PATH"
  NVCC=$(ls "$cache"/nvcc-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
  export NVCC SEGK_REQUIRE_KERNELS=1
  "$venv/bin/maturin" build --release --locked --strip --zig --compatibility manylinux_2_28 --target x86_64-unknown-linux-gnu -m python/Cargo.toml -o "$out" >&2
else
  cargo build --release --locked --bin segk >&2
  cp "$CARGO_TARGET_DIR/release/segk" "$data/segk"
  chmod +x "$data/segk"
  strip --strip-debug "$data/segk"
  # A wheel for this machine's glibc (tagged linux_x86_64: pip installs it here, PyPI would not take it).
  "$venv/bin/maturin" build --release --locked --strip --compatibility linux -m python/Cargo.toml -o "$out" >&2
fi
ls -t "$out"/segk-"$v_segk"-*.whl | head -1
