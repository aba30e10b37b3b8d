"""pytest-benchmark: BALD scoring by fastbald and by the peers, each fed the input it wants.

    pytest benchmarks/test_bench_peers.py --benchmark-only            # N=50k, T=20, C=10
    FASTBALD_BENCH_SIZES=1000000x20x10,10000x50x1000 pytest benchmarks/test_bench_peers.py

The methods and their inputs are those of ``fastbald bench`` (fastbald/bench.py), which also
measures memory and accuracy and writes the summary table (benchmarks/bench_peers.py). A method
whose library is not installed is skipped. Converting the logits into each method's input is
benchmarked separately (``test_conversion``).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastbald.bench import _INPUTS, METHODS, _parse_sizes, _unavailable, make_logits

# baal 2.1.0 configures structlog through a deprecated API on import.
pytestmark = pytest.mark.filterwarnings("ignore:`structlog.threadlocal` is deprecated")
SIZES = _parse_sizes(os.environ.get("FASTBALD_BENCH_SIZES", "50000x20x10"))
_cache: dict = {}


def _input(kind: str, size: tuple[int, int, int]):
    if (kind, size) not in _cache:
        x = _cache.setdefault(("logits", size), make_logits(*size, seed=0))
        convert = _INPUTS[kind][0]
        _cache[(kind, size)] = convert(x) if convert else x
    return _cache[(kind, size)]


def _id(size) -> str:
    return "x".join(map(str, size))


@pytest.mark.parametrize("size", SIZES, ids=_id)
@pytest.mark.parametrize("key", list(METHODS))
def test_bald(benchmark, key, size):
    m = METHODS[key]
    why = _unavailable(m)
    if why:
        pytest.skip(why)
    os.environ.setdefault("TQDM_DISABLE", "1")  # batchbald_redux's progress bars
    fn = m.make()
    inp = _input(m.input, size)
    benchmark.group = f"BALD N={size[0]} T={size[1]} C={size[2]}"
    benchmark.extra_info.update(input=_INPUTS[m.input][1], threads=torch.get_num_threads())
    out = benchmark(fn, inp)
    assert len(out) == size[0]


@pytest.mark.parametrize("size", SIZES, ids=_id)
@pytest.mark.parametrize("kind", [k for k in _INPUTS if _INPUTS[k][0] is not None])
def test_conversion(benchmark, kind, size):
    x = _input("logits", size)
    benchmark.group = f"conversion N={size[0]} T={size[1]} C={size[2]}"
    benchmark.extra_info.update(to=_INPUTS[kind][1])
    benchmark(_INPUTS[kind][0], x)
