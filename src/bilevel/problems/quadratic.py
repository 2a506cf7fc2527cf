"""Stochastic quadratic bilevel problem with exact y*(x), h(x), ∇h(x) and x*.

Finite sums over n lower samples i and m upper samples j (x ∈ R^p, y ∈ R^d):

    g(x, y) = (1/n) Σ_i  ½ yᵀ A_i y − yᵀ (B_i x + c_i),      A_i = Q diag(λ ⊙ s_i) Qᵀ ≻ 0
    f(x, y) = (1/m) Σ_j  ½ ‖y − d_j‖² + ½ ρ ‖x − e_j‖²

with λ geometrically spaced in [L/κ, L] and per-sample scalings s_i > 0 normalised to mean
exactly 1, so the mean Hessian is A = Q diag(λ) Qᵀ with condition number exactly κ while every
sample Hessian differs (stochastic HVPs). B_i, c_i, d_j, e_j are a mean plus zero-mean noise
(``noise``). Closed forms, with M = A⁻¹B̄, m = A⁻¹c̄:

    y*(x) = M x + m,    ∇h(x) = Mᵀ (M x + m − d̄) + ρ (x − ē),
    x*    = (MᵀM + ρI)⁻¹ (Mᵀ (d̄ − m) + ρ ē),     h(x) = f(x, y*(x)).

A lower batch is ``(s_b, B_b, c_b)`` (rows of the per-sample tensors), an upper batch ``(d_b, e_b)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..formulation import Problem
from ._stochastic import StochasticProblem, make_sampler

__all__ = ["stochastic_quadratic"]


def stochastic_quadratic(
    dim_x: int = 10,
    dim_y: int = 20,
    *,
    n_lower: int = 1024,
    n_upper: int = 1024,
    kappa: float = 10.0,
    L: float = 1.0,
    hessian_noise: float = 0.5,
    noise: float = 1.0,
    rho: float = 0.1,
    coupling: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    sampler: str = "minibatch",
    dtype: torch.dtype = torch.float64,
) -> StochasticProblem:
    """Build the problem (see module docstring).

    ``kappa``/``L``: condition number and largest eigenvalue of the mean lower Hessian A;
    ``hessian_noise`` ∈ [0, 1): per-sample eigenvalue scalings s_i drawn in [1 − σ, 1 + σ] before
    normalisation (0: deterministic Hessian); ``noise``: std of the zero-mean per-sample parts of
    B_i, c_i, d_j, e_j; ``rho`` > 0: upper regularisation (makes h strongly convex);
    ``coupling``: scale of the mean cross matrix B̄ (‖M‖ ≈ coupling·κ/L, so the smoothness of h
    grows like (coupling·κ/L)²).
    """
    if dim_x < 1 or dim_y < 1 or n_lower < 1 or n_upper < 1:
        raise ValueError("dimensions and sample counts must be positive")
    if not kappa >= 1 or not L > 0:
        raise ValueError(f"need kappa >= 1 and L > 0, got kappa={kappa}, L={L}")
    if not 0 <= hessian_noise < 1:
        raise ValueError(f"hessian_noise must be in [0, 1), got {hessian_noise}")
    if not rho > 0 or noise < 0:
        raise ValueError(f"need rho > 0 and noise >= 0, got rho={rho}, noise={noise}")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=f64)

    def centred(n: int, *shape: int) -> Tensor:
        z = randn(n, *shape)
        return z - z.mean(0, keepdim=True)

    p, d = dim_x, dim_y
    Q, _ = torch.linalg.qr(randn(d, d))
    lam = torch.logspace(math.log10(L / kappa), math.log10(L), d, dtype=f64)
    s = 1.0 + hessian_noise * (2.0 * torch.rand(n_lower, d, generator=gen, dtype=f64) - 1.0)
    s = s / s.mean(0, keepdim=True)
    B_bar = coupling * randn(d, p) / math.sqrt(p)
    c_bar = randn(d)
    d_bar = randn(d)
    e_bar = randn(p)
    B = B_bar + noise * coupling * centred(n_lower, d, p) / math.sqrt(p)
    c = c_bar + noise * centred(n_lower, d)
    dd = d_bar + noise * centred(n_upper, d)
    e = e_bar + noise * centred(n_upper, p)

    # exact quantities (float64)
    A_inv = Q @ torch.diag(1.0 / lam) @ Q.T
    M = A_inv @ B_bar
    m = A_inv @ c_bar
    x_star = torch.linalg.solve(M.T @ M + rho * torch.eye(p, dtype=f64), M.T @ (d_bar - m) + rho * e_bar)

    Qt, lam_t, rho_t = Q.T.to(dtype), lam.to(dtype), float(rho)
    lower = tuple(t.to(dtype) for t in (s, B, c))
    upper = tuple(t.to(dtype) for t in (dd, e))
    M_t, m_t, d_t, e_t = (t.to(dtype) for t in (M, m, d_bar, e_bar))

    def g(x: Tensor, y: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
        s_b, B_b, c_b = batch
        w = Qt @ y
        quad = 0.5 * torch.dot(lam_t * s_b.mean(0), w * w)
        return quad - torch.dot(y, B_b.mean(0) @ x + c_b.mean(0))

    def f(x: Tensor, y: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
        d_b, e_b = batch
        return 0.5 * ((y - d_b) ** 2).sum(1).mean() + 0.5 * rho_t * ((x - e_b) ** 2).sum(1).mean()

    def y_star(x: Tensor, y_init: Tensor | None = None) -> Tensor:
        return M_t @ x + m_t

    def hypergrad(x: Tensor, y_init: Tensor | None = None) -> Tensor:
        return M_t.T @ (M_t @ x + m_t - d_t) + rho_t * (x - e_t)

    lam_s = lam[:, None] * s.T  # eigenvalues of every sample Hessian
    info = {
        "mu": float(lam[0]), "L": float(lam[-1]), "kappa": float(kappa),
        "L_max_sample": float(lam_s.max()), "mu_min_sample": float(lam_s.min()),
        "h_strong_convexity": float(torch.linalg.eigvalsh(M.T @ M + rho * torch.eye(p, dtype=f64))[0]),
        "h_smoothness": float(torch.linalg.eigvalsh(M.T @ M + rho * torch.eye(p, dtype=f64))[-1]),
        "A": (Q @ torch.diag(lam) @ Q.T).to(dtype), "B": B_bar.to(dtype), "c": c_bar.to(dtype),
        "d": d_t, "e": e_t, "rho": rho_t,
        "eigvecs": Q.to(dtype), "eigvals": lam.to(dtype),  # A_i = Q diag(λ ⊙ s_i) Qᵀ
    }
    return StochasticProblem(
        name="quadratic",
        problem=Problem(upper=f, lower=g, name="stochastic_quadratic"),
        x0=torch.zeros(p, dtype=dtype),
        y0=torch.zeros(d, dtype=dtype),
        lower_tensors=lower,
        upper_tensors=upper,
        lower_data=make_sampler(lower, sampler, batch_size, seed),
        upper_data=make_sampler(upper, sampler, batch_size, seed + 1),
        y_star_fn=y_star,
        hypergrad_fn=hypergrad,
        x_star=x_star.to(dtype),
        info=info,
    )
