#!/usr/bin/env bash
# Every GPU check and GPU benchmark, from prebuilt binaries (the GPU machines have no Rust
# toolchain): build here with nvcc (see .ci/run), copy target/release/segk over, run
#   bash scripts/gpu-check.sh [REPORT_DIR]
# If that binary does not start there (an older glibc than this machine's 2.36), build with
# scripts/build-portable.sh (glibc 2.28) and pass it as SEGK_BIN.
# It writes one file per step and a summary; it exits non-zero if a check failed.
set -u
bin=${SEGK_BIN:-target/release/segk}
out=${1:-gpu-report}
mkdir -p "$out"
status=0
step() {  # step NAME CMD...
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  if "$@" >"$out/$name.txt" 2>&1; then echo "   ok" | tee -a "$out/summary.txt"; else echo "   FAILED (see $name.txt)" | tee -a "$out/summary.txt"; status=1; fi
  tail -n 3 "$out/$name.txt" | sed 's/^/   /' | tee -a "$out/summary.txt"
}
: >"$out/summary.txt"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
"$bin" --version >>"$out/summary.txt" 2>&1 || true
step selftest "$bin" selftest --device cuda
if [ -n "${SEGK_TEST_BIN:-}" ]; then
  step cargo-tests "$SEGK_TEST_BIN" --nocapture
fi
for l in 0 1 2; do
  step "step-5stage-80x96x80-ckpt$l" "$bin" bench step --device cuda --checkpointing "$l" --warmup 2 --steps 10
  step "step-6stage-128cube-ckpt$l" "$bin" bench step --device cuda --stages 6 --patch 128,128,128 --checkpointing "$l" --warmup 2 --steps 10
done
# The PyTorch peer on the same GPU (cuDNN, AMP bf16), so each ratio is one run apart.
if command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then
  step torch-5stage-80x96x80 python3 bench/torch_step.py --device cuda --warmup 2 --steps 10
  step torch-6stage-128cube python3 bench/torch_step.py --device cuda --stages 6 --patch 128 128 128 --warmup 2 --steps 10
fi
step demo "$bin" demo --device cuda
echo "report in $out/"
exit $status
