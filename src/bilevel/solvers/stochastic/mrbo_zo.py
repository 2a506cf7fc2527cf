"""MRBO-ZO — MRBO (Yang, Ji & Liang 2021) with the partial zeroth-order hypergradient estimator of
Sow, Ji & Liang 2022 (PZOBO, Alg. 1) in place of the Neumann hypergradient.

MRBO's single loop (Yang, Ji & Liang 2021, Alg. 1) — STORM recursions on both levels, the same
samples at the current and previous point —

    u_k = ∇_y G(x_k, y_k; B_y) + (1 − β_k) (u_{k−1} − ∇_y G(x_{k−1}, y_{k−1}; B_y))
    v_k = ∇̂Φ(x_k, y_k; B_x) + (1 − α_k) (v_{k−1} − ∇̂Φ(x_{k−1}, y_{k−1}; B_x))
    x_{k+1} = x_k − γη_k v_k,     y_{k+1} = y_k − λη_k u_k

with the Neumann hypergradient replaced by the Hessian-free estimator of the report (sec. 7.3.2):
from the current y, N SGD steps (step ``inner_lr``) along one sampling path D_1..D_N at x and at
x + μu_j (u_j ~ N(0, I), j = 1..Q), δ_j = (Y_j^N − Y^N)/μ, and

    ∇̂Φ(x, y; B_x) = ∇_x F(x, Y^N; D_F) + (1/Q) Σ_j <δ_j, ∇_y F(x, Y^N; D_F)> u_j,

B_x = (D_F, D_1..D_N, u_1..u_Q) replayed at (x_{k−1}, y_{k−1}). Only gradients are used:
per iteration 2·(Q+1)·N + 2 lower gradients and 2 upper gradients.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ..._rng import advancing, initial_state
from ...estimates import Schedule, replay, sgd_lower
from ...hypergrad.zeroth_order import gaussian_directions, zeroth_order_estimate
from ..base import Context
from .mrbo import LR_X, MOMENTUM, MRBO

__all__ = ["MRBOZO"]


class MRBOZO(MRBO):
    """MRBO with the partial zeroth-order (PZOBO) hypergradient in place of the Neumann one:
    Hessian-free (see the module docstring).

    Args:
        lr_x, lr_y, momentum_x, momentum_y: as in :class:`MRBO`.
        inner_steps: N SGD steps of each perturbed trajectory (≥ 1).
        inner_lr: their step (> 0).
        samples: Q Gaussian directions per hypergradient (≥ 1).
        mu: perturbation size μ (> 0).
        seed: seeds the generator of the random truncation / directions (kept in the state).

    Reference: Yang, Ji & Liang 2021, Alg. 1; Sow, Ji & Liang 2022, Alg. 1.
    """

    reference = "MRBO (Yang, Ji & Liang 2021, Alg. 1) + PZOBO estimator (Sow, Ji & Liang 2022, Alg. 1)"
    stackable = False  # its samples hold Gaussian directions of x's shape: two evaluations

    def __init__(
        self,
        lr_x: float | Schedule | dict = LR_X,
        lr_y: float | Schedule | dict = LR_X,
        momentum_x: float | Schedule | dict = MOMENTUM,
        momentum_y: float | Schedule | dict | None = None,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        samples: int = 10,
        mu: float = 1e-2,
        seed: int = 0,
        upper: Any = None,
    ):
        if int(inner_steps) < 1 or int(samples) < 1 or not mu > 0 or not inner_lr > 0:
            raise ValueError("MRBO-ZO needs inner_steps >= 1, samples >= 1, mu > 0 and inner_lr > 0")
        super().__init__(lr_x, lr_y, momentum_x, momentum_y, Q=0, eta=1.0, upper=upper)
        self.inner_steps, self.inner_lr = int(inner_steps), float(inner_lr)
        self.samples, self.mu, self.seed = int(samples), float(mu), int(seed)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        state = super().init(ctx, xs, ys)
        state["rng"] = initial_state(self.seed)
        return state

    def draw(self, ctx: Context, state: dict[str, Any]) -> tuple:
        """B_x = (F on D_F, [G on D_1..D_N], directions U, the lower projection)."""
        with advancing(state) as gen:
            U = gaussian_directions(self.samples, state["x"], gen)
        return ctx.fresh_F(), [ctx.fresh_G() for _ in range(self.inner_steps)], U, ctx.y_projection

    def hypergradient(self, xs: T.Leaves, ys: T.Leaves, samples: tuple) -> T.Leaves:
        F, Gs, U, projection = samples

        def run(x: T.Leaves) -> T.Leaves:
            return sgd_lower(replay(Gs), x, ys, steps=len(Gs), lr=self.inner_lr,
                             projection=projection)

        return zeroth_order_estimate(F, run, xs, U, self.mu, ys)[0]
