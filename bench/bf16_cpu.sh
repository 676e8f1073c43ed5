#!/usr/bin/env bash
# segk's bf16 CPU path side by side with its f32 path and PyTorch's (issue 29), in one run:
#   1. the training step of nnU-Net's 5-stage 3d_fullres PlainConvUNet, patch 80x96x80, batch 2:
#      segk f32, segk bf16, PyTorch f32, PyTorch bf16 autocast (oneDNN; NCDHW and channels_last);
#   2. every conv layer of that net alone (segk bench kernels), f32 and bf16;
#   3. prediction of one case by one randomly initialised nnU-Net model folder (nnU-Net's own
#      plans of a generated dataset, default features): segk f32, segk bf16, nnUNetv2_predict.
# Needs the release binary and nnunetv2 2.8.1 in $NNUNET_VENV. Runs are alternated where the
# machine's clock drifts (2-core VMs: up to 20 % within minutes).
#   bash bench/bf16_cpu.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SEGK=${SEGK:-${CARGO_TARGET_DIR:-target}/release/segk}
VENV=${NNUNET_VENV:-$HOME/.cache/segk/nnunet-venv}
PY=$VENV/bin/python
W=${1:-/tmp/segk-bf16-bench}
STEPS=${STEPS:-3}
THREADS=$(nproc)
mkdir -p "$W"
echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $THREADS threads; $(grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"

echo "== 1. training step (median of $STEPS after 1 warm-up)"
for round in 1 2; do
  for p in f32 bf16; do
    echo "segk $p (round $round): $($SEGK bench step --precision $p --warmup 1 --steps "$STEPS" --json)"
  done
  echo "torch f32 (round $round): $($PY bench/torch_step.py --device cpu --threads "$THREADS" --warmup 1 --steps "$STEPS")"
  echo "torch bf16 autocast (round $round): $($PY bench/torch_step.py --device cpu --threads "$THREADS" --warmup 1 --steps "$STEPS" --cpu-bf16)"
  echo "torch bf16 autocast channels_last (round $round): $($PY bench/torch_step.py --device cpu --threads "$THREADS" --warmup 1 --steps "$STEPS" --cpu-bf16 --channels-last)"
done

echo "== 2. conv layers alone"
for p in f32 bf16; do
  $SEGK bench kernels --stages 5 --patch 80,96,80 --precision $p --only conv --reps 3
done

echo "== 3. prediction, one case, no mirroring, one fold"
D=$W/Dataset900_Synth
if [ ! -f "$W/model.done" ]; then
  rm -rf "$W/raw" "$W/pre" "$W/model"
  mkdir -p "$W/raw"
  $SEGK synth "$W/raw/Dataset900_Synth" --cases 2 --shape ${SHAPE:-128,160,160} --seed 3 > /dev/null
  nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pre $SEGK plan 900 > /dev/null
  $PY bench/predict_peer.py "$W/pre/Dataset900_Synth/nnUNetPlans.json" - "$W/model" 3
  mkdir -p "$W/in" && cp "$W/raw/Dataset900_Synth/imagesTr/"*_0000.nii.gz "$W/in/" && ls "$W/in" | tail -n +2 | xargs -I{} rm "$W/in/{}"
  touch "$W/model.done"
fi
MODEL=$(ls -d "$W"/model/nnunet_results/*/nnUNetTrainer__nnUNetPlans__3d_fullres)
for round in 1 2; do
  for p in f32 bf16; do
    rm -rf "$W/out_$p"
    /usr/bin/time -f "segk predict $p (round $round): %e s wall, peak RSS %M KiB" $SEGK predict -i "$W/in" -o "$W/out_$p" -m "$MODEL" -f 0 --no-tta --device cpu --precision $p --save-probabilities 2>&1 | grep -v "^  "
  done
  rm -rf "$W/out_nn"
  /usr/bin/time -f "nnUNetv2_predict (round $round): %e s wall, peak RSS %M KiB" env nnUNet_results=$W/model/nnunet_results nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pre \
    "$VENV/bin/nnUNetv2_predict" -i "$W/in" -o "$W/out_nn" -d 900 -c 3d_fullres -f 0 -device cpu -npp 1 -nps 1 --disable_tta --save_probabilities 2>&1 | tail -1
done
$PY - "$W" <<'PY'
import sys, glob, os, numpy as np, nibabel as nib
w = sys.argv[1]
for f in sorted(glob.glob(f"{w}/out_f32/*.nii.gz")):
    name = os.path.basename(f)
    a, b, c = (np.asarray(nib.load(f"{w}/{d}/{name}").dataobj) for d in ("out_f32", "out_bf16", "out_nn"))
    pa, pb, pc = (np.load(f"{w}/{d}/{name[:-7]}.npz")["probabilities"] for d in ("out_f32", "out_bf16", "out_nn"))
    print(f"{name}: bf16 labels = f32 on {100 * (a == b).mean():.4f} % (probabilities max diff {abs(pa - pb).max():.2e}); f32 = nnU-Net on {100 * (a == c).mean():.4f} %, bf16 = nnU-Net on {100 * (b == c).mean():.4f} %")
PY
