"""``bilevel run poisoning`` / ``poisoning-run``: bounded poisoning perturbations of training points
against a logistic-regression classifier (Biggio, Nelson & Laskov 2012, Sec. 2–3).

The attacker's variable x = (δ_1..δ_m) of :func:`bilevel.problems.poisoning.poisoning` moves m
training points within L2 balls ‖δ_i‖ ≤ ε to maximise the validation loss of the classifier
retrained on the poisoned set. Projected hypergradient descent on f = −L_val (Adam on x, then the
projection onto the balls) with the implicit hypergradient :class:`~bilevel.hypergrad.CG` at a
lower point from warm-started Nesterov steps (step 1/L, β = (√κ − 1)/(√κ + 1) from the lower
objective's bound L and its ridge λ).

Every evaluation retrains the classifier on the poisoned data to max |∇g| ≤ 1e-9 (L-BFGS) and
records its validation / test loss and error. The baselines: the clean training set, and
``random_draws`` random perturbations with the same budget (uniform directions, ‖δ_i‖ = ε),
scored the same way (mean and standard deviation). ``poisoning`` runs several budgets ε and
tabulates attack vs random vs clean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..hypergrad import CG
from ..inner import Adam, Nesterov
from ..problems.poisoning import poisoning
from ..solvers import HypergradientDescent
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
from .plots import save_figure

__all__ = ["PoisoningRun", "PoisoningTable", "poisoning_figure"]

METRICS = ("val_loss", "val_err", "test_loss", "test_err")


def _problem(cfg: dict[str, Any]):
    d = cfg["data"]
    return poisoning(cfg["eps"], n_poison=cfg["n_poison"], classes=tuple(cfg["classes"]),
                     n_train=d["n_train"], n_val=d["n_val"], n_test=d["n_test"], ridge=d["ridge"],
                     seed=cfg["seed"], device=run_device(cfg), dtype=run_dtype(cfg, torch.float64))


@register
class PoisoningRun(Experiment):
    name = "poisoning-run"
    description = "poison m training points within L2 balls to maximise validation loss (implicit CG)"
    reference = "Biggio, Nelson & Laskov 2012 (ICML), Sec. 2-3; Mei & Zhu 2015"
    defaults = {
        "seed": 0, "steps": 100, "eval_every": 10, "checkpoint_every": 0,
        "eps": 3.0, "n_poison": 40, "classes": [7, 1],
        "data": {"n_train": 400, "n_val": 300, "n_test": 300, "ridge": 1e-2},
        "inner": {"steps": 30},                 # warm-started Nesterov steps per outer step
        "hypergrad": {"iters": 100, "tol": 1e-8},  # CG on the lower Hessian
        "upper": {"lr": 0.1},                   # Adam on δ (pixel units), then the projection
        "random_draws": 10,
    }

    def build(self, cfg: dict[str, Any]) -> Setup:
        p = _problem(cfg)
        kappa = p.condition
        inner = Nesterov(lr=1.0 / p.smoothness, momentum=(math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1),
                         steps=cfg["inner"]["steps"])
        est = CG(inner, iters=cfg["hypergrad"]["iters"], tol=cfg["hypergrad"]["tol"])
        solver = HypergradientDescent(est, upper=Adam(lr=cfg["upper"]["lr"]), warm_start=True)

        def evaluate(x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
            out = p.scores(x, y)
            out["budget_used"] = float(x.norm(dim=1).mean()) / p.eps
            return out

        def baselines() -> dict[str, Any]:
            out = {f"clean_{k}": v for k, v in p.scores(p.x0).items()}
            gen = torch.Generator().manual_seed(10_000 + int(cfg["seed"]))
            draws = [p.scores(p.random(gen)) for _ in range(int(cfg["random_draws"]))]
            for k in METRICS:
                vals = [d[k] for d in draws]
                out[f"random_{k}"] = float(np.mean(vals))
                out[f"random_{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                out[f"random_{k}_max"] = float(np.max(vals))
            out["random_draws"] = len(draws)
            return out

        def lower_star(x: torch.Tensor, y: dict[str, torch.Tensor]) -> float:
            with torch.no_grad():
                return float(p.problem.lower(x, p.retrain(x, y)))

        refs = {m: {"clean": f"clean_{m}", "random (mean)": f"random_{m}"} for m in METRICS}
        x0, y0 = p.start()
        return Setup(problem=p.problem, x0=x0, y0=y0, solver=solver, evaluate=evaluate, baselines=baselines,
                     x_projection=p.project, lower_star=lower_star, lower_star_final_only=True,
                     progress=("val_loss", "test_err"), plot_metrics=(*METRICS, "budget_used"),
                     plot_refs=refs,
                     info={"eps": p.eps, "n_poison": p.n_poison,
                           "split": [len(p.data[k][1]) for k in ("train", "val", "test")],
                           "kappa": kappa, "classes": list(p.extra["classes"])})

    def summarize(self, cfg: dict[str, Any], final: dict[str, Any], extras: dict[str, Any],
                  info: dict[str, Any]) -> str:
        return _table([(cfg["eps"], final, extras)], int(cfg["random_draws"]))


def _table(runs: list[tuple[float, dict[str, Any], dict[str, Any]]], draws: int) -> str:
    rows = []
    if runs:
        ex = runs[0][2]
        rows.append(["—", "clean training set", *(fmt(ex.get(f"clean_{m}")) for m in METRICS)])
    for eps, final, ex in runs:
        rows.append([f"{float(eps):g}", f"random, mean ± std of {draws}",
                     *(f"{fmt(ex.get(f'random_{m}'))} ± {_std(ex, m)}" for m in METRICS)])
        rows.append([f"{float(eps):g}", "attack (bilevel)", *(fmt(final.get(m)) for m in METRICS)])
    head = ["ε", "perturbation", "val loss", "val error", "test loss (held out)", "test error"]
    return markdown_table(head, rows)


def _std(ex: dict[str, Any], m: str) -> str:
    """The draws' standard deviation; 0 where every draw gave the same value (rounding noise)."""
    sd, mean = ex.get(f"random_{m}_std"), ex.get(f"random_{m}")
    if isinstance(sd, float) and isinstance(mean, float) and sd <= 1e-12 * max(abs(mean), 1e-300):
        return "0"
    return fmt(sd)


def _final_x(r: SubResult) -> torch.Tensor | None:
    from . import checkpoint as CK
    from .runner import CHECKPOINTS

    blob, _, _ = CK.load_latest(Path(r.path) / CHECKPOINTS)
    return None if blob is None else blob["state"]["x"][0]


def poisoning_figure(results: list[SubResult], out: Path, seed: int = 0) -> Path:
    """Validation loss and test error vs ε (clean, random ± std, attack), and three poisoned
    training points of the largest budget (image, δ, image + δ)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = sorted(results, key=lambda r: float(r.run.overrides["eps"]))
    eps = [float(r.run.overrides["eps"]) for r in res]
    fig = Figure(figsize=(10.5, 3.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.88, bottom=0.15, wspace=0.3)
    for i, (m, name) in enumerate((("val_loss", "validation loss (attacked)"), ("test_err", "test error"))):
        ax = fig.add_subplot(1, 4, i + 1)
        ax.axhline(res[0].extras[f"clean_{m}"], color="k", ls=":", lw=1, label="clean")
        ax.errorbar(eps, [r.extras[f"random_{m}"] for r in res], [r.extras[f"random_{m}_std"] for r in res],
                    fmt="s-", color="C0", ms=4, capsize=3, label="random, same budget")
        ax.plot(eps, [r.final[m] for r in res], "o-", color="C3", label="attack")
        ax.set_xlabel("budget ε per point (L2, pixels in [0, 1])", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    x = _final_x(res[-1])
    if x is not None:
        import json

        info = json.loads((Path(res[-1].path) / "result.json").read_text(encoding="utf-8"))["setup"]
        n_train, n_val, n_test = info["split"]
        p = poisoning(eps[-1], n_poison=x.shape[0], classes=tuple(info["classes"]), seed=seed,
                      n_train=n_train, n_val=n_val, n_test=n_test)
        a = p.data["train"][0][: x.shape[0]]
        k = int(torch.argmax(x.norm(dim=1)))
        ax_list = [fig.add_subplot(2, 8, j) for j in (5, 6, 7, 13, 14, 15)]
        for row, idx in enumerate((k, (k + 1) % x.shape[0])):
            side = int(math.isqrt(a.shape[1]))
            panels = ((a[idx], "training point"), (x[idx], f"δ (‖δ‖ = {float(x[idx].norm()):.2f})"),
                      (a[idx] + x[idx], "poisoned"))
            for c, (img, title) in enumerate(panels):
                axi = ax_list[3 * row + c]
                lim = float(x[idx].abs().max()) if c == 1 else None
                axi.imshow(img.reshape(side, side).numpy(), cmap="RdBu_r" if c == 1 else "gray",
                           vmin=-lim if lim else None, vmax=lim if lim else None)
                axi.set_xticks([])
                axi.set_yticks([])
                if row == 0:
                    axi.set_title(title, fontsize=7)
    return save_figure(fig, out / "poisoning.png")


@register
class PoisoningTable(Table):
    name = "poisoning"
    description = "poisoning attack vs random perturbations of the same L2 budget, several budgets"
    reference = "Biggio, Nelson & Laskov 2012 (ICML), Sec. 2-3; Mei & Zhu 2015"
    defaults = {"seed": 0, "eps": [1.0, 2.0, 4.0], "steps": 100, "n_poison": 40, "random_draws": 10}
    columns = METRICS

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        return [SubRun(label=f"eps={float(e):g}", experiment="poisoning-run", seed=cfg["seed"],
                       overrides={"eps": float(e), "steps": cfg["steps"], "n_poison": cfg["n_poison"],
                                  "random_draws": cfg["random_draws"]})
                for e in cfg["eps"]]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        runs = [(float(r.run.overrides["eps"]), r.final, r.extras) for r in results]
        head = (f"## Poisoning {cfg['n_poison']} training points (digits 7 vs 1, logistic regression), "
                f"{cfg['steps']} projected hypergradient steps per budget\n\n")
        text = head + _table(runs, int(cfg["random_draws"]))
        margin = [(r.final["val_loss"] - r.extras["random_val_loss"])
                  / max(r.extras["random_val_loss_std"], 1e-300) for r in results]
        text += ("\nAttack minus random mean, in random standard deviations (validation loss): "
                 + ", ".join(f"ε = {float(r.run.overrides['eps']):g}: {m:.0f}"
                             for r, m in zip(results, margin))
                 + "\n")
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = poisoning_figure(results, table_dir / "plots", int(cfg["seed"])) if results else None
        return text + f"\nfigure: {fig}\n"
