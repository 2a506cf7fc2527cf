"""Dictionary learning (issue 13.7): the atom score is invariant to sign and permutation, the
hypergradient through FISTA is the derivative of the unrolled map, and the task-driven (bilevel)
descent recovers the known dictionary better than alternating minimization given at least the
same compute (alternating minimization has stopped improving by then)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel.errors import ConfigError
from bilevel.experiments.dictionary import Alternating, Warmup
from bilevel.problems import atom_match, dictionary_learning, normalize_columns


def test_atom_match_is_invariant_to_sign_and_permutation():
    toy = dictionary_learning(6, 8, 20, seed=1)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    signs = torch.tensor([1.0, -1, 1, 1, -1, -1, 1, -1], dtype=torch.float64)
    assert toy.match(3.0 * toy.D_true[:, perm] * signs) == pytest.approx(1.0, abs=1e-14)
    assert float(atom_match(toy.D_true, toy.x0).mean()) < 0.95  # a data-initialized start is not it
    D = normalize_columns(torch.randn(6, 8, dtype=torch.float64))
    torch.testing.assert_close(D.norm(dim=0), torch.ones(8, dtype=torch.float64))
    with pytest.raises(ConfigError, match="sparsity"):
        dictionary_learning(6, 8, 20, sparsity=9)


def test_hypergradient_through_fista_is_the_derivative_of_the_unrolled_map():
    toy = dictionary_learning(4, 5, 20, seed=2)
    dyn = toy.dynamics(15)
    D, Y = toy.start()
    res = bl.hypergrad.Reverse(dyn)(toy.problem, D, Y)

    def h(Dv: torch.Tensor) -> float:
        s = dyn.init((Y,))
        for k in range(dyn.steps):
            s = dyn.update(s, (Dv.T @ (Dv @ dyn.point(s)[0] - toy.S) / toy.n,), k)
        return float(toy.problem.f(Dv, dyn.output(s)[0]))

    E = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = 1e-6
    fd = (h(D + eps * E) - h(D - eps * E)) / (2 * eps)
    assert float((res.grad * E).sum()) == pytest.approx(fd, rel=1e-6)
    # the codes are the lasso solution after enough steps: the prox-gradient mapping vanishes
    assert toy.kkt(D, _long_codes(toy, D, Y)) < 1e-8  # 600 FISTA steps: 2e-10 measured


def _long_codes(toy, D, Y):
    dyn = toy.dynamics(600)
    s = dyn.init((Y,))
    for k in range(dyn.steps):
        s = dyn.update(s, (D.T @ (D @ dyn.point(s)[0] - toy.S) / toy.n,), k)
    return dyn.output(s)[0]


def test_bilevel_recovers_the_dictionary_better_than_alternating_minimization():
    """20 alternating rounds, then 60 bilevel steps (each: 20 FISTA steps with a graph + the reverse
    sweep) vs 200 alternating rounds (20 FISTA steps + a least-squares solve each): at least the
    bilevel run's compute. Measured: match 0.9963 (9 of 10 atoms at |cos| ≥ 0.99) vs 0.9842 (8)."""
    toy = dictionary_learning(8, 10, 200, seed=0)
    inner = toy.dynamics(20)
    alt = Alternating(toy, inner)
    seen: dict[int, float] = {}
    ra = bl.solve(toy.problem, *toy.start(), solver=alt, steps=200, x_projection=normalize_columns,
                  track=False, callback=lambda t, x, y, rec: seen.__setitem__(t, toy.match(x)))
    hyb = Warmup(alt, bl.solvers.HypergradientDescent(bl.hypergrad.Reverse(inner), upper=bl.inner.GD(lr=5.0)),
                 warmup=20)
    rh = bl.solve(toy.problem, *toy.start(), solver=hyb, steps=80, x_projection=normalize_columns,
                  track=False)
    m_alt, m_hyb = toy.match(ra.x), toy.match(rh.x)
    assert abs(seen[80] - m_alt) < 1e-3  # alternating minimization has stalled: more rounds do not help
    assert m_hyb > m_alt + 0.005 and toy.found(rh.x) > toy.found(ra.x)
    assert toy.kkt(rh.x, rh.y) < 1e-2  # the warm-started codes are near the lasso solution


def test_dictionary_experiment(tmp_path):
    over = {"steps": 3, "eval_every": 3, "method": "hybrid", "warmup": 1, "data.n": 30, "inner.steps": 3}
    r = bl.experiments.run("dictionary-learning", overrides=over, out=tmp_path, progress=False, plots=False,
                           echo=None)
    assert r.completed and 0.0 < r.final["match"] <= 1.0 and r.final["kkt"] >= 0.0
    with pytest.raises(ConfigError):
        bl.experiments.run("dictionary-learning", overrides={"method": "alternating", "upper.lr": 1.0},
                           out=tmp_path / "b", progress=False, plots=False, echo=None)


def test_dictionary_table(tmp_path):
    over = {"seeds": 1, "steps": 2, "warmup": 1, "alternating_steps": 3}
    r = bl.experiments.run("dictionary", overrides=over, out=tmp_path, progress=False, plots=False, echo=None)
    assert r.completed and r.summary.count("| hybrid ") == 1
    assert (tmp_path / "plots" / "dictionary_match.png").is_file()
