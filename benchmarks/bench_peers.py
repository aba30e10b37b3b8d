"""BALD scoring, fastbald against baal, batchbald_redux and plain PyTorch: the summary table.

Runs ``fastbald bench`` (fastbald/bench.py: its docstring says what is measured and how) and
writes benchmarks/results/peers.md, peers.json and the bar chart peers.png.

Usage: python benchmarks/bench_peers.py [--quick] [--threads 2] [other `fastbald bench` options]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastbald

from fastbald.bench import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", "benchmarks/results/peers.md"]
    raise SystemExit(main(argv))
