"""Dataset distillation (issue 13.2): Wang et al.'s unrolled hypergradient is the exact derivative
of the T-step map (float64 central differences), the KIP closed-form hypergradient is the exact
derivative through the kernel ridge solve (and equals the implicit CG one), and on a tiny split the
distilled images beat the same number of random real images by a statistically clear margin."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel.errors import ConfigError
from bilevel.experiments.distillation import distilled_images, image_grid
from bilevel.hypergrad import CG
from bilevel.problems.distillation import (
    class_centroids,
    distillation,
    kernel_distillation,
    load_distillation_data,
    random_real,
)
from bilevel.sampling import Minibatches

F64 = torch.float64


def _directional_fd(h, x: dict, v: dict, eps: float) -> float:
    """(h(x + εv) − h(x − εv)) / 2ε."""
    plus = {k: x[k] + eps * v[k] for k in x}
    minus = {k: x[k] - eps * v[k] for k in x}
    with torch.no_grad():
        return float((h(plus) - h(minus)) / (2 * eps))


def _fd_floor(h, x: dict, eps: float) -> float:
    """Rounding floor of the central difference: each h carries ~10·ε_mach·|h| of rounding (an
    unrolled computation), divided by 2ε — about 5e-11 for |h| ≈ 2 at ε = 1e-5, which is above
    rel = 1e-7 of a 2e-4 derivative (such a test failed on one machine's rounding)."""
    with torch.no_grad():
        return 10 * torch.finfo(torch.float64).eps * max(1.0, abs(float(h(x)))) / eps


def _random_direction(x: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in x.items()}


def test_reverse_equals_finite_differences_of_the_unrolled_map_from_a_random_init():
    data = load_distillation_data(100, 20, downsample=7, dtype=F64)          # 4x4 pixels
    pb = distillation(2, model="mlp", hidden=6, steps=4, n_inits=3, lr0=0.3, per_step_lr=True, data=data)
    x, _ = pb.start()
    x["log_lr"] = x["log_lr"] + torch.linspace(-0.3, 0.3, 4, dtype=F64)   # distinct per-step rates
    y0 = pb.init(7)                                                          # one draw of θ0 (3 models)
    res = pb.estimator()(pb.problem, x, y0)

    def h(z):  # x -> f(x, θ_T(x; θ0)): the unrolled map, plain GD written out here
        y = {k: t.clone() for k, t in y0.items()}
        for k in range(pb.steps):
            with torch.enable_grad():
                y = {n: t.detach().requires_grad_() for n, t in y.items()}
                gr = torch.autograd.grad(pb.problem.g(z, y), list(y.values()))
            y = {n: t - z["log_lr"][k].exp() * d for (n, t), d in zip(y.items(), gr)}
        return pb.problem.f(z, y)

    floor = _fd_floor(h, x, 1e-5)
    for seed in range(3):
        v = _random_direction(x, seed)
        exact = sum(float((res.grad[k] * v[k]).sum()) for k in x)
        fd = _directional_fd(h, x, v, 1e-5)
        assert fd == pytest.approx(exact, rel=1e-7, abs=floor)
    # the learned rates get a derivative (one per step) and so do the images
    assert res.grad["log_lr"].shape == (4,) and bool((res.grad["log_lr"] != 0).all())


def test_random_init_solver_draws_a_fresh_reproducible_init_each_step():
    data = load_distillation_data(100, 20, downsample=7)
    pb = distillation(1, steps=2, n_inits=2, data=data)
    a, b = pb.init(3), pb.init(4)
    assert torch.equal(a["W"], pb.init(3)["W"]) and not torch.allclose(a["W"], b["W"])
    seen = []
    solver = pb.solver(0.1)
    orig = pb.problem.lower

    def spy(x, y):  # record the θ0 each outer step starts from (the first lower call of the step)
        seen.append(y["W"].detach().clone())
        return orig(x, y)

    pb.problem.lower = spy
    bl.solve(pb.problem, *pb.start(), solver=solver, steps=3, track=False)
    starts = [w for w in seen if any(torch.equal(w, pb.init(t)["W"]) for t in range(3))]
    assert {next(t for t in range(3) if torch.equal(w, pb.init(t)["W"])) for w in starts} == {0, 1, 2}
    with pytest.raises(ConfigError, match="init"):
        distillation(1, data=data, init="zeros")


def test_kip_closed_form_hypergradient_equals_finite_differences_and_implicit_cg():
    data = load_distillation_data(200, 20, downsample=7, dtype=F64)
    kd = kernel_distillation(2, gamma=0.5, reg0=0.05, data=data, init="real")
    x, a0 = kd.start()
    res = kd.estimator()(kd.problem, x, a0)
    alpha = res.y
    # α* minimizes the lower objective: ∇_α g(x, α*) = 0
    a = alpha.clone().requires_grad_()
    (ga,) = torch.autograd.grad(kd.problem.g(x, a), a)
    assert float(ga.norm()) < 1e-10 * float(alpha.norm())

    def h(z):
        return kd.problem.f(z, kd.solve(z))

    floor = _fd_floor(h, x, 1e-5)
    for seed in range(3):
        v = _random_direction(x, seed)
        exact = sum(float((res.grad[k] * v[k]).sum()) for k in x)
        assert _directional_fd(h, x, v, 1e-5) == pytest.approx(exact, rel=1e-7, abs=floor)
    # the same hypergradient from the optimality condition (AID-CG at y = α*)
    cg = CG(None, iters=200, tol=1e-13)(kd.problem, x, alpha)
    for k in x:
        assert torch.allclose(cg.grad[k], res.grad[k], rtol=1e-6, atol=1e-10)


def test_distilled_images_beat_random_real_images_of_the_same_count():
    data = load_distillation_data(1000, 500, downsample=2)                  # 14x14 pixels
    pb = distillation(1, steps=10, n_inits=4, lr0=0.01, data=data)
    up = Minibatches(*data["train"], batch_size=250, seed=0)
    res = bl.solve(pb.problem, *pb.start(), solver=pb.solver(bl.inner.Adam(lr=0.1)), steps=60,
                   upper_data=up, track=False)
    n = 10
    dist = pb.evaluate(res.x["images"], res.x["log_lr"].exp(), n_inits=n)       # 10 unseen inits
    g = torch.Generator().manual_seed(1)
    Xtr, ttr = data["train"]
    # the best rate of a grid for the real images (chosen on the test split: in their favour)
    draws = [random_real(Xtr, ttr, 1, 10, g) for _ in range(8)]
    rand = max((torch.cat([pb.evaluate(S, lr, n_inits=n) for S in draws]) for lr in (0.03, 0.1, 0.3, 1.0)),
               key=lambda a: float(a.mean()))
    se = math.sqrt(float(dist.var()) / dist.numel() + float(rand.var()) / rand.numel())
    margin = float(dist.mean() - rand.mean())
    assert margin > 0.15 and margin > 6 * se, (float(dist.mean()), float(rand.mean()), se)
    # and more: the distilled images beat the class means trained the same way
    means = pb.evaluate(class_centroids(Xtr, ttr, 1, 10), 0.3, n_inits=n)
    assert float(dist.mean()) > float(means.mean())


def test_distillation_experiment_and_bad_settings(tmp_path):
    small = {"steps": 2, "eval_every": 2, "data.n_train": 200, "data.n_test": 100, "data.downsample": 4,
             "data.batch": 100, "eval.draws": 2}
    for method in ("unrolled", "kip"):
        extra = {"eval.long_steps": 5, "eval.inits": 5} if method == "unrolled" else {}
        over = {**small, "method": method, **extra}
        r = bl.experiments.run("distillation-run", overrides=over, out=tmp_path / method, progress=False,
                               plots=False, echo=None)
        assert r.completed and 0.0 <= r.final["test_acc"] <= 1.0
        assert {"random_acc", "means_acc"} <= set(r.extras)
        assert "Wang et al. 2018" in r.summary
        images = distilled_images(r.path)                 # the table draws these from the checkpoint
        assert images.shape == (10, 49)
        assert image_grid(images, 10, tmp_path / f"{method}.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="kip.gamma"):
        bl.experiments.run("distillation-run", overrides={**small, "kip.gamma": 2.0}, out=tmp_path / "bad",
                           progress=False, plots=False, echo=None)
    with pytest.raises(ConfigError):
        bl.experiments.run("distillation-run", overrides={**small, "method": "gradient-matching"},
                           out=tmp_path / "bad2", progress=False, plots=False, echo=None)


def test_distillation_table_runs_the_grid_and_passes_the_model_to_the_unrolled_runs_only():
    exp = bl.experiments.get("distillation")
    runs = exp.runs(exp.resolve(overrides={"model": "mlp", "ipc": [1, 10]}))
    assert [r.label for r in runs] == ["unrolled-ipc1-mlp", "kip-ipc1", "unrolled-ipc10-mlp", "kip-ipc10"]
    assert runs[0].overrides["model.kind"] == "mlp" and runs[0].overrides["model.hidden"] == 64
    assert not any(k.startswith("model.") for k in runs[1].overrides)  # kip would reject them
    with pytest.raises(ConfigError, match="methods"):
        exp.runs(exp.resolve(overrides={"methods": ["unrolled", "dc"]}))
