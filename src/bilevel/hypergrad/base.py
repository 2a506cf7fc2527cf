"""The estimator interface shared by every hypergradient method.

The hypergradient of  h(x) = f(x, y*(x))  is

    ∇h(x) = ∇_x f(x, y*) + (dy*/dx)^T ∇_y f(x, y*).

Each estimator approximates the second term differently; all are called the same way::

    res = est(problem, x, y)        # y: starting point (pytree) or callable x -> y0
    res.grad, res.y, res.info
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _tree as T
from .. import oracles as O
from ..inner import Dynamics, unroll
from ..problem import Bound, Problem
from ..validation import check_finite

__all__ = ["HypergradResult", "Estimator", "solve_lower", "lower_grad_fn"]


@dataclass
class HypergradResult:
    """``grad``: d f(x, y(x)) / dx shaped like x; ``y``: lower point used (detached); ``info``."""

    grad: Any
    y: Any
    info: dict[str, Any] = field(default_factory=dict)


def lower_grad_fn(bound: Bound, xs: T.Leaves, *, create_graph: bool):
    """k -> ∇_y g(x, ·) for :func:`bilevel.inner.unroll` (with or without a graph)."""
    G = bound.G

    def grad_fn(ys: T.Leaves, k: int) -> T.Leaves:
        return O.grad_y(G, xs, ys, create_graph=create_graph)

    return grad_fn


def solve_lower(
    bound: Bound, dyn: Dynamics | None, xs: T.Leaves, ys0: T.Leaves, steps: int | None = None
) -> tuple[T.Leaves, dict[str, Any]]:
    """Run the inner dynamics without a graph; returns the final iterate (detached)."""
    if dyn is None:
        return T.detach(ys0), {"steps": 0}
    n = dyn.steps if steps is None else steps
    dyn = dyn.bind(bound.x_tree(xs), bound.y_tree(bound.ys0))  # hyperparameters may depend on x
    with torch.no_grad():
        state, info = unroll(dyn, lower_grad_fn(bound, xs, create_graph=False), dyn.init(ys0), n)
    return T.detach(dyn.output(state)), info


class Estimator:
    """Base class. Subclasses implement :meth:`compute` on a :class:`~bilevel.problem.Bound`."""

    #: short citation shown by ``bilevel list``
    reference: str = ""

    def __call__(
        self,
        problem: Problem,
        x: Any,
        y: Any,
        *,
        batch: Any = None,
        upper_batch: Any = None,
        lower_batch: Any = None,
    ) -> HypergradResult:
        bound = Bound(
            problem,
            x,
            y,
            upper_batch=batch if upper_batch is None else upper_batch,
            lower_batch=batch if lower_batch is None else lower_batch,
        )
        t0 = time.perf_counter()
        gx, ys, info = self.compute(bound)
        info["time"] = time.perf_counter() - t0
        bound.check_grad_x(gx)
        check_finite(gx, "upper", "the hypergradient")
        return HypergradResult(grad=bound.x_tree(gx), y=bound.y_tree(ys), info=info)

    def compute(self, bound: Bound) -> tuple[T.Leaves, T.Leaves, dict[str, Any]]:
        """Return (hypergradient leaves, lower point leaves, info)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({keys})"
