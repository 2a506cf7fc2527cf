"""Hypergradient through a user-supplied differentiable solver x -> y*(x) (exact when y* is).

    ∇h(x) = ∇_x [ f(x, y*(x)) ]   by ordinary backpropagation through ``solve``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import _tree as T
from ..formulation import Bound
from ..oracles import _grad, objective, rank_mean
from .base import Estimator


class ClosedForm(Estimator):
    reference = "closed-form lower level (e.g. ridge regression)"

    def __init__(self, solve: Callable[[Any], Any]):
        self.solve = solve

    def compute(self, bound: Bound, state: dict):
        with torch.enable_grad():
            xs = T.requires_grad(bound.xs)
            ys, spec = T.flatten(self.solve(bound.x_tree(xs)))
            F = objective(bound.F, xs, ys)  # data-parallel: the union's f (else bound.F)
            gx = rank_mean(_grad(F, xs))
        return T.detach(gx), T.detach(ys), {}, state
