"""The deterministic toys: their stated solutions are checked independently of any solver.

* non-convex follower: the lower minimisers are enumerated in closed form (and confirmed on a dense
  y-grid), and the optimistic value min_{y ∈ S(x)} F(x, y) is minimised over a dense x-grid;
* LLC toy: the lower solution set {y1 = x, y2 free} and F ≥ 0 = F(e, (e, e));
* quadratic: y*(x) is stationary, the closed-form hypergradient matches central differences of
  h(x) = F(x, y*(x)) and vanishes at x*.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

import bilevel as bl
from bilevel import oracles as O
from bilevel.problems import TOYS, Box, llc_toy, nonconvex_toy, quadratic_toy

F64 = torch.float64


def test_nonconvex_toy_solution_is_the_optimistic_global_minimum():
    toy = nonconvex_toy()
    xs = torch.linspace(1.0, 10.0, 90001, dtype=F64)
    # lower minimisers of −sin(xy) on [−2, 2]: xy = π/2 + 2πm (value −1, the global minimum)
    ms = torch.arange(-4, 5, dtype=F64)
    ys = (math.pi / 2 + 2 * math.pi * ms)[None, :] / xs[:, None]  # (n_x, n_m)
    feasible = ys.abs() <= 2
    F = torch.where(feasible, xs[:, None] + xs[:, None] * ys, torch.full_like(ys, math.inf))
    value = F.min(1).values  # optimistic value function φ(x) = min_{y ∈ S(x)} F(x, y)
    i = int(value.argmin())
    assert abs(float(xs[i]) - float(toy.x_star)) < 2e-4
    assert abs(float(value[i]) - toy.f_star) < 2e-4
    # φ is a saw-tooth: it drops by 2π at x = 3π/4, 7π/4, 11π/4 (local minima, value −x) and rises
    # with slope 1 in between, so the two other local minima are worse than the global one
    for xl in (3 * math.pi / 4, 7 * math.pi / 4, 11 * math.pi / 4):
        j = int(torch.searchsorted(xs, torch.tensor(xl, dtype=F64)))
        assert float(value[j]) == pytest.approx(-xl, abs=1e-3)
        assert float(value[j - 2]) == pytest.approx(-xl + 2 * math.pi, abs=1e-3)
        assert float(value[j + 100]) == pytest.approx(float(value[j]) + 100 * 1e-4, abs=1e-6)
    # at x*, y* = −2 attains the global lower minimum −1 (a dense grid of y finds nothing lower)
    ygrid = torch.linspace(-2, 2, 400001, dtype=F64)
    fx = -torch.sin(toy.x_star * ygrid)
    assert float(toy.problem.g(toy.x_star, toy.y_star)) == pytest.approx(-1.0, abs=1e-12)
    assert float(fx.min()) >= -1.0 - 1e-15
    assert float(toy.problem.f(toy.x_star, toy.y_star)) == pytest.approx(toy.f_star, abs=1e-12)
    assert toy.errors(toy.x_star, toy.y_star) == {"f": pytest.approx(toy.f_star), "f_err": 0.0,
                                                 "x_err": 0.0, "y_err": 0.0}


def test_llc_toy_solution_set_and_optimum():
    toy = llc_toy(n=7)
    e = torch.ones(7, dtype=F64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, generator=g, dtype=F64)
    y2 = torch.randn(7, generator=g, dtype=F64)
    # y1 = x is stationary for every y2 (non-singleton lower solution set) and f ignores y2
    G = bl.formulation.Bound(toy.problem, x, (x, y2)).G
    gy1, gy2 = O.grad_y(G, (x,), (x, y2))
    assert float(gy1.abs().max()) == 0.0 and float(gy2.abs().max()) == 0.0
    # F ≥ 0 everywhere and F(e, (e, e)) = 0 = F*
    for _ in range(20):
        a, b, c = (torch.randn(7, generator=g, dtype=F64) for _ in range(3))
        assert float(toy.problem.f(a, (b, c))) >= 0
    assert float(toy.problem.f(e, (e, e))) == 0.0 == toy.f_star
    assert toy.errors(e, (e, e))["x_err"] == 0.0
    # the optimistic choice y2 = x leaves ‖x − e‖⁴ on the solution set, minimised only at e
    assert float(toy.problem.f(x, (x, x))) == pytest.approx(float((x - e).norm() ** 4))
    assert toy.x_bounds == Box(-100.0, 100.0) and toy.y_projection is None


def test_quadratic_toy_closed_forms():
    toy = quadratic_toy(dim_x=3, dim_y=4, seed=3)
    ex = toy.extra
    x = torch.tensor([0.3, -1.2, 0.7], dtype=F64)
    ystar = ex["y_star_fn"](x)
    G = bl.formulation.Bound(toy.problem, x, ystar).G
    assert float(O.grad_y(G, (x,), (ystar,))[0].abs().max()) < 1e-12

    def h(v):
        return toy.problem.f(v, ex["y_star_fn"](v))

    fd = torch.stack([(h(x + 1e-6 * d) - h(x - 1e-6 * d)) / 2e-6 for d in torch.eye(3, dtype=F64)])
    torch.testing.assert_close(ex["hypergrad"](x), fd, rtol=1e-7, atol=1e-9)
    assert float(ex["hypergrad"](toy.x_star).abs().max()) < 1e-12
    torch.testing.assert_close(toy.y_star, ex["y_star_fn"](toy.x_star))
    assert toy.f_star == pytest.approx(float(h(toy.x_star)), abs=1e-14)
    # eigenvalues of the lower Hessian lie in the requested range
    lam = torch.linalg.eigvalsh(ex["H"])
    assert float(lam[0]) == pytest.approx(ex["mu"]) and float(lam[-1]) == pytest.approx(ex["L"])


def test_toy_helpers():
    toy = nonconvex_toy(5.0, 1.0)
    x, y = toy.start()
    assert float(x) == 5.0 and float(y) == 1.0
    x.add_(1.0)  # copies: the defaults are untouched
    assert float(toy.start()[0]) == 5.0
    assert float(toy.x_projection(torch.tensor(11.0))) == 10.0
    assert float(toy.y_projection(torch.tensor(-3.0))) == -2.0
    assert pickle.loads(pickle.dumps(toy.x_bounds)) == toy.x_bounds  # checkpoint-friendly
    x, y = llc_toy().start(y0=(torch.ones(50, dtype=F64), torch.zeros(50, dtype=F64)))
    assert float(y[0].sum()) == 50.0
    assert set(TOYS) == {"nonconvex", "llc", "quadratic", "stackelberg"}
    assert all(t().problem.f(*t().start()).dtype == F64 for t in TOYS.values())
