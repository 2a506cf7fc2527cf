"""Property-based tests (hypothesis) over random strongly convex quadratic bilevel problems
(issue 8, item 10): random dimensions, conditioning and dtype.

    g(x, y) = ½ yᵀA y − yᵀ(Bx + c),   A = Q diag(λ) Qᵀ,  λ ∈ [1, κ]      (so y*(x) = A⁻¹(Bx + c))
    f(x, y) = ½‖y − d‖² + ½ ρ‖x‖² + eᵀx
    ∇h(x) = ρx + e + Bᵀ A⁻¹ (y*(x) − d)                                  (the exact reference)

Properties: CG (converged) == Exact == ClosedForm == the formula; Reverse == Forward; checkpointed
== plain reverse; truncate=T == full; hypergrad.vmap == the loop over tasks. Tolerances follow the
dtype's unit roundoff times the condition number (float32: the reference is float64).
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.hypergrad import CG, ClosedForm, Exact, Forward, Reverse, vmap

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F64 = torch.float64
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)


def _quadratic(seed: int, nx: int, ny: int, kappa: float, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    Q, _ = torch.linalg.qr(r(ny, ny))
    lam = torch.logspace(0, float(torch.log10(torch.tensor(kappa))), ny, dtype=F64)
    A = Q @ torch.diag(lam) @ Q.T
    A = 0.5 * (A + A.T)
    B, c, d, e, x = r(ny, nx), r(ny), r(ny), r(nx), r(nx)
    rho = 0.5
    ystar = torch.linalg.solve(A, B @ x + c)
    exact = rho * x + e + B.T @ torch.linalg.solve(A, ystar - d)
    Ad, Bd, cd, dd, ed = (u.to(dtype) for u in (A, B, c, d, e))

    def g(x, y):
        return 0.5 * y @ (Ad @ y) - y @ (Bd @ x + cd)

    def f(x, y):
        return 0.5 * ((y - dd) ** 2).sum() + 0.5 * rho * (x**2).sum() + ed @ x

    def solve(x):
        return torch.linalg.solve(Ad, Bd @ x + cd)

    return bl.Problem(f, g), x.to(dtype), ystar.to(dtype), exact, solve, float(lam.max())


problems = st.tuples(
    st.integers(0, 10_000),            # seed
    st.integers(1, 4),                 # dim x
    st.integers(1, 6),                 # dim y
    st.sampled_from([1.0, 10.0, 100.0]),  # condition number of A
    st.sampled_from([torch.float64, torch.float32]),
)


def _tol(dtype: torch.dtype, kappa: float) -> float:
    return (1e-9 if dtype == torch.float64 else 2e-4) * kappa


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(F64), b.to(F64)
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


@SETTINGS
@given(problems)
def test_cg_exact_closed_form_and_the_formula_agree(p):
    seed, nx, ny, kappa, dtype = p
    problem, x, ystar, exact, solve, _ = _quadratic(seed, nx, ny, kappa, dtype)
    tol = _tol(dtype, kappa)
    cg = CG(None, iters=4 * ny, tol=1e-12 if dtype == F64 else 1e-6)(problem, x, ystar)
    ex = Exact(None)(problem, x, ystar)
    cf = ClosedForm(solve)(problem, x, ystar)
    for res in (cg, ex, cf):
        assert res.grad.dtype == dtype
        assert _rel(res.grad, exact) <= tol, (_rel(cg.grad, exact), _rel(ex.grad, exact),
                                             _rel(cf.grad, exact))


@SETTINGS
@given(problems, st.integers(1, 12), st.integers(1, 5))
def test_unrolled_modes_agree(p, steps, seg):
    """Reverse == Forward == checkpointed (any segment length) == truncate=steps, exactly the
    same unrolled derivative (only the summation order differs)."""
    seed, nx, ny, kappa, dtype = p
    problem, x, _, _, _, L = _quadratic(seed, nx, ny, kappa, dtype)
    dyn = bl.inner.GD(lr=1.0 / L, steps=steps)
    y0 = torch.zeros(ny, dtype=dtype)
    rev = Reverse(dyn)(problem, x, y0).grad
    tol = 1e-11 if dtype == F64 else 1e-4
    for other in (Forward(dyn), Reverse(dyn, checkpoint=seg), Reverse(dyn, checkpoint=True),
                  Reverse(dyn, truncate=steps)):
        assert _rel(other(problem, x, y0).grad, rev) <= tol, type(other).__name__


@SETTINGS
@given(problems, st.integers(1, 3))
def test_vmap_equals_the_loop(p, tasks):
    """Tasks differ by their lower starting point and (through y) by the linearization point."""
    seed, nx, ny, kappa, dtype = p
    problem, x, ystar, _, _, L = _quadratic(seed, nx, ny, kappa, dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    ys = ystar + 0.1 * torch.randn(tasks, ny, generator=gen, dtype=F64).to(dtype)
    tol = 1e-10 if dtype == F64 else 1e-4
    for est in (CG(bl.inner.GD(lr=1.0 / L, steps=3), iters=ny, tol=0.0),
                Reverse(bl.inner.GD(lr=1.0 / L, steps=4))):
        res = vmap(est, problem, x, ys)
        loop = torch.stack([est(problem, x, ys[i]).grad for i in range(tasks)])
        assert _rel(res.grad, loop) <= tol, type(est).__name__
