"""Benchmark: the zeroth-order estimator (PZOBO) one trajectory at a time vs one batched unroll.

7-dimensional ridge regression (per-feature regularization exp(x), 50 training / 30 validation
samples, float64), GD inner dynamics. ``ZerothOrder(batched=False)`` (the previous implementation:
Q + 1 trajectories one after another) and ``ZerothOrder()`` (all trajectories in one vmapped
unroll) draw the same directions; the script reports seconds per call, the time per
(trajectory × step), the ratio and the largest difference of the two estimates.

    python -m bilevel.bench.zeroth_order --samples 2000 --steps 3000 --loop-samples 20

The one-by-one path is timed on ``--loop-samples`` directions (its cost is linear in the number of
trajectories: it is extrapolated to ``--samples``, and the report says so); the batched path runs
the full setting. Rounds are interleaved and the medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bilevel as bl

F64 = torch.float64


def ridge7(seed: int = 0) -> tuple[bl.Problem, torch.Tensor, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(seed)
    d = 7
    X, Xv = torch.randn(50, d, generator=gen, dtype=F64), torch.randn(30, d, generator=gen, dtype=F64)
    w = torch.randn(d, generator=gen, dtype=F64)
    t = X @ w + 0.3 * torch.randn(50, generator=gen, dtype=F64)
    tv = Xv @ w + 0.3 * torch.randn(30, generator=gen, dtype=F64)

    def f(x, y):
        return 0.5 * ((Xv @ y - tv) ** 2).mean()

    def g(x, y):
        return 0.5 * ((X @ y - t) ** 2).mean() + 0.5 * (torch.exp(x) * y * y).sum()

    L = float(torch.linalg.eigvalsh(X.T @ X / 50)[-1]) + 1.0
    return bl.Problem(f, g, name="ridge7"), torch.zeros(d, dtype=F64), torch.zeros(d, dtype=F64), 1 / L


def run(samples: int, steps: int, loop_samples: int, rounds: int) -> dict:
    problem, x, y0, lr = ridge7()
    dyn = bl.inner.GD(lr=lr, steps=steps)
    batched = bl.hypergrad.ZerothOrder(dyn, samples=samples, mu=1e-3, seed=0)
    loop = bl.hypergrad.ZerothOrder(dyn, samples=loop_samples, mu=1e-3, seed=0, batched=False)
    same = bl.hypergrad.ZerothOrder(dyn, samples=loop_samples, mu=1e-3, seed=0)
    diff = float((same(problem, x, y0).grad - loop(problem, x, y0).grad).abs().max())
    tb, tl = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        batched(problem, x, y0)
        tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loop(problem, x, y0)
        tl.append(time.perf_counter() - t0)
    b, lo = statistics.median(tb), statistics.median(tl)
    per_loop = lo / ((loop_samples + 1) * steps)  # s per trajectory x step, one by one
    per_batch = b / ((samples + 1) * steps)
    return {
        "samples": samples, "steps": steps, "loop_samples": loop_samples, "rounds": rounds,
        "batched_s": b, "loop_s": lo, "loop_extrapolated_s": per_loop * (samples + 1) * steps,
        "us_per_traj_step_loop": 1e6 * per_loop, "us_per_traj_step_batched": 1e6 * per_batch,
        "speedup": per_loop / per_batch, "max_abs_diff_same_directions": diff,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--loop-samples", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    r = run(a.samples, a.steps, a.loop_samples, a.rounds)
    for k, v in r.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")


if __name__ == "__main__":
    main()
