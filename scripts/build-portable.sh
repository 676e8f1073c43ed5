#!/usr/bin/env bash
# A segk binary (CUDA kernels embedded) that starts on older Linux images: linked by zig
# against glibc 2.28 (RHEL 8, Debian 10, Ubuntu 20.04 and newer), for a GPU machine whose
# image is older than this one's (a plain build here asks for GLIBC_2.34). Prints the highest
# glibc symbol version the binary asks for. Output: target/x86_64-unknown-linux-gnu/release/segk
# and segk-gpu-bench (benches/gpu.rs) beside it.
#   bash scripts/build-portable.sh        (needs python3 and cargo; installs the rest once)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="$HOME/.cache/segk"
GLIBC=${GLIBC:-2.28}

# zig (the linker with old glibc stubs) and cargo-zigbuild, both cached.
if [ ! -x "$cache/zig-venv/bin/python-zig" ]; then
  python3 -m venv "$cache/zig-venv"
  "$cache/zig-venv/bin/pip" install -q --disable-pip-version-check ziglang
fi
export PATH="$cache/zig-venv/bin:$PATH"
command -v cargo-zigbuild >/dev/null || cargo install --locked cargo-zigbuild

# nvcc as in .ci/run, so the kernels are embedded.
venv="$cache/nvcc-venv"
if ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi
NVCC=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
export NVCC SEGK_REQUIRE_KERNELS=1 SEGK_REQUIRE_EMU=1

cargo zigbuild --release --locked --target "x86_64-unknown-linux-gnu.$GLIBC" --bin segk
bin=target/x86_64-unknown-linux-gnu/release/segk
# Debug info off (symbols stay, for backtraces): both binaries fit the 64 MiB a GPU session
# may carry (52 + 51 MB with it, 14 + 10 MB without).
strip --strip-debug "$bin"
echo "$bin: $(stat -c %s "$bin") bytes, asks for $(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -V -u | tail -1)"
# The criterion GPU bench (benches/gpu.rs) for the same machines: pass it as SEGK_GPU_BENCH_BIN.
gpu_bench=$(cargo zigbuild --release --locked --target "x86_64-unknown-linux-gnu.$GLIBC" --bench gpu --message-format=json | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu" and m.get("executable"):
        print(m["executable"])')
cp "$gpu_bench" target/x86_64-unknown-linux-gnu/release/segk-gpu-bench
strip --strip-debug target/x86_64-unknown-linux-gnu/release/segk-gpu-bench
echo "target/x86_64-unknown-linux-gnu/release/segk-gpu-bench: $(stat -c %s target/x86_64-unknown-linux-gnu/release/segk-gpu-bench) bytes (the criterion GPU bench)"
