"""Single float32 products, BLAS (``torch.mm``) vs oneDNN, every operand layout (issue 9).

The products of the compiled kernels' benchmarks (``bench.jax_compare``: the hypergradient
problem's 10 × 784 weights and 2500 × 784 data, the stochastic solvers' batch of 64), each with A
and B row-major ("N") or a transposed view ("T"), timed as the three ways
:mod:`bilevel._gemm` chooses from, in interleaved rounds (medians), one thread, and the way
:func:`bilevel._gemm._fastest` picks for it.

    python -m bilevel.bench gemm [--shapes 10x2500x784,...] [--rounds 7] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from typing import Any

import torch

from .. import _gemm
from ._timing import median_time

__all__ = ["main"]

SHAPES = "10x2500x784,10x784x2500,784x2500x10,2500x784x10,10x784x64,64x784x10,10x64x784"


def _operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
    return torch.randn(cols, rows).t() if transposed else torch.randn(rows, cols)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="comma list of MxKxN (C[M,N] = A[M,K] B[K,N])")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10, help="calls per way and round")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if _gemm._LINEAR is None:
        print("torch was built without oneDNN: every product is torch.mm")
        return 0
    torch.set_num_threads(1)
    rows: dict[str, Any] = {}
    print(f"{'C = A B':>16} A B  " + "  ".join(f"{w:>9}" for w in _gemm._WAYS) + "  (µs)  chosen")
    for shape in a.shapes.split(","):
        M, K, N = (int(s) for s in shape.split("x"))
        for ta, tb in itertools.product([False, True], repeat=2):
            A, B = _operand(M, K, ta), _operand(K, N, tb)
            times: dict[str, list[float]] = {w: [] for w in _gemm._WAYS}
            for _ in range(a.rounds):
                for w, fn in _gemm._WAYS.items():
                    times[w].append(median_time(lambda fn=fn, A=A, B=B: fn(A, B), a.reps, warmup=1)[0])
            med = {w: 1e6 * statistics.median(ts) for w, ts in times.items()}
            layout = f"{'T' if ta else 'N'} {'T' if tb else 'N'}"
            rows[f"{shape} {layout}"] = {"us": med, "chosen": _gemm._fastest(A, B)}
            print(f"{shape:>16} {layout}  " + "  ".join(f"{v:9.1f}" for v in med.values())
                  + f"        {rows[f'{shape} {layout}']['chosen']}", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"machine": f"torch {torch.__version__}, one thread",
                       "rounds": a.rounds, "rows": rows}, fh, indent=1)
    return 0
