"""MRBO — Momentum-based Recursive Bilevel Optimizer (Yang, Ji & Liang, NeurIPS 2021, Algorithm 1).

Single loop. Both levels use STORM recursions (Cutkosky & Orabona 2019) whose two terms are
evaluated on the *same* samples at the current and at the previous point:

    u_k = ∇_y G(x_k, y_k; B_y) + (1 − β_k) (u_{k−1} − ∇_y G(x_{k−1}, y_{k−1}; B_y))
    v_k = ∇̂Φ(x_k, y_k; B_x)  + (1 − α_k) (v_{k−1} − ∇̂Φ(x_{k−1}, y_{k−1}; B_x))
    x_{k+1} = x_k − γ η_k v_k,        y_{k+1} = y_k − λ η_k u_k

with u_0, v_0 the plain estimates, B_x = {B_F, B_G, B_1..B_Q} and ∇̂Φ the Neumann hypergradient of
stocBiO (:func:`bilevel.estimates.neumann_hypergradient`, paper scaling):

    ∇̂Φ(x, y; B_x) = ∇_x F(x, y; B_F) − ∇²_xy G(x, y; B_G) v,
    v = η Σ_{q=0}^{Q} Π_{j=Q−q+1}^{Q} (I − η ∇²_yy G(x, y; B_j)) ∇_y F(x, y; B_F).

The paper's schedules η_k = d/(m+k)^{1/3}, α_{k+1} = c₁η_k², β_{k+1} = c₂η_k² are
``lr_x = Schedule(γd, 1/3, t0=m)``, ``lr_y = Schedule(λd, 1/3, t0=m)`` and
``momentum_x/momentum_y = Schedule(c d², 2/3, t0=m)`` (clipped to [0, 1]; index shifted by one).
Per iteration (k ≥ 1): 2 × (1 upper gradient + Q HVPs + 1 cross) + 2 lower gradients; the two
evaluations of each recursion share their samples and run as one batched evaluation at the stacked
points (:func:`bilevel.estimates.at_two_points`).
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ... import oracles as O
from ...estimates import Schedule, at_two_points, momentum_weight, neumann_hypergradient, replay, storm
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["MRBO"]

LR_X = Schedule(0.1, 1 / 3)


def _grad_y(xs: T.Leaves, ys: T.Leaves, G: O.Fn) -> T.Leaves:
    return O.grad_y(G, xs, ys)


MOMENTUM = Schedule(0.5, 2 / 3)


class MRBO(Solver):
    """MRBO: single loop with STORM recursions on both levels and the Neumann hypergradient
    (see the module docstring).

    Args:
        lr_x: γ η_k, the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: λ η_k, the lower step.
        momentum_x: α_k of the upper STORM recursion (float or schedule).
        momentum_y: β_k of the lower recursion (default ``momentum_x``).
        Q: Neumann terms per hypergradient (≥ 0).
        eta: η, the Neumann step (> 0).

    Reference: Yang, Ji & Liang 2021 (NeurIPS), Algorithm 1.
    """

    reference = "Yang, Ji & Liang 2021 (NeurIPS), Algorithm 1"
    #: :meth:`hypergradient` is a function of the stacked point whose samples are all objectives,
    #: so its two same-sample evaluations can be batched (:func:`bilevel.estimates.at_two_points`)
    stackable = True

    def __init__(
        self,
        lr_x: float | Schedule | dict = LR_X,
        lr_y: float | Schedule | dict = LR_X,
        momentum_x: float | Schedule | dict = MOMENTUM,
        momentum_y: float | Schedule | dict | None = None,
        Q: int = 10,
        eta: float = 0.1,
        upper: Any = None,
    ):
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.momentum_x = Schedule.of(momentum_x)
        self.momentum_y = self.momentum_x if momentum_y is None else Schedule.of(momentum_y)
        if int(Q) < 0 or not eta > 0:
            raise ValueError(f"MRBO needs Q >= 0 and eta > 0, got Q={Q}, eta={eta}")
        self.Q, self.eta = int(Q), float(eta)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "x_prev": None, "y_prev": None, "u": None, "v": None}

    def draw(self, ctx: Context, state: dict[str, Any]) -> tuple:
        """The samples B_x of one hypergradient estimate: (F on B_F, [G on B_G, G on B_1..B_Q])."""
        return ctx.fresh_F(), [ctx.fresh_G() for _ in range(self.Q + 1)]

    def hypergradient(self, xs: T.Leaves, ys: T.Leaves, samples: tuple) -> T.Leaves:
        """∇̂Φ(x, y; B_x) (replayable: the same ``samples`` give the same estimator)."""
        F, Gs = samples
        hg, _ = neumann_hypergradient(F, replay(Gs[1:]), xs, ys, Q=self.Q, eta=self.eta, G_cross=Gs[0])
        return hg

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys = state["x"], state["y"]
        Gy = ctx.fresh_G()
        samples = self.draw(ctx, state)
        if state["u"] is None:
            u, v = O.grad_y(Gy, xs, ys), self.hypergradient(xs, ys, samples)
        else:  # each estimator at (x_k, y_k) and (x_{k−1}, y_{k−1}) on the same samples
            now, prev = (xs, ys), (state["x_prev"], state["y_prev"])
            gy, gy_prev = at_two_points(_grad_y, Gy, now, prev, out="y")
            hg, hg_prev = at_two_points(self.hypergradient, samples, now, prev, out="x",
                                        batched=self.stackable)
            u = storm(state["u"], gy, gy_prev, momentum_weight(self.momentum_y, t))
            v = storm(state["v"], hg, hg_prev, momentum_weight(self.momentum_x, t))
        state["x_prev"], state["y_prev"], state["u"], state["v"] = xs, ys, u, v
        state["x"] = self.step_x(ctx, state, v, t)
        state["y"] = ctx.project_y(T.axpy(-self.lr_y(t), u, ys))
        return {}
