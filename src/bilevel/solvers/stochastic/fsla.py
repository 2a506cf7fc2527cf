"""FSLA — Fully Single Loop Algorithm (Li, Gu & Huang 2022, "A fully single loop algorithm for
bilevel optimization without Hessian inverse", AAAI; Algorithm 1, stochastic form).

One lower SGD step, one SGD step on the linear system H v = ∇_y f (so v carries the Hessian-inverse
information across iterations, no inner loop anywhere), and a STORM-corrected (Cutkosky & Orabona
2019) hypergradient direction:

    y_{k+1} = P_Y(y_k − β_k ∇_y G(x_k, y_k; B_1))
    v_{k+1} = v_k − η_k (∇²_yy G(x_k, y_{k+1}; B_2) v_k − ∇_y F(x_k, y_{k+1}; B_F))
    ν(x, y, v) = ∇_x F(x, y; B_F) − ∇²_xy G(x, y; B_2) v
    d_k = ν(x_k, y_{k+1}, v_{k+1}) + (1 − a_k) (d_{k−1} − ν(x_{k−1}, y_k, v_k))      (same B_F, B_2)
    x_{k+1} = P_X(x_k − α_k d_k),     d_0 = ν(x_0, y_1, v_1)

Here the HVP of the v-step and the cross term share the lower batch B_2 (one linearization of G,
two backwards) and ∇_x F, ∇_y F share B_F (one backward). Defaults follow benchopt's FSLA
(1/√(k+1) schedules). Per iteration (k ≥ 1): 1 lower gradient, 2 lower linearizations (HVP +
cross; cross at the previous point), 2 upper backwards.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ... import oracles as O
from ...estimates import Schedule, momentum_weight, storm
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["FSLA"]

_LR_X = Schedule(0.01, 0.5)
_LR_Y = Schedule(0.1, 0.5)
_MOMENTUM = Schedule(0.5, 0.5)  # default schedules (immutable)


class FSLA(Solver):
    """FSLA: fully single loop — one lower SGD step, one SGD step on H v = ∇_y f and a
    STORM-corrected hypergradient direction (see the module docstring).

    Args:
        lr_x: α_k, the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: β_k, the lower step.
        lr_v: η_k, the linear-system step (default ``lr_y``).
        momentum: a_k of the STORM correction (float or schedule).

    Reference: Li, Gu & Huang 2022 (AAAI), Algorithm 1.
    """

    reference = "Li, Gu & Huang 2022 (AAAI), Algorithm 1 (FSLA)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = _LR_X,
        lr_y: float | Schedule | dict = _LR_Y,
        lr_v: float | Schedule | dict | None = None,
        momentum: float | Schedule | dict = _MOMENTUM,
        upper: Any = None,
    ):
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.lr_v = self.lr_y if lr_v is None else Schedule.of(lr_v)
        self.momentum = Schedule.of(momentum)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "v": T.zeros_like(ys), "d": None, "prev": None}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, v = state["x"], state["v"]
        gy = O.grad_y(ctx.fresh_G(), xs, state["y"])
        ys = ctx.project_y(T.axpy(-self.lr_y(t), gy, state["y"]))
        G2, F = ctx.fresh_G(), ctx.fresh_F()
        lin = O.Linearization(G2, xs, ys)
        _, gxF, gyF = O.grads(F, xs, ys)
        v_new = T.axpy(-self.lr_v(t), T.sub(lin.hvp(v), gyF), v)
        nu = T.sub(gxF, lin.cross(v_new))
        if state["d"] is None:
            d = nu
        else:
            xp, yp, vp = state["prev"]
            nu_old = T.sub(O.grad_x(F, xp, yp), O.cross(G2, xp, yp, vp))
            d = storm(state["d"], nu, nu_old, momentum_weight(self.momentum, t))
        state["prev"], state["d"] = (xs, ys, v_new), d
        state["x"] = self.step_x(ctx, state, d, t)
        state["y"], state["v"] = ys, v_new
        return {}
