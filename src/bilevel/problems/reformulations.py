"""Closed-form solutions of the value-function reformulations on the quadratic toy.

For :func:`bilevel.problems.quadratic_toy` (g(x, y) = ½ yᵀHy − yᵀ(Bx + c), f = ½‖y − b‖² + ½ρ‖x − a‖²)
both single-level reformulations used by the value-function solvers are quadratic programs:

* penalty (V-PBGD, Shen & Chen 2023): min_{x,y} f + γ (g − v),  v(x) = min_y g(x, y), where
  g − v = ½ (y − y*(x))ᵀ H (y − y*(x)); a strictly convex quadratic in z = (x, y);
* smoothed value function (Sow et al. 2022b, lecture slides Eq. 26–27):
  min f  s.t.  c(x, y) = g(x, y) − ṽ_a(x) ≤ 0,  ṽ_a(x) = min_y {g + (a1/2)‖y‖²} + a2
  = −½ (Bx + c)ᵀ(H + a1 I)⁻¹(Bx + c) + a2. For each λ ≥ 0 the Lagrangian f + λc is a convex quadratic
  in z with minimiser z(λ); c(z(λ)) decreases in λ, so the KKT multiplier λ* (c = 0 active) is found by
  bisection and z(λ*) is the solution.

These are the references the solvers are tested against; the distance of their x to the bilevel x*
is the reformulation's bias (O(1/γ), respectively O(√a)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .toys import Toy

__all__ = ["penalty_solution", "smoothed_vf_solution", "smoothed_vf_constraint"]


def _parts(toy: Toy) -> tuple[Tensor, Tensor, Tensor, int, int]:
    e = toy.extra
    if not all(k in e for k in ("H", "B", "c")):
        raise ValueError("the closed forms need the quadratic toy (bilevel.problems.quadratic_toy)")
    H, B, c = e["H"], e["B"], e["c"]
    return H, B, c, B.shape[1], B.shape[0]


def _lower_min(toy: Toy, x: Tensor, a1: float) -> Tensor:
    H, B, c, _, n = _parts(toy)
    r = B @ x + c
    return -0.5 * r @ torch.linalg.solve(H + a1 * torch.eye(n, dtype=H.dtype), r)


def smoothed_vf_constraint(toy: Toy, x: Tensor, y: Tensor, a1: float, a2: float) -> Tensor:
    """c(x, y) = g(x, y) − ṽ_a(x) (≤ 0 is feasible; a1 = a2 = 0 gives g − v ≥ 0)."""
    return toy.problem.g(x, y) - _lower_min(toy, x, a1) - a2


def _minimise(toy: Toy, lam: float, a1: float, a2: float) -> Tensor:
    """argmin over z = (x, y) of the quadratic f + λ c: Hessian and gradient at 0 written out,
    c = ½yᵀHy − yᵀ(Bx + c) + ½(Bx + c)ᵀK(Bx + c) − a2 with K = (H + a1 I)⁻¹."""
    H, B, c, p, n = _parts(toy)
    e = toy.extra
    K = torch.linalg.inv(H + a1 * torch.eye(n, dtype=H.dtype))
    hess = torch.zeros(p + n, p + n, dtype=H.dtype)
    hess[:p, :p] = e["rho"] * torch.eye(p, dtype=H.dtype) + lam * B.T @ K @ B
    hess[:p, p:] = -lam * B.T
    hess[p:, :p] = -lam * B
    hess[p:, p:] = torch.eye(n, dtype=H.dtype) + lam * H
    grad = torch.cat([-e["rho"] * e["a"] + lam * B.T @ K @ c, -e["b"] - lam * c])
    return -torch.linalg.solve(hess, grad)


def penalty_solution(toy: Toy, gamma: float) -> tuple[Tensor, Tensor]:
    """(x, y) minimising f + γ (g − v) (the V-PBGD reformulation) on the quadratic toy."""
    p = _parts(toy)[3]
    z = _minimise(toy, float(gamma), 0.0, 0.0)
    return z[:p], z[p:]


def smoothed_vf_solution(toy: Toy, a1: float, a2: float, *, iters: int = 100) -> tuple[Tensor, Tensor, float]:
    """(x, y, λ*) solving min f s.t. g − ṽ_a ≤ 0 on the quadratic toy (bisection on the multiplier)."""
    p = _parts(toy)[3]

    def violated(lam: float) -> bool:
        z = _minimise(toy, lam, a1, a2)
        return float(smoothed_vf_constraint(toy, z[:p], z[p:], a1, a2)) > 0

    if not violated(0.0):  # the constraint is inactive
        z = _minimise(toy, 0.0, a1, a2)
        return z[:p], z[p:], 0.0
    lo, hi = 0.0, 1.0
    while violated(hi):
        lo, hi = hi, 2 * hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if violated(mid) else (lo, mid)
    z = _minimise(toy, hi, a1, a2)
    return z[:p], z[p:], hi
