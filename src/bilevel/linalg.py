"""Matrix-free linear solvers on flat leaves: CG, fixed-point / Neumann, dense solve.

Each solver takes ``matvec: v -> A v`` and ``b`` and returns ``(x, info)``; ``info`` always has
``iterations``, ``residual`` (‖A x − b‖ of the last evaluated iterate), ``converged``
(‖r‖ ≤ tol·‖b‖; with ``tol=0``, i.e. no early stop requested, it only means "no breakdown") and
``breakdown`` (``None`` or a reason such as ``"negative_curvature"``, ``"nonfinite"``,
``"diverging"``, ``"not_positive_definite"``). Solvers never hide a breakdown: they stop, return
the last good iterate and say why in ``info``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _tree as T
from ._trace import tracing

__all__ = ["cg", "fixed_point", "neumann", "dense_solve"]

MatVec = Callable[[T.Leaves], T.Leaves]


def _info(iterations: int, residual: float, bnorm: float, converged: bool, breakdown: str | None):
    return {
        "iterations": iterations,
        "residual": residual,
        "relative_residual": residual / bnorm if bnorm > 0 else residual,
        "converged": converged,
        "breakdown": breakdown,
    }


def cg(
    matvec: MatVec,
    b: T.Leaves,
    x0: T.Leaves | None = None,
    *,
    iters: int = 100,
    tol: float = 1e-10,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Conjugate gradient for A x = b with A symmetric positive definite (Hestenes & Stiefel 1952).

    Stops after ``iters`` products or when ‖r‖ ≤ tol·‖b‖ (``tol=0``: never early). If pᵀAp ≤ 0
    the operator is not positive definite along p: stop with ``breakdown="negative_curvature"``.
    """
    if tracing():
        return _cg_traced(matvec, b, x0, iters=iters, tol=tol)
    bnorm = float(T.norm(b))
    if x0 is None:
        x = T.zeros_like(b)
        r = b
    else:
        x = x0
        r = T.sub(b, matvec(x0))
    p = r
    rs = T.sq_norm(r)
    k, breakdown = 0, None
    stop = (tol * bnorm) ** 2
    while k < iters:
        if tol > 0 and float(rs) <= stop:
            break
        Ap = matvec(p)
        pAp = T.dot(p, Ap)
        pAp_f = float(pAp)
        if not math.isfinite(pAp_f):
            breakdown = "nonfinite"
            break
        if pAp_f <= 0.0:
            breakdown = "negative_curvature"
            break
        alpha = rs / pAp
        x = T.axpy(alpha, p, x)
        r = T.axpy(-alpha, Ap, r)
        rs_new = T.sq_norm(r)
        p = T.axpy(rs_new / rs, p, r)
        rs = rs_new
        k += 1
    res = math.sqrt(max(float(rs), 0.0))
    converged = breakdown is None and (res <= tol * bnorm if tol > 0 else True)
    return x, _info(k, res, bnorm, converged, breakdown)


def fixed_point(
    matvec: MatVec,
    b: T.Leaves,
    x0: T.Leaves | None = None,
    *,
    iters: int = 100,
    alpha: float = 1.0,
    tol: float = 0.0,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Richardson / fixed-point iteration v ← v − α (A v − b) = (I − αA) v + α b.

    This is the adjoint recursion of gradient descent on the lower level (AID-FP, Grazzi et al.
    2020); it converges for 0 < α < 2/λ_max(A). Growth of the residual is reported as
    ``breakdown="diverging"``.
    """
    if tracing():
        return _fixed_point_traced(matvec, b, x0, iters=iters, alpha=alpha, tol=tol)
    bnorm = float(T.norm(b))
    x = T.zeros_like(b) if x0 is None else x0
    res, prev, k, breakdown = float("nan"), float("inf"), 0, None
    while k < iters:
        r = T.sub(matvec(x), b)
        res = float(T.norm(r))
        if not math.isfinite(res):
            breakdown = "nonfinite"
            break
        if res > 1e3 * max(prev, bnorm) and k > 0:
            breakdown = "diverging"
            break
        if tol > 0 and res <= tol * bnorm:
            break
        prev = min(prev, res)  # best residual so far: slow geometric growth is caught too
        x = T.axpy(-alpha, r, x)
        k += 1
    converged = breakdown is None and (res <= tol * bnorm if tol > 0 else True)
    return x, _info(k, res, bnorm, converged, breakdown)


def neumann(
    matvec: MatVec, b: T.Leaves, *, iters: int = 10, alpha: float = 1.0
) -> tuple[T.Leaves, dict[str, Any]]:
    """Truncated Neumann series  α Σ_{q=0}^{Q} (I − αA)^q b  with Q = ``iters`` products.

    Identical to :func:`fixed_point` started at v₁ = α b (its iterates are the partial sums), so
    it is implemented as exactly that — one mechanism, two names.
    """
    return fixed_point(matvec, b, T.scale(b, alpha), iters=iters, alpha=alpha)


def dense_solve(A: Tensor, b: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """Solve A x = b with a dense symmetric A: Cholesky, falling back to LU, then least squares.

    The fallback used is reported in ``info["breakdown"]`` (``"not_positive_definite"`` or
    ``"singular"``) together with the true residual.
    """
    if tracing():
        return _dense_solve_traced(A, b)
    L, bad = torch.linalg.cholesky_ex(A)
    breakdown = None
    if int(bad) == 0:
        x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    else:
        breakdown = "not_positive_definite"
        x, bad_lu = torch.linalg.solve_ex(A, b)
        if int(bad_lu) != 0 or not bool(torch.isfinite(x).all()):
            breakdown = "singular"
            x = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    res = float(torch.linalg.vector_norm(A @ x - b))
    bnorm = float(torch.linalg.vector_norm(b))
    return x, _info(1, res, bnorm, breakdown is None, breakdown)


# --- traced variants (inside bilevel._trace.traced, e.g. under torch.func.vmap) ---------------------
# The same recursions without host reads: the full iteration budget runs, and an entry that has
# converged or broken down is frozen by masks (torch.where), so every task gets the iterate the
# eager solver would have stopped at. ``info`` holds tensors; ``breakdown`` is None and
# ``broke_down`` says per task whether the eager solver would have reported one.


def _where(mask: Tensor, new: T.Leaves, old: T.Leaves) -> T.Leaves:
    return tuple(torch.where(mask, u, v) for u, v in zip(new, old))


def _traced_info(k: Tensor, res: Tensor, bnorm: Tensor, converged: Tensor, broke: Tensor):
    rel = res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    return {"iterations": k, "residual": res, "relative_residual": rel, "converged": converged,
            "breakdown": None, "broke_down": broke}


def _cg_traced(matvec, b, x0, *, iters, tol):
    """:func:`cg` with masks: stops (freezes) at ‖r‖ ≤ tol·‖b‖ (tol = 0: at r = 0), and on
    non-positive or non-finite curvature pᵀAp (the eager solver's breakdowns)."""
    bnorm = T.norm(b)
    x = T.zeros_like(b) if x0 is None else tuple(x0)
    r = tuple(b) if x0 is None else T.sub(b, matvec(x))
    p, rs = r, T.sq_norm(r)
    stop = (tol * bnorm) ** 2
    broke = ~torch.isfinite(rs)
    active = (rs > stop) & ~broke
    k = torch.zeros((), dtype=torch.int64, device=rs.device)
    for _ in range(iters):
        Ap = matvec(p)
        pAp = T.dot(p, Ap)
        bad = active & (~torch.isfinite(pAp) | (pAp <= 0))
        run = active & ~bad
        alpha = rs / torch.where(run, pAp, torch.ones_like(pAp))
        x_new = T.axpy(alpha, p, x)
        r_new = T.axpy(-alpha, Ap, r)
        rs_new = T.sq_norm(r_new)
        bad2 = run & ~torch.isfinite(rs_new)
        run = run & ~bad2
        beta = rs_new / torch.where(run, rs, torch.ones_like(rs))
        x, r = _where(run, x_new, x), _where(run, r_new, r)
        p = _where(run, T.axpy(beta, p, r_new), p)
        rs = torch.where(run, rs_new, rs)
        k = k + run.to(k.dtype)
        broke = broke | bad | bad2
        active = run & (rs > stop)
    res = rs.clamp_min(0).sqrt()
    converged = ~broke & ((res <= tol * bnorm) if tol > 0 else torch.ones_like(broke))
    return x, _traced_info(k, res, bnorm, converged, broke)


def _fixed_point_traced(matvec, b, x0, *, iters, alpha, tol):
    """:func:`fixed_point` with masks (stops at ‖r‖ ≤ tol·‖b‖ when tol > 0, and on a non-finite
    or diverging residual, as the eager solver does)."""
    bnorm = T.norm(b)
    x = T.zeros_like(b) if x0 is None else tuple(x0)
    res = torch.full_like(bnorm, float("nan"))
    prev = torch.full_like(bnorm, float("inf"))
    broke = torch.zeros_like(bnorm, dtype=torch.bool)
    active = torch.ones_like(broke)
    k = torch.zeros((), dtype=torch.int64, device=bnorm.device)
    for i in range(iters):
        r = T.sub(matvec(x), b)
        rn = T.norm(r)
        res = torch.where(active, rn, res)
        bad = active & ~torch.isfinite(rn)
        if i > 0:
            bad = bad | (active & (rn > 1e3 * torch.maximum(prev, bnorm)))
        run = active & ~bad
        if tol > 0:
            run = run & ~(rn <= tol * bnorm)
        prev = torch.where(run, torch.minimum(prev, rn), prev)
        x = _where(run, T.axpy(-alpha, r, x), x)
        k = k + run.to(k.dtype)
        broke = broke | bad
        active = run
    converged = ~broke & ((res <= tol * bnorm) if tol > 0 else torch.ones_like(broke))
    return x, _traced_info(k, res, bnorm, converged, broke)


def _dense_solve_traced(A: Tensor, b: Tensor):
    """:func:`dense_solve` without branches: Cholesky where it succeeds, LU elsewhere."""
    L, bad = torch.linalg.cholesky_ex(A)
    ok = bad == 0
    x_chol = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    x_lu, _ = torch.linalg.solve_ex(A, b)
    x = torch.where(ok, x_chol, x_lu)
    res = torch.linalg.vector_norm(A @ x - b)
    bnorm = torch.linalg.vector_norm(b)
    one = torch.ones((), dtype=torch.int64, device=b.device)
    return x, _traced_info(one, res, bnorm, ok, ~ok)
