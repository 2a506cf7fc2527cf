"""SOBA — StOchastic Bilevel Algorithm (Dagréou, Ablin, Vaiter & Moreau 2022, "A framework for
bilevel optimization that enables stochastic and global variance reduction algorithms", NeurIPS,
Eq. 4 / Algorithm 1 with unbiased estimators).

Single loop on (y, v, x), all three directions evaluated at the current point with one lower
sample i and one upper sample j:

    D_y = ∇_y G_i(x, y)
    D_v = ∇²_yy G_i(x, y) v − ∇_y F_j(x, y)          (SGD on the linear system H v = ∇_y f)
    D_x = ∇_x F_j(x, y) − ∇²_xy G_i(x, y) v
    y ← P_Y(y − ρ_t D_y),   v ← v − ρ_t D_v,   x ← P_X(x − γ_t D_x)

(the paper's v is −v here). Theorem 1 of the paper uses ρ_t ∝ t^{−2/5}, γ_t ∝ t^{−3/5} (defaults).
Per iteration: one linearization of G_i giving ∇_y G, H v and the cross term (one gradient with
graph + one backward) and one backward of F_j.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ...estimates import Schedule, soba_oracles
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["SOBA"]

_LR_X = Schedule(0.01, 0.6)
_LR_Y = Schedule(0.1, 0.4)  # default schedules (immutable)


class SOBA(Solver):
    """SOBA: single-loop stochastic bilevel optimization on (y, v, x), one lower and one upper
    batch per step (see the module docstring for the update):

        y ← P_Y(y − ρ_t ∇_y G_i),   v ← v − ρ_t (∇²_yy G_i v − ∇_y F_j),
        x ← P_X(x − γ_t (∇_x F_j − ∇²_xy G_i v)).

    Args:
        lr_x: γ_t — a float, a :class:`bilevel.estimates.Schedule` or its dict (default
            0.01 · t^(−0.6)).
        lr_y: ρ_t for y (default 0.1 · t^(−0.4)).
        lr_v: step for v (default: ``lr_y``).

    State: ``x``, ``y``, ``v`` (flat leaves). Needs ``lower_data`` / ``upper_data`` for the
    stochastic setting (full batches otherwise).

    Reference: Dagréou, Ablin, Vaiter & Moreau 2022 (NeurIPS), Eq. 4 / Algorithm 1.
    """

    reference = "Dagréou, Ablin, Vaiter & Moreau 2022 (NeurIPS), SOBA (Eq. 4)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = _LR_X,
        lr_y: float | Schedule | dict = _LR_Y,
        lr_v: float | Schedule | dict | None = None,
        upper: Any = None,
    ):
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.lr_v = self.lr_y if lr_v is None else Schedule.of(lr_v)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "v": T.zeros_like(ys)}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys, v = state["x"], state["y"], state["v"]
        gy, hv, jv, gxF, gyF = soba_oracles(ctx.fresh_G(), ctx.fresh_F(), xs, ys, v)
        state["y"] = ctx.project_y(T.axpy(-self.lr_y(t), gy, ys))
        state["v"] = T.axpy(-self.lr_v(t), T.sub(hv, gyF), v)
        state["x"] = self.step_x(ctx, state, T.sub(gxF, jv), t)
        return {}
