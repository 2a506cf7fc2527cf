"""BSA — Bilevel Stochastic Approximation (Ghadimi & Wang 2018, "Approximation methods for bilevel
programming", Algorithm 2, with the Hessian-inverse estimate of Algorithm 3 / Eq. 3.5).

Double loop. At outer iteration k, warm-started from y_k:

    y ← P_Y(y − β_k ∇_y G(x_k, y; B_t)),   t = 1..T            (T = ``inner_steps``)
    p ~ U{0, …, Q−1},   v = η Q Π_{i=1}^{p} (I − η ∇²_yy G(x_k, y_{k+1}; B_i)) ∇_y F(x_k, y_{k+1}; B_F)
    x_{k+1} = P_X(x_k − α_k [∇_x F(x_k, y_{k+1}; B_F) − ∇²_xy G(x_k, y_{k+1}; B_0) v])

E_p[v] = η Σ_{q=0}^{Q−1} (I − ηH)^q ∇_y F → H⁻¹ ∇_y F as Q → ∞ (η ≤ 1/L_g). The paper's theory uses
α_k ∝ 1/√k and a growing number of inner steps; here T is fixed and α_k, β_k are schedules
(defaults as in benchopt: β_k = β/√(k+1), α_k = α/√(k+1)). Per iteration: T lower gradients,
1 upper gradient, p ≤ Q−1 HVPs (each a fresh batch) and 1 cross product.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ..._rng import index
from ...estimates import Schedule, sampled_neumann_hypergradient, sgd_lower
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["BSA"]

_LR_X = Schedule(0.1, 0.5)
_LR_Y = Schedule(0.1, 0.5)  # default schedules (immutable)


class BSA(Solver):
    """BSA: warm-started lower SGD, then a randomly truncated Neumann hypergradient
    (p ~ U{0..Q−1}, fresh batch per HVP) and a projected upper step (see the module docstring).

    Args:
        lr_x: α_k (a float, a :class:`bilevel.estimates.Schedule` or its dict; default α/√(k+1)).
        lr_y: β_k (default β/√(k+1)).
        inner_steps: T lower steps per outer iteration (≥ 0).
        Q: truncation range of the Neumann series (≥ 1).
        eta: η, the Neumann step (> 0, η ≤ 1/L_g).
        seed: seeds the random truncation index p_t, a pure function of (seed, t)
            (:func:`bilevel._rng.index`: no generator in the state, a resumed run draws the same).

    Reference: Ghadimi & Wang 2018, Algorithms 2–3.
    """

    reference = "Ghadimi & Wang 2018, Algorithm 2 (BSA) with Algorithm 3 (stochastic Neumann)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = _LR_X,
        lr_y: float | Schedule | dict = _LR_Y,
        inner_steps: int = 10,
        Q: int = 10,
        eta: float = 0.1,
        seed: int = 0,
        upper: Any = None,
    ):
        if int(inner_steps) < 0 or int(Q) < 1 or not eta > 0:
            raise ValueError(f"BSA needs inner_steps >= 0, Q >= 1, eta > 0; got {inner_steps}, {Q}, {eta}")
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.inner_steps, self.Q, self.eta, self.seed = int(inner_steps), int(Q), float(eta), int(seed)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys}

    def prepare(self, state: dict[str, Any], t: int) -> None:
        state["p"] = index(self.seed, t, self.Q)  # the truncation index p ~ U{0..Q−1}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs = state["x"]

        G_batch = ctx.fresh_G

        ys = sgd_lower(G_batch, xs, state["y"], steps=self.inner_steps, lr=self.lr_y(t),
                       projection=ctx.y_projection, ctx=ctx)
        p = state["p"]
        hg, _ = sampled_neumann_hypergradient(ctx.fresh_F(), G_batch, xs, ys, Q=self.Q,
                                              eta=self.eta, p=p)
        state["x"] = self.step_x(ctx, state, hg, t)
        state["y"] = ys
        return {"neumann_p": p}
