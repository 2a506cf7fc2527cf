"""``bilevel run label-learning`` / ``meta-weight-net`` / ``labels``: soft labels and a
sample-weighting network learned on a clean validation set, on noisy and on long-tailed splits.

The problems are :func:`bilevel.problems.label_learning` and :func:`bilevel.problems.meta_weight_net`
on :func:`bilevel.problems.label_data`; both run as ``HypergradientDescent`` (Adam on x) with the
linear classifier warm-started across outer steps, the hypergradient from

* ``reverse`` — ``Reverse(GD(lr, steps))``, with ``inner.steps = 1`` Meta-Weight-Net's one-step
  look-ahead (Shu et al. 2019, Alg. 1, steps 5–7);
* ``cg`` — implicit differentiation at the warm-started point after ``inner.steps`` GD steps,
  ``CG`` with ``hypergrad.iters`` iterations.

Every evaluation records the online classifier's test / validation accuracy and, on the noisy
split, precision / recall / F1 of the detected noisy samples (relative confidence or normalised
weight below ``threshold``); Meta-Weight-Net also records its weight function V(ℓ) on a loss grid
(``V_<ℓ>``). Baselines (run once): plain training on the observed labels (the uninformed
baseline), the classifier refitted at x0, and on the noisy split the clean-samples-only oracle.
``labels`` runs both methods and estimators on both splits and tabulates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..hypergrad import CG, Reverse
from ..inner import GD, Adam
from ..problems.labels import (
    LabelProblem,
    detection_scores,
    label_data,
    label_learning,
    meta_weight_net,
    weight_net,
)
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

__all__ = ["LabelLearning", "MetaWeightNet", "Labels", "labels_figure"]

ESTIMATORS = ("reverse", "cg")
#: the loss values at which Meta-Weight-Net's weight function is recorded
LOSS_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

_COMMON: dict[str, Any] = {
    "seed": 0,
    "steps": 200,
    "eval_every": 20,
    "checkpoint_every": 0,
    "dtype": "float64",
    "split": "noise",
    "estimator": "reverse",
    "data": {
        "noise": 0.4,
        "imbalance": 50.0,
        "n_train": 1000,
        "n_max": 300,
        "n_val": 200,
        "n_test": 1000,
        "pool": 2,
    },
    "reg": 1e-2,
    "threshold": 0.5,
    "hypergrad": {"iters": 20},
}


class _LabelExperiment(Experiment):
    """Shared build: data, solver, evaluation and baselines; subclasses make the problem."""

    choices = {"split": ("noise", "imbalance"), "estimator": ESTIMATORS}

    def make(self, cfg: dict[str, Any], data: Any) -> LabelProblem:
        raise NotImplementedError

    def build(self, cfg: dict[str, Any]) -> Setup:
        d, split = cfg["data"], cfg["split"]
        dtype = run_dtype(cfg, torch.float64)
        data = label_data(
            split,
            noise=d["noise"] if split == "noise" else None,
            imbalance=d["imbalance"],
            n_train=d["n_train"] if split == "noise" else d["n_max"],
            n_val=d["n_val"],
            n_test=d["n_test"],
            pool=d["pool"],
            seed=cfg["seed"],
            dtype=dtype,
            device=run_device(cfg),
        )
        lp = self.make(cfg, data)
        inner = GD(lr=cfg["inner"]["lr"], steps=cfg["inner"]["steps"])
        est = Reverse(inner) if cfg["estimator"] == "reverse" else CG(inner, iters=cfg["hypergrad"]["iters"])
        solver = HypergradientDescent(est, upper=Adam(lr=cfg["upper"]["lr"]), warm_start=True)
        unused = {"data.imbalance", "data.n_max"} if split == "noise" else {"data.noise", "data.n_train"}
        if cfg["estimator"] == "reverse":
            unused.add("hypergrad.iters")
        noisy = split == "noise"

        def evaluate(x: Any, y: torch.Tensor) -> dict[str, float]:
            out = {"test_acc": data.accuracy(y), "val_acc": data.accuracy(y, "val")}
            s = lp.scores(x, y)
            if noisy:
                out.update(detection_scores(s, data.noisy, lp.threshold))
                out["score_noisy"] = float(s[data.noisy].mean())
                out["score_clean"] = float(s[~data.noisy].mean())
            out.update(self.extra_metrics(lp, x, y))
            return out

        def baselines() -> dict[str, Any]:
            out = {"plain_test_acc": data.accuracy(lp.baseline())}
            x0, y0 = lp.start()
            out["init_test_acc"] = data.accuracy(lp.refit(x0, y0))
            if noisy:
                hard = torch.nn.functional.one_hot(data.labels, data.n_classes).to(dtype)
                out["oracle_test_acc"] = data.accuracy(
                    lp.refit(None, weights=(~data.noisy).to(dtype), targets=hard)
                )
            return out

        x0, y0 = lp.start()
        refs = {"test_acc": {"plain training": "plain_test_acc"}}
        if noisy:
            refs["test_acc"]["clean samples only"] = "oracle_test_acc"
        return Setup(
            problem=lp.problem,
            x0=x0,
            y0=y0,
            solver=solver,
            evaluate=evaluate,
            baselines=baselines,
            progress=("test_acc", "det_f1") if noisy else ("test_acc",),
            plot_metrics=("test_acc", "det_f1", "upper_loss") if noisy else ("test_acc", "upper_loss"),
            plot_refs=refs,
            unused=unused,
            info={
                "method": lp.method,
                "split": split,
                "estimator": cfg["estimator"],
                "class_counts": data.info["class_counts"],
                "n_train": data.n,
                "noise_fraction": data.info["noise_fraction"],
            },
        )

    def extra_metrics(self, lp: LabelProblem, x: Any, y: torch.Tensor) -> dict[str, float]:
        return {}


@register
class LabelLearning(_LabelExperiment):
    name = "label-learning"
    description = "soft training labels as the upper variable (noisy / long-tailed MNIST sample)"
    reference = (
        "survey 2207.11719, Table 2 (label learning: soft labels as the upper variable)"
    )
    defaults = {**_COMMON, "init_logit": 3.0, "inner": {"lr": 1.0, "steps": 5}, "upper": {"lr": 0.1}}

    def make(self, cfg: dict[str, Any], data: Any) -> LabelProblem:
        return label_learning(data, reg=cfg["reg"], init_logit=cfg["init_logit"], threshold=cfg["threshold"])

    def extra_metrics(self, lp: LabelProblem, x: Any, y: torch.Tensor) -> dict[str, float]:
        # fraction of training samples whose learned label (argmax of the soft label) is the true one
        return {"label_recovery": float((x.argmax(1) == lp.data.clean).double().mean())}


@register
class MetaWeightNet(_LabelExperiment):
    name = "meta-weight-net"
    description = (
        "Meta-Weight-Net: an MLP from a sample's loss to its weight (noisy / long-tailed MNIST sample)"
    )
    reference = "Shu et al. 2019 (Meta-Weight-Net, NeurIPS), Eq. 2-4, Alg. 1"
    defaults = {**_COMMON, "hidden": 32, "inner": {"lr": 1.0, "steps": 1}, "upper": {"lr": 0.01}}

    def make(self, cfg: dict[str, Any], data: Any) -> LabelProblem:
        return meta_weight_net(
            data, hidden=cfg["hidden"], reg=cfg["reg"], threshold=cfg["threshold"], seed=cfg["seed"]
        )

    def extra_metrics(self, lp: LabelProblem, x: Any, y: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            v = weight_net(x, torch.tensor(LOSS_GRID, dtype=y.dtype, device=y.device))
        return {f"V_{ell:g}": float(w) for ell, w in zip(LOSS_GRID, v)}


#: the runs of the ``labels`` table: label -> (experiment, overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "label learning (reverse, 5 steps)": ("label-learning", {"estimator": "reverse", "inner.steps": 5}),
    # CG with GD steps of 0.5: with 1.0 the lower level was not solved at the end of two of the CG runs
    # (‖∇g‖ = 12.7 for MW-Net on the long-tailed split): CG's hypergradients moved x to where the
    # local curvature exceeds 2 / 1.0 (λ_max(AᵀA/n) ≈ 13–20 on these splits)
    "label learning (CG, GD 0.5)": ("label-learning", {"estimator": "cg", "inner.steps": 5, "inner.lr": 0.5}),
    "MW-Net (reverse, 1 step = Alg. 1)": ("meta-weight-net", {"estimator": "reverse", "inner.steps": 1}),
    "MW-Net (reverse, 5 steps)": ("meta-weight-net", {"estimator": "reverse", "inner.steps": 5}),
    "MW-Net (CG, GD 0.5)": ("meta-weight-net", {"estimator": "cg", "inner.steps": 5, "inner.lr": 0.5}),
}


def _method(r: SubResult) -> str:
    """The method of a ``labels`` sub-run (its label is "split / method")."""
    return r.run.label.split(" / ", 1)[-1]


def labels_figure(results: list[SubResult], out: Path) -> Path:
    """Test accuracy vs outer step per split (baselines dashed) and MW-Net's learned V(ℓ)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import load_trace

    splits = list(dict.fromkeys(r.run.overrides["split"] for r in results))
    fig = Figure(figsize=(4.2 * (len(splits) + 1), 3.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.15, wspace=0.28)
    labels = list(METHODS)
    for i, split in enumerate(splits):
        ax = fig.add_subplot(1, len(splits) + 1, i + 1)
        rs = [r for r in results if r.run.overrides["split"] == split]
        for r in rs:
            tr = load_trace(r.path)
            m = _method(r)
            c = f"C{labels.index(m) if m in labels else 0}"
            ax.plot([t["step"] for t in tr], [t["test_acc"] for t in tr], color=c, label=m)
        if rs:
            ax.axhline(rs[0].extras["plain_test_acc"], color="k", ls="--", lw=1, label="plain training")
            # the step-0 point (Z = 0, accuracy 0.1) is left off
            ax.set_ylim(max(0.0, rs[0].extras["plain_test_acc"] - 0.2), None)
            if "oracle_test_acc" in rs[0].extras:
                ax.axhline(
                    rs[0].extras["oracle_test_acc"], color="0.5", ls=":", lw=1, label="clean samples only"
                )
        ax.set_title(f"{split} split: test accuracy", fontsize=9)
        ax.set_xlabel("outer step", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6)
    ax = fig.add_subplot(1, len(splits) + 1, len(splits) + 1)
    for r in results:
        if r.run.experiment == "meta-weight-net" and r.run.overrides.get("inner.steps") == 1:
            v = [r.final[f"V_{ell:g}"] for ell in LOSS_GRID]
            ax.plot(LOSS_GRID, v, marker="o", ms=3, label=f"{r.run.overrides['split']} split")
    ax.set_title("MW-Net (Alg. 1): learned weight V(loss)", fontsize=9)
    ax.set_xlabel("training loss of the sample", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "labels_accuracy.png")


@register
class Labels(Table):
    name = "labels"
    description = "label learning and Meta-Weight-Net vs plain training on noisy and long-tailed splits"
    reference = "Shu et al. 2019 (Meta-Weight-Net); survey 2207.11719, Table 2"
    defaults = {
        "seed": 0,
        "seeds": 1,
        "splits": ["noise", "imbalance"],
        "methods": list(METHODS),
        "steps": 200,
    }
    columns = ("test_acc", "det_f1")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        from ..errors import ConfigError

        bad = [m for m in cfg["methods"] if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown method(s) {bad}; valid: {list(METHODS)}")
        return [
            SubRun(
                label=f"{s} / {m}",
                experiment=METHODS[m][0],
                seed=cfg["seed"] + k,
                overrides={**METHODS[m][1], "split": s, "steps": cfg["steps"]},
            )
            for s in cfg["splits"]
            for m in cfg["methods"]
            for k in range(cfg["seeds"])
        ]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        rows = []
        for r in results:
            f, e = r.final, r.extras
            rows.append(
                [
                    r.run.overrides["split"],
                    _method(r),
                    r.run.seed,
                    fmt(e.get("plain_test_acc")),
                    fmt(e.get("init_test_acc")),
                    fmt(f.get("test_acc")),
                    fmt(f.get("det_f1", "—")),
                    fmt(f.get("det_precision", "—")),
                    fmt(f.get("det_recall", "—")),
                    lower_cell(r),
                    f"{r.info['solver_time_s']:.1f}",
                ]
            )
        head = [
            "split",
            "method",
            "seed",
            "plain training (test acc)",
            "refit at x0",
            "learned (test acc)",
            "noisy-sample F1",
            "precision",
            "recall",
            "lower solved",
            "time [s]",
        ]
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = labels_figure(results, table_dir / "plots")
        oracle = next(
            (fmt(r.extras["oracle_test_acc"]) for r in results if "oracle_test_acc" in r.extras), "—"
        )
        note = (
            f"## Label learning and Meta-Weight-Net ({cfg['steps']} outer steps)\n\n"
            f"Clean-samples-only oracle on the noisy split: test accuracy {oracle}. Detection: relative "
            "label confidence / normalised weight < threshold.\n\n"
        )
        return note + markdown_table(head, rows) + f"\nfigure: {fig}\n"
