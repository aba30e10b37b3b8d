#!/usr/bin/env bash
# CUDA build check (no GPU needed): builds fastbald._C with the CUDA kernels
# (FASTBALD_FORCE_CUDA=1) for sm_80 and sm_90, with every warning an error and ptxas spills
# reported as errors, into a scratch directory (never touching the in-place build the tests use),
# then checks with cuobjdump that the library carries sm_80 and sm_90 machine code and compute_90
# PTX (so that GPUs newer than sm_90 JIT the kernels instead of failing with "no kernel image").
#
# Usage: scripts/check_cuda_build.sh [OUTDIR]
#   OUTDIR (default: a fresh temporary directory, removed at exit) receives build.log and
#   ptxas.txt (per-kernel registers / spills / shared memory).
# Environment: PYTHON (default .venv/bin/python), MAX_JOBS (default 1), CUOBJDUMP (default: the
#   CUDA toolkit's, else the one shipped in triton's wheel).
# Exit status: 0 when it compiled and both architectures and the PTX are present, non-zero otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [[ $# -ge 1 ]]; then
  OUT="$1"
  mkdir -p "$OUT"
else
  OUT="$(mktemp -d -t fastbald-cuda-build.XXXXXX)"
  trap 'rm -rf "$OUT"' EXIT
fi
ARCHS=(80 90)

fail() {
  echo "check_cuda_build: FAIL: $*" >&2
  exit 1
}

[[ -x "$PY" ]] || fail "python not found at $PY (set PYTHON)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
[[ -x "$CUDA_HOME/bin/nvcc" ]] || fail "nvcc not found under CUDA_HOME=$CUDA_HOME"

# The build runs on a copy of the sources so that ninja's files, the egg-info and the .so never
# land in the working tree.
SRC="$OUT/src"
mkdir -p "$SRC"
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/csrc" "$SRC/"
mkdir -p "$SRC/fastbald"
: >"$SRC/fastbald/__init__.py"

echo "check_cuda_build: building fastbald._C for sm_${ARCHS[0]} and sm_${ARCHS[1]} in $OUT (MAX_JOBS=${MAX_JOBS:-1})"
start=$(date +%s)
set +e
(
  cd "$SRC" &&
    FASTBALD_FORCE_CUDA=1 FASTBALD_CUDA_ONLY=1 FASTBALD_PTXAS_VERBOSE=1 \
      TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" MAX_JOBS="${MAX_JOBS:-1}" \
      "$PY" setup.py build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"
) >"$OUT/build.log" 2>&1
rc=$?
set -e
end=$(date +%s)
if [[ $rc -ne 0 ]]; then
  grep -E "error|Error|warning" "$OUT/build.log" | head -50 >&2 || true
  tail -30 "$OUT/build.log" >&2
  fail "CUDA build failed (exit $rc); full log: $OUT/build.log"
fi
echo "check_cuda_build: compiled in $((end - start)) s"

SO="$(ls "$OUT"/lib/fastbald/_C*.so 2>/dev/null | head -1)"
[[ -n "$SO" ]] || fail "no fastbald/_C*.so under $OUT/lib"

# Resource usage per kernel and architecture, from ptxas -v.
grep -E "ptxas info|ptxas warning|ptxas error|bytes stack frame" "$OUT/build.log" >"$OUT/ptxas.txt" || true
"$PY" - "$OUT/ptxas.txt" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
rows, cur = [], None
for ln in lines:
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", ln)
    if m:
        cur = {"fn": m.group(1), "arch": m.group(2)}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ln)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", ln)
    if m:
        cur["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes smem", ln)
    if m:
        cur["smem"] = int(m.group(1))
def short(fn):
    m = re.search(r"fastbald4cuda\d+(\w+?)I(.*)EEvNS0_6ParamsE", fn)
    if not m:
        return fn
    rest, args = m.group(2), []
    names = {"N3c108BFloat16E": "bf16", "N3c104HalfE": "half", "f": "float", "d": "double"}
    while rest:
        for k, v in names.items():
            if rest.startswith(k):
                args.append(v)
                rest = rest[len(k):]
                break
        else:
            return fn
    return f"{m.group(1)}<{', '.join(args)}>"
print(f"{'kernel':34s} {'arch':6s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s} {'static smem':>11s}")
bad = 0
for r in rows:
    sp = f"{r.get('spill_st', '?')}/{r.get('spill_ld', '?')}"
    print(f"{short(r['fn']):34s} {r['arch']:6s} {r.get('regs', '?'):>4} {r.get('stack', '?'):>5} {sp:>11s} {r.get('smem', 0):>11}")
    if r.get("spill_st", 0) or r.get("spill_ld", 0):
        bad += 1
if not rows:
    print("no ptxas -v report found in the build log"); sys.exit(1)
if bad:
    print(f"{bad} kernel(s) spill registers"); sys.exit(1)
EOF

# Machine code for both architectures.
CUOBJDUMP="${CUOBJDUMP:-}"
if [[ -z "$CUOBJDUMP" ]]; then
  if [[ -x "$CUDA_HOME/bin/cuobjdump" ]]; then
    CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
  else
    CUOBJDUMP="$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
  fi
fi
[[ -x "$CUOBJDUMP" ]] || fail "cuobjdump not found (set CUOBJDUMP)"
ELF="$("$CUOBJDUMP" --list-elf "$SO")" || fail "cuobjdump --list-elf failed on $SO"
echo "$ELF"
for a in "${ARCHS[@]}"; do
  grep -q "sm_${a}" <<<"$ELF" || fail "$SO carries no sm_${a} machine code"
done
# PTX of the newest architecture, for the JIT on newer GPUs.
PTX="$("$CUOBJDUMP" --list-ptx "$SO")" || fail "cuobjdump --list-ptx failed on $SO"
echo "$PTX"
grep -q "sm_${ARCHS[-1]}\|compute_${ARCHS[-1]}" <<<"$PTX" || fail "$SO carries no compute_${ARCHS[-1]} PTX"
# The library loads (all symbols resolve against the installed torch; no GPU needed) and registers
# the CUDA implementation of the op.
"$PY" - "$SO" <<'EOF' || fail "$SO does not load or does not register fastbald::pool_scores / batchbald for CUDA"
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("fastbald._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.built_with_cuda(), "built_with_cuda() is False"
assert torch._C._dispatch_has_kernel_for_dispatch_key("fastbald::pool_scores", "CUDA"), "no CUDA kernel"
assert torch._C._dispatch_has_kernel_for_dispatch_key("fastbald::batchbald", "CUDA"), "no CUDA batchbald kernel"
print("check_cuda_build: library loads; fastbald::pool_scores and fastbald::batchbald have CUDA kernels")
EOF

echo "check_cuda_build: OK ($(basename "$SO"): sm_${ARCHS[0]} and sm_${ARCHS[1]} ELF, compute_${ARCHS[1]} PTX, no spills, $(du -k "$SO" | cut -f1) KB)"
