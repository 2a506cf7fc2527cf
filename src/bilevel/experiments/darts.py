"""``bilevel run darts-toy`` / ``darts``: DARTS-style search on a toy where one operation is right.

The architecture weights x of :func:`bilevel.problems.darts.darts_toy` (softmax-mixed candidate
activations of a one-hidden-layer network) are searched by hypergradient descent with warm-started
network weights y (DARTS, Liu, Simonyan & Yang 2019, Alg. 1), the hypergradient from

* ``firstorder`` — DARTS first order: ∇_x f(x, y) (the implicit term dropped, Eq. 6 with ξ = 0);
* ``fd`` — DARTS second order (:class:`~bilevel.hypergrad.FiniteDifference`, Eq. 7–8);
* ``exact`` — the implicit hypergradient with the dense lower Hessian (:class:`~bilevel.hypergrad.Exact`).

Every evaluation records the softmax weight of each operation (``w_<op>``), whether argmax_k x_k
is the teacher's operation (``picked_right``), validation and test MSE, and ``cos_exact``: the
cosine between the hypergradient the search uses at the current (x, y) (its estimator, with its
10 warm-started inner steps) and the exact implicit hypergradient at the lower solution reached from
y by ``exact_steps`` more GD steps.
The baselines retrain the network with each single operation (``retrain_<op>``: test MSE), which
shows which operation is right. ``darts`` runs the three estimators and tabulates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..hypergrad import Exact, FiniteDifference, FirstOrder
from ..hypergrad.base import solve_lower
from ..inner import GD, Adam
from ..problems.darts import OPS, darts_toy
from ..solvers import HypergradientDescent
from .base import Experiment, Setup, SubResult, SubRun, Table, fmt, markdown_table, register
from .plots import save_figure

__all__ = ["DartsToy", "Darts", "search_figure"]

ESTIMATORS = ("firstorder", "fd", "exact")


def _estimator(name: str, inner: GD | None, xi: float, eps: float) -> Any:
    if name == "firstorder":
        return FirstOrder(inner)
    if name == "fd":
        return FiniteDifference(inner, eps=eps, xi=xi)
    return Exact(inner)


@register
class DartsToy(Experiment):
    name = "darts-toy"
    description = "DARTS-style mixed-operation search (first order / finite difference / exact) on a toy"
    reference = "Liu, Simonyan & Yang 2019 (DARTS, ICLR), Alg. 1, Eq. 6-8"
    defaults = {
        "seed": 0, "steps": 150, "eval_every": 10, "checkpoint_every": 0,
        "estimator": "fd",
        "ops": ["identity", "relu", "tanh", "sin", "square"],
        "true_op": "square",
        "data": {"dim": 5, "hidden": 3, "n_train": 200, "n_val": 200, "n_test": 1000, "noise": 0.1,
                 "ridge": 1e-2},
        "inner": {"lr": 0.1, "steps": 10},    # lower GD steps per search step (warm-started)
        "upper": {"lr": 0.05},                # Adam on the architecture weights
        "fd": {"eps": 0.01},
        "retrain_steps": 2000,                # baselines: each single operation trained alone
        "exact_steps": 300,                   # lower GD steps before the exact reference hypergradient
    }
    choices = {"estimator": ESTIMATORS}

    def build(self, cfg: dict[str, Any]) -> Setup:
        d = cfg["data"]
        toy = darts_toy(tuple(cfg["ops"]), cfg["true_op"], dim=d["dim"], hidden=d["hidden"],
                        n_train=d["n_train"], n_val=d["n_val"], n_test=d["n_test"], noise=d["noise"],
                        ridge=d["ridge"], seed=cfg["seed"])
        lr, xi, eps = cfg["inner"]["lr"], cfg["inner"]["lr"], cfg["fd"]["eps"]
        inner = GD(lr=lr, steps=cfg["inner"]["steps"])
        est = _estimator(cfg["estimator"], inner, xi, eps)
        solver = HypergradientDescent(est, upper=Adam(lr=cfg["upper"]["lr"]), warm_start=True)
        exact = Exact(GD(lr=lr, steps=cfg["exact_steps"]))

        def evaluate(x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
            w = torch.softmax(x, dim=0)
            out = {f"w_{op}": float(w[k]) for k, op in enumerate(toy.ops)}
            out["picked_right"] = float(toy.picked(x) == toy.true_op)
            out["val_mse"], out["test_mse"] = toy.mse(x, y, "val"), toy.mse(x, y, "test")
            with torch.enable_grad():
                a = est(toy.problem, x, y).grad
                b = exact(toy.problem, x, y).grad
            out["cos_exact"] = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
            return out

        def baselines() -> dict[str, Any]:
            out = {}
            for k, op in enumerate(toy.ops):
                x1 = torch.full_like(toy.x0, -1e4)
                x1[k] = 0.0  # softmax = one-hot: the network with this operation only
                bound_y = _retrain(toy, x1, cfg["retrain_steps"], 0.5 * lr)  # one op alone: steeper
                out[f"retrain_{op}"] = toy.mse(x1, bound_y, "test")
            return out

        x0, y0 = toy.start()
        return Setup(problem=toy.problem, x0=x0, y0=y0, solver=solver, evaluate=evaluate, baselines=baselines,
                     progress=("picked_right", "val_mse"),
                     plot_metrics=(*(f"w_{op}" for op in toy.ops), "val_mse", "cos_exact"),
                     info={"ops": list(toy.ops), "true_op": toy.true_op})


def _retrain(toy: Any, x: torch.Tensor, steps: int, lr: float) -> dict[str, torch.Tensor]:
    from ..formulation import Bound

    bound = Bound(toy.problem, x, toy.y0)
    ys, _ = solve_lower(bound, GD(lr=lr, steps=steps), bound.xs, bound.ys0)
    return bound.y_tree(ys)


def search_figure(results: list[SubResult], out: Path) -> Path:
    """Softmax weight of each operation vs search step, one panel per estimator."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import load_trace

    fig = Figure(figsize=(4.0 * len(results), 3.3))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.85, bottom=0.15, wspace=0.25)
    for i, r in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        trace = load_trace(r.path)
        ops = [k[2:] for k in trace[0] if k.startswith("w_")]
        for c, op in enumerate(ops):
            ax.plot([t["step"] for t in trace], [t[f"w_{op}"] for t in trace], color=f"C{c}", label=op,
                    lw=2.0 if op == r.run.overrides.get("true_op", "square") else 1.0)
        verdict = "right" if r.final.get("picked_right") else "WRONG"
        ax.set_title(f"{r.run.label}: picked {verdict}", fontsize=9)
        ax.set_xlabel("search step", fontsize=8)
        ax.set_ylabel("softmax(x)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1)
    fig.axes[0].legend(fontsize=7)
    return save_figure(fig, out / "darts_weights.png")


@register
class Darts(Table):
    name = "darts"
    description = "DARTS toy: first-order vs finite-difference (second-order) vs exact hypergradient search"
    reference = "Liu, Simonyan & Yang 2019 (DARTS, ICLR), Alg. 1, Eq. 6-8"
    defaults = {"seed": 0, "seeds": 1, "estimators": list(ESTIMATORS), "steps": 150}
    columns = ("picked_right", "val_mse", "test_mse", "cos_exact")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        return [SubRun(label=e, experiment="darts-toy", seed=cfg["seed"] + k,
                       overrides={"estimator": e, "steps": cfg["steps"]})
                for e in cfg["estimators"] for k in range(cfg["seeds"])]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        ops = [k[2:] for k in results[0].final if k.startswith("w_")] if results else list(OPS)
        rows = []
        for r in results:
            f = r.final
            rows.append([r.run.label, r.run.seed, ops[max(range(len(ops)), key=lambda k: f[f"w_{ops[k]}"])],
                         "yes" if f.get("picked_right") else "no",
                         fmt(f.get(f"w_{r.run.overrides.get('true_op', 'square')}")), fmt(f.get("val_mse")),
                         fmt(f.get("test_mse")), fmt(f.get("cos_exact")), f"{r.info['solver_time_s']:.2f}"])
        head = ["estimator", "seed", "picked", "right?", "weight of the right op", "val MSE", "test MSE",
                "cos to exact (last step)", "time [s]"]
        retrain = results[0].extras if results else {}
        base = ", ".join(f"{k[8:]} {fmt(v)}" for k, v in retrain.items() if k.startswith("retrain_"))
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = search_figure(results, table_dir / "plots")
        note = (f"## DARTS toy ({cfg['steps']} search steps, Adam 0.05 on x, 10 warm-started GD steps of 0.1 "
                "on the weights per step)\n\nTest MSE of the network retrained with a single operation "
                f"(seed {cfg['seed']}): {base}.\n\n")
        return note + markdown_table(head, rows) + f"\nfigure: {fig}\n"
