"""The estimator interface shared by every hypergradient method.

The hypergradient of  h(x) = f(x, y*(x))  is

    ∇h(x) = ∇_x f(x, y*) + (dy*/dx)^T ∇_y f(x, y*).

Each estimator approximates the second term differently; all are called the same way::

    res = est(problem, x, y)                    # y: starting point (pytree) or callable x -> y0
    res.grad, res.y, res.info, res.state
    res = est(problem, x, y, state=res.state)   # next call, e.g. warm-started from the last one

State is data, never attributes (the ``init/update`` style of optax and :mod:`bilevel.inner`):
whatever changes from one call to the next — the warm-start vector of an implicit estimator, the
random-generator state of :class:`~bilevel.hypergrad.ZerothOrder` — lives in the plain dict
``state = est.init(problem, x, y)`` (tensors / None / numbers; ``torch.save``-able), goes in as
``state=`` and comes out, new, in ``res.state``. The state passed in is never mutated, and
``state=None`` means ``est.init(...)``. Nothing on the estimator object changes after construction,
so one estimator can serve many runs (or many tasks under ``vmap``) and a resumed run is exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _tree as T
from .. import compiled as C
from .. import oracles as O
from .._rng import seeded_generator  # noqa: F401 - re-exported (estimators' seeding)
from ..errors import ConfigError
from ..formulation import Bound, Problem
from ..inner import Dynamics, unroll
from ..validation import check_finite

__all__ = ["HypergradResult", "Estimator", "solve_lower", "lower_grad_fn", "seeded_generator"]


@dataclass
class HypergradResult:
    """``grad``: d f(x, y(x)) / dx shaped like x; ``y``: lower point used (detached); ``info``:
    diagnostics; ``state``: the estimator's new state (pass it as ``state=`` to the next call);
    ``buffers``: with ``Problem(buffers=...)``, the carried buffers (running statistics) at the end
    of the lower dynamics — pass them as ``buffers=`` to the next call to continue them; else
    None."""

    grad: Any
    y: Any
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    buffers: Any = None


def lower_grad_fn(bound: Bound, xs: T.Leaves, *, create_graph: bool):
    """k -> ∇_y g(x, ·) for :func:`bilevel.inner.unroll` (with or without a graph)."""
    G = bound.G

    def grad_fn(ys: T.Leaves, k: int) -> T.Leaves:
        return O.grad_y(G, xs, ys, create_graph=create_graph)

    return grad_fn


def solve_lower(
    bound: Bound, dyn: Dynamics | None, xs: T.Leaves, ys0: T.Leaves, steps: int | None = None,
    *, carry: bool = True,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Run the inner dynamics without a graph; returns the final iterate (detached) and info.

    When the problem carries buffers (``Problem(buffers=...)``) and ``carry`` is true, they are
    stepped along (``info["buffers"]``: the final ones; without dynamics: the starting ones)."""
    if dyn is None:
        info: dict[str, Any] = {"steps": 0}
        if carry and bound.carries:
            info["buffers"] = bound.buffers0
        return T.detach(ys0), info
    n = dyn.steps if steps is None else steps
    if C.estimators_compiled() and (not carry or not bound.carries) and C.why_not(bound, dyn) is None:
        with torch.no_grad():  # bl.compile(est): each step one compiled kernel
            state, info = C.unroll(bound.G, dyn, xs, dyn.init(ys0), n)
        return T.detach(dyn.output(state)), info
    dyn = dyn.bind(bound.x_tree(xs), bound.y_tree(bound.ys0))  # hyperparameters may depend on x
    with torch.no_grad():
        state, info = unroll(dyn, lower_grad_fn(bound, xs, create_graph=False), dyn.init(ys0), n,
                             carry=bound.carry(xs) if carry else None, buffers=bound.buffers0)
    return T.detach(dyn.output(state)), info


class Estimator:
    """Base class. Subclasses implement :meth:`compute` (and :meth:`init_state` if they carry state).

    ``compute(bound, state) -> (grad_leaves, y_leaves, info, new_state)`` works on a
    :class:`~bilevel.formulation.Bound` (flat leaves); it must not mutate ``state`` (it receives a
    shallow copy) nor any attribute of the estimator.
    """

    #: short citation shown by ``bilevel list``
    reference: str = ""
    #: keys every state of this estimator holds (checked when a state is passed in)
    state_keys: tuple[str, ...] = ()
    #: state keys shared by all tasks under :func:`bilevel.hypergrad.vmap` (not stacked per task)
    shared_state: tuple[str, ...] = ()

    @staticmethod
    def _bound(problem: Problem, x: Any, y: Any, batch: Any, upper_batch: Any, lower_batch: Any,
               buffers: Any = None):
        return Bound(
            problem,
            x,
            y,
            upper_batch=batch if upper_batch is None else upper_batch,
            lower_batch=batch if lower_batch is None else lower_batch,
            buffers=buffers,
        )

    def init(
        self,
        problem: Problem,
        x: Any,
        y: Any,
        *,
        batch: Any = None,
        upper_batch: Any = None,
        lower_batch: Any = None,
    ) -> dict[str, Any]:
        """The state before the first call: a dict of plain data (tensors, None, numbers)."""
        return self.init_state(self._bound(problem, x, y, batch, upper_batch, lower_batch))

    def init_state(self, bound: Bound) -> dict[str, Any]:
        """:meth:`init` on a bound problem (override in estimators that carry state)."""
        return {}

    def __call__(
        self,
        problem: Problem,
        x: Any,
        y: Any,
        *,
        state: dict[str, Any] | None = None,
        batch: Any = None,
        upper_batch: Any = None,
        lower_batch: Any = None,
        buffers: Any = None,
    ) -> HypergradResult:
        """Hypergradient at ``x`` from the lower start ``y``; ``state`` from a previous result;
        ``buffers``: the starting carried buffers (default: the problem's ``buffers.init``)."""
        bound = self._bound(problem, x, y, batch, upper_batch, lower_batch, buffers)
        gx, ys, info, new_state = self.apply(bound, state)
        return HypergradResult(grad=bound.x_tree(gx), y=bound.y_tree(ys), info=info, state=new_state,
                               buffers=info.get("buffers"))

    def apply(
        self, bound: Bound, state: dict[str, Any] | None = None
    ) -> tuple[T.Leaves, T.Leaves, dict[str, Any], dict[str, Any]]:
        """:meth:`compute` with the checks around it (state, shape and finiteness of the result);
        what solvers call on the :class:`~bilevel.formulation.Bound` they hold."""
        state = self.init_state(bound) if state is None else self.check_state(state)
        timed = not torch.compiler.is_compiling()  # (no clock inside a compiled graph)
        t0 = time.perf_counter() if timed else 0.0
        gx, ys, info, new_state = self.compute(bound, dict(state))
        if timed:
            info["time"] = time.perf_counter() - t0
        bound.check_grad_x(gx)
        check_finite(gx, "upper", "the hypergradient")
        return gx, ys, info, new_state

    def check_state(self, state: Any) -> dict[str, Any]:
        """A state passed in must be a dict with the keys :meth:`init_state` creates."""
        if not isinstance(state, dict):
            raise ConfigError(
                f"{type(self).__name__}: state must be the dict from est.init(...) or a previous "
                f"result's .state, got {type(state).__name__}"
            )
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise ConfigError(
                f"{type(self).__name__}: the state passed in lacks {missing} (keys: {sorted(state)}); "
                "pass the state from this estimator's init(...) or a previous result's .state"
            )
        return state

    def compute(
        self, bound: Bound, state: dict[str, Any]
    ) -> tuple[T.Leaves, T.Leaves, dict[str, Any], dict[str, Any]]:
        """Return (hypergradient leaves, lower point leaves, info, new state)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({keys})"
