"""The meta-learner interface and the one place where meta-batches of tasks are batched.

Meta-learning as multi-task bilevel optimization (survey 2207.11719, Sec. 3.2): the upper variable
x is meta-knowledge shared by all tasks (an initialization, a feature extractor, learning rates),
every task i has its own lower problem

    y_i(x) = Alg_i(x)  ≈ argmin_y  g_i(x, y) = L(y; support_i)   (+ method-specific terms),

and the meta-objective is  h(x) = (1/B) Σ_i f_i(x, y_i(x)),  f_i = L(y_i; query_i).

A :class:`MetaLearner` describes one task's lower and upper objectives (:meth:`lower`,
:meth:`upper`), the start of the lower problem as a function of x (:meth:`start`) and a
:mod:`bilevel.hypergrad` estimator (:meth:`estimator`). Two ways to get the meta-gradient:

* ``vmap=True`` (default): the estimator on :meth:`batched_problem` (support set = lower batch,
  query set = upper batch) under :func:`bilevel.hypergrad.vmap` over the tasks;
* ``vmap=False``: the same estimator called task by task (the tests check both agree to 1e-10
  in float64).

Methods without a lower problem (ProtoNet) differentiate the vmapped query loss
(:func:`batched_mean_grad`). For evaluation, :meth:`query_outputs` is a pure function of
(x, task) — the adaptation runs :func:`bilevel.inner.unroll` with ``torch.func`` gradients —
vmapped over the tasks in chunks. :meth:`task_sum_grad` returns the *sum* over a batch, which is
what task-parallel training (:mod:`bilevel.meta.train`) adds up across ranks.
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
from torch.utils import _pytree as pytree

from .. import _tree as T
from .. import oracles as O
from .._trace import scalar, tracing
from ..errors import ConfigError, StructureMismatchError
from ..formulation import Problem
from ..hypergrad.base import Estimator
from ..hypergrad.vmap import vmap as hypergrad_vmap
from ..inner import Dynamics, unroll
from ..validation import check_finite
from .tasks import FIELDS, check_tasks, index_tasks, num_tasks

SUPPORT, QUERY = FIELDS[:2], FIELDS[2:]


def split_tasks(tasks: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(support set, query set) of a task or task batch: the lower and upper batches."""
    return {k: tasks[k] for k in SUPPORT}, {k: tasks[k] for k in QUERY}


def _diagnostics(info: Mapping[str, Any], *, batched: bool) -> dict[str, Any]:
    """``inner_grad_norm`` (largest over tasks) and ``breakdowns`` (count) from estimator info."""
    out: dict[str, Any] = {}
    if "inner_grad_norm" in info:
        v = info["inner_grad_norm"]
        out["inner_grad_norm"] = scalar(torch.as_tensor(v).max()) if batched else _number(v)
    ls = info.get("linear_solve")
    if isinstance(ls, Mapping):
        if batched and isinstance(ls.get("broke_down"), Tensor):
            n = ls["broke_down"].sum()
            out["breakdowns"] = n.detach() if tracing() else int(n)
        elif not batched:
            out["breakdowns"] = int(ls.get("breakdown") is not None)
    return out


def _number(v: Any) -> Any:
    """A diagnostic as a Python number, or a tensor in traced mode (a compiled meta-step)."""
    return scalar(v) if isinstance(v, Tensor) else float(v)


def _reduce_diagnostics(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-task diagnostics of a loop over tasks: the largest ``inner_grad_norm``, the number
    of ``breakdowns`` (tensors in traced mode)."""
    diag: dict[str, Any] = {}
    for key, red, stacked in (("inner_grad_norm", max, torch.amax), ("breakdowns", sum, torch.sum)):
        vals = [d[key] for d in infos if key in d]
        if vals:
            diag[key] = (stacked(torch.stack([torch.as_tensor(v) for v in vals])) if tracing()
                         else red(vals))
    return diag


__all__ = ["MetaLearner", "batched_mean_grad", "task_loss", "adapt", "split_tasks", "LOSSES"]

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
    #: False where the estimator cannot run under bilevel.hypergrad.vmap
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
    #: the estimator gets the start as a function of x (its derivative counts: MAML) or as a
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

    # bilevel description (one task), used by the estimators
    def lower(self, task: Mapping[str, Tensor]) -> Callable[[Any, Any], Tensor]:
        raise NotImplementedError

    def upper(self, task: Mapping[str, Tensor]) -> Callable[[Any, Any], Tensor]:
        raise NotImplementedError

    def start(self, x: Any) -> Any:
        """The lower problem's starting point as a function of x."""
        raise NotImplementedError

    def estimator(self) -> Estimator | None:
        """The per-task meta-gradient estimator (the same for every task, so it can be vmapped);
        None: no lower problem (the query loss is differentiated directly)."""
        raise NotImplementedError

    def problem(self, task: Mapping[str, Tensor]) -> Problem:
        """One task's bilevel problem with its data bound (no batches)."""
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
        """Mean meta-gradient over a task batch and ``{"loss": mean query loss, "vmapped": ...,
        "tasks": B}`` plus, where the estimator reports them, ``inner_grad_norm`` (the largest
        ‖∇_y g_i‖ at the lower points: how far the adaptation is from a stationary point, which
        implicit meta-gradients assume) and ``breakdowns`` (tasks whose linear solve broke down).

        ``vmap=True`` (default where supported): the method's estimator under
        :func:`bilevel.hypergrad.vmap` over the tasks (support sets as lower batches, query sets
        as upper batches); ``vmap=False``: the same estimator called task by task."""
        return self.checked_meta_grad(x, self.check(tasks), vmap=vmap)

    def checked_meta_grad(self, x: Any, tasks: Mapping[str, Tensor], *, vmap: bool | None = None
                          ) -> tuple[Any, dict[str, Any]]:
        """:meth:`meta_grad` of a batch already validated by :meth:`check` (no host reads: it can
        be part of a compiled step, where the numbers of its info stay tensors)."""
        use_vmap = self.vmappable if vmap is None else bool(vmap)
        if use_vmap and not self.vmappable:
            raise ConfigError(f"{type(self).__name__} cannot be vmapped; use vmap=False")
        g, per_task, diag = self.task_sum_grad(x, tasks, vmap=use_vmap)
        B = num_tasks(tasks)
        g = T.unflatten(T.scale(T.flatten(g)[0], 1.0 / B), T.flatten(x)[1])
        check_finite(T.flatten(g)[0], "upper", f"the {type(self).__name__} meta-gradient")
        return g, {"loss": scalar(per_task.mean()), "vmapped": use_vmap, "tasks": B, **diag}

    def batched_problem(self) -> Problem:
        """One task's bilevel problem with the task's data as batches: the lower batch is the
        support set ``{"support_x", "support_y"}``, the upper batch the query set. The same
        object on every call (of this learner, not of a copy): compiled kernels and step graphs
        are cached per problem, so a new one per meta-step would compile every step."""
        return self.built_once("_batched", lambda: Problem(
            lambda x, y, q: self.upper(q)(x, y), lambda x, y, s: self.lower(s)(x, y),
            name=type(self).__name__))

    def built_once(self, name: str, build: Callable[[], Any]) -> Any:
        """``build()`` cached on this learner object under ``name`` (a ``copy.copy`` of the
        learner, e.g. :meth:`with_steps`, builds its own: the objects close over ``self``)."""
        own = self.__dict__.get(name)
        if own is None or own[0] is not self:
            own = (self, build())
            setattr(self, name, own)
        return own[1]

    def task_sum_grad(self, x: Any, tasks: Mapping[str, Tensor], *, vmap: bool = True
                      ) -> tuple[Any, Tensor, dict[str, Any]]:
        """(Σ_i ∇h_i(x) over the batch, the per-task query losses, diagnostics): the sum, so that
        shards of a meta-batch on several processes add up (:class:`MetaTraining`)."""
        est = self.estimator()
        B = num_tasks(tasks)
        if est is None:  # no lower problem (ProtoNet): differentiate the query loss itself
            if vmap:
                g, per_task = batched_mean_grad(self.query_loss, x, tasks)
                return T.unflatten(T.scale(T.flatten(g)[0], float(B)), T.flatten(x)[1]), per_task, {}
            total, losses = None, []
            for i in range(B):
                g, loss = batched_mean_grad(self.query_loss, x, index_tasks(tasks, slice(i, i + 1)))
                gl = T.flatten(g)[0]
                total = gl if total is None else T.add(total, gl)
                losses.append(loss[0])
            return T.unflatten(total, T.flatten(x)[1]), torch.stack(losses), {}
        support, query = split_tasks(tasks)
        problem = self.batched_problem()
        if vmap:
            if self.differentiate_start:
                y0: Any = self.start
            else:
                y0 = pytree.tree_map(lambda t: t.detach().expand(B, *t.shape), self.start(x))
            res = hypergrad_vmap(est, problem, x, y0, upper_batch=query, lower_batch=support)
            gl = tuple(t.sum(0) for t in T.flatten(res.grad)[0])
            with torch.no_grad():
                per_task = torch.func.vmap(lambda y, q: self.upper(q)(x, y),
                                           in_dims=(0, 0))(res.y, query)
            diag = _diagnostics(res.info, batched=True)
            return T.unflatten(gl, T.flatten(x)[1]), per_task.detach(), diag
        total, losses, infos = None, [], []
        for i in range(B):
            s_i, q_i = index_tasks(support, i), index_tasks(query, i)
            y0 = self.start if self.differentiate_start else self.start(x)
            res = est(problem, x, y0, upper_batch=q_i, lower_batch=s_i)
            gl = T.flatten(res.grad)[0]
            total = gl if total is None else T.add(total, gl)
            with torch.no_grad():
                losses.append(self.upper(q_i)(x, res.y))
            infos.append(_diagnostics(res.info, batched=False))
        return T.unflatten(total, T.flatten(x)[1]), torch.stack(losses).detach(), _reduce_diagnostics(infos)

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
