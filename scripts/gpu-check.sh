#!/usr/bin/env bash
# The GPU check, prioritised and time-boxed for a lent GPU (15 minutes of device time in all,
# at most 10 minutes a command, at most 8 files back): from prebuilt binaries (the GPU machines
# have no Rust toolchain; README, "Checking on a GPU"):
#   SEGK_BIN=target/x86_64-unknown-linux-gnu/release/segk bash scripts/gpu-check.sh OUT_DIR
# Environment:
#   SEGK_BIN            the segk binary (default target/release/segk)
#   DEADLINE            seconds for the whole run, counted from the start (default 420): each
#                       step runs under `timeout`, capped at what is left; a step that needs
#                       more than is left is skipped with a line saying so
#   SEGK_GPU_BENCH_BIN  the criterion GPU bench (benches/gpu.rs), run when given
#   SMOKE=1             toy sizes for every step, so the script runs end to end on the fake
#                       driver (README, "The fake driver"); steps whose tools are absent (python3
#                       with torch, compute-sanitizer) are skipped with a line saying so
#   SELFTEST_ONLY=F,..  pass `--only F,..` to the selftest (families conv, norm, loss, misc,
#                       transfer, step); ignored, with a line saying so, by a segk without --only
#   COMPUTE_SANITIZER   its path (default: on PATH or under /usr/local/cuda); `none`: no
#                       sanitizer steps
# Order: environment (version, doctor, nvidia-smi); the selftest (on a failure: the failing
# families again with CUDA_LAUNCH_BLOCKING=1 and under compute-sanitizer memcheck, then stop);
# the 3d_fullres step beside PyTorch's; then as time allows the 5-stage step beside PyTorch's,
# `bench kernels`, the step on the simple convs, at checkpoint levels 0 and 2, the criterion
# bench; last racecheck on the conv kernels. The emulator selftest, loader, train and demo runs
# are in scripts/gpu-later.sh.
# Output, at most 3 files in OUT_DIR, updated as each step ends: summary.txt (each step's
# status and seconds and its key lines), all.log (everything printed, each step under a header
# with its command), results.json (one JSON object per step and line). Exit status 1 if a step
# failed or timed out (skipped steps do not count), 2 on bad usage.
# Sourcing this file (as scripts/gpu-later.sh does) defines the step machinery only.

# ---- the step machinery ----------------------------------------------------------------------

# setup OUT_DIR: the output files, the scratch folder (outside OUT_DIR), the traps.
setup() {
  out=$1
  mkdir -p "$out" || exit 2
  out=$(cd "$out" && pwd)
  summary=$out/summary.txt log=$out/all.log results=$out/results.json
  : >"$summary"; : >"$log"; : >"$results"
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/segk-gpu-check.XXXXXX") || exit 2
  deadline=${DEADLINE:-420}
  # Kept back from the deadline: a step killed at its limit gets 10 s to go (timeout -k).
  margin=10
  [ "$deadline" -lt 60 ] && margin=1
  smoke=${SMOKE:-0}
  status=0 stop_reason="" cur="" cur_name="" n_ok=0 n_failed=0 n_timeout=0 n_skipped=0
  trap finish EXIT
  trap 'interrupted=1; [ -n "$cur" ] && kill -TERM "$cur" 2>/dev/null; exit 1' TERM INT HUP
  interrupted=0
}

# finish: the closing summary line; removes the scratch folder. Runs on every exit.
finish() {
  local rc=$?
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  [ "$interrupted" = 1 ] && say "interrupted (a signal) after $SECONDS s${cur_name:+, in step $cur_name (its output is in all.log)}: the steps after it did not run"
  say "done in $SECONDS s of $deadline: $n_ok ok, $n_failed failed, $n_timeout timed out, $n_skipped skipped; exit $status"
  rm -rf "$tmp"
  exit "$status"
}

say() { printf '%s\n' "$*" >>"$summary"; printf '%s\n' "$*"; }
note() { notes+=("$*"); }

# A JSON string of $1.
js() {
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\t'/\\t}; s=${s//$'\n'/\\n}; s=${s//$'\r'/}
  printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\010\013-\037')"
}
# A JSON number of $1, or null.
jn() { if [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; then printf '%s' "$1"; else printf null; fi; }

# record NAME COMMAND STATUS SECONDS EXIT: one line of results.json (with $extra: ',"k":v...')
# and the step's lines in summary.txt (with $notes).
record() {
  local name=$1 cmd=$2 st=$3 secs=$4 rc=$5 line
  printf '{"name":%s,"command":%s,"status":%s,"seconds":%s,"exit_code":%s%s}\n' "$(js "$name")" "$(js "$cmd")" "$(js "$st")" "$(jn "$secs")" "$(jn "$rc")" "$extra" >>"$results"
  case $st in
    ok) line=$(printf 'ok        %-40s %6s s' "$name" "$secs"); n_ok=$((n_ok + 1)) ;;
    failed) line=$(printf 'FAILED    %-40s %6s s  (exit %s)' "$name" "$secs" "$rc"); n_failed=$((n_failed + 1)) ;;
    timeout) line=$(printf 'TIMED OUT %-40s %6s s  (its limit)' "$name" "$secs"); n_timeout=$((n_timeout + 1)) ;;
    cut) line=$(printf 'CUT       %-40s %6s s  (by the deadline: rerun with a larger DEADLINE)' "$name" "$secs"); n_skipped=$((n_skipped + 1)) ;;
    skipped) line="skipped $name: $reason"; n_skipped=$((n_skipped + 1)); [ -n "$rc" ] && line+=" (ran $secs s, exit $rc)" ;;
  esac
  say "$line"
  local n
  for n in ${notes[@]+"${notes[@]}"}; do say "    $n"; done
}

# skip NAME COMMAND REASON
skip() {
  extra=",\"reason\":$(js "$3")" notes=() reason=$3
  record "$1" "$2" skipped 0 ""
  printf '\n==== [+%ds] skipped %s: %s\n' "$SECONDS" "$1" "$3" >>"$log"
}

# step NAME NEED CAP CMD...: runs CMD under timeout (CAP seconds at most, never past the
# deadline less the margin) unless the script stopped or fewer than NEED seconds are left.
# Its output goes to all.log (and $tmp/NAME.log for the parsers); then PARSE (a function
# named by the caller's PARSE=..., reading $steplog) adds key figures, and the step is
# recorded. SOFT=1 (or a parser setting soft=1): a failure does not count in the exit status.
# Returns 0 if the step ran and passed; sets step_status.
step() {
  local name=$1 need=$2 cap=$3; shift 3
  local cmd="$*" left t before t0 t1 rc secs soft=${SOFT:-0}
  extra="" notes=() reason="" step_status=skipped steplog=$tmp/$name.log
  : >"$steplog"
  if [ -n "$stop_reason" ]; then skip "$name" "$cmd" "$stop_reason"; return 1; fi
  left=$((deadline - SECONDS - margin))
  if [ "$left" -lt "$need" ]; then skip "$name" "$cmd" "$left s left, needs ~$need s"; return 1; fi
  t=$((cap < left ? cap : left))
  printf '\n==== [+%ds] %s (timeout %d s): %s\n' "$SECONDS" "$name" "$t" "$cmd" >>"$log"
  before=$(wc -l <"$log")
  t0=$(date +%s.%N)
  timeout -k 10 "$t" "$@" </dev/null >>"$log" 2>&1 &
  cur=$! cur_name=$name
  wait "$cur"
  rc=$?
  cur="" cur_name=""
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  tail -n +"$((before + 1))" "$log" >"$steplog"
  if [ "$rc" -eq 0 ]; then step_status=ok
  elif { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$t" -lt "$cap" ]; then step_status=cut
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then step_status=timeout
  else step_status=failed
  fi
  printf '==== %s: %s, exit %d, %s s\n' "$name" "$step_status" "$rc" "$secs" >>"$log"
  [ -n "${PARSE:-}" ] && "$PARSE"
  if [ "$step_status" = failed ] || [ "$step_status" = timeout ]; then
    # The last lines it printed, for the reason, where the parser found none.
    local l
    [ ${#notes[@]} -eq 0 ] &&
      while IFS= read -r l; do note "| $l"; done < <(grep -v '^[[:space:]]*$' "$steplog" | tail -n 3 | cut -c1-200)
    [ "$soft" = 1 ] || status=1
  fi
  record "$name" "$cmd" "$step_status" "$secs" "$rc"
  [ "$step_status" = ok ]
}

# ---- parsers: read $steplog, add to $extra and notes -----------------------------------------

# `segk bench step`: the median line, the memory line(s), the device line (in the summary
# where $show_device is set).
parse_bench_step() {
  local med mem dev v
  med=$(grep -E '^[[:space:]]*step[[:space:]]+median' "$steplog" | tail -n 1 | sed -E 's/^[[:space:]]+//; s/[[:space:]]+/ /g')
  dev=$(grep -E '^[[:space:]]*device[[:space:]]' "$steplog" | head -n 1 | sed -E 's/^[[:space:]]*device[[:space:]]+//')
  mem=$(grep -iE '^[[:space:]]*(memory|peak|gpu mem)' "$steplog" | sed -E 's/^[[:space:]]+//; s/[[:space:]]+/ /g')
  [ -n "$dev" ] && extra+=",\"device\":$(js "$dev")"
  [ -n "$dev" ] && [ -n "${show_device:-}" ] && note "device $dev"
  if [ -n "$med" ]; then
    note "$med"
    extra+=",\"step_line\":$(js "$med")"
    v=$(sed -nE 's/.*median ([0-9.]+) s.*/\1/p' <<<"$med"); extra+=",\"step_median_s\":$(jn "$v")"
    v=$(sed -nE 's/.*\(min ([0-9.]+).*/\1/p' <<<"$med"); extra+=",\"step_min_s\":$(jn "$v")"
    v=$(sed -nE 's/.*max ([0-9.]+).*/\1/p' <<<"$med"); extra+=",\"step_max_s\":$(jn "$v")"
    last_median=$(sed -nE 's/.*median ([0-9.]+) s.*/\1/p' <<<"$med")
  else
    last_median=""
  fi
  if [ -n "$mem" ]; then
    local l
    while IFS= read -r l; do note "$l"; done <<<"$mem"
    extra+=",\"memory\":$(js "$mem")"
    v=$(grep -oE 'peak RSS [0-9.]+ [KMG]iB' <<<"$mem" | head -n 1 | sed 's/peak RSS //'); [ -n "$v" ] && extra+=",\"peak_rss\":$(js "$v")"
    v=$(grep -oiE '(peak (gpu|device)[^,]*|gpu mem[^,]*)' <<<"$mem" | head -n 1); [ -n "$v" ] && extra+=",\"peak_gpu\":$(js "$v")"
  fi
  return 0
}

# bench/torch_step.py: its JSON line, and the ratio to segk's median $segk_median (if any).
parse_torch_step() {
  local j
  j=$(grep -E '^\{' "$steplog" | tail -n 1)
  last_median=""
  [ -n "$j" ] || return 0
  local line
  line=$(python3 -c 'import json,sys
d = json.loads(sys.argv[1])
g = d.get("peak_gpu_bytes")
print("%s\t%s\t%s" % (d["step_median_s"], "%.2f GiB" % (g / 2**30) if g else "n/a", d.get("peer", "")))' "$j" 2>/dev/null) || return 0
  local med peak peer
  IFS=$'\t' read -r med peak peer <<<"$line"
  note "$(printf 'step median %.3f s (torch), peak GPU memory %s (%s)' "$med" "$peak" "$peer")"
  extra+=",\"step_median_s\":$(jn "$med"),\"peak_gpu\":$(js "$peak"),\"peer\":$(js "$peer")"
  last_median=$med
  if [ -n "${segk_median:-}" ]; then
    local r
    r=$(awk -v a="$segk_median" -v b="$med" 'BEGIN { if (b > 0) printf "%.2f", a / b }')
    note "segk/torch: $segk_median s / $(printf '%.3f' "$med") s = $r ($segk_what)"
    extra+=",\"segk_step_median_s\":$(jn "$segk_median"),\"ratio_segk_over_torch\":$(jn "$r")"
  fi
}

# `segk bench kernels`: the device line only (the table is in all.log).
parse_kernels() {
  local n
  n=$(grep -cE ' (ms|us) ' "$steplog")
  note "$n ops timed (the table is in all.log)"
  extra+=",\"ops\":$(jn "$n")"
}

# criterion: each benchmark's time line.
parse_criterion() {
  local l
  while IFS= read -r l; do note "$l"; done < <(awk '/time:/ { if ($1 == "time:") print prev " " $0; else print $0 } { prev = $0 }' "$steplog" | sed -E 's/[[:space:]]+/ /g' | head -n 30)
}

# compute-sanitizer: its first reports (what, which kernel, where) and its error summary; a
# device it cannot instrument is no failure of segk.
parse_sanitizer() {
  local l
  while IFS= read -r l; do note "$l"; done < <(grep -E '^=========' "$steplog" | grep -vE 'COMPUTE-SANITIZER|Saved host backtrace|Host Frame|^=========[[:space:]]*$|SUMMARY' | head -n 8)
  while IFS= read -r l; do note "$l"; done < <(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$steplog" | tail -n 2)
  while IFS= read -r l; do note "$l"; done < <(grep -oE "[0-9]+ passed, [0-9]+ failed|selftest stopped in .*" "$steplog" | tail -n 2)
  if [ "$step_status" = failed ] && grep -q 'Device not supported' "$steplog"; then
    step_status=skipped reason="compute-sanitizer cannot instrument this GPU here (Device not supported: a gVisor machine?)"
  fi
}

# The selftest: counts, failing checks, the family where it stopped; sets failing_families.
parse_selftest() {
  local counts stopped l
  counts=$(grep -oE '[0-9]+ passed, [0-9]+ failed' "$steplog" | tail -n 1)
  stopped=$(grep -oE 'selftest stopped in [^ ]+ .*' "$steplog" | tail -n 1)
  failing_families=$(awk '/^-- / { fam = $2 } /^[[:space:]]*FAIL[[:space:]]/ { print (fam == "" ? "?" : fam) }' "$steplog" | sort -u | tr '\n' ',' | sed 's/,$//')
  local stop_fam
  stop_fam=$(sed -nE 's/^selftest stopped in ([^ ]+) .*/\1/p' <<<"$stopped")
  [ -n "$stop_fam" ] && failing_families=$(printf '%s\n' ${failing_families//,/ } "$stop_fam" | sort -u | tr '\n' ',' | sed 's/,$//')
  # Timed out: the family it was in.
  if [ "$step_status" = timeout ]; then
    local last
    last=$(awk '/^-- / { fam = $2 } END { print fam }' "$steplog")
    [ -n "$last" ] && failing_families=$(printf '%s\n' ${failing_families//,/ } "$last" | sort -u | tr '\n' ',' | sed 's/,$//')
  fi
  [ -n "$counts" ] && note "$counts"
  [ -n "$stopped" ] && note "$stopped"
  local fails nf
  fails=$(grep -E '^[[:space:]]*FAIL[[:space:]]' "$steplog" | sed -E 's/^[[:space:]]+//; s/[[:space:]]+/ /g')
  nf=$(grep -cE '^[[:space:]]*FAIL[[:space:]]' "$steplog")
  if [ "$nf" -gt 0 ]; then
    while IFS= read -r l; do note "$l"; done < <(head -n 30 <<<"$fails")
    [ "$nf" -gt 30 ] && note "... and $((nf - 30)) more FAIL lines in all.log"
  fi
  local p f
  p=$(sed -nE 's/^([0-9]+) passed.*/\1/p' <<<"$counts"); f=$(sed -nE 's/.* ([0-9]+) failed/\1/p' <<<"$counts")
  extra+=",\"passed\":$(jn "$p"),\"failed\":$(jn "$f")"
  [ -n "$stopped" ] && extra+=",\"stopped\":$(js "$stopped")"
  [ -n "$failing_families" ] && extra+=",\"failing_families\":$(js "$failing_families")"
  if [ "$nf" -gt 0 ]; then
    extra+=",\"failing_checks\":[$(head -n 200 <<<"$fails" | while IFS= read -r l; do printf '%s,' "$(js "$l")"; done | sed 's/,$//')]"
  fi
  # A FAIL line or a stop is a failure even where the exit status says otherwise.
  if [ "$step_status" = ok ] && { [ "$nf" -gt 0 ] || [ -n "$stopped" ]; }; then step_status=failed; fi
  # A selftest that exits 0 without its count line did not run its checks.
  if [ "$step_status" = ok ] && [ -z "$counts" ]; then step_status=failed; note "no 'N passed, M failed' line"; fi
  return 0
}

# Paths given relative to where the script was started, made absolute (the script runs in the
# repository root).
abspath() { case $1 in /*|"") printf '%s' "$1" ;; *) if [ -e "$1" ]; then printf '%s/%s' "$PWD" "$1"; else printf '%s' "$1"; fi ;; esac; }

# compute-sanitizer: $COMPUTE_SANITIZER (none: not used), on PATH, or where CUDA images keep it.
find_sanitizer() {
  local c=${COMPUTE_SANITIZER:-}
  [ "$c" = none ] && return
  [ -n "$c" ] && { printf '%s' "$c"; return; }
  c=$(command -v compute-sanitizer 2>/dev/null) && { printf '%s' "$c"; return; }
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    [ -x "$c" ] && { printf '%s' "$c"; return; }
  done
}

# Sourced: the machinery only.
[ "${BASH_SOURCE[0]}" != "$0" ] && return 0

# ---- the check -------------------------------------------------------------------------------

set -u
if [ $# -ne 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  echo "usage: [SEGK_BIN=...] [DEADLINE=420] [SMOKE=1] [SEGK_GPU_BENCH_BIN=...] [SELFTEST_ONLY=F,..] bash scripts/gpu-check.sh OUT_DIR" >&2
  exit 2
fi
outdir=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2
bin=$(abspath "${SEGK_BIN:-target/release/segk}")
gpu_bench=$(abspath "${SEGK_GPU_BENCH_BIN:-}")
cd "$(dirname "$0")/.." || exit 2
setup "$outdir"
export PYTHONUNBUFFERED=1

if [ "$smoke" = 1 ]; then
  # Toy sizes: each step a second or two on the fake driver.
  toy="--stages 2 --patch 8,8,8 --batch 1 --warmup 0 --steps 1"
  s6="$toy" s5="$toy" t6="--stages 2 --patch 8 8 8 --batch 1 --warmup 0 --steps 1" t5="$t6"
  kernels="--patch 8,8,8 --stages 2 --batch 1 --reps 1"
  criterion_args="--bench --warm-up-time 0.1 --measurement-time 0.1 --sample-size 10"
  # step NEED/CAP in seconds: selftest, headline, others.
  need_self=60 cap_self=300 need_big=2 cap_big=60 need_small=2 cap_small=60
  need_fix=10 cap_fix=120 need_crit=10 cap_crit=120 need_race=10 cap_race=120
else
  s6="--stages 6 --patch 128,128,128 --batch 2 --warmup 2 --steps 10"
  s5="--stages 5 --patch 80,96,80 --batch 2 --warmup 2 --steps 10"
  t6="--stages 6 --patch 128 128 128 --batch 2 --warmup 2 --steps 10"
  t5="--stages 5 --patch 80 96 80 --batch 2 --warmup 2 --steps 10"
  kernels=""
  criterion_args="--bench"
  need_self=30 cap_self=180 need_big=40 cap_big=150 need_small=20 cap_small=100
  need_fix=30 cap_fix=150 need_crit=90 cap_crit=200 need_race=60 cap_race=300
fi
say "segk GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), bin $bin, deadline $deadline s$([ "$smoke" = 1 ] && echo ', SMOKE (toy sizes)')"

# 1. Environment.
# segk's commit and the kernels' nvcc release, for recording the figures.
PARSE=parse_version
parse_version() {
  local l
  while IFS= read -r l; do note "$l"; done < <(grep -v '^[[:space:]]*$' "$steplog" | head -n 4 | cut -c1-200)
}
if ! step version 1 30 "$bin" --version; then
  [ "$step_status" = skipped ] || stop_reason="$bin does not run (see version)"
fi
PARSE=""
PARSE=parse_doctor_lines
parse_doctor_lines() {
  local l
  while IFS= read -r l; do note "$l"; done < <(grep -iE '^(GPU|CUDA|libcuda|driver|nvidia)' "$steplog" | head -n 8)
}
step doctor 2 60 "$bin" doctor
PARSE=""
if command -v nvidia-smi >/dev/null; then
  PARSE=parse_doctor_lines SOFT=1 step nvidia-smi 2 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  PARSE=""
else
  say "nvidia-smi not on PATH"
fi
have_torch=""
if [ "$smoke" = 1 ] && ! python3 -c 'import torch' >/dev/null 2>&1; then
  torch_missing="python3 has no torch (SMOKE)"
elif ! command -v python3 >/dev/null; then
  torch_missing="no python3"
else
  printf '\n==== [+%ds] torch probe: python3 -c "import torch; ..."\n' "$SECONDS" >>"$log"
  probe=$(timeout 60 python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' 2>>"$log")
  printf '%s\n' "$probe" >>"$log"
  case $probe in
    *"gpu True") have_torch=1; say "PyTorch peer: $probe" ;;
    torch*) torch_missing="torch sees no GPU ($probe)" ;;
    *) torch_missing="python3 has no torch" ;;
  esac
fi
[ -n "$have_torch" ] || say "PyTorch peer: ${torch_missing}: the torch steps are skipped"
sanitizer=$(find_sanitizer)
[ -n "$sanitizer" ] || say "compute-sanitizer not found: the sanitizer steps are skipped"

# 2. The selftest; on a failure, the failing families again, then stop.
only_ok=""
"$bin" selftest --help 2>/dev/null | grep -q -- '--only' && only_ok=1
only_args=()
if [ -n "${SELFTEST_ONLY:-}" ]; then
  if [ -n "$only_ok" ]; then only_args=(--only "$SELFTEST_ONLY")
  else say "SELFTEST_ONLY=$SELFTEST_ONLY ignored: this segk's selftest has no --only"
  fi
fi
failing_families=""
PARSE=parse_selftest step selftest "$need_self" "$cap_self" "$bin" selftest --device cuda ${only_args[@]+"${only_args[@]}"}
self_status=$step_status
PARSE=""
if [ "$self_status" = failed ] || [ "$self_status" = timeout ]; then
  # The failing families again, or all that ran where a failure's family is unknown.
  rerun=(--device cuda)
  if [ -n "$only_ok" ] && [ -n "$failing_families" ] && [[ $failing_families != *"?"* ]]; then rerun+=(--only "$failing_families")
  elif [ ${#only_args[@]} -gt 0 ]; then rerun+=("${only_args[@]}")
  fi
  if [ "$self_status" = failed ] && [ -z "$failing_families" ] && ! grep -qE 'passed, [0-9]+ failed' "$tmp/selftest.log"; then
    say "    the selftest did not get to its checks: no rerun"
  elif [ "$self_status" = timeout ] && [ -z "$failing_families" ]; then
    say "    the selftest timed out in no known family: no rerun"
  else
    PARSE=parse_selftest step selftest-launch-blocking "$need_fix" "$cap_fix" env CUDA_LAUNCH_BLOCKING=1 "$bin" selftest "${rerun[@]}"
    if [ -n "$sanitizer" ]; then
      PARSE=parse_sanitizer step selftest-memcheck "$need_fix" $((cap_fix * 2)) "$sanitizer" --tool memcheck --error-exitcode 1 "$bin" selftest "${rerun[@]}"
    else
      skip selftest-memcheck "compute-sanitizer --tool memcheck --error-exitcode 1 $bin selftest ${rerun[*]}" "compute-sanitizer not found"
    fi
    PARSE=""
  fi
  stop_reason="the selftest did not pass"
fi

# 3. The 3d_fullres headline beside PyTorch's.
torch_step() {  # torch_step NAME NEED CAP ARGS SEGK_MEDIAN SEGK_WHAT
  segk_median=$5 segk_what=$6
  if [ -z "$have_torch" ]; then skip "$1" "python3 bench/torch_step.py --device cuda $4" "$torch_missing"; return; fi
  PARSE=parse_torch_step step "$1" "$2" "$3" python3 bench/torch_step.py --device cuda $4
}
last_median=""
PARSE=parse_bench_step show_device=1 step step-6stage-128cube-ckpt1 "$need_big" "$cap_big" "$bin" bench step --device cuda --checkpointing 1 $s6
m_segk6=$last_median
[ "$step_status" = ok ] || m_segk6=""
torch_step torch-6stage-128cube "$need_big" "$cap_big" "$t6" "$m_segk6" "segk at checkpoint level 1, torch without checkpointing"

# 4. As time allows.
PARSE=parse_bench_step step step-5stage-80x96x80-ckpt0 "$need_small" "$cap_small" "$bin" bench step --device cuda --checkpointing 0 $s5
m_segk5=$last_median
[ "$step_status" = ok ] || m_segk5=""
torch_step torch-5stage-80x96x80 "$need_small" "$cap_small" "$t5" "$m_segk5" "both without checkpointing"
PARSE=parse_kernels step kernels "$need_small" "$cap_small" "$bin" bench kernels --device cuda $kernels
PARSE=parse_bench_step show_device=1 step step-6stage-128cube-ckpt1-simple-conv "$need_big" "$cap_big" env SEGK_CONV=simple "$bin" bench step --device cuda --checkpointing 1 $s6
PARSE=parse_bench_step step step-6stage-128cube-ckpt0 "$need_big" "$cap_big" "$bin" bench step --device cuda --checkpointing 0 $s6
PARSE=parse_bench_step step step-6stage-128cube-ckpt2 "$need_big" "$cap_big" "$bin" bench step --device cuda --checkpointing 2 $s6
if [ -n "$gpu_bench" ]; then
  PARSE=parse_criterion step criterion-gpu "$need_crit" "$cap_crit" "$gpu_bench" $criterion_args
else
  skip criterion-gpu "\$SEGK_GPU_BENCH_BIN $criterion_args" "SEGK_GPU_BENCH_BIN not given"
fi

# 5. Races in the conv kernels' shared memory.
race=("$bin" selftest --device cuda)
[ -n "$only_ok" ] && race+=(--only conv)
if [ -n "$sanitizer" ]; then
  PARSE=parse_sanitizer step racecheck-conv "$need_race" "$cap_race" "$sanitizer" --tool racecheck --error-exitcode 1 --kernel-name kns=conv "${race[@]}"
else
  skip racecheck-conv "compute-sanitizer --tool racecheck --error-exitcode 1 --kernel-name kns=conv ${race[*]}" "compute-sanitizer not found"
fi
exit "$status"
