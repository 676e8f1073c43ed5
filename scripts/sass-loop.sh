#!/usr/bin/env bash
# Static instruction mix of each kernel's main loop, from the SASS nvcc built for sm_90. Conv
# kernels (the backward branch around their HMMAs): instructions issued per k-step against the
# 32 HMMA of a warp tile. Other kernels (the innermost loops that load from global memory):
# instructions per byte a thread loads and stores there, against the ~10 a memory-bound kernel
# can afford at H100 bandwidth (29.7e12 thread-instructions/s over ~3e12 B/s). Those bytes
# include per-channel parameters that L1 serves, so per byte of HBM traffic it is higher. No GPU needed; needs cuobjdump and nvdisasm, which come as PyPI wheels
# (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm; 13.2 is the oldest on PyPI, and it reads 13.0
# cubins). Usage: NVCC=... bash scripts/sass-loop.sh [kernel-name-substring, default conv]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tools=${SASS_TOOLS_VENV:-$HOME/.cache/segk/sass-venv}
if [ ! -x "$tools/bin/python3" ] || ! ls "$tools"/lib/python3*/site-packages/nvidia/cu13/bin/nvdisasm >/dev/null 2>&1; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q "nvidia-cuda-cuobjdump==13.2.*" "nvidia-cuda-nvdisasm==13.2.*"
fi
export PATH="$(ls -d "$tools"/lib/python3*/site-packages/nvidia/cu13/bin):$PATH"
nvcc=${NVCC:-nvcc}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for f in "$here"/kernels/*.cu; do echo "#include \"$f\""; done > "$work/all.cu"
"$nvcc" -cubin -O3 -std=c++17 -arch=sm_90 -I "$here/kernels" "$work/all.cu" -o "$work/all.cubin"
names=$(cuobjdump -symbols "$work/all.cubin" | grep -o 'segk_[a-z_0-9]*' | sort -u | grep -- "${1:-conv}" || true)
for k in $names; do
  cuobjdump -sass -fun "$k" "$work/all.cubin" > "$work/$k.sass"
  python3 - "$work/$k.sass" "$k" <<'PY'
import re, sys, collections
ins = []
for l in open(sys.argv[1]):
    m = re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);', l)
    if m: ins.append((int(m.group(1), 16), m.group(2).strip()))
hmma = [a for a, t in ins if 'HMMA' in t]
best = None
for i, (a, t) in enumerate(ins):
    m = re.search(r'BRA\s.*?0x([0-9a-f]+)', t)
    if m and int(m.group(1), 16) < a and any(int(m.group(1), 16) <= h < a for h in hmma):
        lo = next(j for j, (aa, _) in enumerate(ins) if aa >= int(m.group(1), 16))
        if best is None or i - lo > best[1] - best[0]: best = (lo, i)
def op(t): return re.sub(r'^@!?U?P\w+\s+', '', t).split()[0]
def nbytes(o):
    return 16 if '.128' in o else 8 if '.64' in o else 2 if ('.U16' in o or '.S16' in o) else 1 if ('.U8' in o or '.S8' in o) else 4
if best is None:
    # No HMMA: the innermost loops (no backward branch inside) with global loads.
    loops = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r'BRA\s.*?0x([0-9a-f]+)', t)
        if m and int(m.group(1), 16) < a:
            lo = next(j for j, (aa, _) in enumerate(ins) if aa >= int(m.group(1), 16))
            loops.append((lo, i))
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi) for l2, h2 in loops)]
    shown = 0
    for lo, hi in inner:
        ops = [op(t) for _, t in ins[lo:hi + 1]]
        ld = sum(nbytes(o) for o in ops if o.startswith('LDG'))
        st = sum(nbytes(o) for o in ops if o.startswith('STG'))
        if ld == 0: continue
        shown += 1
        print(f"{sys.argv[2]:<32} loop {len(ops):>4} instr, global bytes {ld:>3} in {st:>3} out, {len(ops) / (ld + st):5.2f} instr/byte, kernel {len(ins):>6}")
    if not shown: print(f"{sys.argv[2]:<32} no loop with global loads")
    sys.exit()
body = [op(t).split('.')[0] for _, t in ins[best[0]:best[1] + 1]]
c = collections.Counter(body)
print(f"{sys.argv[2]:<32} loop {len(body):>4} instr, HMMA {c['HMMA']:>3}, per HMMA {len(body) / max(c['HMMA'], 1):5.1f}, LDGSTS {c['LDGSTS']:>3}, LDSM {c['LDSM']:>3}, kernel {len(ins):>6}")
PY
done
