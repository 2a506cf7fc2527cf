"""Implicit layers (issue 13.8). Deep equilibrium: the implicit gradient of ``bl.fixed_point``
equals reverse mode through the iteration unrolled to convergence, the gap shrinking like the
contraction rate^K. Neural ODE: ``Reverse(checkpoint=True)`` gives plain reverse mode's gradient
to 1e-10 (float64) with saved memory growing like √T instead of T; the RK4/Euler steps have their
orders."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel._memory import saved_bytes
from bilevel.errors import ConfigError
from bilevel.hypergrad import Reverse
from bilevel.inner import GD
from bilevel.problems import Equilibrium, deq_regression, map_step, neural_ode


def _rel(a, b):
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in b)) / math.sqrt(
        sum(float(b[k].pow(2).sum()) for k in b))


def test_deq_implicit_gradient_equals_unrolling_to_convergence():
    toy = deq_regression(8, n_train=32, n_test=8, rho=0.9, seed=1)
    x, z0 = toy.start()
    assert float(torch.linalg.matrix_norm(toy.weight(x), 2)) == pytest.approx(0.9, rel=1e-12)
    u = toy.data["train"][0]
    phi = lambda x, z, k: toy.phi(x, z, u)  # noqa: E731
    g_imp = Equilibrium(phi, tol=1e-13)(toy.problem, x, z0).grad
    errs = {K: _rel(Reverse(GD(lr=1.0, steps=K), grad_fn=map_step(phi))(toy.problem, x, z0).grad, g_imp)
            for K in (10, 20, 150)}
    # Φ is a ρ-contraction: the unrolled derivative converges to the implicit one like K ρ^K
    for K in (10, 20):
        assert errs[K] <= 10 * K * 0.9**K
    assert errs[20] < 0.1 * errs[10]  # geometric decrease
    assert errs[150] < 1e-9  # 150 · 0.9^150 ≈ 2e-5 bound; the floor is the forward tolerance 1e-13 / (1 − ρ)
    # the layer itself: .backward() through bl.fixed_point gives the same gradient
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    z = toy.equilibrium(xs, u, tol=1e-13)
    toy.problem.f(xs, z).backward()
    assert _rel({k: v.grad for k, v in xs.items()}, g_imp) < 1e-12


def test_deq_training_beats_the_constant_predictor():
    toy = deq_regression(16, n_train=128, n_test=256, seed=0)
    var = float(toy.data["test"][1].var())
    u = toy.data["train"][0]
    solver = bl.solvers.HypergradientDescent(Equilibrium(lambda x, z, k: toy.phi(x, z, u), tol=1e-10),
                                             upper=bl.inner.Adam(lr=0.01))
    res = bl.solve(toy.problem, *toy.start(), solver=solver, steps=30, track=False)
    assert toy.mse(res.x, "test") < 0.5 * var < toy.mse(toy.x0, "test")


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_neural_ode_checkpointed_reverse_equals_plain_and_autograd(method):
    toy = neural_ode(40, method=method, hidden=8, n_train=16, n_test=4, seed=2)
    x, y0 = toy.start()
    plain = Reverse(GD(lr=1.0, steps=40), grad_fn=map_step(toy.phi))(toy.problem, x, y0).grad
    for ck in (True, 7):
        g = Reverse(GD(lr=1.0, steps=40), checkpoint=ck, grad_fn=map_step(toy.phi))(toy.problem, x, y0).grad
        for k in x:
            torch.testing.assert_close(g[k], plain[k], rtol=0, atol=1e-10)
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    toy.problem.f(xs, toy.integrate(xs, y0)).backward()  # autograd through the plain loop
    for k in x:
        torch.testing.assert_close(xs[k].grad, plain[k], rtol=1e-12, atol=1e-14)


def test_checkpointed_memory_grows_like_sqrt_T():
    mem = {}
    for T_ in (16, 64, 256):
        toy = neural_ode(T_, method="euler", hidden=8, n_train=16, n_test=4)
        x, y0 = toy.start()
        for ck in (False, True):
            est = Reverse(GD(lr=1.0, steps=T_), checkpoint=ck, grad_fn=map_step(toy.phi))
            mem[T_, ck] = saved_bytes(lambda est=est, toy=toy, x=x, y0=y0: est(toy.problem, x, y0))[1]
    for a, b in ((16, 64), (64, 256)):  # T × 4: plain memory × 4, checkpointed × 2 (= √4)
        assert 3.5 < mem[b, False] / mem[a, False] < 4.5
        assert 1.5 < mem[b, True] / mem[a, True] < 2.7
    assert mem[256, False] / mem[256, True] > 8  # √256 = 16 up to the segment's own graph


def test_integrators_have_their_order():
    errs = {}
    for method in ("euler", "rk4"):
        ref = neural_ode(512, method="rk4", n_train=8, n_test=4, seed=3)
        x, u = ref.start()
        z_ref = ref.integrate(x, u)
        errs[method] = [float((neural_ode(T_, method=method, n_train=8, n_test=4, seed=3).integrate(x, u)
                               - z_ref).abs().max()) for T_ in (8, 16)]
    assert errs["euler"][0] / errs["euler"][1] == pytest.approx(2, rel=0.2)
    assert errs["rk4"][0] / errs["rk4"][1] == pytest.approx(16, rel=0.2)
    with pytest.raises(ConfigError, match="method"):
        neural_ode(8, method="midpoint")
    with pytest.raises(ConfigError, match="rho"):
        deq_regression(rho=1.0)


def test_implicit_layer_experiments(tmp_path):
    r = bl.experiments.run("deq-train", overrides={"steps": 2, "eval_every": 2, "data.n_train": 16,
                                                   "data.n_test": 16}, out=tmp_path / "d", progress=False,
                           plots=False, echo=None)
    assert r.completed and r.final["train_mse"] > 0 and r.final["lower_gap"] < 1e-2
    r = bl.experiments.run("neural-ode-train", overrides={"steps": 2, "eval_every": 2, "ode_steps": 4,
                                                          "data.n_train": 8, "data.n_test": 8},
                           out=tmp_path / "o", progress=False, plots=False, echo=None)
    assert r.completed and r.final["test_mse"] > 0


def test_deq_and_neural_ode_tables(tmp_path):
    r = bl.experiments.run("deq", overrides={"steps": 2, "check_steps": [2]}, out=tmp_path / "deq",
                           progress=False, plots=False, echo=None)
    assert r.completed and "| implicit (fixed_point)" in r.summary
    assert (tmp_path / "deq" / "plots" / "deq.png").is_file()
    r = bl.experiments.run("neural-ode", overrides={"steps": 2, "ode_steps": 4, "memory_T": [4, 16]},
                           out=tmp_path / "ode", progress=False, plots=False, echo=None)
    assert r.completed and (tmp_path / "ode" / "plots" / "neural_ode.png").is_file()
    rows = [line for line in r.summary.splitlines() if line.startswith("| 16 ")]
    assert len(rows) == 1 and float(rows[0].split("|")[4]) == pytest.approx(4.0, rel=0.05)  # ratio = √16
