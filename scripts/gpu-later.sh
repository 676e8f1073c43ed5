#!/usr/bin/env bash
# The GPU runs that scripts/gpu-check.sh leaves for a later window: the selftest on the CPU
# emulator of the same kernels, `bench loader` against the measured step time, short `segk
# train` runs at checkpoint levels 0/1/2 on a generated dataset, one through NCCL at world
# size 1 (`--devices cuda:0`) when NCCL is there, the demo, and the test binary when given. Same usage, environment and output as gpu-check.sh (whose step machinery this
# sources): at most 3 files in OUT_DIR (summary.txt, all.log, results.json), each step under
# `timeout` within DEADLINE (default 420 s), SMOKE=1 for toy sizes on the fake driver.
#   SEGK_BIN=target/x86_64-unknown-linux-gnu/release/segk bash scripts/gpu-later.sh OUT_DIR
#   SEGK_TEST_BIN   a test binary (cargo test --no-run) to run with --nocapture, when given
set -u
if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  echo "usage: [SEGK_BIN=...] [DEADLINE=420] [SMOKE=1] [SEGK_TEST_BIN=...] bash scripts/gpu-later.sh OUT_DIR" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/gpu-check.sh
. "$here/gpu-check.sh"
outdir=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2
bin=$(abspath "${SEGK_BIN:-target/release/segk}")
test_bin=$(abspath "${SEGK_TEST_BIN:-}")
cd "$here/.." || exit 2
setup "$outdir"

if [ "$smoke" = 1 ]; then
  step6="--stages 2 --patch 8,8,8 --batch 1 --warmup 0 --steps 1"
  loader="--workers 1,2 --seconds 2"
  synth="--cases 5 --shape 24,32,32"
  train="--epochs 1 --iters-per-epoch 1 --val-iters 1"
  demo="--epochs 1 --iters 1"
  need_emu=15 cap_emu=300 need=2 cap=120 need_train=10 cap_train=240
else
  step6="--stages 6 --patch 128,128,128 --batch 2 --warmup 2 --steps 10"
  loader="--workers 1,2,4,8,16 --seconds 10"
  synth="--cases 8 --shape 96,160,160"
  train="--epochs 3 --iters-per-epoch 40 --val-iters 5"
  demo=""
  need_emu=60 cap_emu=400 need=10 cap=150 need_train=60 cap_train=300
fi
say "segk GPU later checks $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), bin $bin, deadline $deadline s$([ "$smoke" = 1 ] && echo ', SMOKE (toy sizes)')"

if ! step version 1 30 "$bin" --version; then
  [ "$step_status" = skipped ] || stop_reason="$bin does not run (see version)"
fi
only_args=()
if [ -n "${SELFTEST_ONLY:-}" ] && "$bin" selftest --help 2>/dev/null | grep -q -- '--only'; then only_args=(--only "$SELFTEST_ONLY"); fi
# The same checks on the CPU emulator of the same kernels: a GPU failure with this one green
# points at what the emulator cannot see (races between warps, the real tensor cores).
PARSE=parse_selftest step selftest-emu "$need_emu" "$cap_emu" "$bin" selftest --device emu ${only_args[@]+"${only_args[@]}"}
PARSE=""

# Does the loader keep up with the GPU? The 3d_fullres step time, then the pool against it.
parse_step_json() {
  local v
  v=$(grep -oE '"step_median_s":[0-9.eE+-]+' "$steplog" | tail -n 1 | cut -d: -f2)
  step_ms=$(awk -v s="$v" 'BEGIN { if (s > 0) printf "%.1f", 1000 * s }')
  [ -n "$step_ms" ] && note "step median $(printf %.3f "$v") s"
  extra+=",\"step_median_s\":$(jn "$v")"
}
step_ms=""
PARSE=parse_step_json step step-6stage-128cube-ckpt1-json "$need" "$cap" "$bin" bench step --device cuda --checkpointing 1 $step6 --json
parse_loader() {
  local l
  while IFS= read -r l; do note "$l"; done < <(grep -iE 'workers|batches/s|keeps up|step' "$steplog" | sed -E 's/^[[:space:]]+//; s/[[:space:]]+/ /g' | head -n 12)
}
PARSE=parse_loader step loader "$need" "$cap" "$bin" bench loader $loader ${step_ms:+--step-ms "$step_ms"}

# Short real training runs per checkpoint level on a generated dataset: epoch time, data-wait
# share and GPU memory are in each epoch line.
parse_train() {
  local l
  while IFS= read -r l; do note "$l"; done < <(grep -iE '^[[:space:]]*epoch' "$steplog" | sed -E 's/^[[:space:]]+//; s/[[:space:]]+/ /g' | tail -n 3)
}
ds=$tmp/Dataset990_GpuCheck
PARSE=""
step synth "$need" "$cap" "$bin" synth "$ds" $synth
step preprocess "$need" "$cap" "$bin" preprocess "$ds" -c 3d_fullres
for l in 0 1 2; do
  PARSE=parse_train step "train-ckpt$l" "$need_train" "$cap_train" "$bin" train "$ds" 0 --device cuda $train --checkpointing "$l" --no-validation --out "$tmp/train-ckpt$l"
done
# The several-GPU path (rendezvous, NCCL, bucketed gradient sums) at world size 1, through the
# same code as a multi-GPU run: the machine's NCCL when it has one (the fake NCCL in SMOKE runs).
nccl_lib() {
  local d
  for d in ${LD_LIBRARY_PATH//:/ }; do
    ls "$d"/libnccl.so* >/dev/null 2>&1 && { echo "$d"; return 0; }
  done
  ldconfig -p 2>/dev/null | grep -oE '/[^ ]*libnccl\.so[^ ]*' | head -n 1 | grep .
}
if lib=$(nccl_lib); then
  PARSE=parse_train step train-nccl-1rank "$need_train" "$cap_train" "$bin" train "$ds" 0 --devices cuda:0 $train --no-validation --out "$tmp/train-nccl"
else
  skip train-nccl-1rank "$bin train ... --devices cuda:0" "no libnccl.so on LD_LIBRARY_PATH or in ldconfig's cache (pip install nvidia-nccl-cu13, then LD_LIBRARY_PATH=.../nvidia/nccl/lib)"
fi
parse_demo() {
  local l
  while IFS= read -r l; do note "$l"; done < <(grep -v '^[[:space:]]*$' "$steplog" | tail -n 3 | sed -E 's/^[[:space:]]+//; s/[[:space:]]+/ /g')
}
PARSE=parse_demo step demo "$need_train" "$cap_train" "$bin" demo --device cuda $demo
PARSE=""
if [ -n "$test_bin" ]; then
  step cargo-tests "$need_train" "$cap_train" "$test_bin" --nocapture
else
  skip cargo-tests "\$SEGK_TEST_BIN --nocapture" "SEGK_TEST_BIN not given"
fi
exit "$status"
