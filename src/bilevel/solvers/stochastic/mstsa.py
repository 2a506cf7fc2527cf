"""MSTSA — Momentum-assisted Single-Timescale Stochastic Approximation (Khanduri, Zeng, Hong, Wai,
Wang & Yang 2021a, arXiv:2102.07367v1, Algorithm 1).

Single loop: one SGD step on the lower level, then a STORM-momentum hypergradient step (the two
hypergradient terms on the same samples ξ_k, including the same truncation index p_k):

    y_{k+1} = y_k − β_k ∇_y G(x_k, y_k; B_y)
    d_k = ∇̄f(x_k, y_{k+1}; ξ_k) + (1 − η_k) (d_{k−1} − ∇̄f(x_{k−1}, y_k; ξ_k))      (d_0 = ∇̄f(x_0, y_1; ξ_0))
    x_{k+1} = x_k − α_k d_k

∇̄f is the randomly truncated Neumann hypergradient of Ghadimi & Wang (2018), as in TTSA
(:func:`bilevel.estimates.sampled_neumann_hypergradient`, p_k ~ U{0..Q−1}, Q·η scaling).
Step sizes follow the single-timescale O(ε⁻²) analysis: α_k, β_k ∝ (k+1)^{−1/2}, η_k ∝ α_k.
Per iteration (k ≥ 1): 1 lower gradient + 2 × (1 upper gradient + p_k HVPs + 1 cross).
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ... import oracles as O
from ..._rng import initial_state
from ...estimates import (
    Schedule,
    momentum_weight,
    replay,
    sampled_neumann_hypergradient,
    storm,
    truncation_index,
)
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["MSTSA"]

LR_X = Schedule(0.01, 0.5)
LR_Y = Schedule(0.1, 0.5)
MOMENTUM = Schedule(0.5, 0.5)


class MSTSA(Solver):
    """MSTSA: single loop, one lower SGD step and a STORM-momentum step along the randomly
    truncated Neumann hypergradient (see the module docstring).

    Args:
        lr_x: α_k (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: β_k.
        momentum: η_k of the STORM recursion (float or schedule).
        Q: truncation range of the Neumann series (≥ 1).
        eta: the Neumann step (> 0).
        seed: seeds the generator of the random truncation / directions (kept in the state).

    Reference: Khanduri et al. 2021a (arXiv:2102.07367v1), Algorithm 1.
    """

    reference = "Khanduri et al. 2021a (arXiv:2102.07367v1), Algorithm 1"

    def __init__(
        self,
        lr_x: float | Schedule | dict = LR_X,
        lr_y: float | Schedule | dict = LR_Y,
        momentum: float | Schedule | dict = MOMENTUM,
        Q: int = 10,
        eta: float = 0.1,
        seed: int = 0,
        upper: Any = None,
    ):
        self.lr_x, self.lr_y, self.momentum = Schedule.of(lr_x), Schedule.of(lr_y), Schedule.of(momentum)
        self.upper = step_rule(self, lr_x, upper)
        if int(Q) < 1 or not eta > 0:
            raise ValueError(f"MSTSA needs Q >= 1 and eta > 0, got Q={Q}, eta={eta}")
        self.Q, self.eta, self.seed = int(Q), float(eta), int(seed)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        rng = initial_state(self.seed)
        return {"x": xs, "y": ys, "x_prev": None, "y_prev": None, "d": None, "rng": rng}

    def prepare(self, state: dict[str, Any], t: int) -> None:
        state["p"] = truncation_index(state, self.Q)

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys = state["x"], state["y"]
        y_new = ctx.project_y(T.axpy(-self.lr_y(t), O.grad_y(ctx.fresh_G(), xs, ys), ys))
        p = state["p"]
        F = ctx.fresh_F()
        Gs = [ctx.fresh_G() for _ in range(p + 1)]

        def hypergradient(x: T.Leaves, y: T.Leaves) -> T.Leaves:
            hg, _ = sampled_neumann_hypergradient(F, replay(Gs[1:]), x, y, Q=self.Q, eta=self.eta, p=p,
                                                  G_cross=Gs[0])
            return hg

        hg = hypergradient(xs, y_new)
        if state["d"] is None:
            d = hg
        else:
            hg_prev = hypergradient(state["x_prev"], state["y_prev"])
            d = storm(state["d"], hg, hg_prev, momentum_weight(self.momentum, t))
        state.update(x_prev=xs, y_prev=y_new, d=d, y=y_new)
        state["x"] = self.step_x(ctx, state, d, t)
        return {}
