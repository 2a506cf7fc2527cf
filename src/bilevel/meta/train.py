"""The outer (meta-training) loop, as a :class:`bilevel.solvers.base.Solver` so ``bl.solve`` and
the experiment runner (progress bar, run folder, checkpoints, exact resume) drive it:

    x_{t+1} = U(x_t, (1/B) Σ_{i ∈ batch_t} ∇h_i(x_t)),     batch_t = sampler.next(B),

with U an update rule of :mod:`bilevel.inner` (default Adam, as in Finn et al. 2017). The task
sampler's draw counter is part of the checkpoint (it has ``state_dict``), so resuming is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _tree as T
from ..errors import ConfigError
from ..formulation import Problem
from ..inner import Adam, Dynamics
from ..solvers.base import Context, Solver, descend, solve
from .base import MetaLearner
from .tasks import check_tasks

__all__ = ["MetaTraining", "meta_train", "mean_ci95", "evaluate_episodes"]


class MetaTraining(Solver):
    """``learner`` (a :class:`MetaLearner`), ``sampler`` (``next(n)`` -> task batch),
    ``meta_batch`` tasks per step, ``outer`` update rule for x, ``vmap`` as in
    :meth:`MetaLearner.meta_grad`."""

    reference = "meta-training outer loop (Finn et al. 2017, Alg. 2 lines 3-10)"

    def __init__(self, learner: MetaLearner, sampler: Any, meta_batch: int = 16,
                 outer: Dynamics | None = None, vmap: bool | None = None):
        if int(meta_batch) < 1:
            raise ConfigError(f"meta_batch must be >= 1, got {meta_batch}")
        self.learner, self.sampler, self.meta_batch = learner, sampler, int(meta_batch)
        self.outer = outer if outer is not None else Adam(lr=1e-3)
        self.vmap = vmap

    def init(self, ctx: Context, xs, ys) -> dict[str, Any]:
        return {"x": xs, "y": ys, "upper": self.outer.init(xs)}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        x = T.unflatten(state["x"], ctx.xspec)
        tasks = self.sampler.next(self.meta_batch)
        g, info = self.learner.meta_grad(x, tasks, vmap=self.vmap)
        gl = T.flatten(g)[0]
        state["x"], state["upper"] = descend(self.outer, state["upper"], gl, t, ctx.project_x)
        return {"meta_loss": info["loss"], "meta_grad_norm": float(T.norm(gl))}


def meta_problem(learner: MetaLearner, tasks: Any) -> Problem:
    """A :class:`bilevel.Problem` whose upper/lower values are the mean query / support-free loss
    of ``learner`` on a fixed task batch (what ``bl.solve`` reports; y is unused)."""
    tasks = check_tasks(tasks)

    def f(x, y):
        return learner.evaluate(x, tasks)["loss"].mean()

    return Problem(f, f, name=f"meta:{type(learner).__name__}")


def meta_train(learner: MetaLearner, x0: Any, sampler: Any, steps: int, *, meta_batch: int = 16,
               outer: Dynamics | None = None, vmap: bool | None = None, monitor: Any = None,
               callback=None):
    """Run ``steps`` meta-training steps from ``x0``; returns ``bl.solve``'s result (``res.x``).
    ``monitor``: a task batch whose mean query loss is tracked (default: one batch drawn from a
    copy of the sampler's seed)."""
    if monitor is None:
        monitor = sampler.next(meta_batch)
    solver = MetaTraining(learner, sampler, meta_batch, outer, vmap)
    dummy = torch.zeros(1, dtype=T.flatten(x0)[0][0].dtype)
    return solve(meta_problem(learner, monitor), x0, dummy, solver=solver, steps=steps,
                 callback=callback)


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval, 1.96 s/√n."""
    v = values.detach().double().flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("no values")
    sd = float(v.std(unbiased=True)) if n > 1 else math.nan
    return float(v.mean()), 1.96 * sd / math.sqrt(n)


def evaluate_episodes(learner: MetaLearner, x: Any, sampler: Any, episodes: int = 600,
                      chunk: int = 100) -> dict[str, float]:
    """Mean query accuracy (classification) or MSE with 95% CI over ``episodes`` test tasks."""
    out: dict[str, list[torch.Tensor]] = {}
    left = int(episodes)
    while left > 0:
        n = min(chunk, left)
        res = learner.evaluate(x, sampler.next(n), chunk=chunk)
        for k, v in res.items():
            out.setdefault(k, []).append(v)
        left -= n
    summary: dict[str, float] = {"episodes": float(episodes)}
    for k, vs in out.items():
        m, ci = mean_ci95(torch.cat(vs))
        summary[k], summary[f"{k}_ci95"] = m, ci
    return summary
