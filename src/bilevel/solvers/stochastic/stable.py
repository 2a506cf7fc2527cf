"""STABLE — Single-Timescale stochAstic BiLevEl optimization (Chen, Sun, Xiao & Yin, AISTATS 2022,
Algorithm 1).

Single loop and single timescale: the lower step carries a *correction term*, a first-order
prediction of how y*(x) moves when x does (dy*/dx = −H_yy⁻¹ H_yx):

    h_f^k   = ∇_x F(x_k, y_k; ξ) − H_xy^k (H_yy^k)⁻¹ ∇_y F(x_k, y_k; ξ)
    x_{k+1} = P_X(x_k − α_k h_f^k)
    y_{k+1} = y_k − β_k ∇_y G(x_k, y_k; φ) − (H_yy^k)⁻¹ (H_xy^k)ᵀ (x_{k+1} − x_k)

``hessian="dense"`` is the paper's algorithm: H_xy^k, H_yy^k are recursive (STORM-type) estimates of
the second-order matrices on the same sample at the current and previous point, H_yy projected
onto {H ⪰ μI} (eigenvalue clipping):

    H^k = (1 − τ_k) (H^{k−1} − ∇²G(x_{k−1}, y_{k−1}; φ_k)) + ∇²G(x_k, y_k; φ_k)

It builds dense dim(y)² and dim(x)·dim(y) matrices from dim(y) HVP/cross products per point, so
it is for small problems. ``hessian="neumann"`` (default) is the matrix-free form used on large
problems: both (H_yy)⁻¹ products are stochastic Neumann series on fresh batches
(η Σ_{q=0}^{Q} (I − ηH_j)^q, :func:`bilevel.estimates.neumann_hypergradient` for h_f) and
(H_xy)ᵀ Δx = ∇²_yx G Δx is one double-backward product (:meth:`bilevel.oracles.Linearization.cross_t`,
on the batch φ of the lower gradient); this variant has no recursion on second-order terms (τ = 1).
Step sizes: α_k, β_k = O(1/√K) (constant by default, or any Schedule).
"""

from __future__ import annotations

from typing import Any

import torch

from ... import _tree as T
from ... import linalg
from ... import oracles as O
from ...errors import ConfigError
from ...estimates import Schedule, momentum_weight, neumann_hypergradient
from ..base import Context, Solver
from ..upper import step_rule

__all__ = ["STABLE"]

MAX_DENSE_DIM = 4096


def _dense_second_order(G: O.Fn, xs: T.Leaves, ys: T.Leaves) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇²_yy G, ∇²_xy G) as dense (dim y × dim y) and (dim x × dim y) matrices (dim y products)."""
    lin = O.Linearization(G, xs, ys)
    n = T.numel(ys)
    eye = torch.eye(n, dtype=ys[0].dtype, device=ys[0].device)
    cols_h, cols_c = [], []
    for i in range(n):
        h, c = lin.both(T.from_vector(eye[i], ys))
        cols_h.append(T.to_vector(h))
        cols_c.append(T.to_vector(c))
    return torch.stack(cols_h, 1), torch.stack(cols_c, 1)


def _project_psd(H: torch.Tensor, mu: float) -> torch.Tensor:
    """Projection of a symmetric matrix onto {H ⪰ μI} (Frobenius norm): clip the eigenvalues."""
    lam, V = torch.linalg.eigh(0.5 * (H + H.T))
    return (V * lam.clamp_min(mu)) @ V.T


class STABLE(Solver):
    """STABLE: single loop and single timescale; the lower step carries a first-order
    correction for the motion of y*(x) (see the module docstring).

    Args:
        lr_x: α_k (a float, a :class:`bilevel.estimates.Schedule` or its dict).
        lr_y: β_k.
        hessian: ``"dense"`` (the paper's recursive matrix estimates) or ``"neumann"``
            (Hessian-vector products only).
        Q, eta: Neumann terms and step for ``hessian="neumann"``.
        tau: τ_k of the recursive estimates H^k = (1 − τ_k)(H^{k−1} − ∇²G_prev) + ∇²G_cur
            (float or schedule; ``hessian="dense"``).
        mu: lower bound μ of the projected Hessian estimate (> 0).

    Reference: Chen, Sun, Xiao & Yin 2022 (AISTATS), Algorithm 1.
    """

    reference = "Chen, Sun, Xiao & Yin 2022 (AISTATS), Algorithm 1"

    def __init__(
        self,
        lr_x: float | Schedule | dict = 0.01,
        lr_y: float | Schedule | dict = 0.1,
        hessian: str = "neumann",
        Q: int = 10,
        eta: float = 0.1,
        tau: float | Schedule | dict = 0.5,
        mu: float = 1e-2,
        upper: Any = None,
    ):
        if hessian not in ("neumann", "dense"):
            raise ConfigError(f"STABLE: hessian must be 'neumann' or 'dense', got {hessian!r}")
        if int(Q) < 0 or not eta > 0 or not mu > 0:
            raise ValueError(f"STABLE needs Q >= 0, eta > 0 and mu > 0, got Q={Q}, eta={eta}, mu={mu}")
        self.lr_x, self.lr_y, self.tau = Schedule.of(lr_x), Schedule.of(lr_y), Schedule.of(tau)
        self.upper = step_rule(self, lr_x, upper)
        self.hessian, self.Q, self.eta, self.mu = hessian, int(Q), float(eta), float(mu)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        if self.hessian == "dense" and T.numel(ys) > MAX_DENSE_DIM:
            raise ConfigError(f"STABLE(hessian='dense') builds a {T.numel(ys)}² Hessian; use "
                              "hessian='neumann' for problems this large")
        return {"x": xs, "y": ys, "x_prev": None, "y_prev": None, "H_yy": None, "H_xy": None}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        if self.hessian == "dense":
            return self._step_dense(ctx, state, t)
        xs, ys = state["x"], state["y"]

        G_fresh = ctx.fresh_G

        hg, _ = neumann_hypergradient(ctx.fresh_F(), G_fresh, xs, ys, Q=self.Q, eta=self.eta, ctx=ctx)
        x_new = self.step_x(ctx, state, hg, t)
        lin = O.Linearization(G_fresh(), xs, ys)  # ∇_y G and ∇²_yx G Δx on the same batch φ
        r = lin.cross_t(T.sub(x_new, xs))
        corr, _ = linalg.neumann(lambda p: O.hvp(G_fresh(), xs, ys, p), r, iters=self.Q, alpha=self.eta)
        y_new = T.sub(T.axpy(-self.lr_y(t), lin.grad_y, ys), corr)
        state["x"], state["y"] = x_new, ctx.project_y(y_new)
        return {}

    def _step_dense(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys = state["x"], state["y"]
        G = ctx.fresh_G()
        h_yy, h_xy = _dense_second_order(G, xs, ys)
        if state["H_yy"] is not None:
            a = momentum_weight(self.tau, t)
            p_yy, p_xy = _dense_second_order(G, state["x_prev"], state["y_prev"])
            h_yy = (1 - a) * (state["H_yy"] - p_yy) + h_yy
            h_xy = (1 - a) * (state["H_xy"] - p_xy) + h_xy
        H_yy, H_xy = _project_psd(h_yy, self.mu), h_xy
        L = torch.linalg.cholesky(H_yy)
        _, gx, gy = O.grads(ctx.fresh_F(), xs, ys)
        w = torch.cholesky_solve(T.to_vector(gy)[:, None], L)[:, 0]
        hg = T.sub(gx, T.from_vector(H_xy @ w, xs))
        x_new = self.step_x(ctx, state, hg, t)
        dx = T.to_vector(T.sub(x_new, xs))
        corr = torch.cholesky_solve((H_xy.T @ dx)[:, None], L)[:, 0]
        g_low = O.grad_y(ctx.fresh_G(), xs, ys)
        y_new = T.sub(T.axpy(-self.lr_y(t), g_low, ys), T.from_vector(corr, ys))
        state.update(x_prev=xs, y_prev=ys, H_yy=H_yy, H_xy=H_xy, x=x_new, y=ctx.project_y(y_new))
        return {}
