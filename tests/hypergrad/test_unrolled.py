"""Unrolled estimators (Reverse, Forward) against the exact derivative of the unrolled map.

The reference map x ↦ f(x, y_T(x)) is computed by the textbook dynamics of ``tests.reference_problems``
(written independently of ``bilevel.inner``) and differentiated by central finite differences in
float64; truncated references are built by hand (T − K detached steps, then K steps with a graph).
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.hypergrad import Forward, Reverse
from tests.reference_problems import (
    RefProblem,
    detach_state,
    fd_grad,
    logreg,
    mixed,
    rel_err,
    textbook_unroll,
)

F64 = torch.float64
STEPS = 12


def _clamp(t):
    return t.clamp(-0.4, 0.4)


# (library dynamics, textbook method, textbook hyper-parameters)
def _dynamics(lr: float, steps: int = STEPS):
    return {
        "gd": (bl.inner.GD(lr=lr, steps=steps), "gd", {"lr": lr}),
        "momentum": (bl.inner.Momentum(lr=lr, steps=steps, momentum=0.6), "momentum",
                     {"lr": lr, "momentum": 0.6}),
        "fista": (bl.inner.Nesterov(lr=lr, steps=steps), "nesterov", {"lr": lr}),
        "nesterov_const": (bl.inner.Nesterov(lr=lr, steps=steps, momentum=0.5), "nesterov",
                           {"lr": lr, "momentum": 0.5}),
        "adam": (bl.inner.Adam(lr=0.05, steps=steps), "adam", {"lr": 0.05}),
        "gd_clamp": (bl.inner.GD(lr=lr, steps=steps, projection=_clamp), "gd",
                     {"lr": lr, "projection": _clamp}),
        "fista_clamp": (bl.inner.Nesterov(lr=lr, steps=steps, projection=_clamp), "nesterov",
                        {"lr": lr, "projection": _clamp}),
    }


DYNAMICS = list(_dynamics(0.1))


def _start(ref: RefProblem) -> torch.Tensor:
    """A deterministic non-zero starting point (so y0 matters)."""
    return 0.1 * torch.arange(ref.y0.numel(), dtype=F64).reshape(ref.y0.shape).sin()


def _unrolled_value(ref: RefProblem, method: str, hp: dict, steps: int = STEPS):
    """x ↦ f(x, y_T(x)) on flat vectors, by the textbook dynamics."""
    y0 = _start(ref).reshape(-1)

    def h(x):
        yT, _ = textbook_unroll(method, ref.g_vec, x.reshape(-1), y0, steps, **hp)
        return ref.f_vec(x.reshape(-1), yT)

    return h


@pytest.mark.parametrize("name", DYNAMICS)
@pytest.mark.parametrize("make", [mixed, logreg], ids=["mixed", "logreg"])
def test_reverse_and_forward_equal_derivative_of_unrolled_map(make, name):
    ref = make()
    dyn, method, hp = _dynamics(ref.lr)[name]
    y0 = _start(ref)
    rev = Reverse(inner=dyn)(ref.problem, ref.x, y0)
    # the library's trajectory is the textbook one
    yT, _ = textbook_unroll(method, ref.g_vec, ref.x.reshape(-1), y0.reshape(-1), STEPS, **hp)
    torch.testing.assert_close(rev.y.reshape(-1), yT, rtol=1e-12, atol=1e-14)
    if "clamp" in name:  # the projection is active at the end (else this case tests nothing new)
        assert (rev.y.abs() == 0.4).any()
    fd = fd_grad(_unrolled_value(ref, method, hp), ref.x, h=1e-5)
    assert rel_err(rev.grad, fd) < 1e-7, name
    fwd = Forward(inner=dyn)(ref.problem, ref.x, y0)
    assert rel_err(fwd.grad, rev.grad) < 1e-10, name
    torch.testing.assert_close(fwd.y, rev.y, rtol=1e-13, atol=1e-15)
    if make is logreg:  # ill-conditioned enough that 12 steps are far from the implicit limit
        assert rel_err(rev.grad, ref.hypergrad) > 1e-3


def test_forward_chunking_does_not_change_the_result():
    ref = logreg()
    dyn = bl.inner.Momentum(lr=ref.lr, steps=3, momentum=0.5)
    full = Forward(inner=dyn)(ref.problem, ref.x, _start(ref))
    for chunk in (1, 4, 100):
        part = Forward(inner=dyn, chunk=chunk)(ref.problem, ref.x, _start(ref))
        torch.testing.assert_close(part.grad, full.grad, rtol=1e-12, atol=1e-15)
    assert full.info["directions"] == ref.x.numel()


@pytest.mark.parametrize("name", ["gd", "fista", "adam", "gd_clamp"])
def test_checkpointing_equals_plain_backprop(name):
    ref = mixed()
    dyn = _dynamics(ref.lr, steps=17)[name][0]
    y0 = _start(ref)
    plain = Reverse(inner=dyn)(ref.problem, ref.x, y0)
    for ckpt, truncate in [(True, None), (1, None), (3, None), (5, None), (17, None), (40, None),
                           (True, 9), (2, 9), (4, 1)]:
        res = Reverse(inner=dyn, checkpoint=ckpt, truncate=truncate)(ref.problem, ref.x, y0)
        base = plain if truncate is None else Reverse(inner=dyn, truncate=truncate)(ref.problem, ref.x, y0)
        torch.testing.assert_close(res.grad, base.grad, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(res.y, base.y, rtol=1e-13, atol=0)
        assert res.info["checkpoint"] is True
    segs = Reverse(inner=dyn, checkpoint=True)(ref.problem, ref.x, y0).info["segments"]
    assert segs == 4  # ⌈17 / ⌈√17⌉⌉ = ⌈17/5⌉ stored states


def _truncated_reference(ref: RefProblem, method: str, hp: dict, steps: int, K: int, y0):
    """Hand-built T-RHG: T − K steps without a graph, then K steps with a graph, then backprop."""
    x = ref.x.reshape(-1)
    with torch.no_grad():
        _, s = textbook_unroll(method, ref.g_vec, x, y0.reshape(-1), steps - K, **hp)
    xr = x.clone().requires_grad_(True)
    yT, _ = textbook_unroll(method, ref.g_vec, xr, None, K, start=steps - K, state=detach_state(s),
                            graph=True, **hp)
    return torch.autograd.grad(ref.f_vec(xr, yT), xr)[0]


@pytest.mark.parametrize("name", ["gd", "momentum", "fista", "adam"])
def test_truncate_equals_backprop_through_last_steps_only(name):
    ref = logreg()
    steps = 10
    dyn, method, hp = _dynamics(ref.lr, steps=steps)[name]
    y0 = _start(ref)
    grads = {}
    for K in (1, 4, steps):
        res = Reverse(inner=dyn, truncate=K)(ref.problem, ref.x, y0)
        expected = _truncated_reference(ref, method, hp, steps, K, y0)
        assert rel_err(res.grad, expected) < 1e-10, (name, K)
        assert res.info["truncate"] == K
        grads[K] = res.grad
    full = Reverse(inner=dyn)(ref.problem, ref.x, y0)
    torch.testing.assert_close(grads[steps], full.grad, rtol=1e-13, atol=0)
    assert rel_err(grads[1], full.grad) > 1e-3  # truncation really drops terms


def test_truncate_out_of_range_is_rejected():
    dyn = bl.inner.GD(lr=0.1, steps=5)
    for K in (0, 6):
        with pytest.raises(ValueError, match="truncate"):
            Reverse(inner=dyn, truncate=K)


# ------------------------------------------------------------------------------------------------
# y given as a callable of x: the derivative through the initialization y0(x)
# ------------------------------------------------------------------------------------------------
def _maml_problem(n: int = 4, gen_seed: int = 5):
    """MAML-style: g(x, y) = task loss of y only; the initialization y0 = A x carries x."""
    gen = torch.Generator().manual_seed(gen_seed)
    m = 6
    A = torch.randn(m, n, generator=gen, dtype=F64) / 2
    X = torch.randn(10, m, generator=gen, dtype=F64)
    t = torch.randn(10, generator=gen, dtype=F64)
    Xv = torch.randn(8, m, generator=gen, dtype=F64)
    tv = torch.randn(8, generator=gen, dtype=F64)
    x = torch.randn(n, generator=gen, dtype=F64)

    def g(x, y):
        return torch.nn.functional.softplus(X @ y - t).mean() + 0.05 * (y**2).sum()

    def f(x, y):
        return 0.5 * ((Xv @ y - tv) ** 2).mean() + 0.1 * (x**2).sum()

    return bl.Problem(f, g), f, g, x, A


@pytest.mark.parametrize("init", ["identity", "linear"])
def test_derivative_through_callable_initialization(init):
    problem, f, g, x, A = _maml_problem(n=6 if init == "identity" else 4)
    if init == "identity":  # y0 = x, as in MAML
        A = torch.eye(6, dtype=F64)
    y_fn = lambda x_: A @ x_  # noqa: E731
    steps, lr = 8, 0.5
    dyn = bl.inner.Momentum(lr=lr, steps=steps, momentum=0.3)

    def h(x_):
        yT, _ = textbook_unroll("momentum", g, x_, A @ x_, steps, lr=lr, momentum=0.3)
        return f(x_, yT)

    fd = fd_grad(h, x, h=1e-5)
    no_init = Reverse(inner=dyn)(problem, x, y_fn(x))  # same y0 value, but as a constant
    assert rel_err(no_init.grad, fd) > 1e-2  # the initialization path is a large part of it
    for est in (Reverse(inner=dyn), Reverse(inner=dyn, checkpoint=True), Reverse(inner=dyn, checkpoint=3),
                Forward(inner=dyn)):
        res = est(problem, x, y_fn)
        assert rel_err(res.grad, fd) < 1e-8, repr(est)
        torch.testing.assert_close(res.y, no_init.y, rtol=1e-13, atol=0)


def test_truncated_reverse_with_callable_init_drops_the_initialization_path():
    problem, f, g, x, A = _maml_problem()
    steps, K, lr = 8, 3, 0.5
    dyn = bl.inner.GD(lr=lr, steps=steps)
    res = Reverse(inner=dyn, truncate=K)(problem, x, lambda x_: A @ x_)
    with torch.no_grad():
        _, s = textbook_unroll("gd", g, x, A @ x, steps - K, lr=lr)
    xr = x.clone().requires_grad_(True)
    yT, _ = textbook_unroll("gd", g, xr, None, K, start=steps - K, state=detach_state(s), lr=lr, graph=True)
    expected = torch.autograd.grad(f(xr, yT), xr)[0]
    assert rel_err(res.grad, expected) < 1e-12


def test_callable_initialization_with_pytrees():
    """x a dict, y a tuple built from it: structure is kept and the derivative is still exact."""
    problem0, f0, g0, x0, A = _maml_problem()

    def f(x, y):
        return f0(x["a"], y[0]) + (x["s"] * y[1]).sum()

    def g(x, y):
        return g0(x["a"], y[0]) + 0.5 * ((y[1] - x["s"]) ** 2).sum()

    def y_fn(x):
        return (A @ x["a"], torch.zeros(2, dtype=F64) + x["s"].sum())

    x = {"a": x0, "s": torch.tensor([0.3, -0.2], dtype=F64)}
    dyn = bl.inner.GD(lr=0.5, steps=6)
    res_r = Reverse(inner=dyn, checkpoint=True)(bl.Problem(f, g), x, y_fn)
    res_f = Forward(inner=dyn)(bl.Problem(f, g), x, y_fn)
    assert set(res_r.grad) == {"a", "s"} and isinstance(res_r.y, tuple)
    for k in ("a", "s"):
        torch.testing.assert_close(res_f.grad[k], res_r.grad[k], rtol=1e-10, atol=1e-14)

    def h(v):
        xv = {"a": v[:4], "s": v[4:]}
        y = y_fn(xv)
        for _ in range(6):
            yr = tuple(t.detach().requires_grad_(True) for t in y)
            with torch.enable_grad():
                gr = torch.autograd.grad(g(xv, yr), yr)
            y = tuple(t - 0.5 * d for t, d in zip(y, gr))
        return f(xv, y)

    fd = fd_grad(h, torch.cat([x["a"], x["s"]]))
    assert rel_err(torch.cat([res_r.grad["a"], res_r.grad["s"]]), fd) < 1e-8


@pytest.mark.parametrize("checkpoint", [False, True, 2])
def test_reverse_derivative_with_respect_to_the_start_point(checkpoint):
    """wrt_init=True: info["grad_init"] = ∂f(x, y_T)/∂y0, checked by finite differences in y0."""
    ref = mixed()
    dyn, method, hp = _dynamics(ref.lr, steps=7)["fista"]
    y0 = _start(ref)
    res = Reverse(inner=dyn, checkpoint=checkpoint, wrt_init=True)(ref.problem, ref.x, y0)
    plain = Reverse(inner=dyn)(ref.problem, ref.x, y0)
    torch.testing.assert_close(res.grad, plain.grad, rtol=1e-12, atol=0)

    def h(y0_):
        yT, _ = textbook_unroll(method, ref.g_vec, ref.x, y0_, 7, **hp)
        return ref.f_vec(ref.x, yT)

    (grad_init,) = res.info["grad_init"]
    assert rel_err(grad_init, fd_grad(h, y0)) < 1e-6  # ‖grad‖ ~ 3e-3: FD round-off ~1e-8
    with pytest.raises(ValueError, match="wrt_init"):
        Reverse(inner=dyn, truncate=3, wrt_init=True)
    with pytest.raises(ValueError, match="wrt_init"):
        Reverse(inner=dyn, wrt_init=True)(ref.problem, ref.x, lambda x: x.sum() * y0)


@pytest.mark.parametrize("name", ["gd", "fista", "adam"])
def test_forward_reverse_products_equal_jvp_products(name):
    """Tangents from reverse-mode products (one batched backward through the gradient graph) equal
    the jvp of the whole step map, also with the functional oracle backend (vmap-able)."""
    ref = logreg()
    dyn = _dynamics(ref.lr)[name][0]
    a = Forward(inner=dyn, products="jvp")(ref.problem, ref.x, _start(ref))
    b = Forward(inner=dyn)(ref.problem, ref.x, _start(ref))
    with bl.oracles.backend("func"):
        c = Forward(inner=dyn)(ref.problem, ref.x, _start(ref))
    d = Forward(inner=dyn, chunk=1)(ref.problem, ref.x, _start(ref))  # one tangent per pass
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(c.grad, a.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d.grad, a.grad, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="products"):
        Forward(inner=dyn, products="fd")
