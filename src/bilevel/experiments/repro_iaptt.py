"""Reproduction of IAPTT-GM (Liu et al. 2021, NeurIPS; seed 002) beyond the paper's starts (issue 14.3).

    python -m bilevel.experiments.repro_iaptt grid --out runs/repro_iaptt        # non-convex toy grid
    python -m bilevel.experiments.repro_iaptt llc  --out runs/repro_iaptt        # IA-GM vs IA-GM(A)

**grid** — every deterministic method of ``bilevel run iaptt-toy`` on the non-convex toy (Eq. 10:
f = x + xy, g = −sin(xy), x ∈ [1, 10], y ∈ [−2, 2], solution x* = 11π/4, y* = −2) with the
paper's settings (App. C.1, Table 4: :data:`PAPER_TOY`) from every start of a grid that contains
the paper's three starts. A start *succeeds* when the last iterate has |x − x*|/x* ≤ 2 % and a solved
lower level, g − g* ≤ 0.05 (g* = −1). The toy is separable, so the methods whose every operation is
elementwise (GD lower steps, reverse-mode, Neumann / fixed-point series, dense solves, SGD, box
projections) run all starts at once as one problem with a vector x (one coordinate per start,
f = Σ_i x_i + x_i y_i, g = −Σ_i sin(x_i y_i)) — exactly the per-start runs, which the tests check.
IAPTT-GM (its truncation index k* = argmax_k f(x, y_k) couples coordinates) and LS (CG's inner
products couple them) run start by start.

**llc** — the convex, non-singleton toy (Eq. 13, n = 50) with the paper's App. C.4 settings (SGD
meta step 0.005 on x and z, K = 20 lower steps, 1000 upper iterations; the lower step size is lost
from the extracted Table 7, so a range is run) for IA-GM (GD) and IA-GM(A) (FISTA, and Nesterov
with a constant momentum). It also reports c = ∂y1_K/∂z1, the weight of the learned start in the
K-step lower map y1_K = (1 − c)·x + c·z1 (:func:`start_weight`), which decides where the IA
methods stop (see docs/reproduction.md, sec. 3).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import bilevel as bl

from .._memory import allocated_bytes
from ..formulation import Problem
from ..problems.toys import Box, Toy, llc_toy
from .base import get, markdown_table
from .plots import save_figure
from .toy import MemoryProbe, build_toy_solver

__all__ = [
    "PAPER_TOY",
    "PAPER_STARTS",
    "GRID",
    "PAPER_LLC",
    "METHODS",
    "COUPLED",
    "grid_toy",
    "toy_solver",
    "run_grid",
    "grid_rows",
    "TABLE1",
    "PAPER_TABLE1",
    "run_table1",
    "table1_rows",
    "start_weight",
    "run_llc",
    "llc_rows",
    "main",
]

#: the paper's non-convex toy settings (App. C.1, Table 4)
PAPER_TOY: dict[str, Any] = {
    "outer": 500,
    "inner": 40,
    "inner_lr": 5e-4,
    "meta_lr": 0.1,
    "ig_iters": 40,
    "upper_optimizer": "sgd",
}
#: the starts of Fig. 1
PAPER_STARTS: tuple[tuple[float, float], ...] = ((1.0, 2.0), (5.0, 1.0), (7.0, -1.0))
#: the grid of starts (x0, y0; z0 = y0 for the IA methods); contains the paper's starts
GRID: dict[str, tuple[float, ...]] = {
    "x0": (1.0, 3.0, 5.0, 7.0, 9.0, 10.0),
    "y0": (-2.0, -1.0, 0.0, 1.0, 2.0),
}
#: the paper's LLC-toy settings (App. C.4, Table 7; the lower step size is missing from the text)
PAPER_LLC: dict[str, Any] = {"outer": 1000, "inner": 20, "meta_lr": 0.005, "upper_optimizer": "sgd", "n": 50}
#: the grid's methods: those of ``iaptt-toy`` except the implicit LS / NS / FP / BA. The linear solves and
#: breakdown safeguards of LS / NS / FP are global (a residual over all coordinates), so a batched run is
#: not the per-start runs; BA is exact batched (tested) but its dense ``torch.func`` Hessian costs ~3 s
#: per upper step on the batched toy here; per start each would be 30 more runs. The paper's starts of
#: these four are in ``bilevel run iaptt-toy``.
METHODS = ("RHG", "TRHG", "BDA", "IAGM", "IAGMA", "IAPTTGM")
#: methods whose iterations couple the coordinates (run start by start)
COUPLED = frozenset({"IAPTTGM", "LS", "NS", "FP"})  # BA: batched is exact, but slow
X_STAR = 11 * math.pi / 4
SUCCESS = {"x_rel": 0.02, "gap": 0.05}


def grid_toy(starts: Sequence[tuple[float, float]], dtype: torch.dtype = torch.float64) -> Toy:
    """The non-convex toy with one coordinate per start (separable: f = Σ x_i + x_i y_i,
    g = −Σ sin(x_i y_i)); g* = −len(starts)."""
    x0 = torch.tensor([s[0] for s in starts], dtype=dtype)
    y0 = torch.tensor([s[1] for s in starts], dtype=dtype)
    n = len(starts)
    return Toy(
        name="nonconvex-grid",
        problem=Problem(
            lambda x, y: (x + x * y).sum(), lambda x, y: -torch.sin(x * y).sum(), name="nonconvex-grid"
        ),
        x0=x0,
        y0=y0,
        x_star=torch.full((n,), X_STAR, dtype=dtype),
        y_star=torch.full((n,), -2.0, dtype=dtype),
        f_star=-n * X_STAR,
        x_bounds=Box(1.0, 10.0),
        y_bounds=Box(-2.0, 2.0),
        reference="Liu et al. 2021 (NeurIPS), Eq. 10, one coordinate per start",
        g_star=lambda x: -float(n),
    )


def toy_solver(method: str, settings: dict[str, Any] = PAPER_TOY, **extra: Any) -> bl.solvers.Solver:
    """The method as ``bilevel run iaptt-toy`` builds it (:func:`bilevel.experiments.toy.build_toy_solver`)
    with the paper's settings: K lower GD steps of size s_l, SGD meta step on x and z, 40 LS/NS
    iterations, BDA μ = 0.5, T-RHG truncation 5."""
    over = {
        "toy": "nonconvex",
        "solver": method,
        "inner.lr": settings["inner_lr"],
        "inner.steps": settings["inner"],
        "upper.optimizer": settings["upper_optimizer"],
        "upper.lr": settings["meta_lr"],
        "method.iters": settings["ig_iters"],
        "method.mu": 0.5,
        "method.truncate": 5,
        **extra,
    }
    return build_toy_solver(get("toy").resolve(overrides=over)).obj


def _solve(
    method: str,
    starts: Sequence[tuple[float, float]],
    settings: dict[str, Any],
    steps: int,
    keep: Sequence[int],
) -> dict[str, Any]:
    toy = grid_toy(starts)
    x, y = toy.start()
    traj: list[list[float]] = []
    kstar: list[float] = []

    def cb(t: int, xv: Tensor, yv: Tensor, rec: dict[str, Any]) -> None:
        traj.append([float(xv[i]) for i in keep])
        if isinstance(rec.get("k_star"), (int, float)):
            kstar.append(float(rec["k_star"]))

    t0 = time.perf_counter()
    res = bl.solve(
        toy.problem,
        x,
        y,
        solver=toy_solver(method, settings),
        steps=steps,
        x_projection=toy.x_projection,
        y_projection=toy.y_projection,
        track=False,
        callback=cb,
    )
    return {
        "x": res.x.tolist(),
        "y": res.y.tolist(),
        "traj": traj,
        "k_star": kstar,
        "time": float(res.state["time"]),
        "wall": time.perf_counter() - t0,
    }


def _cached(cache: Path | None, method: str, start: tuple[float, float], fn: Any) -> dict[str, Any] | None:
    """``fn()`` for one start of a coupled method, kept in ``cache`` (one JSON per start; a lock file
    claims it, so several processes can share the starts). None: another process is on it."""
    if cache is None:
        return fn()
    from .repro_mrbo import _claim

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{method}_{start[0]:g}_{start[1]:g}.json"
    if not path.is_file():
        lock = path.with_suffix(".lock")
        if not _claim(lock):
            return None
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(fn()))
            tmp.replace(path)
        finally:
            lock.unlink(missing_ok=True)
    return json.loads(path.read_text())


def run_grid(
    methods: Sequence[str] = METHODS,
    settings: dict[str, Any] = PAPER_TOY,
    grid: dict[str, Sequence[float]] = GRID,
    steps: int | None = None,
    cache: Path | None = None,
) -> dict[str, Any] | None:
    """Final (x, y) of every method from every start of ``grid``; trajectories of x from the paper's
    starts; k* per upper step of IAPTT-GM from the paper's starts."""
    starts = [(a, b) for a in grid["x0"] for b in grid["y0"]]
    steps = int(settings["outer"] if steps is None else steps)
    paper = [i for i, s in enumerate(starts) if s in PAPER_STARTS]
    out: dict[str, Any] = {
        "starts": starts,
        "paper_idx": paper,
        "settings": dict(settings),
        "steps": steps,
        "methods": {},
    }
    for m in methods:
        if m in COUPLED:
            runs = [
                _cached(cache, m, s, lambda s=s, m=m: _solve(m, [s], settings, steps, [0])) for s in starts
            ]
            if any(v is None for v in runs):  # another process holds some starts: its run writes the result
                return None
            r = {
                "x": [v["x"][0] for v in runs],
                "y": [v["y"][0] for v in runs],
                "traj": {str(i): [row[0] for row in runs[i]["traj"]] for i in paper},
                "k_star": {str(i): runs[i]["k_star"] for i in paper},
                "time": sum(v["time"] for v in runs),
                "batched": False,
            }
        else:
            v = _solve(m, starts, settings, steps, paper)
            r = {
                "x": v["x"],
                "y": v["y"],
                "traj": {str(i): [row[j] for row in v["traj"]] for j, i in enumerate(paper)},
                "k_star": {},
                "time": v["time"],
                "batched": True,
            }
        x, y = np.asarray(r["x"]), np.asarray(r["y"])
        r["x_rel"] = (np.abs(x - X_STAR) / X_STAR).tolist()
        r["gap"] = (1.0 - np.sin(x * y)).tolist()  # g − g*, g* = −1
        r["success"] = [
            bool(a <= SUCCESS["x_rel"] and b <= SUCCESS["gap"]) for a, b in zip(r["x_rel"], r["gap"])
        ]
        out["methods"][m] = r
    return out


def grid_rows(res: dict[str, Any]) -> list[list[str]]:
    """Per method: success rate over the grid, success from the paper's starts, median final x error."""
    rows = []
    paper = res["paper_idx"]
    for m, r in res["methods"].items():
        ok = r["success"]
        rows.append(
            [
                m,
                f"{sum(ok)}/{len(ok)}",
                " ".join("✓" if ok[i] else "✗" for i in paper),
                f"{float(np.median(r['x_rel'])):.3g}",
                f"{sum(1 for g in r['gap'] if g <= SUCCESS['gap'])}/{len(ok)}",
                "batched" if r["batched"] else "per start",
            ]
        )
    return rows


GRID_HEAD = [
    "method",
    "success over the grid",
    "paper's starts (1,2) (5,1) (7,−1)",
    "median final x error",
    "lower level solved (g − g* ≤ 0.05)",
    "run",
]


def plot_grid(res: dict[str, Any], path: Path) -> Path:
    """Final x per start (one panel per method; ✓ = success) and x vs upper iteration from the
    paper's starts (Fig. 1 analogue), k* of IAPTT-GM (Fig. 2 analogue)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(res["methods"])
    xs, ys = sorted({s[0] for s in res["starts"]}), sorted({s[1] for s in res["starts"]})
    fig = Figure(figsize=(2.3 * len(methods), 6.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.88, bottom=0.08, wspace=0.35, hspace=0.45)
    for j, m in enumerate(methods):
        r = res["methods"][m]
        ax = fig.add_subplot(2, len(methods), j + 1)
        img = np.zeros((len(ys), len(xs)))
        for (a, b), xv in zip(res["starts"], r["x"]):
            img[ys.index(b), xs.index(a)] = xv
        ax.imshow(img, origin="lower", cmap="viridis", vmin=1, vmax=10, aspect="auto")
        for (a, b), ok in zip(res["starts"], r["success"]):
            ax.text(
                xs.index(a), ys.index(b), "✓" if ok else "·", ha="center", va="center", color="w", fontsize=8
            )
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs], fontsize=6)
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys], fontsize=6)
        ax.set_title(f"{m}: {sum(r['success'])}/{len(r['success'])}", fontsize=8)
        if j == 0:
            ax.set_ylabel("y0 (= z0)", fontsize=7)
        ax.set_xlabel("x0 (colour: final x)", fontsize=7)
        ax2 = fig.add_subplot(2, len(methods), len(methods) + j + 1)
        for c, (i, tr) in enumerate(r["traj"].items()):
            s = res["starts"][int(i)]
            ax2.semilogy(
                np.maximum(np.abs(np.asarray(tr) - X_STAR) / X_STAR, 1e-6),
                color=f"C{c}",
                lw=1,
                label=f"({s[0]:g}, {s[1]:g})",
            )
        ax2.set_ylim(1e-4, 2)
        ax2.set_xlabel("upper iteration", fontsize=7)
        ax2.tick_params(labelsize=6)
        ax2.grid(alpha=0.3)
        if j == 0:
            ax2.set_ylabel("|x − x*| / x*", fontsize=7)
            ax2.legend(fontsize=6)
    fig.suptitle(
        "non-convex toy, paper's settings (K = 40, s_l = 5e-4, SGD 0.1, 500 iterations)\n"
        "top: final x per start (✓ = |x − 11π/4| ≤ 2 % and g − g* ≤ 0.05); "
        "bottom: x error from the paper's starts",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# --- Table 1: memory and runtime from the paper's starts --------------------------------------------
#: the methods of the paper's Table 1 (IA-GM added: IAPTT-GM without the truncation)
TABLE1 = ("LS", "NS", "RHG", "BDA", "IAPTTGM", "IAGM")
#: the paper's Table 1 (Sec. 4.1): the process's memory [GB] and the runtime [s] of the toy
PAPER_TABLE1: dict[str, tuple[float, float]] = {
    "LS": (10.426, 5.120),
    "NS": (10.387, 10.815),
    "RHG": (10.153, 9.990),
    "BDA": (10.154, 16.800),
    "IAPTTGM": (10.153, 10.835),
}


class _Table1Probe(MemoryProbe):
    """:class:`~bilevel.experiments.toy.MemoryProbe` (graph bytes every ``every`` steps) that also
    records ``alloc_bytes``, the peak bytes of every tensor one whole outer step creates
    (:func:`bilevel._memory.allocated_bytes`: saved, temporary and linear-solver tensors alike), on
    the steps halfway between (the two probes are not nested)."""

    def step(self, ctx: Any, state: dict[str, Any], t: int) -> dict[str, Any]:
        if t % self.every == self.every // 2 and self.probes():
            out, peak = allocated_bytes(lambda: self.solver.step(ctx, state, t))
            return {**out, "alloc_bytes": peak}
        return super().step(ctx, state, t)


def _table1_run(method: str, start: tuple[float, float], settings: dict[str, Any], steps: int,
                probe: bool) -> dict[str, Any]:
    toy = grid_toy([start])
    x, y = toy.start()
    solver = toy_solver(method, settings)
    recs: list[dict[str, Any]] = []
    res = bl.solve(toy.problem, x, y, solver=_Table1Probe(solver, every=10) if probe else solver,
                   steps=steps, x_projection=toy.x_projection, y_projection=toy.y_projection, track=False,
                   callback=lambda t, xv, yv, rec: recs.append(rec) if probe else None)
    xv, yv = float(res.x[0]), float(res.y[0])
    out = {"time": float(res.state["time"]), "x_rel": abs(xv - X_STAR) / X_STAR,
           "gap": 1.0 - math.sin(xv * yv)}
    if probe:
        for key in ("graph_bytes", "alloc_bytes", "k_star"):
            out[key] = [float(r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return out


def run_table1(methods: Sequence[str] = TABLE1, settings: dict[str, Any] = PAPER_TOY,
               starts: Sequence[tuple[float, float]] = PAPER_STARTS, rounds: int = 3,
               steps: int | None = None) -> dict[str, Any]:
    """Table 1 from the paper's starts with its settings: per (method, start) one probed run (graph
    and allocated bytes, k*, final errors) and ``rounds`` timed runs without probes, interleaved
    (every round runs every method from every start, the order rotated each round), so the time
    ratios compare runs made side by side on the shared machine."""
    steps = int(settings["outer"] if steps is None else steps)
    out: dict[str, Any] = {"settings": dict(settings), "steps": steps, "starts": [list(s) for s in starts],
                           "rounds": rounds, "methods": {m: {"probe": [], "times": [[] for _ in starts]}
                                                         for m in methods}}
    for m in methods:
        for s in starts:
            out["methods"][m]["probe"].append(_table1_run(m, s, settings, steps, probe=True))
    cases = [(m, i) for m in methods for i in range(len(starts))]
    for r in range(rounds):
        for m, i in cases[r % len(cases):] + cases[: r % len(cases)]:
            out["methods"][m]["times"][i].append(_table1_run(m, starts[i], settings, steps, False)["time"])
    return out


def table1_rows(res: dict[str, Any]) -> list[list[str]]:
    """Per method: the paper's memory and runtime, our bytes (graph mean / max, allocated max), the
    median time per run, its ratio to RHG (median over rounds of the per-round mean over starts),
    mean k*, final x errors from the paper's starts."""
    ms = res["methods"]

    def per_round(m: str) -> list[float]:
        t = np.asarray(ms[m]["times"], dtype=float)  # (starts, rounds)
        return t.mean(axis=0).tolist()

    ref = per_round("RHG") if "RHG" in ms else None
    rows = []
    for m, r in ms.items():
        graph = [b for p in r["probe"] for b in p["graph_bytes"]]
        alloc = [b for p in r["probe"] for b in p["alloc_bytes"]]
        ks = [k for p in r["probe"] for k in p["k_star"]]
        t = per_round(m)
        paper = PAPER_TABLE1.get(m)
        rows.append([
            m,
            f"{paper[0]:.3f}" if paper else "—",
            f"{paper[1]:.3f} ({paper[1] / PAPER_TABLE1['RHG'][1]:.2f})" if paper else "—",
            f"{np.mean(graph):.0f} / {max(graph):.0f}" if graph else "n/a",
            f"{max(alloc):.0f}" if alloc else "n/a",
            f"{float(np.median(t)):.2f}",
            f"{float(np.median(np.asarray(t) / np.asarray(ref))):.2f}" if ref else "—",
            f"{np.mean(ks):.1f}" if ks else "—",
            " ".join(f"{p['x_rel']:.3g}" for p in r["probe"]),
        ])
    return rows


TABLE1_HEAD = [
    "method",
    "paper: memory (GB)",
    "paper: runtime (s) (÷ RHG)",
    "ours: graph bytes mean / max",
    "ours: allocated bytes per step, max",
    "ours: time per run (s), median",
    "time ÷ RHG (median of rounds)",
    "mean k*",
    "final x error from (1, 2) (5, 1) (7, −1)",
]


# --- the LLC toy: IA-GM vs IA-GM(A) ---------------------------------------------------------------
def start_weight(dynamics: bl.inner.Dynamics) -> float:
    """c = ∂y1_K/∂z1 of the K-step lower map on the LLC toy (g = ½‖y1‖² − xᵀy1, one coordinate):
    the map is affine, y1_K = (1 − c)x + c z1, so c is y1_K at x = 0, z1 = 1."""
    state = dynamics.init((torch.ones(1, dtype=torch.float64),))
    for k in range(int(dynamics.steps)):
        state = dynamics.update(state, dynamics.point(state), k)  # ∇_y1 g = y1 at x = 0
    return float(dynamics.output(state)[0][0])


def run_llc(
    lrs: Sequence[float] = (0.5, 0.05, 0.01),
    settings: dict[str, Any] = PAPER_LLC,
    steps: int | None = None,
    variants: Sequence[str] = ("IAGM", "IAGMA"),
    optimizer: str = "sgd",
    meta_lr: float | None = None,
    n: int | None = None,
) -> dict[str, Any]:
    """IA-GM / IA-GM(A) on the LLC toy from x0 = y0 = z0 = 0: x and y errors per upper step.

    ``optimizer``: ``sgd`` (the paper's, step ``meta_lr`` on x and z) or ``adam`` (β2 = 0.9, as
    ``bilevel run llc-toy``). Variants: ``IAGM`` (GD), ``IAGMA`` (FISTA, the t_k recursion),
    ``IAGMA-const`` (Nesterov with a constant β = 0.5)."""
    steps = int(settings["outer"] if steps is None else steps)
    K = int(settings["inner"])
    eta = float(settings["meta_lr"] if meta_lr is None else meta_lr)
    n = int(settings["n"] if n is None else n)
    out: dict[str, Any] = {
        "settings": {**settings, "meta_lr": eta, "n": n, "optimizer": optimizer},
        "steps": steps,
        "runs": [],
    }
    for lr in lrs:
        for v in variants:
            if v == "IAGM":
                inner: bl.inner.Dynamics = bl.inner.GD(lr=lr, steps=K)
            else:  # FISTA (t_k recursion) or Nesterov with β = 0.5 (constant)
                inner = bl.inner.Nesterov(lr=lr, steps=K, momentum=None if v == "IAGMA" else 0.5)
            rule = (lambda: bl.inner.Adam(lr=eta, betas=(0.9, 0.9))) if optimizer == "adam" else (lambda: eta)
            cls = bl.solvers.IAGM if v == "IAGM" else bl.solvers.IAGMA
            solver = (
                cls(inner, upper_lr=eta) if optimizer == "sgd" else cls(inner, upper=rule(), init_rule=rule())
            )
            toy = llc_toy(n)
            x, y = toy.start()
            errs: list[float] = []
            yerrs: list[float] = []
            e = toy.x_star

            def cb(
                t: int,
                xv: Tensor,
                yv: Any,
                rec: dict[str, Any],
                errs: list[float] = errs,
                yerrs: list[float] = yerrs,
                e: Tensor = e,
            ) -> None:
                errs.append(float((xv - e).norm() / e.norm()))
                yerrs.append(float(torch.cat([yv[0] - e, yv[1] - e]).norm() / (2**0.5 * e.norm())))

            err = None
            try:
                res = bl.solve(
                    toy.problem,
                    x,
                    y,
                    solver=solver,
                    steps=steps,
                    x_projection=toy.x_projection,
                    track=False,
                    callback=cb,
                )
                t_run = float(res.state["time"])
            except (bl.errors.BilevelError, RuntimeError, ValueError) as exc:  # overflow: the curve stops
                err, t_run = f"{type(exc).__name__}: {str(exc)[:120]}", float("nan")
            out["runs"].append(
                {
                    "method": v,
                    "lr": lr,
                    "x_err": errs,
                    "y_err": yerrs,
                    "c": start_weight(inner),
                    "time": t_run,
                    "error": err,
                }
            )
    return out


def _first_below(errs: Sequence[float], tol: float) -> str:
    for i, v in enumerate(errs):
        if v < tol:
            return str(i + 1)
    return f"> {len(errs)}"


def llc_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in res["runs"]:
        e = r["x_err"]
        ye = r["y_err"]
        rows.append(
            [
                f"{r['lr']:g}",
                r["method"],
                f"{r['c']:.3g}",
                _first_below(e, 1e-1),
                _first_below(e, 1e-2),
                f"{e[min(99, len(e) - 1)]:.3g}" if e else "—",
                f"{e[-1]:.3g}" if e else "—",
                f"{ye[-1]:.3g}" if ye else "—",
                r.get("error") or "",
            ]
        )
    return rows


LLC_HEAD = [
    "s_l",
    "method",
    "c = ∂y1_K/∂z1",
    "iters to ‖x − e‖/‖e‖ < 0.1",
    "iters to < 0.01",
    "x err at 100",
    "final x err",
    "final ‖y − y*‖/‖y*‖",
    "error",
]


def plot_llc(res: dict[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lrs = list(dict.fromkeys(r["lr"] for r in res["runs"]))
    fig = Figure(figsize=(3.4 * len(lrs), 3.2))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.84, bottom=0.15, wspace=0.25)
    for j, lr in enumerate(lrs):
        ax = fig.add_subplot(1, len(lrs), j + 1)
        for c, r in enumerate(r for r in res["runs"] if r["lr"] == lr):
            ax.semilogy(r["x_err"], color=f"C{c}", lw=1.2, label=f"{r['method']} x (c = {r['c']:.2g})")
            ax.semilogy(r["y_err"], color=f"C{c}", lw=0.9, ls=":", label=f"{r['method']} y")
        ax.set_title(f"lower step s_l = {lr:g}", fontsize=9)
        ax.set_xlabel("upper iteration", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if j == 0:
            ax.set_ylabel("relative error", fontsize=8)
    s = res["settings"]
    fig.suptitle(
        f"LLC toy (n = {s['n']}), K = {s['inner']}, {s['optimizer']} meta step {s['meta_lr']} on x and z, "
        "start 0 (errors: x solid, y dotted)",
        fontsize=9,
    )
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bilevel.experiments.repro_iaptt", description=__doc__.split("\n")[0]
    )
    p.add_argument("what", choices=("grid", "llc", "table1"))
    p.add_argument("--out", default="runs/repro_iaptt")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--steps", type=int, help="upper iterations (default: the paper's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--replot", action="store_true", help="redraw and print from the saved JSON")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"), help="llc: upper rule")
    p.add_argument("--meta-lr", type=float, help="llc: upper step (default: the paper's 0.005)")
    p.add_argument("--n", type=int, help="llc: dimension (default 50)")
    p.add_argument("--lrs", default="0.5,0.05,0.01", help="llc: lower step sizes")
    p.add_argument("--variants", default="IAGM,IAGMA", help="llc: IAGM, IAGMA, IAGMA-const")
    p.add_argument("--tag", default="", help="suffix of the JSON / PNG names")
    p.add_argument("--rounds", type=int, default=3, help="table1: interleaved timing rounds")
    p.add_argument("--x0s", help="grid: comma-separated x0 values (default: the 6 x 5 grid)")
    p.add_argument("--y0s", help="grid: comma-separated y0 values")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{a.what}{a.tag}.json"
    if a.what == "table1":
        if a.replot:
            res = json.loads(raw.read_text())
        else:
            ms = [m for m in a.methods.split(",") if m] if a.methods != ",".join(METHODS) else list(TABLE1)
            res = run_table1(ms, rounds=a.rounds, steps=a.steps)
            res["loadavg_end"] = list(os.getloadavg())
            raw.write_text(json.dumps(res))
        print(markdown_table(TABLE1_HEAD, table1_rows(res)))
    elif a.what == "grid":
        if a.replot:
            res = json.loads(raw.read_text())
        else:
            grid = {
                "x0": tuple(float(v) for v in a.x0s.split(",")) if a.x0s else GRID["x0"],
                "y0": tuple(float(v) for v in a.y0s.split(",")) if a.y0s else GRID["y0"],
            }
            res = run_grid(
                [m for m in a.methods.split(",") if m], steps=a.steps, grid=grid, cache=out / "cache"
            )
            if res is None:
                print("other processes still run some starts; rerun the same command to collect them")
                return 0
            raw.write_text(json.dumps(res))
        print(plot_grid(res, Path(a.img) / f"repro_iaptt_grid{a.tag}.png"))
        print(markdown_table(GRID_HEAD, grid_rows(res)))
    else:
        if a.replot:
            res = json.loads(raw.read_text())
        else:
            res = run_llc(
                [float(v) for v in a.lrs.split(",")],
                steps=a.steps,
                variants=a.variants.split(","),
                optimizer=a.optimizer,
                meta_lr=a.meta_lr,
                n=a.n,
            )
            raw.write_text(json.dumps(res))
        print(plot_llc(res, Path(a.img) / f"repro_iaptt_llc{a.tag}.png"))
        print(markdown_table(LLC_HEAD, llc_rows(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
