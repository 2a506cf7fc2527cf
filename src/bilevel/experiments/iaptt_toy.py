"""``bilevel run iaptt-toy``: every deterministic solver on the non-convex toy (IAPTT-GM, Sec. 4.1).

``bilevel run iaptt-toy`` is the analogue of Liu et al. 2021 (NeurIPS), Sec. 4.1: every solver from
the three starts (x0, y0) ∈ {(1, 2), (5, 1), (7, −1)} on the non-convex-follower toy (Eq. 10);
figures of the errors vs upper iterations (Fig. 1), the average truncation index (Fig. 2) and a table
of final errors, lower-level gaps, wall time and graph memory (Table 1). Each row is one run of the
``toy`` experiment (:mod:`bilevel.experiments.toy`); the settings are the paper's (App. C.1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import SubResult, SubRun, Table, fmt, markdown_table, register
from .plots import save_figure
from .toy import TOY_SOLVERS
from .trace import load_trace

__all__ = ["IapttToy", "toy_figures"]


# --- the comparison table -----------------------------------------------------------------------------
def _group(results: list[SubResult]) -> dict[str, list[SubResult]]:
    out: dict[str, list[SubResult]] = {}
    for r in results:
        out.setdefault(r.run.label.split("@")[0], []).append(r)
    return out


def _series(trace: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in trace if isinstance(r.get(key), (int, float))]
    a = np.asarray(pts, dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def toy_figures(results: list[SubResult], out: Path, name: str, panel: Callable[[SubResult], str],
                metrics: tuple[str, ...] = ("f_err", "x_err"), kstar: bool = True) -> list[Path]:
    """Errors vs upper iterations (one row per metric, one column per ``panel(run)`` value: the start,
    the step size, ...) with one line per method, and the running mean of k* of the IA methods."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    groups = _group(results)
    panels = list(dict.fromkeys(panel(r) for r in results))
    traces = {id(r): load_trace(r.path) for r in results}
    ylab = {"f_err": "|f − f*| / |f*|", "x_err": "‖x − x*‖ / ‖x*‖", "lower_gap": "g − g*"}
    fig = Figure(figsize=(4.2 * len(panels) + 0.4, 3.0 * len(metrics) + 0.6))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.86 if len(metrics) > 1 else 0.8, bottom=0.1,
                        wspace=0.25, hspace=0.4)
    for i, m in enumerate(metrics):
        for j, pn in enumerate(panels):
            ax = fig.add_subplot(len(metrics), len(panels), i * len(panels) + j + 1)
            for c, (label, rs) in enumerate(groups.items()):
                for r in rs:
                    if panel(r) == pn:
                        st, v = _series(traces[id(r)], m)
                        ax.semilogy(st, np.maximum(v, 1e-16), color=f"C{c % 10}", ls="-" if c < 10 else "--",
                                    lw=1.1, label=label)
            ax.set_title(pn, fontsize=9)
            ax.set_ylabel(ylab.get(m, m), fontsize=8)
            ax.set_xlabel("upper iteration", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(10, len(labels)), fontsize=8, frameon=False)
    paths = [save_figure(fig, out / f"{name}_errors.png")]

    def kseries(r: SubResult) -> tuple[np.ndarray, np.ndarray]:
        return _series(traces[id(r)], "k_star")

    # methods whose k* varies (the truncated ones); IA-GM / IA-GM(A) always use k* = K
    ks = {k: v for k, v in groups.items() if any(len(set(kseries(r)[1].tolist())) > 1 for r in v)}
    K = max((int(kseries(r)[1].max()) for r in results if kseries(r)[1].size), default=0)
    if kstar and ks:
        fig = Figure(figsize=(6.4, 3.6))
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.1, right=0.98, top=0.92, bottom=0.14)
        ax = fig.add_subplot(1, 1, 1)
        ax.axhline(K, color="k", ls="--", lw=1, label=f"K = {K} (IA-GM, no truncation)")
        for c, (label, rs) in enumerate(ks.items()):
            for r, ls in zip(rs, ("-", "--", ":", "-.")):
                st, k = kseries(r)
                ax.plot(st, np.cumsum(k) / np.arange(1, len(k) + 1), ls, color=f"C{c % 10}", lw=1.2,
                        label=f"{label}, {panel(r)}")
        ax.set_xlabel("upper iteration", fontsize=9)
        ax.set_ylabel("running mean of the truncation index k*", fontsize=9)
        ax.set_ylim(0, K + 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        paths.append(save_figure(fig, out / f"{name}_kstar.png"))
    return paths


def _mean(vals: list[float]) -> float:
    return float(np.mean(vals)) if vals else float("nan")


@register
class IapttToy(Table):
    name = "iaptt-toy"
    description = "every deterministic solver on the non-convex toy from 3 starts (Fig. 1-2, Table 1)"
    reference = "Liu et al. 2021 (NeurIPS), Sec. 4.1, Eq. 10"
    defaults = {
        "seed": 0,
        "solvers": list(TOY_SOLVERS),
        "x0s": [1.0, 5.0, 7.0],
        "y0s": [2.0, 1.0, -1.0],
        "steps": 500,              # the paper's settings (App. C.1, Table 4)
        "inner_lr": 5e-4,
        "inner_steps": 40,
        "upper_lr": 0.1,
        "mu": 0.5,
        "truncate": 5,
        "iters": 40,               # "inner iteration" of LS / NS in Table 4
        "ablation": True,  # also IA-GM / IAPTT-GM with unprojected lower iterates ("-noproj")
    }
    columns = ("x_err", "f_err")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        if len(cfg["x0s"]) != len(cfg["y0s"]):
            raise ConfigError("x0s and y0s must have the same length (one start per pair)")
        out = []
        methods = [(s, True) for s in cfg["solvers"]]
        if cfg["ablation"]:
            methods += [(s, False) for s in ("IAGM", "IAPTTGM")]
        for s, proj in methods:
            if s.upper() not in TOY_SOLVERS:
                raise ConfigError(f"unknown solver {s!r} in solvers; valid: {', '.join(TOY_SOLVERS)}")
            for x0, y0 in zip(cfg["x0s"], cfg["y0s"]):
                over = {"toy": "nonconvex", "solver": s, "x0": x0, "y0": y0, "steps": cfg["steps"],
                        "inner.lr": cfg["inner_lr"], "inner.steps": cfg["inner_steps"],
                        "upper.lr": cfg["upper_lr"], "method.mu": cfg["mu"],
                        "method.truncate": cfg["truncate"], "method.iters": cfg["iters"],
                        "method.inner_projection": proj}
                name = s if proj else f"{s}-noproj"
                out.append(SubRun(label=f"{name}@({x0:g},{y0:g})", experiment="toy", seed=cfg["seed"],
                                  overrides=over))
        return out

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        starts = list(zip(cfg["x0s"], cfg["y0s"]))
        rows = []
        for label, rs in _group(results).items():
            by_start = {(r.run.overrides["x0"], r.run.overrides["y0"]): r for r in rs}
            traces = [load_trace(r.path) for r in rs]
            ks = [t["k_star"] for tr in traces for t in tr if isinstance(t.get("k_star"), (int, float))]
            mem = [t["graph_bytes"] for tr in traces for t in tr
                   if isinstance(t.get("graph_bytes"), (int, float))]
            rows.append([label]
                        + [fmt(by_start[s].final.get("x_err")) if s in by_start else "—" for s in starts]
                        + [fmt(_mean([r.final["f_err"] for r in rs]))]
                        + [fmt(max((r.final.get("lower_gap", float("nan")) for r in rs), default=None))]
                        + [f"{_mean(ks):.2f}" if ks else "—"]
                        + [f"{_mean([r.info['solver_time_s'] for r in rs]):.2f}"]
                        + [f"{_mean(mem):.0f} / {max(mem):.0f}" if mem else "n/a"])
        head = ["method"] + [f"x err from {s}" for s in starts] + ["mean f err", "max g − g*", "mean k*",
                                                                     "time [s]", "graph bytes mean / max"]
        table_dir = results[0].path.parent.parent if results else Path(".")
        def start(r: SubResult) -> str:
            return f"start (x0, y0) = ({r.run.overrides['x0']:g}, {r.run.overrides['y0']:g})"

        figs = toy_figures(results, table_dir / "plots", "iaptt_toy", start)
        note = (f"## Non-convex follower toy (IAPTT-GM Eq. 10), {cfg['steps']} upper iterations\n\n"
                f"K = {cfg['inner_steps']} lower GD steps of size {cfg['inner_lr']} for every method, upper "
                f"SGD step {cfg['upper_lr']} (x and z), BDA mu = {cfg['mu']}, T-RHG truncation "
                f"{cfg['truncate']}, AID {cfg['iters']} linear-solver iterations. Errors are relative: "
                "‖x − 11π/4‖/(11π/4) and |f − f*|/|f*| at the last iterate; g − g* = g(x, y) + 1 is the "
                "lower-level gap at the last iterate (g* = −1), its max over the starts; time is the mean "
                "solver time per run (evaluation excluded); graph bytes: peak size of the tensors autograd "
                "holds for the backward pass within one outer step (mean and max over the measured steps). "
                "Rows `-noproj`: lower iterates not projected onto Y = [−2, 2] (z and x still are), as in "
                "the authors' released code.\n\n")
        return note + markdown_table(head, rows) + "\nfigures: " + ", ".join(str(p) for p in figs) + "\n"
