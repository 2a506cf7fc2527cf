"""Bad-input matrix (issue 8.10): every estimator x every kind of bad input -> the documented error,
or the documented warning + flag; never a silent number.

Documented outcomes (docs/guide.md, "When things go wrong"):

* NaN/inf in data, variables or objective values of a level -> NonFiniteError naming that level
  (and the inner step where there is one);
* a non-scalar objective -> NonScalarObjectiveError; a wrong dtype / device / shape ->
  StructureMismatchError; a wrong type -> TypeError; an empty batch -> EmptyDataError;
* a divergent inner step -> NonFiniteError("lower", step);
* a singular or indefinite lower Hessian: the unrolled estimators differentiate their K steps
  and are unaffected; an implicit estimator whose linear solve breaks down flags it
  (``info["linear_solve"]["breakdown"]``) with a LinearSolveWarning, and raises LinearSolveError
  with ``strict=True``; MINRES (indefinite) and NormalCG (singular or indefinite) solve them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
from bilevel.hypergrad import (
    CG,
    MINRES,
    Exact,
    FiniteDifference,
    FirstOrder,
    FixedPoint,
    Forward,
    Neumann,
    NormalCG,
    Reverse,
    ZerothOrder,
)

F64 = torch.float64
D = 3

ESTIMATORS = {
    "Reverse": lambda inner: Reverse(inner),
    "Forward": lambda inner: Forward(inner),
    "FirstOrder": lambda inner: FirstOrder(inner),
    "FiniteDifference": lambda inner: FiniteDifference(inner),
    "ZerothOrder": lambda inner: ZerothOrder(inner, samples=2),
    "CG": lambda inner: CG(inner, iters=20),
    "MINRES": lambda inner: MINRES(inner, iters=20),
    "NormalCG": lambda inner: NormalCG(inner, iters=20),
    "Neumann": lambda inner: Neumann(inner, iters=20),
    "FixedPoint": lambda inner: FixedPoint(inner, iters=20),
    "Exact": lambda inner: Exact(inner),
}
IMPLICIT = {"CG", "MINRES", "NormalCG", "Neumann", "FixedPoint", "Exact"}
GD = bl.inner.GD(lr=0.3, steps=5)


def _data(n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)


def _problem():
    """Ridge regression with one log-regularization per weight; f and g take a (X, t) batch."""
    def f(x, y, batch):
        X, t = batch
        return 0.5 * ((X @ y - t) ** 2).mean() + 1e-2 * (x**2).sum()

    def g(x, y, batch):
        X, t = batch
        return 0.5 * ((X @ y - t) ** 2).mean() + 0.5 * (torch.exp(x) * y**2).sum()

    return bl.Problem(f, g)


def _call(name, inner=GD, problem=None, x=None, y=None, upper=None, lower=None, **kw):
    est = ESTIMATORS[name](inner)
    problem = _problem() if problem is None else problem
    x = torch.zeros(D, dtype=F64) if x is None else x
    y = torch.zeros(D, dtype=F64) if y is None else y
    upper = _data(seed=1) if upper is None else upper
    lower = _data(seed=2) if lower is None else lower
    return est(problem, x, y, upper_batch=upper, lower_batch=lower, **kw)


def _poison(batch, value, which=1):
    X, t = (u.clone() for u in batch)
    (X if which == 0 else t)[0] = value
    return X, t


def _nonscalar(level):
    p = _problem()
    fn = {"upper": p.upper, "lower": p.lower}

    def bad(x, y, batch):
        return fn[level](x, y, batch) * torch.ones(2, dtype=F64)

    return bl.Problem(bad if level == "upper" else p.upper, bad if level == "lower" else p.lower)


def _changing_start():
    calls = []

    def y0(x):
        calls.append(1)
        return torch.zeros(D, dtype=F64) + 0 * x.sum() if len(calls) == 1 else torch.zeros(1, dtype=F64)

    return y0


#: case -> (call kwargs builder, expected exception, expected level or None)
NFE, SME = bl.NonFiniteError, bl.StructureMismatchError
CASES = {
    "nan-upper-data": (lambda: {"upper": _poison(_data(seed=1), float("nan"))}, NFE, "upper"),
    "inf-upper-data": (lambda: {"upper": _poison(_data(seed=1), float("inf"), 0)}, NFE, "upper"),
    "nan-lower-data": (lambda: {"lower": _poison(_data(seed=2), float("nan"))}, NFE, "lower"),
    "inf-lower-data": (lambda: {"lower": _poison(_data(seed=2), float("inf"), 0)}, NFE, "lower"),
    "nan-x": (lambda: {"x": torch.tensor([0.0, float("nan"), 0.0], dtype=F64)}, NFE, "upper"),
    "inf-y0": (lambda: {"y": torch.tensor([0.0, float("inf"), 0.0], dtype=F64)}, NFE, "lower"),
    "nonscalar-upper": (lambda: {"problem": _nonscalar("upper")}, bl.NonScalarObjectiveError, None),
    "nonscalar-lower": (lambda: {"problem": _nonscalar("lower")}, bl.NonScalarObjectiveError, None),
    "dtype-mismatch": (lambda: {"x": torch.zeros(D)}, SME, None),
    "device-mismatch": (lambda: {"y": torch.zeros(D, dtype=F64, device="meta")}, SME, None),
    "start-changes-shape": (lambda: {"y": _changing_start()}, SME, None),
    "divergent-inner-step": (lambda: {"inner": bl.inner.GD(lr=1e8, steps=60)}, NFE, "lower"),
    "empty-lower-data": (lambda: {"lower": (torch.zeros(0, D, dtype=F64), torch.zeros(0, dtype=F64))},
                         bl.EmptyDataError, None),
    "empty-upper-data": (lambda: {"upper": (torch.zeros(0, D, dtype=F64), torch.zeros(0, dtype=F64))},
                         bl.EmptyDataError, None),
    "not-a-problem": (lambda: {"problem": _problem().upper}, TypeError, None),
    "non-tensor-variable": (lambda: {"x": [torch.zeros(D, dtype=F64), 0.5]}, TypeError, None),
}


@pytest.mark.filterwarnings("ignore::bilevel.errors.StartIndependenceWarning")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_bad_input_raises_the_documented_error(name, case):
    build, exc, level = CASES[case]
    with pytest.raises(exc) as err:
        _call(name, **build())
    if level is not None:
        assert err.value.level == level, str(err.value)
        assert level in str(err.value)
    if case == "divergent-inner-step":
        assert err.value.step is not None and 1 <= err.value.step <= 60


# ------------------------------------------------------------------------------------------------
# singular and indefinite lower Hessians
# ------------------------------------------------------------------------------------------------
def _singular():
    """g = ½(y₀ + y₁ − x₀)² + ½(y₂ − x₁)²: H has the null vector (1, −1, 0); f = ½‖y − e₀‖², whose
    gradient has a component along it (an inconsistent system H v = ∇_y f)."""
    def f(x, y):
        return 0.5 * ((y - torch.tensor([1.0, 0.0, 0.0], dtype=F64)) ** 2).sum() + 0 * x.sum()

    def g(x, y):
        return 0.5 * (y[0] + y[1] - x[0]) ** 2 + 0.5 * (y[2] - x[1]) ** 2

    return bl.Problem(f, g), torch.tensor([1.0, 2.0], dtype=F64)


def _indefinite():
    """g = ½(y₀² − y₁² + y₂²) − xᵀy: H = diag(1, −1, 1), nonsingular; f = y₁ + ½ y₀²."""
    def f(x, y):
        return y[1] + 0.5 * y[0] ** 2 + 0 * x.sum()

    def g(x, y):
        return 0.5 * (y[0] ** 2 - y[1] ** 2 + y[2] ** 2) - (x * y).sum()

    return bl.Problem(f, g), torch.tensor([1.0, 2.0, 3.0], dtype=F64)


#: estimator -> breakdown it must flag on (singular, indefinite); None: solves it / not affected
HESSIAN_CASES = {
    "CG": ("singular", "negative_curvature"),
    "MINRES": ("singular", None),
    "NormalCG": (None, None),
    "Neumann": (None, "diverging"),
    "FixedPoint": (None, "diverging"),
    "Exact": ("singular", "not_positive_definite"),
}


@pytest.mark.parametrize("kind", ["singular", "indefinite"])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_singular_and_indefinite_hessians_are_solved_or_flagged(name, kind):
    problem, x = _singular() if kind == "singular" else _indefinite()
    y = torch.zeros(3, dtype=F64)
    inner = bl.inner.GD(lr=0.3, steps=3)
    expected = HESSIAN_CASES.get(name, (None, None))[kind == "indefinite"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ESTIMATORS[name](inner)(problem, x, y)
    assert torch.isfinite(res.grad).all()
    flagged = [w for w in caught if issubclass(w.category, bl.errors.LinearSolveWarning)]
    if name not in IMPLICIT:
        assert not flagged and "linear_solve" not in res.info
        return
    assert res.info["linear_solve"]["breakdown"] == expected
    assert len(flagged) == (expected is not None)
    if expected is not None:
        assert expected in str(flagged[0].message)
        strict = type(ESTIMATORS[name](inner))  # same settings, strict
        est = ESTIMATORS[name](inner)
        kw = {k: v for k, v in vars(est).items() if k in ("iters", "alpha", "lr", "tol")}
        with pytest.raises(bl.LinearSolveError, match=expected):
            strict(inner, strict=True, **kw)(problem, x, y)
