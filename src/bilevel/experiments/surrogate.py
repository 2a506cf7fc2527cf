"""``bilevel run surrogate-loss`` / ``surrogate``: a learned surrogate loss for F1 on an imbalanced
binary split vs cross-entropy.

The parameters θ of the weighted, margin-shifted logistic family of
:func:`bilevel.problems.surrogate_loss` (θ = 0: cross-entropy) are learned by
``HypergradientDescent`` (Adam on θ, the linear model warm-started), the hypergradient of the
validation soft-F1 from ``reverse`` (``Reverse(GD)``) or ``cg`` (implicit, ``CG``). Every evaluation
records test / validation F1 and accuracy of the online (warm-started) model and θ. Baselines:
cross-entropy (``ce_test_f1``) and cross-entropy with its decision threshold tuned on the
validation set (``ce_thr_test_f1``, a post-hoc fix that needs no bilevel problem).
``surrogate`` runs both estimators over several seeds (splits) and tabulates them.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from ..hypergrad import CG, Reverse
from ..inner import GD, Adam
from ..problems.surrogate import f1_data, f1_score, surrogate_loss, surrogate_value
from ..solvers import HypergradientDescent
from .base import (
    Experiment,
    Setup,
    SubResult,
    SubRun,
    Table,
    fmt,
    lower_cell,
    markdown_table,
    register,
    run_device,
    run_dtype,
)
from .plots import save_figure

__all__ = ["SurrogateLoss", "Surrogate", "surrogate_figure"]

ESTIMATORS = ("reverse", "cg")
#: the names of θ's entries in the records: class-weight logit b, margins of negatives / positives
THETA = ("b", "m_neg", "m_pos")


@register
class SurrogateLoss(Experiment):
    name = "surrogate-loss"
    description = (
        "learned surrogate loss (weighted margin logistic family) for F1 vs cross-entropy, imbalanced"
    )
    reference = "Grabocka, Scholz & Schmidt-Thieme 2019 (Learning surrogate losses, arXiv 1905.10108)"
    defaults = {
        "seed": 0,
        "steps": 100,
        "eval_every": 10,
        "checkpoint_every": 0,
        "dtype": "float64",
        "estimator": "reverse",
        "data": {
            "positive": 3,
            "pos_fraction": 0.03,
            "n_train": 2000,
            "n_val": 1500,
            "n_test": 1500,
            "pool": 2,
        },
        "reg": 1e-2,
        "temperature": 0.3,
        # GD 0.5: the curvature bound of the loss is c_max λ_max(AᵀA/n)/4 ≈ 3.4 c_max (c_max < 2);
        # with steps of 1.0 a CG run ended with an unsolved lower level
        "inner": {"lr": 0.5, "steps": 10},
        "upper": {"lr": 0.05},
        "hypergrad": {"iters": 30},
    }
    choices = {"estimator": ESTIMATORS}

    def build(self, cfg: dict[str, Any]) -> Setup:
        d = cfg["data"]
        data = f1_data(
            d["positive"],
            pos_fraction=d["pos_fraction"],
            n_train=d["n_train"],
            n_val=d["n_val"],
            n_test=d["n_test"],
            pool=d["pool"],
            seed=cfg["seed"],
            dtype=run_dtype(cfg, torch.float64),
            device=run_device(cfg),
        )
        sp = surrogate_loss(data, reg=cfg["reg"], temperature=cfg["temperature"])
        inner = GD(lr=cfg["inner"]["lr"], steps=cfg["inner"]["steps"])
        est = Reverse(inner) if cfg["estimator"] == "reverse" else CG(inner, iters=cfg["hypergrad"]["iters"])
        solver = HypergradientDescent(est, upper=Adam(lr=cfg["upper"]["lr"]), warm_start=True)
        unused = {"hypergrad.iters"} if cfg["estimator"] == "reverse" else set()

        def evaluate(x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
            out = {**sp.metrics(w), **sp.metrics(w, "val")}
            out.update({k: float(v) for k, v in zip(THETA, x)})
            return out

        def baselines() -> dict[str, Any]:
            w = sp.fit(sp.x0)
            sv = data.A_val @ w
            grid = torch.linspace(-6.0, 3.0, 181, dtype=sv.dtype).tolist()
            thr = max(grid, key=lambda t: (f1_score(sv, data.y_val, t), -abs(t)))
            return {
                "ce_test_f1": sp.metrics(w)["test_f1"],
                "ce_test_acc": sp.metrics(w)["test_acc"],
                "ce_val_f1": sp.metrics(w, "val")["val_f1"],
                "ce_thr": thr,
                "ce_thr_test_f1": f1_score(data.A_test @ w, data.y_test, thr),
            }

        x0, y0 = sp.start()
        return Setup(
            problem=sp.problem,
            x0=x0,
            y0=y0,
            solver=solver,
            evaluate=evaluate,
            baselines=baselines,
            progress=("test_f1", "val_f1"),
            plot_metrics=("test_f1", "val_f1", "upper_loss"),
            plot_refs={
                "test_f1": {"cross-entropy": "ce_test_f1", "cross-entropy, tuned threshold": "ce_thr_test_f1"}
            },
            unused=unused,
            info={"estimator": cfg["estimator"], **data.info},
        )


def surrogate_figure(results: list[SubResult], out: Path) -> Path:
    """Left: test F1 vs outer step per run, cross-entropy dashed. Right: the learned losses
    ℓ_θ(s, y) of the first seed per estimator vs cross-entropy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import load_trace

    fig = Figure(figsize=(9.0, 3.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.15, wspace=0.25)
    ax = fig.add_subplot(1, 2, 1)
    ests = list(dict.fromkeys(r.run.label for r in results))
    for r in results:
        tr = load_trace(r.path)
        c = f"C{ests.index(r.run.label)}"
        ax.plot(
            [t["step"] for t in tr],
            [t["test_f1"] for t in tr],
            color=c,
            lw=1,
            label=r.run.label if r.run.seed == results[0].run.seed else None,
        )
        ax.axhline(r.extras["ce_test_f1"], color=c, ls="--", lw=0.7)
    ax.set_title("test F1 (dashed: cross-entropy, same split)", fontsize=9)
    ax.set_xlabel("outer step", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    s = torch.linspace(-4, 4, 161, dtype=torch.float64)
    for yv, ls in ((0.0, "-"), (1.0, "--")):
        y = torch.full_like(s, yv)
        zero = torch.zeros(len(THETA), dtype=s.dtype)
        ce = [float(surrogate_value(zero, si[None], yi[None])) for si, yi in zip(s, y)]
        ax.plot(s, ce, color="k", ls=ls, lw=1, label=f"cross-entropy, y={int(yv)}")
        for label in ests:
            r = next(r for r in results if r.run.label == label)
            th = torch.tensor([r.final[k] for k in THETA], dtype=s.dtype)
            v = [float(surrogate_value(th, si[None], yi[None])) for si, yi in zip(s, y)]
            ax.plot(s, v, color=f"C{ests.index(label)}", ls=ls, label=f"learned ({label}), y={int(yv)}")
    ax.set_title("loss of a sample vs its score s", fontsize=9)
    ax.set_xlabel("score s", fontsize=8)
    ax.set_ylim(0, 8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(fig, out / "surrogate_f1.png")


@register
class Surrogate(Table):
    name = "surrogate"
    description = "surrogate-loss learning for F1: reverse / implicit vs cross-entropy over seeds"
    reference = "Grabocka, Scholz & Schmidt-Thieme 2019 (Learning surrogate losses)"
    defaults = {"seed": 0, "seeds": 3, "estimators": list(ESTIMATORS), "steps": 100}
    columns = ("test_f1", "test_acc")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        return [
            SubRun(
                label=e,
                experiment="surrogate-loss",
                seed=cfg["seed"] + k,
                overrides={"estimator": e, "steps": cfg["steps"]},
            )
            for e in cfg["estimators"]
            for k in range(cfg["seeds"])
        ]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        rows = []
        for r in results:
            f, e = r.final, r.extras
            rows.append(
                [
                    r.run.label,
                    r.run.seed,
                    fmt(e["ce_test_f1"]),
                    fmt(e["ce_thr_test_f1"]),
                    fmt(f["test_f1"]),
                    fmt(e["ce_test_acc"]),
                    fmt(f["test_acc"]),
                    ", ".join(f"{f[k]:.2f}" for k in THETA),
                    lower_cell(r),
                    f"{r.info['solver_time_s']:.1f}",
                ]
            )
        head = [
            "estimator",
            "seed",
            "CE test F1",
            "CE + val threshold",
            "learned surrogate",
            "CE test acc",
            "learned test acc",
            "θ = (b, m0, m1)",
            "lower solved",
            "time [s]",
        ]
        means = []
        for label in dict.fromkeys(r.run.label for r in results):
            rs = [r for r in results if r.run.label == label]
            gain = [r.final["test_f1"] - r.extras["ce_test_f1"] for r in rs]
            means.append(
                f"{label}: mean test-F1 gain over CE {statistics.fmean(gain):+.3f} "
                f"({sum(g > 0 for g in gain)}/{len(gain)} seeds better)"
            )
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = surrogate_figure(results, table_dir / "plots")
        note = (
            f"## Surrogate-loss learning for F1 ({cfg['steps']} outer steps, "
            f"{cfg['seeds']} seeds = splits)\n\n"
        )
        return note + markdown_table(head, rows) + "\n" + "; ".join(means) + f"\n\nfigure: {fig}\n"
