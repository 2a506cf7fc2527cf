"""The complexity reproduction (docs/reproduction.md secs. 2 and 4): its measuring tools against exact
references, and its fast configuration end to end."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel import solvers as S
from bilevel._memory import allocated_bytes
from bilevel.experiments import repro_complexity as R


def test_loglog_slope_recovers_a_power_law():
    xs = [1.0, 3.0, 10.0, 30.0, 100.0]
    assert R.loglog_slope(xs, [5.0 * x ** 1.7 for x in xs]) == pytest.approx(1.7, abs=1e-12)
    assert math.isnan(R.loglog_slope([1.0, 2.0], [1.0, 2.0]))  # fewer than 3 points
    assert R.loglog_slope([1, 10, 100, 1000], [2, 20, math.inf, 2000]) == pytest.approx(1.0)  # inf skipped


def test_allocated_bytes_counts_each_storage_once_and_not_the_inputs():
    w = torch.ones(100, dtype=torch.float64)  # exists before the call: never counted

    def fn():
        w.view(10, 10).t()                           # views of an input: 0 bytes
        a = torch.empty(1000, dtype=torch.float64)   # 8000
        b = a.view(10, 100)                          # a view of a: same storage, counted once
        c = w + 1                                    # 800  -> live 8800
        del a                                        # b still holds the storage
        d = torch.empty(500, dtype=torch.float64)    # 4000 -> peak 12800
        del b, d                                     # released: 800 live
        e = torch.empty(1200, dtype=torch.float64)   # 9600 -> 10400 < peak
        return c, e

    _, peak = allocated_bytes(fn)
    assert peak == 8000 + 800 + 4000


def test_box_qp_matches_the_closed_form_prox_of_a_diagonal_quadratic():
    h = torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=torch.float64)
    b = torch.tensor([3.0, -5.0, 0.4, 0.1], dtype=torch.float64)
    lo, hi = -torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    st = R.Stationarity(torch.diag(h), b, lo, hi, rho=2.0)
    z = torch.tensor([0.3, 0.9, -2.0, 0.0], dtype=torch.float64)
    exact = torch.clamp((b + 2.0 * z) / (h + 2.0), lo, hi)  # separable: prox is a clipped ratio
    assert torch.allclose(st.prox(z), exact, atol=1e-12, rtol=0)
    assert st.moreau(z) == pytest.approx(4.0 * float((exact - z).pow(2).sum()), rel=1e-10)
    x_c = torch.clamp(b / h, lo, hi)  # the constrained minimizer: both measures vanish there
    assert st.mapping(x_c) < 1e-24 and st.moreau(x_c) < 1e-20
    assert st.mapping(torch.zeros(4, dtype=torch.float64)) > 1.0  # and not elsewhere


def test_fast_constrained_ttsa_reaches_both_stationarity_measures(fast_run):
    box = fast_run["box"]
    assert box["active"] >= 1 and box["grad_norm_sq_at_solution_rel"] > 1e-3  # ∇h ≠ 0 on the box
    for k in ("mapping", "moreau"):
        assert math.isfinite(box["rows"][k]["median_total"][0]), k


def test_quadratic_box_puts_the_unconstrained_minimizer_outside():
    prob, _ = R._build(R.CONFIGS["fast"])
    st, w = R.quadratic_stationarity(prob, 0.5)
    assert float(prob.x_star.abs().max()) == pytest.approx(2 * w)
    assert st.mapping(prob.x_star) > 1e-6   # x* is infeasible, so not a constrained stationary point
    assert float(st.grad(prob.x_star).abs().max()) < 1e-10  # but it is ∇h = 0 (same h as the problem)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """The documented command with --fast: every part, tables, figures and result.json."""
    out = tmp_path_factory.mktemp("repro_complexity")
    res = R.main(["--fast", "--out", str(out)])
    for name in ("result.json", "tables.md", "repro_sample_complexity.png", "repro_survey_complexity.png"):
        assert (out / name).stat().st_size > 0
    return res


def test_fast_sample_complexity_counts_the_analytic_per_iteration_cost(fast_run):
    """SOBA (one run per ε): per iteration one lower linearization (∇_y G, H v, cross: 3 lower
    oracles) and one upper backward, each on a batch of b samples: calls = 4 b t exactly."""
    b = R.CONFIGS["fast"]["batch"]
    row = fast_run["sample"]["rows"]["SOBA"]
    reached = [i for i, v in enumerate(row["median_total"]) if math.isfinite(v)]
    assert reached, "SOBA reached no target in the fast configuration"
    for i in reached:
        t = row["median_iters"][i]
        assert row["median_total"][i] == 4 * b * t
        assert row["median_upper"][i] == b * t and row["median_lower"][i] == 3 * b * t
    ttsa = fast_run["sample"]["rows"]["TTSA"]["median_total"]
    fin = [v for v in ttsa if math.isfinite(v)]
    assert len(fin) >= 2 and fin == sorted(fin)  # smaller targets never cost fewer calls


def test_fast_survey_memory_orders_follow_the_math(fast_run):
    """Deterministic bytes: reverse mode keeps at least y_k (d floats) for every step; truncated
    reverse, the implicit solvers and forward mode hold no per-step state — what grows with T is
    the per-step finiteness flags (0-dim tensors), less than a quarter of reverse mode's growth;
    the closed form does not depend on T at all. Forward mode holds d·m tangents (slope in m close
    to 1); the closed form holds a d×d factorization (slope in d in (1, 2])."""
    res = fast_run["survey"]
    T = res["sweeps"]["T"]["rows"]
    grid = T["Reverse"]["grid"]

    def growth(fam):
        b = T[fam]["bytes"]
        return (b[-1] - b[0]) / (grid[-1] - grid[0])

    d0 = R.CONFIGS["fast"]["survey"]["d0"]
    b = T["Reverse"]["bytes"]  # every further step keeps at least its iterate y_k (d0 float64)
    assert all((b[i + 1] - b[i]) / (grid[i + 1] - grid[i]) >= 8 * d0 for i in range(len(grid) - 1))
    for fam in ("Truncated reverse", "Implicit CG", "Implicit Neumann", "Forward"):
        assert 0 <= growth(fam) < 0.25 * growth("Reverse"), (fam, T[fam]["bytes"])
    assert len(set(T["Closed form"]["bytes"])) == 1
    m = res["sweeps"]["m"]["rows"]
    assert 0.7 < m["Forward"]["slope_mem"] <= 1.0 + 1e-12
    d = res["sweeps"]["d"]["rows"]
    assert 1.0 < d["Closed form"]["slope_mem"] <= 2.0 + 1e-12


def test_mrbo_zo_lower_calls_count_every_perturbed_trajectory():
    """MRBO-ZO's row adds the lower calls the counter misses (its Q+1 trajectories run under one
    vmap and are counted as one): :func:`mrbo_zo_lower_calls` equals the count of the same solver
    with the trajectories run, and counted, one at a time — and that solver takes the same steps."""
    from bilevel.estimates import replay, sgd_lower
    from bilevel.hypergrad.zeroth_order import zeroth_order_hypergradient
    from bilevel.solvers import solve

    class OneAtATime(S.MRBOZO):
        def hypergradient(self, xs, ys, samples):
            F, Gs, U, proj = samples

            def run(x):
                return sgd_lower(replay(Gs), x, ys, steps=len(Gs), lr=self.inner_lr, projection=proj)

            return zeroth_order_hypergradient(F, run, xs, run(xs), U, self.mu, batched=False)

    prob, c = R._build(R.CONFIGS["fast"])
    c = dict(c, seed=0)
    batched, batch, kind = R.ALGOS["MRBO-ZO"].make(None, c)
    one = OneAtATime(lr_x=batched.lr_x, lr_y=batched.lr_y, momentum_x=batched.momentum_x,
                     inner_steps=batched.inner_steps, inner_lr=batched.inner_lr, samples=batched.samples,
                     mu=batched.mu, seed=batched.seed)
    out = []
    for solver in (batched, one):
        lo, up = prob.samplers(batch_size=batch, seed=0, kind=kind)
        out.append(solve(prob.problem, prob.x0, prob.y0, solver=solver, steps=3, lower_data=lo,
                         upper_data=up, track=False))
    assert torch.allclose(out[0].x, out[1].x, rtol=0, atol=1e-12)
    assert out[1].state["counts"].total("lower") == R.mrbo_zo_lower_calls(3, c)
    assert out[1].state["counts"].total("upper") == out[0].state["counts"].total("upper") == batch * 5
