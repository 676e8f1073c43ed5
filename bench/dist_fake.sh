#!/usr/bin/env bash
# What running as several ranks costs beside the step itself, measured where no GPU is: the same
# tiny training (features 4 and 8, patch 16^3, global batch 8) as 1, 2, 4 and 8 ranks on the
# fake driver and the fake NCCL (each rank a process, the kernels emulated on the CPU). The
# emulated step dominates and the ranks share this machine's cores, so this is no scaling
# figure for GPUs: it shows the rendezvous, the loss all-gather, the bucketed gradient sums and
# the watchdog working at 8 ranks, and what a step costs per sample as the ranks grow.
#   bash bench/dist_fake.sh            (segk from $CARGO_TARGET_DIR or target/release)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$here/target}
segk=${SEGK_BIN:-$target/release/segk}
fake=""
for d in "$target"/release/build/segk-*/out/fakecuda; do
  [ -e "$d/libnccl.so.2" ] && { fake=$d; break; }
done
[ -n "$fake" ] || { echo "no fake driver with a fake NCCL under $target/release/build (cargo build --release with a C compiler and nvcc)" >&2; exit 1; }
work=$(mktemp -d /tmp/segk-dist-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/Dataset042_Bench
"$segk" synth "$root" --cases 8 --shape 20,20,20 --spacing 1,1,1 >/dev/null
"$segk" plan "$root" >/dev/null
python3 - "$work/segk_preprocessed/Dataset042_Bench" <<'EOF'
import json, sys
d = sys.argv[1]
p = json.load(open(f"{d}/nnUNetPlans.json"))
p["plans_name"] = "tinyPlans"
c = p["configurations"]["3d_fullres"]
c.update(batch_size=8, patch_size=[16, 16, 16], data_identifier="tinyPlans_3d_fullres")
a = c["architecture"]["arch_kwargs"]
a.update(n_stages=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]], n_conv_per_stage=[2, 2], n_conv_per_stage_decoder=[2])
json.dump(p, open(f"{d}/tinyPlans.json", "w"), indent=1)
EOF
iters=${ITERS:-4}
printf '%-6s %-12s %-14s %s\n' ranks "epoch (s)" "s per step" "samples/s"
for n in 1 2 4 8; do
  out=$work/runs/r$n/fold_all
  devices=$(seq -s, 0 $((n - 1)) | sed 's/[0-9]\+/cuda:&/g')
  LD_LIBRARY_PATH=$fake FAKECUDA_DEVICES=8 "$segk" train "$root" 3d_fullres all -p tinyPlans --devices "$devices" \
    --epochs 1 --iters-per-epoch "$iters" --val-iters 1 --workers 1 --no-validation --out "$out" >"$work/r$n.log" 2>&1
  s=$(grep -oE '^epoch +0 .* ([0-9.]+) s  data' "$out/training_log.txt" | grep -oE '[0-9.]+ s  data' | grep -oE '^[0-9.]+')
  awk -v n="$n" -v s="$s" -v it="$iters" 'BEGIN { printf "%-6d %-12.1f %-14.2f %.2f\n", n, s, s / it, 8 * it / s }'
done
