"""``bilevel run sinusoid``: few-shot sinusoid regression (Finn et al. 2017, Sec. 5.1).

Tasks y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]; ``shots`` support and
``queries`` query points; MLP 1-40-40-1 (ReLU); inner GD with step ``inner_lr`` (0.01 in the
paper) for ``inner_steps`` steps (1 in the paper) during meta-training; outer Adam. Reported: the
meta-test MSE (± 95% CI over ``test_episodes`` tasks) after 1 and after 10 adaptation steps, and
the same for the un-meta-trained initialization (a pretrained-free reference). An adaptation that
diverges (non-finite query losses, e.g. Meta-SGD's rates learned for one step applied ten times) is
reported as an MSE of inf, not as an error, so the other numbers of the run survive.
iMAML solves its proximal problem with ``imaml_inner_steps`` GD steps of ``imaml_inner_lr``
(λ = ``imaml_lam``) in meta-training; "after k steps" at meta-test time means k GD steps on that
proximal objective.
``device`` / ``dtype``: where and in which precision tasks and meta-parameters live.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError, NonFiniteError
from ..inner import Adam
from ..meta import MLPModel, SinusoidTasks
from ..meta.train import PER_TASK_LOWER, MetaTraining, evaluate_episodes, meta_problem
from .base import Experiment, Setup, fmt, markdown_table, register, run_device, run_dtype
from .fewshot import make_learner

__all__ = ["Sinusoid"]

SINUSOID_METHODS = ("maml", "fomaml", "anil", "imaml", "metasgd")


@register
class Sinusoid(Experiment):
    name = "sinusoid"
    description = "few-shot sinusoid regression (MAML Sec. 5.1): meta-test MSE after 1 and 10 steps"
    reference = "Finn, Abbeel & Levine 2017, Sec. 5.1"
    defaults = {
        "steps": 1000, "eval_every": 250, "checkpoint_every": 250,
        "method": "maml", "shots": 10, "queries": 10, "meta_batch": 25, "hidden": 40,
        "inner_lr": 0.01, "inner_steps": 1, "outer_lr": 0.001, "imaml_lam": 2.0,
        "imaml_inner_lr": 0.02, "imaml_inner_steps": 40, "cg_iters": 5,
        "test_episodes": 600, "r2d2_lam": 1.0,
    }
    choices = {"method": SINUSOID_METHODS}

    def build(self, cfg: dict[str, Any]) -> Setup:
        if int(cfg["test_episodes"]) < 600:
            raise ConfigError(f"test_episodes must be >= 600, got {cfg['test_episodes']}")
        seed = int(cfg["seed"])
        shots, queries = int(cfg["shots"]), int(cfg["queries"])
        h = int(cfg["hidden"])
        model = MLPModel([1, h, h], 1)
        learner = make_learner(cfg["method"], model, cfg, loss="mse", ways=None)
        dev, dt = run_device(cfg), run_dtype(cfg, torch.float32)
        x0 = learner.init(torch.Generator().manual_seed(seed), dt, dev)

        def tasks(s: int) -> SinusoidTasks:
            return SinusoidTasks(shots, queries, seed=s, dtype=dt, device=dev)

        train = tasks(seed)
        monitor = tasks(seed + 1).next(100)
        solver = MetaTraining(learner, train, int(cfg["meta_batch"]), Adam(lr=float(cfg["outer_lr"])))
        testers = {k: learner.with_steps(k) for k in (1, 10)}
        n_test = int(cfg["test_episodes"])

        def evaluate(x, y) -> dict[str, float]:
            out = {}
            for k, t in testers.items():
                try:
                    r = evaluate_episodes(t, x, tasks(10_000 + seed), n_test)
                except NonFiniteError:  # e.g. Meta-SGD's rates, learned for 1 step, used for 10
                    r = {"loss": math.inf, "loss_ci95": math.nan}
                out[f"mse_{k}step"], out[f"mse_{k}step_ci95"] = r["loss"], r["loss_ci95"]
            return out

        return Setup(problem=meta_problem(learner, monitor), x0=x0,
                     y0=torch.zeros(1, dtype=dt, device=dev), solver=solver,
                     lower_by_design=PER_TASK_LOWER,
                     evaluate=evaluate, progress=("mse_1step", "mse_10step"),
                     plot_metrics=("mse_1step", "mse_10step"), stateful={"tasks": train},
                     baselines=lambda: {f"init_{k}": v for k, v in evaluate(x0, None).items()},
                     info={"learner": repr(learner)})

    def summarize(self, cfg, final, extras, info) -> str:
        def num(v):  # the trace stores inf / nan as strings
            try:
                return float(v)
            except (TypeError, ValueError):
                return math.nan

        def cell(d, k, pre=""):
            return f"{num(d.get(pre + f'mse_{k}step')):.3f} ± {num(d.get(pre + f'mse_{k}step_ci95')):.3f}"

        rows = [["method", cfg["method"]],
                ["meta-test MSE, 1 step", cell(final, 1)], ["meta-test MSE, 10 steps", cell(final, 10)],
                ["initialization only, 1 step", cell(extras, 1, "init_")],
                ["initialization only, 10 steps", cell(extras, 10, "init_")],
                ["meta-steps", fmt(info.get("steps"))], ["solver time (s)", fmt(info.get("solver_time_s"))]]
        return markdown_table(["quantity", "value"], rows)
