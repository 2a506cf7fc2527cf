"""Matrix-free linear solvers on flat leaves: CG, MINRES, CG on the normal equations, fixed-point /
Neumann, dense solve.

Each solver takes ``matvec: v -> A v`` (A symmetric: a Hessian) and ``b`` and returns ``(x, info)``;
``info`` always has ``iterations``, ``residual`` (‖A x − b‖ of the returned iterate, as tracked by
the solver's recursion), ``relative_residual``, ``converged`` (‖r‖ ≤ tol·‖b‖ — for
:func:`normal_cg` the normal-equation residual ‖Aᵀr‖ ≤ tol·‖Aᵀb‖; with ``tol=0``, i.e. no early
stop requested, it only means "no breakdown") and ``breakdown``: ``None`` or a reason —
``"negative_curvature"`` (CG met pᵀAp < 0: A is indefinite), ``"singular"`` (zero curvature /
zero pivot relative to the curvature seen so far: A is singular in that dtype),
``"nonfinite"`` (an overflow or a NaN product), ``"diverging"`` (fixed point), or
``"not_positive_definite"`` (dense). Solvers never hide a breakdown: they stop, return the last
good iterate and say why in ``info``. A residual that reaches zero (or the dtype's rounding level)
is convergence, never a breakdown.

Which solver for which Hessian:

* :func:`cg` — symmetric positive definite A (strongly convex lower level);
* :func:`minres` — any symmetric A, also indefinite (Paige & Saunders 1975); for a singular A and
  b in its range it converges to a solution, for an inconsistent system it stops at a
  least-squares solution with ``breakdown="singular"``;
* :func:`normal_cg` — CG on AᵀA x = Aᵀb (CGLS): any A; from x0 = 0 it converges to the
  minimum-norm least-squares solution A⁺b, at two products per iteration and the condition
  number squared;
* :func:`damped` — the operator A + λI: with λ > −λ_min(A) any of the above applies (the
  proximal / Tikhonov system of iMAML, Rajeswaran et al. 2019, Eq. 6: (I + H/λ) v = b is
  (H + λI) v = λ b).

Host synchronisations: no iterative solver reads a value per iteration — their tests are
replayed on the host once per block of ``check_every`` iterations (default 1 on the CPU, where a
read is no synchronisation, :data:`CHECK_EVERY` on an accelerator), or (``check_every=0``, and
always in traced mode) run as device masks with one read at the end (the fixed-iteration form,
usable under ``torch.func.vmap``). Every form stops at the same iteration with the same iterate
and reason (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _tree as T
from ._trace import tracing

__all__ = ["cg", "minres", "normal_cg", "damped", "fixed_point", "neumann", "dense_solve", "SOLVERS",
           "ALIASES", "solver"]

MatVec = Callable[[T.Leaves], T.Leaves]


def _info(iterations: int, residual: float, bnorm: float, converged: bool, breakdown: str | None):
    return {
        "iterations": iterations,
        "residual": residual,
        "relative_residual": residual / bnorm if bnorm > 0 else residual,
        "converged": converged,
        "breakdown": breakdown,
    }


def _eps(b: T.Leaves) -> float:
    """Unit roundoff of the working dtype."""
    return float(torch.finfo(b[0].dtype).eps)


def _read(values: list[Tensor]) -> list[Any]:
    """The values of a list of same-shape tensors in one host read (``tolist`` of their stack)."""
    return [values[0].tolist()] if len(values) == 1 else torch.stack(values).tolist()


def _norms(rs: list[T.Leaves]) -> list[Tensor]:
    """[‖r‖ for r in rs]: one ``_foreach_norm`` for single-leaf vectors (the residual tests of
    :func:`fixed_point` read a block of norms at once; ``T.norm`` costs four dispatches each)."""
    if all(len(r) == 1 for r in rs):
        return list(torch._foreach_norm([r[0] for r in rs]))
    return [T.norm(r) for r in rs]


def _start(matvec: MatVec, b: T.Leaves, x0: T.Leaves | None) -> tuple[T.Leaves, T.Leaves]:
    """(x, r = b − A x) at the start x0 (None: x = 0, r = b, no product). Eagerly, a leaf of b
    that is not row-major (a matrix gradient autograd returns as a transpose) is copied once: the
    solver's vectors take b's layout, and each would otherwise be copied at every inner product
    and at every product with a kernel that takes row-major vectors."""
    if not tracing():
        b = tuple(t if t.is_contiguous() else t.contiguous() for t in b)
    if x0 is None:
        return T.zeros_like(b), tuple(b)
    x = tuple(x0)
    return x, T.sub(b, matvec(x))


def damped(matvec: MatVec, damping: float) -> MatVec:
    """The operator v -> A v + λ v (λ = ``damping``); ``damping=0`` returns ``matvec`` itself."""
    lam = float(damping)
    if lam == 0.0:
        return matvec
    return lambda v: T.axpy(lam, v, matvec(v))


#: CG's default block of iterations between host reads on an accelerator (:func:`cg`)
CHECK_EVERY = 10


def check_every_for(b: T.Leaves, check_every: int | None) -> int:
    """The block size :func:`cg` uses: ``check_every``, or by default 1 for CPU tensors (a read
    is no synchronisation there) and :data:`CHECK_EVERY` elsewhere; ≥ 0."""
    if check_every is None:
        return 1 if b[0].device.type == "cpu" else CHECK_EVERY
    every = int(check_every)
    if every < 0:
        raise ValueError(f"check_every must be >= 0 (0: fixed iterations), got {check_every}")
    return every


#: breakdown reasons of the masked solvers, by code (0 = none); one place for eager and traced mode
_REASONS = (None, "negative_curvature", "singular", "nonfinite", "diverging")


def cg(
    matvec: MatVec,
    b: T.Leaves,
    x0: T.Leaves | None = None,
    *,
    iters: int = 100,
    tol: float = 1e-10,
    check_every: int | None = None,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Conjugate gradient for A x = b with A symmetric positive definite (Hestenes & Stiefel 1952).

    Stops after ``iters`` products or when ‖r‖ ≤ tol·‖b‖ (``tol=0``: only at r = 0). A zero
    residual — also one at the rounding level u·‖b‖ where pᵀAp underflows with it — is
    convergence. Otherwise, if pᵀAp < 0 the operator is indefinite along p
    (``breakdown="negative_curvature"``), and if |pᵀAp|/pᵀp ≤ 10u·max_k p_kᵀAp_k/p_kᵀp_k it is
    singular in this dtype along p (``"singular"``: the step would overflow; the sign of such a
    curvature is rounding noise). Both stop with the last iterate, which minimises the quadratic
    over the directions explored so far (the point a truncated-Newton method keeps, Steihaug 1983).

    Host synchronisation — never one per iteration:

    * ``check_every=k ≥ 1``: the iterations run in blocks of k without reading anything; their
      scalars (pᵀAp, pᵀp, rᵀr) are read in one synchronisation per block and the tests above are
      replayed on them, so the solver stops exactly where a per-iteration test would have (at
      most k − 1 products are computed past that point and discarded; the k iterates of a block
      are kept until it is read). One more read at the start. The default ``None`` is
      :data:`CHECK_EVERY` (10) on an accelerator and 1 on the CPU, where reading a value costs no
      synchronisation and stopping at once saves the products.
    * ``check_every=0``: the fixed-iteration form. All ``iters`` iterations run; a system that
      stops is frozen by masks (``torch.where``) with its iterate, count and reason, and the
      results are read once at the end. No data-dependent Python control flow, O(1) iterates in
      memory: this is the loop that runs, with no read at all, in traced mode
      (:func:`bilevel.hypergrad.vmap`, ``torch.func.vmap``), where ``info`` holds tensors.

    Both forms return the same iterate and ``info`` (tested).
    """
    every = check_every_for(b, check_every)
    if tracing() or every == 0:
        return _cg_masked(matvec, b, x0, iters=iters, tol=tol)
    eps = _eps(b)
    x, r = _start(matvec, b, x0)
    p, rs = r, T.sq_norm(r)
    rs_f, bnorm = torch.stack([rs, T.norm(b)]).tolist()  # one synchronisation
    stop = (tol * bnorm) ** 2
    k, breakdown, done, kappa_max = 0, None, False, 0.0
    if not math.isfinite(rs_f):
        breakdown = "nonfinite"
    res = math.sqrt(rs_f) if math.isfinite(rs_f) else rs_f
    x_block_start = x
    while breakdown is None and not done and k < iters and rs_f > stop:
        block_x, scalars = [], []
        for _ in range(min(every, iters - k)):  # a block: no read
            Ap = matvec(p)
            pAp, pp = T.dot(p, Ap), T.sq_norm(p)
            alpha = rs / pAp
            x = T.axpy(alpha, p, x)
            r = T.axpy(-alpha, Ap, r)
            rs_new = T.sq_norm(r)
            p = T.axpy(rs_new / rs, p, r)
            rs = rs_new
            block_x.append(x)
            scalars.append(torch.stack([pAp, pp, rs_new]))
        kept = None  # index of the last accepted iterate of the block
        for j, (pAp_f, pp_f, rs_new_f) in enumerate(_read(scalars)):  # one sync
            if rs_f <= stop:
                done = True
                break
            if not math.isfinite(pAp_f):
                breakdown = "nonfinite"
                break
            kappa = pAp_f / pp_f if pp_f > 0.0 else 0.0
            if pAp_f <= 0.0 or kappa <= 10.0 * eps * kappa_max:
                if res > eps * bnorm:  # else: solved to rounding, pᵀAp underflowed with r
                    singular = abs(kappa) <= 10.0 * eps * kappa_max or pAp_f == 0.0
                    breakdown = "singular" if singular else "negative_curvature"
                done = True
                break
            kappa_max = max(kappa_max, kappa)
            if not math.isfinite(rs_new_f):
                breakdown = "nonfinite"  # overflow: keep the last finite iterate
                break
            kept, rs_f, res = j, rs_new_f, math.sqrt(rs_new_f)
            k += 1
        if breakdown is not None or done:  # stopped inside the block: its later work is discarded
            x = block_x[kept] if kept is not None else x_block_start
        x_block_start = x
    converged = breakdown is None and (res <= tol * bnorm if tol > 0 else True)
    return x, _info(k, res, bnorm, converged, breakdown)


def _cg_masked(matvec: MatVec, b: T.Leaves, x0: T.Leaves | None, *, iters: int, tol: float):
    """:func:`cg` with ``check_every=0``: the fixed-iteration, mask-frozen loop (also traced mode)."""
    bnorm = T.norm(b)
    thr = 10.0 * _eps(b)
    x, r = _start(matvec, b, x0)
    p, rs = r, T.sq_norm(r)
    stop = (tol * bnorm) ** 2
    active = torch.isfinite(rs) & (rs > stop)
    k = torch.zeros((), dtype=torch.int64, device=rs.device)
    kappa_max = torch.zeros_like(rs)
    halted = overflow = torch.zeros_like(active)
    at_halt = torch.ones(2, dtype=rs.dtype, device=rs.device)  # (pᵀAp, pᵀp) where it halted
    # Only x and the scalars are frozen once a system stops: r and p of a stopped system are
    # never read again (their garbage never reaches x), which keeps the loop at one mask per leaf.
    for _ in range(iters):
        Ap = matvec(p)
        curv = torch.stack([T.dot(p, Ap), T.sq_norm(p)])
        pAp = curv[0]
        kappa = pAp / curv[1]
        halt = active & ((pAp <= 0) | (kappa <= thr * kappa_max) | ~torch.isfinite(pAp))
        run = active & ~halt
        halted = halted | halt
        at_halt = torch.where(halt, curv, at_halt)
        kappa_max = torch.where(run, torch.maximum(kappa_max, kappa), kappa_max)
        alpha = rs / pAp
        x_new, r = T.axpy(alpha, p, x), T.axpy(-alpha, Ap, r)
        rs_new = T.sq_norm(r)
        bad = run & ~torch.isfinite(rs_new)  # overflow: keep the last finite iterate
        overflow = overflow | bad
        run = run & ~bad
        p = T.axpy(rs_new / rs, p, r)
        x = _where(run, x_new, x)
        rs = torch.where(run, rs_new, rs)
        k = k + run
        active = run & (rs > stop)
    res = rs.sqrt()
    # why it stopped (the eager tests): a non-finite start or product, an overflow, or a flat
    # direction — convergence if the residual is at the rounding level u·‖b‖, "singular" for zero
    # or rounding-level curvature, else "negative_curvature"
    pAp, pp = at_halt[0], at_halt[1]
    nonfinite = ~torch.isfinite(rs) | overflow | (halted & ~torch.isfinite(pAp))
    flat = halted & ~nonfinite & (res > 0.1 * thr * bnorm)
    singular = flat & ((pAp == 0) | ((pAp / pp).abs() <= thr * kappa_max))
    code = torch.where(nonfinite, 3, torch.where(singular, 2, torch.where(flat, 1, 0)))
    ok = code == 0
    converged = ok & (res <= tol * bnorm) if tol > 0 else ok
    if tracing():
        return x, _traced_info(k, res, bnorm, converged, ~ok)
    k_f, res_f, bn_f, code_f, conv_f = torch.stack(
        [t.to(torch.float64) for t in (k, res, bnorm, code, converged)]).tolist()  # one sync
    return x, _info(int(k_f), res_f, bn_f, bool(conv_f), _REASONS[int(code_f)])


def minres(
    matvec: MatVec,
    b: T.Leaves,
    x0: T.Leaves | None = None,
    *,
    iters: int = 100,
    tol: float = 1e-10,
    check_every: int | None = None,
) -> tuple[T.Leaves, dict[str, Any]]:
    """MINRES for A x = b with A symmetric, possibly indefinite (Paige & Saunders 1975, Sec. 6).

    Iteration k minimises ‖b − A x‖ over x ∈ x0 + K_k(A, r0). The Lanczos recursion
    β_{k+1} v_{k+1} = A v_k − α_k v_k − β_k v_{k−1} (v_1 = r0/β_1) builds the tridiagonal T̄_k;
    its QR factorisation is updated with one Givens reflection per step, which gives the
    residual norm |φ̄_k| = |s_k φ̄_{k−1}| (φ̄_0 = β_1) without forming it, and the iterate from
    the three-term recursion d_k = (v_k − δ_k d_{k−1} − ε_k d_{k−2}) / γ_k,
    x_k = x_{k−1} + c_k φ̄_{k−1} d_k. One product per iteration.

    β_{k+1} = 0 means the Krylov space is invariant and x_k solves the system in it: stop. If
    β_{k+1} ≈ 0 (≤ √u·‖T̄_k‖: rounding grows with k) and the pivot γ̄_k ≈ 0 as well, T_k is
    singular — b has a component outside the range of A, whose least-squares residual the iterate
    has reached: stop before the step (which would divide by ≈ 0) with ``breakdown="singular"``
    and that iterate (its residual is reported). A non-finite γ_k or column norm stops with
    ``"nonfinite"`` and the last finite iterate.

    Host synchronisation as in :func:`cg`: ``check_every=k ≥ 1`` runs blocks of k iterations
    without a read, reads their scalars (γ_k, γ̄_k, β_{k+1}, ‖column k‖) at once and replays the
    tests above on them (same stopping iteration, iterate and reason as a read per iteration;
    at most k − 1 products past the stop are discarded); default 1 on the CPU,
    :data:`CHECK_EVERY` elsewhere. ``check_every=0`` (and traced mode) runs all ``iters``
    iterations with the tests as device masks and one read at the end; the host's scalar
    recursion (the residual estimate, ‖T̄_k‖) is then kept in float64 on the device, so the
    decisions are the same.
    """
    every = check_every_for(b, check_every)
    if tracing() or every == 0:
        return _minres_masked(matvec, b, x0, iters=iters, tol=tol)
    eps = _eps(b)
    x, r = _start(matvec, b, x0)
    beta1 = T.norm(r)
    bnorm, res = _read([T.norm(b), beta1])  # one synchronisation
    sqrt_eps = math.sqrt(eps)
    stop = max(tol, eps) * bnorm  # the recursion's estimate can fall far below what is real
    k, breakdown, done = 0, None, False
    if not math.isfinite(res):
        breakdown = "nonfinite"
    elif res > stop and res > 0.0:
        it = _MinresRecursion(r, beta1)
        anorm = 0.0
        while not done and k < iters:
            x_block_start, block_x, scalars = x, [], []
            for i in range(min(every, iters - k)):  # a block: no read
                x, sc = it.step(matvec, x, first=k + i == 0)
                block_x.append(x)
                scalars.append(sc)
            kept = None  # index of the last accepted iterate of the block
            for j, (gamma_f, gbar_f, beta_next_f, col_f) in enumerate(_read(scalars)):  # one sync
                if not (math.isfinite(gamma_f) and math.isfinite(col_f)):
                    breakdown, done = "nonfinite", True
                    break
                anorm = max(anorm, col_f)
                # β_{k+1} ≈ 0: the Krylov space is invariant (to rounding, which grows with k,
                # hence √u); then a pivot γ̄_k ≈ 0 too means T_k is singular: b has a component
                # outside the range of A, the least-squares residual is reached and this step
                # divided by ~0 (its iterate is discarded)
                invariant = beta_next_f <= sqrt_eps * anorm
                if gamma_f <= eps * anorm or (invariant and abs(gbar_f) <= sqrt_eps * anorm):
                    if res > stop:
                        breakdown = "singular"
                    done = True
                    break
                res = res * beta_next_f / gamma_f
                k += 1
                kept = j
                if res <= stop or beta_next_f <= eps * anorm:  # solved, or nothing left to explore
                    done = True
                    break
            x = block_x[kept] if kept is not None else x_block_start
    converged = breakdown is None and (res <= stop if tol > 0 else True)
    return x, _info(k, res, bnorm, converged, breakdown)


class _MinresRecursion:
    """The device side of one MINRES iteration (Lanczos step, two old reflections applied to the
    new column of T̄, the new reflection, the direction and the iterate) — no host read; shared by
    the block and the masked forms so both compute the same numbers."""

    def __init__(self, r: T.Leaves, beta1: Tensor):
        self.v_prev, self.v = T.zeros_like(r), T.scale(r, 1.0 / beta1)
        self.d_prev = self.d_prev2 = T.zeros_like(r)
        zero = torch.zeros_like(beta1)
        self.beta = zero  # β_k in column k of T̄ (none in the first)
        self.c1, self.s1, self.c2, self.s2 = -1.0 - zero, zero, -1.0 - zero, zero  # reflections k−1, k−2
        self.phibar = beta1

    def step(self, matvec: MatVec, x: T.Leaves, *, first: bool) -> tuple[T.Leaves, Tensor]:
        """x_k from x_{k−1}, and the scalars the tests read: [γ_k, γ̄_k, β_{k+1}, ‖column k‖]."""
        v, beta = self.v, self.beta
        u = matvec(v)
        if not first:
            u = T.axpy(-beta, self.v_prev, u)
        alpha = T.dot(v, u)
        u = T.axpy(-alpha, v, u)
        beta_next = T.norm(u)
        # column k of T̄ = (β_k, α_k, β_{k+1}) after the two previous reflections
        eps_k = self.s2 * beta
        delta_p = -self.c2 * beta
        delta = self.c1 * delta_p + self.s1 * alpha
        gbar = self.s1 * delta_p - self.c1 * alpha
        gamma = torch.sqrt(gbar * gbar + beta_next * beta_next)
        col = torch.sqrt(alpha * alpha + beta * beta + beta_next * beta_next)
        c, s = gbar / gamma, beta_next / gamma
        d_new = T.scale(T.axpy(-eps_k, self.d_prev2, T.axpy(-delta, self.d_prev, v)), 1.0 / gamma)
        x = T.axpy(c * self.phibar, d_new, x)
        self.phibar = s * self.phibar
        self.d_prev2, self.d_prev = self.d_prev, d_new
        self.c2, self.s2, self.c1, self.s1 = self.c1, self.s1, c, s
        self.v_prev, self.v = v, T.scale(u, 1.0 / beta_next)
        self.beta = beta_next
        return x, torch.stack([gamma, gbar, beta_next, col])


def _scalar_dtype(t: Tensor) -> torch.dtype:
    """float64 for the host-side scalar recursions run on the device (masked forms), where the
    device has it (MPS has not: the working dtype there)."""
    return t.dtype if t.device.type == "mps" else torch.float64


def _minres_masked(matvec: MatVec, b: T.Leaves, x0: T.Leaves | None, *, iters: int, tol: float):
    """:func:`minres` with ``check_every=0``: all ``iters`` iterations, a stopped system frozen by
    masks (its iterate, count and reason), one read at the end (none in traced mode)."""
    eps = _eps(b)
    sqrt_eps = math.sqrt(eps)
    x, r = _start(matvec, b, x0)
    beta1 = T.norm(r)
    sd = _scalar_dtype(beta1)
    bnorm = T.norm(b).to(sd)
    res = beta1.to(sd)
    stop = max(tol, eps) * bnorm
    nonfinite = ~torch.isfinite(res)
    singular = torch.zeros_like(nonfinite)
    active = ~nonfinite & (res > stop) & (res > 0.0)
    k = torch.zeros((), dtype=torch.int64, device=res.device)
    anorm = torch.zeros_like(res)
    it = _MinresRecursion(r, beta1)
    for i in range(iters):
        x_new, sc = it.step(matvec, x, first=i == 0)
        gamma, gbar, beta_next, col = sc.to(sd).unbind()
        nf = active & ~(torch.isfinite(gamma) & torch.isfinite(col))
        ok = active & ~nf
        anorm = torch.where(ok, torch.maximum(anorm, col), anorm)
        invariant = beta_next <= sqrt_eps * anorm
        flat = ok & ((gamma <= eps * anorm) | (invariant & (gbar.abs() <= sqrt_eps * anorm)))
        singular = singular | (flat & (res > stop))
        run = ok & ~flat
        x = _where(run, x_new, x)
        res = torch.where(run, res * beta_next / gamma, res)
        k = k + run
        nonfinite = nonfinite | nf
        active = run & ~((res <= stop) | (beta_next <= eps * anorm))
    code = torch.where(nonfinite, 3, torch.where(singular, 2, 0))
    ok = code == 0
    converged = ok & (res <= stop) if tol > 0 else ok
    if tracing():
        return x, _traced_info(k, res, bnorm, converged, ~ok)
    k_f, res_f, bn_f, code_f, conv_f = torch.stack(
        [t.to(sd) for t in (k, res, bnorm, code, converged)]).tolist()  # one sync
    return x, _info(int(k_f), res_f, bn_f, bool(conv_f), _REASONS[int(code_f)])


def normal_cg(
    matvec: MatVec,
    b: T.Leaves,
    x0: T.Leaves | None = None,
    *,
    iters: int = 100,
    tol: float = 1e-10,
    rmatvec: MatVec | None = None,
    check_every: int | None = None,
) -> tuple[T.Leaves, dict[str, Any]]:
    """CG on the normal equations AᵀA x = Aᵀb, in the CGLS form (Hestenes & Stiefel 1952, Sec. 10;
    Björck 1996, Alg. 7.4.1), for any A — indefinite or singular.

    With s = Aᵀr, p_0 = s_0:  q = A p,  α = ‖s‖²/‖q‖²,  x += α p,  r −= α q,  s = Aᵀr,
    p = s + (‖s_new‖²/‖s‖²) p. The iterates stay in x0 + range(Aᵀ), so from x0 = 0 they converge to
    the minimum-norm least-squares solution A⁺b. Two products per iteration (``rmatvec`` = Aᵀ,
    default ``matvec``: A symmetric) and the condition number of AᵀA, i.e. squared. Stops when
    ‖Aᵀr‖ ≤ tol·‖Aᵀb‖ (then ``converged``; ``info["normal_residual"]`` is ‖Aᵀr‖) — for an
    inconsistent system ``residual`` stays at the least-squares residual. A non-finite ‖Aᵀr‖
    stops with ``breakdown="nonfinite"`` and the last finite iterate.

    Host synchronisation as in :func:`cg`: ``check_every=k ≥ 1`` reads the k values ‖s‖² of a
    block at once and replays the stopping test on them (the same stop, iterate and reason as a
    read per iteration); default 1 on the CPU, :data:`CHECK_EVERY` elsewhere; one read at the
    start and one for the final ‖r‖. ``check_every=0`` (and traced mode): all ``iters``
    iterations with masks, one read at the end.
    """
    every = check_every_for(b, check_every)
    at = matvec if rmatvec is None else rmatvec
    if tracing() or every == 0:
        return _normal_cg_masked(matvec, at, b, x0, iters=iters, tol=tol)
    x, r = _start(matvec, b, x0)
    s = at(r)
    p = s
    gam = T.sq_norm(s)
    start = [T.norm(b), gam] + ([T.norm(at(b))] if x0 is not None else [])
    bnorm, gam_f, *atb = _read(start)  # one synchronisation
    atb = atb[0] if x0 is not None else math.sqrt(gam_f)
    stop = (tol * atb) ** 2
    k, breakdown = 0, None
    if not math.isfinite(gam_f):
        breakdown = "nonfinite"
    while breakdown is None and k < iters and gam_f > stop and gam_f > 0.0:
        start_xr, block, scalars = (x, r), [], []
        for _ in range(min(every, iters - k)):  # a block: no read
            x, r, p, gam_new = _cgls_step(matvec, at, x, r, p, gam)
            gam = gam_new
            block.append((x, r))
            scalars.append(gam_new)
        kept = None  # index of the last accepted iterate of the block
        for j, gam_new_f in enumerate(_read(scalars)):  # one sync
            if not math.isfinite(gam_new_f):
                breakdown = "nonfinite"  # ‖A p‖ = 0 with Aᵀr ≠ 0 cannot happen in exact arithmetic
                break
            kept, gam_f = j, gam_new_f
            k += 1
            if not (gam_f > stop and gam_f > 0.0):
                break
        x, r = block[kept] if kept is not None else start_xr
    res = float(T.norm(r))
    nres = math.sqrt(gam_f) if math.isfinite(gam_f) else gam_f
    converged = breakdown is None and (nres <= tol * atb if tol > 0 else True)
    info = _info(k, res, bnorm, converged, breakdown)
    info["normal_residual"] = nres
    return x, info


def _cgls_step(matvec: MatVec, at: MatVec, x: T.Leaves, r: T.Leaves, p: T.Leaves, gam: Tensor
               ) -> tuple[T.Leaves, T.Leaves, T.Leaves, Tensor]:
    """One CGLS iteration: q = A p, α = γ/‖q‖², x += α p, r −= α q, s = Aᵀ r, γ' = ‖s‖²,
    p = s + (γ'/γ) p; returns (x, r, p, γ')."""
    q = matvec(p)
    alpha = gam / T.sq_norm(q)
    x, r = T.axpy(alpha, p, x), T.axpy(-alpha, q, r)
    s = at(r)
    gam_new = T.sq_norm(s)
    return x, r, T.axpy(gam_new / gam, p, s), gam_new


def _normal_cg_masked(matvec: MatVec, at: MatVec, b: T.Leaves, x0: T.Leaves | None, *, iters: int,
                      tol: float):
    """:func:`normal_cg` with ``check_every=0``: all ``iters`` iterations, masks, one read."""
    x, r = _start(matvec, b, x0)
    s = at(r)
    p = s
    gam = T.sq_norm(s)
    sd = _scalar_dtype(gam)
    bnorm, gam_s = T.norm(b).to(sd), gam.to(sd)
    atb = T.norm(at(b)).to(sd) if x0 is not None else gam_s.sqrt()
    stop = (tol * atb) ** 2
    nonfinite = ~torch.isfinite(gam_s)
    active = ~nonfinite & (gam_s > stop) & (gam_s > 0.0)
    k = torch.zeros((), dtype=torch.int64, device=gam.device)
    for _ in range(iters):
        x_new, r_new, p, gam_new = _cgls_step(matvec, at, x, r, p, gam)
        gam = gam_new
        g = gam_new.to(sd)
        nf = active & ~torch.isfinite(g)
        run = active & ~nf
        x, r = _where(run, x_new, x), _where(run, r_new, r)
        gam_s = torch.where(run, g, gam_s)
        k = k + run
        nonfinite = nonfinite | nf
        active = run & (gam_s > stop) & (gam_s > 0.0)
    res = T.norm(r).to(sd)
    nres = torch.where(torch.isfinite(gam_s), gam_s.sqrt(), gam_s)
    ok = ~nonfinite
    converged = ok & (nres <= tol * atb) if tol > 0 else ok
    if tracing():
        info = _traced_info(k, res, bnorm, converged, ~ok)
        info["normal_residual"] = nres
        return x, info
    k_f, res_f, bn_f, bad_f, conv_f, nres_f = torch.stack(
        [t.to(sd) for t in (k, res, bnorm, nonfinite, converged, nres)]).tolist()  # one sync
    info = _info(int(k_f), res_f, bn_f, bool(conv_f), "nonfinite" if bad_f else None)
    info["normal_residual"] = nres_f
    return x, info


def fixed_point(
    matvec: MatVec,
    b: T.Leaves,
    x0: T.Leaves | None = None,
    *,
    iters: int = 100,
    alpha: float = 1.0,
    tol: float = 0.0,
    growth: float = 1e3,
    check_every: int | None = None,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Richardson / fixed-point iteration v ← v − α (A v − b) = (I − αA) v + α b.

    This is the adjoint recursion of gradient descent on the lower level (AID-FP, Grazzi et al.
    2020); it converges for 0 < α < 2/λ_max(A) and A ≻ 0. A residual above
    ``growth``·max(best residual so far, ‖b‖) is reported as ``breakdown="diverging"`` and the
    best iterate is returned. For a fixed symmetric A with 0 ⪯ αA ⪯ 2I the residuals
    r_{k+1} = (I − αA) r_k never grow, so ``growth=2`` already proves that (I − αA) has an
    eigenvalue outside [−1, 1] (α too large, or A indefinite); the lenient default suits noisy
    (stochastic) products.

    Host reads as in :func:`cg`: one per block of ``check_every`` iterations (default 1 on the
    CPU, :data:`CHECK_EVERY` elsewhere), whose residual norms are read at once and the tests
    replayed on them; ``check_every=0`` (and traced mode) runs all ``iters`` with masks.
    """
    every = check_every_for(b, check_every)
    if tracing() or every == 0:
        return _fixed_point_masked(matvec, b, x0, iters=iters, alpha=alpha, tol=tol, growth=growth)
    x = T.zeros_like(b) if x0 is None else tuple(x0)
    x_best = x
    res, best, k, breakdown, done, bnorm = float("nan"), float("inf"), 0, None, False, None
    while not done and k < iters:
        block_x, rs = [], []
        for _ in range(min(every, iters - k)):  # a block: no read
            r = T.sub(matvec(x), b)
            block_x.append(x)
            rs.append(r)
            x = T.axpy(-alpha, r, x)
        vals = _read(_norms(rs if bnorm is not None else [b, *rs]))  # one sync
        if bnorm is None:
            bnorm = vals.pop(0)
        for j, res in enumerate(vals):
            if not math.isfinite(res):
                breakdown = "nonfinite"
            elif res > growth * max(best, bnorm) and k > 0:
                breakdown = "diverging"
            else:
                if res <= best:  # best residual so far: slow geometric growth is caught too
                    best, x_best = res, block_x[j]
                if not (tol > 0 and res <= tol * bnorm):
                    k += 1
                    continue
            x, done = block_x[j], True  # stopped at the j-th iterate of the block
            break
    if bnorm is None:
        bnorm = float(_norms([b])[0])
    if breakdown is not None and k > 0:
        x, res = x_best, best
    converged = breakdown is None and (res <= tol * bnorm if tol > 0 else True)
    return x, _info(k, res, bnorm, converged, breakdown)


def neumann(
    matvec: MatVec, b: T.Leaves, *, iters: int = 10, alpha: float = 1.0, growth: float = 1e3,
    check_every: int | None = None,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Truncated Neumann series  α Σ_{q=0}^{Q} (I − αA)^q b  with Q = ``iters`` products.

    Identical to :func:`fixed_point` started at v₁ = α b (its iterates are the partial sums), so
    it is implemented as exactly that — one mechanism, two names.
    """
    return fixed_point(matvec, b, T.scale(b, alpha), iters=iters, alpha=alpha, growth=growth,
                       check_every=check_every)


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


@dataclass
class IndexedMatVec:
    """A product that changes with the iteration: ``at(k, v)`` is A_k v (e.g. a stochastic HVP on
    the k-th of pre-drawn batches, k a 0-dim integer tensor). The masked :func:`fixed_point` runs
    it as one loop (:func:`bilevel._loops.fori_loop`) — inside a compiled step only."""

    at: Callable[[Tensor, T.Leaves], T.Leaves]


def _fixed_point_masked(matvec, b, x0, *, iters, alpha, tol, growth):
    """:func:`fixed_point` with masks (``check_every=0``, traced mode): stops (freezes) at
    ‖r‖ ≤ tol·‖b‖ when tol > 0, and on a non-finite or growing residual (then returns the best
    iterate), as the block form does. An :class:`IndexedMatVec` runs as one loop."""
    bnorm = T.norm(b)
    x = T.zeros_like(b) if x0 is None else tuple(x0)
    res = torch.full_like(bnorm, float("nan"))
    best = torch.full_like(bnorm, float("inf"))
    no = torch.zeros_like(bnorm, dtype=torch.bool)
    k = torch.zeros((), dtype=torch.int64, device=bnorm.device)

    def body(i: Any, c: tuple) -> tuple:
        x, x_best, res, best, nonfinite, diverging, active, k = c
        r = T.sub(matvec.at(i, x) if isinstance(matvec, IndexedMatVec) else matvec(x), b)
        rn = T.norm(r)
        res = torch.where(active, rn, res)
        nf = active & ~torch.isfinite(rn)
        dv = active & ~nf & (rn > growth * torch.maximum(best, bnorm)) & (i > 0)
        run = active & ~nf & ~dv
        improve = run & (rn <= best)
        best = torch.where(improve, rn, best)
        x_best = _where(improve, x, x_best)
        if tol > 0:
            run = run & ~(rn <= tol * bnorm)
        x = _where(run, T.axpy(-alpha, r, x), x)
        return x, x_best, res, best, nonfinite | nf, diverging | dv, run, k + run.to(k.dtype)

    c = (x, x, res, best, no, no, ~no, k)
    if isinstance(matvec, IndexedMatVec):
        from ._loops import fori_loop

        c = fori_loop(iters, body, c)
    else:
        for i in range(iters):
            c = body(i, c)
    x, x_best, res, best, nonfinite, diverging, _, k = c
    broke = nonfinite | diverging
    use_best = broke & (k > 0)
    x, res = _where(use_best, x_best, x), torch.where(use_best, best, res)
    converged = ~broke & ((res <= tol * bnorm) if tol > 0 else torch.ones_like(broke))
    if tracing():
        return x, _traced_info(k, res, bnorm, converged, broke)
    code = torch.where(nonfinite, 3, torch.where(diverging, 4, 0))
    k_f, res_f, bn_f, code_f, conv_f = torch.stack(
        [t.to(torch.float64) for t in (k, res, bnorm, code, converged)]).tolist()  # one sync
    return x, _info(int(k_f), res_f, bn_f, bool(conv_f), _REASONS[int(code_f)])


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


# --- the registry: every iterative solver by name, its other names listed once, here ---------------
#: name -> solver (each takes ``(matvec, b, ...)`` and returns ``(x, info)``)
SOLVERS: dict[str, Callable[..., tuple[T.Leaves, dict[str, Any]]]] = {
    "cg": cg, "minres": minres, "normal_cg": normal_cg, "fixed_point": fixed_point, "neumann": neumann,
}
#: other accepted name -> name in :data:`SOLVERS` (``ls`` / ``ns`` as in Liu et al. 2021, "LS"/"NS")
ALIASES: dict[str, str] = {
    "ls": "cg", "normalcg": "normal_cg", "cgls": "normal_cg", "fp": "fixed_point", "fixedpoint":
    "fixed_point", "ns": "neumann",
}


def solver(name: str) -> tuple[str, Callable[..., tuple[T.Leaves, dict[str, Any]]]]:
    """``(canonical name, function)`` of the solver called ``name`` (case-insensitive, an alias
    of :data:`ALIASES` allowed); an unknown name raises ``ValueError`` listing the valid ones."""
    key = str(name).lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in SOLVERS:
        valid = ", ".join(sorted(SOLVERS)) + "; aliases " + ", ".join(
            f"{a}={c}" for a, c in sorted(ALIASES.items()))
        raise ValueError(f"unknown linear solver {name!r}; valid: {valid}")
    return key, SOLVERS[key]

