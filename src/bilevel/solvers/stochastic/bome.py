"""BOME — Bilevel Optimization Made Easy (Ye, Liu, Wright, Stone & Liu, NeurIPS 2022, Algorithm 1;
"Liu et al. 2022" in the issue — Bo Liu and Mao Ye are joint first authors).

Value-function reformulation  min_{x,y} f(x, y)  s.t.  q(x, y) = g(x, y) − g*(x) ≤ 0, solved by a
first-order dynamic-barrier step on v = (x, y). Each iteration approximates y*(x_k) by T gradient
steps from y_k (fresh batches), ŷ_k = y_k^{(T)}, which gives the surrogate gradient

    ∇q̂(v_k) = ∇_{(x,y)} G(x_k, y_k; B) − (∇_x G(x_k, ŷ_k; B), 0)

(the same batch B in both terms; ∇g*(x) = ∇_x g(x, y*(x)) by Danskin). Then

    λ_k = max(φ_k − <∇F(v_k; ξ), ∇q̂(v_k)>, 0) / ‖∇q̂(v_k)‖²,    φ_k = η ‖∇q̂(v_k)‖²
    v_{k+1} = v_k − ξ (∇F(v_k; ξ) + λ_k ∇q̂(v_k))

(``phi="value"``: φ_k = η q̂(v_k) = η (G(x_k, y_k) − G(x_k, ŷ_k)), the paper's other choice).
The step ξ may differ between x (``lr_x``) and y (``lr_y``). Only gradients are used.
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ... import oracles as O
from ...errors import ConfigError
from ...estimates import Schedule
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["BOME"]


class BOME(Solver):
    """BOME: value-function reformulation solved by a dynamic-barrier first-order step on (x, y),
    with y*(x) approximated by T gradient steps (see the module docstring).

    Args:
        lr_x: ξ for the x block (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: ξ for the y block.
        inner_lr: step of the T inner gradient steps approximating y*(x).
        inner_steps: T (≥ 1).
        eta: η in φ_k = η ‖∇q̂‖² (> 0).
        phi: ``"grad_norm"`` (φ_k = η‖∇q̂‖², the paper's default) or ``"value"`` (φ_k = η q̂).

    Reference: Ye, Liu, Wright, Stone & Liu 2022 (NeurIPS), Algorithm 1.
    """

    reference = "Ye, Liu, Wright, Stone & Liu 2022 (NeurIPS), Algorithm 1"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.01,
        inner_lr: float = 0.1,
        inner_steps: int = 10,
        eta: float = 0.5,
        phi: str = "grad_norm",
        upper: Any = None,
    ):
        if phi not in ("grad_norm", "value"):
            raise ConfigError(f"BOME: phi must be 'grad_norm' or 'value', got {phi!r}")
        if int(inner_steps) < 1 or not inner_lr > 0 or not eta > 0:
            raise ValueError("BOME needs inner_steps >= 1, inner_lr > 0 and eta > 0")
        self.lr_x, self.lr_y = Schedule.of(lr_x), Schedule.of(lr_y)
        self.upper = step_rule(self, lr_x, upper)
        self.inner_lr, self.inner_steps = float(inner_lr), int(inner_steps)
        self.eta, self.phi = float(eta), phi

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys = state["x"], state["y"]
        yh = ys
        for _ in range(self.inner_steps):
            yh = ctx.project_y(T.axpy(-self.inner_lr, O.grad_y(ctx.fresh_G(), xs, yh), yh))
        G = ctx.fresh_G()
        g_val, qx, qy = O.grads(G, xs, ys)
        gh_val, gx_hat, _ = O.grads(G, xs, yh)
        qx = T.sub(qx, gx_hat)
        _, fx, fy = O.grads(ctx.fresh_F(), xs, ys)
        q_sq = T.sq_norm(qx) + T.sq_norm(qy)
        phi = self.eta * (q_sq if self.phi == "grad_norm" else g_val - gh_val)
        lam = (phi - T.dot(fx, qx) - T.dot(fy, qy)).clamp_min(0) / q_sq.clamp_min(1e-30)
        state["x"] = self.step_x(ctx, state, T.axpy(lam, qx, fx), t)
        state["y"] = ctx.project_y(T.axpy(-self.lr_y(t), T.axpy(lam, qy, fy), ys))
        return {"lmbda": float(lam)}
