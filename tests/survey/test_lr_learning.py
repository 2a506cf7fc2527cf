"""Learning-rate schedule learning (issue 13.1, Franceschi et al. 2017).

* The hypergradient of the per-step (η_k, β_k) schedule equals central finite differences of the
  unrolled map x ↦ f(y_T(x)) in float64. Step h = 1e-5 in (log η, logit β): the truncation error
  is h²/6 · |h'''| ≈ 2e-11 (third derivatives O(1)), rounding ε·|f|/h ≈ 1e-11, so 1e-8 relative
  to the largest entry leaves a factor > 100.
* Forward mode and reverse mode give the same derivative of the same map: 1e-10 relative (both
  are exact up to summation order in float64).
* The learned schedule beats the best constant (rate, momentum) of a grid on the held-out test
  loss — the grid's member is picked by validation loss, like the search.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel.errors import ConfigError
from bilevel.hypergrad import Forward, Reverse
from bilevel.inner import Adam
from bilevel.problems.lr_learning import lr_learning

SMALL = {"n_train": 100, "n_val": 100, "n_test": 10}


def _h(p, x) -> float:
    """h(x) = f(x, y_T(x)): the unrolled map, no graph."""
    return float(p.problem.upper(x, p.train(x)))


@pytest.mark.parametrize("momentum", ["per-step", "scalar"])
def test_hypergradient_matches_central_differences_of_the_unrolled_map(momentum):
    p = lr_learning(6, momentum=momentum, lr0=0.3, momentum0=0.6, **SMALL)
    x, y = p.start()
    gen = torch.Generator().manual_seed(3)
    x = {k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in x.items()}
    g = Reverse(p.dynamics)(p.problem, x, y).grad
    h = 1e-5
    for key, v in x.items():
        fd = torch.zeros_like(v)
        for i in range(v.numel()):
            xp = {k: t.clone() for k, t in x.items()}
            xm = {k: t.clone() for k, t in x.items()}
            xp[key].view(-1)[i] += h
            xm[key].view(-1)[i] -= h
            fd.view(-1)[i] = (_h(p, xp) - _h(p, xm)) / (2 * h)
        scale = float(fd.abs().max())
        assert scale > 1e-3, key  # the derivative flows through the schedule
        torch.testing.assert_close(g[key], fd, rtol=0, atol=1e-8 * scale, msg=key)


@pytest.mark.parametrize("momentum", ["per-step", "scalar", "none"])
def test_forward_mode_equals_reverse_mode(momentum):
    p = lr_learning(8, momentum=momentum, **SMALL)
    x, y = p.start()
    gr = Reverse(p.dynamics)(p.problem, x, y).grad
    gf = Forward(p.dynamics)(p.problem, x, y).grad
    assert set(gr) == set(x) == ({"log_lr"} if momentum == "none" else {"log_lr", "logit_momentum"})
    for k in x:
        torch.testing.assert_close(gf[k], gr[k], rtol=0, atol=1e-10 * float(gr[k].abs().max()))


def test_learned_schedule_beats_the_best_constant_rate_of_a_grid_on_held_out_loss():
    p = lr_learning(10, n_train=300, n_val=300, n_test=1000, seed=0)
    grid = p.grid([float(v) for v in np.logspace(-2, 1, 13)], [0.0, 0.5, 0.9])
    best = min(grid, key=lambda r: r["val_loss"])
    # the grid's best is interior (not a boundary artefact of the grid)
    assert 1e-2 < best["lr"] < 10.0
    solver = bl.solvers.HypergradientDescent(Reverse(p.dynamics), upper=Adam(lr=0.1), warm_start=False)
    res = bl.solve(p.problem, *p.start(), solver=solver, steps=40, track=False)
    yT = p.train(res.x)
    val, test = p.loss(yT, "val"), p.loss(yT, "test")
    # seed 0: val 0.555 vs 0.577, test 0.554 vs 0.573 (seeds 1-3: test margins 0.03-0.07)
    assert val < best["val_loss"] - 0.01
    assert test < best["test_loss"] - 0.01, (test, best)


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="momentum"):
        lr_learning(5, momentum="nesterov", **SMALL)
    with pytest.raises(ConfigError, match="momentum0"):
        lr_learning(5, momentum0=1.0, **SMALL)
    with pytest.raises(ConfigError, match="split"):
        lr_learning(5, n_train=10_000)
    table = bl.experiments.get("lr-learning")
    with pytest.raises(ConfigError, match="forward_steps"):
        table.runs(table.resolve(overrides={"steps": 10, "forward_steps": 3}))
    assert [r.label for r in table.runs(table.resolve(overrides={"steps": 8, "forward_steps": 4}))] == [
        "reverse", "forward"]


def test_lr_learning_experiment(tmp_path):
    small = {"data.n_train": 50, "data.n_val": 50, "data.n_test": 50, "grid.lrs": [0.1, 1.0],
             "grid.momenta": [0.0, 0.5]}
    r = bl.experiments.run("lr-learning-run", overrides={"steps": 2, "eval_every": 1, **small,
                                                          "inner.steps": 3},
                           out=tmp_path / "single", progress=False, plots=False, echo=None)
    assert r.completed and {"const_lr", "gd_lr", "const_test_loss"} <= set(r.extras)
    assert {"lr_0", "lr_2", "beta_2", "test_loss"} <= set(r.final)
