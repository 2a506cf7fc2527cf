"""``bilevel run lr-learning`` / ``lr-learning-run``: learn the per-step learning rate and momentum
of T training steps (Franceschi, Donini, Frasconi & Pontil 2017, Sec. 2; Maclaurin et al. 2015).

The upper variable of :func:`bilevel.problems.lr_learning.lr_learning` is the schedule
(log η_k, logit β_k) of T heavy-ball steps on a logistic-regression training loss, the upper
objective the validation loss of the T-th iterate. Hypergradient descent (Adam on x, every
hyper-step restarts the T steps from y_0 = 0: ``warm_start=False``) with the hypergradient from

* ``reverse`` — :class:`~bilevel.hypergrad.Reverse` (RHG, reverse mode through the T steps);
* ``forward`` — :class:`~bilevel.hypergrad.Forward` (forward mode / RTRL, one tangent per entry of x).

Both compute the same derivative of the same map, so their searches follow the same path (the
table compares their schedules after the forward run's steps). The baseline is a grid of constant
rates (and constant momenta): the configuration with the lowest *validation* loss after the same T
steps, reported on the held-out test split like the learned schedule. Each evaluation records the
schedule (``lr_k``, ``beta_k``) and the validation / test loss and error of y_T(x).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..hypergrad import Forward, Reverse
from ..inner import Adam
from ..problems.lr_learning import MOMENTUM_MODES, lr_learning
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

__all__ = ["LRLearningRun", "LRLearningTable", "schedule_figure"]

ESTIMATORS = ("reverse", "forward")


def _build_problem(cfg: dict[str, Any]):
    d, i = cfg["data"], cfg["inner"]
    return lr_learning(i["steps"], momentum=cfg["momentum"], source=d["source"], n_train=d["n_train"],
                       n_val=d["n_val"], n_test=d["n_test"], ridge=d["ridge"], lr0=i["lr0"],
                       momentum0=i["momentum0"], seed=cfg["seed"], device=run_device(cfg),
                       dtype=run_dtype(cfg, torch.float64))


@register
class LRLearningRun(Experiment):
    name = "lr-learning-run"
    description = "learn a per-step learning-rate / momentum schedule (forward or reverse mode)"
    reference = "Franceschi, Donini, Frasconi & Pontil 2017 (ICML), Sec. 2; Maclaurin et al. 2015"
    defaults = {
        "seed": 0, "steps": 200, "eval_every": 10, "checkpoint_every": 0,
        "estimator": "reverse",
        "momentum": "per-step",
        "data": {"source": "mnist5k", "n_train": 1000, "n_val": 500, "n_test": 2000, "ridge": 1e-2},
        "inner": {"steps": 20, "lr0": 0.1, "momentum0": 0.5},   # T and the starting schedule
        "upper": {"lr": 0.05},                                   # Adam on (log η, logit β)
        "grid": {"lrs": [float(v) for v in np.logspace(-3, 1, 25)], "momenta": [0.0, 0.5, 0.9]},
    }
    choices = {"estimator": ESTIMATORS, "momentum": MOMENTUM_MODES,
               "data.source": ("mnist5k", "digits")}

    def build(self, cfg: dict[str, Any]) -> Setup:
        p = _build_problem(cfg)
        est = Reverse(p.dynamics) if cfg["estimator"] == "reverse" else Forward(p.dynamics)
        solver = HypergradientDescent(est, upper=Adam(lr=cfg["upper"]["lr"]), warm_start=False)

        def evaluate(x: dict[str, torch.Tensor], y: Any) -> dict[str, float]:
            yT = p.train(x)  # y_T of the current schedule (the solver's y is from the previous x)
            out = {f"{s}_loss": p.loss(yT, s) for s in ("train", "val", "test")}
            out.update({f"{s}_err": p.error(yT, s) for s in ("val", "test")})
            lrs, betas = p.schedule(x)
            out.update({f"lr_{k}": float(v) for k, v in enumerate(lrs)})
            out.update({f"beta_{k}": float(v) for k, v in enumerate(betas)})
            return out

        def baselines() -> dict[str, Any]:
            rows = p.grid(cfg["grid"]["lrs"], cfg["grid"]["momenta"])
            out: dict[str, Any] = {}
            for tag, sel in (("gd", [r for r in rows if r["momentum"] == 0.0]), ("const", rows)):
                if not sel:
                    continue
                best = min(sel, key=lambda r: r["val_loss"])
                out.update({f"{tag}_{k}": v for k, v in best.items()})
            return out

        x0, y0 = p.start()
        return Setup(problem=p.problem, x0=x0, y0=y0, solver=solver, evaluate=evaluate, baselines=baselines,
                     lower_by_design=f"the lower level is {p.steps} training steps from y0 (the upper "
                                     "objective is the loss of that iterate), not an argmin",
                     progress=("val_loss", "test_loss"),
                     plot_metrics=("val_loss", "test_loss", "test_err", "lr_0", f"lr_{p.steps - 1}"),
                     plot_refs={"val_loss": {"best constant (grid)": "const_val_loss"},
                                "test_loss": {"best constant (grid)": "const_test_loss"},
                                "test_err": {"best constant (grid)": "const_test_err"}},
                     info={"T": p.steps, "momentum": p.momentum, "estimator": cfg["estimator"],
                           "x_dim": sum(v.numel() for v in x0.values())})

    def summarize(self, cfg: dict[str, Any], final: dict[str, Any], extras: dict[str, Any],
                  info: dict[str, Any]) -> str:
        return _table([("learned schedule", final)], extras, cfg)


def _row(label: str, r: dict[str, Any], prefix: str = "") -> list[str]:
    return [label, *(fmt(r.get(prefix + k)) for k in ("val_loss", "test_loss", "val_err", "test_err"))]


def _table(learned: list[tuple[str, dict[str, Any]]], extras: dict[str, Any], cfg: dict[str, Any]) -> str:
    rows = []
    for tag, label in (("gd", "best constant rate, plain GD"), ("const", "best constant (rate, momentum)")):
        if f"{tag}_lr" in extras:
            rows.append(_row(f"{label}: η = {extras[f'{tag}_lr']:.3g}, β = {extras[f'{tag}_momentum']:g}",
                             extras, f"{tag}_"))
    rows += [_row(label, r) for label, r in learned]
    head = ["schedule", "val loss", "test loss (held out)", "val error", "test error"]
    return markdown_table(head, rows)


def _schedule(r: dict[str, Any], key: str) -> list[float]:
    k, out = 0, []
    while f"{key}_{k}" in r:
        out.append(float(r[f"{key}_{k}"]))
        k += 1
    return out


def schedule_figure(results: list[SubResult], extras: dict[str, Any], out: Path) -> Path:
    """The learned η_k and β_k against the step k with the best constant of the grid, and the
    validation / test loss of y_T against the hyper-step with the best constant's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import load_trace

    fig = Figure(figsize=(12.0, 3.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.88, bottom=0.15, wspace=0.3)
    for i, (key, name) in enumerate((("lr", "learned learning rate η_k"), ("beta", "learned momentum β_k"))):
        ax = fig.add_subplot(1, 3, i + 1)
        for c, r in enumerate(results):
            vals = _schedule(r.final, key)
            ax.plot(range(len(vals)), vals, "o-", ms=3, color=f"C{c}", label=f"learned ({r.run.label})")
        base = extras.get("const_lr" if key == "lr" else "const_momentum")
        if isinstance(base, (int, float)):
            ax.axhline(base, color="k", ls="--", lw=1, label="best constant (grid)")
        ax.set_xlabel("inner step k", fontsize=8)
        ax.set_title(name, fontsize=9)
        if key == "lr":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 3, 3)
    for split, ls in (("val", "-"), ("test", "--")):
        for r in results[:1]:
            tr = [t for t in load_trace(r.path) if f"{split}_loss" in t]
            ax.plot([t["step"] for t in tr], [t[f"{split}_loss"] for t in tr], ls, color="C3",
                    label=f"learned: {split} loss")
        ref = extras.get(f"const_{split}_loss")
        if isinstance(ref, (int, float)):
            ax.axhline(ref, color="k", ls=ls, lw=1, label=f"best constant: {split} loss")
    ax.set_xlabel("hyper-step", fontsize=8)
    ax.set_title("loss of y_T (validation: optimised; test: held out)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "lr_learning_schedule.png")


@register
class LRLearningTable(Table):
    name = "lr-learning"
    description = "learned per-step learning-rate/momentum schedule vs the best constant rate of a grid"
    reference = "Franceschi, Donini, Frasconi & Pontil 2017 (ICML), Sec. 2; Maclaurin et al. 2015"
    defaults = {"seed": 0, "steps": 200, "forward_steps": 4, "momentum": "per-step", "inner_steps": 20,
                "hypergrad_timing": True}
    columns = ("val_loss", "test_loss", "test_err")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        base = {"momentum": cfg["momentum"], "inner.steps": cfg["inner_steps"]}
        fs = int(cfg["forward_steps"])
        if fs < 0 or (fs and cfg["steps"] % fs):
            raise ConfigError(f"forward_steps must be 0 or divide steps={cfg['steps']} (the reverse run "
                              f"is evaluated every forward_steps to compare the two), got {fs}")
        every = fs if fs else 10  # a reverse record at the forward run's last step
        out = [SubRun(label="reverse", experiment="lr-learning-run", seed=cfg["seed"],
                      overrides={**base, "estimator": "reverse", "steps": cfg["steps"], "eval_every": every})]
        if fs:
            out.append(SubRun(label="forward", experiment="lr-learning-run", seed=cfg["seed"],
                              overrides={**base, "estimator": "forward", "steps": fs,
                                         "eval_every": fs}))
        return out

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        from .runner import load_trace

        rev = [r for r in results if r.run.label == "reverse"]
        fwd = [r for r in results if r.run.label == "forward"]
        extras = results[0].extras if results else {}
        learned = [(f"learned, {r.run.label} mode ({r.info['steps']} hyper-steps)", r.final) for r in rev]
        text = (f"## Learning-rate schedule learning (T = {cfg['inner_steps']} heavy-ball steps, "
                f"momentum {cfg['momentum']}, {cfg['steps']} Adam hyper-steps)\n\n")
        text += _table(learned, extras, cfg)
        if rev and isinstance(extras.get("const_test_loss"), (int, float)):
            d_val = rev[0].final["val_loss"] - extras["const_val_loss"]
            d_test = rev[0].final["test_loss"] - extras["const_test_loss"]
            verdict = "beats" if d_val < 0 and d_test < 0 else "does NOT beat"
            text += (f"\nThe learned schedule {verdict} the best constant of the grid: validation loss "
                     f"{d_val:+.4f}, held-out test loss {d_test:+.4f}.\n")
        if rev and fwd:
            fs = int(fwd[0].info["steps"])
            at = {t["step"]: t for t in load_trace(rev[0].path)}.get(fs)
            if at is not None:
                diff = max(abs(math.log(_schedule(at, "lr")[k]) - math.log(v))
                           for k, v in enumerate(_schedule(fwd[0].final, "lr")))
                text += (f"\nForward mode vs reverse mode: after {fs} hyper-steps the two searches' "
                         f"learning rates differ by max_k |Δ log η_k| = {diff:.2e}; solver time "
                         f"{fwd[0].info['solver_time_s'] / fs:.3f} s vs "
                         f"{rev[0].info['solver_time_s'] / max(1, int(rev[0].info['steps'])):.3f} s "
                         "per hyper-step (forward: one tangent per entry of x).\n")
        if cfg["hypergrad_timing"] and rev:
            text += _timing(cfg)
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = schedule_figure(rev or results, extras, table_dir / "plots")
        return text + ("\nThe lower level is T training steps by design (the upper objective is the "
                       "loss of the T-th iterate), not an argmin: no solved / not-solved verdict.\n"
                       f"\nfigure: {fig}\n")


def _timing(cfg: dict[str, Any]) -> str:
    """One Forward and one Reverse hypergradient at x0, side by side: time and relative difference."""
    over = {"momentum": cfg["momentum"], "inner.steps": cfg["inner_steps"], "seed": cfg["seed"]}
    run_cfg = LRLearningRun().resolve(overrides=over)
    p = _build_problem(run_cfg)
    x, y = p.start()
    out = {}
    for name, est in (("reverse", Reverse(p.dynamics)), ("forward", Forward(p.dynamics))):
        est(p.problem, x, y)  # warm-up (vmap tracing, allocator)
        t0 = time.perf_counter()
        out[name] = (est(p.problem, x, y).grad, time.perf_counter() - t0)
    num = max(float((out["forward"][0][k] - out["reverse"][0][k]).abs().max()) for k in x)
    den = max(float(out["reverse"][0][k].abs().max()) for k in x)
    return (f"\nOne hypergradient at x0 (dim x = {sum(v.numel() for v in x.values())}): reverse "
            f"{out['reverse'][1]:.3f} s, forward {out['forward'][1]:.3f} s; max |forward − reverse| / "
            f"max |reverse| = {num / den:.1e} (shared machine: times indicative).\n")
