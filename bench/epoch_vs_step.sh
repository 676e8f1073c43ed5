#!/usr/bin/env bash
# A training epoch's time per iteration against `segk bench step` on the same net: what the
# loader, the feed and the thread policy cost on top of the step (issue 27's benchmark).
# Usage: bench/epoch_vs_step.sh SEGK_BINARY WORK_DIR [EPOCHS] [ITERS]
# Generates a small CT-like dataset in WORK_DIR (kept between runs), plans and preprocesses it,
# trains 3d_fullres fold 0 on the CPU with no thread variable set, and runs `bench step` with the
# same plans. Prints the epochs' lines, then seconds per iteration of each (the first epoch,
# which starts the loader, left out).
set -euo pipefail
bin=$1
work=$2
epochs=${3:-3}
iters=${4:-30}
unset SEGK_THREADS OMP_NUM_THREADS SEGK_WORKERS nnUNet_n_proc_DA SEGK_PROCESSES nnUNet_def_n_proc nnUNet_raw nnUNet_preprocessed nnUNet_results
ds=$work/Dataset927_Threads
[ -d "$ds" ] || "$bin" synth "$ds" --cases 6 --shape ${SHAPE:-64,96,96} --spacing 1.5,0.8,0.8 --seed 3 >/dev/null
[ -f "$work/segk_preprocessed/Dataset927_Threads/nnUNetPlans.json" ] || "$bin" preprocess "$ds" -c 3d_fullres >/dev/null
out=$work/run-$$
log=$(mktemp)
"$bin" train "$ds" 3d_fullres 0 --device cpu --epochs "$epochs" --iters-per-epoch "$iters" --val-iters 1 --no-validation --out "$out" | tee "$log" | grep -E "^threads|^epoch|^  threads"
rm -rf "$out"
# Seconds per iteration of each epoch after the first (its one validation batch left in).
train=$(awk -v n="$iters" '/^epoch/ { k++; if (k > 1) for (i = 2; i <= NF; i++) if ($i == "s" && $(i-1) ~ /^[0-9.]+$/) { t += $(i-1); m++ } } END { printf "%.3f", t / m / n }' "$log")
plans=$work/segk_preprocessed/Dataset927_Threads/nnUNetPlans.json
step=$("$bin" bench step --plans "$plans" --device cpu --warmup 1 --steps 5 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["step_median_s"])')
echo "train: $train s per iteration; bench step: $step s; ratio $(python3 -c "print(round($train/$step, 3))")"
rm -f "$log"
