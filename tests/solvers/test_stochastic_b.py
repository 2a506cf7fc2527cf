"""STABLE, MSTSA, SUSTAIN, MRBO, VRBO, F2SA, BOME, PZOBO and MRBO-ZO on the exact stochastic quadratic.

* Convergence: from x0 = 0, a fixed budget and seed must bring ‖∇h(x_K)‖ (exact closed form) below
  ``TOL`` · ‖∇h(x0)‖. The problem (κ = 1.5, batch 32, unit-variance per-sample noise) is chosen so
  that the Neumann truncation bias (1 − ημ)^{Q+1} ≤ 0.13 and the noise floor of the step sizes are
  both a few percent: every solver lands at 1.5–4.5 % with these seeds, TOL = 8 % leaves a 2×
  margin, and the fixed point of the same dynamics *without* the implicit term sits at ≥ 30 %
  (checked below), so a solver that drops or mis-signs the implicit term fails.
* MRBO's STORM and VRBO's SPIDER recursions are recomputed from their definitions with dense
  float64 second derivatives (``torch.autograd.functional``, not the package's oracles) on the
  batches the solver actually drew.
* Oracle counts of MRBO and VRBO on a tiny problem equal the per-iteration formulas of their
  docstrings.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

import bilevel as bl
from bilevel.estimates import Schedule
from bilevel.problems import stochastic_quadratic
from bilevel.sampling import Sampler

S = bl.solvers
TOL = 0.08
STEPS = 200


@pytest.fixture(scope="module")
def quad():
    return stochastic_quadratic(dim_x=5, dim_y=10, kappa=1.5, n_lower=512, n_upper=512, batch_size=32, seed=0)


CONFIGS = {
    "MRBO": lambda: S.MRBO(lr_x=Schedule(0.1, 1 / 3), lr_y=Schedule(0.5, 1 / 3), eta=0.6, Q=3),
    "SUSTAIN": lambda: S.SUSTAIN(lr_x=Schedule(0.1, 1 / 3), lr_y=Schedule(0.5, 1 / 3), eta=0.6, Q=5),
    "MSTSA": lambda: S.MSTSA(lr_x=Schedule(0.1, 0.5), lr_y=Schedule(0.5, 0.5), eta=0.6, Q=5),
    "VRBO": lambda: S.VRBO(lr_x=0.05, lr_y=0.5, eta=0.6, Q=3, inner_steps=2, period=10),
    "STABLE": lambda: S.STABLE(lr_x=0.05, lr_y=0.5, eta=0.6, Q=3),
    "STABLE-dense": lambda: S.STABLE(lr_x=0.05, lr_y=0.5, hessian="dense"),
    "F2SA": lambda: S.F2SA(lr_x=0.05, lr_y=0.5, inner_steps=3, delta_lmbda=0.1),
    "BOME": lambda: S.BOME(lr_x=0.05, lr_y=0.3, inner_lr=0.5, inner_steps=5, eta=1.0),
    "PZOBO": lambda: S.PZOBO(lr_x=0.05, lr_y=0.5, inner_steps=3, samples=5),
    "MRBO-ZO": lambda: S.MRBOZO(lr_x=Schedule(0.1, 1 / 3), lr_y=Schedule(0.5, 1 / 3), inner_steps=3,
                                inner_lr=0.5, samples=5),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converges_on_stochastic_quadratic(quad, name):
    g0 = quad.grad_norm(quad.x0)
    res = bl.solve(**quad.solve_kwargs(seed=1), solver=CONFIGS[name](), steps=STEPS, track=False)
    gK = quad.grad_norm(res.x)
    assert math.isfinite(gK)
    assert gK <= TOL * g0, f"{name}: ‖∇h(x_K)‖ = {gK:.3g} > {TOL} · ‖∇h(x0)‖ = {TOL * g0:.3g}"


def test_tolerance_rejects_dropping_the_implicit_term(quad):
    """Without the implicit term the dynamics settle where ∇_x f(x, y*(x)) = ρ(x − ē) = 0."""
    e = quad.info["e"]
    assert quad.grad_norm(e) > 3 * TOL * quad.grad_norm(quad.x0)


# --- recursions against their definitions -------------------------------------------------------


class Recording(Sampler):
    """Wraps a sampler and records every batch it hands out."""

    def __init__(self, inner: Sampler):
        self.inner, self.drawn = inner, []
        self.n, self.batch_size = inner.n, inner.batch_size

    def next(self):
        b = self.inner.next()
        self.drawn.append(b)
        return b

    def full(self):
        return self.inner.full()


class Dense:
    """float64 reference derivatives of the quadratic by torch.autograd.functional (no oracles)."""

    def __init__(self, p):
        self.f, self.g = p.problem.f, p.problem.g

    def gy(self, x, y, b):
        return jacobian(lambda y_: self.g(x, y_, b), y)

    def gx_f(self, x, y, b):
        return jacobian(lambda x_: self.f(x_, y, b), x), jacobian(lambda y_: self.f(x, y_, b), y)

    def H(self, x, y, b):
        return hessian(lambda y_: self.g(x, y_, b), y)

    def Jxy(self, x, y, b):
        """∇²_xy g as a (dim x × dim y) matrix."""
        return jacobian(lambda x_: jacobian(lambda y_: self.g(x_, y_, b), y, create_graph=True), x).T

    def neumann_hg(self, x, y, bF, bG, bHs, eta):
        """∇_x F − ∇²_xy G(B_G) η Σ_{q=0}^{Q} (I − ηH_Q)···(I − ηH_{Q−q+1}) ∇_y F  (explicit sum)."""
        fx, fy = self.gx_f(x, y, bF)
        n = y.numel()
        P, total = torch.eye(n, dtype=y.dtype), torch.eye(n, dtype=y.dtype)
        Hs = [self.H(x, y, b) for b in bHs]  # H_1..H_Q in draw order
        for q in range(1, len(Hs) + 1):
            P = P @ (torch.eye(n, dtype=y.dtype) - eta * Hs[len(Hs) - q])
            total = total + P
        return fx - self.Jxy(x, y, bG) @ (eta * total @ fy)


def _snapshot(state):
    return {k: v for k, v in state.items()}


def test_mrbo_storm_recursion_matches_definition(quad):
    Q, eta = 3, 0.6
    lo, up = quad.samplers(seed=3)
    lo, up = Recording(lo), Recording(up)
    solver = S.MRBO(lr_x=Schedule(0.1, 1 / 3), lr_y=Schedule(0.5, 1 / 3), momentum_x=Schedule(0.7, 2 / 3),
                    momentum_y=Schedule(0.4, 2 / 3), eta=eta, Q=Q)
    kw = dict(problem=quad.problem, x0=quad.x0, y0=quad.y0, lower_data=lo, upper_data=up, track=False)
    res = bl.solve(**kw, solver=solver, steps=1)
    s1 = _snapshot(res.state)
    res = bl.solve(**kw, solver=solver, steps=2, state=res.state)
    s2 = res.state
    D = Dense(quad)
    per = Q + 2  # lower batches per step: B_y, B_G, B_1..B_Q
    x0, y0 = quad.x0, quad.y0
    x1, y1 = s1["x"][0], s1["y"][0]
    # step 0: plain estimates
    By, BG, BH = lo.drawn[0], lo.drawn[1], lo.drawn[2:per]
    torch.testing.assert_close(s1["u"][0], D.gy(x0, y0, By))
    torch.testing.assert_close(s1["v"][0], D.neumann_hg(x0, y0, up.drawn[0], BG, BH, eta))
    # step 1: STORM with the same samples at (x1, y1) and (x0, y0)
    By, BG, BH, BF = lo.drawn[per], lo.drawn[per + 1], lo.drawn[per + 2:2 * per], up.drawn[1]
    a, b = min(1.0, 0.7 / 2 ** (2 / 3)), min(1.0, 0.4 / 2 ** (2 / 3))
    u1 = D.gy(x1, y1, By) + (1 - b) * (s1["u"][0] - D.gy(x0, y0, By))
    v1 = D.neumann_hg(x1, y1, BF, BG, BH, eta)
    v1 = v1 + (1 - a) * (s1["v"][0] - D.neumann_hg(x0, y0, BF, BG, BH, eta))
    torch.testing.assert_close(s2["u"][0], u1)
    torch.testing.assert_close(s2["v"][0], v1)
    torch.testing.assert_close(s2["x"][0], x1 - 0.1 / 2 ** (1 / 3) * v1)
    torch.testing.assert_close(s2["y"][0], y1 - 0.5 / 2 ** (1 / 3) * u1)


def test_vrbo_spider_recursion_matches_definition(quad):
    Q, eta, m, alpha, beta = 2, 0.6, 2, 0.05, 0.5
    lo, up = quad.samplers(seed=4)
    lo, up = Recording(lo), Recording(up)
    solver = S.VRBO(lr_x=alpha, lr_y=beta, eta=eta, Q=Q, inner_steps=m, period=2)
    kw = dict(problem=quad.problem, x0=quad.x0, y0=quad.y0, lower_data=lo, upper_data=up, track=False)
    res = bl.solve(**kw, solver=solver, steps=2)
    D = Dense(quad)
    full_lo, full_up = quad.lower_tensors, quad.upper_tensors
    # reference run of Algorithm 2 from the definitions, on the recorded batches
    x, y = quad.x0, quad.y0
    u = D.gy(x, y, full_lo)
    v = D.neumann_hg(x, y, full_up, full_lo, [full_lo] * Q, eta)
    anchor = (x, y)
    li = ui = 0
    for _k in range(2):  # k = 0 resets (period 2), k = 1 carries (u, v) over
        x_new = x - alpha * v
        xp, yp = anchor
        yt = y
        for _t in range(m):
            BF = up.drawn[ui]
            ui += 1
            BG, BH, By = lo.drawn[li], lo.drawn[li + 1:li + 1 + Q], lo.drawn[li + 1 + Q]
            li += Q + 2
            v = v + D.neumann_hg(x_new, yt, BF, BG, BH, eta) - D.neumann_hg(xp, yp, BF, BG, BH, eta)
            u = u + D.gy(x_new, yt, By) - D.gy(xp, yp, By)
            xp, yp = x_new, yt
            yt = yt - beta * u
        x, y, anchor = x_new, yt, (xp, yp)
    assert li == len(lo.drawn) and ui == len(up.drawn)
    torch.testing.assert_close(res.state["v"][0], v)
    torch.testing.assert_close(res.state["u"][0], u)
    torch.testing.assert_close(res.x, x)
    torch.testing.assert_close(res.y, y)


# --- oracle-call accounting ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return stochastic_quadratic(dim_x=2, dim_y=3, n_lower=40, n_upper=24, batch_size=4, seed=1)


def test_mrbo_oracle_counts(tiny):
    Q, b, K = 3, 4, 5
    res = bl.solve(**tiny.solve_kwargs(seed=0), solver=S.MRBO(Q=Q), steps=K, track=False)
    hg_lower_grad, hg_hvp, hg_cross, hg_upper = (Q + 1) * b, Q * b, b, b  # one hypergradient
    n_hg, n_gy = 1 + 2 * (K - 1), 1 + 2 * (K - 1)  # step 0: one point; later: two points
    assert res.state["counts"].flat() == {
        "lower_grad": n_gy * b + n_hg * hg_lower_grad,
        "lower_hvp": n_hg * hg_hvp,
        "lower_cross": n_hg * hg_cross,
        "upper_grad": n_hg * hg_upper,
    }
    for rec, k in zip(res.history, range(1, K + 1)):  # cumulative counts in the history
        assert rec["lower_cross"] == (1 + 2 * (k - 1)) * b


def test_vrbo_oracle_counts(tiny):
    Q, b, m, K, q = 2, 4, 3, 5, 3
    n, nu = 40, 24  # full lower / upper data (the large batch S1)
    res = bl.solve(**tiny.solve_kwargs(seed=0), solver=S.VRBO(Q=Q, inner_steps=m, period=q), steps=K,
                   track=False)
    resets = len([k for k in range(K) if k % q == 0])
    inner = K * m  # each inner step: two hypergradients and two lower gradients on batches of b
    assert res.state["counts"].flat() == {
        "lower_grad": resets * (n + (Q + 1) * n) + inner * (2 * b + 2 * (Q + 1) * b),
        "lower_hvp": resets * Q * n + inner * 2 * Q * b,
        "lower_cross": resets * n + inner * 2 * b,
        "upper_grad": resets * nu + inner * 2 * b,
    }


def test_sampled_neumann_is_unbiased_for_truncated_series(tiny):
    """E_p[η Q Π_{i≤p}(I − ηH)] ∇_yF over p ∈ {0..Q−1} equals η Σ_{q<Q} (I − ηH)^q ∇_yF (full batch)."""
    from bilevel.estimates import neumann_hypergradient, sampled_neumann_hypergradient
    from bilevel.formulation import Bound

    Q, eta = 4, 0.5
    x = torch.randn(2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bd = Bound(tiny.problem, x, tiny.y0, upper_batch=tiny.upper_tensors, lower_batch=tiny.lower_tensors)
    avg = sum(sampled_neumann_hypergradient(bd.F, lambda: bd.G, bd.xs, bd.ys0, Q=Q, eta=eta, p=p)[0][0]
              for p in range(Q)) / Q
    ref, _ = neumann_hypergradient(bd.F, lambda: bd.G, bd.xs, bd.ys0, Q=Q - 1, eta=eta)
    torch.testing.assert_close(avg, ref[0])
    with pytest.raises(ValueError):
        sampled_neumann_hypergradient(bd.F, lambda: bd.G, bd.xs, bd.ys0, Q=Q, eta=eta, p=Q)


def test_stable_dense_rejects_large_lower_level(tiny, monkeypatch):
    from bilevel.errors import ConfigError
    from bilevel.solvers.stochastic import stable

    monkeypatch.setattr(stable, "MAX_DENSE_DIM", 2)  # tiny has dim y = 3
    with pytest.raises(ConfigError, match="neumann"):
        bl.solve(**tiny.solve_kwargs(), solver=S.STABLE(hessian="dense"), steps=1, track=False)
    with pytest.raises(ConfigError):
        S.STABLE(hessian="cholesky")


def test_cross_t_is_transpose_of_cross(tiny):
    """<J^T w, u> = <w, J u> for the double-backward product used by STABLE's correction."""
    from bilevel.formulation import Bound
    from bilevel.oracles import Linearization

    gen = torch.Generator().manual_seed(0)
    def rnd(n):
        return torch.randn(n, dtype=torch.float64, generator=gen)

    x, y = rnd(2), rnd(3)
    bd = Bound(tiny.problem, x, y, lower_batch=tiny.lower_tensors)
    lin = Linearization(bd.G, bd.xs, bd.ys0)
    u, w = rnd(2), rnd(3)
    Ju = lin.cross_t((u,))[0]
    torch.testing.assert_close(Ju, Dense(tiny).Jxy(x, y, tiny.lower_tensors).T @ u)
    torch.testing.assert_close(torch.dot(lin.cross((w,))[0], u), torch.dot(w, Ju))


# --- the two same-sample estimators of MRBO / VRBO, batched over the stacked points ----------------


def _unpaired(estimate, samples, p, q, *, out, batched=True):
    return estimate(*p, samples), estimate(*q, samples)


@pytest.mark.parametrize("name", ["MRBO", "VRBO", "SUSTAIN"])
def test_batched_same_sample_estimators_equal_two_evaluations(quad, name, monkeypatch):
    """MRBO's STORM and VRBO's SPIDER terms at the current and the previous point on the same
    samples run as ONE evaluation at the stacked point (estimates.at_two_points; SUSTAIN inherits
    MRBO's step): the trajectory (x, y, u, v) and the oracle counts equal those of two separate
    evaluations, bitwise."""
    import importlib

    from bilevel.estimates import at_two_points

    mod = importlib.import_module(f"bilevel.solvers.stochastic.{'vrbo' if name == 'VRBO' else 'mrbo'}")
    assert mod.at_two_points is at_two_points

    def run():
        return bl.solve(**quad.solve_kwargs(seed=5), solver=CONFIGS[name](), steps=4, track=False)

    batched = run()
    monkeypatch.setattr(mod, "at_two_points", _unpaired)
    plain = run()
    for key in ("x", "y", "u", "v"):
        assert torch.equal(batched.state[key][0], plain.state[key][0]), key
    assert batched.state["counts"].flat() == plain.state["counts"].flat()


def test_at_two_points_on_a_two_leaf_variable():
    """Stacking with several leaves per variable: the split returns each point's leaves; the
    hypergradient (x-space) and the lower gradient (y-space) equal their two evaluations."""
    from bilevel import oracles as O
    from bilevel.estimates import at_two_points, neumann_hypergradient, replay

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    H = A @ A.T / 6 + torch.eye(6, dtype=torch.float64)

    def g(xs, ys):  # y = (a (2,), b (4,)), x = (c (3,), d (1,))
        y = torch.cat([ys[0], ys[1]])
        return 0.5 * y @ H @ y - y[:3] @ xs[0] * xs[1].sum() + (xs[0] ** 2).sum() * y[3:].sum()

    def f(xs, ys):
        return (ys[0] ** 2).sum() + (ys[1] * xs[1]).sum() + (xs[0] ** 3).sum()

    def pt(seed):
        r = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=r, dtype=torch.float64)  # noqa: E731
        return (rnd(3), rnd(1)), (rnd(2), rnd(4))

    p, q = pt(1), pt(2)

    def hg(xs, ys, samples):
        F, Gs = samples
        return neumann_hypergradient(F, replay(Gs[1:]), xs, ys, Q=3, eta=0.2, G_cross=Gs[0])[0]

    samples = (f, [g] * 4)
    for est, s, out in ((hg, samples, "x"), (lambda a, b, G: O.grad_y(G, a, b), g, "y")):
        got = at_two_points(est, s, p, q, out=out)
        want = (est(*p, s), est(*q, s))
        for a, b in zip(got, want):
            assert len(a) == len(b) == 2
            for u, w in zip(a, b):
                assert torch.equal(u, w)
    with pytest.raises(ValueError, match="out"):
        at_two_points(hg, samples, p, q, out="z")
