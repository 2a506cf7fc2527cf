"""Figures of run traces (matplotlib, Agg canvas; no display needed).

* :func:`plot_run` — ``plots/metrics_vs_step.png`` and ``plots/metrics_vs_time.png`` of one run;
* :func:`plot_runs` — overlay several runs (``bilevel plot DIR [DIR ...]``); runs sharing a label
  (seeds of one method) are drawn as their mean with the individual runs faint.

Each figure has one panel per metric. The x axis is ``step``, ``time`` (solver seconds,
evaluation excluded) or ``calls`` (per-sample oracle calls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .trace import load_trace

__all__ = ["plot_run", "plot_runs", "default_metrics", "save_figure"]

_NOT_METRICS = {"step", "time", "calls"}
_XLABEL = {"step": "outer step", "time": "solver time [s] (evaluation excluded)",
           "calls": "per-sample oracle calls"}


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as the experiments' PNGs are written (110 dpi), creating the folder; returns
    ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def default_metrics(trace: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics of the first record (the step-0 evaluation holds exactly the evaluated ones)."""
    if not trace:
        return []
    return [k for k, v in trace[0].items() if k not in _NOT_METRICS and isinstance(v, (int, float))
            and not isinstance(v, bool)]


def check_metrics(metrics: Sequence[str], traces: Sequence[Sequence[dict[str, Any]]]) -> None:
    """Every requested metric must be a number in at least one record, else ConfigError."""
    have = {k for tr in traces for r in tr for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    missing = [m for m in metrics if m not in have]
    if missing:
        raise ConfigError(f"no metric {', '.join(map(repr, missing))} in the trace(s); available: "
                          f"{', '.join(sorted(have - _NOT_METRICS))}")


def _series(trace: Sequence[dict[str, Any]], x: str, m: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r.get(x, 0), r[m]) for r in trace if isinstance(r.get(m), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=float)
    return a[:, 0], a[:, 1]


def _figure(groups: dict[str, list[list[dict[str, Any]]]], metrics: Sequence[str], x: str, out: Path,
            refs: dict[str, dict[str, float]] | None = None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(metrics))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    # fixed margins: much cheaper than constrained layout and enough for these short labels
    fig.subplots_adjust(left=0.09 if cols > 1 else 0.16, right=0.98, bottom=0.16 if rows == 1 else 0.09,
                        top=0.9 if rows == 1 else 0.94, wspace=0.3, hspace=0.45)
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        positive = True
        for (label, traces), color in zip(groups.items(), colors):
            curves = [_series(t, x, m) for t in traces]
            curves = [c for c in curves if len(c[0])]
            if not curves:
                continue
            positive &= all(bool((c[1] > 0).all()) for c in curves)
            if len(curves) == 1:
                ax.plot(*curves[0], color=color, label=label, lw=1.5)
                continue
            for c in curves:
                ax.plot(*c, color=color, alpha=0.25, lw=0.8)
            k = min(len(c[0]) for c in curves)
            xs = np.mean([c[0][:k] for c in curves], axis=0)
            ys = np.mean([c[1][:k] for c in curves], axis=0)
            ax.plot(xs, ys, color=color, label=f"{label} (mean of {len(curves)})", lw=1.8)
        if m.endswith("loss") and positive and ax.lines:
            lo, hi = (min(float(np.min(ln.get_ydata())) for ln in ax.lines),
                      max(float(np.max(ln.get_ydata())) for ln in ax.lines))
            if lo > 0 and hi / lo > 30:
                ax.set_yscale("log")
        for j, (lab, val) in enumerate((refs or {}).get(m, {}).items()):
            ax.axhline(val, color="0.4", ls=("--", ":", "-.")[j % 3], lw=1, label=lab)
        ax.set_title(m)
        ax.set_xlabel(_XLABEL.get(x, x))
        ax.grid(alpha=0.3)
        if (i == 0 and len(groups) > 1) or (refs or {}).get(m):
            ax.legend(fontsize="small")
    return save_figure(fig, out)


def plot_run(run_dir: str | Path, metrics: Sequence[str] | None = None,
             xs: Sequence[str] = ("step", "time"),
             refs: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """Write ``plots/metrics_vs_<x>.png`` for one run folder; returns the files.

    ``refs``: horizontal reference lines per metric, ``{metric: {label: value}}``.
    """
    run_dir = Path(run_dir)
    trace = load_trace(run_dir)
    if not trace:
        return []
    metrics = list(metrics) if metrics else default_metrics(trace)
    check_metrics(metrics, [trace])
    groups = {run_dir.name: [trace]}
    return [_figure(groups, metrics, x, run_dir / "plots" / f"metrics_vs_{x}.png", refs) for x in xs]


def _expand(run_dir: Path) -> list[Path]:
    """A run folder, or the sub-runs of a table folder."""
    if (run_dir / "trace.jsonl").is_file():
        return [run_dir]
    subs = sorted(p.parent for p in run_dir.glob("runs/*/trace.jsonl"))
    if not subs:
        raise FileNotFoundError(f"{run_dir}: no trace.jsonl (not a run folder)")
    return subs


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    xs: Sequence[str] = ("step", "time"),
) -> list[Path]:
    """Overlay runs: one figure per x axis in folder ``out`` (``compare_vs_<x>.png``)."""
    dirs: list[Path] = []
    names: list[str] = []
    for i, d in enumerate(run_dirs):
        expanded = _expand(Path(d))
        dirs += expanded
        if labels is not None:
            names += [labels[i]] * len(expanded)
        else:
            names += [p.name if len(expanded) == 1 else f"{Path(d).name}/{p.name}" for p in expanded]
    groups: dict[str, list[list[dict[str, Any]]]] = {}
    for d, name in zip(dirs, names):
        groups.setdefault(name, []).append(load_trace(d))
    first = next(iter(groups.values()))[0]
    metrics = list(metrics) if metrics else default_metrics(first)
    check_metrics(metrics, [t for ts in groups.values() for t in ts])
    out = Path(out)
    return [_figure(groups, metrics, x, out / f"compare_vs_{x}.png") for x in xs]
