#!/usr/bin/env bash
# Static instruction mix of each conv kernel's main loop (the backward branch around its
# HMMAs), from the SASS nvcc built for sm_90: instructions issued per k-step against the 32
# HMMA of a warp tile. No GPU needed; needs cuobjdump and nvdisasm, which come as PyPI wheels
# (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm; 13.2 is the oldest on PyPI, and it reads 13.0
# cubins). Usage: NVCC=... bash scripts/sass-loop.sh [kernel-name-substring]
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
names=$(cuobjdump -symbols "$work/all.cubin" | grep -o 'segk_conv[a-z_0-9]*' | sort -u | grep -- "${1:-}" || true)
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
if best is None:
    print(f"{sys.argv[2]:<32} no HMMA loop"); sys.exit()
body = [re.sub(r'^@!?U?P\w+\s+', '', t).split()[0].split('.')[0] for _, t in ins[best[0]:best[1] + 1]]
c = collections.Counter(body)
print(f"{sys.argv[2]:<32} loop {len(body):>4} instr, HMMA {c['HMMA']:>3}, per HMMA {len(body) / max(c['HMMA'], 1):5.1f}, LDGSTS {c['LDGSTS']:>3}, LDSM {c['LDSM']:>3}, kernel {len(ins):>6}")
PY
done
