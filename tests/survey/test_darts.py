"""DARTS-style architecture search toy (issue 13.6): the finite-difference (DARTS second-order)
hypergradient converges to the exact derivative of the one-virtual-step map as eps → 0, with the
O(eps²) error of a central difference, and the search with it picks the teacher's operation."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel.errors import ConfigError
from bilevel.hypergrad import FiniteDifference, Reverse
from bilevel.inner import GD, Adam
from bilevel.problems.darts import darts_toy, mixed_op


def test_finite_difference_converges_quadratically_to_reverse_through_the_virtual_step():
    toy = darts_toy(hidden=3, n_train=60, n_val=60, n_test=10)
    x = 0.3 * torch.randn(len(toy.ops), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = toy.start()[1]
    xi = 0.1
    # DARTS Eq. 6-8 approximate the derivative of x -> f(x, y − ξ∇_y g(x, y)): reverse mode through one step
    ref = Reverse(GD(lr=xi, steps=1))(toy.problem, x, y).grad
    errs = [float((FiniteDifference(None, eps=eps, xi=xi)(toy.problem, x, y).grad - ref).norm() / ref.norm())
            for eps in (1e-1, 1e-2, 1e-3)]
    assert errs[0] / errs[1] == pytest.approx(100, rel=0.05)
    assert errs[1] / errs[2] == pytest.approx(100, rel=0.05)
    assert errs[2] < 1e-5


def test_mixed_op_and_bad_settings():
    h = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    x = torch.tensor([0.0, 100.0], dtype=torch.float64)  # softmax ≈ one-hot on the second op
    assert torch.allclose(mixed_op(x, h, ("identity", "square")), h * h, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="unknown"):
        darts_toy(("identity", "conv"))
    with pytest.raises(ConfigError, match="true_op"):
        darts_toy(("identity", "relu"), "square")


def test_search_with_the_second_order_estimate_picks_the_teachers_operation():
    toy = darts_toy(hidden=3, n_train=100, n_val=100, n_test=10)
    solver = bl.solvers.HypergradientDescent(FiniteDifference(GD(lr=0.1, steps=10), eps=0.01),
                                             upper=Adam(lr=0.1), warm_start=True)
    res = bl.solve(toy.problem, *toy.start(), solver=solver, steps=40, track=False)
    w = torch.softmax(res.x, 0)
    assert toy.picked(res.x) == "square"
    # from uniform weights 0.2 each: the right operation clearly dominates after 40 steps
    assert float(w[toy.ops.index("square")]) > 0.4 and float(w.sort().values[-2]) < 0.3


def test_darts_toy_experiment(tmp_path):
    over = {"steps": 2, "eval_every": 2, "data.n_train": 40, "data.n_val": 40, "data.n_test": 40,
            "retrain_steps": 100, "exact_steps": 5, "estimator": "firstorder"}
    r = bl.experiments.run("darts-toy", overrides=over, out=tmp_path, progress=False, plots=False, echo=None)
    ops = ("identity", "relu", "tanh", "sin", "square")
    assert r.completed and set(r.extras) == {f"retrain_{op}" for op in ops}
    assert all(v == v for v in r.extras.values())  # finite test MSE of every single-op network
    assert -1.0 <= r.final["cos_exact"] <= 1.0 and r.final["picked_right"] in (0.0, 1.0)
