"""The trimmed eager paths compute bitwise what the general paths compute (issue 9 item 2): the
one-shot HVP / cross product against a :class:`bilevel.oracles.Linearization`, the Neumann series
read once against a read per product, the cheaper finiteness tests against ``isfinite``."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel import linalg
from bilevel import oracles as O
from bilevel.solvers.base import _check_pending, _finite_summary
from bilevel.validation import first_nonfinite


def _objective():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(7, 5, generator=gen, dtype=torch.float64)

    def g(xs, ys):  # couples x and y nonlinearly, two leaves each
        x, w = xs
        y, z = ys
        return (torch.log1p(torch.exp(A @ y * x.sum())).sum() + (w * z).sum() ** 2 + 0.5 * (y * y).sum()
                + torch.sin(z).sum() * w[0])

    def r(n):
        return torch.randn(n, generator=gen, dtype=torch.float64)

    return g, (r(3), r(2)), (r(5), r(2)), (r(5), r(2))


def test_one_shot_products_equal_the_linearization_bitwise():
    g, xs, ys, v = _objective()
    with torch.enable_grad():
        lin = O.Linearization(g, xs, ys)
        hv_ref, jv_ref = lin.hvp(v), lin.cross(v)
        with O.counting() as c:
            hv, jv = O.hvp(g, xs, ys, v), O.cross(g, xs, ys, v)
    for a, b in zip(hv + jv, hv_ref + jv_ref):
        assert torch.equal(a, b)
    assert not any(t.requires_grad for t in hv + jv)
    assert c["objective"] == {"grad": 2, "hvp": 1, "cross": 1}
    # and both against the dense second derivatives (the products are the right ones)
    H = torch.autograd.functional.hessian(lambda *a: g(xs, a), ys)
    hv_dense = [sum(H[i][j].reshape(ys[i].numel(), -1) @ v[j] for j in range(2)) for i in range(2)]
    for a, b in zip(hv, hv_dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_eager_grads_equal_the_functional_backend():
    g, xs, ys, _ = _objective()
    with torch.enable_grad():
        val, gx, gy = O.grads(g, xs, ys)
        gy1, gx1 = O.grad_y(g, xs, ys), O.grad_x(g, xs, ys)
    with O.backend("func"):
        val2, gx2, gy2 = O.grads(g, xs, ys)
    for a, b in zip((val, *gx, *gy, *gx, *gy), (val2, *gx2, *gy2, *gx1, *gy1)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("scale", [1.0, 40.0])  # converging, and diverging (a breakdown)
def test_neumann_read_once_returns_what_a_read_per_product_returns(scale):
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    A = scale * (M @ M.T / 6 + torch.eye(6, dtype=torch.float64))
    b = (torch.randn(6, generator=gen, dtype=torch.float64),)
    calls = []

    def matvec(p):
        calls.append(1)
        return (A @ p[0],)

    v1, i1 = linalg.neumann(matvec, b, iters=12, alpha=0.1, check_every=1)
    n1 = len(calls)
    v2, i2 = linalg.neumann(matvec, b, iters=12, alpha=0.1, check_every=12)
    assert torch.equal(v1[0], v2[0]) and i1["iterations"] == i2["iterations"]
    assert i1["breakdown"] == i2["breakdown"] == (None if scale == 1.0 else "diverging")
    assert (len(calls) - n1 == n1) == (scale == 1.0)  # a breakdown: the block ran to its end
    assert i2["residual"] == i1["residual"]


def test_first_nonfinite_is_exact():
    assert first_nonfinite([torch.tensor(v) for v in (1.0, -3e38, 3e38, 0.0)]) is None  # no false alarm
    for bad in (math.inf, -math.inf, math.nan):
        s = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(bad), torch.tensor(math.nan)]
        assert first_nonfinite(s) == 2
    assert first_nonfinite([torch.tensor([1.0]), torch.tensor([[math.inf]])]) == 1  # any shape of one entry


def test_solve_finiteness_summary_flags_the_level_and_step():
    big = (torch.full((3,), 3e38), torch.full((2, 2), -3e38))  # finite, huge: a sum would overflow
    _check_pending([_finite_summary(big, big)], 1)
    x_ok, y_bad = (torch.ones(3),), (torch.tensor([1.0, math.inf]),)
    pending = [_finite_summary(x_ok, x_ok), _finite_summary(y_bad, x_ok), _finite_summary(x_ok, y_bad)]
    with pytest.raises(bl.errors.NonFiniteError, match="upper level at step 6") as e:
        _check_pending(pending, 7)  # steps 5, 6, 7 pending: x of step 6 is the first bad entry
    assert e.value.level == "upper" and e.value.step == 6 and pending == []
    with pytest.raises(bl.errors.NonFiniteError, match="lower level at step 1"):
        _check_pending([_finite_summary(x_ok, (torch.tensor([math.nan]),))], 1)


@pytest.mark.parametrize("leaves", [1, 2])
def test_one_shot_gradient_and_products_equal_the_linearization_bitwise(leaves):
    """``grad_y_hvp_cross`` (SOBA's oracles: ∇_y g, H v, Jᵀ v in one shot; with one leaf each its
    flat path, which frees the graph and builds no linearization) gives bitwise the linearization's
    ``grad_y`` and ``both(v)``, counted as one gradient, one HVP and one cross product; zeros
    where g does not depend on x, is linear in y, or does not depend on y."""
    g2, xs2, ys2, v2 = _objective()
    if leaves == 2:
        g, xs, ys, v = g2, xs2, ys2, v2
    else:
        def g(xs, ys):
            return g2((xs[0], xs2[1]), (ys[0], ys2[1]))
        xs, ys, v = xs2[:1], ys2[:1], v2[:1]
    with torch.enable_grad():
        lin = O.Linearization(g, xs, ys)
        ref = (lin.grad_y, *lin.both(v))
        with O.counting() as c:
            got = O.grad_y_hvp_cross(g, xs, ys, v)
    for a, b in zip(got, ref):
        assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))
        assert not any(t.requires_grad for t in a)
    assert c["objective"] == {"grad": 1, "hvp": 1, "cross": 1}
    y, x, w = ys[0], xs[0], v[0]
    cases = {  # g, and which of (∇_y g, H v, Jᵀ v) are zero
        "no x": (lambda xs, ys: (ys[0] ** 3).sum(), (False, False, True)),
        "linear in y": (lambda xs, ys: (xs[0].sum() * ys[0]).sum(), (False, True, False)),
        "no y": (lambda xs, ys: (xs[0] ** 2).sum(), (True, True, True)),
    }
    for name, (fn, zero) in cases.items():
        with torch.enable_grad():
            got = O.grad_y_hvp_cross(fn, (x,), (y,), (w,))
        assert [t[0].shape for t in got] == [y.shape, y.shape, x.shape], name
        assert [bool((t[0] == 0).all()) for t in got] == list(zero), name
