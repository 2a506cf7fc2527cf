"""BDA's backtracked upper step (``BDA(adaptive=True)``, our safeguard; docs/deterministic.md).

* the lower trajectory is the textbook aggregated recursion with the steps s_k the estimator reports,
  each s_k passes the Armijo test and s_k/SHRINK (when not above the trial) fails it, and the
  hypergradient equals central finite differences of that K-step map (float64) — with and without
  checkpointing / truncation, which give the same steps and the same new state;
* the trials (one per lower step) are the estimator's state: stopped, saved, resumed == uninterrupted,
  and one solver object run twice gives the same result;
* from a start where the fixed step of the paper overflows, the backtracked BDA reaches the closed-form
  solution of a bilevel problem with a quartic upper objective (the LLC toy's runs from other starts are
  measured in docs/deterministic.md: 600 upper steps are too slow for a unit test);
* settings: ``mu`` together with ``schedule`` (``mu`` was silently dropped) is rejected, as are a
  non-bool ``adaptive``, a non-finite ``s_u`` and a state of the wrong shape; ``method.adaptive`` of
  the toy experiment is used by BDA and rejected for a solver that does not take it, and the toy
  experiments' ``method.truncate`` (T-RHG's truncation) no longer truncates BDA.
"""

from __future__ import annotations

import io

import pytest
import torch

import bilevel as bl
from bilevel.errors import ConfigError, NonFiniteError
from bilevel.problems import llc_toy
from bilevel.solvers.bda import ARMIJO_SIGMA, GROW, SHRINK, AggregatedReverse

F64 = torch.float64
S = bl.solvers
K, S_L, MU = 6, 0.5, 0.5


def _grads(x, y1, y2):
    """∇_y f and ∇_y g of the LLC toy: f = ‖x − y2‖⁴ + ‖y1 − e‖⁴, g = ½‖y1‖² − xᵀy1."""
    d1, d2 = y1 - 1.0, y2 - x
    return (4 * (d1 @ d1) * d1, 4 * (d2 @ d2) * d2), (y1 - x, torch.zeros_like(y2))


def _upper(x, y1, y2):
    return ((x - y2) @ (x - y2)) ** 2 + ((y1 - 1.0) @ (y1 - 1.0)) ** 2


def _textbook(x, y0, steps_used):
    """y_K of y_{k+1} = y_k − (α_k s_k ∇_y f + (1 − α_k) s_l ∇_y g), α_k = μ/(k+1)."""
    y1, y2 = y0
    for k, s in enumerate(steps_used):
        a = MU / (k + 1)
        (f1, f2), (g1, g2) = _grads(x, y1, y2)
        y1, y2 = y1 - (a * s * f1 + (1 - a) * S_L * g1), y2 - (a * s * f2 + (1 - a) * S_L * g2)
    return y1, y2


def _central_fd(fn, v, eps=1e-6):
    out = torch.zeros_like(v)
    for i in range(v.numel()):
        e = torch.zeros_like(v)
        e[i] = eps
        out[i] = (fn(v + e) - fn(v - e)) / (2 * eps)
    return out


def _bda(**kw):
    return S.BDA(bl.inner.GD(lr=S_L, steps=K), mu=MU, **{"s_u": 10.0, **kw})


def test_backtracked_steps_pass_armijo_and_the_hypergradient_is_exact():
    toy = llc_toy(n=3)
    x = torch.tensor([0.7, 1.4, 1.1], dtype=F64)
    y0 = (torch.full((3,), -2.0, dtype=F64), torch.full((3,), -2.0, dtype=F64))
    est = _bda().estimator
    state = est.init(toy.problem, x, y0)
    res = est(toy.problem, x, y0, state=state)
    used = res.info["s_u"]
    assert len(used) == K and res.info["backtracks"] > 0 and min(used) < 10.0  # the search did work
    # each s_k satisfies the Armijo test at the textbook iterate, and 2 s_k (when below the trial) fails
    y1, y2 = y0
    for k, s in enumerate(used):
        a = MU / (k + 1)
        (f1, f2), (g1, g2) = _grads(x, y1, y2)
        n2 = float(f1 @ f1 + f2 @ f2)
        f0 = float(_upper(x, y1, y2))
        assert float(_upper(x, y1 - a * s * f1, y2 - a * s * f2)) <= f0 - ARMIJO_SIGMA * a * s * n2
        if s / SHRINK <= state["s_u"][k]:
            big = s / SHRINK
            f_big = float(_upper(x, y1 - a * big * f1, y2 - a * big * f2))
            assert not f_big <= f0 - ARMIJO_SIGMA * a * big * n2
        y1, y2 = y1 - (a * s * f1 + (1 - a) * S_L * g1), y2 - (a * s * f2 + (1 - a) * S_L * g2)
    torch.testing.assert_close(res.y[0], y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.y[1], y2, rtol=1e-12, atol=1e-12)
    # exact derivative of the K-step map that was run (the steps s_k are constants of the map)
    fd = _central_fd(lambda v: _upper(v, *_textbook(v, y0, used)), x)
    torch.testing.assert_close(res.grad, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))
    # the next trials: 2 s_k (capped) where the first trial passed, else s_k
    first = [s == t for s, t in zip(used, state["s_u"])]
    assert res.state["s_u"] == [min(10.0, GROW * s) if f else s for s, f in zip(used, first)]
    assert state["s_u"] == [10.0] * K  # the state passed in is not mutated
    # checkpointing and truncation take the same steps: same y, same state, same derivative
    for kw in ({"checkpoint": True}, {"checkpoint": 2}):
        other = _bda(**kw).estimator(toy.problem, x, y0, state=state)
        torch.testing.assert_close(other.grad, res.grad, rtol=1e-12, atol=0.0)
        assert other.state == res.state and other.info["s_u"] == used
    trunc = _bda(truncate=3).estimator(toy.problem, x, y0, state=state)
    assert trunc.state == res.state and trunc.info["s_u"] == used
    torch.testing.assert_close(trunc.y[1], res.y[1], rtol=1e-12, atol=0.0)


def test_fixed_step_is_the_paper_recursion_and_untouched_by_backtracking():
    toy = llc_toy(n=3)
    x = torch.tensor([0.9, 1.2, 1.0], dtype=F64)
    y0 = (torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    solver = _bda(s_u=0.01, adaptive=False)
    assert not isinstance(solver.estimator, AggregatedReverse)
    res = solver.estimator(toy.problem, x, y0)
    y1, y2 = _textbook(x, y0, [0.01] * K)
    torch.testing.assert_close(res.y[1], y2, rtol=1e-12, atol=1e-12)
    assert "s_u" not in res.info and res.state == {}
    # where every first trial passes, the backtracked rule is the fixed one, bit for bit
    adaptive = _bda(s_u=0.01).estimator(toy.problem, x, y0)
    assert adaptive.info["backtracks"] == 0 and adaptive.info["s_u"] == [0.01] * K
    assert torch.equal(adaptive.grad, res.grad) and all(torch.equal(a, b) for a, b in zip(adaptive.y, res.y))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_resume_with_the_backtracking_state_is_bit_identical():
    toy = llc_toy(n=4, x0=2.0, y0=-2.0)
    x0, y0 = toy.start()
    solver = _bda(upper=bl.inner.Adam(lr=0.05, betas=(0.9, 0.9)))
    kw = dict(solver=solver, track=False, x_projection=toy.x_projection)
    full = bl.solve(toy.problem, x0, y0, steps=6, **kw)
    part = bl.solve(toy.problem, x0, y0, steps=3, **kw)
    rest = bl.solve(toy.problem, x0, y0, steps=6, state=_roundtrip(part.state), **kw)
    assert torch.equal(rest.x, full.x)
    assert rest.state["est"]["s_u"] == full.state["est"]["s_u"] != part.state["est"]["s_u"]
    again = bl.solve(toy.problem, x0, y0, steps=6, **kw)  # the same object, run again
    assert torch.equal(again.x, full.x) and again.state["est"] == full.state["est"]
    assert solver.estimator.direction.s_u == 10.0
    assert all(0 < h["s_u_min"] <= h["s_u_max"] <= 10.0 for h in full.history)
    assert full.history[0]["backtracks"] > 0  # the trials adapted: the state carries information


A = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5], dtype=F64)
#: f = ‖y − a‖⁴ + ½‖x − a‖², g = ½‖y − x‖²: y*(x) = x, x* = y* = a; ∇_y f is cubic in ‖y − a‖
QUARTIC = bl.Problem(lambda x, y: ((y - A) @ (y - A)) ** 2 + 0.5 * (x - A) @ (x - A),
                     lambda x, y: 0.5 * (y - x) @ (y - x))


@pytest.mark.parametrize("shift", [0.0, 10.0], ids=["y0=a", "y0=a+10"])
def test_backtracked_bda_reaches_the_solution_where_the_fixed_step_overflows(shift):
    """From y0 = a both rules reach x* = a; from y0 = a + 10 (‖y0 − a‖² = 500) the fixed s_u = 0.01
    of the first step, 4 α_0 s_u ‖y0 − a‖² = 10 > 2, overflows and the backtracked step does not. With
    s_l = 1 the lower loop leaves y_K − x = O(Π_k α_k) ≈ 1e-10, so x* = a is the solution of the
    K-step map up to O(1e-30) (the quartic is flat at a) and GD on x converges linearly."""
    x0, y0 = A + 0.3, A + shift
    kw = dict(upper_lr=0.5, mu=MU, s_u=0.01)
    gd = bl.inner.GD(lr=1.0, steps=10)
    solve = lambda solver: bl.solve(QUARTIC, x0, y0, solver=solver, steps=40, track=False)  # noqa: E731
    if shift:
        with pytest.raises(NonFiniteError):
            solve(S.BDA(gd, adaptive=False, **kw))
    else:
        assert float((solve(S.BDA(gd, adaptive=False, **kw)).x - A).norm()) < 1e-10
    res = solve(S.BDA(gd, **kw))
    assert float((res.x - A).norm()) < 1e-10 and float((res.y - A).norm()) < 1e-8


def test_settings_are_used_or_rejected():
    gd = bl.inner.GD(lr=S_L, steps=K)
    with pytest.raises(ConfigError, match="not both"):
        S.BDA(gd, mu=0.3, schedule=lambda k: 0.1)
    assert S.BDA(gd, schedule=lambda k: 0.1).alpha(3) == 0.1 and S.BDA(gd).alpha(0) == 0.5
    with pytest.raises(ConfigError, match="adaptive"):
        S.BDA(gd, adaptive="no")
    with pytest.raises(ConfigError, match="s_u"):
        S.BDA(gd, s_u=float("inf"))
    toy = llc_toy(n=3)
    x, y0 = toy.start()
    est = _bda().estimator
    with pytest.raises(ConfigError, match="trial steps"):
        est(toy.problem, x, y0, state={"s_u": [1.0] * (K - 1)})
    nan_upper = bl.Problem(lambda x, y: ((y - x) ** 2).sum().sqrt() * float("nan"),
                           lambda x, y: 0.5 * ((y - x) ** 2).sum())
    z = torch.ones(3, dtype=F64)
    with pytest.raises(NonFiniteError, match="non-finite upper objective or gradient at lower step 1"):
        S.BDA(gd, s_u=1.0).estimator(nan_upper, z, 2 * z)


def test_toy_experiment_uses_method_adaptive_for_bda_only(tmp_path):
    from bilevel.experiments import run

    common = {"toy": "llc", "steps": 1, "x0": 2.0, "y0": -2.0, "inner.lr": 0.5, "inner.steps": 4,
              "method.s_u": 0.01}
    with pytest.raises(ConfigError, match="method.adaptive"):
        run("toy", overrides={**common, "solver": "RHG", "method.adaptive": False}, out=tmp_path / "rhg",
            progress=False, echo=None)
    res = run("toy", overrides={**common, "solver": "BDA", "method.adaptive": False}, out=tmp_path / "bda",
              progress=False, echo=None)
    assert "s_u=0.01, adaptive=False" in res.summary  # the summary says which rule ran
    # method.truncate is T-RHG's: BDA differentiates its whole trajectory (it was truncated silently)
    line = next(ln for ln in res.summary.splitlines() if "BDA(inner=" in ln)
    assert "truncate=" not in line
    # the fixed step was used: from this start it blows up within 4 lower steps (the backtracked one
    # descends: test_resume_with_the_backtracking_state_is_bit_identical, n = 4, same start)
    assert res.final["upper_loss"] > 1e100


def test_cli_checkpoint_resume_with_the_backtracking_state_is_bit_identical(tmp_path):
    from bilevel.experiments import load_trace, run
    from tests.experiments.conftest import strip_time

    sets = {"toy": "llc", "solver": "BDA", "steps": 6, "x0": 2.0, "y0": -2.0, "inner.lr": 0.5,
            "inner.steps": 4, "upper.optimizer": "adam", "upper.lr": 0.05, "method.s_u": 10.0,
            "checkpoint_every": 1, "memory_every": 1000}
    kw = dict(progress=False, echo=None, plots=False)
    run("toy", overrides=sets, out=tmp_path / "ref", **kw)
    part = run("toy", overrides=sets, out=tmp_path / "cut", stop_after=3, **kw)
    assert not part.completed
    assert run("toy", resume=tmp_path / "cut", **kw).completed
    ref, cut = load_trace(tmp_path / "ref"), load_trace(tmp_path / "cut")
    assert strip_time(cut) == strip_time(ref)
    assert sum(r.get("backtracks") or 0 for r in ref) > 0  # the trials adapted along the way
