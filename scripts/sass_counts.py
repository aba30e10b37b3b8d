#!/usr/bin/env python3
"""Registers, spills, shared memory and SASS instruction counts of the CUDA kernels, and the
bandwidth model built on them (csrc/cuda/NOTES.md, section 4).

No GPU is needed. The library is built exactly as ``scripts/check_cuda_build.sh`` builds it
(FASTBALD_FORCE_CUDA=1 FASTBALD_CUDA_ONLY=1, sm_80 + sm_90, -Werror, ptxas -v), with
``NVCC_APPEND_FLAGS=-lineinfo`` so that every SASS instruction carries its source line and inline
chain (line info does not change the generated code: the instruction counts are identical with and
without it). The cubins are extracted with cuobjdump and disassembled with ``nvdisasm -c -gi``.

What it prints:

1. ptxas: registers, stack, spill bytes, static shared memory per kernel and architecture.
2. Per kernel: total SASS instructions and a histogram by class.
3. Per kernel (``--loops``): every innermost loop of the SASS control flow (a backward branch to
   an earlier label), its source loop (file:line and function, from the line info), its
   instructions by class and, where the loop's work per iteration is identifiable, its
   instructions per logit. Logits per iteration: the number of MUFU.EX2 in the body for the loops
   that exponentiate every logit once (rows, columns in one-array mode, the item kernel's row
   loop, the stream kernel's column passes); loaded bytes / element size for the global-load
   loops; shared loads / loads per logit for the tile kernel's max and column loops.
4. The model: for each reference shape and dtype, the kernel the planner picks (the emulator in
   plan-only mode: the same plan.h), its instructions per logit from the counts above, and the
   modelled fraction of H200 HBM bandwidth (see ``MACHINE``).

Usage:
  scripts/sass_counts.py                       # build into a temporary directory, print the tables
  scripts/sass_counts.py --build-dir DIR       # reuse DIR from an earlier run (or build into it)
  scripts/sass_counts.py --loops --kernel item_kernel<float, 10>
Environment: PYTHON (default .venv/bin/python), CUOBJDUMP / NVDISASM (default: triton's wheel).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")

# ---------------------------------------------------------------------------------------------
# The machine model (H200 SXM).
MACHINE = {
    "name": "H200 SXM",
    "hbm_bytes_per_s": 4.8e12,
    "sms": 132,
    "clock_hz": 1.98e9,  # boost
    "issue_per_sm_clk": 4 * 32,  # 4 schedulers, each issues 1 warp-instruction (32 threads) per clock
    "mufu_per_sm_clk": 16,  # MUFU (ex2, lg2, rcp, sqrt, rsq) results per clock per SM
    "smem_bytes_per_sm_clk": 128,  # shared-memory bandwidth (32 banks x 4 bytes), conflict-free
}

SHAPES = [(1_000_000, 20, 10), (100_000, 20, 100), (10_000, 50, 1000), (1_000, 100, 10_000)]
DTYPES = {"fp32": ("float", 4), "bf16": ("bf16", 2)}


def sh(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def tool(name: str, py: str) -> str:
    env = os.environ.get(name.upper())
    if env:
        return env
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    if cuda.exists():
        return str(cuda)
    tdir = sh([py, "-c", "import os, triton; print(os.path.dirname(triton.__file__))"]).strip()
    return os.path.join(tdir, "backends", "nvidia", "bin", name)


# ---------------------------------------------------------------------------------------------
# Build.


def build(out: Path, py: str) -> Path:
    so = sorted(glob.glob(str(out / "lib" / "fastbald" / "_C*.so")))
    if so and (out / "build.log").exists():
        return Path(so[0])
    env = dict(os.environ, NVCC_APPEND_FLAGS=(os.environ.get("NVCC_APPEND_FLAGS", "") + " -lineinfo").strip())
    print(f"sass_counts: building with scripts/check_cuda_build.sh into {out} (a few minutes)", file=sys.stderr)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda_build.sh"), str(out)], env=env, text=True,
                       capture_output=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit("sass_counts: the CUDA build failed")
    return Path(sorted(glob.glob(str(out / "lib" / "fastbald" / "_C*.so")))[0])


# ---------------------------------------------------------------------------------------------
# Names.

_TYPES = {"N3c108BFloat16E": "bf16", "N3c104HalfE": "half", "f": "float", "d": "double"}


def short_name(fn: str) -> str:
    m = re.search(r"fastbald4cuda\d+(\w+?)I(.*)EEvNS0_6ParamsE", fn)
    if not m:
        return fn
    rest, args = m.group(2), []
    while rest:
        for k, v in _TYPES.items():
            if rest.startswith(k):
                args.append(v)
                rest = rest[len(k):]
                break
        else:
            mi = re.match(r"Li(\d+)E", rest)
            mb = re.match(r"Lb([01])E", rest)
            if mi:
                args.append(mi.group(1))
                rest = rest[mi.end():]
            elif mb:
                args.append("true" if mb.group(1) == "1" else "false")
                rest = rest[mb.end():]
            else:
                return fn
    return f"{m.group(1)}<{', '.join(args)}>"


# ---------------------------------------------------------------------------------------------
# ptxas -v.


def ptxas_table(log: str) -> dict[tuple[str, str], dict]:
    rows: dict[tuple[str, str], dict] = {}
    cur = None
    for ln in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", ln)
        if m:
            cur = {}
            rows[(short_name(m.group(1)), m.group(2))] = cur
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
    return rows


# ---------------------------------------------------------------------------------------------
# SASS.


@dataclasses.dataclass
class Ins:
    addr: int
    op: str  # full opcode with modifiers, e.g. MUFU.EX2
    operands: str
    chain: tuple  # ((file, line), ...) innermost first


@dataclasses.dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    src: tuple | None = None  # (file, for-line, function)


_INS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')


def parse_sass(text: str) -> dict[str, list[Ins]]:
    funcs: dict[str, list[Ins]] = {}
    labels: dict[str, dict[str, int]] = {}
    cur = None
    chain: list[tuple[str, int]] = []
    pending: list[tuple[str, int]] = []
    for ln in text.splitlines():
        m = re.match(r"^\.text\.(\S+):", ln)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            labels[cur] = {}
            continue
        if cur is None:
            continue
        m = re.match(r"^(\.L_x_\d+):", ln)
        if m:
            labels[cur][m.group(1)] = len(funcs[cur])
            continue
        m = _LINE.search(ln)
        if m:
            pending.append((os.path.basename(m.group(1)), int(m.group(2))))
            continue
        m = _INS.match(ln)
        if m:
            if pending:
                chain = pending
                pending = []
            funcs[cur].append(Ins(int(m.group(1), 16), m.group(2), m.group(3), tuple(chain)))
    for f, ins in funcs.items():
        for i in ins:
            i.operands = i.operands
        funcs[f] = ins
    parse_sass.labels = labels  # type: ignore[attr-defined]
    return funcs


def innermost_loops(ins: list[Ins], labels: dict[str, int]) -> list[Loop]:
    """The loops of :func:`all_loops` that contain no other loop."""
    loops = all_loops(ins, labels)
    return [Loop(a, b) for a, b in loops if not any(o != (a, b) and a <= o[0] and o[1] <= b for o in loops)]


def all_loops(ins: list[Ins], labels: dict[str, int]) -> list[tuple[int, int]]:
    """Every backward branch as (first instruction, branch) index ranges, nested ones included."""
    loops = set()
    for i, x in enumerate(ins):
        if x.op.startswith("BRA"):
            t = re.search(r"\(\.L_x_\d+\)", x.operands)
            if t:
                j = labels.get(t.group(0)[1:-1])
                if j is not None and j <= i:
                    loops.add((j, i))
    return sorted(loops)


def cls(op: str) -> str:
    base = op.split(".")[0]
    if base == "MUFU":
        return "MUFU." + op.split(".")[1]
    if base in ("FFMA", "FADD", "FMUL", "FMNMX", "SHFL", "LDS", "STS", "LDG", "LDGSTS", "STG", "BRA", "BAR"):
        return base
    if base in ("FSETP", "FSEL"):
        return "FSETP/FSEL"
    if base in ("DFMA", "DADD", "DMUL", "DSETP"):
        return "FP64"
    if base.startswith("U") and base not in ("UMOV",) or base in ("UMOV", "S2UR", "R2UR"):
        return "uniform"
    return "int/other"


COLS = ["MUFU.EX2", "MUFU.LG2", "MUFU.RCP", "MUFU.SQRT", "FFMA", "FADD", "FMUL", "FMNMX", "FSETP/FSEL", "FP64",
        "SHFL", "LDS", "STS", "LDG", "LDGSTS", "STG", "BRA", "uniform", "int/other"]


def hist(ins: list[Ins]) -> collections.Counter:
    c = collections.Counter()
    for x in ins:
        c[cls(x.op)] += 1
    for k in list(c):
        if k.startswith("MUFU.") and k not in COLS:
            c["MUFU.other"] = c.get("MUFU.other", 0) + c.pop(k)
    return c


def load_bytes(x: Ins) -> int:
    if not (x.op.startswith("LDG") or x.op.startswith("LDS")):
        return 0
    for w, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1)):
        if w in x.op:
            return b
    return 4


# ---------------------------------------------------------------------------------------------
# Source structure (for-loops and functions of the kernel sources, for the line info).


class Source:
    def __init__(self, root: Path):
        self.loops: dict[str, list[tuple[int, int, str]]] = {}
        self.funcs: dict[str, list[tuple[int, int, str]]] = {}
        for p in list(root.glob("csrc/cuda/*.h")) + [root / "csrc" / "scores_math.h"]:
            if p.exists():
                self._parse(p)

    def _parse(self, p: Path) -> None:
        lines = p.read_text().splitlines()
        text = "\n".join(lines)
        starts = [0]
        for ln in lines:
            starts.append(starts[-1] + len(ln) + 1)

        def line_of(pos: int) -> int:
            lo, hi = 0, len(starts) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if starts[mid] <= pos:
                    lo = mid
                else:
                    hi = mid - 1
            return lo + 1

        def block_end(pos: int) -> int:  # pos at '{'
            d = 0
            for k in range(pos, len(text)):
                if text[k] == "{":
                    d += 1
                elif text[k] == "}":
                    d -= 1
                    if d == 0:
                        return k
            return len(text) - 1

        loops, funcs = [], []
        for m in re.finditer(r"\bfor\s*\(", text):
            d, k = 0, m.end() - 1
            while k < len(text):
                if text[k] == "(":
                    d += 1
                elif text[k] == ")":
                    d -= 1
                    if d == 0:
                        break
                k += 1
            rest = text[k + 1:]
            s = len(rest) - len(rest.lstrip())
            if rest[s:s + 1] == "{":
                end = block_end(k + 1 + s)
            else:
                end = k + 1 + rest.find(";")
            loops.append((line_of(m.start()), line_of(end), lines[line_of(m.start()) - 1].strip()))
        for m in re.finditer(r"^[ \t]*(?:static\s+)?(?:FB_DEV|FB_HD|inline)\b[^;{]*?\b(\w+)\s*\(", text, re.M):
            b = text.find("{", m.end())
            semi = text.find(";", m.end())
            if b < 0 or (0 <= semi < b):
                continue
            funcs.append((line_of(m.start()), line_of(block_end(b)), m.group(1)))
        self.loops[p.name] = loops
        self.funcs[p.name] = funcs

    def loop_of(self, chain: tuple) -> tuple | None:
        """The innermost source for-loop of the first frame (innermost first) that lies in one."""
        for f, line in chain:
            best = None
            for a, b, txt in self.loops.get(f, []):
                if a <= line <= b and (best is None or a > best[0]):
                    best = (a, b, txt)
            if best:
                return (f, best[0], self.func_of(f, best[0]), best[2])
        return None

    def func_of(self, f: str, line: int) -> str:
        best = None
        for a, b, name in self.funcs.get(f, []):
            if a <= line <= b and (best is None or a > best[0]):
                best = (a, name)
        return best[1] if best else "?"

    def in_func(self, chain: tuple, f: str, name: str) -> bool:
        return any(fr == f and self.func_of(fr, ln) == name for fr, ln in chain)


# ---------------------------------------------------------------------------------------------
# Loop costs.

# Shared loads per logit of the tile kernel's loops without an exp (two-array mode).
LDS_PER_LOGIT = {
    ("scores_math.h", "row_max"): 1,
    ("scores_math.h", "row_max_argmax_index"): 1,
    ("kernels.h", "columns", "sp = sp + *pe * *pi"): 2,
    ("kernels.h", "columns", "pe += rstep * Cp, pi += rstep)"): 4,
}


def logits_per_iter(body: list[Ins], src: tuple | None, elem: int) -> float | None:
    ex2 = sum(1 for x in body if x.op == "MUFU.EX2")
    if ex2:
        return float(ex2)
    gl = [x for x in body if x.op.startswith("LDG") or x.op.startswith("LDGSTS")]
    if gl:
        return sum(16 if "LDGSTS" in x.op else load_bytes(x) for x in gl) / elem
    if src:
        f, _, func, txt = src
        lds = sum(1 for x in body if x.op.startswith("LDS"))
        for key, per in LDS_PER_LOGIT.items():
            if key[0] == f and key[1] == func and (len(key) < 3 or key[2] in txt):
                return lds / per if lds else None
    return None


def analyse(funcs: dict[str, list[Ins]], labels: dict[str, dict[str, int]], src: Source) -> dict[str, dict]:
    res = {}
    for fn, ins in funcs.items():
        loops = innermost_loops(ins, labels[fn])
        for lp in loops:
            votes = collections.Counter(src.loop_of(x.chain) for x in ins[lp.start:lp.end + 1])
            votes.pop(None, None)
            lp.src = votes.most_common(1)[0][0] if votes else None
        res[fn] = {"ins": ins, "loops": loops, "all_loops": all_loops(ins, labels[fn])}
    return res


# ---------------------------------------------------------------------------------------------
# Plans (the emulator in plan-only mode runs plan.h's make_plan).


def emulator(py: str) -> Path:
    exe = Path(tempfile.gettempdir()) / f"fastbald-sass-emu-{os.getpid()}"
    sh(["g++", "-std=c++20", "-O1", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc/cuda/emu/emu_main.cpp"), "-o", str(exe)])
    return exe


def plan_of(exe: Path, shape: tuple, dtype_code: int, **ov) -> dict:
    N, T, C = shape
    keys = ["force_path", "force_generic", "force_one_array", "tile_budget", "block", "max_grid", "force_args",
            "force_kk", "smem_optin", "smem_per_sm", "plan_only", "seed", "row_lanes"]
    vals = {"force_path": -1, "plan_only": 1, "smem_optin": 227 * 1024, "smem_per_sm": 228 * 1024, **ov}
    hdr = struct.pack("<8s12qd13q", b"FBEMU1\0\0", dtype_code, N, T, C, T * C, C, 1, 0, 0, 0, 127, 1, 1e-4,
                      *[vals.get(k, 0) for k in keys])
    with tempfile.TemporaryDirectory() as d:
        fi, fo = Path(d) / "in", Path(d) / "out"
        fi.write_bytes(hdr)
        subprocess.run([str(exe), str(fi), str(fo)], check=True)
        b = fo.read_bytes()
    names = ("status", "bad", "path", "kk", "load_mode", "row_lanes", "two_arrays", "col_lanes", "smem", "grid",
             "cnt_mode", "Cp", "gen_order", "tnc_rows", "block", "st_nv", "st_mode")
    return dict(zip(names, struct.unpack(f"<{len(names)}q", b[:8 * len(names)]), strict=True))


# ---------------------------------------------------------------------------------------------
# The model.


def item_cost(a: dict, src: Source, T: int, C: int, G: int, elem: int) -> tuple[float, float, dict]:
    """Instructions and MUFU operations per logit of the item kernel (a group of G lanes per
    item): the row loop (per row of C logits; a group whose lanes do not all have a row in the last
    round still issues for it; two such loops, "pass1" and "pass2", in the two-pass kernel before
    the one-pass rewrite), the load loop, and the per-item code (straight-line code of items(),
    the lane's first row included, once per lane, each group-sum loop log2 G times per lane) times
    G / (T C)."""
    ins, loops = a["ins"], a["loops"]
    inloop = set()
    for lp in loops:
        inloop.update(range(lp.start, lp.end + 1))
    parts = {}
    passes = [lp for lp in loops if any(x.op == "MUFU.EX2" for x in ins[lp.start:lp.end + 1])]
    loads = [lp for lp in loops if any(x.op.startswith(("LDG", "LDGSTS")) for x in ins[lp.start:lp.end + 1])]
    shfl = [lp for lp in loops if any(x.op.startswith("SHFL") for x in ins[lp.start:lp.end + 1])
            and lp not in passes]
    rows_factor = -(-T // G) * G / T  # lanes of a group with one row less idle in the last round
    mufu = 0.0
    names = ("rows",) if len(passes) == 1 else ("pass1", "pass2")
    for name, lp in zip(names, sorted(passes, key=lambda q: q.start), strict=False):
        body = ins[lp.start:lp.end + 1]
        n = logits_per_iter(body, lp.src, elem)
        parts[name] = len(body) / n * rows_factor
        mufu += sum(1 for x in body if x.op.startswith("MUFU")) / n * rows_factor
    if loads:
        lp = max(loads, key=lambda q: q.end - q.start)  # the vector loop (the scalar one is for odd shapes)
        body = ins[lp.start:lp.end + 1]
        parts["load"] = len(body) / logits_per_iter(body, lp.src, elem)
    # Straight-line code of the per-item part (items(), outside the row loop(s) and the shuffle
    # loops) runs once per lane per item; each shuffle loop (a group sum) runs log2 G times.
    straight = [x for i, x in enumerate(ins) if i not in inloop and src.in_func(x.chain, "item_kernel.h", "items")]
    lg = max(0, G.bit_length() - 1)
    sh_ins = sum(lp.end - lp.start + 1 for lp in shfl) * lg
    parts["per item"] = (len(straight) + sh_ins) * G / (T * C)
    mufu += sum(1 for x in straight if x.op.startswith("MUFU")) * G / (T * C)
    return sum(parts.values()), mufu, parts


def tile_cost(a: dict, T: int, C: int, G: int, elem: int, plan: dict) -> tuple[float, dict]:
    """Instructions per logit of the tile kernel (the kernel before the item kernel): its hot loops
    (flat vector load, max + argmax, exp sweep, the two column loops of the planned storage mode),
    each at the SASS copy that runs for the plan's per-lane class count, and the warp-per-item
    reduce (the body of reduce()'s item loop and its class and sample loops, issued by a whole
    warp per item). The per-row and per-(item, class) straight-line code and the group shuffles
    are not counted: a lower bound."""
    ins, loops = a["ins"], a["loops"]
    two = bool(plan["two_arrays"])
    cl = -(-C // G)  # classes per lane of a row group
    cand: dict[str, list[tuple[float, float, int]]] = collections.defaultdict(list)
    for lp in loops:
        body = ins[lp.start:lp.end + 1]
        if not lp.src:
            continue
        f, _, func, txt = lp.src
        n = logits_per_iter(body, lp.src, elem)
        key = None
        if f == "scores_math.h" and func == "row_max_argmax_index":
            key = "max+arg"
        elif func == "row_exp_sum":
            key = "exp"
        elif func == "columns":
            if "sp = sp + *pe * *pi" in txt:
                key = "col1" if two else None
            elif "sp = sp + math::Ops" in txt:
                key = None if two else "col1"
            elif "pe += rstep * Cp" in txt:
                key = "col2" if two else None
            elif "pl += rstep)" in txt:
                key = None if two else "col2"
        elif func == "load_flat" and any(x.op.startswith("LDG") for x in body) and n and n >= 16 / elem * 4:
            key = "load"
        elif func == "reduce":
            key = "reduce c/t loops"
        elif func == "group_sum" and sum(1 for x in body if x.op.startswith("SHFL")) > 32:
            key = "reduce item loop"  # reduce()'s item loop: its butterflies dominate the line info
        if key is None:
            continue
        cand[key].append((len(body), n or 0, lp.start))
    best: dict[str, float] = {}
    for key, cs in cand.items():
        if key in ("reduce c/t loops", "reduce item loop"):
            per_item = sum(c[0] for c in cs) if key == "reduce c/t loops" else min(c[0] for c in cs)
            best[key] = per_item * 32 / (T * C)
            continue
        cs = [c for c in cs if c[1]]
        if not cs:
            continue
        if key in ("max+arg", "exp"):
            # The unrolled copy whose logits per iteration fit the lane's classes, else the narrowest.
            fit = [c for c in cs if c[1] <= max(1, cl - 1)]
            c = max(fit, key=lambda q: q[1]) if fit else min(cs, key=lambda q: q[1])
        elif key == "load":
            c = min(cs, key=lambda q: q[0] / q[1])
        else:
            fit = [c for c in cs if c[1] <= T]
            c = max(fit, key=lambda q: q[1]) if fit else min(cs, key=lambda q: q[1])
        best[key] = c[0] / c[1]
    return sum(best.values()), best


def stream_cost(a: dict, T: int, C: int, elem: int) -> tuple[float, dict]:
    """Instructions per logit of the stream kernel's loops (pass A: max, exp sums; pass B: the
    column loops; each reads the logit from global memory; the cheapest SASS copy of each)."""
    ins, loops = a["ins"], a["loops"]
    best: dict[str, float] = {}
    for lp in loops:
        body = ins[lp.start:lp.end + 1]
        if not lp.src:
            continue
        f, line, func, _ = lp.src
        n = logits_per_iter(body, lp.src, elem)
        key = {"row_max": "A max", "row_max_argmax_index": "A max", "row_exp_sum": "A exp"}.get(func)
        if func == "stream_body" and any(x.op == "MUFU.EX2" for x in body):
            key = f"B {line}"
        if key is None or not n:
            continue
        best[key] = min(best.get(key, 1e9), len(body) / n)
    return sum(best.values()), best


# Rows per block of the strip kernel's two-level sums (strip_kernel.h kFlush).
STRIP_FLUSH = 64


def strip_cost(a: dict, src: Source, T: int, C: int, G: int, nv: int, B: int) -> tuple[float, float, dict]:
    """Instructions and MUFU operations per logit of the strip kernel (strip_kernel.h: G lanes per
    item, NV 4-class vectors per lane, rows streamed through registers). The row loop is the
    smallest SASS loop holding the K ex2 of a row (K = 4 NV classes per lane); its instructions
    are split by their inline chain: the NaN-vote path (nan_vote(), taken only for a warp with a
    NaN row) is not counted, the first-sample shifts (set_refs()) once per item, everything else
    once per row; a loop nested in it counts its iterations (the shuffle levels of fold(),
    log2 min(G, 32); fold_warps(), the butterfly over the warps' partials: log2 (B / 32)); the
    argmax scan of the whole-block mode (owner_argmax()) counts once per row for the block's B / 32
    warps (only a warp holding the row's maximal class runs it; ties across warps are rare). The
    per-item code
    (the item loop outside the row loop) is counted once per item the same way; the two-level
    sums' flush (flush_sums(), a branch of the row loop taken every STRIP_FLUSH rows) counts
    (T - 1) // STRIP_FLUSH times per item. Per lane-class, times G K / C (the lanes' classes past C
    issue like the others)."""
    ins, loops = a["ins"], a["all_loops"]
    K = 4 * nv
    lgw = max(0, min(G, 32).bit_length() - 1)
    lgb = max(0, (B // 32).bit_length() - 1)

    def ex2(lp):
        return sum(1 for x in ins[lp[0]:lp[1] + 1] if x.op == "MUFU.EX2")

    def fn_of(x):
        return [src.func_of(f, ln) for f, ln in x.chain if f == "strip_kernel.h"]

    row = min((lp for lp in loops if ex2(lp) >= K), key=lambda q: q[1] - q[0])
    outer = [lp for lp in loops if lp[0] <= row[0] and row[1] <= lp[1] and lp != row]
    item = min(outer, key=lambda q: q[1] - q[0]) if outer else row

    def count(lo, hi, skip):
        """(per-pass instructions, set_refs + flush instructions per item, MUFU) of ins[lo:hi+1]
        minus the ranges in skip, nested loops weighted by their iteration counts."""
        mult = [1.0] * (hi - lo + 1)
        for lp in loops:
            if lo <= lp[0] and lp[1] <= hi and lp != (lo, hi) and not any(s0 <= lp[0] and lp[1] <= s1 for s0, s1 in skip):
                body = ins[lp[0]:lp[1] + 1]
                warps = sum("fold_warps" in fn_of(x) for x in body) > len(body) // 2
                it = lgb if warps else lgw
                for i in range(lp[0], lp[1] + 1):
                    mult[i - lo] *= it
        per, refs, mufu = 0.0, 0.0, 0.0
        for i in range(lo, hi + 1):
            if any(s0 <= i <= s1 for s0, s1 in skip):
                continue
            x, w = ins[i], mult[i - lo]
            f = fn_of(x)
            if "nan_vote" in f:
                continue
            if "owner_argmax" in f:
                w /= max(1, B // 32)  # run by the warp holding the row's maximal class (kMode 2)
            if "set_refs" in f:
                refs += w
            elif "flush_sums" in f:
                refs += w * ((T - 1) // STRIP_FLUSH)
            else:
                per += w
                mufu += w * x.op.startswith("MUFU")
        return per, refs, mufu

    rp, rr, rm = count(row[0], row[1], [])
    ip, ir, im = count(item[0], item[1], [row]) if item != row else (0.0, 0.0, 0.0)
    waste = G * K / C
    parts = {
        "row": rp / K * waste,
        "per item": (ip + ir + rr) / (T * K) * waste,
    }
    mufu = (rm + im / T) / K * waste
    return sum(parts.values()), mufu, parts


def item_conflict(stride: int, G: int, rw: int) -> int:
    """plan.h's item_conflict: the most distinct 4-byte words a bank serves in one wavefront of a
    warp's row reads (thread tid reads w words at (tid / G) stride + (tid % G) rw; strides in words)."""
    w = 4 if rw % 4 == 0 else (2 if rw % 2 == 0 else 1)
    per = 32 // w
    worst = 1
    for ph in range(0, 32, per):
        words = {(t // G) * stride + (t % G) * rw + i for t in range(ph, ph + per) for i in range(w)}
        for b in range(32):
            worst = max(worst, sum(1 for x in words if x % 32 == b))
    return worst


def fraction(instr_per_logit: float, mufu_per_logit: float, elem: int, out_bytes_per_logit: float,
             smem_bytes_per_logit: float = 0.0) -> tuple[float, str]:
    m = MACHINE
    bytes_per_logit = elem + out_bytes_per_logit
    t_mem = bytes_per_logit / m["hbm_bytes_per_s"]
    per_sm_clk = m["sms"] * m["clock_hz"]
    times = {
        "memory": t_mem,
        "issue": instr_per_logit / (m["issue_per_sm_clk"] * per_sm_clk),
        "MUFU": mufu_per_logit / (m["mufu_per_sm_clk"] * per_sm_clk),
        "smem": smem_bytes_per_logit / (m["smem_bytes_per_sm_clk"] * per_sm_clk),
    }
    bound = max(times, key=times.get)
    return t_mem / times[bound], bound


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", type=Path, help="build here (or reuse an earlier build here)")
    ap.add_argument("--arch", default="sm_90", help="architecture of the loop tables and the model")
    ap.add_argument("--loops", action="store_true", help="print every innermost loop")
    ap.add_argument("--kernel", default="", help="only kernels whose short name contains this")
    ap.add_argument("--force-path", type=int, default=-1,
                    help="plan override for the model (0: tile kernel, as before the item kernel existed)")
    args = ap.parse_args()
    py = os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    tmp = None
    out = args.build_dir
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="fastbald-sass-")
        out = Path(tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    so = build(out, py)
    log = (out / "build.log").read_text()
    ptx = ptxas_table(log)
    cuobjdump, nvdisasm = tool("cuobjdump", py), tool("nvdisasm", py)
    src = Source(out / "src")
    per_arch: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([cuobjdump, "-xelf", "all", str(so)], cwd=d, check=True, capture_output=True)
        for cub in sorted(Path(d).glob("*.cubin")):
            arch = re.search(r"(sm_\d+)", cub.name).group(1)
            funcs = parse_sass(sh([nvdisasm, "-c", "-gi", str(cub)]))
            per_arch[arch] = analyse(funcs, parse_sass.labels, src)  # type: ignore[attr-defined]

    # 1 + 2: resources and totals (one row per kernel: registers per architecture, SASS counts of
    # --arch).
    archs = sorted(per_arch)
    print(f"## Kernels: ptxas -v and SASS instruction counts (SASS of {args.arch})\n")
    hdr = ["kernel", *[f"regs {a}" for a in archs], "spill st/ld", "stack", "SASS", "MUFU", "FFMA", "SHFL", "LDS",
           "STS", "LDG", "LDGSTS", "BRA"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for fn in sorted(per_arch[args.arch], key=short_name):
        name = short_name(fn)
        if args.kernel and args.kernel not in name:
            continue
        h = hist(per_arch[args.arch][fn]["ins"])
        rs = [ptx.get((name, a), {}) for a in archs]
        spill = "/".join(str(max(r.get(k, 0) for r in rs)) for k in ("spill_st", "spill_ld"))
        stack = max(r.get("stack", 0) for r in rs)
        mufu = sum(v for k, v in h.items() if k.startswith("MUFU"))
        regs = " | ".join(str(r.get("regs", "?")) for r in rs)
        print(f"| {name} | {regs} | {spill} | {stack} | {len(per_arch[args.arch][fn]['ins'])} | {mufu} | "
              f"{h['FFMA']} | {h['SHFL']} | {h['LDS']} | {h['STS']} | {h['LDG']} | {h['LDGSTS']} | {h['BRA']} |")
    spills = [k for k, r in ptx.items() if r.get("spill_st") or r.get("spill_ld")]
    print(f"\n{len(ptx)} kernel builds ({', '.join(archs)}), {len(spills)} with spills\n")

    a_arch = per_arch[args.arch]
    by_short = {short_name(fn): a for fn, a in a_arch.items()}

    # 3: loops.
    if args.loops:
        print(f"## Innermost loops ({args.arch})\n")
        for name in sorted(by_short):
            if args.kernel and args.kernel not in name:
                continue
            a = by_short[name]
            elem = 2 if ("bf16" in name or "half" in name) else (8 if "double" in name else 4)
            print(f"### {name}")
            for lp in a["loops"]:
                body = a["ins"][lp.start:lp.end + 1]
                h = hist(body)
                n = logits_per_iter(body, lp.src, elem)
                where = f"{lp.src[0]}:{lp.src[1]} {lp.src[2]}" if lp.src else "?"
                per = f"{len(body) / n:.2f}/logit ({n:g} logits/iter)" if n else "-"
                top = ", ".join(f"{k} {v}" for k, v in h.most_common(8))
                print(f"- [{body[0].addr:#06x}] {len(body):4d} instr, {per}; {where}; {top}")
            print()

    # 4: the model.
    exe = emulator(py)
    m = MACHINE
    print(f"## Model ({m['name']}, {args.arch} SASS)\n")
    print(f"Issue: {m['sms']} SMs x {m['issue_per_sm_clk'] // 32} schedulers x 1 warp-instruction/clk x "
          f"{m['clock_hz'] / 1e9:.2f} GHz = {m['sms'] * m['issue_per_sm_clk'] * m['clock_hz'] / 1e12:.1f} T "
          f"thread-instructions/s; MUFU {m['mufu_per_sm_clk']}/clk/SM = "
          f"{m['sms'] * m['mufu_per_sm_clk'] * m['clock_hz'] / 1e12:.2f} T/s; HBM {m['hbm_bytes_per_s'] / 1e12:.1f} TB/s. "
          f"Shared memory {m['smem_bytes_per_sm_clk']} B/clk/SM. Time per logit = max(bytes / HBM, "
          "instructions / issue rate, MUFU / MUFU rate, shared bytes / shared bandwidth); the fraction is "
          "the HBM time over that (100% = memory bound). Bytes per logit: the input element plus its share of "
          "the 7 float outputs.\n")
    print("| N, T, C | dtype | kernel (plan) | instr/logit | MUFU/logit | parts | modelled % of HBM BW | bound |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        N, T, C = shape
        for dname, (tname, elem) in DTYPES.items():
            p = plan_of(exe, shape, 0 if elem == 4 else 3, force_path=args.force_path)
            out_b = 7 * 4 / (T * C)
            if p["path"] == 2:
                G = p["row_lanes"]
                kname = f"item_kernel<{tname}, {C}>"
                a = by_short[kname]
                tot, mufu, parts = item_cost(a, src, T, C, G, elem)
                # The tile's write by the load and its read by the row loop (one pass), the read
                # times the planned bank-conflict degree (plan.h item_conflict; te bytes per tile
                # element: the raw 2-byte input for half / bf16 with C even, else float).
                te = 2 if elem == 2 and C % 2 == 0 else 4
                stride = p["smem"] // (p["kk"] * te)
                conf = item_conflict(stride * te // 4, G, C * te // 4)
                smem_b = te + te * conf
                desc = f"item G={G} kk={p['kk']} smem={p['smem'] // 1024} KB ({'raw 2-byte' if te == 2 else 'float'} tile, {conf}-way conflicts)"
            elif p["path"] == 3:
                G = p["row_lanes"]
                nv, mode = p["st_nv"], p["st_mode"]
                kname = f"strip_kernel<{tname}, {nv}, {mode}>"
                tot, mufu, parts = strip_cost(by_short[kname], src, T, C, G, nv, p["block"])
                # Shared memory per logit: the lane-private K and p0 reads (8 bytes), their row-0 writes.
                smem_b = 8.0 + 8.0 / T
                what = ("lanes", "warp", "block")[mode]
                desc = f"strip NV={nv} G={G} ({what}) B={p['block']} smem={p['smem'] // 1024} KB"
            elif p["path"] == 0:
                G = p["row_lanes"]
                kname = f"tile_kernel<{tname}, float>"
                tot, parts = tile_cost(by_short[kname], T, C, G, elem, p)
                mufu = 2 + 2 / C
                smem_b = 0.0
                desc = (f"tile G={G} kk={p['kk']} {'two' if p['two_arrays'] else 'one'} array(s), "
                        f"col lanes {p['col_lanes']} (lower bound: no per-row/per-pair code)")
            else:
                kname = f"stream_kernel<{tname}, float>"
                tot, parts = stream_cost(by_short[kname], T, C, elem)
                mufu = 3
                smem_b = 0.0
                desc = "stream, block per item (L2 re-reads not modelled)"
            frac, bound = fraction(tot, mufu, elem, out_b, smem_b)
            ps = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
            print(f"| {N:,}, {T}, {C} | {dname} | {desc} | {tot:.1f} | {mufu:.2f} | {ps} | {100 * frac:.0f}% | {bound} |")
    exe.unlink(missing_ok=True)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
