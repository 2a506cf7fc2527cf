"""Run on each rank by ``bl.distributed.spawn`` (tests/meta/test_task_parallel.py), and the
single-process references they are compared with."""

from __future__ import annotations

import torch

import bilevel as bl
import bilevel.meta as M
from bilevel.meta.train import sharded_meta_grad

F64 = torch.float64
B = 5  # tasks per meta-batch: 3 + 2 over two ranks (unequal blocks test the weights)


def learners() -> dict[str, M.MetaLearner]:
    ways = 3
    model = M.MLPModel([4, 5], ways)
    return {
        "maml": M.MAML(model, lr=0.2, steps=2, ways=ways),
        "imaml": M.IMAML(model, lam=0.5, inner=bl.inner.GD(lr=0.3, steps=4), cg_iters=5,
                         ways=ways),
        "r2d2": M.R2D2(model, ways=ways),
        "protonet": M.ProtoNet(model, ways=ways),
    }


def sampler(seed: int = 0) -> M.Episodes:
    g = torch.Generator().manual_seed(11)
    inputs = torch.randn(60, 4, generator=g, dtype=F64)
    labels = torch.arange(6).repeat(10)
    return M.Episodes(inputs, labels, list(range(6)), 3, 2, 2, seed=seed)


def x0(learner: M.MetaLearner):
    return learner.init(torch.Generator().manual_seed(3), F64)


def meta_grads(sharded: bool) -> dict[str, tuple]:
    out = {}
    for name, L in learners().items():
        tasks = sampler().next(B)
        out[name] = (sharded_meta_grad(L, x0(L), tasks) if sharded else L.meta_grad(x0(L), tasks))
    return out


def train(steps: int = 3):
    """3 meta-steps of MAML; inside bl.distributed() (as `bilevel run --nproc` does) when a
    process group is active: the per-task oracles must still not be reduced."""
    L = learners()["maml"]
    kw = {"steps": steps, "meta_batch": B, "outer": bl.inner.Adam(lr=0.05)}
    if bl.distributed.is_active():
        with bl.distributed():
            res = M.meta_train(L, x0(L), sampler(), **kw)
    else:
        res = M.meta_train(L, x0(L), sampler(), **kw)
    return res.x, res.history


def rank_all():
    from bilevel.bench.metalearning import task_parallel_times

    return {"grads": meta_grads(True), "train": train(),
            "bench": task_parallel_times([2], steps=1, reps=1)}  # the bench's sharded step runs
