"""Strong scaling of data-parallel hypergradients: ``bilevel bench distributed [--quick]``.

Hyper-cleaning shape (Franceschi et al. 2017): a softmax regression y = (W, b) ∈ R^{784×10+10}
trained on n lower samples with one weight σ(x_i) per sample (x ∈ R^n), validated on n_val upper
samples; synthetic Gaussian data (nothing to download), float32, one thread per process.

Workloads, each timed per outer step with 1 process (plain, no process group) and with P
processes (gloo, ``bl.distributed``, data split in contiguous shards):

* ``cg``   — one full-batch CG hypergradient (10 inner GD steps, 10 CG products);
* ``soba`` — one SOBA step on a global minibatch (split over the ranks).

Launches alternate 1, P, 1, P, ... (interleaved); the table reports medians of the per-step times
over all launches, speedup = t₁ / t_P and efficiency = speedup / P; the same for the CPU time of
the busiest rank (insensitive to other load on the machine: what P free cores would give, less
the time spent waiting for the all-reduce); plus the collectives and bytes all-reduced per step
(payload per rank) next to the number of variables.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from .. import distributed as D
from ..formulation import Problem
from ..hypergrad import CG
from ..inner import GD
from ..sampling import Minibatches
from ..solvers import SOBA, solve
from ._timing import median, one_thread

__all__ = ["main"]

_DATA: dict[str, Any] = {}


@contextlib.contextmanager
def _nothing():
    yield None


def _make_data(n: int, n_val: int, d: int = 784, k: int = 10, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, k, generator=g) / d ** 0.5
    X, Xv = torch.randn(n, d, generator=g), torch.randn(n_val, d, generator=g)
    yl = (X @ W + 0.5 * torch.randn(n, k, generator=g)).argmax(1)
    yv = (Xv @ W).argmax(1)
    _DATA.update(lower=(X, yl, torch.arange(n)), upper=(Xv, yv), n=n, d=d, k=k)


def _lower(x, y, batch):
    X, lab, idx = batch
    loss = torch.nn.functional.cross_entropy(X @ y["W"] + y["b"], lab, reduction="none")
    return (torch.sigmoid(x[idx]) * loss).mean() + 5e-3 * (y["W"] ** 2).sum()


def _upper(x, y, batch):
    X, lab = batch
    return torch.nn.functional.cross_entropy(X @ y["W"] + y["b"], lab)


PROBLEM = Problem(_upper, _lower, name="bench-hyperclean")


def _start() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    d, k = _DATA["d"], _DATA["k"]
    return torch.zeros(_DATA["n"]), {"W": torch.zeros(d, k), "b": torch.zeros(k)}


def _rank(work: str, reps: int, batch: int, parallel: bool) -> dict[str, Any]:
    """Per-step times of one workload on this rank (run by ``D.spawn``)."""
    one_thread()
    r, w = (D.rank(), D.world_size()) if parallel else (0, 1)
    lo = D.shard(*_DATA["lower"], rank=r, world=w)
    up = D.shard(*_DATA["upper"], rank=r, world=w)
    x, y = _start()
    times: list[float] = []
    cpu: list[float] = []
    stats = {"collectives": 0, "bytes": 0}
    with D.distributed() if parallel else _nothing() as red:
        if work == "cg":
            est = CG(GD(lr=0.5, steps=10), iters=10, tol=0.0)
            est(PROBLEM, x, y, lower_batch=lo, upper_batch=up)  # warm-up
            if red is not None:
                red.reset_stats()
            for _ in range(reps):
                if parallel:
                    D.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                est(PROBLEM, x, y, lower_batch=lo, upper_batch=up)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        else:
            b = min(batch // w, lo[0].shape[0], up[0].shape[0])
            stamps: list[float] = []

            def tick(t, *_):
                if t == 1 and red is not None:
                    red.reset_stats()
                stamps.append((time.perf_counter(), time.process_time()))

            solve(PROBLEM, x, y, solver=SOBA(lr_x=1.0, lr_y=0.1), steps=reps * 10 + 1, track=False,
                  lower_data=Minibatches(*lo, batch_size=b, seed=D.rank_seed(0, r)),
                  upper_data=Minibatches(*up, batch_size=b, seed=D.rank_seed(1, r)), callback=tick)
            # first step is the warm-up; then reps groups of 10 steps (per-step means)
            times = [(stamps[10 * (i + 1)][0] - stamps[10 * i][0]) / 10 for i in range(reps)]
            cpu = [(stamps[10 * (i + 1)][1] - stamps[10 * i][1]) / 10 for i in range(reps)]
            reps = reps * 10
        if red is not None:
            stats = {k: v // reps for k, v in red.reset_stats().items()}
    return {"times": times, "cpu": cpu, **stats}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilevel bench distributed", description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the parallel runs (default 2)")
    p.add_argument("--n", type=int, default=20000, help="lower samples (default 20000)")
    p.add_argument("--n-val", type=int, default=5000, help="upper samples (default 5000)")
    p.add_argument("--batch", type=int, default=512, help="SOBA global minibatch (default 512)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per launch (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved launch pairs (default 3)")
    p.add_argument("--work", default="cg,soba", help="workloads (default cg,soba)")
    p.add_argument("--quick", action="store_true", help="small sizes, one round (smoke test)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(list(argv or []))
    if a.quick:
        a.n, a.n_val, a.reps, a.rounds = 2000, 500, 1, 1
    _make_data(a.n, a.n_val)  # before forking: every process shares the same tensors
    P = a.nproc
    print(f"hyper-cleaning shape: lower {a.n}x{_DATA['d']}, upper {a.n_val}x{_DATA['d']}, "
          f"dim y = {_DATA['d'] * _DATA['k'] + _DATA['k']}, dim x = {a.n}; 1 thread per process; "
          f"{a.rounds} interleaved rounds x {a.reps} steps")
    rows = []
    for work in a.work.split(","):
        t1: list[float] = []
        tp: list[float] = []
        c1: list[float] = []
        cp: list[float] = []
        stats: dict[str, int] = {}
        for _ in range(a.rounds):
            one = D.spawn(_rank, 1, (work, a.reps, a.batch, False), timeout=600)[0]
            t1 += one["times"]
            c1 += one["cpu"]
            res = D.spawn(_rank, P, (work, a.reps, a.batch, True), timeout=600)
            tp += [max(ts) for ts in zip(*(r["times"] for r in res))]  # a step ends on the last rank
            cp += [max(ts) for ts in zip(*(r["cpu"] for r in res))]
            stats = {"collectives": res[0]["collectives"], "bytes": res[0]["bytes"]}
        m1, mp, n1, n_p = median(t1), median(tp), median(c1), median(cp)
        rows.append((work, m1, mp, m1 / mp, m1 / mp / P, n1, n_p, n1 / n_p, stats["collectives"],
                     stats["bytes"], min(t1), max(t1), min(tp), max(tp)))
    print(f"\n| workload | 1 process (s/step) | {P} processes (s/step) | speedup | efficiency "
          f"| CPU s/step: 1 process | CPU s/step: busiest of {P} | CPU-time ratio "
          "| all-reduces / step | bytes all-reduced / step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w, m1, mp, s, e, n1, n_p, r, c, b, *_ in rows:
        print(f"| {w} | {m1:.4f} | {mp:.4f} | {s:.2f}x | {100 * e:.0f}% | {n1:.4f} | {n_p:.4f} "
              f"| {r:.2f}x | {c} | {b:,} |")
    for w, *_, lo1, hi1, lop, hip in rows:
        print(f"{w}: wall-time range 1 process {lo1:.4f}-{hi1:.4f} s, {P} processes {lop:.4f}-{hip:.4f} s")
    nv = _DATA["d"] * _DATA["k"] + _DATA["k"]
    print(f"\nvariables: dim y = {nv:,} ({4 * nv:,} bytes), dim x = {a.n:,} ({4 * a.n:,} bytes)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
