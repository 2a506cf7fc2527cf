"""F2SA — Fully First-order Stochastic Approximation (Kwon, Kwon, Wright & Nowak, ICML 2023,
Algorithm 1).

Penalty reformulation  min_{x,y} f(x, y) + λ (g(x, y) − g*(x)),  whose x-gradient needs only
first-order oracles because ∇g*(x) = ∇_x g(x, y*(x)) (Danskin). Two lower sequences: z tracks
y*(x) = argmin_y g, y tracks argmin_y f + λg. Per outer iteration, T inner steps on fresh batches

    z_{t+1} = z_t − γ_k ∇_y G(x_k, z_t; φ)
    y_{t+1} = y_t − α_k (∇_y F(x_k, y_t; ζ) + λ_k ∇_y G(x_k, y_t; φ'))

then (z_{k+1}, y_{k+1}) = (z_T, y_T) and

    x_{k+1} = x_k − ξ_k (∇_x F(x_k, y_{k+1}; ζ) + λ_k (∇_x G(x_k, y_{k+1}; φ) − ∇_x G(x_k, z_{k+1}; φ))),
    λ_{k+1} = λ_k + δ_k.

The y-step is coupled to the multiplier as α_k = γ_k / λ_k (so α_k λ_k = γ_k: the penalised
lower problem has curvature ≈ λ_k L_g and stays stable as λ grows). No Hessian-vector products.
Implementation choice: at each inner step z and y use the *same* lower batch φ = φ' (the paper
draws them independently). The lower-gradient noise then cancels in y − z, so the x-direction,
where it is multiplied by λ_k, stays usable as λ_k grows; the estimator stays unbiased.
``y`` of the state (reported) is z, the estimate of y*(x); the penalty sequence is ``state["yl"]``.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ... import oracles as O
from ...estimates import Schedule
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["F2SA"]


class F2SA(Solver):
    """F2SA: fully first-order penalty method with two lower sequences (z → argmin g,
    y → argmin f + λg) and a growing penalty λ (see the module docstring).

    Args:
        lr_x: ξ_k, the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: γ_k, the z step (the y step is γ_k/λ_k).
        inner_steps: T inner steps per outer iteration (≥ 1).
        lmbda0: initial penalty λ_0 (> 0).
        delta_lmbda: δ_k, the penalty increment (float or schedule).
        lmbda_max: cap on λ_k.

    Reference: Kwon, Kwon, Wright & Nowak 2023 (ICML), Algorithm 1.
    """

    reference = "Kwon, Kwon, Wright & Nowak 2023 (ICML), Algorithm 1"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.1,
        inner_steps: int = 10,
        lmbda0: float = 1.0,
        delta_lmbda: float | Schedule | dict = 0.01,
        lmbda_max: float = 1e4,
        upper: Any = None,
    ):
        """``lr_y`` is γ_k (the z step; the y step is γ_k/λ_k); λ_{k+1} = min(λ_k + δ_k, lmbda_max)."""
        if int(inner_steps) < 1 or not lmbda0 > 0:
            raise ValueError(f"F2SA needs inner_steps >= 1 and lmbda0 > 0, got {inner_steps}, {lmbda0}")
        self.lr_x, self.lr_y, self.delta = Schedule.of(lr_x), Schedule.of(lr_y), Schedule.of(delta_lmbda)
        self.upper = step_rule(self, lr_x, upper)
        self.inner_steps, self.lmbda0, self.lmbda_max = int(inner_steps), float(lmbda0), float(lmbda_max)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "yl": ys, "lmbda": self.lmbda0}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, z, yl, lam = state["x"], state["y"], state["yl"], state["lmbda"]
        gamma = self.lr_y(t)
        for _ in range(self.inner_steps):
            G = ctx.fresh_G()  # one batch for both sequences (see module docstring)
            z = ctx.project_y(T.axpy(-gamma, O.grad_y(G, xs, z), z))
            d = T.axpy(lam, O.grad_y(G, xs, yl), O.grad_y(ctx.fresh_F(), xs, yl))
            yl = ctx.project_y(T.axpy(-gamma / lam, d, yl))
        G = ctx.fresh_G()
        d_x = T.axpy(lam, T.sub(O.grad_x(G, xs, yl), O.grad_x(G, xs, z)),
                     O.grad_x(ctx.fresh_F(), xs, yl))
        state["x"] = self.step_x(ctx, state, d_x, t)
        state.update(y=z, yl=yl, lmbda=min(lam + self.delta(t), self.lmbda_max))
        return {"lmbda": lam}
