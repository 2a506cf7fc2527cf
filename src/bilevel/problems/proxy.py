"""Ridge problems with a closed-form best response, for the proxy (best-response) estimators.

Survey 2207.11719, Sec. 4.2: a proxy P_φ(x) ≈ y*(x) is only as good as the map it fits. Two
ridge regressions with a known y*(x), exact hypergradient and Jacobian dy*/dx:

* ``kind="regularization"`` — per-feature weight decay e^{x_j} (hyperparameter optimisation):

      g(x, w) = ‖X w − t‖²/(2n) + ½ Σ_j e^{x_j} w_j²,   A(x) = XᵀX/n + diag(e^x),
      y*(x) = A⁻¹ Xᵀt/n,   dy*/dx = −A⁻¹ diag(e^x ⊙ y*)   (nonlinear in x);

* ``kind="prior"`` — a learned prior mean x (ridge towards x, as in transfer / iMAML):

      g(x, w) = ‖X w − t‖²/(2n) + (ρ/2)‖w − x‖²,   A = XᵀX/n + ρI,
      y*(x) = A⁻¹ (Xᵀt/n + ρ x),   dy*/dx = ρ A⁻¹   (affine: a linear proxy is exact).

Upper level for both: the validation loss f(x, w) = ‖X_v w − t_v‖²/(2m), so
∇h(x) = (dy*/dx)ᵀ X_vᵀ(X_v y* − t_v)/m. Data: t = X w_true + noise with a sparse-ish w_true
(half of the features irrelevant), so per-feature regularisation pays off on validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..formulation import Problem

__all__ = ["ProxyRidge", "proxy_ridge"]

KINDS = ("regularization", "prior")


@dataclass
class ProxyRidge:
    """A ridge bilevel problem with its closed forms (see the module docstring)."""

    problem: Problem
    kind: str
    x0: Tensor
    y0: Tensor
    data: dict[str, Tensor]
    rho: float

    def matrix(self, x: Tensor) -> Tensor:
        X = self.data["X"]
        G = X.T @ X / X.shape[0]
        if self.kind == "regularization":
            return G + torch.diag(torch.exp(x))
        return G + self.rho * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)

    def y_star(self, x: Tensor) -> Tensor:
        X, t = self.data["X"], self.data["t"]
        b = X.T @ t / X.shape[0]
        if self.kind == "prior":
            b = b + self.rho * x
        return torch.linalg.solve(self.matrix(x), b)

    def jacobian(self, x: Tensor) -> Tensor:
        """dy*/dx, a (dim y, dim x) matrix."""
        A = self.matrix(x)
        if self.kind == "prior":
            return self.rho * torch.linalg.inv(A)
        return -torch.linalg.solve(A, torch.diag(torch.exp(x) * self.y_star(x)))

    def h(self, x: Tensor) -> float:
        """The upper objective along the best response, f(x, y*(x))."""
        Xv, tv = self.data["Xv"], self.data["tv"]
        return float(0.5 * ((Xv @ self.y_star(x) - tv) ** 2).mean())

    def hypergrad(self, x: Tensor) -> Tensor:
        Xv, tv = self.data["Xv"], self.data["tv"]
        fy = Xv.T @ (Xv @ self.y_star(x) - tv) / Xv.shape[0]
        return self.jacobian(x).T @ fy

    def lower_lipschitz(self, x: Tensor) -> float:
        """λ_max(∇²_yy g) at x (a GD step size of 1/L is safe)."""
        return float(torch.linalg.eigvalsh(self.matrix(x))[-1])


def proxy_ridge(kind: str = "regularization", *, dim: int = 10, n_train: int = 40, n_val: int = 200,
                noise: float = 0.5, rho: float = 1.0, x0: float = 0.0, seed: int = 0,
                dtype: torch.dtype = torch.float64, device: Any = "cpu") -> ProxyRidge:
    """Build a :class:`ProxyRidge` (``kind`` "regularization" or "prior"); ``x0``: the starting
    value of every entry of x (a log weight decay, or a prior mean)."""
    if kind not in KINDS:
        raise ConfigError(f"proxy_ridge: kind must be one of {KINDS}, got {kind!r}")
    if min(dim, n_train, n_val) < 1:
        raise ConfigError(f"proxy_ridge: dim, n_train, n_val must be >= 1, got {dim}, {n_train}, {n_val}")
    if not (noise >= 0 and math.isfinite(noise)) or not (rho > 0 and math.isfinite(rho)):
        raise ConfigError(f"proxy_ridge: needs noise >= 0 and rho > 0, got {noise}, {rho}")
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, generator=gen, dtype=torch.float64)
    w_true[dim // 2:] = 0.0
    X = torch.randn(n_train, dim, generator=gen, dtype=torch.float64)
    t = X @ w_true + noise * torch.randn(n_train, generator=gen, dtype=torch.float64)
    Xv = torch.randn(n_val, dim, generator=gen, dtype=torch.float64)
    tv = Xv @ w_true + noise * torch.randn(n_val, generator=gen, dtype=torch.float64)
    data = {k: v.to(dtype=dtype, device=device) for k, v in
            {"X": X, "t": t, "Xv": Xv, "tv": tv}.items()}
    X, t, Xv, tv = data["X"], data["t"], data["Xv"], data["tv"]

    def upper(x: Tensor, w: Tensor) -> Tensor:
        return 0.5 * ((Xv @ w - tv) ** 2).mean()

    if kind == "regularization":
        def lower(x: Tensor, w: Tensor) -> Tensor:
            return 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (torch.exp(x) * w * w).sum()
    else:
        def lower(x: Tensor, w: Tensor) -> Tensor:
            return 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * rho * ((w - x) ** 2).sum()

    z = torch.full((dim,), float(x0), dtype=dtype, device=device)
    return ProxyRidge(Problem(upper, lower, name=f"proxy-ridge-{kind}"), kind, z,
                      torch.zeros(dim, dtype=dtype, device=device), data, float(rho))
