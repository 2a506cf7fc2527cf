"""Implicit estimators (CG, Neumann, FixedPoint, Exact) against the exact float64 hypergradients of the
three reference problems: they reach them (CG/Exact ~1e-8) and their error decreases as iterations grow."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.hypergrad import CG, Exact, FixedPoint, Neumann
from tests.reference_problems import RefProblem, converged_gd, rel_err

F64 = torch.float64


def test_cg_and_exact_reach_the_exact_hypergradient(ref: RefProblem):
    inner = converged_gd(ref)
    for est in (CG(inner=inner, iters=200, tol=1e-14), Exact(inner=inner)):
        res = est(ref.problem, ref.x, ref.y0)
        assert res.grad.shape == ref.x.shape and res.grad.dtype == F64
        assert rel_err(res.y, ref.y_star) < 1e-10
        assert rel_err(res.grad, ref.hypergrad) < 1e-8, type(est).__name__
        info = res.info
        assert info["linear_solve"]["breakdown"] is None and info["linear_solve"]["converged"]
        assert info["inner_grad_norm"] < 1e-10 and info["steps"] == inner.steps


def test_inner_none_uses_the_given_point(ref: RefProblem):
    """With inner=None the given y is y* (no inner solve): Exact is then exact to round-off."""
    y = ref.y_star.reshape(ref.y0.shape)
    res = Exact(inner=None)(ref.problem, ref.x, y)
    assert torch.equal(res.y, y)
    assert rel_err(res.grad, ref.hypergrad) < 1e-11
    assert res.info["linear_solve"]["hessian_dim"] == y.numel()
    # ... and at a point that is not y*, the estimate is different (the input is really used)
    res_off = Exact(inner=None)(ref.problem, ref.x, y + 0.1)
    assert rel_err(res_off.grad, ref.hypergrad) > 1e-3


def _errors(ref: RefProblem, make, iters):
    y = ref.y_star.reshape(ref.y0.shape)
    return [rel_err(make(q)(ref.problem, ref.x, y).grad, ref.hypergrad) for q in iters]


def test_cg_error_decreases_with_iterations(ref: RefProblem):
    n = ref.y0.numel()
    iters = [1, 2, 4, 8, n]
    errs = _errors(ref, lambda q: CG(inner=None, iters=q, tol=0.0), iters)
    assert all(b < a for a, b in zip(errs, errs[1:]) if a > 1e-12), errs
    assert errs[0] > 1e-3  # one iteration is not enough: the test can see a difference
    assert errs[-1] < 1e-8


@pytest.mark.parametrize("cls", [Neumann, FixedPoint])
def test_neumann_and_fixed_point_converge_geometrically(ref: RefProblem, cls):
    """Error of the truncated series ~ (1 − α μ)^Q with α = 1/L: strictly decreasing, and small."""
    iters = [4, 8, 16, 32, 64, 128]
    errs = _errors(ref, lambda q: cls(inner=None, iters=q, alpha=ref.lr), iters)
    assert all(b < a or b < 1e-14 for a, b in zip(errs, errs[1:])), errs  # until round-off
    rate = 1.0 - ref.mu / ref.L
    assert errs[-1] < 10 * rate**128 + 1e-10, (errs, rate)
    assert errs[0] > 1e-3


def test_fixed_point_from_zero_is_the_neumann_series(ref: RefProblem):
    y = ref.y_star.reshape(ref.y0.shape)
    fp = FixedPoint(inner=None, iters=6, alpha=ref.lr)(ref.problem, ref.x, y)
    nm = Neumann(inner=None, iters=5, alpha=ref.lr)(ref.problem, ref.x, y)
    torch.testing.assert_close(fp.grad, nm.grad, rtol=1e-13, atol=1e-15)


def test_implicit_defaults_take_alpha_from_inner_lr():
    inner = bl.inner.GD(lr=0.25, steps=3)
    assert Neumann(inner=inner).alpha == 0.25 and FixedPoint(inner=inner).alpha == 0.25
    with pytest.raises(ValueError, match="alpha"):
        Neumann(inner=None)
    with pytest.raises(ValueError, match="alpha"):
        FixedPoint(inner=None)


def test_fixed_point_lr_is_a_deprecated_name_of_alpha():
    """Issue 8.12: one name (alpha) for the step of Neumann / FixedPoint / AID / linalg."""
    with pytest.warns(DeprecationWarning, match="alpha"):
        est = FixedPoint(inner=None, lr=0.3)
    assert est.alpha == 0.3
    with pytest.warns(DeprecationWarning, match="alpha"):
        assert est.lr == 0.3
    with pytest.raises(TypeError, match="alpha= only"):
        FixedPoint(inner=None, alpha=0.3, lr=0.3)
    with pytest.raises(TypeError):
        Neumann(inner=None, lr=0.3)  # never had it: rejected, not silently taken


def test_aid_uses_the_linalg_registry():
    from bilevel import linalg
    from bilevel.hypergrad.implicit import MINRES, NormalCG, estimator_for

    gd = bl.inner.GD(lr=0.25, steps=3)
    for name, cls in (("ls", CG), ("cg", CG), ("minres", MINRES), ("cgls", NormalCG),
                      ("normal_cg", NormalCG), ("ns", Neumann), ("fp", FixedPoint),
                      ("fixed_point", FixedPoint)):
        aid = bl.solvers.AID(gd, linear_solver=name)
        assert type(aid.estimator) is cls and aid.linear_solver == linalg.solver(name)[0]
        assert estimator_for(linalg.solver(name)[1]) is cls
    assert bl.solvers.AID(gd, linear_solver="fp", alpha=0.1).estimator.alpha == 0.1
    with pytest.raises(bl.ConfigError, match="alpha"):
        bl.solvers.AID(gd, linear_solver="cg", alpha=0.1)  # CG has no step: used or rejected


def test_warm_start_reuses_the_previous_solution():
    from tests.reference_problems import logreg

    ref = logreg()
    y = ref.y_star.reshape(ref.y0.shape)
    est = CG(inner=None, iters=100, tol=1e-12, warm_start=True)
    first = est(ref.problem, ref.x, y)
    second = est(ref.problem, ref.x, y, state=first.state)
    assert first.info["linear_solve"]["iterations"] >= 5
    assert second.info["linear_solve"]["iterations"] <= 1
    torch.testing.assert_close(second.grad, first.grad, rtol=1e-10, atol=0)
    # the state is data: no hidden warm start on the object, the passed state is not mutated
    assert est(ref.problem, ref.x, y).info["linear_solve"]["iterations"] >= 5
    assert first.state["v"] is not None and est.init(ref.problem, ref.x, y)["v"] is None
    assert est(ref.problem, ref.x, y, state=est.init(ref.problem, ref.x, y)).info[
        "linear_solve"]["iterations"] >= 5


def _indefinite_problem():
    """g has a saddle in y: H = diag(1, −1), so the linear system is not positive definite."""
    def f(x, y):
        return (y * torch.tensor([0.0, 1.0], dtype=F64)).sum() + 0.0 * x.sum()

    def g(x, y):
        return 0.5 * (y[0] ** 2 - y[1] ** 2) - (x * y).sum()

    return bl.Problem(f, g), torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)


def test_breakdown_is_reported_and_strict_mode_raises():
    problem, x, y = _indefinite_problem()
    res = CG(inner=None, iters=10)(problem, x, y)
    assert res.info["linear_solve"]["breakdown"] == "negative_curvature"
    with pytest.raises(bl.LinearSolveError, match="negative_curvature"):
        CG(inner=None, iters=10, strict=True)(problem, x, y)
    res = Exact(inner=None)(problem, x, y)
    assert res.info["linear_solve"]["breakdown"] == "not_positive_definite"
    # the dense LU fallback still solves the (nonsingular) system: v = H⁻¹(0, 1) = (0, −1)
    torch.testing.assert_close(res.grad, torch.tensor([0.0, -1.0], dtype=F64))
