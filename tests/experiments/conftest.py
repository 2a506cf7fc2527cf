"""A toy experiment and table registered for the runner tests (removed afterwards)."""

from __future__ import annotations

import time

import pytest
import torch

import bilevel as bl
from bilevel.experiments import Experiment, Setup, SubRun, Table, register
from bilevel.experiments import base as B

#: tiny hyperclean config: runs in well under a second
TINY_HC = {
    "data.n_train": 60, "data.n_val": 30, "data.n_test": 60, "steps": 6, "eval_every": 1,
    "checkpoint_every": 2, "lower.steps": 3, "baseline.max_iter": 20,
}


class Quad(Experiment):
    """f = ½‖y − b‖², g = ½‖y − x‖² (so y*(x) = x, h(x) = ½‖x − b‖², x* = b)."""

    name = "test-quad"
    description = "toy quadratic for the runner tests"
    reference = "tests"
    defaults = {"seed": 0, "steps": 8, "eval_every": 2, "checkpoint_every": 4, "sleep": 0.0,
                "upper": {"lr": 0.3, "optimizer": "gd"}, "dim": 3}
    choices = {"upper.optimizer": ("gd", "adam")}

    def build(self, cfg):
        d = cfg["dim"]
        b = torch.arange(1.0, d + 1.0, dtype=torch.float64)
        problem = bl.Problem(upper=lambda x, y: 0.5 * ((y - b) ** 2).sum(),
                             lower=lambda x, y: 0.5 * ((y - x) ** 2).sum())
        est = bl.hypergrad.CG(bl.inner.GD(lr=0.5, steps=30), iters=10, warm_start=True)
        upper = bl.experiments.factory.make_dynamics(cfg["upper"]["optimizer"], cfg["upper"]["lr"])
        solver = bl.solvers.HypergradientDescent(est, upper=upper)

        def evaluate(x, y):
            time.sleep(cfg["sleep"])
            return {"x_err": float((x - b).norm()), "threads": torch.get_num_threads()}

        return Setup(problem=problem, x0=torch.zeros(d, dtype=torch.float64),
                     y0=torch.zeros(d, dtype=torch.float64), solver=solver, evaluate=evaluate,
                     baselines=lambda: {"optimum": 0.0}, progress=("x_err",))


class QuadTable(Table):
    name = "test-quad-table"
    description = "toy table"
    defaults = {"seed": 0, "seeds": 2, "lrs": [0.1, 0.5]}
    columns = ("x_err",)

    def runs(self, cfg):
        return [SubRun(label=f"lr={lr}", experiment="test-quad", seed=cfg["seed"] + k,
                       overrides={"upper.lr": lr})
                for lr in cfg["lrs"] for k in range(cfg["seeds"])]


@pytest.fixture(autouse=True, scope="package")
def toy_experiments():
    B._discover()
    register(Quad)
    register(QuadTable)
    yield
    B._REGISTRY.pop("test-quad", None)
    B._REGISTRY.pop("test-quad-table", None)


def strip_time(trace):
    """The trace without wall times and the ``compiled`` marker (under ``--solve-compile`` the
    first step of a pattern runs eagerly in whichever run meets it first)."""
    return [{k: v for k, v in r.items() if k not in ("time", "compiled")} for r in trace]
