"""TTSA — Two-Timescale Stochastic Approximation (Hong, Wai, Wang & Yang 2023, SIAM J. Optim.,
Algorithm 1; lecture 001, Alg. 4).

Single loop, one lower SGD step then one projected upper step at the new lower iterate:

    y_{k+1} = P_Y(y_k − β_k ∇_y G(x_k, y_k; B_y))
    x_{k+1} = P_X(x_k − α_k h_k),  h_k = ∇_x F(x_k, y_{k+1}; B_F) − ∇²_xy G(x_k, y_{k+1}; B_0) v_k,
    v_k = η Q Π_{i=1}^{p} (I − η ∇²_yy G(x_k, y_{k+1}; B_i)) ∇_y F(x_k, y_{k+1}; B_F),  p ~ U{0..Q−1}

(the randomly truncated Neumann estimate of Ghadimi & Wang 2018, Eq. 3.5). Two timescales:
α_k/β_k → 0; for a non-convex h the paper takes α_k ∝ k^{−3/5}, β_k ∝ k^{−2/5} (the defaults).
The projection P_X is the ``x_projection`` given to :func:`bilevel.solve`.
Per iteration: 1 lower gradient, 1 upper gradient, p ≤ Q−1 HVPs, 1 cross product.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ... import oracles as O
from ..._rng import index
from ...estimates import Schedule, sampled_neumann_hypergradient
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["TTSA"]

_LR_X = Schedule(0.1, 0.6)
_LR_Y = Schedule(0.1, 0.4)  # default schedules (immutable)


class TTSA(Solver):
    """TTSA: one lower SGD step, then a projected upper step along the randomly truncated Neumann
    hypergradient, on two timescales (see the module docstring).

    Args:
        lr_x: α_k (a float, a :class:`bilevel.estimates.Schedule` or its dict; default ∝ k^(−3/5)).
        lr_y: β_k (default ∝ k^(−2/5)).
        Q: truncation range (≥ 1).
        eta: the Neumann step (> 0).
        seed: seeds the random truncation index p_t, a pure function of (seed, t)
            (:func:`bilevel._rng.index`: no generator in the state, a resumed run draws the same).

    Reference: Hong, Wai, Wang & Yang 2023 (SIAM J. Optim.), Algorithm 1.
    """

    reference = "Hong, Wai, Wang & Yang 2023 (SIAM J. Optim.), Algorithm 1"

    def __init__(
        self,
        lr_x: float | Schedule | dict = _LR_X,
        lr_y: float | Schedule | dict = _LR_Y,
        Q: int = 10,
        eta: float = 0.1,
        seed: int = 0,
        upper: Any = None,
    ):
        if int(Q) < 1 or not eta > 0:
            raise ValueError(f"TTSA needs Q >= 1 and eta > 0, got Q={Q}, eta={eta}")
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.Q, self.eta, self.seed = int(Q), float(eta), int(seed)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys}

    def prepare(self, state: dict[str, Any], t: int) -> None:
        state["p"] = index(self.seed, t, self.Q)  # the truncation index p ~ U{0..Q−1}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs = state["x"]
        gy = O.grad_y(ctx.fresh_G(), xs, state["y"])
        ys = ctx.project_y(T.axpy(-self.lr_y(t), gy, state["y"]))
        p = state["p"]
        hg, _ = sampled_neumann_hypergradient(ctx.fresh_F(), lambda: ctx.fresh_G(),
                                              xs, ys, Q=self.Q, eta=self.eta, p=p)
        state["x"] = self.step_x(ctx, state, hg, t)
        state["y"] = ys
        return {"neumann_p": p}
