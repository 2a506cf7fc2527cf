"""Inner loops inside a compiled graph: unrolled Python loop vs ``while_loop`` (issue 9).

Whole-step graphs (:mod:`bilevel.compiled_step`) trace a solver's Python loops, so a graph holds T
copies of the inner step and its compile time grows with T. ``torch._higher_order_ops.while_loop``
(JAX's ``fori_loop``) keeps one copy of the body. This benchmark measures both on the inner loop of
the double-loop solvers — T SGD steps  y ← y − ρ ∇_y g(x, y; B_k)  on the hyper-cleaning problem
of ``bench.jax_compare`` (784 × 10 softmax regression with per-sample weights, batch 64), batches
drawn before the loop and stacked (a ``while_loop`` body cannot pop a Python queue, so it indexes
them with the loop counter): compile time (inductor's on-disk graph cache off), time per call
(interleaved rounds, medians) and the largest difference to eager.

    python -m bilevel.bench loops [--steps 10,100] [--rounds 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._timing import median_time

__all__ = ["inner_loops", "main"]


def inner_loops(g: Callable[..., Tensor], lr: float) -> dict[str, Callable[..., Tensor]]:
    """The loop  y_{k+1} = y_k − lr ∇_y g(x, y_k; (A[k], lab[k], idx[k])),  k < T = len(A),  as an
    unrolled Python loop and as a ``while_loop`` (same arithmetic, same order)."""
    from torch._higher_order_ops.while_loop import while_loop

    grad_y = torch.func.grad(g, argnums=1)

    def unrolled(x: Tensor, y: Tensor, A: Tensor, lab: Tensor, idx: Tensor) -> Tensor:
        for k in range(A.shape[0]):
            y = y - lr * grad_y(x, y, (A[k], lab[k], idx[k]))
        return y

    def looped(x: Tensor, y: Tensor, A: Tensor, lab: Tensor, idx: Tensor) -> Tensor:
        T = A.shape[0]

        def cond(k: Tensor, y: Tensor) -> Tensor:
            return k < T

        def body(k: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            at = k.reshape(1)
            batch = (A.index_select(0, at)[0], lab.index_select(0, at)[0], idx.index_select(0, at)[0])
            return k + 1, y - lr * grad_y(x, y, batch)

        return while_loop(cond, body, (torch.zeros((), dtype=torch.int64), y))[1]

    return {"unrolled": unrolled, "while_loop": looped}


def _stacked(p: Any, T: int, batch: int, seed: int) -> tuple[Tensor, ...]:
    A, lab, idx = p.lower_tensors
    rows = torch.randint(A.shape[0], (T, batch), generator=torch.Generator().manual_seed(seed))
    return A[rows].contiguous(), lab[rows].contiguous(), idx[rows].contiguous()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="10,100", help="inner-loop lengths T")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20, help="calls per variant and round")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    from bilevel.problems import hyperclean

    torch.set_num_threads(1)
    torch._inductor.config.fx_graph_cache = False  # compile times without the on-disk cache
    p = hyperclean(0.5, source="mnist5k", batch_size=64, seed=0)
    loops = inner_loops(p.problem.lower, lr=0.1)
    x = torch.zeros(p.lower_tensors[0].shape[0])
    y0 = torch.zeros_like(p.y0)
    out: dict[str, Any] = {"machine": f"{torch.__version__}, one thread", "rows": {}}
    for T in (int(s) for s in a.steps.split(",")):
        data = _stacked(p, T, 64, seed=T)
        ref = loops["unrolled"](x, y0, *data)  # eager
        eager = median_time(lambda d=data: loops["unrolled"](x, y0, *d), 3, warmup=0)[0]
        row: dict[str, Any] = {"eager_ms": 1e3 * eager}
        fns = {}
        for name, fn in loops.items():
            c = torch.compile(fn, fullgraph=True, dynamic=False, backend=a.backend)
            t0 = time.perf_counter()
            got = c(x, y0, *data)
            row[f"{name}_compile_s"] = time.perf_counter() - t0
            row[f"{name}_max_abs_diff"] = float((got - ref).abs().max())
            fns[name] = c
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(a.rounds):  # interleaved rounds
            for name, c in fns.items():
                times[name].append(median_time(lambda c=c, d=data: c(x, y0, *d), a.reps, warmup=0)[0])
        for name, ts in times.items():
            row[f"{name}_ms"] = 1e3 * statistics.median(ts)
        out["rows"][T] = row
        print(f"T={T}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0
