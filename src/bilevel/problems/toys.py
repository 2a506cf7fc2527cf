"""Deterministic toy bilevel problems with known solutions (float64 by default).

Notation as everywhere in bilevel: f is the upper objective, g the lower one (the papers write
F for the upper and f for the lower objective).

* :func:`nonconvex_toy` — non-convex follower (Liu et al. 2021, NeurIPS, Eq. 10):
  x ∈ [1, 10], y ∈ [−2, 2],  f(x, y) = x + x·y,  g(x, y) = −sin(x·y).
  The lower minimisers are y = (π/2 + 2πm)/x, several per x, all with g = −1. Along them
  f = x + π/2 + 2πm, and the optimistic value x ↦ min_m f is a saw-tooth with local minima at
  x = 3π/4, 7π/4, 11π/4 (all with y = −2); the global solution is (x*, y*) = (11π/4, −2), f* = −11π/4.
* :func:`llc_toy` — convex, non-singleton follower (Liu et al. 2020, ICML, Sec. 5.1; Liu et al.
  2021, Eq. 13): x ∈ [−100, 100]^n, y = (y1, y2) ∈ R^n × R^n,
  f = ‖x − y2‖⁴ + ‖y1 − e‖⁴,  g = ½‖y1‖² − xᵀy1.  The lower solution set {y1 = x, y2 ∈ R^n} is not a
  singleton (g ignores y2), min_y g = −½‖x‖²; the solution is x* = y1* = y2* = e (all ones), f* = 0.
* :func:`quadratic_toy` — a strongly convex quadratic pair with closed forms:
  g(x, y) = ½ yᵀHy − yᵀ(Bx + c),  f(x, y) = ½‖y − b‖² + ½ρ‖x − a‖²,
  y*(x) = H⁻¹(Bx + c) = Mx + m,  x* = (MᵀM + ρI)⁻¹(Mᵀ(b − m) + ρa).
  (:mod:`bilevel.problems.quadratic` has the finite-sum, stochastic counterpart.)

Each builder returns a :class:`Toy`: the :class:`~bilevel.Problem`, default x0/y0, the box
constraints as projections, the known solution (x*, y*, f*) and the lower value g*(x) = min_y g(x, y)
as data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import _tree as T
from ..formulation import Problem

__all__ = ["Box", "Toy", "nonconvex_toy", "llc_toy", "quadratic_toy", "TOYS"]


@dataclass(frozen=True)
class Box:
    """Projection onto the box [lo, hi] (applied leafwise; a picklable callable)."""

    lo: float
    hi: float

    def __call__(self, t: Tensor) -> Tensor:
        return t.clamp(self.lo, self.hi)


@dataclass
class Toy:
    """A toy problem with its known solution.

    ``y_star`` may be None when only x* is unique. ``f_star`` is the optimal upper value,
    ``g_star(x)`` the optimal lower value min_y g(x, y) over the box (None if unknown).
    ``x_bounds``/``y_bounds`` are boxes (or None); :attr:`x_projection` / :attr:`y_projection` are
    the matching callables for :func:`bilevel.solve`. ``extra`` holds problem-specific closed
    forms (e.g. ``y_star_fn`` for the quadratic).
    """

    name: str
    problem: Problem
    x0: Any
    y0: Any
    x_star: Any
    y_star: Any
    f_star: float
    x_bounds: Box | None = None
    y_bounds: Box | None = None
    reference: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    g_star: Callable[[Any], float] | None = None

    @property
    def F_star(self) -> float:  # noqa: N802
        """Deprecated name of :attr:`f_star` (the upper objective is f)."""
        return self.f_star

    @property
    def x_projection(self) -> Callable[[Tensor], Tensor] | None:
        return self.x_bounds

    @property
    def y_projection(self) -> Callable[[Tensor], Tensor] | None:
        return self.y_bounds

    def start(self, x0: Any = None, y0: Any = None) -> tuple[Any, Any]:
        """Fresh copies of the default (or given) starting point."""
        x = self.x0 if x0 is None else x0
        y = self.y0 if y0 is None else y0
        clone = lambda tree: T.unflatten([t.detach().clone() for t in T.flatten(tree)[0]],  # noqa: E731
                                         T.flatten(tree)[1])
        return clone(x), clone(y)

    def errors(self, x: Any, y: Any) -> dict[str, float]:
        """Relative errors |f − f*|/|f*| (absolute if f* = 0), ‖x − x*‖/‖x*‖, and ‖y − y*‖."""
        xs, _ = T.flatten(x)
        ys, _ = T.flatten(y)
        xst, _ = T.flatten(self.x_star)
        with torch.no_grad():
            fv = float(self.problem.f(x, y))
            out = {
                "f": fv,
                "f_err": abs(fv - self.f_star) / (abs(self.f_star) if self.f_star != 0 else 1.0),
                "x_err": float(T.norm(T.sub(xs, xst)) / T.norm(xst)),
            }
            if self.y_star is not None:
                out["y_err"] = float(T.norm(T.sub(ys, T.flatten(self.y_star)[0])))
        return out


def nonconvex_toy(x0: float = 1.0, y0: float = 2.0, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> Toy:
    """IAPTT-GM Eq. (10): f = x + xy, g = −sin(xy), x ∈ [1, 10], y ∈ [−2, 2] (0-dim tensors).

    g* = −1 at every x of the box: xy ranges over [−2x, 2x] ∋ π/2 − 2π·0, so sin(xy) = 1 is reachable.
    """

    def upper(x: Tensor, y: Tensor) -> Tensor:
        return x + x * y

    def lower(x: Tensor, y: Tensor) -> Tensor:
        return -torch.sin(x * y)

    xs = 11 * math.pi / 4
    return Toy(
        name="nonconvex",
        problem=Problem(upper, lower, name="nonconvex-toy"),
        x0=torch.tensor(x0, dtype=dtype, device=device),
        y0=torch.tensor(y0, dtype=dtype, device=device),
        x_star=torch.tensor(xs, dtype=dtype, device=device),
        y_star=torch.tensor(-2.0, dtype=dtype, device=device),
        f_star=-xs,
        x_bounds=Box(1.0, 10.0),
        y_bounds=Box(-2.0, 2.0),
        reference="Liu et al. 2021 (NeurIPS), Eq. 10",
        g_star=lambda x: -1.0,
    )


def llc_toy(n: int = 50, x0: float = 0.0, y0: float = 0.0, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None) -> Toy:
    """BDA / IAPTT-GM Eq. (13): f = ‖x − y2‖⁴ + ‖y1 − e‖⁴, g = ½‖y1‖² − xᵀy1; y = (y1, y2)."""

    def upper(x: Tensor, y: tuple[Tensor, Tensor]) -> Tensor:
        y1, y2 = y
        return (x - y2).pow(2).sum().pow(2) + (y1 - 1.0).pow(2).sum().pow(2)

    def lower(x: Tensor, y: tuple[Tensor, Tensor]) -> Tensor:
        y1, _ = y
        return 0.5 * y1.pow(2).sum() - x @ y1

    e = torch.ones(n, dtype=dtype, device=device)
    return Toy(
        name="llc",
        problem=Problem(upper, lower, name="llc-toy"),
        x0=torch.full((n,), float(x0), dtype=dtype, device=device),
        y0=(torch.full((n,), float(y0), dtype=dtype, device=device),
            torch.full((n,), float(y0), dtype=dtype, device=device)),
        x_star=e.clone(),
        y_star=(e.clone(), e.clone()),
        f_star=0.0,
        x_bounds=Box(-100.0, 100.0),
        y_bounds=None,
        reference="Liu et al. 2020 (ICML), Sec. 5.1; Liu et al. 2021 (NeurIPS), Eq. 13",
        g_star=lambda x: float(-0.5 * (x * x).sum()),
    )


def quadratic_toy(
    dim_x: int = 3,
    dim_y: int = 5,
    *,
    rho: float = 1.0,
    eig: tuple[float, float] = (1.0, 2.0),
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Toy:
    """Strongly convex quadratic pair (module docstring); H has eigenvalues spread over ``eig``.

    ``extra``: ``H``, ``B``, ``c``, ``b``, ``a``, ``rho``, ``y_star_fn`` (x -> y*(x)), ``hypergrad``
    (x -> ∇h(x)) and ``mu``/``L`` (the extreme eigenvalues of H, for step sizes).
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim_y, dim_y, generator=g, dtype=dtype))
    lam = torch.linspace(eig[0], eig[1], dim_y, dtype=dtype)
    H = Q @ torch.diag(lam) @ Q.T
    H = 0.5 * (H + H.T)
    B = torch.randn(dim_y, dim_x, generator=g, dtype=dtype) / math.sqrt(dim_x)
    c = torch.randn(dim_y, generator=g, dtype=dtype)
    b = torch.randn(dim_y, generator=g, dtype=dtype)
    a = torch.randn(dim_x, generator=g, dtype=dtype)
    M = torch.linalg.solve(H, B)
    m = torch.linalg.solve(H, c)
    A = M.T @ M + rho * torch.eye(dim_x, dtype=dtype)
    x_star = torch.linalg.solve(A, M.T @ (b - m) + rho * a)
    y_star = M @ x_star + m
    # drawn on the CPU (same numbers on every device), then moved
    H, B, c, b, a, M, m, x_star, y_star = (t.to(device) for t in (H, B, c, b, a, M, m, x_star, y_star))

    def upper(x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (y - b).pow(2).sum() + 0.5 * rho * (x - a).pow(2).sum()

    def lower(x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * y @ (H @ y) - y @ (B @ x + c)

    def y_star_fn(x: Tensor) -> Tensor:
        return M @ x + m

    def hypergrad(x: Tensor) -> Tensor:
        return M.T @ (M @ x + m - b) + rho * (x - a)

    f_star = float(upper(x_star, y_star))

    def g_star(x: Tensor) -> float:  # min_y g = −½ (Bx + c)ᵀ H⁻¹ (Bx + c)
        r = B @ x + c
        return float(-0.5 * r @ torch.linalg.solve(H, r))

    return Toy(
        name="quadratic",
        problem=Problem(upper, lower, name="quadratic-toy"),
        x0=torch.zeros(dim_x, dtype=dtype, device=device),
        y0=torch.zeros(dim_y, dtype=dtype, device=device),
        x_star=x_star,
        y_star=y_star,
        f_star=f_star,
        reference="strongly convex quadratic pair (closed form)",
        g_star=g_star,
        extra={"H": H, "B": B, "c": c, "b": b, "a": a, "rho": rho, "M": M, "m": m,
               "y_star_fn": y_star_fn, "hypergrad": hypergrad, "mu": float(lam[0]), "L": float(lam[-1])},
    )


#: name -> builder
TOYS: dict[str, Callable[..., Toy]] = {
    "nonconvex": nonconvex_toy,
    "llc": llc_toy,
    "quadratic": quadratic_toy,
}

# survey formulations with closed-form solutions (issue 13); imported here so `toy` runs them too
from .stackelberg import stackelberg_duopoly  # noqa: E402

TOYS["stackelberg"] = stackelberg_duopoly
