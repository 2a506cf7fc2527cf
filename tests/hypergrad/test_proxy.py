"""Proxy (best-response) estimators (issue 13.10): Hypernetwork (global fitting), STN (local
fitting) and EvoGrad, against closed-form ridge references.

* prior-mean ridge: y*(x) = A⁻¹(Xᵀt/n + ρx) is affine, so a globally fitted linear hypernetwork
  is exact — its Jacobian U → ρA⁻¹ and its hypergradient → the exact one as fitting steps grow;
* per-feature weight-decay ridge (tests/reference_problems.ridge, hand-derived): y*(x) is
  nonlinear; STN's local linear fit around x gives cos ≥ 0.99 to the exact hypergradient;
* EvoGrad at y = y*(x): for K → ∞ the estimate tends to the damped implicit hypergradient with
  λ = τ/σ² (derivation in hypergrad/evograd.py), checked against ``Exact(None, damping=λ)``
  with a Monte-Carlo error that shrinks like 1/√K; cos to the exact hypergradient ≥ 0.9 there;
* states round-trip through torch.save and a resumed sequence of calls is bit-identical.
"""

from __future__ import annotations

import io

import pytest
import torch

import bilevel as bl
from bilevel.errors import ConfigError
from bilevel.hypergrad import STN, EvoGrad, Exact, Hypernetwork
from bilevel.hypergrad.proxy import units

from ..reference_problems import rel_err, ridge

F64 = torch.float64


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def prior_ridge():
    """Ridge towards a prior mean x, with its closed forms written out here (not the builder's)."""
    gen = torch.Generator().manual_seed(5)
    n, m, d, rho = 30, 40, 6, 0.7
    X, Xv = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(m, d, generator=gen, dtype=F64)
    w = torch.randn(d, generator=gen, dtype=F64)
    t = X @ w + 0.3 * torch.randn(n, generator=gen, dtype=F64)
    tv = Xv @ w + 0.3 * torch.randn(m, generator=gen, dtype=F64)
    A = X.T @ X / n + rho * torch.eye(d, dtype=F64)

    def f(x, y):
        return 0.5 * ((Xv @ y - tv) ** 2).mean()

    def g(x, y):
        return 0.5 * ((X @ y - t) ** 2).mean() + 0.5 * rho * ((y - x) ** 2).sum()

    x = 0.5 * torch.randn(d, generator=gen, dtype=F64)
    ystar = torch.linalg.solve(A, X.T @ t / n + rho * x)
    J = rho * torch.linalg.inv(A)                          # dy*/dx
    hg = J.T @ (Xv.T @ (Xv @ ystar - tv) / m)
    return bl.Problem(f, g), x, ystar, J, hg


def test_global_linear_hypernetwork_is_exact_for_an_affine_best_response():
    problem, x, ystar, J, hg = prior_ridge()
    errs = []
    for warmup in (40, 300):
        est = Hypernetwork("linear", "global", radius=1.0, samples=4, warmup=warmup, steps=0, lr=0.03)
        res = est(problem, x, torch.zeros_like(x))
        U = res.state["phi"][1]
        errs.append((rel_err(U, J), rel_err(res.y, ystar), rel_err(res.grad, hg)))
    (uj0, y0, g0), (uj1, y1, g1) = errs
    assert uj1 < 0.1 * uj0 and g1 < 0.1 * g0           # the error shrinks with fitting steps
    assert uj1 < 5e-3 and y1 < 5e-3 and g1 < 5e-3
    assert cos(res.grad, hg) > 0.9999
    assert res.info["fit_steps_total"] == 300 and res.info["proxy_grad_norm"] < 1e-2


def test_stn_local_fit_approaches_the_nonlinear_best_response_near_x():
    rp = ridge()
    X, t, _, _ = _ridge_data()
    A = X.T @ X / X.shape[0] + torch.diag(torch.exp(rp.x))
    Jstar = -torch.linalg.solve(A, torch.diag(torch.exp(rp.x) * rp.y_star))  # dy*/dx by hand
    out = []
    for warmup in (3, 150):
        est = STN(radius=0.05, samples=8, steps=0, warmup=warmup, lr=0.02)
        res = est(rp.problem, rp.x, rp.y_star)  # a starts at y*(x): U has to be learned
        out.append((rel_err(res.state["phi"][1], Jstar), rel_err(res.y, rp.y_star), res.grad))
    (j0, _, g0), (j1, y1, g1) = out
    assert j1 < 0.5 * j0 and j1 < 0.15            # the local linear fit's Jacobian → dy*/dx
    assert y1 < 5e-3
    assert rel_err(g1, rp.hypergrad) < 0.5 * rel_err(g0, rp.hypergrad)
    assert rel_err(g1, rp.hypergrad) < 0.05 and cos(g1, rp.hypergrad) > 0.99


def test_structured_stn_fits_per_unit_hyperparameters_with_fewer_parameters():
    """Multi-output ridge, one weight decay e^{x_i} per output unit (row W_i of W): row i of
    W*(x) depends on x_i only, dW_i/dx_i = −e^{x_i}(G + e^{x_i}I)⁻¹W*_i — exactly STN's per-unit
    structure a + b ⊙ E V(x − c) to first order. Closed forms written out here."""
    gen = torch.Generator().manual_seed(7)
    n, m, d, k = 30, 40, 4, 3
    X, Xv = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(m, d, generator=gen, dtype=F64)
    Wt = torch.randn(k, d, generator=gen, dtype=F64)
    T = X @ Wt.T + 0.3 * torch.randn(n, k, generator=gen, dtype=F64)
    Tv = Xv @ Wt.T + 0.3 * torch.randn(m, k, generator=gen, dtype=F64)
    G, eye = X.T @ X / n, torch.eye(d, dtype=F64)

    def f(x, W):
        return 0.5 * ((Xv @ W.T - Tv) ** 2).mean(0).sum()

    def g(x, W):
        return 0.5 * ((X @ W.T - T) ** 2).mean(0).sum() + 0.5 * (torch.exp(x)[:, None] * W**2).sum()

    x = 0.3 * torch.randn(k, generator=gen, dtype=F64)
    A = [G + torch.exp(x[i]) * eye for i in range(k)]
    Ws = torch.stack([torch.linalg.solve(A[i], X.T @ T[:, i] / n) for i in range(k)])
    fW = (Xv @ Ws.T - Tv).T @ Xv / m
    hg = torch.stack([-torch.exp(x[i]) * fW[i] @ torch.linalg.solve(A[i], Ws[i]) for i in range(k)])
    res = STN("structured", radius=0.05, samples=8, steps=0, warmup=150, lr=0.02)(bl.Problem(f, g), x, Ws)
    a, b, V = res.state["phi"]
    # 2kd + k² = 33 parameters (the linear proxy: kd + kd·k = 48)
    assert V.shape == (k, k) and a.numel() == b.numel() == k * d
    assert rel_err(res.grad, hg) < 0.05 and cos(res.grad, hg) > 0.999
    assert rel_err(res.y, Ws) < 5e-3
    leaves = (torch.zeros(3, 4), torch.zeros(3), torch.zeros(()))
    assert units(leaves).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3, 4, 5, 6]


def _ridge_data():
    from ..reference_problems import ridge_data

    X, t, Xv, tv, _ = ridge_data(0)
    return X, t, Xv, tv


def test_evograd_converges_to_the_damped_implicit_hypergradient_as_K_grows():
    rp = ridge()
    sigma, lam = 0.1, 1.0
    tau = lam * sigma**2
    damped = Exact(None, damping=lam)(rp.problem, rp.x, rp.y_star).grad
    errs = []
    for K in (300, 3000, 30000):
        res = EvoGrad(None, samples=K, sigma=sigma, tau=tau, seed=1)(rp.problem, rp.x, rp.y_star)
        errs.append(rel_err(res.grad, damped))
    assert errs[2] < errs[1] < errs[0]                  # Monte-Carlo error ~ 1/√K
    assert errs[2] < 0.08 and errs[0] > 0.1
    assert cos(res.grad, rp.hypergrad) > 0.98            # λ = 1 ~ λ_min(H) = 0.68: cos(damped, exact) 0.994
    assert res.info["ess"] > 100


def test_evograd_away_from_the_minimiser_converges_to_the_damped_hypergradient_at_a_proximal_step():
    """g quadratic in y with ∇_x g affine in y (prior-mean ridge): the K → ∞ limit holds at any y
    and σ — ∇_x f(x, y') − ∇²_xy g (H + λI)⁻¹ ∇_y f(x, y'), y' = y − (H + λI)⁻¹ ∇_y g(x, y)."""
    problem, x, ystar, _, _ = prior_ridge()
    y = ystar + 0.2 * torch.randn(ystar.numel(), generator=torch.Generator().manual_seed(0), dtype=F64)
    sigma, lam = 0.3, 1.0
    H = torch.autograd.functional.hessian(lambda w: problem.lower(x, w), y)
    yr = y.clone().requires_grad_(True)
    gy = torch.autograd.grad(problem.lower(x, yr), yr)[0]
    yprox = y - torch.linalg.solve(H + lam * torch.eye(y.numel(), dtype=F64), gy)
    ref = Exact(None, damping=lam)(problem, x, yprox).grad
    evo = lambda K: EvoGrad(None, samples=K, sigma=sigma, tau=lam * sigma**2, seed=2)  # noqa: E731
    errs = [rel_err(evo(K)(problem, x, y).grad, ref) for K in (1000, 20000)]
    assert errs[1] < 0.5 * errs[0] and errs[1] < 0.08


def test_evograd_batched_equals_loop_and_small_tau_approaches_the_exact_hypergradient():
    rp = ridge()
    kw = {"samples": 64, "sigma": 0.05, "tau": 0.05 * 0.05**2, "seed": 3}
    a = EvoGrad(None, **kw)(rp.problem, rp.x, rp.y_star)
    b = EvoGrad(None, batched=False, **kw)(rp.problem, rp.x, rp.y_star)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    # the K → ∞ limit itself: cos(damped(λ), exact) → 1 as λ = τ/σ² → 0 (what EvoGrad approaches)
    c = [cos(Exact(None, damping=lam)(rp.problem, rp.x, rp.y_star).grad, rp.hypergrad)
         for lam in (3.0, 0.3, 0.03)]
    assert c[0] < c[1] < c[2] and c[2] > 0.9999
    # a 1-copy average is constant in x; K = 2 (the cheapest) still runs, first order only
    with bl.oracles.counting() as cnt:
        EvoGrad(bl.inner.GD(lr=0.3, steps=3), samples=2)(rp.problem, rp.x, rp.y0)
    assert cnt["lower"].get("hvp", 0) == 0 and cnt["lower"].get("cross", 0) == 0


@pytest.mark.parametrize("make", [
    lambda: Hypernetwork("mlp", "global", box=(-1.0, 1.0), samples=3, steps=2, warmup=3, hidden=4),
    lambda: STN(samples=3, steps=2),
    lambda: STN("structured", samples=3, steps=2, batched=False),
    lambda: EvoGrad(bl.inner.GD(lr=0.3, steps=2), samples=5, sigma=0.1, tau=0.01),
])
def test_state_round_trips_and_a_resumed_run_is_exact(make):
    rp = ridge()
    est = make()
    x = rp.x

    def call(state, x):
        res = est(rp.problem, x, rp.y0, state=state)
        return res, x - 0.5 * res.grad

    s, xx, grads = est.init(rp.problem, x, rp.y0), x, []
    for _ in range(4):
        res, xx = call(s, xx)
        grads.append(res.grad)
        s = res.state
    # resume after two calls from a torch.save'd state
    s, xx = est.init(rp.problem, x, rp.y0), x
    for _ in range(2):
        res, xx = call(s, xx)
        s = res.state
    buf = io.BytesIO()
    torch.save({"state": s, "x": xx}, buf)
    buf.seek(0)
    blob = torch.load(buf, weights_only=False)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in blob["state"].items()}
    s, xx = blob["state"], blob["x"]
    for k in range(2, 4):
        res, xx = call(s, xx)
        assert torch.equal(res.grad, grads[k])
        s = res.state
    for k, v in before.items():  # the state passed in is not mutated
        got = blob["state"][k]
        assert (torch.equal(got, v) if isinstance(v, torch.Tensor) else
                all(torch.equal(p, q) for p, q in zip(got, v)) if isinstance(v, tuple) else got == v)


def test_bad_settings_are_rejected():
    for kw, msg in [({"arch": "conv"}, "arch"), ({"fit": "both"}, "fit"), ({"hidden": 4}, "hidden"),
                    ({"fit": "local", "box": (0, 1)}, "box"), ({"box": (0, 1), "radius": 0.1}, "either"),
                    ({"box": (1, 0)}, "low < high"), ({"radius": 0.0}, "radius"), ({"samples": 0}, "samples"),
                    ({"steps": 0, "warmup": 0}, "never"), ({"lr": 0.0}, "lr")]:
        with pytest.raises(ConfigError, match=msg):
            Hypernetwork(**kw)
    with pytest.raises(ConfigError, match="locally"):
        STN(fit="global")
    for kw, msg in [({"samples": 1}, "samples >= 2"), ({"sigma": 0.0}, "sigma"), ({"tau": -1.0}, "tau"),
                    ({"chunk": 0}, "chunk"), ({"chunk": 4, "batched": False}, "chunk")]:
        with pytest.raises(ConfigError, match=msg):
            EvoGrad(None, **kw)
    rp = ridge()
    other = bl.Problem(rp.problem.upper, rp.problem.lower)
    state = STN().init(other, rp.x[:4], rp.y0[:4])
    with pytest.raises(ConfigError, match="state was made for"):
        STN()(rp.problem, rp.x, rp.y0, state=state)
    with pytest.raises(ConfigError, match="box bounds"):
        Hypernetwork(box=(torch.zeros(3), 1.0)).init(rp.problem, rp.x, rp.y0)
    with pytest.raises(ConfigError, match="lacks"):
        EvoGrad(None)(rp.problem, rp.x, rp.y0, state={})


def test_under_hypergrad_vmap_equal_to_the_loop_over_tasks():
    """3 ridge tasks sharing x; EvoGrad from the default state, STN (structured) from per-task
    initial states (vmap's default initial state is task 0's, so a = task 0's y0), two calls."""
    gen = torch.Generator().manual_seed(11)
    B, N, D = 3, 8, 4
    X, t = torch.randn(B, N, D, generator=gen, dtype=F64), torch.randn(B, N, generator=gen, dtype=F64)
    Xv, tv = torch.randn(B, N, D, generator=gen, dtype=F64), torch.randn(B, N, generator=gen, dtype=F64)
    x, y = 0.3 * torch.randn(D, generator=gen, dtype=F64), 0.1 * torch.randn(B, D, generator=gen, dtype=F64)

    def f(x, y, batch):
        return 0.5 * ((batch[0] @ y - batch[1]) ** 2).mean()

    def g(x, y, batch):
        return 0.5 * ((batch[0] @ y - batch[1]) ** 2).mean() + 0.5 * (torch.exp(x) * y**2).sum()

    problem = bl.Problem(f, g)
    task = lambda i: {"upper_batch": (Xv[i], tv[i]), "lower_batch": (X[i], t[i])}  # noqa: E731
    for est, per_task in [(EvoGrad(bl.inner.GD(lr=0.3, steps=4), samples=6, sigma=0.1, tau=0.01), False),
                          (STN("structured", samples=3, steps=2), True)]:
        states = [est.init(problem, x, y[i], **task(i)) for i in range(B)]
        stacked = None
        if per_task:
            stacked = {k: (tuple(torch.stack(p) for p in zip(*[s[k] for s in states])) if isinstance(v, tuple)
                           else v if k in est.shared_state or not isinstance(v, torch.Tensor)
                           else torch.stack([s[k] for s in states])) for k, v in states[0].items()}
        res = bl.hypergrad.vmap(est, problem, x, y, upper_batch=(Xv, tv), lower_batch=(X, t), state=stacked)
        loop = [est(problem, x, y[i], state=states[i], **task(i)) for i in range(B)]
        torch.testing.assert_close(res.grad, torch.stack([r.grad for r in loop]), rtol=1e-10, atol=1e-12)
        res2 = bl.hypergrad.vmap(est, problem, x, res.y, upper_batch=(Xv, tv), lower_batch=(X, t),
                                 state=res.state)
        loop2 = [est(problem, x, loop[i].y, state=loop[i].state, **task(i)) for i in range(B)]
        torch.testing.assert_close(res2.grad, torch.stack([r.grad for r in loop2]), rtol=1e-10, atol=1e-12)
