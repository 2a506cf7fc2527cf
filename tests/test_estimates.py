"""bilevel.estimates building blocks against their definitions.

References are written independently of the package's oracles: the stochastic quadratic's per-batch
Hessians, cross matrices and gradients are formed densely from its data (A_b = Q diag(λ ⊙ s̄_b) Qᵀ,
∇²_xy g_b = −B̄_bᵀ, ...), and recursions are replayed with plain tensor arithmetic.
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel import oracles as O
from bilevel.errors import ConfigError
from bilevel.estimates import (
    SagaTable,
    Schedule,
    neumann_hypergradient,
    replay,
    require_fixed_batches,
    sgd_linear_system,
    sgd_lower,
    soba_oracles,
    spider,
    storm,
)
from bilevel.problems import stochastic_quadratic

F64 = torch.float64


@pytest.fixture(scope="module")
def quad():
    return stochastic_quadratic(dim_x=4, dim_y=6, n_lower=40, n_upper=30, kappa=4.0, batch_size=5, seed=7)


def objectives(p, lower_batches, upper_batch=None):
    """Package objectives (flat leaves) for the given batches."""
    xs, xspec = bl._tree.flatten(p.x0)
    ys, yspec = bl._tree.flatten(p.y0)
    Bound = bl.formulation.Bound
    Gs = [Bound.from_leaves(p.problem, (), xspec, (), yspec, lower_batch=b).G for b in lower_batches]
    F = None
    if upper_batch is not None:
        F = bl.formulation.Bound.from_leaves(p.problem, (), xspec, (), yspec, upper_batch=upper_batch).F
    return Gs, F


def dense(p, batch):
    """(A_b, B̄_b, c̄_b) of a lower batch: ∇_y g_b = A_b y − (B̄_b x + c̄_b), ∇²_xy g_b v = −B̄_bᵀ v."""
    s, B, c = batch
    Qm, lam = p.info["eigvecs"], p.info["eigvals"]
    return Qm @ torch.diag(lam * s.mean(0)) @ Qm.T, B.mean(0), c.mean(0)


def lower_batches(p, k, seed=0):
    lo, _ = p.samplers(batch_size=5, seed=seed)
    return [lo.next() for _ in range(k)]


# --- Schedule ---------------------------------------------------------------------------------
def test_schedule():
    s = Schedule(0.3, e=0.5, t0=4.0)
    assert s(0) == pytest.approx(0.3 / 2.0) and s(5) == pytest.approx(0.3 / 3.0)
    assert Schedule(0.2)(10**6) == 0.2  # e = 0: constant
    assert Schedule.of(0.1)(3) == 0.1
    assert Schedule.of({"c": 1.0, "e": 1.0})(1) == pytest.approx(0.5)  # t0 = 1 by default
    assert Schedule.of(s) is s
    with pytest.raises(ValueError):
        Schedule(-1.0)
    with pytest.raises(ValueError):
        Schedule(1.0, t0=0.0)


# --- recursions -----------------------------------------------------------------------------------
def test_storm_and_spider_definitions():
    gen = torch.Generator().manual_seed(0)
    d, gn, go = ((torch.randn(3, generator=gen, dtype=F64), torch.randn(2, 2, generator=gen, dtype=F64))
                 for _ in range(3))
    for a in (0.0, 0.3, 1.0):
        out = storm(d, gn, go, a)
        for k in range(2):
            torch.testing.assert_close(out[k], gn[k] + (1 - a) * (d[k] - go[k]), rtol=0, atol=1e-15)
    torch.testing.assert_close(storm(d, gn, go, 1.0)[0], gn[0])  # a = 1: the plain estimate
    out = spider(d, gn, go)
    for k in range(2):
        torch.testing.assert_close(out[k], d[k] + gn[k] - go[k], rtol=0, atol=1e-15)


@pytest.mark.parametrize("init", [None, "given"])
def test_saga_table_matches_explicit_memory(init):
    """direction = g − m_i + (1/n) Σ_k m_k with the memories *before* the update, then m_i ← g."""
    gen = torch.Generator().manual_seed(1)
    n = 5
    like = (torch.zeros(3, dtype=F64), torch.zeros(2, dtype=F64))
    start = None if init is None else (torch.ones(3, dtype=F64), -torch.ones(2, dtype=F64))
    table = SagaTable(n, like, init=start)
    memory = [tuple(t.clone() for t in (like if start is None else start)) for _ in range(n)]
    for _ in range(40):
        i = int(torch.randint(n, (1,), generator=gen))
        g = (torch.randn(3, generator=gen, dtype=F64), torch.randn(2, generator=gen, dtype=F64))
        expected = tuple(g[k] - memory[i][k] + sum(m[k] for m in memory) / n for k in range(2))
        got = table.update(i, g)
        memory[i] = g
        for k in range(2):
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-13)
    for k in range(2):  # the running mean stays the mean of the memories
        torch.testing.assert_close(table.mean[k], sum(m[k] for m in memory) / n, rtol=0, atol=1e-13)
    clone = SagaTable(n, like)
    clone.load_state_dict(table.state_dict())
    torch.testing.assert_close(clone.mean[0], table.mean[0])


# --- estimators ---------------------------------------------------------------------------------
def test_neumann_hypergradient_equals_explicit_formula(quad):
    """stocBiO Eq. 4 with batches B_1..B_Q for the HVPs (in that order) and B_0 for the cross term:
    v = η Σ_{q=0}^{Q} Π_{j=Q−q+1}^{Q} (I − η A_j) ∇_y F,  ∇̂h = ∇_x F + B̄_0ᵀ v."""
    Q, eta = 4, 0.3
    batches = lower_batches(quad, Q + 1, seed=2)
    _, up = quad.samplers(batch_size=5, seed=3)
    ub = up.next()
    Gs, F = objectives(quad, batches, ub)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    hg, info = neumann_hypergradient(F, replay(Gs[:Q]), (x,), (y,), Q=Q, eta=eta, G_cross=Gs[Q])
    rho = quad.info["rho"]
    gyF, gxF = y - ub[0].mean(0), rho * (x - ub[1].mean(0))
    I = torch.eye(6, dtype=F64)
    As = [dense(quad, b)[0] for b in batches[:Q]]
    v = torch.zeros(6, dtype=F64)
    for q in range(Q + 1):
        P = I.clone()
        for j in range(Q - q, Q):  # the last q matrices: (I − ηA_Q) ··· (I − ηA_{Q−q+1})
            P = P @ (I - eta * As[j])
        v = v + eta * (P @ gyF)
    B0 = dense(quad, batches[Q])[1]
    torch.testing.assert_close(info["v"][0], v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hg[0], gxF + B0.T @ v, rtol=1e-12, atol=1e-12)
    # a fresh batch per HVP: G_batch is called once per product (Q) plus once for the cross term
    calls = []
    hg2, _ = neumann_hypergradient(F, lambda: calls.append(1) or Gs[len(calls) - 1], (x,), (y,), Q=Q, eta=eta)
    assert len(calls) == Q + 1
    torch.testing.assert_close(hg2[0], hg[0], rtol=1e-12, atol=1e-12)


def test_shared_batch_neumann_equals_the_exact_partial_sum_on_one_batch(quad):
    """``shared=True`` (stocBiO's cheaper option): ONE lower batch B for every HVP and the cross
    term, v = η Σ_{q=0}^{Q} (I − η A_B)^q ∇_y F and ∇̂h = ∇_x F + B̄_Bᵀ v, from one linearization
    (one gradient with graph, then Q + 1 backward products) — against the dense partial sum; and
    with ``G_cross`` the cross term on that batch instead."""
    Q, eta = 5, 0.3
    batches = lower_batches(quad, 2, seed=8)
    _, up = quad.samplers(batch_size=5, seed=9)
    ub = up.next()
    Gs, F = objectives(quad, batches, ub)
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(4, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    calls = []
    with O.counting() as c:
        hg, info = neumann_hypergradient(F, lambda: calls.append(1) or Gs[0], (x,), (y,), Q=Q, eta=eta,
                                         shared=True)
    assert len(calls) == 1  # one batch for everything
    n = batches[0][0].shape[0]
    assert c["lower"] == {"grad": n, "hvp": Q * n, "cross": n}  # one linearization, Q + 1 products
    rho = quad.info["rho"]
    gyF, gxF = y - ub[0].mean(0), rho * (x - ub[1].mean(0))
    A, B, _ = dense(quad, batches[0])
    M = torch.eye(6, dtype=F64) - eta * A
    v = eta * sum(torch.linalg.matrix_power(M, q) @ gyF for q in range(Q + 1))
    torch.testing.assert_close(info["v"][0], v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hg[0], gxF + B.T @ v, rtol=1e-12, atol=1e-12)
    hg2, _ = neumann_hypergradient(F, replay(Gs[:1]), (x,), (y,), Q=Q, eta=eta, shared=True, G_cross=Gs[1])
    torch.testing.assert_close(hg2[0], gxF + dense(quad, batches[1])[1].T @ v, rtol=1e-12, atol=1e-12)


def test_stocbio_shared_neumann_option(quad):
    """StocBiO(neumann="shared") runs that estimator (T + 1 lower batches per iteration instead of
    T + Q + 1); the default stays the paper's fresh-batch one; other values are rejected."""
    def run(**kw):
        lo, up = quad.samplers(batch_size=5, seed=11)
        return bl.solve(quad.problem, quad.x0, quad.y0, solver=bl.solvers.StocBiO(inner_steps=2, Q=3, **kw),
                        steps=2, lower_data=lo, upper_data=up, track=False)

    fresh, shared = run(), run(neumann="shared")
    assert fresh.history[-1]["lower_grad"] == 2 * 5 * (2 + 3 + 1)
    assert shared.history[-1]["lower_grad"] == 2 * 5 * (2 + 1)
    assert shared.history[-1]["lower_hvp"] == fresh.history[-1]["lower_hvp"] == 2 * 5 * 3
    assert not torch.equal(fresh.x, shared.x)
    with pytest.raises(ValueError, match="neumann"):
        bl.solvers.StocBiO(neumann="one")


def test_sgd_lower_and_linear_system(quad):
    batches = lower_batches(quad, 6, seed=5)
    Gs, _ = objectives(quad, batches)
    gen = torch.Generator().manual_seed(6)
    x, y0 = torch.randn(4, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    (y,) = sgd_lower(replay(Gs[:3]), (x,), (y0,), steps=3, lr=0.4)
    ref = y0.clone()
    for b in batches[:3]:
        A, B, c = dense(quad, b)
        ref = ref - 0.4 * (A @ ref - (B @ x + c))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    rhs, v0 = torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    (v,) = sgd_linear_system(replay(Gs[3:]), (x,), (y,), (v0,), (rhs,), steps=3, lr=0.5)
    ref = v0.clone()
    for b in batches[3:]:
        ref = ref - 0.5 * (dense(quad, b)[0] @ ref - rhs)
    torch.testing.assert_close(v, ref, rtol=1e-12, atol=1e-12)


def test_soba_oracles_one_linearization(quad):
    batches = lower_batches(quad, 1, seed=8)
    _, up = quad.samplers(batch_size=5, seed=9)
    ub = up.next()
    (G,), F = objectives(quad, batches, ub)
    gen = torch.Generator().manual_seed(10)
    x, y, v = (torch.randn(n, generator=gen, dtype=F64) for n in (4, 6, 6))
    with O.counting() as c:
        gy, hv, jv, gxF, gyF = soba_oracles(G, F, (x,), (y,), (v,))
    A, B, cc = dense(quad, batches[0])
    torch.testing.assert_close(gy[0], A @ y - (B @ x + cc), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hv[0], A @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv[0], -B.T @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gyF[0], y - ub[0].mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gxF[0], quad.info["rho"] * (x - ub[1].mean(0)), rtol=1e-12, atol=1e-12)
    # one lower gradient (with graph) + H v and the cross term from a single backward
    assert c == {"lower": {"grad": 5, "hvp": 5, "cross": 5}, "upper": {"grad": 5}}


def test_require_fixed_batches(quad):
    lo, _ = quad.samplers(kind="fixed")
    assert require_fixed_batches(lo, "SABA", "lower") is lo
    with pytest.raises(ConfigError, match="FixedBatches"):
        require_fixed_batches(quad.lower_data, "SABA", "lower")
    with pytest.raises(ConfigError, match="no sampler"):
        require_fixed_batches(None, "SABA", "upper")
