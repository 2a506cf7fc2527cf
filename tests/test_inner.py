"""bilevel.inner: each dynamics' update against its textbook formula on hand-computed examples,
projections, the unroll loop and its non-finite detection."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel import inner

F64 = torch.float64


def _t(*v):
    return torch.tensor(v, dtype=F64)


def _close(a, b, rtol=1e-14, atol=1e-15):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_gd_update_hand_computed():
    dyn = inner.GD(lr=0.1)
    s = dyn.init((_t(1.0, 2.0),))
    s = dyn.update(s, (_t(0.5, -1.0),), 0)
    _close(dyn.output(s)[0], _t(0.95, 2.1))
    assert len(s) == 1 and dyn.point(s) == dyn.output(s)


def test_momentum_update_hand_computed():
    """m₁ = g₀, y₁ = y₀ − η m₁;  m₂ = β m₁ + g₁ = (1.45, 0.1), y₂ = y₁ − η m₂."""
    dyn = inner.Momentum(lr=0.1, momentum=0.9)
    s = dyn.init((_t(1.0, 2.0),))
    assert len(s) == 2 and torch.equal(s[1], torch.zeros(2, dtype=F64))
    s = dyn.update(s, (_t(0.5, -1.0),), 0)
    _close(s[0], _t(0.95, 2.1))
    _close(s[1], _t(0.5, -1.0))
    s = dyn.update(s, (_t(1.0, 1.0),), 1)
    _close(s[1], _t(1.45, 0.1))
    _close(s[0], _t(0.805, 2.09))


def test_fista_momentum_schedule():
    """β_k = (t_k − 1)/t_{k+1}, t_0 = 1, t_{k+1} = (1 + √(1 + 4t_k²))/2 (Beck & Teboulle 2009)."""
    assert inner.fista_momentum(0) == 0.0
    assert inner.fista_momentum(1) == pytest.approx(0.2817535, abs=1e-7)
    assert inner.fista_momentum(2) == pytest.approx(0.4340428, abs=1e-7)
    t, ts = 1.0, [1.0]
    for _ in range(30):
        t = (1 + math.sqrt(1 + 4 * t * t)) / 2
        ts.append(t)
    dyn = inner.Nesterov(lr=0.1)
    for k in range(29):
        assert dyn.beta(k) == pytest.approx((ts[k] - 1) / ts[k + 1], rel=1e-15)
    assert 1 - dyn.beta(28) < 3.5 / 29  # β_k → 1 like 1 − 3/k
    assert inner.Nesterov(lr=0.1, momentum=0.7).beta(5) == 0.7


def test_nesterov_update_hand_computed():
    """g = ½·2·y², η = 0.1: z₁ = 0.8, w₁ = 0.8 (β₀ = 0); z₂ = 0.64, w₂ = 0.64 − 0.16 β₁; ..."""
    dyn = inner.Nesterov(lr=0.1)
    s = dyn.init((_t(1.0),))
    b1, b2 = inner.fista_momentum(1), inner.fista_momentum(2)
    expected = []
    z, w = 1.0, 1.0
    for b in (0.0, b1, b2):
        z_new = w - 0.1 * 2.0 * w
        w = z_new + b * (z_new - z)
        z = z_new
        expected.append((z, w))
    assert expected[1] == pytest.approx((0.64, 0.64 - 0.16 * 0.2817535), abs=1e-7)
    for k, (z_k, w_k) in enumerate(expected):
        s = dyn.update(s, (2.0 * dyn.point(s)[0],), k)  # gradient at the extrapolated point w
        assert float(dyn.output(s)[0]) == pytest.approx(z_k, rel=1e-15)
        assert float(dyn.point(s)[0]) == pytest.approx(w_k, rel=1e-15)


def test_adam_update_with_bias_correction():
    """Step 1: m̂ = g, v̂ = g², so y₁ = y₀ − η g/(|g| + ε) whatever β₁, β₂."""
    lr, eps = 0.1, 1e-8
    dyn = inner.Adam(lr=lr, betas=(0.9, 0.999), eps=eps, eps_root=0.0)
    s = dyn.init((_t(1.0, 2.0),))
    assert len(s) == 3
    s = dyn.update(s, (_t(0.5, -2.0),), 0)
    _close(s[0], _t(1.0 - 0.1 * 0.5 / (0.5 + eps), 2.0 + 0.1 * 2.0 / (2.0 + eps)))
    _close(s[0], _t(0.900000002, 2.0999999995), rtol=1e-12)
    _close(s[1], _t(0.05, -0.2))
    _close(s[2], _t(0.00025, 0.004))
    s = dyn.update(s, (_t(1.0, 1.0),), 1)
    y1, m1, v1 = [0.900000002, 2.0999999995], [0.05, -0.2], [0.00025, 0.004]
    for i in range(2):
        m = 0.9 * m1[i] + 0.1 * 1.0
        v = 0.999 * v1[i] + 0.001 * 1.0
        mhat, vhat = m / (1 - 0.9**2), v / (1 - 0.999**2)
        y = y1[i] - lr * mhat / (math.sqrt(vhat) + eps)
        assert float(s[0][i]) == pytest.approx(y, rel=1e-12)
        assert float(s[1][i]) == pytest.approx(m, rel=1e-14)
        assert float(s[2][i]) == pytest.approx(v, rel=1e-14)


def test_adam_eps_root_keeps_derivative_finite_at_zero_gradient():
    dyn = inner.Adam(lr=0.1)
    y = _t(1.0, 1.0).requires_grad_(True)
    grad = (y - _t(1.0, 0.0)) * 1.0  # exactly zero in the first entry
    s = dyn.update(dyn.init((y.detach(),)), (grad,), 0)
    (d,) = torch.autograd.grad(s[0].sum(), y)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("cls", [inner.GD, inner.Momentum, inner.Nesterov, inner.Adam])
def test_projection_is_applied_to_the_iterate(cls):
    dyn = cls(lr=1.0, projection=lambda t: t.clamp(-0.5, 0.5))
    s = dyn.init((_t(0.0, 0.2, 0.4),))
    s = dyn.update(s, (_t(-3.0, 0.1, 3.0),), 0)
    y = dyn.output(s)[0]
    assert float(y.abs().max()) <= 0.5
    if cls in (inner.GD, inner.Momentum):
        _close(y, _t(0.5, 0.1, -0.5))


def test_with_projection_composes_after_own_projection():
    dyn = inner.GD(lr=1.0, projection=lambda t: t.clamp(max=1.0))
    both = inner.with_projection(dyn, lambda t: 2.0 * t)
    s = both.update((_t(0.0, 0.0),), (_t(-3.0, -0.25),), 0)
    _close(s[0], _t(2.0, 0.5))
    assert inner.with_projection(dyn, None) is dyn
    assert dyn.projection(_t(5.0)) == 1.0  # the original is not modified


def test_unroll_matches_manual_loop_and_restarts_with_start():
    """unroll passes the global step counter k to update (it matters for Adam and FISTA)."""
    A = torch.diag(_t(1.0, 3.0))

    def grad_fn(ys, k):
        return (A @ ys[0] - 1.0,)

    for dyn in (inner.Adam(lr=0.05), inner.Nesterov(lr=0.2), inner.Momentum(lr=0.1, momentum=0.5)):
        s = dyn.init((_t(2.0, -1.0),))
        manual = s
        for k in range(7):
            manual = dyn.update(manual, grad_fn(dyn.point(manual), k), k)
        full, info = inner.unroll(dyn, grad_fn, s, 7)
        part, _ = inner.unroll(dyn, grad_fn, s, 3)
        part, _ = inner.unroll(dyn, grad_fn, part, 4, start=3)
        for a, b, c in zip(full, manual, part):
            assert torch.equal(a, b) and torch.equal(a, c)
        assert info["steps"] == 7
        last = grad_fn(dyn.point(inner.unroll(dyn, grad_fn, s, 6)[0]), 6)[0]
        assert info["last_grad_norm"] == pytest.approx(float(last.norm()), rel=1e-14)


def _first_overflow_step(lr: float, L: float) -> int:
    y, k = 1.0, 0
    while math.isfinite(y):
        y = y - lr * (L * y)
        k += 1
    return k


def test_unroll_reports_overflow_step():
    """GD on ½L y² with ηL ≫ 2: y_k = (1 − ηL)^k overflows at a step we can compute by hand."""
    lr, L = 1e10 + 1.0, 1.0
    expected = _first_overflow_step(lr, L)
    assert expected == 31
    dyn = inner.GD(lr=lr)
    with pytest.raises(bl.NonFiniteError, match=f"step {expected}") as e:
        inner.unroll(dyn, lambda ys, k: (L * ys[0],), dyn.init((_t(1.0, 1.0),)), 40)
    assert e.value.level == "lower" and e.value.step == expected


@pytest.mark.parametrize("start", [0, 10])
def test_unroll_reports_first_nan_step(start):
    def grad_fn(ys, k):
        g = ys[0] - 1.0
        return (g * float("nan"),) if k == start + 4 else (g,)

    dyn = inner.Momentum(lr=0.1)
    with pytest.raises(bl.NonFiniteError) as e:
        inner.unroll(dyn, grad_fn, dyn.init((_t(0.0, 0.0),)), 8, start=start, level="upper")
    assert e.value.step == start + 5 and e.value.level == "upper"
    assert f"step {start + 5}" in str(e.value)


def test_estimators_report_lower_level_blowup_with_step():
    lr = 1e10 + 1.0
    problem = bl.Problem(lambda x, y: (y**2).sum(), lambda x, y: 0.5 * (y**2).sum() - 0.0 * (x * y).sum())
    x, y0 = torch.ones(2, dtype=F64), torch.ones(2, dtype=F64)
    for est in (bl.hypergrad.CG(inner=inner.GD(lr=lr, steps=40)),
                bl.hypergrad.Reverse(inner=inner.GD(lr=lr, steps=40)),
                bl.hypergrad.FirstOrder(inner=inner.GD(lr=lr, steps=40))):
        with pytest.raises(bl.NonFiniteError) as e:
            est(problem, x, y0)
        assert e.value.level == "lower" and e.value.step == _first_overflow_step(lr, 1.0), type(est)


def test_dynamics_validate_arguments():
    with pytest.raises(ValueError, match="lr"):
        inner.GD(lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        inner.Adam(lr=0.1, steps=-1)
    assert inner.GD(lr=torch.tensor(0.1)).lr.item() == pytest.approx(0.1)  # tensor step sizes allowed


# --- proximal dynamics (ISTA / FISTA): lasso y* = argmin ½‖Ay − b‖² + λ‖y‖₁ --------------------


def _lasso(n=15, d=30, seed=0):
    """An underdetermined lasso (n < d: not strongly convex, so ISTA is at its O(1/k) worst)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    L = float(torch.linalg.matrix_norm(A, 2)) ** 2  # Lipschitz constant of ∇ ½‖Ay − b‖²
    return A, b, L


def _run(dyn, A, b, steps, y0=None):
    s = dyn.init((torch.zeros(A.shape[1], dtype=F64) if y0 is None else y0,))
    out = []
    for k in range(steps):
        w = dyn.point(s)[0]
        s = dyn.update(s, (A.T @ (A @ w - b),), k)
        out.append(dyn.output(s)[0])
    return out


def test_soft_threshold_is_the_prox_of_the_l1_norm():
    v = _t(-3.0, -0.5, 0.0, 0.2, 1.0, 2.5)
    _close(inner.soft_threshold(v, 1.0), _t(-2.0, 0.0, 0.0, 0.0, 0.0, 1.5))
    # optimality of u = argmin ½(u − v)² + τ|u|:  v − u ∈ τ ∂|u|  (= τ sign(u) if u ≠ 0, [−τ, τ] if u = 0)
    v = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    tau = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=F64)
    u = inner.soft_threshold(v, tau)
    r = v - u
    nz = u != 0
    _close(r[nz], tau[nz] * torch.sign(u[nz]))
    assert bool((r[~nz].abs() <= tau[~nz]).all()) and 0 < int(nz.sum()) < 1000
    _close(inner.L1(0.5)(v, 0.2), inner.soft_threshold(v, 0.1))
    assert float(inner.L1(0.5).value({"a": _t(1.0, -2.0), "b": _t(3.0)})) == 3.0


@pytest.mark.parametrize("cls", [inner.ISTA, inner.FISTA])
def test_proximal_dynamics_reach_the_lasso_kkt_point(cls):
    A, b, L = _lasso()
    lam = 2.0  # 9 of 30 coefficients nonzero; once the support is found both converge linearly
    y = _run(cls(lr=1 / L, prox=inner.L1(lam)), A, b, 2000)[-1]
    grad = A.T @ (A @ y - b)
    on = y != 0
    # KKT: ∇g = −λ sign(y) on the support, |∇g| ≤ λ off it
    _close(grad[on], -lam * torch.sign(y[on]), rtol=0, atol=1e-9)
    assert float(grad[~on].abs().max()) <= lam + 1e-9
    assert 0 < int(on.sum()) < A.shape[0]


def test_fista_rate_beats_ista_and_both_meet_beck_teboulle_bounds():
    """Beck & Teboulle 2009, Thm 3.1 / 4.4: F(y_k) − F* ≤ L‖y0 − y*‖²/(2k) (ISTA) and
    ≤ 2L‖y0 − y*‖²/(k + 1)² (FISTA); F* from a long FISTA run."""
    A, b, L = _lasso(seed=3)
    lam = 0.1
    F = lambda y: 0.5 * float((A @ y - b).pow(2).sum()) + lam * float(y.abs().sum())  # noqa: E731
    prox = inner.L1(lam)
    y_star = _run(inner.FISTA(lr=1 / L, prox=prox), A, b, 2000)[-1]  # gap < 1e-9
    F_star, R2 = F(y_star), float(y_star.pow(2).sum())
    ista = [F(y) - F_star for y in _run(inner.ISTA(lr=1 / L, prox=prox), A, b, 200)]
    fista = [F(y) - F_star for y in _run(inner.FISTA(lr=1 / L, prox=prox), A, b, 200)]
    for k in range(1, 201):
        assert ista[k - 1] <= L * R2 / (2 * k) + 1e-12
        assert fista[k - 1] <= 2 * L * R2 / (k + 1) ** 2 + 1e-12
    assert fista[199] < 0.1 * ista[199]  # 200 steps: measured ratio 0.03


@pytest.mark.parametrize("cls", [inner.ISTA, inner.FISTA])
def test_reverse_and_forward_through_prox_dynamics_match_finite_differences(cls):
    """x = (shift of b, log λ): the derivative flows through the gradient step and the threshold."""
    A, b, L = _lasso(n=8, d=12, seed=5)
    t = torch.linspace(-1, 1, 12, dtype=F64)
    prob = bl.Problem(upper=lambda x, y: 0.5 * (y - t).pow(2).sum(),
                      lower=lambda x, y: 0.5 * (A @ y - b - x[0]).pow(2).sum())
    dyn = cls(lr=1 / L, steps=60, prox=inner.L1(lambda x: 0.2 * x[1].exp()))
    x = _t(0.3, 0.0)
    y0 = torch.zeros(12, dtype=F64)
    g_rev = bl.hypergrad.Reverse(dyn)(prob, x, y0).grad
    g_fwd = bl.hypergrad.Forward(dyn)(prob, x, y0).grad
    g_ckp = bl.hypergrad.Reverse(dyn, checkpoint=True)(prob, x, y0).grad

    def h(xv):
        bound = dyn.bind(xv)
        y = _run_bound(bound, A, b + xv[0], 60)
        return 0.5 * float((y - t).pow(2).sum())

    eps = 1e-6
    fd = torch.stack([torch.tensor((h(x + eps * e) - h(x - eps * e)) / (2 * eps), dtype=F64)
                      for e in torch.eye(2, dtype=F64)])
    _close(g_rev, fd, rtol=1e-6, atol=1e-8)
    _close(g_fwd, g_rev, rtol=1e-10, atol=1e-12)
    _close(g_ckp, g_rev, rtol=1e-10, atol=1e-12)
    assert float(g_rev.abs().min()) > 1e-3  # both components really depend on x


def _run_bound(dyn, A, b, steps):
    return _run(dyn, A, b, steps)[-1]


def test_proximal_dynamics_validate_their_prox():
    with pytest.raises(TypeError):
        inner.ISTA(lr=0.1)  # prox is required
    with pytest.raises(bl.errors.ConfigError, match="needs prox"):
        inner.FISTA(lr=0.1, prox=None)
    with pytest.raises(bl.errors.ConfigError, match=r"\(v, step\)"):
        inner.ISTA(lr=0.1, prox=lambda v: v)
    with pytest.raises(ValueError, match="lam"):
        inner.L1(-1.0)
    dyn = inner.ISTA(lr=0.1, prox=lambda v, step, x: inner.soft_threshold(v, step * x))
    assert dyn.depends_on_x
    with pytest.raises(bl.errors.ConfigError, match="bind"):
        dyn.update((_t(1.0),), (_t(0.0),), 0)
    s = dyn.bind(_t(2.0)).update((_t(1.0, -0.1),), (_t(0.0, 0.0),), 0)  # threshold 0.1 · 2
    _close(s[0], _t(0.8, 0.0))
    with pytest.raises(bl.errors.ConfigError, match="non-smooth"):  # implicit: would ignore h
        bl.hypergrad.CG(inner.FISTA(lr=0.1, prox=inner.L1(0.1)))
    # the projection applies after the prox
    s = inner.with_projection(inner.ISTA(lr=1.0, prox=inner.L1(0.5)), lambda v: v.clamp(max=1.0))
    _close(s.update((_t(3.0, -2.0),), (_t(0.0, 0.0),), 0)[0], _t(1.0, -1.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unroll_does_not_call_a_large_finite_half_precision_iterate_non_finite(dtype):
    """GD toward c = 100 in 16-bit floats: the iterates (1000 entries ≈ 100) sum to ~1e5, past
    float16's largest value; the finiteness summary accumulates in float32, so no false
    NonFiniteError — and a NaN is still reported at its step."""
    c = torch.full((1000,), 100.0, dtype=dtype)
    dyn = inner.GD(lr=0.5)
    state, _ = inner.unroll(dyn, lambda ys, k: (ys[0] - c,), dyn.init((torch.zeros_like(c),)), 6)
    assert torch.isfinite(state[0]).all() and float(state[0].float().mean()) > 95.0

    def grad_fn(ys, k):
        return ((ys[0] - c) * float("nan"),) if k == 3 else (ys[0] - c,)

    with pytest.raises(bl.NonFiniteError) as e:
        inner.unroll(dyn, grad_fn, dyn.init((torch.zeros_like(c),)), 6)
    assert e.value.step == 4


@pytest.mark.parametrize("make", [lambda: bl.inner.GD(lr=0.3, steps=7),
                                  lambda: bl.inner.Nesterov(lr=0.2, steps=7,
                                                            projection=lambda t: t.clamp(-2, 2)),
                                  lambda: bl.inner.Adam(lr=0.1, steps=7)], ids=["gd", "fista-box", "adam"])
@pytest.mark.parametrize("n", [0, 3, 7])
def test_stopped_dynamics_equal_the_truncated_run_and_its_derivative(make, n):
    """Stopped(dyn, n) over all K steps (n a 0-dim tensor, as inside a compiled graph) holds the state
    after step n: its iterate and the derivative of f(y_K) in (x, y0) are those of dyn run for n
    steps (an int n takes the same path without masks)."""
    A = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 1.5]], dtype=torch.float64)

    def grad(x, y):
        return A @ y - torch.tanh(x) + 0.1 * y**3

    def run(dyn, x, y0):
        state = dyn.init((y0,))
        for k in range(dyn.steps):
            state = dyn.update(state, (grad(x, dyn.point(state)[0]),), k)
        return dyn.output(state)[0]

    x = torch.tensor([0.4, -1.1, 0.7], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.5, -0.5, 0.2], dtype=torch.float64, requires_grad=True)
    ref_dyn = make()
    ref_dyn.steps = n
    ref = run(ref_dyn, x, y0)
    gref = torch.autograd.grad((ref**2).sum() + ref[0], (x, y0), allow_unused=True)
    for stop in (torch.tensor(n), n):
        out = run(bl.inner.Stopped(make(), stop), x, y0)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        if n == 0:
            continue
        g = torch.autograd.grad((out**2).sum() + out[0], (x, y0))
        for a, b in zip(g, gref):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
