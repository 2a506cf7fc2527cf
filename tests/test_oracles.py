"""bilevel.oracles: gradients, Hessian-vector and cross products vs dense float64 autograd references,
and per-sample oracle counting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

import bilevel as bl
from bilevel import _tree as T
from bilevel import oracles as O
from bilevel.formulation import Bound
from tests.reference_problems import logcosh

F64 = torch.float64
N_LOWER, N_UPPER = 7, 4


def f_obj(x, y, batch):
    (Xb,) = batch
    x0, x1 = x
    return 0.5 * ((Xb @ y["a"]) ** 2).mean() + (x0**2).sum() * y["b"].sum() + (x1[:, None] * y["b"]).sum()


def g_obj(x, y, batch):
    (Xb,) = batch
    x0, x1 = x
    r = Xb @ y["a"] + torch.tanh(x0).sum()
    reg = 0.5 * (torch.exp(x1) * (y["b"] ** 2).sum(1)).sum()
    return logcosh(r).mean() + reg + torch.sin(x0[:2]) @ (y["b"] @ y["a"][:2]) + 0.1 * (y["a"] ** 2).sum()


@pytest.fixture
def setup(gen):
    x = (torch.randn(3, generator=gen, dtype=F64), torch.randn(2, generator=gen, dtype=F64))
    y = {"a": torch.randn(4, generator=gen, dtype=F64), "b": torch.randn(2, 2, generator=gen, dtype=F64)}
    lower = (torch.randn(N_LOWER, 4, generator=gen, dtype=F64),)
    upper = (torch.randn(N_UPPER, 4, generator=gen, dtype=F64),)
    problem = bl.Problem(f_obj, g_obj)
    bound = Bound(problem, x, y, upper_batch=upper, lower_batch=lower)
    xs, ys = bound.xs, bound.ys0
    nx = T.numel(xs)

    def vec_fn(obj):
        return lambda z: obj(T.from_vector(z[:nx], xs), T.from_vector(z[nx:], ys))

    z = torch.cat([T.to_vector(xs), T.to_vector(ys)])
    Hg = torch.autograd.functional.hessian(vec_fn(bound.G), z)
    dg = torch.autograd.functional.jacobian(vec_fn(bound.G), z)
    df = torch.autograd.functional.jacobian(vec_fn(bound.F), z)
    ref = {"Hyy": Hg[nx:, nx:], "Hxy": Hg[:nx, nx:], "gx": dg[:nx], "gy": dg[nx:], "fx": df[:nx],
           "fy": df[nx:], "g": float(bound.G(xs, ys)), "f": float(bound.F(xs, ys))}
    v = T.from_vector(torch.randn(T.numel(ys), generator=gen, dtype=F64), ys)
    return bound, xs, ys, v, ref


def _close(leaves, vec, rtol=1e-12):
    torch.testing.assert_close(T.to_vector(leaves), vec, rtol=rtol, atol=1e-14)


def test_gradients_match_dense_reference(setup):
    bound, xs, ys, _, ref = setup
    val, gx, gy = O.grads(bound.G, xs, ys)
    assert float(val) == pytest.approx(ref["g"], rel=1e-14)
    _close(gx, ref["gx"])
    _close(gy, ref["gy"])
    _close(O.grad_y(bound.G, xs, ys), ref["gy"])
    _close(O.grad_x(bound.G, xs, ys), ref["gx"])
    _, fx, fy = O.grads(bound.F, xs, ys)
    _close(fx, ref["fx"])
    _close(fy, ref["fy"])
    assert float(O.value(bound.F, xs, ys)) == pytest.approx(ref["f"], rel=1e-14)
    assert not gx[0].requires_grad and not gy[0].requires_grad


def test_linearization_products_match_dense_hessian(setup):
    bound, xs, ys, v, ref = setup
    vv = T.to_vector(v)
    lin = O.Linearization(bound.G, xs, ys)
    assert float(lin.value) == pytest.approx(ref["g"], rel=1e-14)
    _close(lin.grad_y, ref["gy"])
    hv, jv = lin.hvp(v), lin.cross(v)
    _close(hv, ref["Hyy"] @ vv)
    _close(jv, ref["Hxy"] @ vv)
    assert [t.shape for t in jv] == [t.shape for t in xs]
    # both() is one backward pass and gives the same two products
    hv2, jv2 = lin.both(v)
    _close(hv2, T.to_vector(hv), rtol=1e-14)
    _close(jv2, T.to_vector(jv), rtol=1e-14)
    # the stored graph can be reused many times (what the linear solvers do)
    for _ in range(3):
        _close(lin.hvp(v), ref["Hyy"] @ vv)
    # the transpose product J u = ∇²_yx g · u (shape of y)
    u = T.from_vector(torch.linspace(-1, 2, T.numel(xs), dtype=F64), xs)
    _close(lin.cross_t(u), ref["Hxy"].T @ T.to_vector(u))
    # one-shot versions
    _close(O.hvp(bound.G, xs, ys, v), ref["Hyy"] @ vv)
    _close(O.cross(bound.G, xs, ys, v), ref["Hxy"] @ vv)
    h3, j3 = O.hvp_and_cross(bound.G, xs, ys, v)
    _close(h3, ref["Hyy"] @ vv)
    _close(j3, ref["Hxy"] @ vv)


def test_grad_y_with_graph_is_differentiable_in_x_and_y(setup):
    bound, xs, ys, v, ref = setup
    xs_ = T.requires_grad(xs)
    ys_ = T.requires_grad(ys)
    gy = O.grad_y(bound.G, xs_, ys_, create_graph=True)
    _close(T.detach(gy), ref["gy"])
    dx = torch.autograd.grad(T.dot(gy, v), xs_ + ys_)
    _close(dx[: len(xs)], ref["Hxy"] @ T.to_vector(v))
    _close(dx[len(xs):], ref["Hyy"] @ T.to_vector(v))


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("nb", [1, 3])
def test_grad_y_tangents_match_dense_hessian_blocks(setup, gen, backend, nb):
    """d_i = ∇²_yx g u_i + ∇²_yy g z_i for a batch of tangents (one tangent: a plain backward,
    several: one batched backward; the functional backend: a vmapped jvp)."""
    bound, xs, ys, _, ref = setup
    U = torch.randn(nb, T.numel(xs), generator=gen, dtype=F64)
    Z = torch.randn(nb, T.numel(ys), generator=gen, dtype=F64)
    with O.backend(backend):
        gy, d = O.grad_y_tangents(bound.G, xs, ys, T.from_vector(U, xs), T.from_vector(Z, ys))
    _close(gy, ref["gy"])
    assert [t.shape for t in d] == [(nb, *t.shape) for t in ys]
    want = U @ ref["Hxy"] + Z @ ref["Hyy"]  # rows: Hxyᵀ u_i + Hyy z_i (Hyy symmetric)
    torch.testing.assert_close(T.to_vector_batched(d), want, rtol=1e-12, atol=1e-14)


def test_grad_y_fn_composes_with_jvp(setup):
    bound, xs, ys, _, ref = setup
    gfun = O.grad_y_fn(bound.G)
    _close(gfun(xs, ys), ref["gy"])
    u = T.from_vector(torch.linspace(-1, 1, T.numel(xs), dtype=F64), xs)
    _, tangent = jvp(lambda xs_: gfun(xs_, ys), (xs,), (u,))
    _close(tangent, ref["Hxy"].T @ T.to_vector(u))  # ∂_x ∇_y g · u = ∇²_yx g u


def test_products_with_an_objective_that_ignores_x():
    """Inputs the objective does not use get zero derivatives (not None, not an error)."""
    xs = (torch.ones(3, dtype=F64),)
    ys = (torch.tensor([1.0, 2.0], dtype=F64),)

    def g(xs, ys):
        return (ys[0] ** 3).sum()

    assert torch.equal(O.grad_x(g, xs, ys)[0], torch.zeros(3, dtype=F64))
    hv, jv = O.hvp_and_cross(g, xs, ys, (torch.ones(2, dtype=F64),))
    torch.testing.assert_close(hv[0], torch.tensor([6.0, 12.0], dtype=F64))
    assert torch.equal(jv[0], torch.zeros(3, dtype=F64))


def test_counting_counts_per_sample_calls(setup):
    bound, xs, ys, v, _ = setup
    n, m = N_LOWER, N_UPPER
    assert bound.G.n == n and bound.F.n == m and bound.G.level == "lower"
    with O.counting() as c:
        O.grads(bound.G, xs, ys)
        O.grad_y(bound.G, xs, ys)
        O.grad_x(bound.F, xs, ys)
        O.value(bound.F, xs, ys)
        lin = O.Linearization(bound.G, xs, ys)
        lin.hvp(v)
        lin.hvp(v)
        lin.cross(v)
        lin.both(v)
        O.hvp_and_cross(bound.G, xs, ys, v)
        lin.cross_t(xs)
        with O.counting() as inner:  # nested blocks count separately
            O.grad_y(bound.G, xs, ys)
    assert c["lower"] == {"grad": 4 * n, "hvp": 4 * n, "cross": 4 * n}
    assert c["upper"] == {"grad": m, "value": m}
    assert inner == {"lower": {"grad": n}}
    assert c.total("upper") == 2 * m and c.total() == 12 * n + 2 * m
    assert c.flat()["lower_hvp"] == 4 * n
    # nothing is counted outside a block
    O.grad_y(bound.G, xs, ys)
    assert c["lower"]["grad"] == 4 * n


def test_objective_without_batch_counts_one_sample():
    problem = bl.Problem(lambda x, y: (x * y).sum(), lambda x, y: ((y - x) ** 2).sum())
    bound = Bound(problem, torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64))
    with O.counting() as c:
        O.grad_y(bound.G, bound.xs, bound.ys0)
    assert c["lower"]["grad"] == 1


def test_estimator_oracle_counts_follow_the_algorithm(gen):
    """AID-CG with T inner steps and Q CG iterations (tol=0): T+1 lower gradients (inner + the
    linearization), Q Hessian-vector products, one cross product, one upper gradient."""
    X = torch.randn(9, 3, generator=gen, dtype=F64)
    lab = torch.randint(0, 2, (9,), generator=gen)
    Xv = torch.randn(5, 3, generator=gen, dtype=F64)

    def g(x, W, batch):
        return F.cross_entropy(batch[0] @ W, batch[1]) + 0.5 * (torch.exp(x) * W**2).sum()

    def f(x, W, batch):
        return F.cross_entropy(batch[0] @ W, batch[1])

    problem = bl.Problem(f, g)
    T_steps, Q = 6, 4
    est = bl.hypergrad.CG(inner=bl.inner.GD(lr=0.5, steps=T_steps), iters=Q, tol=0.0)
    x, W = torch.zeros(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64)
    with O.counting() as c:
        res = est(problem, x, W, upper_batch=(Xv, lab[:5]), lower_batch=(X, lab))
    assert res.info["linear_solve"]["iterations"] == Q
    assert c["lower"] == {"grad": 9 * (T_steps + 1), "hvp": 9 * Q, "cross": 9}
    assert c["upper"] == {"grad": 5}
