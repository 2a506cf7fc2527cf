"""AmIGO — Amortized Implicit Gradient Optimization (Arbel & Mairal 2022, "Amortized implicit
differentiation for stochastic bilevel optimization", ICLR, Algorithm 1 with the stochastic linear
solver of Algorithm 2).

Double loop in which both inner problems are warm-started from the previous outer iteration:

    y ← P_Y(y − β ∇_y G(x_k, y; B_t)),  t = 1..T                      (from y_k)
    b = ∇_y F(x_k, y_{k+1}; B_F)
    v ← v − ρ (∇²_yy G(x_k, y_{k+1}; B'_m) v − b),  m = 1..M          (from v_k: SGD on ½vᵀHv − bᵀv)
    x_{k+1} = P_X(x_k − α [∇_x F(x_k, y_{k+1}; B_F) − ∇²_xy G(x_k, y_{k+1}; B_0) v_{k+1}])

(the paper writes z = −v). Per iteration: T lower gradients, 1 upper gradient (∇_x F and ∇_y F
from one backward), M HVPs on fresh batches, 1 cross product.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ... import oracles as O
from ...estimates import Schedule, sgd_linear_system, sgd_lower
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["AmIGO"]


class AmIGO(Solver):
    """AmIGO: warm-started double loop on y and on the linear system H v = ∇_y f (SGD on
    ½vᵀHv − bᵀv), then the upper step (see the module docstring).

    Args:
        lr_x: α, the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: β, the lower SGD step.
        lr_v: ρ, the step of the linear-system SGD (default ``lr_y``).
        inner_steps: T lower steps per outer iteration (≥ 0).
        v_steps: M linear-system steps (default ``inner_steps``).

    Reference: Arbel & Mairal 2022 (ICLR), Algorithms 1–2.
    """

    reference = "Arbel & Mairal 2022 (ICLR), Algorithms 1-2 (AmIGO)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.1,
        lr_y: float | Schedule | dict = 0.1,
        lr_v: float | Schedule | dict | None = None,
        inner_steps: int = 10,
        v_steps: int | None = None,
        upper: Any = None,
    ):
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.lr_v = self.lr_y if lr_v is None else Schedule.of(lr_v)
        self.inner_steps = int(inner_steps)
        self.v_steps = self.inner_steps if v_steps is None else int(v_steps)
        if self.inner_steps < 0 or self.v_steps < 0:
            raise ValueError(f"AmIGO needs inner_steps, v_steps >= 0, got {inner_steps}, {v_steps}")

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "v": T.zeros_like(ys)}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs = state["x"]

        G_batch = ctx.fresh_G

        ys = sgd_lower(G_batch, xs, state["y"], steps=self.inner_steps, lr=self.lr_y(t),
                       projection=ctx.y_projection, ctx=ctx)
        _, gx, b = O.grads(ctx.fresh_F(), xs, ys)
        v = sgd_linear_system(G_batch, xs, ys, state["v"], b, steps=self.v_steps, lr=self.lr_v(t))
        hg = T.sub(gx, O.cross(G_batch(), xs, ys, v))
        state["x"] = self.step_x(ctx, state, hg, t)
        state["y"], state["v"] = ys, v
        return {}
