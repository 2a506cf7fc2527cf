"""Oracle backends: the pure ``torch.func`` forms equal the autograd ones (float64, to rounding),
run under ``vmap``, and the backend switch is scoped and validated."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import bilevel as bl
from bilevel import _tree as T
from bilevel import oracles as O
from bilevel.formulation import Bound
from tests.test_oracles import f_obj, g_obj

F64 = torch.float64


@pytest.fixture
def pt(gen):
    x = (torch.randn(3, generator=gen, dtype=F64), torch.randn(2, generator=gen, dtype=F64))
    y = {"a": torch.randn(4, generator=gen, dtype=F64), "b": torch.randn(2, 2, generator=gen, dtype=F64)}
    lower = (torch.randn(7, 4, generator=gen, dtype=F64),)
    upper = (torch.randn(4, 4, generator=gen, dtype=F64),)
    bound = Bound(bl.Problem(f_obj, g_obj), x, y, upper_batch=upper, lower_batch=lower)
    v = T.from_vector(torch.randn(T.numel(bound.ys0), generator=gen, dtype=F64), bound.ys0)
    u = T.from_vector(torch.randn(T.numel(bound.xs), generator=gen, dtype=F64), bound.xs)
    return bound, bound.xs, bound.ys0, v, u


def _all(bound, xs, ys, v, u):
    G, F = bound.G, bound.F
    lin = O.Linearization(G, xs, ys)
    hv, jv = lin.both(v)
    return {
        "value": (O.value(G, xs, ys),),
        "grad_y": O.grad_y(G, xs, ys),
        "grad_x": O.grad_x(G, xs, ys),
        "grads": (O.grads(F, xs, ys)[0], *O.grads(F, xs, ys)[1], *O.grads(F, xs, ys)[2]),
        "lin.value": (lin.value, *lin.grad_y),
        "lin.hvp": lin.hvp(v),
        "lin.cross": lin.cross(v),
        "lin.both": hv + jv,
        "lin.cross_t": lin.cross_t(u),
        "hvp": O.hvp(G, xs, ys, v),
        "cross": O.cross(G, xs, ys, v),
        "hvp_and_cross": sum(O.hvp_and_cross(G, xs, ys, v), ()),
    }


def test_func_backend_equals_autograd(pt):
    ref = _all(*pt)
    with O.backend("func"):
        assert O.get_backend() == "func"
        got = _all(*pt)
    assert O.get_backend() == "autograd"
    for k in ref:
        for a, b in zip(ref[k], got[k], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13, msg=k)


def test_func_backend_counts_like_autograd(pt):
    with O.counting() as c_ref:
        _all(*pt)
    with O.backend("func"), O.counting() as c:
        _all(*pt)
    assert c == c_ref


def test_func_backend_runs_under_vmap(pt):
    """A batch of points (e.g. tasks) through the same oracle code, equal to a Python loop."""
    bound, xs, ys, v, _ = pt
    Y = tuple(torch.stack([t + 0.1 * i for i in range(3)]) for t in ys)

    def per_point(*y):
        lin = O.Linearization(bound.G, xs, y)
        return lin.both(v)[0] + O.grad_y(bound.G, xs, y)

    with O.backend("func"):
        out = vmap(per_point)(*Y)
    for i in range(3):
        y = tuple(t[i] for t in Y)
        ref = O.Linearization(bound.G, xs, y).both(v)[0] + O.grad_y(bound.G, xs, y)
        for a, b in zip(ref, out):
            torch.testing.assert_close(b[i], a, rtol=1e-12, atol=1e-13)


def test_value_and_grad_both_backends(pt):
    """Reverse-mode through two unrolled GD steps: the gradient of any function of leaves."""
    bound, xs, ys, _, _ = pt

    def h(a):
        y = ys
        for _ in range(2):
            y = T.axpy(-0.1, O.grad_y(bound.G, a, y, create_graph=True), y)
        return bound.F(a, y), y

    g_ref, (val_ref, y_ref) = O.value_and_grad(h, xs, has_aux=True)
    with O.backend("func"):
        g, (val, y) = O.value_and_grad(h, xs, has_aux=True)
    for a, b in zip(g_ref + y_ref + (val_ref,), g + tuple(y) + (val,)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    assert not any(t.requires_grad for t in g_ref)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown oracle backend"), O.backend("jax"):
        pass


def test_estimators_under_the_func_backend_equal_autograd():
    """Every oracle-based estimator gives the same hypergradient with the pure torch.func oracles."""
    from tests.reference_problems import REFERENCE_PROBLEMS

    ref = REFERENCE_PROBLEMS["mixed"]()
    H = bl.hypergrad
    for est in (H.CG(bl.inner.GD(ref.lr, 20), iters=10), H.Reverse(bl.inner.GD(ref.lr, 10)),
                H.Reverse(bl.inner.Momentum(ref.lr, 10), checkpoint=True),
                H.Neumann(bl.inner.GD(ref.lr, 20), iters=10), H.FirstOrder(bl.inner.GD(ref.lr, 5)),
                H.FixedPoint(bl.inner.GD(ref.lr, 20), iters=10)):
        a = est(ref.problem, ref.x, ref.y0)
        with O.backend("func"):
            b = est(ref.problem, ref.x, ref.y0)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14)
