"""stocBiO — stochastic bilevel optimizer (Ji, Yang & Liang 2021, "Bilevel optimization:
convergence analysis and enhanced design", ICML, Algorithm 3 with the estimator of Eq. 4).

Double loop with warm start. At outer iteration k:

    y ← P_Y(y − β ∇_y G(x_k, y; S_t)),   t = 1..T              (from y_k; T = ``inner_steps``)
    v = η Σ_{q=0}^{Q} Π_{j=1}^{q} (I − η ∇²_yy G(x_k, y_{k+1}; D_j)) ∇_y F(x_k, y_{k+1}; D_F)
    x_{k+1} = P_X(x_k − α [∇_x F(x_k, y_{k+1}; D_F) − ∇²_xy G(x_k, y_{k+1}; D_G) v])

with a fresh batch D_j for every Hessian-vector product (:func:`bilevel.estimates.
neumann_hypergradient`; the paper's scaling η Σ_{q=0}^{Q}, not the original code's). Per iteration:
T lower gradients, 1 upper gradient, Q HVPs and 1 cross product (each HVP also builds ∇_y G on
its batch: counted as a lower gradient).

``neumann="shared"`` is another estimator (not the paper's): all Q HVPs and the cross term on ONE
lower batch D_H, from one linearization of G on it (one gradient with graph, then one backward per
product: about 3× cheaper per HVP; biased for Q ≥ 2 since E[(I − ηH_D)^q] ≠ (I − ηH)^q, see
:func:`bilevel.estimates.neumann_hypergradient`). Per iteration: T + 1 lower gradients, 1 upper
gradient, Q HVPs, 1 cross product.
"""

from __future__ import annotations

from typing import Any

from ...estimates import Schedule, neumann_hypergradient, sgd_lower
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["StocBiO"]


class StocBiO(Solver):
    """stocBiO: double loop with warm start; T SGD steps on the lower level, then a Neumann-series
    hypergradient with a fresh batch per Hessian-vector product (see the module docstring).

    Args:
        lr_x: α, the upper step (float, :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: β, the lower SGD step.
        inner_steps: T, lower SGD steps per outer iteration (≥ 0).
        Q: Neumann terms (Hessian-vector products) per hypergradient (≥ 0).
        eta: η, the Neumann step (> 0; η < 2/λ_max(H) for convergence).
        neumann: ``"fresh"`` (default, the paper's estimator: a fresh batch per HVP) or
            ``"shared"`` (one batch for all HVPs and the cross term: cheaper, biased).

    State: ``x``, ``y``. Reference: Ji, Yang & Liang 2021 (ICML), Algorithm 3, Eq. 4.
    """

    reference = "Ji, Yang & Liang 2021 (ICML), Algorithm 3 (stocBiO)"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.1,
        lr_y: float | Schedule | dict = 0.1,
        inner_steps: int = 10,
        Q: int = 10,
        eta: float = 0.1,
        upper: Any = None,
        neumann: str = "fresh",
    ):
        if int(inner_steps) < 0 or int(Q) < 0 or not eta > 0:
            raise ValueError(
                f"stocBiO needs inner_steps >= 0, Q >= 0, eta > 0; got {inner_steps}, {Q}, {eta}")
        if neumann not in ("fresh", "shared"):
            raise ValueError(f"stocBiO: neumann must be 'fresh' or 'shared', got {neumann!r}")
        self.neumann = neumann
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.inner_steps, self.Q, self.eta = int(inner_steps), int(Q), float(eta)

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs = state["x"]

        G_batch = ctx.fresh_G

        ys = sgd_lower(G_batch, xs, state["y"], steps=self.inner_steps, lr=self.lr_y(t),
                       projection=ctx.y_projection, ctx=ctx)
        hg, _ = neumann_hypergradient(ctx.fresh_F(), G_batch, xs, ys, Q=self.Q, eta=self.eta,
                                      shared=self.neumann == "shared", ctx=ctx)
        state["x"] = self.step_x(ctx, state, hg, t)
        state["y"] = ys
        return {}
