"""The bare-autograd iterations of the whole-iteration overhead benchmark
(:mod:`bilevel.bench.stochastic.whole`) compute what the solvers compute: same iterates, float64,
on a tiny hyper-cleaning problem (so the timed comparison compares the same computation)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.bench.stochastic import whole
from bilevel.sampling import FixedBatches, Minibatches

N, D, C, NV, B = 48, 6, 3, 24, 8


def _hyperclean64():
    """Hyper-cleaning in miniature (the benchmark problem's f and g: per-sample weights σ(x_i)
    on a weighted cross-entropy with ridge, validation cross-entropy above)."""
    gen = torch.Generator().manual_seed(0)
    A, Av = torch.randn(N, D, generator=gen, dtype=torch.float64), torch.randn(NV, D, generator=gen,
                                                                              dtype=torch.float64)
    lab, labv = torch.randint(C, (N,), generator=gen), torch.randint(C, (NV,), generator=gen)

    def ce(Z, A, lab):
        lt = Z.T @ A.T
        return torch.logsumexp(lt, 0) - lt.gather(0, lab[None])[0]

    def g(x, Z, batch):
        A, lab, i = batch
        c = ce(Z, A, lab)
        return torch.dot(torch.sigmoid(x.index_select(0, i)), c) / c.shape[0] + 0.2 * (Z * Z).sum()

    def f(x, Z, batch):
        A, lab = batch
        return ce(Z, A, lab).mean()

    x0 = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    y0 = 0.1 * torch.randn(D, C, generator=gen, dtype=torch.float64)
    return bl.Problem(upper=f, lower=g), (A, lab, torch.arange(N)), (Av, labv), x0, y0


CONFIGS = {
    "StocBiO": dict(lr_x=3.0, lr_y=0.1, inner_steps=3, Q=3, eta=0.1),
    "BSA": dict(lr_x={"c": 3.0, "e": 0.5}, lr_y=0.1, inner_steps=2, Q=4, eta=0.1),
    "TTSA": dict(lr_x={"c": 3.0, "e": 0.6}, lr_y={"c": 0.3, "e": 0.4}, Q=3, eta=0.1),
    "AmIGO": dict(lr_x=3.0, lr_y=0.1, inner_steps=2),
    "SOBA": dict(lr_x={"c": 3.0, "e": 0.6}, lr_y={"c": 0.3, "e": 0.4}),
    "SABA": dict(lr_x=3.0, lr_y=0.05),
    "FSLA": dict(lr_x={"c": 3.0, "e": 0.5}, lr_y={"c": 0.1, "e": 0.5}),
    "MRBO": dict(lr_x={"c": 3.0, "e": 1 / 3}, lr_y={"c": 0.3, "e": 1 / 3}, momentum_x={"c": 0.5, "e": 2 / 3},
                 Q=3, eta=0.1),
    "SUSTAIN": dict(lr_x={"c": 3.0, "e": 1 / 3}, lr_y={"c": 0.3, "e": 1 / 3},
                    momentum_x={"c": 1.0, "e": 2 / 3}, Q=3, eta=0.1),
    "VRBO": dict(lr_x=3.0, lr_y=0.3, Q=2, eta=0.1, inner_steps=2, period=3),
}


def test_every_listed_solver_has_a_bare_iteration():
    assert set(whole.BARE) == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bare_iteration_gives_the_solver_iterates(name):
    problem, lower, upper, x0, y0 = _hyperclean64()
    kind = FixedBatches if name == "SABA" else Minibatches

    def samplers():
        return kind(*lower, batch_size=B, seed=1), kind(*upper, batch_size=B, seed=2)

    solver = getattr(bl.solvers, name)(**CONFIGS[name])
    lo, up = samplers()
    bare = whole.bare_for(solver, problem.upper, problem.lower, x0, y0, *samplers())
    steps = 7  # VRBO: two restarts; every recursion past its first step
    xs, ys = [], []

    def keep(t, x, y, rec):
        xs.append(x)
        ys.append(y)

    bl.solve(problem, x0, y0, solver=solver, steps=steps, lower_data=lo, upper_data=up, track=False,
             callback=keep)
    with torch.enable_grad():
        for t in range(steps):
            bare.step(t)
            torch.testing.assert_close(bare.x, xs[t], rtol=1e-12, atol=1e-13, msg=f"x at step {t + 1}")
            torch.testing.assert_close(bare.y, ys[t], rtol=1e-12, atol=1e-13, msg=f"y at step {t + 1}")
    assert (xs[-1] - x0).abs().max() > 1e-3  # x moved: the comparison is not vacuous
    # the two loops drew the same batches: the samplers stand at the same place
    assert lo.state_dict()["pos" if kind is Minibatches else "last_index"] == \
        bare.lo.state_dict()["pos" if kind is Minibatches else "last_index"]


def test_timing_runs_and_reports_ratios():
    problem, lower, upper, x0, y0 = _hyperclean64()

    class Prob:  # the StochasticProblem interface time_solver uses
        def __init__(self):
            self.problem, self.x0, self.y0 = problem, x0, y0

        def samplers(self, seed, kind, batch_size):
            return (Minibatches(*lower, batch_size=batch_size, seed=seed),
                    Minibatches(*upper, batch_size=batch_size, seed=seed + 1))

    row = whole.time_solver(Prob(), "StocBiO", CONFIGS["StocBiO"], steps=2, iters=3, warmup=1, batch_size=B)
    assert row["iters"] == 3 and row["bare_ms"] > 0 and row["step_ratio"] > 0 and row["solve_ratio"] > 0
    assert row["solve_ratio_of_sums"] == pytest.approx(sum(row["solve_cpu"]) / sum(row["bare_cpu"]))
    assert row["x_rel_diff"] < 1e-12
    assert "| StocBiO | 3 |" in whole.table([row])
