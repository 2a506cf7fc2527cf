"""Fixed per-step hyperparameters of the lower dynamics (issue 10: lower-level lr schedules).

``bl.inner.PerStep`` (values or a callable of the step index) and ``bl.estimates.Schedule`` are
resolved per step by the same ``Dynamics.hp`` as constants and callables of x. References:
hand-written loops (to rounding: the dynamics use fused multiply-adds) and, for the hypergradient
through a schedule combined with a learned rate, the finite-difference helper of
test_inner_hyperparams (float64, rtol 1e-6).
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel import inner
from bilevel.errors import ConfigError
from bilevel.estimates import Schedule
from tests.test_inner_hyperparams import PROBLEM, Y0, X, fd_grad, lower

F64 = torch.float64
LRS = [0.3, 0.2, 0.25, 0.1]


def _grad(x, y):
    yr = y.detach().requires_grad_(True)
    return torch.autograd.grad(lower(x, yr), yr)[0]


def _run(dyn, x=None):
    x = X() if x is None else x
    d = dyn.bind(x, Y0)
    s = d.init((Y0,))
    for k in range(d.steps):
        s = d.update(s, (_grad(x, d.point(s)[0]),), k)
    return d.output(s)[0]


def test_per_step_values_equal_a_hand_written_loop():
    x, y = X(), Y0.clone()
    for lr in LRS:
        y = y - lr * _grad(x, y)
    for sched in (LRS, torch.tensor(LRS, dtype=F64), tuple(LRS)):
        torch.testing.assert_close(_run(inner.GD(lr=inner.PerStep(sched), steps=4)), y,
                                   rtol=1e-15, atol=1e-16)
    # callable of the step index, and the stochastic solvers' Schedule c / (k + t0)^e
    y2 = Y0.clone()
    for k in range(5):
        y2 = y2 - (0.4 / (k + 1) ** 0.5) * _grad(x, y2)
    torch.testing.assert_close(_run(inner.GD(lr=inner.PerStep(lambda k: 0.4 / (k + 1) ** 0.5),
                                             steps=5)), y2, rtol=1e-15, atol=1e-16)
    torch.testing.assert_close(_run(inner.GD(lr=Schedule(0.4, 0.5), steps=5)), y2, rtol=1e-15, atol=1e-16)


def test_momentum_and_adam_take_per_step_rates():
    x = X()
    y, m = Y0.clone(), torch.zeros(3, dtype=F64)
    for lr in LRS:
        m = 0.5 * m + _grad(x, y)
        y = y - lr * m
    torch.testing.assert_close(_run(inner.Momentum(lr=inner.PerStep(LRS), momentum=0.5, steps=4)),
                               y, rtol=1e-15, atol=0)
    # Adam: the schedule multiplies the bias-corrected step at each k
    ya = Y0.clone()
    m, v = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    for k, lr in enumerate(LRS):
        g = _grad(x, ya)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        ya = ya - lr * (m / (1 - 0.9 ** (k + 1))) / (torch.sqrt(v / (1 - 0.999 ** (k + 1)) + 1e-16)
                                                     + 1e-8)
    torch.testing.assert_close(_run(inner.Adam(lr=inner.PerStep(LRS), steps=4)), ya,
                               rtol=1e-14, atol=0)


def test_schedule_combined_with_a_learned_hyperparameter_matches_finite_differences():
    """A fixed lr schedule with a learned momentum (callable of x): Reverse (plain and
    checkpointed) and Forward equal central differences of the unrolled map."""
    dyn = inner.Momentum(lr=inner.PerStep(LRS), momentum=lambda x: x["beta"], steps=4)
    x = X(beta=0.6)
    ref = fd_grad(dyn, x)
    assert float(ref["beta"].abs()) > 1e-3
    for est in (bl.hypergrad.Reverse(dyn), bl.hypergrad.Reverse(dyn, checkpoint=2),
                bl.hypergrad.Forward(dyn)):
        g = est(PROBLEM, x, Y0).grad
        for k in x:
            torch.testing.assert_close(g[k], ref[k], rtol=1e-6, atol=1e-9, msg=f"{est} {k}")


def test_an_implicit_estimator_solves_the_lower_level_with_the_schedule():
    y_sched = bl.hypergrad.CG(inner.GD(lr=inner.PerStep(LRS), steps=4), iters=3)(PROBLEM, X(), Y0).y
    torch.testing.assert_close(y_sched, _run(inner.GD(lr=inner.PerStep(LRS), steps=4)),
                               rtol=1e-15, atol=1e-16)


def test_bad_schedules_name_the_problem():
    with pytest.raises(ConfigError, match="PerStep has 3 values but steps=4"):
        inner.GD(lr=inner.PerStep([0.1, 0.2, 0.3]), steps=4)
    with pytest.raises(ValueError, match=r"GD.lr at step 1 must be positive"):
        inner.GD(lr=inner.PerStep([0.1, -0.2]), steps=2)
    with pytest.raises(ConfigError, match="1-D"):
        inner.PerStep(torch.ones(2, 2))
    with pytest.raises(ConfigError, match="requires grad"):
        inner.PerStep(torch.ones(3, requires_grad=True))
    with pytest.raises(ConfigError, match="value 1 is str"):
        inner.PerStep([0.1, "a"])
    dyn = inner.GD(lr=inner.PerStep(lambda k: -1.0 if k == 2 else 0.1), steps=4)
    with pytest.raises(ValueError, match="at step 2 must be positive"):
        _run(dyn)
    short = inner.GD(lr=inner.PerStep([0.1, 0.1]), steps=2)
    with pytest.raises(ConfigError, match="inner step 2 was requested"):
        b = bl.formulation.Bound(PROBLEM, X(), Y0)
        bl.hypergrad.base.solve_lower(b, short, b.xs, b.ys0, steps=3)
