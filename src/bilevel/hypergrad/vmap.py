"""Many tasks at once: any estimator under ``torch.func.vmap`` over a leading task dimension.

Multi-task bilevel problems (meta-learning: one upper variable x shared by tasks i = 1..B, each with
its own data D_i and lower variable y_i) need the per-task hypergradients

    ∇h_i(x) = d/dx f(x, y_i*(x); D_i^val),   y_i*(x) = argmin_y g(x, y; D_i^train).

:func:`vmap` computes them in one batched call: it runs the estimator in traced mode
(:mod:`bilevel._trace`: ``torch.func`` oracles, linear solvers with masks instead of early exits,
checks deferred) under ``torch.func.vmap`` and returns exactly what a Python loop over the tasks
would (equal to rounding: the tests check 1e-10 in float64), stacked along dimension 0.

Host-side checks (non-finite values, ``strict=True`` breakdowns) run after the transform and the
error names the first failing task. Randomness (``ZerothOrder``) is the same for every task, as in
a loop where every task starts from the same estimator state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .. import oracles as O
from .._trace import fill_tensors as _fill
from .._trace import require, traced
from .._trace import split_tensors as _split
from ..errors import BilevelError, StructureMismatchError
from ..formulation import Problem, start_fn
from .base import Estimator, HypergradResult

__all__ = ["vmap"]


def _in_dims(tree: Any) -> Any:
    """0 for every tensor leaf of a data batch, None for anything else."""
    return pytree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, tree)


def _tasks(tree: Any, what: str, B: int | None) -> int | None:
    """The common leading size of the tensor leaves of ``tree`` (checked against ``B``)."""
    leaves = [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]
    for i, t in enumerate(leaves):
        if t.dim() == 0:
            raise StructureMismatchError(
                f"hypergrad.vmap: {what} leaf {i} is 0-dim; every tensor needs a leading task dimension"
            )
        if B is None:
            B = int(t.shape[0])
        elif int(t.shape[0]) != B:  # (B was set by an earlier leaf or input)
            raise StructureMismatchError(
                f"hypergrad.vmap: {what} leaf {i} has {int(t.shape[0])} tasks along dimension 0, "
                f"expected {B} (all batched inputs share the task dimension)"
            )
    return B


def vmap(
    est: Estimator,
    problem: Problem,
    x: Any,
    y: Any,
    *,
    state: dict[str, Any] | None = None,
    batch: Any = None,
    upper_batch: Any = None,
    lower_batch: Any = None,
    x_batched: bool = False,
) -> HypergradResult:
    """``est`` on B tasks at once (``torch.func.vmap`` over the leading dimension).

    Args:
        est: any hypergradient estimator.
        problem: the bilevel problem; its objectives see ONE task's data and variables.
        x: the upper variable, shared by all tasks (default) or, with ``x_batched=True``, a pytree
            whose leaves have a leading task dimension.
        y: lower starting points with a leading task dimension on every leaf, or a callable
            x -> y0 (a shared, possibly learned, initialization; applied per task).
        state: None (every task starts from ``est.init``), or the ``.state`` of a previous
            :func:`vmap` result (per-task tensors stacked; shared entries such as the generator
            state of ``ZerothOrder`` unstacked).
        batch / upper_batch / lower_batch: per-task data, tensor leaves with a leading task
            dimension (non-tensor leaves are passed to every task unchanged).

    Returns:
        :class:`HypergradResult` with ``grad`` (per-task hypergradients: every leaf of x with a
        leading task dimension B; average it for a meta-gradient), ``y`` (per-task lower points),
        ``info`` (tensor diagnostics per task; other entries as for one task) and ``state``.
        Equal to stacking ``est(problem, x[i], y[i], state=state[i], ...)`` over i.
    """
    if not isinstance(est, Estimator):
        if isinstance(getattr(est, "estimator", None), Estimator):  # bl.compile(est)
            raise TypeError(
                "hypergrad.vmap needs the estimator itself, got bl.compile(est): compiled kernels do "
                "not run inside torch.func.vmap; pass est (the tasks are batched by vmap instead)")
        raise TypeError(f"hypergrad.vmap needs an Estimator, got {type(est).__name__}")
    ub = batch if upper_batch is None else upper_batch
    lb = batch if lower_batch is None else lower_batch
    y_fn = start_fn(y)
    B = None
    if x_batched:
        B = _tasks(x, "x", B)
    if y_fn is None:
        B = _tasks(y, "y", B)
    B = _tasks(ub, "upper_batch", B)
    B = _tasks(lb, "lower_batch", B)
    if B is None:
        raise StructureMismatchError(
            "hypergrad.vmap: nothing has a task dimension (pass y with a leading task dimension, "
            "per-task batches, or x_batched=True)"
        )
    if B == 0:
        raise StructureMismatchError("hypergrad.vmap: the task dimension is empty (0 tasks)")

    def task0(tree: Any, batched: bool) -> Any:
        if not batched:
            return tree
        return pytree.tree_map(lambda t: t[0] if isinstance(t, Tensor) else t, tree)

    if state is None:  # one task's initial state, the same for every task
        state = est.init(problem, task0(x, x_batched), y if y_fn else task0(y, True),
                         upper_batch=task0(ub, True), lower_batch=task0(lb, True))
        batched_keys: set[str] = set()
    else:
        batched_keys = {k for k in state if k not in est.shared_state}
    st_leaves, st_marks, st_spec = _split(state)
    # which state tensors carry the task dimension: those of per-task keys of a previous result
    st_dims = []
    for k in state:
        for t in pytree.tree_leaves(state[k]):
            if isinstance(t, Tensor):
                st_dims.append(0 if k in batched_keys else None)
    side: dict[str, Any] = {}

    def one(x_: Any, y_: Any, ub_: Any, lb_: Any, st_: list[Tensor]):
        st = _fill(list(st_), st_marks, st_spec)
        with traced() as checks, O.backend("func"):
            res = est(problem, x_, y_fn if y_fn is not None else y_, state=st,
                      upper_batch=ub_, lower_batch=lb_)
        info_t, info_s, info_spec = _split(res.info)
        new = res.state
        per_task = {k: v for k, v in new.items() if k not in est.shared_state}
        shared = {k: v for k, v in new.items() if k in est.shared_state}
        pt_t, pt_s, pt_spec = _split(per_task)
        sh_t, sh_s, sh_spec = _split(shared)
        side.update(info=(info_s, info_spec), per_task=(pt_s, pt_spec), shared=(sh_s, sh_spec),
                    errors=[c.error for c in checks])
        flags = torch.stack([c.ok for c in checks]) if checks else torch.ones(0, dtype=torch.bool)
        return res.grad, res.y, info_t, pt_t, sh_t, flags

    in_dims = (0 if x_batched else None, None if y_fn is not None else 0, _in_dims(ub), _in_dims(lb),
               st_dims)
    fn = torch.func.vmap(one, in_dims=in_dims, out_dims=(0, 0, 0, 0, None, 0), randomness="same")
    with O.batched(B):  # the traced function runs once: B tasks' worth of oracle calls
        grad, ys, info_t, pt_t, sh_t, flags = fn(x, None if y_fn is not None else y, ub, lb, st_leaves)
    if flags.numel() and torch.compiler.is_compiling():  # (inside a compiled solver step: the
        # step checks after the graph, and reruns eagerly if one failed) — one deferred check per
        # traced check, over the tasks, with that check's own error
        for j, error in enumerate(side["errors"]):
            require(flags[:, j].all(), error)
    elif flags.numel() and not bool(flags.all()):
        bad = (~flags).nonzero()
        i, j = int(bad[0, 0]), int(bad[0, 1])
        exc = side["errors"][j]()
        msg = f"task {i} of {B} (hypergrad.vmap): {exc.args[0] if exc.args else exc}"
        if isinstance(exc, BilevelError):
            exc.args = (msg, *exc.args[1:])
            exc.task = i
            raise exc
        raise type(exc)(msg)
    info = _fill(info_t, *side["info"])
    new_state = {**_fill(pt_t, *side["per_task"]), **_fill(sh_t, *side["shared"])}
    return HypergradResult(grad=grad, y=ys, info=info, state=new_state)
