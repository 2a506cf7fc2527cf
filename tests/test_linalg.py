"""bilevel.linalg: CG, fixed point, Neumann and dense solves against dense float64 linear algebra."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel import _tree as T
from bilevel import linalg

F64 = torch.float64


def _spd(gen, n=12, lo=0.5, hi=20.0):
    """A random SPD matrix with eigenvalues spread over [lo, hi]."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    ev = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=F64)
    return Q @ torch.diag(ev) @ Q.T, ev


def _op(A, like):
    """A as a matvec on flat leaves shaped like ``like`` (two blocks, to exercise pytrees)."""
    return lambda v: T.from_vector(A @ T.to_vector(v), like)


def _leaves(vec):
    return (vec[:5].reshape(5), vec[5:].reshape(-1, 1))


def test_cg_solves_spd_system(gen):
    A, _ = _spd(gen)
    b_vec = torch.randn(12, generator=gen, dtype=F64)
    b = _leaves(b_vec)
    x, info = linalg.cg(_op(A, b), b, iters=100, tol=1e-12)
    exact = torch.linalg.solve(A, b_vec)
    assert info["converged"] and info["breakdown"] is None
    assert info["iterations"] <= 12 + 5  # n steps in exact arithmetic, a few more in floating point
    assert info["relative_residual"] <= 1e-12
    torch.testing.assert_close(T.to_vector(x), exact, rtol=1e-10, atol=0)
    # the reported residual is the true one
    true_res = float((A @ T.to_vector(x) - b_vec).norm())
    assert true_res == pytest.approx(info["residual"], rel=1e-3, abs=1e-13)


def test_cg_error_decreases_with_iterations(gen):
    A, _ = _spd(gen)
    b_vec = torch.randn(12, generator=gen, dtype=F64)
    exact = torch.linalg.solve(A, b_vec)
    errs = []
    for k in range(1, 16):
        x, info = linalg.cg(lambda v: (A @ v[0],), (b_vec,), iters=k, tol=0.0)
        assert info["iterations"] == k
        errs.append(float((x[0] - exact).norm()))
    # CG's Euclidean error decreases monotonically (Hestenes & Stiefel 1952, Thm 6:3)
    assert all(e2 <= e1 * (1 + 1e-10) for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[0] > 1e-2 and errs[-1] < 1e-12 * float(exact.norm())


def test_cg_warm_start_at_solution_needs_no_iteration(gen):
    A, _ = _spd(gen)
    b = (torch.randn(12, generator=gen, dtype=F64),)
    x0 = (torch.linalg.solve(A, b[0]),)
    x, info = linalg.cg(lambda v: (A @ v[0],), b, x0, iters=50, tol=1e-10)
    assert info["iterations"] == 0 and info["converged"]
    torch.testing.assert_close(x[0], x0[0])


@pytest.mark.parametrize("b_vec", [[0.0, 1.0, 0.0], [1.0, 3.0, 1.0]])
def test_cg_reports_negative_curvature(b_vec):
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=F64))
    b = (torch.tensor(b_vec, dtype=F64),)
    x, info = linalg.cg(lambda v: (A @ v[0],), b, iters=10, tol=1e-12)
    assert info["breakdown"] == "negative_curvature"
    assert not info["converged"]
    assert torch.isfinite(x[0]).all()


def test_cg_reports_nonfinite_operator():
    b = (torch.ones(3, dtype=F64),)
    _, info = linalg.cg(lambda v: (v[0] * float("nan"),), b, iters=10)
    assert info["breakdown"] == "nonfinite" and not info["converged"]


def test_neumann_equals_explicit_partial_sum(gen):
    A, ev = _spd(gen, n=8, lo=0.5, hi=4.0)
    b_vec = torch.randn(8, generator=gen, dtype=F64)
    alpha = 0.2
    M = torch.eye(8, dtype=F64) - alpha * A
    for Q in (0, 1, 2, 7):
        ref = alpha * sum(torch.linalg.matrix_power(M, q) @ b_vec for q in range(Q + 1))
        x, info = linalg.neumann(lambda v: (A @ v[0],), (b_vec,), iters=Q, alpha=alpha)
        torch.testing.assert_close(x[0], ref, rtol=1e-13, atol=1e-15)
        assert info["iterations"] == Q


def test_fixed_point_converges_and_matches_neumann(gen):
    A, ev = _spd(gen, n=8, lo=0.5, hi=4.0)
    b = (torch.randn(8, generator=gen, dtype=F64),)
    alpha = 1.0 / float(ev[-1])
    exact = torch.linalg.solve(A, b[0])
    op = lambda v: (A @ v[0],)  # noqa: E731
    errs = [float((linalg.fixed_point(op, b, iters=q, alpha=alpha)[0][0] - exact).norm())
            for q in (10, 20, 40, 80, 160)]
    # error contracts like (1 − α λ_min)^q = 0.875^q
    assert all(e2 < 0.5 * e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-8
    # fixed point from 0 after Q+1 steps is the Neumann partial sum with Q terms beyond the first
    xf, _ = linalg.fixed_point(op, b, iters=6, alpha=alpha)
    xn, _ = linalg.neumann(op, b, iters=5, alpha=alpha)
    torch.testing.assert_close(xf[0], xn[0], rtol=1e-14, atol=1e-15)


def test_fixed_point_tolerance_stops_early(gen):
    A, ev = _spd(gen, n=8, lo=0.5, hi=4.0)
    b = (torch.randn(8, generator=gen, dtype=F64),)
    x, info = linalg.fixed_point(lambda v: (A @ v[0],), b, iters=10_000, alpha=0.25, tol=1e-8)
    assert info["converged"] and info["iterations"] < 10_000
    assert info["relative_residual"] <= 1e-8
    assert float((A @ x[0] - b[0]).norm()) <= 1e-8 * float(b[0].norm()) * 1.0001


@pytest.mark.parametrize("factor", [2.5, 4.0, 50.0, 1e5])
def test_fixed_point_reports_divergence(gen, factor):
    """α > 2/λ_max: the iteration (I − αA)^q grows; the solver must say so, not return garbage."""
    A, ev = _spd(gen, n=8, lo=0.5, hi=4.0)
    b = (torch.randn(8, generator=gen, dtype=F64),)
    alpha = factor / float(ev[-1])
    x, info = linalg.fixed_point(lambda v: (A @ v[0],), b, iters=200, alpha=alpha)
    assert info["breakdown"] in ("diverging", "nonfinite"), info
    assert not info["converged"]
    _, info_n = linalg.neumann(lambda v: (A @ v[0],), b, iters=200, alpha=alpha)
    assert info_n["breakdown"] in ("diverging", "nonfinite") and not info_n["converged"]


def test_dense_solve_cholesky_path(gen):
    A, _ = _spd(gen)
    b = torch.randn(12, generator=gen, dtype=F64)
    x, info = linalg.dense_solve(A, b)
    assert info["breakdown"] is None and info["converged"]
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-12, atol=0)


def test_dense_solve_indefinite_falls_back_to_lu(gen):
    A = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=F64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    x, info = linalg.dense_solve(A, b)
    assert info["breakdown"] == "not_positive_definite" and not info["converged"]
    torch.testing.assert_close(x, torch.tensor([0.5, -1.0, 1 / 3], dtype=F64))
    assert info["residual"] < 1e-14


def test_dense_solve_singular_falls_back_to_least_squares():
    A = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    b = torch.tensor([2.0, 1.0], dtype=F64)
    x, info = linalg.dense_solve(A, b)
    assert info["breakdown"] == "singular" and not info["converged"]
    torch.testing.assert_close(x, torch.tensor([2.0, 0.0], dtype=F64))
    assert info["residual"] == pytest.approx(1.0)  # the inconsistent part is reported, not hidden


# ------------------------------------------------------------------------------------------------
# exact convergence, singular operators, MINRES, CG on the normal equations, damping
# ------------------------------------------------------------------------------------------------
def _sym(gen, ev):
    """Q diag(ev) Qᵀ with a random orthogonal Q (float64)."""
    n = len(ev)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return Q @ torch.diag(torch.tensor(ev, dtype=F64)) @ Q.T


INDEFINITE = [-8.0, -3.0, -1.0, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0]
SINGULAR = [0.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0]


def test_cg_that_converged_exactly_is_not_a_breakdown():
    """float32, tol=0: the residual underflows to 0 after a few steps (then pᵀAp = 0) — that is
    convergence, not negative curvature (issue 8.3)."""
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5, 1.2]))
    b = (torch.ones(6),)
    x, info = linalg.cg(lambda v: (A @ v[0],), b, iters=50, tol=0.0)
    assert info["breakdown"] is None and info["converged"]
    assert info["iterations"] < 50
    torch.testing.assert_close(x[0], 1.0 / torch.diagonal(A), rtol=1e-6, atol=0)
    # also when the rounding-level residual meets a zero curvature before reaching exactly 0
    x, info = linalg.cg(lambda v: (A @ v[0] * (v[0].abs().max() > 1e-30),), b, iters=50, tol=0.0)
    assert info["breakdown"] is None and info["converged"]


def test_cg_on_a_singular_operator_stops_instead_of_overflowing(gen):
    """PSD, b outside the range: the curvature along p drops to rounding level. CG must say
    "singular" and return a finite iterate, not step by 1/0 (the 1e23 hypergradient of 8.2)."""
    A = _sym(gen, SINGULAR)
    b = (torch.randn(8, generator=gen, dtype=F64),)
    x, info = linalg.cg(lambda v: (A @ v[0],), b, iters=100, tol=1e-12)
    assert info["breakdown"] == "singular" and not info["converged"]
    assert float(x[0].norm()) < 1e6 * float(b[0].norm())
    assert info["iterations"] <= 8


@pytest.mark.parametrize("ev", [[0.5, 1, 2, 5, 10, 20], INDEFINITE], ids=["spd", "indefinite"])
def test_minres_solves_symmetric_systems(gen, ev):
    A = _sym(gen, ev)
    n = len(ev)
    b_vec = torch.randn(n, generator=gen, dtype=F64)
    exact = torch.linalg.solve(A, b_vec)
    x, info = linalg.minres(_op(A, _leaves(b_vec)), _leaves(b_vec), iters=100, tol=1e-12)
    assert info["converged"] and info["breakdown"] is None
    assert info["iterations"] <= n + 3
    torch.testing.assert_close(T.to_vector(x), exact, rtol=1e-10, atol=0)
    true_res = float((A @ T.to_vector(x) - b_vec).norm())
    assert true_res == pytest.approx(info["residual"], rel=1e-2, abs=1e-13)


def test_minres_residual_decreases_and_equals_the_krylov_minimum(gen):
    """Iteration k minimises ‖b − A x‖ over K_k(A, b) (Paige & Saunders 1975): compare with the
    dense least-squares problem on the Krylov basis, and the residual is non-increasing."""
    A = _sym(gen, INDEFINITE)
    b = torch.randn(10, generator=gen, dtype=F64)
    res = []
    for k in range(1, 10):
        x, info = linalg.minres(lambda v: (A @ v[0],), (b,), iters=k, tol=0.0)
        assert info["iterations"] == k
        K = torch.stack([torch.linalg.matrix_power(A, j) @ b for j in range(k)], 1)
        Qk, _ = torch.linalg.qr(K)
        c = torch.linalg.lstsq(A @ Qk, b.unsqueeze(1)).solution
        best = float((A @ Qk @ c).squeeze(1).sub(b).norm())
        true = float((A @ x[0] - b).norm())
        assert true == pytest.approx(best, rel=1e-8, abs=1e-12)
        assert info["residual"] == pytest.approx(true, rel=1e-8, abs=1e-12)
        res.append(true)
    assert all(r2 <= r1 * (1 + 1e-12) for r1, r2 in zip(res, res[1:])), res


def test_minres_on_singular_systems(gen):
    A = _sym(gen, SINGULAR)
    pinv = torch.linalg.pinv(A)
    # consistent: b in the range of A -> a solution (from 0: the minimum-norm one)
    b = A @ torch.randn(8, generator=gen, dtype=F64)
    x, info = linalg.minres(lambda v: (A @ v[0],), (b,), iters=50, tol=1e-12)
    assert info["converged"] and info["breakdown"] is None
    torch.testing.assert_close(x[0], pinv @ b, rtol=1e-9, atol=1e-12)
    # inconsistent: stops at a least-squares solution (A x = A A⁺ b) and says "singular"
    b = torch.randn(8, generator=gen, dtype=F64)
    x, info = linalg.minres(lambda v: (A @ v[0],), (b,), iters=50, tol=1e-12)
    assert info["breakdown"] == "singular" and not info["converged"]
    torch.testing.assert_close(A @ x[0], A @ pinv @ b, rtol=0, atol=1e-9)
    assert info["residual"] == pytest.approx(float((A @ pinv @ b - b).norm()), rel=1e-8)


@pytest.mark.parametrize("ev", [INDEFINITE, SINGULAR], ids=["indefinite", "singular"])
def test_normal_cg_converges_to_the_minimum_norm_least_squares_solution(gen, ev):
    A = _sym(gen, ev)
    n = len(ev)
    b_vec = torch.randn(n, generator=gen, dtype=F64)
    ref = torch.linalg.pinv(A) @ b_vec
    x, info = linalg.normal_cg(_op(A, _leaves(b_vec)), _leaves(b_vec), iters=200, tol=1e-13)
    assert info["converged"] and info["breakdown"] is None
    torch.testing.assert_close(T.to_vector(x), ref, rtol=1e-9, atol=1e-12)
    assert info["residual"] == pytest.approx(float((A @ ref - b_vec).norm()), rel=1e-6, abs=1e-12)
    assert info["normal_residual"] <= 1e-13 * float((A @ b_vec).norm())
    # CG on AᵀA: the Euclidean error to A⁺b decreases monotonically (Hestenes & Stiefel, Thm 6:3)
    errs = [float((linalg.normal_cg(lambda v: (A @ v[0],), (b_vec,), iters=k, tol=0.0)[0][0]
                   - ref).norm()) for k in range(1, n + 1)]
    assert all(e2 <= e1 * (1 + 1e-9) for e1, e2 in zip(errs, errs[1:])), errs


def test_normal_cg_with_an_explicit_transpose(gen):
    M = torch.randn(6, 6, generator=gen, dtype=F64)  # not symmetric
    b = torch.randn(6, generator=gen, dtype=F64)
    x, info = linalg.normal_cg(lambda v: (M @ v[0],), (b,), iters=100, tol=1e-13,
                               rmatvec=lambda v: (M.T @ v[0],))
    assert info["converged"]
    torch.testing.assert_close(x[0], torch.linalg.solve(M, b), rtol=1e-8, atol=1e-10)


def test_damped_operator_makes_an_indefinite_system_solvable_by_cg(gen):
    A = _sym(gen, INDEFINITE)
    lam = 10.0  # > −λ_min = 8
    b = torch.randn(10, generator=gen, dtype=F64)
    op = linalg.damped(lambda v: (A @ v[0],), lam)
    x, info = linalg.cg(op, (b,), iters=100, tol=1e-12)
    assert info["converged"] and info["breakdown"] is None
    torch.testing.assert_close(x[0], torch.linalg.solve(A + lam * torch.eye(10, dtype=F64), b),
                               rtol=1e-10, atol=0)
    plain = lambda v: (A @ v[0],)  # noqa: E731
    assert linalg.damped(plain, 0.0) is plain


# ------------------------------------------------------------------------------------------------
# CG without per-iteration host reads (issue 12): block-replayed and mask-frozen forms agree
# ------------------------------------------------------------------------------------------------
def _cg_cases(gen):
    spd, indef, sing = _spd(gen)[0], _sym(gen, INDEFINITE), _sym(gen, SINGULAR)
    f32 = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5, 1.2]))

    def op(A):
        return lambda v: (A @ v[0],)

    def rnd(n):
        return (torch.randn(n, generator=gen, dtype=F64),)

    ones = (torch.ones(12, dtype=F64),)
    return {  # name: (matvec, b, x0, iters, tol, expected breakdown)
        "spd, early stop": (op(spd), rnd(12), None, 100, 1e-9, None),
        "spd, budget": (op(spd), rnd(12), None, 7, 0.0, None),
        "spd, warm start": (op(spd), ones, rnd(12), 40, 1e-12, None),
        "float32, r underflows": (op(f32), (torch.ones(6),), None, 50, 0.0, None),
        "indefinite": (op(indef), rnd(10), None, 50, 1e-12, "negative_curvature"),
        "singular": (op(sing), rnd(8), None, 100, 1e-12, "singular"),
        "nan operator": (lambda v: (v[0] * float("nan"),), (torch.ones(3, dtype=F64),), None, 10,
                         1e-10, "nonfinite"),
    }


@pytest.mark.parametrize("case", ["spd, early stop", "spd, budget", "spd, warm start",
                                  "float32, r underflows", "indefinite", "singular", "nan operator"])
def test_cg_check_every_forms_agree(gen, case):
    """check_every = 1 (a read per iteration: the old behaviour), 3, 10 (blocks replayed on the
    host) and 0 (fixed iterations, masks: the traced / vmap loop) stop at the same iteration with
    the same iterate and the same reason."""
    mv, b, x0, iters, tol, why = _cg_cases(gen)[case]
    ref_x, ref = linalg.cg(mv, b, x0, iters=iters, tol=tol, check_every=1)
    assert ref["breakdown"] == why
    for every in (3, 10, 0):
        x, info = linalg.cg(mv, b, x0, iters=iters, tol=tol, check_every=every)
        for key in ("iterations", "breakdown", "converged"):
            assert info[key] == ref[key], (every, key)
        torch.testing.assert_close(x[0], ref_x[0], rtol=1e-12, atol=0, equal_nan=True)
        assert info["residual"] == pytest.approx(ref["residual"], rel=1e-9, abs=1e-300, nan_ok=True)


@pytest.mark.parametrize("case", ["converges (tol)", "budget", "warm start", "diverging", "nan operator"])
def test_fixed_point_check_every_forms_agree(gen, case):
    """fixed_point (and so neumann) in blocks of 1 / 3 / 10 and in the masked form: same stop
    iteration, iterate and reason (diverging returns the best iterate in every form)."""
    A, _ = _spd(gen, n=8, lo=0.5, hi=4.0)
    b = (torch.randn(8, generator=gen, dtype=F64),)
    mv = (lambda v: (v[0] * float("nan"),)) if case == "nan operator" else (lambda v: (A @ v[0],))
    kw = {"converges (tol)": dict(iters=200, alpha=0.4, tol=1e-6),
          "budget": dict(iters=7, alpha=0.4), "warm start": dict(iters=30, alpha=0.4, tol=1e-8),
          "diverging": dict(iters=40, alpha=0.7, growth=2.0), "nan operator": dict(iters=5)}[case]
    x0 = (torch.ones(8, dtype=F64),) if case == "warm start" else None
    ref_x, ref = linalg.fixed_point(mv, b, x0, check_every=1, **kw)
    assert ref["breakdown"] == {"diverging": "diverging", "nan operator": "nonfinite"}.get(case)
    for every in (3, 10, 0):
        x, info = linalg.fixed_point(mv, b, x0, check_every=every, **kw)
        for key in ("iterations", "breakdown", "converged"):
            assert info[key] == ref[key], (every, key)
        torch.testing.assert_close(x[0], ref_x[0], rtol=1e-12, atol=0, equal_nan=True)
        assert info["residual"] == pytest.approx(ref["residual"], rel=1e-9, nan_ok=True)


# ------------------------------------------------------------------------------------------------
# MINRES and CGLS without per-iteration host reads (issue 12): the same forms as CG's
# ------------------------------------------------------------------------------------------------
def _krylov_cases(gen):
    spd, indef, sing = _spd(gen)[0], _sym(gen, INDEFINITE), _sym(gen, SINGULAR)
    twice = torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype=F64))  # 2 distinct eigenvalues
    f32 = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5, 1.2]))
    M = torch.randn(6, 6, generator=gen, dtype=F64)  # not symmetric (CGLS with rmatvec)

    def op(A):
        return lambda v: (A @ v[0],)

    def rnd(n):
        return (torch.randn(n, generator=gen, dtype=F64),)

    nan = lambda v: (v[0] * float("nan"),)  # noqa: E731
    return {  # name: (matvec, b, x0, iters, tol, kw, expected MINRES breakdown)
        "spd, early stop": (op(spd), rnd(12), None, 100, 1e-9, {}, None),
        "spd, budget": (op(spd), rnd(12), None, 7, 0.0, {}, None),
        "spd, warm start": (op(spd), (torch.ones(12, dtype=F64),), rnd(12), 40, 1e-12, {}, None),
        "indefinite": (op(indef), rnd(10), None, 50, 1e-12, {}, None),
        "singular, consistent": (op(sing), (sing @ rnd(8)[0],), None, 50, 1e-12, {}, None),
        "singular, inconsistent": (op(sing), rnd(8), None, 50, 1e-12, {}, "singular"),
        "invariant subspace": (op(twice), (torch.ones(6, dtype=F64),), None, 20, 0.0, {}, None),
        "float32, tol=0": (op(f32), (torch.ones(6),), None, 30, 0.0, {}, None),
        "nan operator": (nan, (torch.ones(3, dtype=F64),), None, 10, 1e-10, {}, "nonfinite"),
        "transpose (CGLS)": (op(M), rnd(6), None, 60, 1e-13, {"rmatvec": op(M.T)}, None),
    }


_KRYLOV_CASES = ["spd, early stop", "spd, budget", "spd, warm start", "indefinite",
                 "singular, consistent", "singular, inconsistent", "invariant subspace",
                 "float32, tol=0", "nan operator", "transpose (CGLS)"]


def _agree(fn, case_args, every, ref_x, ref, keys=("iterations", "breakdown", "converged")):
    mv, b, x0, iters, tol, kw, _ = case_args
    x, info = fn(mv, b, x0, iters=iters, tol=tol, check_every=every, **kw)
    for key in keys:
        assert info[key] == ref[key], (every, key, info[key], ref[key])
    # bitwise: the blocks and the masks run the very same arithmetic, only the reads move
    assert torch.equal(x[0], ref_x[0]) or (x[0].isnan().all() and ref_x[0].isnan().all()), every
    for key in ("residual", "relative_residual", "normal_residual"):
        if key in ref:
            assert info[key] == pytest.approx(ref[key], rel=1e-12, abs=0, nan_ok=True), (every, key)


@pytest.mark.parametrize("case", [c for c in _KRYLOV_CASES if c != "transpose (CGLS)"])
def test_minres_check_every_forms_agree(gen, case):
    """MINRES in blocks of 1 (a read per iteration, the old loop), 2, 3, 10 and in the masked
    form (0: fixed iterations, one read): the same stopping iteration, iterate (bitwise) and
    reason — also where the iterations after the stop divide by β_{k+1} = 0 or γ_k ≈ 0 (the
    invariant-subspace and singular cases: that work is discarded)."""
    args = _krylov_cases(gen)[case]
    mv, b, x0, iters, tol, kw, why = args
    ref_x, ref = linalg.minres(mv, b, x0, iters=iters, tol=tol, check_every=1)
    assert ref["breakdown"] == why
    if why is None and tol > 0:
        assert ref["converged"]
    for every in (2, 3, 10, 0):
        _agree(linalg.minres, args, every, ref_x, ref)


@pytest.mark.parametrize("case", _KRYLOV_CASES)
def test_normal_cg_check_every_forms_agree(gen, case):
    """CGLS likewise: blocks of 1 / 2 / 3 / 10 and the masked form stop at the same iteration with
    the same iterate, reason, residual and normal residual."""
    args = _krylov_cases(gen)[case]
    mv, b, x0, iters, tol, kw, _ = args
    ref_x, ref = linalg.normal_cg(mv, b, x0, iters=iters, tol=tol, check_every=1, **kw)
    assert ref["breakdown"] == ("nonfinite" if case == "nan operator" else None)
    for every in (2, 3, 10, 0):
        _agree(linalg.normal_cg, args, every, ref_x, ref)


def test_minres_and_normal_cg_masked_forms_run_under_vmap(gen):
    """check_every=0 is the traced form: under bilevel's traced mode and torch.func.vmap over
    systems, each system gets the iterate of its own eager solve (one stops early, one runs the
    budget)."""
    from bilevel._trace import traced

    A = _sym(gen, INDEFINITE)
    B = torch.stack([torch.randn(10, generator=gen, dtype=F64), A @ A @ torch.ones(10, dtype=F64)])
    # tolerances reached well before the Krylov space is exhausted (where the residual estimate
    # is rounding noise and vmap's other summation order could move the stop by one iteration)
    for fn, tol in ((linalg.minres, 1e-2), (linalg.normal_cg, 1e-4)):
        def one(b, fn=fn, tol=tol):
            x, info = fn(lambda v: (A @ v[0],), (b,), iters=30, tol=tol)
            return x[0], info["iterations"], info["converged"]

        with traced():
            X, K, C = torch.func.vmap(one)(B)
        assert int(K[0]) != int(K[1])  # the two systems stop at different iterations
        for i in range(2):
            x_ref, info = fn(lambda v: (A @ v[0],), (B[i],), iters=30, tol=tol)
            # vmap batches the products (another summation order): rounding differences, which
            # these recursions amplify on an indefinite A (measured ≤ 7e-8 relative for CGLS,
            # whose condition number is squared; the unbatched forms agree bitwise, above)
            torch.testing.assert_close(X[i], x_ref[0], rtol=1e-6, atol=1e-9)
            assert int(K[i]) == info["iterations"] and bool(C[i]) == info["converged"]


@pytest.mark.parametrize("alpha", [0.05, 0.9])  # converging; diverging (best iterate, masks)
def test_indexed_matvec_as_one_loop_equals_the_python_loop(alpha):
    """``IndexedMatVec`` (A_k v on the k-th of stacked matrices) runs the masked fixed point as one
    ``while_loop`` (eagerly here, in traced mode): the same iterate and info as the Python loop
    over the same products."""
    from bilevel import _trace
    from bilevel._loops import row
    from bilevel.linalg import IndexedMatVec, fixed_point

    gen = torch.Generator().manual_seed(4)
    M = torch.randn(6, 5, 5, generator=gen, dtype=torch.float64)
    A = M @ M.transpose(1, 2) / 5 + torch.eye(5, dtype=torch.float64)
    b = (torch.randn(5, generator=gen, dtype=torch.float64),)
    queue = list(A)
    with _trace.traced():
        want, wi = fixed_point(lambda v: (queue.pop(0) @ v[0],), b, iters=6, alpha=alpha, growth=2.0)
        got, gi = fixed_point(IndexedMatVec(lambda k, v: (row(A, k) @ v[0],)), b, iters=6, alpha=alpha,
                              growth=2.0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for key in ("iterations", "residual", "converged"):
        assert torch.equal(torch.as_tensor(gi[key]), torch.as_tensor(wi[key])), key
    assert bool(wi["converged"]) is (alpha < 0.5)


@pytest.mark.parametrize("solve", [linalg.cg, linalg.minres])
def test_a_transposed_right_hand_side_gives_row_major_iterates(gen, solve):
    """b held as a transpose (what autograd returns for a matrix used transposed): the solver
    copies it once, so its vectors, and the operator's arguments, are row-major; same solution as
    with a row-major b."""
    A, _ = _spd(gen, n=12)
    bt = torch.randn(3, 4, generator=gen, dtype=F64).t()     # [4, 3], column-major
    seen = []

    def op(v):
        seen.append(all(t.is_contiguous() for t in v))
        return (torch.reshape(A @ v[0].reshape(-1), (4, 3)),)

    x, info = solve(op, (bt,), iters=50, tol=1e-12)
    x2, _ = solve(op, (bt.contiguous(),), iters=50, tol=1e-12)
    assert info["converged"] and all(seen) and x[0].is_contiguous()
    torch.testing.assert_close(x[0], x2[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(x[0].reshape(-1), torch.linalg.solve(A, bt.reshape(-1)), rtol=1e-9, atol=0)
