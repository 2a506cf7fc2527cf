"""Alternating SGD — the naive baseline with no implicit term (e.g. lecture 001, "alternating
optimization": single descent step or several lower steps per upper step).

    y ← P_Y(y − β_t ∇_y G(x_t, y; B))            (1 step, or ``inner_steps`` steps if double_loop)
    x_{t+1} = P_X(x_t − α_t ∇_x F(x_t, y_{t+1}; B'))

The upper step uses only the partial gradient ∇_x F and ignores (dy*/dx)ᵀ ∇_y F, so its fixed
points are not the stationary points of h(x) = f(x, y*(x)) unless ∇_y F ≡ 0 (it is biased by
design). Per iteration: ``inner_steps`` (or 1) lower gradients and one upper gradient.
"""

from __future__ import annotations

from typing import Any

from ... import oracles as O
from ...estimates import Schedule, sgd_lower
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["AlternatingSGD"]


class AlternatingSGD(Solver):
    """Alternating SGD baseline: lower SGD step(s), then an upper step along ∇_x F only (no
    implicit term, biased by design; see the module docstring).

    Args:
        lr_x: α_t, the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: β_t, the lower step.
        double_loop: run ``inner_steps`` lower steps per upper step instead of one.
        inner_steps: lower steps per iteration when ``double_loop`` (≥ 1).
    """

    reference = "alternating (stochastic) gradient descent, no implicit term (naive baseline)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.1,
        double_loop: bool = False,
        inner_steps: int = 10,
        upper: Any = None,
    ):
        if int(inner_steps) < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.double_loop, self.inner_steps = bool(double_loop), int(inner_steps)

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs = state["x"]
        steps = self.inner_steps if self.double_loop else 1
        ys = sgd_lower(ctx.fresh_G, xs, state["y"], steps=steps,
                       lr=self.lr_y(t), projection=ctx.y_projection, ctx=ctx)
        gx = O.grad_x(ctx.fresh_F(), xs, ys)
        state["x"] = self.step_x(ctx, state, gx, t)
        state["y"] = ys
        return {}
