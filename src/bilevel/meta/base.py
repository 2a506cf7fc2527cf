"""The meta-learner interface and the one place where tasks are batched with ``torch.func``.

Meta-learning as multi-task bilevel optimization (survey 2207.11719, Sec. 3.2): the upper variable
x is meta-knowledge shared by all tasks (an initialization, a feature extractor, learning rates),
every task i has its own lower problem

    y_i(x) = Alg_i(x)  ≈ argmin_y  g_i(x, y) = L(y; support_i)   (+ method-specific terms),

and the meta-objective is  h(x) = (1/B) Σ_i f_i(x, y_i(x)),  f_i = L(y_i; query_i).

A :class:`MetaLearner` describes one task's lower and upper objectives (:meth:`lower`,
:meth:`upper`), the start of the lower problem as a function of x (:meth:`start`) and a
:mod:`bilevel.hypergrad` estimator (:meth:`estimator`). Two ways to get the meta-gradient:

* ``vmap=True`` (default where supported): :meth:`query_outputs` is a pure function of
  (x, task) — the adaptation runs :func:`bilevel.inner.unroll` with ``torch.func`` gradients — and
  the mean query loss over the task batch is differentiated by ``torch.func.grad`` of a
  ``torch.func.vmap`` over tasks (:func:`batched_mean_grad`);
* ``vmap=False``: a Python loop over tasks calling the estimator on each task's
  :class:`bilevel.Problem` (the same mathematics; the tests check both agree to 1e-10 in float64).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import vmap

from .. import _tree as T
from .. import oracles as O
from ..errors import ConfigError, StructureMismatchError
from ..formulation import Problem
from ..hypergrad.base import Estimator
from ..inner import Dynamics, unroll
from ..validation import check_finite
from .tasks import check_tasks, index_tasks, num_tasks

__all__ = ["MetaLearner", "batched_mean_grad", "task_loss", "adapt", "LOSSES"]

LOSSES = ("ce", "mse")


def task_loss(kind: str, out: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy (classification) or mean squared error (regression)."""
    if kind == "ce":
        return Fn.cross_entropy(out, target)
    return ((out - target) ** 2).mean()


def batched_mean_grad(loss: Callable[[Any, Mapping[str, Tensor]], Tensor], x: Any,
                      tasks: Mapping[str, Tensor]) -> tuple[Any, Tensor]:
    """∇_x (1/B) Σ_i loss(x, task_i) and the per-task losses, with the tasks batched by
    ``torch.func.vmap`` (x shared) inside one ``torch.func.grad``: one batched forward and
    backward instead of B of each."""

    def mean_loss(x_):
        per_task = vmap(loss, in_dims=(None, 0))(x_, tasks)
        return per_task.mean(), per_task

    g, per_task = func_grad(mean_loss, has_aux=True)(x)
    return g, per_task.detach()


def adapt(dyn: Dynamics, lower: Callable[[Any, Any], Tensor], x: Any, y0: Any) -> Any:
    """y_K: ``dyn`` run from y0 on ∇_y lower(x, ·) with ``torch.func`` gradients, as a pure
    differentiable function of x (hyperparameters of ``dyn`` bound to x); vmap-safe (no host
    synchronisation: non-finite values are checked by the caller on the outputs)."""
    ys0, spec = T.flatten(y0)

    def G(xs_unused: T.Leaves, ys: T.Leaves) -> Tensor:
        return lower(x, T.unflatten(ys, spec))

    gfun = O.grad_y_fn(G)
    d = dyn.bind(x, y0)
    state, _ = unroll(d, lambda ys, k: gfun((), ys), d.init(ys0), d.steps, track=False)
    return T.unflatten(d.output(state), spec)


class MetaLearner:
    """Base class. ``loss``: ``"ce"`` (labels in ``*_y``) or ``"mse"``; ``ways``: the number of
    classes every task must have (checked against labels; None for regression)."""

    reference: str = ""
    #: False where the meta-gradient needs a solver that cannot be vmapped yet (iMAML's CG)
    vmappable: bool = True

    def __init__(self, model: Any, *, loss: str = "ce", ways: int | None = None):
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.model, self.loss, self.ways = model, loss, ways
        out = getattr(model, "out", None)
        if loss == "ce" and ways is not None and out is not None and self.uses_head and out != ways:
            raise ConfigError(f"{type(self).__name__}: the model's head has {out} outputs but the "
                              f"tasks are {ways}-way; build the model with out={ways}")

    #: whether the model's linear head is part of the method (False: R2D2, ProtoNet)
    uses_head = True
    #: the loop path passes the start as a function of x (its derivative counts: MAML) or as a
    #: fixed point (iMAML: the implicit meta-gradient does not depend on the start)
    differentiate_start = True

    # -- per task ------------------------------------------------------------------------
    def init(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
             device=None) -> Any:
        """Initial meta-parameters x."""
        return self.model.init(generator, dtype, device)

    def query_outputs(self, x: Any, task: Mapping[str, Tensor]) -> Tensor:
        """Predictions on the query set after adapting on the support set (pure, vmappable)."""
        raise NotImplementedError

    def query_loss(self, x: Any, task: Mapping[str, Tensor]) -> Tensor:
        return task_loss(self.loss, self.query_outputs(x, task), task["query_y"])

    # bilevel description, used by the loop path
    def lower(self, task: Mapping[str, Tensor]) -> Callable[[Any, Any], Tensor]:
        raise NotImplementedError

    def upper(self, task: Mapping[str, Tensor]) -> Callable[[Any, Any], Tensor]:
        raise NotImplementedError

    def start(self, x: Any) -> Any:
        """The lower problem's starting point as a function of x."""
        raise NotImplementedError

    def estimator(self) -> Estimator:
        raise NotImplementedError

    def problem(self, task: Mapping[str, Tensor]) -> Problem:
        return Problem(self.upper(task), self.lower(task), name=type(self).__name__)

    # -- batches of tasks ----------------------------------------------------------------
    def check(self, tasks: Any) -> dict[str, Tensor]:
        """Validate a task batch; labels must fit the number of ways."""
        tasks = check_tasks(tasks)
        if self.loss == "ce" and self.ways is not None:
            for field in ("support_y", "query_y"):
                lab = tasks[field]
                if lab.dtype not in (torch.int64, torch.int32):
                    raise StructureMismatchError(f"field {field!r} must hold integer class labels, "
                                                 f"got {lab.dtype}")
                top = lab.reshape(lab.shape[0], -1).amax(1)
                bad = torch.nonzero((top >= self.ways) | (lab.reshape(lab.shape[0], -1).amin(1) < 0))
                if len(bad):
                    i = int(bad[0])
                    raise StructureMismatchError(
                        f"task {i}: field {field!r} has label {int(top[i])} but the method is "
                        f"{self.ways}-way (labels must be 0..{self.ways - 1}; the head has "
                        f"{self.ways} outputs)")
        return tasks

    def meta_grad(self, x: Any, tasks: Any, *, vmap: bool | None = None) -> tuple[Any, dict[str, Any]]:
        """Mean meta-gradient over a task batch and ``{"loss": mean query loss, "vmapped": ...}``.

        ``vmap=None`` batches with ``torch.func.vmap`` where the method supports it."""
        tasks = self.check(tasks)
        use_vmap = self.vmappable if vmap is None else bool(vmap)
        if use_vmap and not self.vmappable:
            raise ConfigError(f"{type(self).__name__} cannot be vmapped yet (its linear solver "
                              "synchronises with the host); use vmap=False")
        if use_vmap:
            g, per_task = batched_mean_grad(self.query_loss, x, tasks)
        else:
            g, per_task = self.loop_meta_grad(x, tasks)
        check_finite(T.flatten(g)[0], "upper", f"the {type(self).__name__} meta-gradient")
        return g, {"loss": float(per_task.mean()), "vmapped": use_vmap}

    def task_estimator(self, task: Mapping[str, Tensor]) -> Estimator | None:
        """The estimator for one task (default :meth:`estimator`); None: no lower problem (the
        loop differentiates :meth:`query_loss` of that task alone)."""
        return self.estimator()

    def loop_meta_grad(self, x: Any, tasks: Mapping[str, Tensor]) -> tuple[Any, Tensor]:
        """The same meta-gradient as a Python loop: the estimator on each task's problem."""
        total, losses = None, []
        B = num_tasks(tasks)
        for i in range(B):
            task = index_tasks(tasks, i)
            est = self.task_estimator(task)
            if est is None:
                g, loss = batched_mean_grad(self.query_loss, x, {k: v[None] for k, v in task.items()})
                loss = loss[0]
            else:
                y0 = self.start if self.differentiate_start else self.start(x)
                res = est(self.problem(task), x, y0)
                g = res.grad
                with torch.no_grad():
                    loss = self.upper(task)(x, res.y)
            gl = T.flatten(g)[0]
            total = gl if total is None else T.add(total, gl)
            losses.append(loss)
        spec = T.flatten(x)[1]
        return T.unflatten(T.scale(total, 1.0 / B), spec), torch.stack(losses).detach()

    @torch.no_grad()
    def evaluate(self, x: Any, tasks: Any, chunk: int = 100) -> dict[str, Tensor]:
        """Per-task query loss (and accuracy for classification) after adaptation, vmapped in
        chunks of ``chunk`` tasks."""
        tasks = self.check(tasks)
        losses, accs = [], []
        B = num_tasks(tasks)
        for lo in range(0, B, chunk):
            part = index_tasks(tasks, slice(lo, lo + chunk))
            out = vmap(self.query_outputs, in_dims=(None, 0))(x, part)
            losses.append(vmap(lambda o, t: task_loss(self.loss, o, t))(out, part["query_y"]))
            if self.loss == "ce":
                accs.append((out.argmax(-1) == part["query_y"]).to(out.dtype).mean(-1))
        res = {"loss": torch.cat(losses)}
        if accs:
            res["accuracy"] = torch.cat(accs)
        check_finite((res["loss"],), "lower", f"{type(self).__name__} query losses")
        return res

    def with_steps(self, steps: int) -> MetaLearner:
        """A copy adapting with ``steps`` inner steps (e.g. more steps at meta-test time)."""
        out = copy.copy(self)
        inner = getattr(self, "inner", None)
        if inner is None:
            raise ConfigError(f"{type(self).__name__} has no inner steps to change")
        out.inner = copy.copy(inner)
        out.inner.steps = int(steps)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r})"
