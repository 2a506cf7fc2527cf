"""``bilevel run fewshot``: N-way K-shot classification with a meta-learner (issue 11).

Episodes are drawn from disjoint class splits of an offline data set (``dataset``: the bundled
MNIST sample ``mnist5k`` or scikit-learn ``digits``; meta-train classes {0..4}, meta-test classes
{5..9} with ``split = "low-high"``). The model is an MLP body ``d → hidden → hidden`` with a linear
head to ``ways`` outputs; ``method`` picks MAML, FOMAML, ANIL, iMAML, Meta-SGD, R2D2, ProtoNet or
IAPTT-GM's few-shot variant ``iaptt`` (:mod:`bilevel.meta`). Meta-training: ``steps`` outer Adam
steps on meta-batches of ``meta_batch`` tasks (vmapped over tasks). Evaluation: mean query
accuracy with a 95% confidence interval over ``test_episodes`` (≥ 600) meta-test episodes, with
``test_inner_steps`` adaptation steps.

iMAML adapts by solving its proximal problem L(y; support) + λ/2‖y − x‖² (``imaml_lam``) with
``imaml_inner_steps`` GD steps of ``imaml_inner_lr`` — at meta-training and at meta-test time
(``inner_lr`` / ``inner_steps`` / ``test_inner_steps`` are the step-based methods' settings), and
``cg_iters`` CG iterations for (I + H/λ)^{-1}. Its implicit meta-gradient is exact only at the
proximal solution, so that solve must converge (see docs/metalearning.md, "Why iMAML did not
train"); ``inner_grad_norm`` in the trace is the largest ‖∇_y g_i‖ of the meta-batch.

``device`` / ``dtype``: where and in which precision data, tasks and meta-parameters live.

``bilevel run fewshot-table`` runs every method on 5-way 1-shot and 5-shot for both data sets.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import datasets
from ..errors import ConfigError
from ..inner import GD, Adam
from ..meta import METHODS, Episodes, MLPModel, class_split
from ..meta.train import PER_TASK_LOWER, MetaTraining, evaluate_episodes, meta_problem
from .base import (
    Experiment,
    Setup,
    SubResult,
    SubRun,
    Table,
    fmt,
    markdown_table,
    register,
    run_device,
    run_dtype,
)

__all__ = ["FewShot", "FewShotTable", "make_learner"]

FEWSHOT_METHODS = ("maml", "fomaml", "anil", "imaml", "metasgd", "r2d2", "protonet", "iaptt")


def make_learner(method: str, model: MLPModel, cfg: dict[str, Any], *, loss: str, ways: int | None):
    """The :mod:`bilevel.meta` learner named ``method`` with the config's hyperparameters."""
    m = method.lower()
    if m not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    lr, k = float(cfg["inner_lr"]), int(cfg["inner_steps"])
    if m in ("maml", "fomaml", "anil", "iaptt"):
        return METHODS[m](model, lr=lr, steps=k, loss=loss, ways=ways)
    if m == "metasgd":
        return METHODS[m](model, lr0=lr, steps=k, loss=loss, ways=ways)
    if m == "imaml":
        inner = GD(lr=float(cfg["imaml_inner_lr"]), steps=int(cfg["imaml_inner_steps"]))
        return METHODS[m](model, lam=float(cfg["imaml_lam"]), inner=inner,
                          cg_iters=int(cfg["cg_iters"]), loss=loss, ways=ways)
    if loss != "ce":
        raise ConfigError(f"method {method!r} is for classification only")
    if m == "r2d2":
        return METHODS[m](model, ways=ways, lam0=float(cfg["r2d2_lam"]))
    return METHODS[m](model, ways=ways)


def _test_learner(learner, steps: int):
    """The learner used at meta-test time: ``steps`` adaptation steps for the step-based methods;
    iMAML solves the same proximal problem as in training; R2D2 / ProtoNet have no steps."""
    if getattr(learner, "inner", None) is None or isinstance(learner, METHODS["imaml"]):
        return learner
    return learner.with_steps(steps)


@register
class FewShot(Experiment):
    name = "fewshot"
    description = "N-way K-shot episodes (mnist5k / digits class splits): meta-test accuracy ± 95% CI"
    reference = ("Finn et al. 2017; Raghu et al. 2020; Rajeswaran et al. 2019; Li et al. 2017; "
                 "Bertinetto et al. 2019; Snell et al. 2017")
    defaults = {
        "steps": 300, "eval_every": 100, "checkpoint_every": 100,
        "method": "maml", "dataset": "digits", "split": "low-high",
        "ways": 5, "shots": 1, "queries": 15, "meta_batch": 8,
        "hidden": 64, "inner_lr": 0.5, "inner_steps": 5, "test_inner_steps": 10,
        "outer_lr": 0.001, "imaml_lam": 0.5, "imaml_inner_lr": 0.1, "imaml_inner_steps": 30,
        "cg_iters": 10, "r2d2_lam": 1.0,
        "test_episodes": 600, "monitor_tasks": 32,
    }
    choices = {"method": FEWSHOT_METHODS, "dataset": ("mnist5k", "digits"),
               "split": ("low-high", "even-odd")}

    def build(self, cfg: dict[str, Any]) -> Setup:
        for key, lo in (("test_episodes", 600), ("meta_batch", 1), ("hidden", 1), ("queries", 1),
                        ("monitor_tasks", 1), ("inner_steps", 1), ("test_inner_steps", 1),
                        ("imaml_inner_steps", 1), ("cg_iters", 1)):
            if int(cfg[key]) < lo:
                raise ConfigError(f"{key} must be >= {lo}, got {cfg[key]}")
        seed = int(cfg["seed"])
        dev, dt = run_device(cfg), run_dtype(cfg, torch.float32)
        data = datasets.load(cfg["dataset"])
        X = data.features(torch.float32).to(device=dev, dtype=dt)
        train_cls, test_cls = class_split(data.labels, cfg["split"])
        ways, shots, queries = int(cfg["ways"]), int(cfg["shots"]), int(cfg["queries"])

        def episodes(classes, s, name):
            return Episodes(X, data.labels, classes, ways, shots, queries, seed=s,
                            name=f"{cfg['dataset']} {name}")

        train = episodes(train_cls, seed, "meta-train")
        episodes(test_cls, seed, "meta-test")  # validates the test split now, not at the end
        model = MLPModel([X.shape[1], int(cfg["hidden"]), int(cfg["hidden"])], ways)
        learner = make_learner(cfg["method"], model, cfg, loss="ce", ways=ways)
        tester = _test_learner(learner, int(cfg["test_inner_steps"]))
        x0 = learner.init(torch.Generator().manual_seed(seed), dt, dev)
        monitor = episodes(train_cls, seed + 1, "monitor").next(int(cfg["monitor_tasks"]))
        solver = MetaTraining(learner, train, int(cfg["meta_batch"]), Adam(lr=float(cfg["outer_lr"])))

        def evaluate(x, y) -> dict[str, float]:
            # the same test episodes at every evaluation (a fresh sampler with a fixed seed)
            res = evaluate_episodes(tester, x, episodes(test_cls, 10_000 + seed, "meta-test"),
                                    int(cfg["test_episodes"]))
            return {"test_acc": res["accuracy"], "test_acc_ci95": res["accuracy_ci95"],
                    "test_loss": res["loss"]}

        return Setup(problem=meta_problem(learner, monitor), x0=x0,
                     y0=torch.zeros(1, dtype=dt, device=dev), solver=solver,
                     lower_by_design=PER_TASK_LOWER,
                     evaluate=evaluate, progress=("test_acc",), plot_metrics=("test_acc", "upper_loss"),
                     stateful={"tasks": train},
                     info={"train_classes": train_cls, "test_classes": test_cls,
                           "learner": repr(learner)})

    def summarize(self, cfg, final, extras, info) -> str:
        acc, ci = 100 * final.get("test_acc", float("nan")), 100 * final.get("test_acc_ci95", 0.0)
        rows = [["method", cfg["method"]], ["data", f"{cfg['dataset']} ({cfg['split']} classes)"],
                ["task", f"{cfg['ways']}-way {cfg['shots']}-shot"],
                ["meta-test accuracy", f"{acc:.1f} ± {ci:.1f} % ({cfg['test_episodes']} episodes)"],
                ["meta-steps", fmt(info.get("steps"))], ["solver time (s)", fmt(info.get("solver_time_s"))]]
        return markdown_table(["quantity", "value"], rows)


@register
class FewShotTable(Table):
    name = "fewshot-table"
    description = "every meta-learner on 5-way 1-shot and 5-shot, mnist5k and digits class splits"
    reference = FewShot.reference
    defaults = {"seed": 0, "methods": list(FEWSHOT_METHODS), "datasets": ["mnist5k", "digits"],
                "shots": [1, 5], "ways": 5, "steps": 300, "meta_batch": 8, "test_inner_steps": 10,
                "test_episodes": 600}

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        out = []
        for ds in cfg["datasets"]:
            for k in cfg["shots"]:
                for m in cfg["methods"]:
                    if m not in FEWSHOT_METHODS:
                        raise ConfigError(f"unknown method {m!r}; valid: {', '.join(FEWSHOT_METHODS)}")
                    over = {"method": m, "dataset": ds, "shots": int(k), "ways": int(cfg["ways"]),
                            "steps": int(cfg["steps"]), "eval_every": int(cfg["steps"]) or 1,
                            "test_episodes": int(cfg["test_episodes"]),
                            "meta_batch": int(cfg["meta_batch"]),
                            "test_inner_steps": int(cfg["test_inner_steps"])}
                    out.append(SubRun(label=f"{ds}-{cfg['ways']}w{k}s-{m}", experiment="fewshot",
                                      overrides=over, seed=int(cfg["seed"])))
        return out

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        cols = [(ds, k) for ds in cfg["datasets"] for k in cfg["shots"]]
        cell: dict[tuple[str, str, int], str] = {}
        for r in results:
            o = r.run.overrides
            if "test_acc" in r.final:
                cell[(o["method"], o["dataset"], o["shots"])] = (
                    f"{100 * r.final['test_acc']:.1f} ± {100 * r.final['test_acc_ci95']:.1f}")
        header = ["method"] + [f"{ds} {cfg['ways']}w{k}s" for ds, k in cols]
        rows = [[m] + [cell.get((m, ds, k), "—") for ds, k in cols] for m in cfg["methods"]]
        return markdown_table(header, rows)
