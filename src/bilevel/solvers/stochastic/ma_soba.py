"""MA-SOBA — Moving-Average SOBA (Chen, Xiao & Balasubramanian 2024, "Optimal algorithms for
stochastic bilevel optimization under relaxed smoothness conditions", JMLR; arXiv 2306.12067,
Algorithm 1).

SOBA's directions at (x_k, y_k, v_k) with one lower sample i and one upper sample j, a projection
of the linear-system variable onto a ball, and a moving average h of the x-direction:

    y_{k+1} = P_Y(y_k − β_k ∇_y G_i)
    v_{k+1} = Π_{‖v‖≤R}(v_k − γ_k (∇²_yy G_i v_k − ∇_y F_j))
    x_{k+1} = P_X(x_k − α_k h_k)
    h_{k+1} = (1 − θ_k) h_k + θ_k (∇_x F_j − ∇²_xy G_i v_k),     h_0 = 0

(the paper's z is v here). The averaging is what removes SOBA's need for higher-order smoothness.
The paper's rates use constant α = Θ(θ), β, γ and θ = Θ(1/√K); R ≥ ‖∇_y f‖/μ (``radius=None``:
no projection). Per iteration: one linearization of G_i (∇_y G, H v, cross term) and one backward
of F_j, as SOBA.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import _tree as T
from ...estimates import Schedule, soba_oracles
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["MASOBA"]


class MASOBA(Solver):
    """MA-SOBA: SOBA's directions with a moving average of the x-direction and v projected
    onto a ball (see the module docstring).

    Args:
        lr_x: α_k, the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: β_k, the lower step.
        lr_v: γ_k, the linear-system step (default ``lr_y``).
        average: θ_k, the moving-average weight (float or schedule).
        radius: R of the ball ‖v‖ ≤ R (``None``: no projection).

    Reference: Chen, Xiao & Balasubramanian 2024 (JMLR), Algorithm 1.
    """

    reference = "Chen, Xiao & Balasubramanian 2024 (JMLR), Algorithm 1 (MA-SOBA)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.1,
        lr_v: float | Schedule | dict | None = None,
        average: float | Schedule | dict = 0.1,
        radius: float | None = None,
        upper: Any = None,
    ):
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.lr_v = self.lr_y if lr_v is None else Schedule.of(lr_v)
        self.average = Schedule.of(average)
        if radius is not None and not radius > 0:
            raise ValueError(f"radius must be positive or None, got {radius}")
        self.radius = radius

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "v": T.zeros_like(ys), "h": T.zeros_like(xs)}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys, v, h = state["x"], state["y"], state["v"], state["h"]
        gy, hv, jv, gxF, gyF = soba_oracles(ctx.fresh_G(), ctx.fresh_F(), xs, ys, v)
        state["y"] = ctx.project_y(T.axpy(-self.lr_y(t), gy, ys))
        v = T.axpy(-self.lr_v(t), T.sub(hv, gyF), v)
        if self.radius is not None:
            v = T.scale(v, torch.clamp(self.radius / T.norm(v).clamp_min(1e-30), max=1.0))
        state["v"] = v
        state["x"] = self.step_x(ctx, state, h, t)
        theta = min(1.0, max(0.0, self.average(t)))
        state["h"] = T.axpy(theta, T.sub(T.sub(gxF, jv), h), h)
        return {}
