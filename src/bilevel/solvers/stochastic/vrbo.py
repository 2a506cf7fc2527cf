"""VRBO — Variance Reduction Bilevel Optimizer (Yang, Ji & Liang, NeurIPS 2021, Algorithm 2).

Double loop with SARAH/SPIDER recursions (Nguyen et al. 2017; Fang et al. 2018). Every ``period``
(q) outer iterations both estimators are reset on a large batch S₁ (the full data by default):

    u_k = ∇_y G(x_k, y_k; S₁),    v_k = ∇̂Φ(x_k, y_k; S₁)                     (k mod q = 0)
    x_{k+1} = x_k − α v_k

then ``inner_steps`` (= m+1) lower steps at the new x on fresh small batches S₂, both estimators
following the iterates through :func:`bilevel.estimates.spider` (same S₂ at both points):

    ṽ_t = ṽ_{t−1} + ∇̂Φ(x̃_t, ỹ_t; S₂) − ∇̂Φ(x̃_{t−1}, ỹ_{t−1}; S₂)
    ũ_t = ũ_{t−1} + ∇_y G(x̃_t, ỹ_t; S₂) − ∇_y G(x̃_{t−1}, ỹ_{t−1}; S₂)
    ỹ_{t+1} = ỹ_t − β ũ_t,        x̃_t = x_{k+1}

y_{k+1} = ỹ_{m+1}; (u, v) carry over to the next outer iteration. ∇̂Φ is the Neumann
hypergradient of stocBiO (paper scaling, Q HVPs; on S₁ every product uses the large batch).
Indexing: the recursion's reference point (x̃_{−1}, ỹ_{−1}) is the point where (u, v) were last
evaluated — (x_k, y_k) after a reset, else the last inner point of the previous outer iteration —
so the estimators always track the point they describe (the paper's extra evaluation at
ỹ_{k,m+1} is merged into the next outer iteration's first inner step).
Per inner step: 2 × (1 upper gradient + Q HVPs + 1 cross) + 2 lower gradients; the two evaluations
of each recursion share S₂ and run as one batched evaluation at the stacked points
(:func:`bilevel.estimates.at_two_points`).
"""

from __future__ import annotations

from typing import Any

import torch

from ... import _tree as T
from ... import oracles as O
from ...estimates import Schedule, at_two_points, neumann_hypergradient, replay, spider
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["VRBO"]


def _grad_y(xs: T.Leaves, ys: T.Leaves, G: O.Fn) -> T.Leaves:
    return O.grad_y(G, xs, ys)


def _concat(batches: list) -> Any:
    """One large batch from several minibatches (tuples of row-aligned tensors)."""
    return tuple(torch.cat(ts) for ts in zip(*batches))


class VRBO(Solver):
    """VRBO: double loop with SARAH/SPIDER recursions on both levels, restarted on large batches
    every ``period`` iterations (see the module docstring).

    Args:
        lr_x: the upper step (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: the lower step.
        Q, eta: Neumann terms and step of the hypergradient.
        inner_steps: lower recursion steps per outer iteration (≥ 1).
        period: iterations between large-batch restarts (≥ 1).
        large_batches: S₁ as that many concatenated minibatches (``None``: the full data).

    Reference: Yang, Ji & Liang 2021 (NeurIPS), Algorithm 2.
    """

    reference = "Yang, Ji & Liang 2021 (NeurIPS), Algorithm 2"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.1,
        Q: int = 10,
        eta: float = 0.1,
        inner_steps: int = 10,
        period: int = 10,
        large_batches: int | None = None,
        upper: Any = None,
    ):
        """``large_batches``: S₁ as that many concatenated minibatches (None: the full data)."""
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        if int(Q) < 0 or not eta > 0 or int(inner_steps) < 1 or int(period) < 1:
            raise ValueError("VRBO needs Q >= 0, eta > 0, inner_steps >= 1 and period >= 1")
        if large_batches is not None and int(large_batches) < 1:
            raise ValueError(f"large_batches must be None or >= 1, got {large_batches}")
        self.Q, self.eta = int(Q), float(eta)
        self.inner_steps, self.period = int(inner_steps), int(period)
        self.large_batches = None if large_batches is None else int(large_batches)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return {"x": xs, "y": ys, "u": None, "v": None, "anchor": None}

    def hypergradient(self, xs: T.Leaves, ys: T.Leaves, F: O.Fn, Gs: list) -> T.Leaves:
        """∇̂Φ(x, y) with F, Gs[0] for the cross term and Gs[1:] for the Q HVPs."""
        hg, _ = neumann_hypergradient(F, replay(Gs[1:]), xs, ys, Q=self.Q, eta=self.eta, G_cross=Gs[0])
        return hg

    def _hypergradient(self, xs: T.Leaves, ys: T.Leaves, samples: tuple) -> T.Leaves:
        return self.hypergradient(xs, ys, *samples)

    def _large(self, ctx: Context) -> tuple[O.Fn, list]:
        """(F, [G_cross, G_1..G_Q, G_y]) on S₁."""
        if self.large_batches is None:
            up, lo = ctx.full_batches()
            G = ctx.G(lo)
            return ctx.F(up), [G] * (self.Q + 2)
        n = self.large_batches
        F = ctx.F(_concat([ctx.upper_batch() for _ in range(n)]))
        return F, [ctx.G(_concat([ctx.lower_batch() for _ in range(n)])) for _ in range(self.Q + 2)]

    def phase(self, state: dict[str, Any], t: int) -> bool:
        return t % self.period == 0  # a restart every `period` steps (draws other batches)

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys = state["x"], state["y"]
        if self.phase(state, t) or state["u"] is None:  # restart on S₁
            F, Gs = self._large(ctx)
            state["u"] = O.grad_y(Gs[-1], xs, ys)
            state["v"] = self.hypergradient(xs, ys, F, Gs[:-1])
            state["anchor"] = (xs, ys)
        u, v = state["u"], state["v"]
        x_new = self.step_x(ctx, state, v, t)
        (xp, yp), yt = state["anchor"], ys
        beta = self.lr_y(t)
        for _ in range(self.inner_steps):
            F = ctx.fresh_F()
            Gs = [ctx.fresh_G() for _ in range(self.Q + 2)]
            # each estimator at the new and the previous point on the same samples S₂
            now, prev = (x_new, yt), (xp, yp)
            hg, hg_prev = at_two_points(self._hypergradient, (F, Gs[:-1]), now, prev, out="x")
            gy, gy_prev = at_two_points(_grad_y, Gs[-1], now, prev, out="y")
            v, u = spider(v, hg, hg_prev), spider(u, gy, gy_prev)
            xp, yp = x_new, yt
            yt = ctx.project_y(T.axpy(-beta, u, yt))
        state.update(x=x_new, y=yt, u=u, v=v, anchor=(xp, yp))
        return {}
