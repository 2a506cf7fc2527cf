"""Value-function solvers (issue 13.11): V-PBGD (Shen & Chen 2023) and the primal–dual method on the
smoothed value function (Sow et al. 2022b). On the quadratic toy each converges to the closed-form
solution of its single-level reformulation (dense KKT solves in bilevel.problems.reformulations),
whose distance to the bilevel x* shrinks like 1/γ, respectively √a; on the LLC toy (non-singleton
follower) both reach x* = e."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel.errors import ConfigError
from bilevel.inner import GD, Adam, Nesterov
from bilevel.problems import (
    llc_toy,
    penalty_solution,
    quadratic_toy,
    smoothed_vf_constraint,
    smoothed_vf_solution,
)

QUAD = quadratic_toy()
S = bl.solvers


def _norm(t):
    return float(torch.linalg.vector_norm(t))


def test_reformulation_closed_forms_and_their_bias():
    # penalty: the stationarity of f + γ(g − v) in (x, y), and an O(1/γ) bias towards x*
    errs = []
    for gamma in (10.0, 100.0, 1000.0):
        x, y = penalty_solution(QUAD, gamma)
        errs.append(_norm(x - QUAD.x_star))
        xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        obj = QUAD.problem.f(xr, yr) + gamma * smoothed_vf_constraint(QUAD, xr, yr, 0.0, 0.0)
        gx, gy = torch.autograd.grad(obj, (xr, yr))
        assert _norm(gx) + _norm(gy) < 1e-9
    assert errs[0] / errs[1] == pytest.approx(10, rel=0.1)
    assert errs[1] / errs[2] == pytest.approx(10, rel=0.02)
    # smoothed value function: an active constraint with λ* > 0 (KKT), and an O(√a) bias
    errs = []
    for a in (1e-2, 1e-4):
        x, y, lam = smoothed_vf_solution(QUAD, a, a)
        assert lam > 0 and abs(float(smoothed_vf_constraint(QUAD, x, y, a, a))) < 1e-12
        errs.append(_norm(x - QUAD.x_star))
    assert errs[0] / errs[1] == pytest.approx(10, rel=0.1)


def test_vpbgd_reaches_the_penalized_closed_form_on_the_quadratic():
    gamma = 10.0
    xp, yp = penalty_solution(QUAD, gamma)
    # the penalized objective has curvature in [1, 68]: Nesterov with β = (√κ − 1)/(√κ + 1)
    upper = Nesterov(lr=1 / 68, momentum=(68**0.5 - 1) / (68**0.5 + 1))
    solver = S.VPBGD(GD(lr=2 / 3, steps=5), gamma=gamma, upper=upper)
    res = bl.solve(QUAD.problem, *QUAD.start(), solver=solver, steps=250, track=False)
    assert _norm(res.x - xp) < 1e-8 and _norm(res.y - yp) < 1e-8
    # the lower approximation ŷ tracks y*(x) (warm-started GD contracts by 1/3 per step)
    assert _norm(res.state["y_hat"][0] - QUAD.extra["y_star_fn"](res.x)) < 1e-8
    assert 0 < res.history[-1]["penalty"] < 1e-2


def test_primal_dual_reaches_the_smoothed_closed_form_and_its_multiplier():
    a = 1e-2
    xs, ys, lam = smoothed_vf_solution(QUAD, a, a)  # λ* ≈ 2.86: Lagrangian curvature in [1, 20]
    solver = S.PrimalDualVF(GD(lr=2 / 3, steps=5), lr=0.08, dual_lr=1.0, a1=a, a2=a)
    res = bl.solve(QUAD.problem, *QUAD.start(), solver=solver, steps=250, track=False)
    # gradient descent–ascent converges linearly here (measured: error 3e-5 after 250 steps)
    assert _norm(res.x - xs) < 1e-4 and _norm(res.y - ys) < 5e-4
    assert float(res.state["lmbda"]) == pytest.approx(lam, rel=5e-3)


@pytest.mark.parametrize("name", ["VPBGD", "PrimalDualVF"])
def test_value_function_solvers_reach_x_star_on_the_non_singleton_llc_toy(name):
    toy = llc_toy(n=5)
    rule = Adam(lr=0.02, betas=(0.9, 0.9))  # the quartic f needs scale-free steps (docs/deterministic.md)
    if name == "VPBGD":  # e is the unique minimiser of f + γ(g − v) for every γ > 0
        solver = S.VPBGD(GD(lr=0.5, steps=5), gamma=10.0, upper=rule)
        slack = 0.0
    else:  # the relaxed set allows ‖x − e‖² ≲ 2 a2 + a1 ‖x‖² around e
        a = 1e-6
        solver = S.PrimalDualVF(GD(lr=0.5, steps=5), dual_lr=10.0, a1=a, a2=a, upper=rule)
        slack = (2 * a + a * 5) ** 0.5 / 5**0.5
    x, y = toy.start()
    res = bl.solve(toy.problem, x, y, solver=solver, steps=150, track=False, x_projection=toy.x_projection)
    err = toy.errors(res.x, res.y)  # from x_err = 1 at x0 = 0; measured 7.6e-3 (V-PBGD)
    assert err["x_err"] < 2e-2 + slack and err["f"] < 1e-5


def test_bad_settings_are_rejected():
    with pytest.raises(ConfigError, match="gamma"):
        S.VPBGD(GD(lr=0.1, steps=1), gamma=0.0)
    with pytest.raises(ConfigError, match="a1 > 0"):
        S.PrimalDualVF(GD(lr=0.1, steps=1), a1=0.0)
    with pytest.raises(ConfigError, match="dual_lr"):
        S.PrimalDualVF(GD(lr=0.1, steps=1), dual_lr=-1.0)


def test_vf_toy_experiment_records_the_reformulation_error(tmp_path):
    from bilevel.experiments.value_function import ValueFunction

    over = {"toy": "quadratic", "solver": "VPBGD", "steps": 200, "eval_every": 50,
            **ValueFunction.SETTINGS[("quadratic", "VPBGD")]}
    r = bl.experiments.run("vf-toy", overrides=over, out=tmp_path, progress=False, plots=False, echo=None)
    assert r.completed and r.final["ref_err"] < 1e-6
    bias = _norm(penalty_solution(QUAD, 10.0)[0] - QUAD.x_star) / _norm(QUAD.x_star)
    assert r.extras["reformulation_bias"] == pytest.approx(bias, rel=1e-12)


@pytest.mark.parametrize("name", ["VPBGD", "PrimalDualVF"])
def test_resumed_run_is_bit_identical_and_the_solver_is_not_mutated(name):
    import copy
    import io

    solver = (S.VPBGD(GD(lr=0.5, steps=3), gamma=10.0, upper=Adam(lr=0.01)) if name == "VPBGD"
              else S.PrimalDualVF(GD(lr=0.5, steps=3), a1=1e-2, a2=1e-2, lr=0.04))
    before = copy.deepcopy(vars(solver))
    full = bl.solve(QUAD.problem, *QUAD.start(), solver=solver, steps=8, track=False)
    half = bl.solve(QUAD.problem, *QUAD.start(), solver=solver, steps=4, track=False)
    buf = io.BytesIO()
    torch.save(half.state, buf)
    buf.seek(0)
    rest = bl.solve(QUAD.problem, *QUAD.start(), solver=solver, steps=8, track=False,
                    state=torch.load(buf, weights_only=False))
    assert torch.equal(full.x, rest.x) and torch.equal(full.y, rest.y)
    assert vars(solver).keys() == before.keys()
