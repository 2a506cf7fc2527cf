"""Hypergradient through a user-supplied differentiable solver x -> y*(x) (exact when y* is).

    ∇h(x) = ∇_x [ f(x, y*(x)) ]   by ordinary backpropagation through ``solve``.

``solve(x)`` closes over its data; ``solve(x, batch)`` (two parameters) receives the lower-level
batch instead, so one solver serves every task of :func:`bilevel.hypergrad.vmap`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .. import _tree as T
from .. import oracles as O
from ..formulation import Bound
from .base import Estimator


def _takes_batch(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


class ClosedForm(Estimator):
    """Backpropagation through ``solve``: x -> y*(x), or (x, lower batch) -> y*(x)."""

    reference = "closed-form lower level (e.g. ridge regression)"

    def __init__(self, solve: Callable[..., Any]):
        if not callable(solve):
            raise TypeError(f"ClosedForm needs a callable solve(x[, batch]), got {type(solve).__name__}")
        self.solve = solve
        self._with_batch = _takes_batch(solve)

    def compute(self, bound: Bound, state: dict):
        def objective(xs: T.Leaves):
            x = bound.x_tree(xs)
            out = self.solve(x, bound.G.batch) if self._with_batch else self.solve(x)
            ys, _ = T.flatten(out)
            return O.objective(bound.F, xs, ys), T.detach(ys)  # the union's f when data are sharded

        gx, (_, ys) = O.value_and_grad(objective, bound.xs, has_aux=True)
        info = {"buffers": bound.buffers0} if bound.carries else {}  # no dynamics: unchanged
        return O.rank_mean(gx), ys, info, state
