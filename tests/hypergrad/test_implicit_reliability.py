"""Implicit estimators on the hard cases (issue 8.1-8.5): NaN data, indefinite / singular lower
Hessians (MINRES, NormalCG, damping against dense float64 formulas), the breakdown policy (warning
once per run, flag in info and in every history record, strict raises, safeguard), exact
convergence, and a start y0(x) that the implicit hypergradient cannot see."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
from bilevel.hypergrad import CG, MINRES, Exact, FixedPoint, Neumann, NormalCG, Reverse
from tests.reference_problems import RefProblem, converged_gd, rel_err

F64 = torch.float64


def _sym(seed: int, ev: list[float]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = len(ev)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return Q @ torch.diag(torch.tensor(ev, dtype=F64)) @ Q.T


def _quadratic(A: torch.Tensor, seed: int = 0):
    """g = ½ yᵀAy − yᵀ(Bx + c) (stationary at A y = Bx + c, a saddle when A is indefinite),
    f = ½‖y − t‖² + ½‖x‖². Dense references: ∇_y f = y − t, ∇²_xy g v = −Bᵀv, hence
    hypergradient(M) = x + Bᵀ M⁻¹ (y − t) for the system matrix M (A, A + λI or A⁺)."""
    gen = torch.Generator().manual_seed(seed)
    n, m = A.shape[0], 3
    B = torch.randn(n, m, generator=gen, dtype=F64)
    c = torch.randn(n, generator=gen, dtype=F64)
    t = torch.randn(n, generator=gen, dtype=F64)
    x = torch.randn(m, generator=gen, dtype=F64)

    def f(x, y):
        return 0.5 * ((y - t) ** 2).sum() + 0.5 * (x**2).sum()

    def g(x, y):
        return 0.5 * y @ A @ y - y @ (B @ x + c)

    def reference(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return x + B.T @ (inverse @ (y - t))

    return bl.Problem(f, g), x, B, c, reference


INDEFINITE = [-4.0, -1.0, -0.3, 0.5, 1.0, 2.0, 3.0, 6.0]
SINGULAR = [0.0, 0.0, 0.4, 1.0, 2.0, 3.0, 5.0, 8.0]


# ------------------------------------------------------------------------------------------------
# new solvers against dense float64 formulas
# ------------------------------------------------------------------------------------------------
def test_minres_and_normal_cg_reach_the_exact_hypergradient(ref: RefProblem):
    inner = converged_gd(ref)
    for est in (MINRES(inner, iters=200, tol=1e-14), NormalCG(inner, iters=400, tol=1e-14)):
        res = est(ref.problem, ref.x, ref.y0)
        assert res.info["linear_solve"]["breakdown"] is None, res.info["linear_solve"]
        assert rel_err(res.grad, ref.hypergrad) < 1e-7, type(est).__name__


def test_minres_and_normal_cg_solve_an_indefinite_lower_level_exactly():
    A = _sym(0, INDEFINITE)
    problem, x, B, c, reference = _quadratic(A)
    y_star = torch.linalg.solve(A, B @ x + c)  # a saddle point of g: ∇_y g = 0
    exact = reference(y_star, torch.linalg.inv(A))
    for est in (MINRES(None, iters=50, tol=1e-13), NormalCG(None, iters=200, tol=1e-14),
                CG(None, iters=50, damping=5.0)):
        res = est(problem, x, y_star)
        sinfo = res.info["linear_solve"]
        assert sinfo["breakdown"] is None and sinfo["converged"], (type(est).__name__, sinfo)
        if est.damping:  # (A + λI) with λ = 5 > −λ_min = 4 is positive definite: CG applies
            torch.testing.assert_close(
                res.grad, reference(y_star, torch.linalg.inv(A + 5.0 * torch.eye(8, dtype=F64))),
                rtol=1e-9, atol=1e-12)
        else:
            torch.testing.assert_close(res.grad, exact, rtol=1e-8, atol=1e-10)
    # plain CG meets the negative curvature and says so
    with pytest.warns(bl.LinearSolveWarning, match="negative_curvature"):
        res = CG(None, iters=50)(problem, x, y_star)
    assert res.info["linear_solve"]["breakdown"] == "negative_curvature"


def test_normal_cg_gives_the_minimum_norm_hypergradient_of_a_singular_lower_level():
    A = _sym(1, SINGULAR)
    problem, x, B, c, reference = _quadratic(A)
    pinv = torch.linalg.pinv(A)
    y = pinv @ (B @ x + c)  # any point; the estimators take it as y*
    res = NormalCG(None, iters=200, tol=1e-14)(problem, x, y)
    assert res.info["linear_solve"]["breakdown"] is None
    torch.testing.assert_close(res.grad, reference(y, pinv), rtol=1e-8, atol=1e-10)
    # CG and MINRES stop at the singular direction instead of overflowing (finite, flagged)
    for est in (CG(None, iters=50), MINRES(None, iters=50)):
        with pytest.warns(bl.LinearSolveWarning, match="singular"):
            res = est(problem, x, y)
        assert res.info["linear_solve"]["breakdown"] == "singular"
        assert float(res.grad.norm()) < 1e4 * float(reference(y, pinv).norm())


def test_damping_bias_is_first_order_in_lambda(ref: RefProblem):
    """(H + λI)⁻¹ = H⁻¹ − λH⁻² + O(λ²): the error of damped CG is linear in λ for small λ."""
    y = ref.y_star.reshape(ref.y0.shape)
    errs = [rel_err(CG(None, iters=300, tol=1e-15, damping=lam)(ref.problem, ref.x, y).grad,
                    ref.hypergrad) for lam in (1e-2, 1e-3, 1e-4)]
    assert errs[0] / errs[1] == pytest.approx(10.0, rel=0.1), errs
    assert errs[1] / errs[2] == pytest.approx(10.0, rel=0.1), errs
    with pytest.raises(ValueError, match="damping"):
        CG(None, damping=-1.0)


def test_exact_with_damping_matches_the_dense_formula():
    A = _sym(2, INDEFINITE)
    problem, x, B, c, reference = _quadratic(A)
    y = torch.linalg.solve(A, B @ x + c)
    res = Exact(None, damping=5.0)(problem, x, y)
    assert res.info["linear_solve"]["breakdown"] is None
    torch.testing.assert_close(
        res.grad, reference(y, torch.linalg.inv(A + 5.0 * torch.eye(8, dtype=F64))), rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------------
# breakdown policy
# ------------------------------------------------------------------------------------------------
def _saddle():
    """H = diag(1, 2, −1); ∇_y f = (1, 1, 0) has no component along the negative direction, so CG
    from v = 0 never sees it and solves exactly: v = (1, 1/2, 0), hypergradient = v."""
    H = torch.diag(torch.tensor([1.0, 2.0, -1.0], dtype=F64))

    def f(x, y):
        return y[0] + y[1] + 0 * x.sum()

    def g(x, y):
        return 0.5 * y @ H @ y - x @ y

    return bl.Problem(f, g), torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)


def test_a_warm_start_that_breaks_down_is_retried_cold_and_never_carried_on():
    problem, x, y = _saddle()
    est = CG(None, iters=10, warm_start=True)
    state = est.init(problem, x, y)
    state["v"] = (torch.tensor([0.0, 0.0, 5.0], dtype=F64),)  # r0 = (1, 1, 5): pᵀHp = 1 + 2 − 25 < 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cold retry succeeds: no breakdown, no warning
        res = est(problem, x, y, state=state)
    sinfo = res.info["linear_solve"]
    assert sinfo["warm_start_breakdown"] == "negative_curvature" and sinfo["breakdown"] is None
    torch.testing.assert_close(res.grad, torch.tensor([1.0, 0.5, 0.0], dtype=F64))
    torch.testing.assert_close(res.state["v"][0], torch.tensor([1.0, 0.5, 0.0], dtype=F64))
    assert state["v"][0][2] == 5.0  # the passed state is not mutated
    # strict mode raises only if the system itself cannot be solved: the cold retry succeeds here
    strict = CG(None, iters=10, warm_start=True, strict=True)
    res = strict(problem, x, y, state={**strict.init(problem, x, y), "v": state["v"]})
    torch.testing.assert_close(res.grad, torch.tensor([1.0, 0.5, 0.0], dtype=F64))


def test_breakdown_warns_once_per_run_counts_every_one_and_drops_the_warm_start():
    """∇_y f = (0, 0, 1) lies along the negative direction: CG breaks down at its first step, the
    safeguarded v is the last good iterate v = 0, so the hypergradient is ∇_x f = 0 exactly."""
    H = torch.diag(torch.tensor([1.0, 2.0, -1.0], dtype=F64))
    problem = bl.Problem(lambda x, y: y[2] + 0 * x.sum(), lambda x, y: 0.5 * y @ H @ y - x @ y)
    x, y = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    est = CG(None, iters=10, warm_start=True)
    state = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(1, 4):
            res = est(problem, x, y, state=state)
            state = res.state
            assert res.info["linear_solve"]["breakdowns"] == k
            assert state["v"] is None  # nothing broken is carried to the next call
            assert torch.equal(res.grad, torch.zeros(3, dtype=F64))
    assert sum(issubclass(w.category, bl.LinearSolveWarning) for w in caught) == 1
    with pytest.raises(bl.LinearSolveError, match="negative_curvature"):
        CG(None, iters=10, strict=True)(problem, x, y)


def test_breakdown_is_in_every_history_record_and_the_run_warns_once():
    H = torch.diag(torch.tensor([1.0, 2.0, -1.0], dtype=F64))
    problem = bl.Problem(lambda x, y: y[2] + ((x - 1) ** 2).sum(),
                         lambda x, y: 0.5 * y @ H @ y - x @ y)
    solver = bl.solvers.HypergradientDescent(CG(None, iters=10), upper=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = bl.solve(problem, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64),
                       solver=solver, steps=4)
    assert [r["breakdown"] for r in res.history] == ["negative_curvature"] * 4
    assert [r["breakdowns"] for r in res.history] == [1, 2, 3, 4]
    assert sum(issubclass(w.category, bl.LinearSolveWarning) for w in caught) == 1
    # a healthy run records breakdown None in every step
    ok = bl.solve(problem, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64),
                  solver=bl.solvers.HypergradientDescent(MINRES(None, iters=10), upper=0.1), steps=2)
    assert [r["breakdown"] for r in ok.history] == [None, None]


def test_exact_convergence_in_float32_is_not_a_breakdown():
    """Issue 8.3: the residual underflows to 0 and pᵀAp = 0 — strict mode must not raise."""
    H = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5, 1.2]))
    problem = bl.Problem(lambda x, y: ((y - 1) ** 2).sum() + 0 * x.sum(),
                         lambda x, y: 0.5 * y @ H @ y - x @ y)
    res = CG(None, iters=50, tol=0.0, strict=True)(problem, torch.ones(6), torch.zeros(6))
    assert res.info["linear_solve"]["converged"] and res.info["linear_solve"]["breakdown"] is None


# ------------------------------------------------------------------------------------------------
# NaN data and values (8.1, 8.5), a start that depends on x (8.4)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CG, MINRES, NormalCG, FixedPoint, Neumann, Exact])
def test_nan_in_the_validation_data_raises_instead_of_a_zero_hypergradient(cls):
    """f depends on x only through y, so a NaN ∇_y f used to give v = 0 and a zero hypergradient."""
    def f(x, y, batch):
        return ((batch[0] @ y - batch[1]) ** 2).mean()

    problem = bl.Problem(f, lambda x, y: 0.5 * (y**2).sum() - x @ y)
    X, t = torch.randn(5, 3, dtype=F64), torch.randn(5, dtype=F64)
    t[2] = float("nan")
    est = cls(bl.inner.GD(lr=0.5, steps=5))
    with pytest.raises(bl.NonFiniteError, match="upper") as e:
        est(problem, torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64), upper_batch=(X, t))
    assert e.value.level == "upper"
    # and inside bl.solve (AID) the run stops instead of recording upper_loss nan, norm 0.0
    with pytest.raises(bl.NonFiniteError, match="upper"):
        bl.solve(problem, torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64),
                 solver=bl.solvers.AID(bl.inner.GD(lr=0.5, steps=5)), steps=3,
                 upper_data=bl.sampling.FullBatch(X, t))


def test_nan_lower_value_is_checked():
    """g's value is NaN while its gradient is finite (a NaN constant): implicit estimators,
    which evaluate g at the lower point, say so (level lower)."""
    problem = bl.Problem(lambda x, y: ((y - 1) ** 2).sum() + 0 * x.sum(),
                         lambda x, y: 0.5 * ((y - x) ** 2).sum() + torch.tensor(float("nan"), dtype=F64))
    with pytest.raises(bl.NonFiniteError, match="lower") as e:
        CG(bl.inner.GD(lr=0.5, steps=3))(problem, torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64))
    assert e.value.level == "lower"


@pytest.mark.parametrize("cls", [CG, MINRES, Neumann, FixedPoint, Exact])
def test_a_start_that_depends_on_x_is_said_once_per_run(cls):
    """y0(x) = x (MAML-style): the implicit hypergradient does not depend on the start; the
    warning names Reverse and iMAML. Reverse, which does differentiate through y0, does not warn."""
    def g(x, y):
        return 0.5 * ((y - 2.0) ** 2).sum()  # y* = 2 whatever the start

    problem = bl.Problem(lambda x, y: ((y - 1) ** 2).sum(), g)
    inner = bl.inner.GD(lr=0.5, steps=3)
    est = cls(inner)
    x = torch.zeros(2, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = est(problem, x, lambda x: x)
        res = est(problem, x, lambda x: x, state=res.state)
    start = [w for w in caught if issubclass(w.category, bl.StartIndependenceWarning)]
    assert len(start) == 1
    assert "Reverse" in str(start[0].message) and "iMAML" in str(start[0].message)
    assert torch.equal(res.grad, torch.zeros(2, dtype=F64))  # the answer to the question asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rev = Reverse(inner)(problem, x, lambda x: x)
    # through 3 GD steps of rate ½ the start survives as (½)³: d f/dx = 2 (y₃ − 1) / 8
    y3 = 2.0 + (0.0 - 2.0) * 0.5**3
    torch.testing.assert_close(rev.grad, torch.full((2,), 2 * (y3 - 1) / 8, dtype=F64))


def test_an_empty_lower_batch_is_an_error():
    problem = bl.Problem(lambda x, y: ((y - 1) ** 2).sum() + 0 * x.sum(),
                         lambda x, y, batch: ((batch @ y) ** 2).mean() + 0 * x.sum())
    with pytest.raises(bl.EmptyDataError, match="lower-level batch has no samples"):
        CG(bl.inner.GD(lr=0.5, steps=3))(problem, torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64),
                                         lower_batch=torch.zeros(0, 2, dtype=F64))
