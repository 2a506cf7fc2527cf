"""``bilevel run dictionary-learning`` / ``dictionary``: task-driven dictionary learning vs alternation.

The dictionary D of :func:`bilevel.problems.dictionary_learning` (unit-norm columns) is learned
through the lasso codes Y*(D) (Mairal, Bach & Ponce 2012, task-driven dictionary learning, Eq. 8–9,
with the reconstruction as the task):

* ``bilevel`` — hypergradient descent on D (projected onto unit columns), the hypergradient by
  reverse mode through K warm-started FISTA steps on the codes (:class:`~bilevel.hypergrad.Reverse`
  with :class:`~bilevel.inner.FISTA` and the L1 prox);
* ``alternating`` — the baseline: lasso codes by the same K proximal steps, then the least-squares
  dictionary and normalization (MOD, Engan et al. 1999), one round per step;
* ``hybrid`` — ``warmup`` alternating rounds, then the bilevel steps (Mairal et al. 2012 start the
  task-driven descent from the unsupervised dictionary).

Every evaluation records ``match`` (mean over the true atoms of the largest |cos| to a learned
atom), ``found`` (true atoms with |cos| ≥ 0.99), the reconstruction error ``recon`` = f, the
lasso objective and the codes' KKT residual. ``dictionary`` runs the three methods over seeds and
tabulates them with their solver times (alternating minimization gets more rounds than it needs,
so its solver time is at least the bilevel one: the comparison is at equal or larger time for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import _tree as T
from ..hypergrad import Reverse
from ..inner import GD, Dynamics
from ..problems.dictionary import DictionaryToy, dictionary_learning
from ..solvers import HypergradientDescent
from ..solvers.base import Context, Solver
from .base import Experiment, Setup, SubResult, SubRun, Table, fmt, markdown_table, register, run_dtype
from .plots import save_figure

__all__ = ["Alternating", "Warmup", "DictionaryLearning", "Dictionary", "match_figure"]

METHODS = ("bilevel", "alternating", "hybrid")


class Alternating(Solver):
    """Alternating minimization (MOD): codes by ``inner`` from the last codes, then D = S Yᵀ(YYᵀ)⁻¹,
    normalized — one round per step (:meth:`DictionaryToy.alternating_step`)."""

    reference = "Engan, Aase & Husøy 1999 (method of optimal directions)"

    def __init__(self, toy: DictionaryToy, inner: Dynamics):
        self.toy, self.inner = toy, inner

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        D, Y = self.toy.alternating_step(state["x"][0], state["y"][0], self.inner)
        state["x"], state["y"] = (D,), (Y,)
        return {}


class Warmup(Solver):
    """``warmup`` steps of ``first``, then ``then`` (whose upper-rule state restarts at the current x)."""

    def __init__(self, first: Solver, then: HypergradientDescent, warmup: int):
        self.first, self.then, self.warmup = first, then, int(warmup)
        self.reference = f"{first.reference}, then {then.reference}"

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        return self.then.init(ctx, xs, ys)

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        if t < self.warmup:
            return self.first.step(ctx, state, t)
        if t == self.warmup:
            state["upper"] = self.then.upper.init(state["x"])
        return self.then.step(ctx, state, t - self.warmup)


@register
class DictionaryLearning(Experiment):
    name = "dictionary-learning"
    description = "dictionary learning: task-driven (bilevel, FISTA codes) vs alternating minimization"
    reference = "Mairal, Bach & Ponce 2012 (task-driven dictionary learning), Eq. 8-9; Beck & Teboulle 2009"
    defaults = {
        "seed": 0, "steps": 100, "eval_every": 10, "checkpoint_every": 0,
        "method": "bilevel",
        "warmup": 20,                 # hybrid: alternating rounds before the bilevel steps
        "data": {"dim": 8, "atoms": 10, "n": 200, "sparsity": 2, "noise": 0.0, "lam": 0.3, "init": "data"},
        "inner": {"steps": 20, "accelerated": True},   # proximal steps on the codes (warm-started)
        "upper": {"lr": 5.0},         # projected GD on D
    }
    choices = {"method": METHODS, "data.init": ("data", "random")}

    def build(self, cfg: dict[str, Any]) -> Setup:
        d = cfg["data"]
        toy = dictionary_learning(d["dim"], d["atoms"], d["n"], sparsity=d["sparsity"], noise=d["noise"],
                                  lam=d["lam"], init=d["init"], seed=cfg["seed"],
                                  dtype=run_dtype(cfg, torch.float64), device=cfg["device"])
        inner = toy.dynamics(cfg["inner"]["steps"], cfg["inner"]["accelerated"])
        bilevel = HypergradientDescent(Reverse(inner), upper=GD(lr=cfg["upper"]["lr"]), warm_start=True)
        method = cfg["method"]
        unused: set[str] = set()
        if method == "bilevel":
            solver: Solver = bilevel
            unused.add("warmup")
        elif method == "alternating":
            solver = Alternating(toy, inner)
            unused |= {"warmup", "upper.lr"}
        else:
            solver = Warmup(Alternating(toy, inner), bilevel, cfg["warmup"])

        def evaluate(D: torch.Tensor, Y: torch.Tensor) -> dict[str, float]:
            return {"match": toy.match(D), "found": float(toy.found(D)), "recon": float(toy.problem.f(D, Y)),
                    "lasso": toy.lasso(D, Y), "kkt": toy.kkt(D, Y)}

        x0, y0 = toy.start()
        return Setup(problem=toy.problem, x0=x0, y0=y0, solver=solver, evaluate=evaluate,
                     x_projection=_unit_columns, lower_prox=lambda v: toy.prox(v, 1.0),
                     progress=("match", "found"), plot_metrics=("match", "found", "recon", "kkt"),
                     unused=unused, info={"method": method})


def _unit_columns(D: torch.Tensor) -> torch.Tensor:
    from ..problems.dictionary import normalize_columns

    return normalize_columns(D)


def match_figure(results: list[SubResult], out: Path) -> Path:
    """Atom match vs solver time, one line per sub-run (colour per method)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import load_trace

    fig = Figure(figsize=(5.6, 3.8))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.14)
    ax = fig.add_subplot(1, 1, 1)
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    seen: set[str] = set()
    for r in results:
        trace = load_trace(r.path)
        m = r.run.overrides.get("method", r.run.label)
        ax.plot([max(t["time"], 1e-3) for t in trace], [t["match"] for t in trace], color=colours.get(m, "k"),
                lw=1.2, alpha=0.85, label=None if m in seen else r.run.label)
        seen.add(m)
    ax.set_xscale("log")
    ax.set_xlabel("solver time [s] (log)")
    ax.set_ylabel("mean max |cos| to the true atoms")
    ax.set_title("dictionary recovery vs time (one line per seed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, out / "dictionary_match.png")


@register
class Dictionary(Table):
    name = "dictionary"
    description = "dictionary learning: bilevel / hybrid vs alternating minimization, atoms recovered"
    reference = "Mairal, Bach & Ponce 2012, Eq. 8-9; Engan et al. 1999 (MOD)"
    defaults = {"seed": 0, "seeds": 3, "steps": 100, "warmup": 20, "alternating_steps": 800,
                "methods": list(METHODS)}
    columns = ("match", "found", "recon")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        out = []
        for m in cfg["methods"]:
            steps = cfg["alternating_steps"] if m == "alternating" else cfg["steps"]
            over: dict[str, Any] = {"method": m, "steps": steps, "eval_every": max(1, steps // 60)}
            if m == "hybrid":
                over["warmup"] = cfg["warmup"]
            out += [SubRun(label=m, experiment="dictionary-learning", seed=cfg["seed"] + k, overrides=over)
                    for k in range(cfg["seeds"])]
        return out

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        from .runner import load_trace

        rows = []
        for r in results:
            f = r.final
            start = load_trace(r.path)[0].get("match")
            rows.append([r.run.label, r.run.seed, r.run.overrides["steps"], fmt(start),
                         fmt(f.get("match")), f"{int(f.get('found', 0))}", fmt(f.get("recon")),
                         fmt(f.get("kkt")), f"{r.info['solver_time_s']:.2f}"])
        head = ["method", "seed", "steps", "match at start", "match", "atoms with abs cos ≥ 0.99", "recon f",
                "codes KKT", "solver time [s]"]
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = match_figure(results, table_dir / "plots")
        note = (f"## Dictionary learning ({cfg['steps']} bilevel steps, hybrid after {cfg['warmup']} "
                f"alternating rounds, alternating minimization {cfg['alternating_steps']} rounds)\n\n")
        return note + markdown_table(head, rows) + f"\nfigure: {fig}\n"
