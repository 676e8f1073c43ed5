#!/usr/bin/env bash
# Every GPU check and GPU benchmark, from prebuilt binaries (the GPU machines have no Rust
# toolchain): build here with nvcc (see .ci/run), copy target/release/segk over, run
#   bash scripts/gpu-check.sh [REPORT_DIR]
# If that binary does not start there (an older glibc than this machine's 2.36), build with
# scripts/build-portable.sh (glibc 2.28) and pass it as SEGK_BIN.
# It writes one file per step and a summary; it exits non-zero if a check failed.
# SMOKE=1 runs every step at toy sizes: with the fake driver (README, "The fake driver") that
# checks this script itself where no GPU is, so a lent GPU's minutes go to measuring.
set -u
bin=${SEGK_BIN:-target/release/segk}
out=${1:-gpu-report}
if [ "${SMOKE:-0}" = 1 ]; then
  step5="--patch 16,16,16 --stages 3 --warmup 1 --steps 1"
  step6="--patch 16,16,16 --stages 3 --warmup 1 --steps 1"
  kernels="--patch 16,16,16 --stages 3 --reps 1"
  loader="--workers 1,2 --seconds 2"
  synth="--cases 5 --shape 24,32,32"
  train="--epochs 1 --iters-per-epoch 1 --val-iters 1"
  demo="--epochs 1 --iters 1"
else
  step5="--warmup 2 --steps 10"
  step6="--stages 6 --patch 128,128,128 --warmup 2 --steps 10"
  kernels=""
  loader="--workers 1,2,4,8,16 --seconds 10"
  synth="--cases 8 --shape 96,160,160"
  train="--epochs 3 --iters-per-epoch 40 --val-iters 5"
  demo=""
fi
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
# The same checks on the CPU emulator of the same kernels: a failure above with this one green
# points at what the emulator cannot see (races between warps, the real tensor cores).
step selftest-emu "$bin" selftest --device emu
if [ -n "${SEGK_TEST_BIN:-}" ]; then
  step cargo-tests "$SEGK_TEST_BIN" --nocapture
fi
for l in 0 1 2; do
  step "step-5stage-80x96x80-ckpt$l" "$bin" bench step --device cuda --checkpointing "$l" $step5
  step "step-6stage-128cube-ckpt$l" "$bin" bench step --device cuda --checkpointing "$l" $step6
done
# The same 3d_fullres step with activations stored as f32: what bf16 storage saves.
step "step-6stage-128cube-ckpt1-f32-activations" env SEGK_ACTIVATIONS=f32 "$bin" bench step --device cuda --checkpointing 1 $step6
# The same step with every convolution on the simple kernels (conv.cu) instead of the pipelined
# ones (conv_pipe.cu): what the pipeline buys, measured.
step "step-6stage-128cube-ckpt1-simple-conv" env SEGK_CONV=simple "$bin" bench step --device cuda --checkpointing 1 $step6
# The PyTorch peer on the same GPU (cuDNN, AMP bf16), so each ratio is one run apart.
if [ "${SMOKE:-0}" != 1 ] && command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then
  step torch-5stage-80x96x80 python3 bench/torch_step.py --device cuda --warmup 2 --steps 10
  step torch-6stage-128cube python3 bench/torch_step.py --device cuda --stages 6 --patch 128 128 128 --warmup 2 --steps 10
fi
# Each op family alone on the 3d_fullres layer shapes: TFLOP/s and GB/s against the H100.
step kernels "$bin" bench kernels --device cuda $kernels
step kernels-simple-conv env SEGK_CONV=simple "$bin" bench kernels --device cuda $kernels
# The criterion GPU bench (benches/gpu.rs; scripts/build-portable.sh builds it), when given.
if [ -n "${SEGK_GPU_BENCH_BIN:-}" ]; then
  step criterion-gpu "$SEGK_GPU_BENCH_BIN" --bench
fi
# The kernels under compute-sanitizer: out-of-bounds and misaligned accesses over the whole
# selftest; shared-memory races in the kernels that use shared memory (conv, norm, loss).
if command -v compute-sanitizer >/dev/null; then
  step sanitizer-memcheck timeout 580 compute-sanitizer --tool memcheck --error-exitcode 1 "$bin" selftest --device cuda
  for k in conv norm loss; do
    step "sanitizer-racecheck-$k" timeout 580 compute-sanitizer --tool racecheck --error-exitcode 1 --kernel-name "kns=$k" "$bin" selftest --device cuda
  done
  step sanitizer-synccheck timeout 580 compute-sanitizer --tool synccheck --error-exitcode 1 "$bin" selftest --device cuda
else
  echo "== compute-sanitizer not on PATH: sanitizer checks not run" | tee -a "$out/summary.txt"
fi
# Does the loader keep up with the GPU? The step time of the 3d_fullres net, then the pool at
# 1..16 workers against it.
step_ms=$("$bin" bench step --device cuda $step6 --json 2>/dev/null | python3 -c 'import json,sys; print(1000*json.load(sys.stdin)["step_median_s"])' 2>/dev/null || echo "")
step loader "$bin" bench loader $loader ${step_ms:+--step-ms "$step_ms"}
# A short real training run per checkpoint level on a generated dataset: epoch time, data-wait
# share and GPU memory are in each epoch line.
work=${TMPDIR:-/tmp}/segk-gpu-check-$$
ds=$work/Dataset990_GpuCheck
step synth "$bin" synth "$ds" $synth
step preprocess "$bin" preprocess "$ds"
for l in 0 1 2; do
  step "train-ckpt$l" "$bin" train "$ds" 0 --device cuda $train --checkpointing "$l" --no-validation --out "$work/train-ckpt$l"
done
rm -rf "$work"
step demo "$bin" demo --device cuda $demo
echo "report in $out/"
exit $status
