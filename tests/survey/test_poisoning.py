"""Data poisoning (issue 13.3, Biggio et al. 2012): bounded perturbations of training points.

* The implicit hypergradient of the poisoning problem (CG at the retrained classifier) equals the
  dense-Hessian one (``Exact``) and a central difference of h(δ) = f(δ, w*(δ)) along a random
  direction. Lower solves by L-BFGS + one Newton step (max |∇g| ≈ 1e-16: an error 1e-16/λ in w,
  negligible after dividing by 2h), step h = 1e-3: FD truncation ≈ h² ≈ 1e-6 relative (third
  derivative ~ the first), rounding 1e-16/h; tolerance 1e-5.
* The attack raises the validation loss and error of the retrained classifier more than random
  perturbations with the same budget (‖δ_i‖ = ε; the mean of 5 draws plus 5 standard deviations,
  and the largest draw), and stays within the budget.
"""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel.errors import ConfigError
from bilevel.hypergrad import CG, Exact
from bilevel.inner import Adam, Nesterov
from bilevel.problems.poisoning import poisoning, project_rows

SMALL = {"n_train": 200, "n_val": 200, "n_test": 200}


def test_projection_onto_the_balls():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    p = project_rows(x, 1.0)
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(project_rows(p, 1.0), p, rtol=0, atol=0)  # idempotent


def test_poisoning_hypergradient_matches_dense_implicit_and_finite_differences():
    p = poisoning(2.0, n_poison=5, **SMALL)
    gen = torch.Generator().manual_seed(0)
    x = p.random(gen)
    y = p.retrain(x)
    g_cg = CG(None, iters=300, tol=1e-12)(p.problem, x, y).grad
    g_ex = Exact(None)(p.problem, x, y).grad
    torch.testing.assert_close(g_cg, g_ex, rtol=0, atol=1e-8 * float(g_ex.abs().max()))
    r = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    u = g_ex / g_ex.norm() + 0.5 * r / r.norm()  # a direction with a derivative well above zero
    h = 1e-3

    def value(xx):
        return float(p.problem.upper(xx, p.retrain(xx, y)))

    fd = (value(x + h * u) - value(x - h * u)) / (2 * h)
    exact = float((g_ex * u).sum())
    assert exact > 0.5 * float(g_ex.norm())
    assert fd == pytest.approx(exact, rel=1e-5)


def test_attack_raises_validation_loss_and_error_more_than_random_perturbations():
    eps = 3.0
    p = poisoning(eps, n_poison=20, **SMALL)
    kappa = p.condition
    inner = Nesterov(lr=1 / p.smoothness, momentum=(math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1), steps=30)
    solver = bl.solvers.HypergradientDescent(CG(inner, iters=100, tol=1e-8), upper=Adam(lr=0.1),
                                             warm_start=True)
    res = bl.solve(p.problem, *p.start(), solver=solver, steps=10, x_projection=p.project, track=False)
    assert float(res.x.norm(dim=1).max()) <= eps * (1 + 1e-12)
    attack = p.scores(res.x)
    clean = p.scores(p.x0)
    gen = torch.Generator().manual_seed(1)
    draws = [p.scores(p.random(gen)) for _ in range(5)]
    for key in ("val_loss", "val_err"):
        vals = torch.tensor([d[key] for d in draws], dtype=torch.float64)
        assert attack[key] > float(vals.mean()) + 5 * float(vals.std()), (key, attack, vals)
        assert attack[key] > float(vals.max()) and attack[key] > clean[key]
    # the attack at least doubles the validation loss; random perturbations barely move it
    assert attack["val_loss"] > 2 * clean["val_loss"]
    assert max(abs(d["val_loss"] - clean["val_loss"]) for d in draws) < 0.1 * clean["val_loss"]


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="eps"):
        poisoning(0.0, **SMALL)
    with pytest.raises(ConfigError, match="n_poison"):
        poisoning(1.0, n_poison=500, **SMALL)
    with pytest.raises(ConfigError, match="classes"):
        poisoning(1.0, classes=(3, 3), **SMALL)
    with pytest.raises(ConfigError, match="ridge"):
        poisoning(1.0, ridge=0.0, **SMALL)


def test_poisoning_experiment(tmp_path):
    over = {"steps": 2, "eval_every": 1, "n_poison": 5, "random_draws": 2, "data.n_train": 60,
            "data.n_val": 60, "data.n_test": 60, "inner.steps": 5}
    r = bl.experiments.run("poisoning-run", overrides=over, out=tmp_path, progress=False, plots=False,
                           echo=None)
    assert r.completed and {"clean_val_loss", "random_val_loss", "random_val_loss_std"} <= set(r.extras)
    assert 0.0 < r.final["budget_used"] <= 1.0 + 1e-12 and r.final["val_loss"] > 0
