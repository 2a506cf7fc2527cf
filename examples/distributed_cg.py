"""Data-parallel hypergradient: 2 local processes (gloo), each with half of the data, give the
hypergradient of one process on all of it.

    python examples/distributed_cg.py

The same per-rank code runs under ``torchrun --nproc-per-node N script.py`` (then call
``bl.distributed.init()`` instead of ``spawn``); see docs/distributed.md.
"""

import torch

import bilevel as bl

g = torch.Generator().manual_seed(0)
f64 = torch.float64
A, b = torch.randn(1000, 20, generator=g, dtype=f64), torch.randn(1000, generator=g, dtype=f64)
Av, bv = torch.randn(300, 20, generator=g, dtype=f64), torch.randn(300, generator=g, dtype=f64)


def lower(x, y, batch):  # mean over the batch + a data-independent ridge term exp(x) ‖y‖² / 2
    X, t = batch
    return 0.5 * ((X @ y - t) ** 2).mean() + 0.5 * (x.exp() * y ** 2).sum()


def upper(x, y, batch):
    X, t = batch
    return 0.5 * ((X @ y - t) ** 2).mean()


problem = bl.Problem(upper, lower)
est = bl.hypergrad.CG(bl.inner.GD(lr=0.5, steps=50), iters=20, tol=0.0)
x0, y0 = torch.zeros(20, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)


def per_rank():
    """What each rank runs: its shard of both data sets, oracles reduced over the ranks."""
    with bl.distributed() as r:
        res = est(problem, x0, y0, lower_batch=bl.distributed.shard(A, b),
                  upper_batch=bl.distributed.shard(Av, bv))
    return res.grad, r.stats


if __name__ == "__main__":
    (g0, stats), (g1, _) = bl.distributed.spawn(per_rank, 2)
    single = est(problem, x0, y0, lower_batch=(A, b), upper_batch=(Av, bv)).grad
    print(f"max |2 ranks - 1 process| = {float((g0 - single).abs().max()):.2e}")
    print(f"ranks agree: {bool(torch.equal(g0, g1))}")
    print(f"all-reduces: {stats['collectives']}, bytes per rank: {stats['bytes']}")
