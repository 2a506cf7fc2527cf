"""bilevel.formulation / bilevel.validation: bad inputs raise the documented errors with clear messages, and
the pytree / nn.Module / batch plumbing works."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bilevel as bl
from bilevel.formulation import Bound
from bilevel.hypergrad import CG, FirstOrder, Forward, Neumann, Reverse
from tests.reference_problems import dense_ift, newton, rel_err

F64 = torch.float64


def _quad():
    def f(x, y):
        return ((y - 1.0) ** 2).sum() + (x**2).sum()

    def g(x, y):
        return 0.5 * ((y - x) ** 2).sum()

    return f, g


GD = bl.inner.GD(lr=0.5, steps=3)


# ------------------------------------------------------------------------------------------------
# objectives must return real scalars
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["upper", "lower"])
@pytest.mark.parametrize("bad", ["vector", "float", "int"])
def test_non_scalar_objective_names_the_level(level, bad):
    f, g = _quad()
    wrap = {
        "vector": lambda fn: (lambda x, y: fn(x, y) * torch.ones(3, dtype=F64)),
        "float": lambda fn: (lambda x, y: float(fn(x, y))),
        "int": lambda fn: (lambda x, y: torch.tensor(1)),
    }[bad]
    problem = bl.Problem(wrap(f), g) if level == "upper" else bl.Problem(f, wrap(g))
    name = "upper-level objective f" if level == "upper" else "lower-level objective g"
    x, y = torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64)
    for est in (CG(inner=GD), Reverse(inner=GD), FirstOrder(inner=GD)):
        with pytest.raises(bl.NonScalarObjectiveError, match=name):
            est(problem, x, y)
    assert issubclass(bl.NonScalarObjectiveError, ValueError)


def test_one_element_objective_is_accepted():
    f, g = _quad()
    problem = bl.Problem(lambda x, y: f(x, y).reshape(1, 1), g)
    res = Reverse(inner=GD)(problem, torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64))
    assert res.grad.shape == (2,)


# ------------------------------------------------------------------------------------------------
# variables: dtype, structure, device
# ------------------------------------------------------------------------------------------------
def test_integer_variables_are_rejected():
    problem = bl.Problem(*_quad())
    with pytest.raises(bl.StructureMismatchError, match="x leaf 0 has dtype torch.int64"):
        CG(inner=GD)(problem, torch.tensor([1, 2]), torch.zeros(2, dtype=F64))
    with pytest.raises(bl.StructureMismatchError, match="y leaf 1 has dtype torch.int32"):
        CG(inner=GD)(problem, torch.zeros(2, dtype=F64), (torch.zeros(2, dtype=F64), torch.ones(2).int()))


def test_dtype_mismatch_between_levels_is_rejected():
    problem = bl.Problem(*_quad())
    with pytest.raises(bl.StructureMismatchError, match="x is torch.float32 .* y is torch.float64"):
        Reverse(inner=GD)(problem, torch.zeros(2), torch.zeros(2, dtype=F64))
    with pytest.raises(bl.StructureMismatchError, match="mixes dtype"):
        Reverse(inner=GD)(problem, (torch.zeros(2), torch.zeros(2, dtype=F64)), torch.zeros(2))
    with pytest.raises(bl.StructureMismatchError, match="x is torch.float32"):
        bl.solve(problem, torch.zeros(2), torch.zeros(2, dtype=F64),
                 solver=bl.solvers.HypergradientDescent(CG(inner=GD)), steps=1)


def test_bad_pytrees_are_rejected():
    problem = bl.Problem(*_quad())
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        CG(inner=GD)(problem, [torch.zeros(2, dtype=F64), 0.5], torch.zeros(2, dtype=F64))
    with pytest.raises(bl.StructureMismatchError, match="empty pytree"):
        CG(inner=GD)(problem, {}, torch.zeros(2, dtype=F64))
    with pytest.raises(TypeError, match="bilevel.Problem"):
        CG(inner=GD)(_quad()[0], torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64))
    with pytest.raises(TypeError, match="two callables"):
        bl.Problem(upper=_quad()[0], lower=3.0)


def _changing_init():
    """An initialization y0(x) whose output structure is not the same from one call to the next."""
    calls = []

    def y0(x):
        calls.append(1)
        return x if len(calls) == 1 else x[:1]

    return y0


@pytest.mark.parametrize("est", [Reverse(inner=GD), Reverse(inner=GD, checkpoint=True), Forward(inner=GD),
                                 FirstOrder(inner=GD), CG(inner=GD)], ids=lambda e: type(e).__name__)
def test_callable_init_with_wrong_shape_is_rejected(est):
    problem = bl.Problem(*_quad())
    with pytest.raises(bl.StructureMismatchError, match=r"y0\(x\): leaf 0 has shape \(1,\), expected \(2,\)"):
        est(problem, torch.zeros(2, dtype=F64), _changing_init())


def test_callable_init_with_wrong_structure_is_rejected():
    problem = bl.Problem(*_quad())
    calls = []

    def y0(x):
        calls.append(1)
        return x if len(calls) == 1 else (x,)

    with pytest.raises(bl.StructureMismatchError, match="pytree structure"):
        Reverse(inner=GD)(problem, torch.zeros(2, dtype=F64), y0)


# ------------------------------------------------------------------------------------------------
# non-finite values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("est", [
    CG(inner=GD), Neumann(inner=GD), Reverse(inner=GD), Forward(inner=GD), FirstOrder(inner=GD),
    bl.hypergrad.Exact(inner=GD), bl.hypergrad.FiniteDifference(inner=GD),
    bl.hypergrad.ZerothOrder(inner=GD, samples=2),
], ids=lambda e: type(e).__name__)
def test_nan_in_upper_gradient_is_reported_as_upper(est):
    """f is finite but its gradient is NaN (d/dx √(x²) at x = 0): the hypergradient check catches it."""
    def f(x, y):
        return torch.sqrt(x**2).sum() + (y**2).sum()

    problem = bl.Problem(f, _quad()[1])
    x = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(bl.NonFiniteError, match="upper") as e:
        est(problem, x, torch.zeros(2, dtype=F64))
    assert e.value.level == "upper"


def test_nan_in_lower_objective_is_reported_as_lower_with_step():
    def g(x, y):  # finite at y0 = 0, NaN as soon as an iterate goes above 0.5
        return 0.5 * ((y - x) ** 2).sum() + torch.sqrt(0.5 - y).sum()

    problem = bl.Problem(_quad()[0], g)
    x = torch.ones(2, dtype=F64)
    with pytest.raises(bl.NonFiniteError) as e:
        CG(inner=bl.inner.GD(lr=0.3, steps=20))(problem, x, torch.zeros(2, dtype=F64))
    # y₁ = 0.3·(1 − 0) − 0.3·0.5/√0.5 ≈ 0.088, y₂ ≈ 0.16, ... first NaN iterate computed by hand:
    y, k = 0.0, 0
    while y <= 0.5 and k < 20:
        y = y - 0.3 * ((y - 1.0) - 0.5 / (0.5 - y) ** 0.5)
        k += 1
    assert e.value.level == "lower" and e.value.step == k + 1


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
def test_batch_for_a_two_argument_objective_is_a_clear_type_error():
    problem = bl.Problem(*_quad())
    batch = (torch.ones(4, 2, dtype=F64),)
    with pytest.raises(TypeError, match=r"data was given for the (upper|lower) level .* takes only \(x, y\)"):
        CG(inner=GD)(problem, torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64), batch=batch)


def test_missing_batch_for_a_three_argument_objective_is_a_clear_type_error():
    def g(x, y, batch):
        return 0.5 * ((y - batch[0].mean(0) * x) ** 2).sum()

    problem = bl.Problem(_quad()[0], g)
    with pytest.raises(TypeError, match="lower-level objective needs a batch"):
        CG(inner=GD)(problem, torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64))


def test_batches_reach_the_right_level():
    """upper_batch / lower_batch go to f / g; an optional batch parameter works with and without data."""
    seen = {}

    def f(x, y, batch=None):
        seen["f"] = None if batch is None else batch[0].shape[0]
        return ((y - 1.0) ** 2).sum() + (x**2).sum()

    def g(x, y, batch):
        seen["g"] = batch[0].shape[0]
        return 0.5 * ((y - batch[0].mean() * x) ** 2).sum()

    problem = bl.Problem(f, g)
    x, y = torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)
    CG(inner=GD)(problem, x, y, upper_batch=(torch.ones(3, 1, dtype=F64),), lower_batch=(torch.ones(5, 1),))
    assert seen == {"f": 3, "g": 5}
    CG(inner=GD)(problem, x, y, batch=(torch.ones(7, 1, dtype=F64),))
    assert seen == {"f": 7, "g": 7}
    b = Bound(problem, x, y, lower_batch=(torch.ones(5, 1),))
    assert b.F.n == 1 and b.G.n == 5


# ------------------------------------------------------------------------------------------------
# nn.Module lower level through bl.params + functional_call
# ------------------------------------------------------------------------------------------------
def test_params_of_a_module_as_lower_variable():
    torch.manual_seed(0)
    d, k, n, m = 4, 3, 30, 20
    module = nn.Linear(d, k).double()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    X, Xv = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(m, d, generator=gen, dtype=F64)
    lab, labv = torch.randint(0, k, (n,), generator=gen), torch.randint(0, k, (m,), generator=gen)

    def g(x, p):
        logits = functional_call(module, p, (X,))
        return F.cross_entropy(logits, lab) + 0.5 * (torch.exp(x) * p["weight"] ** 2).sum() \
            + 0.05 * (p["bias"] ** 2).sum()

    def f(x, p):
        return F.cross_entropy(functional_call(module, p, (Xv,)), labv)

    y0 = bl.params(module)
    assert set(y0) == {"weight", "bias"} and not y0["weight"].requires_grad
    x = torch.full((k, d), -1.0, dtype=F64)
    problem = bl.Problem(f, g)
    res = CG(inner=bl.inner.GD(lr=1.0, steps=400), iters=100, tol=1e-13)(problem, x, y0)
    assert set(res.y) == {"weight", "bias"} and res.grad.shape == (k, d)

    # dense float64 reference on the flattened parameters (weight then bias)
    def unflat(v):
        return {"weight": v[: k * d].reshape(k, d), "bias": v[k * d:]}

    g_vec = lambda xv, v: g(xv.reshape(k, d), unflat(v))  # noqa: E731
    f_vec = lambda xv, v: f(xv.reshape(k, d), unflat(v))  # noqa: E731
    y_star = newton(g_vec, x.reshape(-1), torch.zeros(k * d + k, dtype=F64))
    hg, _, _ = dense_ift(f_vec, g_vec, x.reshape(-1), y_star)
    assert rel_err(res.grad, hg.reshape(k, d)) < 1e-8
    assert rel_err(res.y, unflat(y_star)) < 1e-10
    # unrolled modes work on the dict too and agree with each other
    dyn = bl.inner.Nesterov(lr=1.0, steps=5)
    r, fw = Reverse(inner=dyn)(problem, x, y0), Forward(inner=dyn)(problem, x, y0)
    assert rel_err(r.grad, fw.grad) < 1e-10
    # the module itself is untouched
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None
    with pytest.raises(bl.StructureMismatchError, match="nn.Module"):
        bl.params({"weight": torch.zeros(2)})
