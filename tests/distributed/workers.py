"""Module-level functions run on each rank by ``bl.distributed.spawn`` (importable by the
spawned processes), and the single-process references they are compared with."""

from __future__ import annotations

import os
import time

import torch

import bilevel as bl
from bilevel import hypergrad as H
from bilevel.sampling import Minibatches, Sampler

D = 4  # features
N_LOWER, N_UPPER = 41, 33  # odd sizes: the two shards differ in size (tests the weights)


def data() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(7)
    A = torch.randn(N_LOWER, D, generator=g, dtype=torch.float64)
    b = (torch.rand(N_LOWER, generator=g, dtype=torch.float64) > 0.5).double()
    Av = torch.randn(N_UPPER, D, generator=g, dtype=torch.float64)
    bv = (torch.rand(N_UPPER, generator=g, dtype=torch.float64) > 0.5).double()
    return (A, b), (Av, bv)


def _logits(y, A):
    return A @ y["w"] + y["b"]


def lower(x, y, batch):
    """Mean logistic loss + data-independent weight decay exp(x) ‖w‖² / 2 (y is a pytree)."""
    A, b = batch
    loss = torch.nn.functional.binary_cross_entropy_with_logits(_logits(y, A), b)
    return loss + 0.5 * (torch.exp(x) * y["w"] ** 2).sum() + 0.05 * y["b"] ** 2


def upper(x, y, batch):
    A, b = batch
    return torch.nn.functional.binary_cross_entropy_with_logits(_logits(y, A), b) + 0.01 * (x ** 2).sum()


PROBLEM = bl.Problem(upper, lower, name="dist-logreg")


def start():
    x = torch.full((D,), -1.0, dtype=torch.float64)
    y = {"w": torch.zeros(D, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    return x, y


def estimators() -> dict[str, H.Estimator]:
    gd = bl.inner.GD(lr=0.5, steps=40)
    short = bl.inner.GD(lr=0.5, steps=12)
    return {
        "CG": H.CG(gd, iters=8, tol=0.0),
        "Neumann": H.Neumann(gd, iters=10),
        "FixedPoint": H.FixedPoint(gd, iters=10),
        "Reverse": H.Reverse(short),
        "Reverse-truncated-checkpointed": H.Reverse(short, truncate=8, checkpoint=True),
        "Reverse-momentum": H.Reverse(bl.inner.Momentum(lr=0.3, steps=12, momentum=0.5)),
        "Forward": H.Forward(short, chunk=2),
        "Exact": H.Exact(gd),
        "ClosedForm-upper-only": H.ClosedForm(lambda x: {"w": torch.tanh(x), "b": x.sum()}),
    }


def hypergradients(lower_batch, upper_batch) -> dict[str, torch.Tensor]:
    x, y = start()
    return {k: e(PROBLEM, x, y, lower_batch=lower_batch, upper_batch=upper_batch).grad
            for k, e in estimators().items()}


class Concat(Sampler):
    """One process fed the concatenation of the ranks' batches (the reference of a data-parallel
    stochastic run)."""

    def __init__(self, samplers):
        self.samplers = samplers

    def next(self):
        return tuple(torch.cat(p) for p in zip(*(s.next() for s in self.samplers)))

    def full(self):
        return tuple(torch.cat(p) for p in zip(*(s.full() for s in self.samplers)))


def samplers(rank: int, world: int):
    lo, up = data()
    lo = bl.distributed.shard(*lo, rank=rank, world=world)
    up = bl.distributed.shard(*up, rank=rank, world=world)
    return (Minibatches(*lo, batch_size=5, seed=bl.distributed.rank_seed(3, rank)),
            Minibatches(*up, batch_size=4, seed=bl.distributed.rank_seed(5, rank)))


def stochastic_solvers():
    return {
        "SOBA": bl.solvers.SOBA(lr_x=0.05, lr_y=0.2),
        "stocBiO": bl.solvers.StocBiO(lr_x=0.05, lr_y=0.2, inner_steps=3, Q=3, eta=0.2),
    }


def stochastic_runs(lower_data, upper_data, steps: int = 200) -> dict[str, tuple]:
    out = {}
    for k, s in stochastic_solvers().items():
        x, y = start()
        lo, up = lower_data(), upper_data()
        res = bl.solve(PROBLEM, x, y, solver=s, steps=steps, lower_data=lo, upper_data=up,
                       track=False)
        out[k] = (res.x, res.y["w"], res.y["b"])
    return out


def _sum_lower(x, y, batch):
    A, b = batch
    return (x.exp().sum() * (A @ y - b) ** 2).sum() + (y ** 2).sum()


SUM_PROBLEM = bl.Problem(_sum_lower, _sum_lower)


def sum_oracles(lo, sharded: bool):
    """(value, ∇_x, ∇_y) and H v of a *sum* objective: with reduction="sum" the ranks' results
    add up; its data-independent term ‖y‖² is then counted once per rank (documented)."""
    from bilevel.formulation import Bound

    x, y = torch.full((D,), -1.0, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
    G = Bound(SUM_PROBLEM, x, y, lower_batch=lo).G
    with bl.distributed(reduction="sum") if sharded else _nothing():
        return bl.oracles.grads(G, (x,), (y,)), bl.oracles.hvp(G, (x,), (y,), (y,))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# --- per-rank entry points --------------------------------------------------------------------
def rank_all() -> dict:
    """Everything the equality tests need, from one launch (keeps the suite fast)."""
    r, w = bl.distributed.rank(), bl.distributed.world_size()
    lo, up = data()
    lo, up = bl.distributed.shard(*lo), bl.distributed.shard(*up)
    out: dict = {}
    with bl.distributed() as red:
        out["hypergradients"] = hypergradients(lo, up)
        with bl.oracles.backend("func"):  # the torch.func backend is reduced the same way
            x, y = start()
            out["func_cg"] = estimators()["CG"](PROBLEM, x, y, lower_batch=lo, upper_batch=up).grad
        out["sum"] = sum_oracles(lo, True)
        red.reset_stats()
        x, y = start()
        est = H.CG(bl.inner.GD(lr=0.5, steps=40), iters=8, tol=0.0)
        est(PROBLEM, x, y, lower_batch=lo, upper_batch=up)
        out["cg_stats"] = red.reset_stats()
        with bl.oracles.counting():
            s_lo, s_up = samplers(r, w)
            out["stochastic"] = stochastic_runs(lambda: s_lo, lambda: s_up)
        out["soba_stats"] = None
        s_lo, s_up = samplers(r, w)
        red.reset_stats()
        x, y = start()
        bl.solve(PROBLEM, x, y, solver=bl.solvers.SOBA(), steps=10, lower_data=s_lo,
                 upper_data=s_up, track=False)
        out["soba_stats"] = red.reset_stats()
    return out


def rank_dies(mode: str) -> None:
    """Rank 1 dies (``mode="kill"``) or hangs (``"hang"``) in the middle of a CG hypergradient
    loop; rank 0 keeps calling collectives."""
    lo, up = data()
    lo, up = bl.distributed.shard(*lo), bl.distributed.shard(*up)
    est = H.CG(bl.inner.GD(lr=0.5, steps=5), iters=5, tol=0.0)
    x, y = start()
    with bl.distributed():
        for i in range(1000):
            if bl.distributed.rank() == 1 and i == 3:
                if mode == "kill":
                    os._exit(17)
                time.sleep(3600)
            est(PROBLEM, x, y, lower_batch=lo, upper_batch=up)
