"""Proxy (best-response) methods as solvers' estimators (issue 13.10): hypergradient descent with
STN on ridge regularisation tracks the implicit (CG) descent — the same final h(x) = f(x, y*(x))
by the closed form — with hypergradients at cos ≥ 0.9 to the exact ones along the run; the
``proxy-ridge`` experiment resumes exactly (the proxy's φ and Adam moments live in the solver
state), and the ``proxy`` table reports every estimator's cost against Reverse."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import torch

import bilevel as bl
import bilevel.experiments  # noqa: F401  (bl.experiments.run)
from bilevel.hypergrad import CG, STN
from bilevel.inner import GD, Adam
from bilevel.problems import proxy_ridge
from bilevel.solvers.base import descend


class _ClosedForm:
    """The exact hypergradient (closed form), called like an estimator for the loop below."""

    def __init__(self, pr):
        self.pr = pr

    def init(self, *a):
        return {}

    def __call__(self, problem, x, y, state):
        return SimpleNamespace(grad=self.pr.hypergrad(x), y=y, state=state)


def test_stn_descent_follows_the_exact_descent_and_its_hypergradients_are_accurate():
    pr = proxy_ridge(dim=6, n_train=30, n_val=100, seed=1)
    lr = 1.0 / pr.lower_lipschitz(torch.full_like(pr.x0, 2.0))
    ests = {"exact": _ClosedForm(pr), "stn": STN(radius=0.1, samples=8, warmup=60, steps=5, lr=0.01),
            "cg": CG(GD(lr=lr, steps=50), iters=20, tol=1e-10)}
    out = {}
    for name, est in ests.items():
        x, y, state, coss = pr.x0, pr.y0, est.init(pr.problem, pr.x0, pr.y0), []
        rule = Adam(lr=0.05)
        rs = rule.init((x,))
        for t in range(30):
            res = est(pr.problem, x, y, state=state)
            ex = pr.hypergrad(x)
            coss.append(float(res.grad @ ex / (res.grad.norm() * ex.norm())))
            state, y = res.state, res.y
            (x,), rs = descend(rule, rs, (res.grad,), t, lambda xs: tuple(u.clamp(-4, 2) for u in xs))
        out[name] = (pr.h(x), coss)
    h0, h_ex = pr.h(pr.x0), out["exact"][0]
    (h_stn, c_stn), (h_cg, c_cg) = out["stn"], out["cg"]
    assert h0 - h_ex > 0.1 * h0                             # 30 exact steps go somewhere
    assert abs(h_stn - h_ex) < 0.1 * (h0 - h_ex)            # STN ends near where the exact descent ends
    assert abs(h_cg - h_ex) < 0.01 * (h0 - h_ex)
    assert statistics.median(c_stn) > 0.9 and min(c_cg) > 0.99


def test_proxy_ridge_experiment_resumes_exactly(tmp_path):
    over = {"estimator": "stn", "steps": 6, "eval_every": 2, "checkpoint_every": 3,
            "stn.warmup": 10, "stn.steps": 3}
    full = bl.experiments.run("proxy-ridge", overrides=over, out=tmp_path / "a", progress=False,
                              plots=False, echo=None)
    part = bl.experiments.run("proxy-ridge", overrides=over, out=tmp_path / "b", progress=False,
                              plots=False, echo=None, stop_after=3)
    assert not part.completed
    done = bl.experiments.run("proxy-ridge", resume=part.path, progress=False, plots=False, echo=None)
    assert done.completed and done.final["h"] == full.final["h"]
    assert done.final["cos_exact"] == full.final["cos_exact"]


def test_proxy_table_reports_cost_against_reverse(tmp_path):
    over = {"estimators": ["evograd", "reverse"], "steps": 3, "reps": 1}
    r = bl.experiments.run("proxy", overrides=over, out=tmp_path, progress=False, plots=False, echo=None)
    assert r.completed
    rows = [ln for ln in r.summary.splitlines() if ln.startswith("| EvoGrad") or ln.startswith("| Reverse")]
    assert len(rows) == 2
    rev = rows[1].split("|")
    assert rev[7].strip() == "1.00" and rev[9].strip() == "1.000"   # Reverse against itself
