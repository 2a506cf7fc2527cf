"""Alternating SGD, BSA, TTSA, stocBiO, AmIGO, SOBA, SABA, MA-SOBA, SRBA and FSLA.

1. Every solver against a re-implementation of its update rules (the module docstring's
   equations) with dense closed-form oracles of the stochastic quadratic (A_b = Q diag(λ ⊙ s̄_b) Qᵀ,
   ∇²_xy g_b = −B̄_bᵀ, ...; no autograd) on the same batches: iterates agree to 1e-10 after a few
   steps. This checks the SAGA memories of SABA, the SARAH recursion and full-batch restarts of
   SRBA, the STORM correction of FSLA, the moving average of MA-SOBA and the batch usage of all.
2. Convergence on the stochastic quadratic (h strongly convex, exact ∇h), constant steps, fixed
   budget and seeds. For SGD with step α on a μ_h-strongly convex, L_h-smooth quadratic whose
   gradient noise has variance σ², the stationary error is E‖x − x*‖² ≈ ασ²/(2μ_h), so
   ‖∇h‖ ≲ L_h √(ασ²/(2μ_h)) ("floor"). σ² is computed exactly from the data at the solution:
   the variance of the batch estimate ∇_x F_j − ∇²_xy G_i v* (plus, for BSA/TTSA, the variance
   over the random truncation p of the Neumann estimate). Neumann-based solvers converge to a point
   where ∇h equals the truncation bias B̄ᵀ A⁻¹ (I − ηA)^{Q(+1)} ∇_y f, computed exactly at x*.
   Tolerance = 2 (floor + bias): the factor 2 covers the extra lower-level/linear-system noise of
   bilevel estimators (measured ratios to floor + bias: 0.16–1.31 on 4 seeds). Every tolerance is
   below half of ‖∇h‖ at the fixed point of the same dynamics without the implicit term, so a
   solver that drops or mis-signs it fails.
   SABA and SRBA are variance reduced on finite sums: with constant steps they converge linearly
   to x* itself, so their tolerance is 1e-6 (float64).
3. Oracle counts per iteration of SOBA, stocBiO, SABA and SRBA equal their docstring formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel._rng import index
from bilevel.errors import ConfigError
from bilevel.problems import stochastic_quadratic

S = bl.solvers
F64 = torch.float64
B = 16  # batch size


@pytest.fixture(scope="module")
def quad():
    return stochastic_quadratic(dim_x=5, dim_y=10, n_lower=256, n_upper=256, kappa=2.0, L=1.0, noise=0.3,
                                hessian_noise=0.3, rho=0.5, coupling=0.3, batch_size=B, seed=0)


# --- dense closed-form oracles of the quadratic ---------------------------------------------------
class Dense:
    def __init__(self, p):
        self.p, self.Q, self.lam, self.rho = p, p.info["eigvecs"], p.info["eigvals"], p.info["rho"]

    def A(self, b):
        return self.Q @ torch.diag(self.lam * b[0].mean(0)) @ self.Q.T

    def gy(self, b, x, y):
        return self.A(b) @ y - (b[1].mean(0) @ x + b[2].mean(0))

    def hv(self, b, v):
        return self.A(b) @ v

    def jv(self, b, v):  # ∇²_xy g_b · v
        return -b[1].mean(0).T @ v

    def gyF(self, ub, y):
        return y - ub[0].mean(0)

    def gxF(self, ub, x):
        return self.rho * (x - ub[1].mean(0))

    def full(self):
        return self.p.lower_tensors, self.p.upper_tensors


def run(p, solver, steps, seed=0, kind="minibatch"):
    kw = p.solve_kwargs(batch_size=B, seed=seed, kind=kind)
    return bl.solve(**kw, solver=solver, steps=steps, track=False)


def samplers(p, seed=0, kind="minibatch"):
    return p.samplers(batch_size=B, seed=seed, kind=kind)


def start(p):
    return p.x0.clone(), p.y0.clone(), torch.zeros_like(p.y0)


# --- 1. update rules against re-implementations ----------------------------------------------
def ref_alternating(p, K, double_loop, a=0.2, b=0.5, T=3):
    D, (lo, up), (x, y, _) = Dense(p), samplers(p), start(p)
    for _ in range(K):
        for _ in range(T if double_loop else 1):
            y = y - b * D.gy(lo.next(), x, y)
        x = x - a * D.gxF(up.next(), x)
    return x, y


def ref_stocbio(p, K, a=0.2, b=0.5, T=3, Q=4, eta=0.6):
    D, (lo, up), (x, y, _) = Dense(p), samplers(p), start(p)
    for _ in range(K):
        for _ in range(T):
            y = y - b * D.gy(lo.next(), x, y)
        ub = up.next()
        g = D.gyF(ub, y)
        v, w = eta * g, eta * g  # partial sums of η Σ_q (I − ηA_j)… ∇_y F: w_k = (I − ηA_k) w_{k−1} + ηg
        for _ in range(Q):
            w = w - eta * (D.hv(lo.next(), w) - g)
        v = w
        x = x - a * (D.gxF(ub, x) - D.jv(lo.next(), v))
    return x, y


def ref_random_neumann(D, lo, ub, x, y, Q, eta, pidx):
    v = D.gyF(ub, y)
    for _ in range(pidx):
        v = v - eta * D.hv(lo.next(), v)
    v = eta * Q * v
    return D.gxF(ub, x) - D.jv(lo.next(), v)


def ref_bsa(p, K, a=0.2, b=0.5, T=3, Q=4, eta=0.6, seed=0):
    D, (lo, up), (x, y, _) = Dense(p), samplers(p), start(p)
    for t in range(K):
        for _ in range(T):
            y = y - b * D.gy(lo.next(), x, y)
        hg = ref_random_neumann(D, lo, up.next(), x, y, Q, eta, index(seed, t, Q))
        x = x - a * hg
    return x, y


def ref_ttsa(p, K, a=0.2, b=0.5, Q=4, eta=0.6, seed=0, project=lambda x: x):
    D, (lo, up), (x, y, _) = Dense(p), samplers(p), start(p)
    for t in range(K):
        y = y - b * D.gy(lo.next(), x, y)
        x = project(x - a * ref_random_neumann(D, lo, up.next(), x, y, Q, eta, index(seed, t, Q)))
    return x, y


def ref_amigo(p, K, a=0.2, b=0.5, T=3, M=2):
    D, (lo, up), (x, y, v) = Dense(p), samplers(p), start(p)
    for _ in range(K):
        for _ in range(T):
            y = y - b * D.gy(lo.next(), x, y)
        ub = up.next()
        for _ in range(M):
            v = v - b * (D.hv(lo.next(), v) - D.gyF(ub, y))
        x = x - a * (D.gxF(ub, x) - D.jv(lo.next(), v))
    return x, y


def ref_soba(p, K, a=0.2, b=0.5):
    D, (lo, up), (x, y, v) = Dense(p), samplers(p), start(p)
    for _ in range(K):
        lb, ub = lo.next(), up.next()
        x, y, v = (x - a * (D.gxF(ub, x) - D.jv(lb, v)), y - b * D.gy(lb, x, y),
                   v - b * (D.hv(lb, v) - D.gyF(ub, y)))
    return x, y


def ref_masoba(p, K, a=0.2, b=0.5, theta=0.3):
    D, (lo, up), (x, y, v) = Dense(p), samplers(p), start(p)
    h = torch.zeros_like(x)
    for _ in range(K):
        lb, ub = lo.next(), up.next()
        dx = D.gxF(ub, x) - D.jv(lb, v)
        y, v, x = y - b * D.gy(lb, x, y), v - b * (D.hv(lb, v) - D.gyF(ub, y)), x - a * h
        h = (1 - theta) * h + theta * dx
    return x, y


def ref_saba(p, K, a=0.2, b=0.5):
    """SAGA on each of the five oracles with explicit per-batch memory lists (zero start)."""
    D, (lo, up), (x, y, v) = Dense(p), samplers(p, kind="fixed"), start(p)
    mem = {k: [torch.zeros(5 if k in ("jv", "gxF") else 10, dtype=F64)] * n
           for k, n in (("gy", lo.n_batches), ("hv", lo.n_batches), ("jv", lo.n_batches),
                        ("gxF", up.n_batches), ("gyF", up.n_batches))}

    def saga(key, i, g):
        direction = g - mem[key][i] + sum(mem[key]) / len(mem[key])
        mem[key][i] = g
        return direction

    for _ in range(K):
        lb, ub = lo.next(), up.next()
        i, j = lo.last_index, up.last_index
        d_y = saga("gy", i, D.gy(lb, x, y))
        d_v = saga("hv", i, D.hv(lb, v)) - saga("gyF", j, D.gyF(ub, y))
        d_x = saga("gxF", j, D.gxF(ub, x)) - saga("jv", i, D.jv(lb, v))
        x, y, v = x - a * d_x, y - b * d_y, v - b * d_v
    return x, y


def ref_srba(p, K, q, a=0.2, b=0.5):
    D, (lo, up), (x, y, v) = Dense(p), samplers(p), start(p)

    def dirs(lb, ub, x, y, v):
        return D.gy(lb, x, y), D.hv(lb, v) - D.gyF(ub, y), D.gxF(ub, x) - D.jv(lb, v)

    prev = d = None
    for t in range(K):
        if t % q == 0:
            lb, ub = D.full()
            d = dirs(lb, ub, x, y, v)
        else:
            lb, ub = lo.next(), up.next()
            new, old = dirs(lb, ub, x, y, v), dirs(lb, ub, *prev)
            d = tuple(dp + gn - go for dp, gn, go in zip(d, new, old))
        prev = (x, y, v)
        x, y, v = x - a * d[2], y - b * d[0], v - b * d[1]
    return x, y


def ref_fsla(p, K, a=0.2, b=0.5, mom=0.4):
    D, (lo, up), (x, y, v) = Dense(p), samplers(p), start(p)
    d = prev = None
    for _ in range(K):
        y = y - b * D.gy(lo.next(), x, y)
        lb, ub = lo.next(), up.next()
        v_new = v - b * (D.hv(lb, v) - D.gyF(ub, y))
        nu = D.gxF(ub, x) - D.jv(lb, v_new)
        if d is None:
            d = nu
        else:
            xp, _, vp = prev
            d = nu + (1 - mom) * (d - (D.gxF(ub, xp) - D.jv(lb, vp)))
        prev, v = (x, y, v_new), v_new
        x = x - a * d
    return x, y


K = 7
REFERENCES = {
    "AlternatingSGD": (lambda: S.AlternatingSGD(lr_x=0.2, lr_y=0.5), lambda p: ref_alternating(p, K, False)),
    "AlternatingSGD-double": (lambda: S.AlternatingSGD(lr_x=0.2, lr_y=0.5, double_loop=True, inner_steps=3),
                              lambda p: ref_alternating(p, K, True)),
    "StocBiO": (lambda: S.StocBiO(lr_x=0.2, lr_y=0.5, inner_steps=3, Q=4, eta=0.6),
                lambda p: ref_stocbio(p, K)),
    "BSA": (lambda: S.BSA(lr_x=0.2, lr_y=0.5, inner_steps=3, Q=4, eta=0.6, seed=0), lambda p: ref_bsa(p, K)),
    "TTSA": (lambda: S.TTSA(lr_x=0.2, lr_y=0.5, Q=4, eta=0.6, seed=0), lambda p: ref_ttsa(p, K)),
    "AmIGO": (lambda: S.AmIGO(lr_x=0.2, lr_y=0.5, inner_steps=3, v_steps=2), lambda p: ref_amigo(p, K)),
    "SOBA": (lambda: S.SOBA(lr_x=0.2, lr_y=0.5), lambda p: ref_soba(p, K)),
    "MASOBA": (lambda: S.MASOBA(lr_x=0.2, lr_y=0.5, average=0.3), lambda p: ref_masoba(p, K)),
    "SABA": (lambda: S.SABA(lr_x=0.2, lr_y=0.5), lambda p: ref_saba(p, 40)),
    "SRBA": (lambda: S.SRBA(lr_x=0.2, lr_y=0.5, period=5), lambda p: ref_srba(p, 12, 5)),
    "FSLA": (lambda: S.FSLA(lr_x=0.2, lr_y=0.5, momentum=0.4), lambda p: ref_fsla(p, K)),
}
STEPS_REF = {"SABA": 40, "SRBA": 12}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_update_rules_match_definition(quad, name):
    make, ref = REFERENCES[name]
    kind = "fixed" if name == "SABA" else "minibatch"
    res = run(quad, make(), STEPS_REF.get(name, K), kind=kind)
    x_ref, y_ref = ref(quad)
    torch.testing.assert_close(res.x, x_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.y, y_ref, rtol=1e-10, atol=1e-10)


def test_ttsa_projected_upper_step(quad):
    """TTSA's x-update is projected: x_{k+1} = P_X(x_k − α_k h_k) with the given x_projection."""
    box = lambda t: t.clamp(-0.05, 0.05)  # noqa: E731
    kw = quad.solve_kwargs(batch_size=B, seed=0)
    solver = S.TTSA(lr_x=0.2, lr_y=0.5, Q=4, eta=0.6)
    res = bl.solve(**kw, solver=solver, steps=K, x_projection=box, track=False)
    x_ref, y_ref = ref_ttsa(quad, K, project=box)
    assert float(res.x.abs().max()) <= 0.05
    torch.testing.assert_close(res.x, x_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.y, y_ref, rtol=1e-10, atol=1e-10)


def test_saba_needs_fixed_batches(quad):
    with pytest.raises(ConfigError, match="FixedBatches"):
        run(quad, S.SABA(), 1)


def test_saba_full_memory_initialisation(quad):
    """init_memory="full": one pass over all batches at the start, then the mean of the memories is
    the full-data oracle, so the first direction is the exact full gradient."""
    res = run(quad, S.SABA(lr_x=0.2, lr_y=0.5, init_memory="full"), 1, kind="fixed")
    lo, up = samplers(quad, kind="fixed")
    n_lo = lo.n_batches * B  # the samples the partition covers
    mem = res.state["memory"]
    D = Dense(quad)
    x0, y0, _ = start(quad)
    full_gy = sum(D.gy(lo.batch(i), x0, y0) for i in range(lo.n_batches)) / lo.n_batches
    lb = lo.next()  # the batch the first step drew; its memory now holds the step-0 value
    torch.testing.assert_close(mem["gy"].memory[lo.last_index][0], D.gy(lb, x0, y0))
    torch.testing.assert_close(res.y, y0 - 0.5 * full_gy, rtol=1e-12, atol=1e-12)
    assert res.state["counts"]["lower"]["grad"] == n_lo + B
    assert res.state["counts"]["upper"]["grad"] == up.n_batches * B + B


# --- 2. convergence with derived tolerances ---------------------------------------------------
def noise(p, Q=None, eta=None):
    """(σ_x², σ_p², bias_Q) at x*: batch variance of ∇_x F_j − ∇²_xy G_i v*, variance over
    p ~ U{0..Q−1} of ηQ B̄ᵀ(I − ηA)^p ∇_y f, and the Neumann bias ‖B̄ᵀ A⁻¹ (I − ηA)^Q ∇_y f‖."""
    info = p.info
    A, Bm = info["A"], info["B"]
    xs = p.x_star
    gyf = p.y_star(xs) - info["d"]
    vstar = torch.linalg.solve(A, gyf)
    s, Bs, c = p.lower_tensors
    d, e = p.upper_tensors
    per_up = info["rho"] * (xs - e)
    per_lo = -(Bs.transpose(1, 2) @ vstar)
    sx2 = float(per_up.var(0, unbiased=False).sum() + per_lo.var(0, unbiased=False).sum()) / B
    if Q is None:
        return sx2, 0.0, lambda k: 0.0
    I = torch.eye(A.shape[0], dtype=F64)
    us = torch.stack([eta * Q * (Bm.T @ torch.linalg.matrix_power(I - eta * A, k) @ gyf) for k in range(Q)])
    sp2 = float(((us - us.mean(0)) ** 2).sum(1).mean())

    def bias(power):
        return float(torch.linalg.vector_norm(
            Bm.T @ torch.linalg.solve(A, torch.linalg.matrix_power(I - eta * A, power) @ gyf)))

    return sx2, sp2, bias


def tolerance(p, alpha, *, Q=None, eta=None, random_truncation=False, bias_power=None):
    sx2, sp2, bias = noise(p, Q, eta)
    var = sx2 + (sp2 if random_truncation else 0.0)
    mu_h, L_h = p.info["h_strong_convexity"], p.info["h_smoothness"]
    floor = L_h * math.sqrt(alpha * var / (2 * mu_h))
    return 2.0 * (floor + (bias(bias_power) if bias_power is not None else 0.0))


CONVERGENCE = {  # name: (solver, tolerance kwargs)
    "SOBA": (lambda: S.SOBA(lr_x=0.1, lr_y=0.7), {"alpha": 0.1}),
    "MASOBA": (lambda: S.MASOBA(lr_x=0.1, lr_y=0.7, average=0.5), {"alpha": 0.1}),
    "FSLA": (lambda: S.FSLA(lr_x=0.1, lr_y=0.7, momentum=0.2), {"alpha": 0.1}),
    "AmIGO": (lambda: S.AmIGO(lr_x=0.1, lr_y=0.7, inner_steps=3), {"alpha": 0.1}),
    "StocBiO": (lambda: S.StocBiO(lr_x=0.1, lr_y=0.7, inner_steps=3, Q=10, eta=0.7),
                {"alpha": 0.1, "Q": 10, "eta": 0.7, "bias_power": 11}),
    "BSA": (lambda: S.BSA(lr_x=0.05, lr_y=0.7, inner_steps=3, Q=6, eta=0.7),
            {"alpha": 0.05, "Q": 6, "eta": 0.7, "bias_power": 6, "random_truncation": True}),
    "TTSA": (lambda: S.TTSA(lr_x=0.05, lr_y=0.7, Q=6, eta=0.7),
             {"alpha": 0.05, "Q": 6, "eta": 0.7, "bias_power": 6, "random_truncation": True}),
}


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_converges_to_noise_floor(quad, name):
    make, kw = CONVERGENCE[name]
    tol = tolerance(quad, **kw)
    assert tol < 0.5 * quad.grad_norm(quad.info["e"])  # non-vacuous: dropping the implicit term fails
    for seed in (0, 1):
        res = run(quad, make(), 200, seed=seed)
        g = quad.grad_norm(res.x)
        assert g <= tol, f"{name} seed {seed}: ‖∇h(x_K)‖ = {g:.3g} > tol {tol:.3g}"


@pytest.mark.parametrize("name", ["SABA", "SRBA"])
def test_variance_reduced_converge_exactly(quad, name):
    solver = S.SABA(lr_x=0.1, lr_y=0.7) if name == "SABA" else S.SRBA(lr_x=0.1, lr_y=0.7)
    # SAGA over 16 batches contracts ~1e-4 per 600 steps here; SRBA restarts every 32 steps
    res = run(quad, solver, 1100 if name == "SABA" else 600, kind="fixed" if name == "SABA" else "minibatch")
    assert quad.grad_norm(res.x) <= 1e-6
    assert float(torch.linalg.vector_norm(res.y - quad.y_star(res.x))) <= 1e-6


@pytest.mark.parametrize("double_loop", [False, True])
def test_alternating_sgd_converges_to_its_biased_fixed_point(quad, double_loop):
    """Without the implicit term the x-update is SGD on ½ρ‖x − ē‖² (noise ρ² Var(e_j)/b), whose
    fixed point ē is not stationary for h: ‖x_K − ē‖ ≤ 2 √(ασ²/(ρ(2 − αρ))) and ∇h(x_K) ≈ ∇h(ē)."""
    alpha, rho = 0.2, quad.info["rho"]
    res = run(quad, S.AlternatingSGD(lr_x=alpha, lr_y=0.7, double_loop=double_loop, inner_steps=3), 200)
    e = quad.info["e"]
    var = rho**2 * float(quad.upper_tensors[1].var(0, unbiased=False).sum()) / B
    floor = math.sqrt(alpha * var / (rho * (2 - alpha * rho)))
    assert float(torch.linalg.vector_norm(res.x - e)) <= 2 * floor
    assert quad.grad_norm(res.x) >= 0.8 * quad.grad_norm(e)


# --- 3. oracle counts -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return stochastic_quadratic(dim_x=2, dim_y=3, n_lower=24, n_upper=20, batch_size=4, seed=1)


def test_oracle_counts(tiny):
    b, steps = 4, 3
    kw = {"batch_size": b, "seed": 0}
    res = bl.solve(**tiny.solve_kwargs(**kw), solver=S.SOBA(), steps=steps, track=False)
    # one linearization of G (∇_y G with graph) → H v and the cross term from one backward; ∇F once
    assert res.state["counts"] == {"lower": {"grad": steps * b, "hvp": steps * b, "cross": steps * b},
                                   "upper": {"grad": steps * b}}
    T, Q = 3, 5
    res = bl.solve(**tiny.solve_kwargs(**kw), solver=S.StocBiO(inner_steps=T, Q=Q), steps=steps, track=False)
    # T inner gradients + Q one-shot HVPs (each builds ∇_y G: a gradient) + 1 cross (also a linearization)
    assert res.state["counts"] == {"lower": {"grad": steps * (T + Q + 1) * b, "hvp": steps * Q * b,
                                             "cross": steps * b},
                                   "upper": {"grad": steps * b}}
    res = bl.solve(**tiny.solve_kwargs(kind="fixed", **kw), solver=S.SABA(), steps=steps, track=False)
    assert res.state["counts"] == {"lower": {"grad": steps * b, "hvp": steps * b, "cross": steps * b},
                                   "upper": {"grad": steps * b}}
    # SRBA: a full-batch restart (n samples per oracle) at t = 0, then twice SOBA's cost per step
    res = bl.solve(**tiny.solve_kwargs(**kw), solver=S.SRBA(period=10), steps=steps, track=False)
    lo_n, up_n = 24, 20
    per_lo, per_up = lo_n + 2 * (steps - 1) * b, up_n + 2 * (steps - 1) * b
    assert res.state["counts"] == {"lower": {"grad": per_lo, "hvp": per_lo, "cross": per_lo},
                                   "upper": {"grad": per_up}}
