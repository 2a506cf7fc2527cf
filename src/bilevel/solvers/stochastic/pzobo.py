"""PZOBO — Partial Zeroth-Order Bilevel Optimizer (Sow, Ji & Liang, NeurIPS 2022, Algorithm 1;
its stochastic form PZOBO-S).

Hessian-free: only the response Jacobian ∂y*/∂x is estimated, by differences of inner trajectories
at Gaussian-perturbed outer points. Per outer iteration, with u_j ~ N(0, I), j = 1..Q, and the same
N lower batches (same sampling path) and the same start y_k for every trajectory:

    y_k^N         = N SGD steps on G(x_k, ·) from y_k
    y_{k,j}^N     = N SGD steps on G(x_k + μ u_j, ·) from y_k,       δ_j = (y_{k,j}^N − y_k^N) / μ
    ∇̂Φ(x_k)      = ∇_x F(x_k, y_k^N; D_F) + (1/Q) Σ_j <δ_j, ∇_y F(x_k, y_k^N; D_F)> u_j
    x_{k+1} = x_k − β ∇̂Φ(x_k),      y_{k+1} = y_k^N   (warm start)

The estimator is shared with :class:`bilevel.hypergrad.ZerothOrder`
(:func:`bilevel.hypergrad.zeroth_order.zeroth_order_hypergradient`). Cost: (Q+1)·N lower gradients
and 1 upper gradient per iteration; no second-order oracle. Its variance grows with dim(x)/Q.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ..._rng import advancing, initial_state
from ...estimates import Schedule, replay, sgd_lower
from ...hypergrad.zeroth_order import gaussian_directions, zeroth_order_estimate
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["PZOBO"]


class PZOBO(Solver):
    """PZOBO-S: the response Jacobian estimated from differences of inner SGD trajectories at
    Gaussian-perturbed x; no Hessian-vector products (see the module docstring).

    Args:
        lr_x: β, the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: the step of the N inner SGD steps.
        inner_steps: N (≥ 1).
        samples: Q directions per hypergradient (≥ 1).
        mu: perturbation size μ (> 0).
        seed: seeds the generator of the random truncation / directions (kept in the state).

    Reference: Sow, Ji & Liang 2022 (NeurIPS), Algorithm 1.
    """

    reference = "Sow, Ji & Liang 2022 (NeurIPS), Algorithm 1 (PZOBO-S)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.1,
        inner_steps: int = 10,
        samples: int = 10,
        mu: float = 1e-2,
        seed: int = 0,
        upper: Any = None,
    ):
        if int(inner_steps) < 1 or int(samples) < 1 or not mu > 0:
            raise ValueError("PZOBO needs inner_steps >= 1, samples >= 1 and mu > 0")
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.inner_steps, self.samples = int(inner_steps), int(samples)
        self.mu, self.seed = float(mu), int(seed)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "rng": initial_state(self.seed)}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys = state["x"], state["y"]
        Gs = [ctx.fresh_G() for _ in range(self.inner_steps)]
        lr = self.lr_y(t)

        def run(x: T.Leaves) -> T.Leaves:
            return sgd_lower(replay(Gs), x, ys, steps=len(Gs), lr=lr, projection=ctx.y_projection)

        with advancing(state) as gen:
            U = gaussian_directions(self.samples, xs, gen)
        hg, y_n = zeroth_order_estimate(ctx.fresh_F(), run, xs, U, self.mu, ys)
        state["x"], state["y"] = self.step_x(ctx, state, hg, t), y_n
        return {}
