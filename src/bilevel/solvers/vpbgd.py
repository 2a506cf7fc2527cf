"""V-PBGD: penalty-based bilevel gradient descent with the value-function penalty.

Shen & Chen 2023, "On penalty-based bilevel gradient descent method" (ICML), Alg. 1 (V-PBGD).
The bilevel problem is replaced by the penalized single-level problem

    min_{x, y}  f(x, y) + γ (g(x, y) − v(x)),      v(x) = min_y g(x, y)   (value function),

whose penalty p = g − v ≥ 0 vanishes exactly on the lower solution set (no singleton assumption).
By Danskin's theorem ∇v(x) = ∇_x g(x, ŷ) at any lower minimiser ŷ, so each outer iteration k

    ŷ_k   = T steps of the lower dynamics on g(x_k, ·), warm-started at ŷ_{k−1}   (ω in the paper)
    d_x   = ∇_x f(x_k, y_k) + γ (∇_x g(x_k, y_k) − ∇_x g(x_k, ŷ_k))
    d_y   = ∇_y f(x_k, y_k) + γ ∇_y g(x_k, y_k)
    (x_{k+1}, y_{k+1}) = P_{X×Y}((x_k, y_k) − α (d_x, d_y))

needs first-order oracles only. For γ of order 1/ε the solutions of the penalized problem are
ε-solutions of the bilevel problem (the paper's Thm. 2 / 3); on a strongly convex lower level the
bias in x is O(1/γ). Departure: the update of (x, y) may be any rule of :mod:`bilevel.inner`
(``upper=``, e.g. Adam) instead of the paper's projected gradient step (the default, ``lr``).
``state["y"]`` is the joint variable y_k; the lower approximation ŷ_k is ``state["y_hat"]``.
"""

from __future__ import annotations

from typing import Any

from .. import _tree as T
from .. import oracles as O
from .._trace import scalar
from ..errors import ConfigError
from ..hypergrad.base import solve_lower
from ..inner import Dynamics
from .base import Context, Solver, descend
from .upper import upper_rule

__all__ = ["VPBGD"]


class VPBGD(Solver):
    """V-PBGD (see module docstring): ``inner`` approximates ŷ(x), ``gamma`` is the penalty γ."""

    reference = "Shen & Chen 2023 (ICML), Alg. 1 (V-PBGD)"

    def __init__(self, inner: Dynamics, lr: float = 0.01, *, gamma: float = 10.0,
                 upper: Any = None, warm_start: bool = True):
        if not gamma > 0:
            raise ConfigError(f"VPBGD needs a penalty gamma > 0, got {gamma}")
        if upper is None and not lr > 0:
            raise ConfigError(f"VPBGD needs lr > 0, got {lr}")
        self.inner, self.gamma, self.warm_start = inner, float(gamma), bool(warm_start)
        self.upper = upper_rule(lr if upper is None else upper)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "y_hat": ys, "rule_x": self.upper.init(xs), "rule_y": self.upper.init(ys)}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys = state["x"], state["y"]
        bound = ctx.bound(xs, ys, ctx.upper_batch(), ctx.lower_batch())
        start = state["y_hat"] if self.warm_start else ys
        y_hat, _ = solve_lower(bound, ctx.inner(self.inner), xs, start)
        _, fx, fy = O.grads(bound.F, xs, ys)
        gval, gx, gy = O.grads(bound.G, xs, ys)
        gx_hat = O.grad_x(bound.G, xs, y_hat)
        d_x = T.axpy(self.gamma, T.sub(gx, gx_hat), fx)
        d_y = T.axpy(self.gamma, gy, fy)
        state["x"], state["rule_x"] = descend(self.upper, state["rule_x"], d_x, t, ctx.project_x)
        state["y"], state["rule_y"] = descend(self.upper, state["rule_y"], d_y, t, ctx.project_y)
        state["y_hat"] = y_hat
        with O.counting():  # diagnostic, not part of the algorithm's oracle budget
            penalty = scalar(gval - O.value(bound.G, xs, y_hat))
        return {"penalty": penalty, "grad_norm": scalar(T.norm(d_x + d_y))}
