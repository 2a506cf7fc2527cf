"""SRBA — Stochastic Recursive Bilevel Algorithm (Dagréou, Moreau, Vaiter & Ablin 2023, "A lower
bound and a near-optimal algorithm for bilevel empirical risk minimization", AISTATS 2024;
arXiv 2302.08766, Algorithm 1): SOBA's directions with SARAH / SPIDER estimates.

With D = (D_y, D_v, D_x) the SOBA directions (see :mod:`.soba`; v ≈ H⁻¹ ∇_y f) and u = (y, v, x):

    every q iterations:   D^t = D(u_t) on the full data
    otherwise:            D^t = D^{t−1} + D(u_t; i, j) − D(u_{t−1}; i, j)   (same batches i, j)
    y_{t+1} = P_Y(y_t − ρ D_y^t),   v_{t+1} = Π_{‖v‖≤R}(v_t − ρ D_v^t),   x_{t+1} = P_X(x_t − γ D_x^t)

with constant steps ρ, γ. ``period=None`` uses q = ⌈(n + m) / b⌉ (about one pass over both data
sets between full-batch restarts). Per stochastic iteration: two linearizations of G_i and two
backwards of F_j (at u_t and u_{t−1}); per restart: the same on the full data.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ... import _tree as T
from ...estimates import Schedule, soba_oracles, spider
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["SRBA"]


def _directions(G, F, xs, ys, v) -> tuple[T.Leaves, T.Leaves, T.Leaves]:
    gy, hv, jv, gxF, gyF = soba_oracles(G, F, xs, ys, v)
    return gy, T.sub(hv, gyF), T.sub(gxF, jv)


class SRBA(Solver):
    """SRBA: SOBA's directions with SARAH/SPIDER estimates, restarted on the full data every
    ``period`` iterations (see the module docstring).

    Args:
        lr_x: γ (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: ρ.
        lr_v: step of v (default ``lr_y``).
        period: q, iterations between full-batch restarts (``None``: ⌈(n + m)/b⌉).
        radius: R of the ball ‖v‖ ≤ R (``None``: no projection).

    Reference: Dagréou, Moreau, Vaiter & Ablin 2023 (AISTATS 2024), Algorithm 1.
    """

    reference = "Dagréou, Moreau, Vaiter & Ablin 2023 (AISTATS 2024), Algorithm 1 (SRBA)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.1,
        lr_v: float | Schedule | dict | None = None,
        period: int | None = None,
        radius: float | None = None,
        upper: Any = None,
    ):
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.lr_v = self.lr_y if lr_v is None else Schedule.of(lr_v)
        if period is not None and int(period) < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        if radius is not None and not radius > 0:
            raise ValueError(f"radius must be positive or None, got {radius}")
        self.period, self.radius = period, radius

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        if ctx.lower_data is None or ctx.upper_data is None:
            raise ValueError("SRBA needs lower_data= and upper_data= samplers (it restarts on full batches)")
        q = self.period
        if q is None:
            lo, up = ctx.lower_data, ctx.upper_data
            q = math.ceil((lo.n + up.n) / max(lo.batch_size, 1))
        return {"x": xs, "y": ys, "v": T.zeros_like(ys), "prev": None, "d": None, "q": int(q)}

    def phase(self, state: dict[str, Any], t: int) -> bool:
        return t % state["q"] == 0  # a restart every q steps (draws other batches)

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys, v = state["x"], state["y"], state["v"]
        if self.phase(state, t) or state["d"] is None:  # restart on the full data
            up, lo = ctx.full_batches()
            d = _directions(ctx.G(lo), ctx.F(up), xs, ys, v)
        else:
            G, F = ctx.fresh_G(), ctx.fresh_F()
            new = _directions(G, F, xs, ys, v)
            old = _directions(G, F, *state["prev"])
            d = tuple(spider(dp, gn, go) for dp, gn, go in zip(state["d"], new, old))
        d_y, d_v, d_x = d
        state["prev"], state["d"] = (xs, ys, v), d
        state["y"] = ctx.project_y(T.axpy(-self.lr_y(t), d_y, ys))
        v = T.axpy(-self.lr_v(t), d_v, v)
        if self.radius is not None:
            v = T.scale(v, torch.clamp(self.radius / T.norm(v).clamp_min(1e-30), max=1.0))
        state["v"] = v
        state["x"] = self.step_x(ctx, state, d_x, t)
        return {}
