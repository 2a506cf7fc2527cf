"""The outer (meta-training) loop, as a :class:`bilevel.solvers.base.Solver` so ``bl.solve`` and
the experiment runner (progress bar, run folder, checkpoints, exact resume) drive it:

    x_{t+1} = U(x_t, (1/B) Σ_{i ∈ batch_t} ∇h_i(x_t)),     batch_t = sampler.next(B),

with U an update rule of :mod:`bilevel.inner` (default Adam, as in Finn et al. 2017). The task
sampler's draw counter is part of the checkpoint (it has ``state_dict``), so resuming is exact.

Task parallel (issue 12): with a ``torch.distributed`` process group of R > 1 ranks, every rank
draws the same meta-batch (same sampler seed), keeps its contiguous block of B_r tasks
(Σ_r B_r = B), computes Σ_{i ∈ block} ∇h_i locally (vmapped), and one flat all-reduce of
(the block's mean meta-gradient, its mean loss) weighted by B_r gives the mean over all B tasks —
the single-process meta-gradient, to rounding. Per-task oracles are never reduced (a task's lower
problem lives on one rank), also when the step runs inside ``bl.distributed()``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch

from .. import _tree as T
from .. import oracles as O
from .._trace import scalar
from ..errors import ConfigError
from ..formulation import Problem
from ..inner import Adam, Dynamics
from ..solvers.base import Context, Solver, descend, solve
from ..validation import check_finite
from .base import MetaLearner
from .tasks import check_tasks

__all__ = ["MetaTraining", "meta_train", "mean_ci95", "evaluate_episodes", "sharded_meta_grad"]


class MetaTraining(Solver):
    """``learner`` (a :class:`MetaLearner`), ``sampler`` (``next(n)`` -> task batch),
    ``meta_batch`` tasks per step, ``outer`` update rule for x, ``vmap`` as in
    :meth:`MetaLearner.meta_grad`; ``task_parallel``: shard each meta-batch over the ranks of the
    active process group (None: whenever one with more than one rank is active).

    History records: ``meta_loss``, ``meta_grad_norm``, and where the method reports them
    ``inner_grad_norm`` / ``breakdowns`` (see :meth:`MetaLearner.meta_grad`); task parallel also
    ``collectives`` (1 per step) and ``local_tasks``."""

    reference = "meta-training outer loop (Finn et al. 2017, Alg. 2 lines 3-10)"

    def __init__(self, learner: MetaLearner, sampler: Any, meta_batch: int = 16,
                 outer: Dynamics | None = None, vmap: bool | None = None,
                 task_parallel: bool | None = None):
        if int(meta_batch) < 1:
            raise ConfigError(f"meta_batch must be >= 1, got {meta_batch}")
        self.learner, self.sampler, self.meta_batch = learner, sampler, int(meta_batch)
        self.outer = outer if outer is not None else Adam(lr=1e-3)
        self.vmap = vmap
        self.task_parallel = task_parallel

    def init(self, ctx: Context, xs, ys) -> dict[str, Any]:
        return {"x": xs, "y": ys, "upper": self.outer.init(xs)}

    @property
    def step_not_compilable(self) -> str | None:  # (bl.solve(..., compile=True))
        from .. import distributed as D

        if self.task_parallel or (self.task_parallel is None and D.is_active()):
            return "task-parallel meta-training all-reduces the ranks' meta-gradients eagerly"
        return None

    def prepare(self, state: dict[str, Any], t: int) -> None:
        """Draw and validate step t's task batch (``state["tasks"]``, which the step consumes),
        on the host before the step: a compiled step receives the batch as its input."""
        state["tasks"] = self.learner.check(self.sampler.next(self.meta_batch))

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        x = T.unflatten(state["x"], ctx.xspec)
        tasks = state.pop("tasks", None)
        if tasks is None:  # (a step called without prepare)
            tasks = self.learner.check(self.sampler.next(self.meta_batch))
        with O.reducing(None):  # per-task oracles stay local (inside bl.distributed() too)
            if self._parallel():
                g, info = sharded_meta_grad(self.learner, x, tasks, vmap=self.vmap)
            else:
                g, info = self.learner.checked_meta_grad(x, tasks, vmap=self.vmap)
        gl = T.flatten(g)[0]
        state["x"], state["upper"] = descend(self.outer, state["upper"], gl, t, ctx.project_x)
        rec = {"meta_loss": info["loss"], "meta_grad_norm": scalar(T.norm(gl))}
        for key in ("inner_grad_norm", "breakdowns", "collectives", "local_tasks"):
            if key in info:
                rec[key] = info[key]
        return rec

    def _parallel(self) -> bool:
        from .. import distributed as D

        active = D.is_active()
        if self.task_parallel and not active:
            raise ConfigError("task_parallel=True needs an initialized process group with more than "
                              "one rank (torchrun / bl.distributed.spawn)")
        return active if self.task_parallel is None else bool(self.task_parallel)


def sharded_meta_grad(learner: MetaLearner, x: Any, tasks: Any, *, vmap: bool | None = None,
                      group: Any = None) -> tuple[Any, dict[str, Any]]:
    """:meth:`MetaLearner.meta_grad` with the task batch sharded over the ranks of ``group``
    (every rank passes the same batch; rank r computes its contiguous block of tasks) and one
    flat all-reduce of the blocks' mean meta-gradients and losses, weighted by block size."""
    from .. import distributed as D

    tasks = learner.check(tasks)
    red = D.Reducer(group)
    n_tasks = int(tasks["support_x"].shape[0])
    if red.world > n_tasks:
        raise ConfigError(f"meta_batch {n_tasks} is smaller than the {red.world} ranks: every rank needs "
                          "at least one task")
    local = {k: v.tensor_split(red.world)[red.rank] for k, v in tasks.items()}
    use_vmap = learner.vmappable if vmap is None else bool(vmap)
    gsum, per_task, diag = learner.task_sum_grad(x, local, vmap=use_vmap)
    n = int(per_task.shape[0])
    leaves = [t / n for t in T.flatten(gsum)[0]] + [per_task.mean().reshape(1)]
    out = red.reduce(SimpleNamespace(n=n), [t.detach() for t in leaves])
    g = T.unflatten(tuple(out[:-1]), T.flatten(x)[1])
    check_finite(T.flatten(g)[0], "upper", f"the {type(learner).__name__} meta-gradient")
    info = {"loss": float(out[-1]), "vmapped": use_vmap, "tasks": n_tasks, "local_tasks": n,
            "collectives": red.stats["collectives"]}
    for key, v in diag.items():  # rank-local diagnostics (this rank's tasks)
        info[key] = v
    return g, info


#: the runner's lower-level note for meta-learning runs: y is a placeholder, every task's lower
#: problem is solved inside the meta-gradient (``inner_grad_norm`` in the trace measures it)
PER_TASK_LOWER = ("each task's lower problem is solved inside the meta-gradient (inner_grad_norm in the "
                  "trace: the largest ‖∇_y g_i‖ of the meta-batch); the runner's y is a placeholder")


def meta_problem(learner: MetaLearner, tasks: Any) -> Problem:
    """A :class:`bilevel.Problem` whose upper/lower values are the mean query / support-free loss
    of ``learner`` on a fixed task batch (what ``bl.solve`` reports; y is unused)."""
    tasks = check_tasks(tasks)

    def f(x, y):
        return learner.evaluate(x, tasks)["loss"].mean()

    return Problem(f, f, name=f"meta:{type(learner).__name__}")


def meta_train(learner: MetaLearner, x0: Any, sampler: Any, steps: int, *, meta_batch: int = 16,
               outer: Dynamics | None = None, vmap: bool | None = None, monitor: Any = None,
               callback=None, compile: bool | str = False):
    """Run ``steps`` meta-training steps from ``x0``; returns ``bl.solve``'s result (``res.x``).
    ``monitor``: a task batch whose mean query loss is tracked (default: one batch drawn from a
    copy of the sampler's seed). ``compile``: as in ``bl.solve`` (True: each meta-step one
    compiled graph, the task batch drawn before it)."""
    if monitor is None:
        monitor = sampler.next(meta_batch)
    solver = MetaTraining(learner, sampler, meta_batch, outer, vmap)
    ref = T.flatten(x0)[0][0]
    dummy = torch.zeros(1, dtype=ref.dtype, device=ref.device)
    return solve(meta_problem(learner, monitor), x0, dummy, solver=solver, steps=steps,
                 callback=callback, compile=compile)


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
