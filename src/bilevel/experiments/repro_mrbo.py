"""Reproduction of the MRBO/VRBO report's hyper-cleaning figure (seed 000, sec. 6; issue 14.1).

    python -m bilevel.experiments.repro_mrbo --out runs/repro_mrbo            # every (solver, seed)
    python -m bilevel.experiments.repro_mrbo --out runs/repro_mrbo --plot docs/img/repro_mrbo.png

The report (a reproduction of Yang, Ji & Liang 2021, *Provably faster algorithms for bilevel
optimization*, NeurIPS) compares MRBO (Alg. 1), VRBO (Alg. 2), stocBiO, MSTSA, BSA, AID-FP,
reverse, STABLE on MNIST data hyper-cleaning (training loss vs running time, its Fig. 1) with the
settings of its sec. 6.2 table (:data:`REPORT`). SUSTAIN (Khanduri et al. 2021) is added (issue 14).

Every (solver, seed) is one run of the ``hyperclean`` experiment's problem (data pipeline, model,
metrics, lower-level optimum g*(x) by L-BFGS) driven by :func:`bilevel.solve` until the run has used
the same number of **per-sample oracle calls** (:data:`DEFAULTS` ``budget``: gradients, HVPs and cross
products of both levels, counted by :mod:`bilevel.oracles`): a load-independent, equal budget. It is
evaluated, outside the solver's clock, at log-spaced call counts; time is the solver's own clock
(``state["time"]``). The lower-level verdict is the runner's (:func:`bilevel.experiments.runner.
lower_verdict`: g(x, y) − g*(x) ≤ 1e-2·max(1, |g*|) at the end).

Results: one JSON file per (solver, seed) in ``--out`` (written atomically; a ``.lock`` file claims a
run, so several processes can share a folder and an interrupted run is redone on the next call);
``--plot`` draws the figure (median and 20–80 % band over seeds, vs time and vs calls) and prints
the markdown tables (settings, final values at equal budget, lower-level verdicts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bilevel as bl

from ..errors import BilevelError
from ..estimates import Schedule
from ..formulation import Bound
from . import runner as R
from .base import get
from .plots import save_figure

__all__ = [
    "REPORT",
    "DEFAULTS",
    "QUICK",
    "SOLVERS",
    "settings_rows",
    "make_solver",
    "run_one",
    "run_all",
    "load_results",
    "truncate",
    "final_rows",
    "value_at",
    "budget_rows",
    "plot",
    "main",
]

#: the report's settings, transcribed from seed 000, sec. 6.2 ("训练的参数设置") and sec. 6.1
REPORT: dict[str, Any] = {
    "n_train": 20000,  # 训练集规模
    "n_test": 500,  # 测试集规模
    "n_val": 5000,  # 验证集规模
    "batch_size": 480,  # Batch 大小
    "outer_epochs": 40,  # 外层 Epochs
    "inner_iterations": 200,  # 内层 iterations
    "outer_lr": 0.1,  # 外层学习率
    "inner_lr": 0.1,  # 内层学习率
    "corruption": 0.1,  # 噪声比
    "dataset": "MNIST",
    "solvers": ("MRBO", "VRBO", "StocBiO", "MSTSA", "BSA", "AID-FP", "reverse", "STABLE"),  # sec. 6.1
}

#: our settings (the report's where it states them; see docs/reproduction.md sec. 1 for the choices)
DEFAULTS: dict[str, Any] = {
    "n_train": 3600,
    "n_val": 900,
    "n_test": 500,  # bundled 5k MNIST sample: 4:1 train:val as the report
    "batch_size": 480,
    "corruption": 0.1,
    "outer_lr": 0.1,
    "inner_lr": 0.1,
    "inner_steps": 200,
    "Q": 3,
    "eta": 0.1,  # Neumann terms / step: not stated in the report (stocBiO-style choice)
    "l2": 1e-3,  # lower-level L2 weight: the report's "f_regularize", value not stated
    "x0": 0.0,  # initial sample logit (σ = 0.5); not stated
    "vrbo_period": 3,  # VRBO q (not stated); S1 = the full training set
    "vrbo_inner": 3,  # VRBO m (not stated)
    "mrbo_m": 1.0,  # η_k = d/(m + k)^{1/3}, d = 1 (not stated)
    "budget": 8.0e6,  # per-sample oracle calls per run (equal for every solver; 2x the report stocBiO)
    "n_eval": 25,
    "halvings": 3,  # also evaluate at budget/2, /4, /8: one long run gives the shorter budgets' ends
    "seeds": 5,
    "lbfgs_iters": 300,  # L-BFGS iterations of the final g*(x) (the lower-level verdict)
    "dataset": "mnist5k",
}
#: the fast configuration of the test suite
QUICK: dict[str, Any] = {
    **DEFAULTS,
    "n_train": 300,
    "n_val": 100,
    "n_test": 100,
    "batch_size": 50,
    "inner_steps": 5,
    "budget": 2.0e4,
    "n_eval": 4,
    "seeds": 2,
    "lbfgs_iters": 50,
}

#: solver label -> (class in bl.solvers, full batch?) ; reverse and AID-FP are the report's GD-type
SOLVERS: dict[str, tuple[str, bool]] = {
    "MRBO": ("MRBO", False),
    "VRBO": ("VRBO", False),
    "StocBiO": ("StocBiO", False),
    "MSTSA": ("MSTSA", False),
    "BSA": ("BSA", False),
    "AID-FP": ("AID", True),
    "reverse": ("RHG", True),
    "STABLE": ("STABLE", False),
    "SUSTAIN": ("SUSTAIN", False),
}


def settings_rows(cfg: dict[str, Any] = DEFAULTS) -> list[list[str]]:
    """The "paper vs ours" settings table (the report's value, ours, why they differ)."""
    return [
        [
            "data",
            f"{REPORT['dataset']} {REPORT['n_train']} / {REPORT['n_val']} / {REPORT['n_test']} "
            "train / val / test",
            f"bundled MNIST sample {cfg['n_train']} / {cfg['n_val']} / {cfg['n_test']}",
            "full MNIST not present offline; 4:1 train:val and test size kept",
        ],
        ["corruption", f"{REPORT['corruption']:g}", f"{cfg['corruption']:g}", ""],
        ["batch size", str(REPORT["batch_size"]), str(cfg["batch_size"]), "both levels"],
        [
            "outer / inner learning rate",
            f"{REPORT['outer_lr']:g} / {REPORT['inner_lr']:g}",
            f"{cfg['outer_lr']:g} / {cfg['inner_lr']:g}",
            "MRBO/SUSTAIN/MSTSA: initial values of their schedules",
        ],
        [
            "inner iterations",
            str(REPORT["inner_iterations"]),
            str(cfg["inner_steps"]),
            "stocBiO, BSA, AID-FP, reverse (VRBO: see m)",
        ],
        [
            "outer epochs",
            str(REPORT["outer_epochs"]),
            f"equal budget of {cfg['budget']:.3g} sample calls",
            "stocBiO's 40 outer iterations ≈ 4·10⁶ calls; every solver gets the same call budget",
        ],
    ]


def _cfg_overrides(cfg: dict[str, Any], seed: int, full_batch: bool) -> dict[str, Any]:
    return {
        "seed": seed,
        "solver": "StocBiO",
        "data.dataset": cfg["dataset"],
        "data.n_train": cfg["n_train"],
        "data.n_val": cfg["n_val"],
        "data.n_test": cfg["n_test"],
        "data.corruption": cfg["corruption"],
        "data.batch_size": 0 if full_batch else cfg["batch_size"],
        "model.kind": "linear",
        "model.l2": cfg["l2"],
        "upper.x0": cfg["x0"],
        "baseline.max_iter": cfg["lbfgs_iters"],
    }


def make_solver(label: str, cfg: dict[str, Any]) -> bl.solvers.Solver:
    """The solver ``label`` of :data:`SOLVERS` with the report's step sizes and our stated choices."""
    cls_name, _ = SOLVERS[label]
    cls = getattr(bl.solvers, cls_name)
    lx, ly, K, Q, eta = cfg["outer_lr"], cfg["inner_lr"], int(cfg["inner_steps"]), int(cfg["Q"]), cfg["eta"]
    m = float(cfg["mrbo_m"])
    # MRBO / SUSTAIN: η_k = d/(m+k)^{1/3} with d = m^{1/3} (η_0 = 1), α_{k+1} = β_{k+1} = η_k² (c = 1)
    eta_k = {"c": m ** (1 / 3), "e": 1 / 3, "t0": m}
    sched = lambda c: Schedule(c * eta_k["c"], eta_k["e"], eta_k["t0"])  # noqa: E731
    mom = Schedule(eta_k["c"] ** 2, 2 / 3, m)
    if label in ("MRBO", "SUSTAIN"):
        return cls(lr_x=sched(lx), lr_y=sched(ly), momentum_x=mom, Q=Q, eta=eta)
    if label == "MSTSA":  # Khanduri et al. 2021: steps and momentum ∝ 1/sqrt(k)
        return cls(lr_x=Schedule(lx, 0.5), lr_y=Schedule(ly, 0.5), momentum=Schedule(1.0, 0.5), Q=Q, eta=eta)
    if label in ("StocBiO", "BSA"):
        return cls(lr_x=lx, lr_y=ly, inner_steps=K, Q=Q, eta=eta)
    if label == "VRBO":
        return cls(
            lr_x=lx, lr_y=ly, Q=Q, eta=eta, inner_steps=int(cfg["vrbo_inner"]), period=int(cfg["vrbo_period"])
        )
    if label == "STABLE":
        return cls(lr_x=lx, lr_y=ly, Q=Q, eta=eta)
    inner = bl.inner.GD(lr=ly, steps=K)
    if label == "AID-FP":
        return cls(inner, upper_lr=lx, linear_solver="fp", iters=Q, alpha=eta)
    return cls(inner, upper_lr=lx, warm_start=True)  # reverse: RHG, warm-started like the others


def _thresholds(budget: float, n: int, halvings: int = 0) -> list[float]:
    """Evaluation marks: ``n`` log-spaced call counts over the budget's last three decades, and
    budget/2, …, budget/2^halvings — the state there is exactly the end of a run of that budget
    (the stop rule only looks at the calls), so one long run also gives the shorter budgets."""
    grid = [budget * 10 ** (-3 + 3 * i / (n - 1)) for i in range(n)] if n > 1 else [budget]
    return sorted(set(grid) | {budget / 2**j for j in range(1, int(halvings) + 1)})


def run_one(label: str, seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One (solver, seed): evaluation trace vs calls and solver time, final values, lower verdict."""
    _, full = SOLVERS[label]
    exp = get("hyperclean")
    R.seed_everything(seed)
    setup = exp.build(exp.resolve(overrides=_cfg_overrides(cfg, seed, full)))
    solver = make_solver(label, cfg)
    budget = float(cfg["budget"])
    marks = _thresholds(budget, int(cfg["n_eval"]), int(cfg.get("halvings", 0)))
    trace: list[dict[str, Any]] = []
    tree = Bound(setup.problem, setup.x0, setup.y0)

    def evaluate(
        t: int, x: Any, y: Any, clock: float, calls: float, state: dict[str, Any] | None, star: bool = False
    ) -> dict[str, Any]:
        with torch.no_grad():
            rec = {"step": t, "time": clock, "calls": calls, **R._losses(setup, x, y), **setup.evaluate(x, y)}
        lx, ly = (x, y) if state is None else solver.lower_pair(state)
        if state is not None:
            lx, ly = tree.x_tree(lx), tree.y_tree(ly)
        rec.update(R.lower_optimality(setup, lx, ly, lower_star=star))
        return rec

    trace.append(evaluate(0, setup.x0, setup.y0, 0.0, 0.0, None))
    last: dict[str, Any] = {}

    def callback(t: int, x: Any, y: Any, record: dict[str, Any], state: dict[str, Any]) -> bool:
        calls = float(sum(state["counts"].flat().values()))
        last.update(t=t, x=x, y=y, time=float(record["time"]), calls=calls, state=state)
        stop = calls >= budget
        if marks and calls >= marks[0] and not stop:
            while marks and calls >= marks[0]:
                marks.pop(0)
            trace.append(evaluate(t, x, y, last["time"], calls, state))
        return stop

    err = None
    try:
        bl.solve(
            setup.problem,
            setup.x0,
            setup.y0,
            solver=solver,
            steps=10**9,
            lower_data=setup.lower_data,
            upper_data=setup.upper_data,
            track=False,
            callback=callback,
        )
    except (BilevelError, RuntimeError, ValueError) as e:  # divergence: the curve stops here
        err = f"{type(e).__name__}: {str(e)[:200]}"
    if last:
        trace.append(
            evaluate(last["t"], last["x"], last["y"], last["time"], last["calls"], last["state"], star=True)
        )
    final = trace[-1]
    g_star = (
        float(final["lower_loss"]) - float(final["lower_gap"])
        if isinstance(final.get("lower_gap"), float)
        else None
    )
    verdict = R.lower_verdict(trace, final, 1e-2, g_star)
    return {
        "solver": label,
        "seed": seed,
        "solver_repr": repr(solver),
        "trace": trace,
        "final": final,
        "lower": verdict,
        "error": err,
        "cfg": {k: v for k, v in cfg.items() if k != "solvers"},
        "threads": torch.get_num_threads(),
    }


def _claim(lock: Path) -> bool:
    """Claim a run for this process (O_EXCL lock file holding the pid); reclaim a dead process's."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)
            return False  # alive: someone else runs it
        except (ValueError, ProcessLookupError):
            lock.unlink(missing_ok=True)
            return _claim(lock)
        except PermissionError:
            return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


def run_all(
    out: Path, cfg: dict[str, Any], solvers: Sequence[str], seeds: Sequence[int], echo: Any = print
) -> list[Path]:
    """Run every missing (solver, seed) into ``out``; returns the result files written now."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in seeds:  # seed-major: a partial folder already has every solver for the first seeds
        for label in solvers:
            path = out / f"{label}_s{seed}.json"
            lock = path.with_suffix(".lock")
            if path.is_file() or not _claim(lock):
                continue
            try:
                t0 = time.perf_counter()
                res = run_one(label, seed, cfg)
                res["wall_s"] = time.perf_counter() - t0
                res["loadavg_end"] = os.getloadavg()
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(res, default=str))
                tmp.replace(path)
                written.append(path)
                f = res["final"]
                if echo:
                    echo(
                        f"{label:8s} s{seed}: f={f['upper_loss']:.4f} acc={f['test_acc']:.4f} calls="
                        f"{f['calls']:.3g} t={f['time']:.1f}s lower solved={res['lower'].get('solved')} "
                        f"[{res['wall_s']:.0f} s]" + (f" ERROR {res['error']}" if res["error"] else ""),
                        flush=True,
                    )
            finally:
                lock.unlink(missing_ok=True)
    return written


def truncate(r: dict[str, Any], budget: float) -> dict[str, Any]:
    """A run of a larger budget cut at ``budget``: its trace up to the first evaluation with at least
    ``budget`` calls, which is exactly the end of a run of that budget when ``budget`` is one of its
    marks (budget/2^j; see :func:`value_at`). The lower-level verdict (L-BFGS g* at the end) is not
    known there: ``lower`` says so (``solved`` None)."""
    if r["final"]["calls"] < budget * (1 + 1e-12) or float(r["cfg"]["budget"]) <= budget:
        return r
    for i, t in enumerate(r["trace"]):
        if t["calls"] >= budget * (1 - 1e-12):
            return {**r, "trace": r["trace"][: i + 1], "final": t, "truncated_from": r["cfg"]["budget"],
                    "lower": {"solved": None, "criterion": f"not evaluated (run of {r['cfg']['budget']:.3g} "
                                                           f"calls cut at {budget:.3g})"}}
    return r


def load_results(out: Path, budget: float | None = None) -> dict[str, list[dict[str, Any]]]:
    """The results in ``out`` by solver (sorted by seed); ``budget``: runs of a larger budget are
    cut there (:func:`truncate`)."""
    res: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(out.glob("*_s*.json")):
        r = json.loads(p.read_text())
        res.setdefault(r["solver"], []).append(r if budget is None else truncate(r, budget))
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in res.items()}


def _interp(r: dict[str, Any], axis: str, key: str, grid: np.ndarray) -> np.ndarray:
    """The last evaluated value at or before each grid point (NaN past the run's end): a double-loop
    solver is evaluated after each outer step only, and nothing is known in between."""
    xs = np.array([t[axis] for t in r["trace"]], dtype=float)
    ys = np.array([t[key] for t in r["trace"]], dtype=float)
    idx = np.searchsorted(xs, grid, side="right") - 1
    out = ys[np.clip(idx, 0, len(ys) - 1)]
    out[grid > xs[-1] * (1 + 1e-9)] = np.nan
    return out


def _q(vals: list[float], q: float) -> float:
    v = sorted(x for x in vals if not math.isnan(x))
    if not v:
        return float("nan")
    return float(np.quantile(v, q))


def final_rows(res: dict[str, list[dict[str, Any]]], key: str = "upper_loss") -> list[list[str]]:
    """Per solver, sorted by the median final ``key``: median [20 %, 80 %] of f, test accuracy, F1,
    outer iterations, solver seconds, lower-level verdicts (solved / seeds)."""
    rows = []
    for s, rs in res.items():
        f = [r["final"][key] for r in rs]
        acc = [r["final"]["test_acc"] for r in rs]
        f1 = [r["final"]["f1"] for r in rs]
        solved = [r["lower"].get("solved") for r in rs]
        judged = sum(1 for v in solved if v is not None)
        gaps = [r["lower"]["gap"] for r in rs if isinstance(r["lower"].get("gap"), float)]
        rows.append(
            (
                statistics.median(f),
                [
                    s,
                    str(len(rs)),
                    f"{statistics.median(f):.4f} [{_q(f, 0.2):.4f}, {_q(f, 0.8):.4f}]",
                    f"{statistics.median(acc):.4f}",
                    f"{statistics.median(f1):.4f}",
                    f"{statistics.median(r['final']['step'] for r in rs):.0f}",
                    f"{statistics.median(r['final']['time'] for r in rs):.1f}",
                    f"{sum(1 for v in solved if v)}/{judged}",
                    f"{max(gaps):.2e}" if gaps else "—",
                    "; ".join(sorted({r["error"][:60] for r in rs if r.get("error")})) or "",
                ],
            )
        )
    return [r for _, r in sorted(rows, key=lambda t: t[0])]


def value_at(r: dict[str, Any], calls: float, key: str = "upper_loss") -> float:
    """``key`` at the first evaluation with at least ``calls`` per-sample calls: the end of a run of
    budget ``calls`` (the marks include budget/2^j); NaN when the run stopped before."""
    for t in r["trace"]:
        if t["calls"] >= calls * (1 - 1e-12):
            return float(t[key])
    return float("nan")


def budget_rows(res: dict[str, list[dict[str, Any]]], budgets: Sequence[float],
                key: str = "upper_loss") -> list[list[str]]:
    """Per solver (sorted by the median at the largest budget): the median over seeds of ``key`` at
    each budget, and the median relative drop over the last doubling, (f(B/2) − f(B)) / f(B/2) —
    a curve counts as flat when that is below 1 %."""
    rows = []
    for s, rs in res.items():
        med = [statistics.median(value_at(r, b, key) for r in rs) for b in budgets]
        half = [value_at(r, budgets[-1] / 2, key) for r in rs]
        drop = statistics.median((h - value_at(r, budgets[-1], key)) / h for h, r in zip(half, rs))
        rows.append((med[-1], [s, str(len(rs))] + [f"{v:.4f}" for v in med] + [f"{100 * drop:.1f} %"]))
    return [r for _, r in sorted(rows, key=lambda t: t[0])]


FINAL_HEAD = [
    "solver",
    "seeds",
    "f = val CE at budget, median [20 %, 80 %]",
    "test acc",
    "F1 kept",
    "outer iters",
    "solver time [s]",
    "lower solved",
    "max g − g*",
    "errors",
]


def plot(res: dict[str, list[dict[str, Any]]], path: Path, key: str = "upper_loss") -> Path:
    """Median and 20–80 % band over seeds of ``key`` vs solver time and vs per-sample oracle calls."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.84, bottom=0.12, wspace=0.22)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for c, (s, rs) in enumerate(sorted(res.items())):
        for ax, axis in zip(axes, ("time", "calls")):
            hi = min(max(t[axis] for t in r["trace"]) for r in rs)
            grid = np.geomspace(hi * 1e-3, hi, 120) if axis == "calls" else np.linspace(0, hi, 120)
            ys = np.array([_interp(r, axis, key, grid) for r in rs])
            med = np.nanmedian(ys, axis=0)
            ax.plot(grid, med, color=f"C{c % 10}", ls="-" if c < 10 else "--", lw=1.4, label=s,
                    drawstyle="steps-post")
            ax.fill_between(
                grid,
                np.nanquantile(ys, 0.2, axis=0),
                np.nanquantile(ys, 0.8, axis=0),
                color=f"C{c % 10}",
                alpha=0.15,
                lw=0,
            )
    axes[0].set_xlabel("solver time [s] (own clock, loaded machine)", fontsize=9)
    axes[1].set_xlabel("per-sample oracle calls (gradients, HVPs, cross products)", fontsize=9)
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("upper loss f = validation cross-entropy", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9, frameon=False)
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    from .base import markdown_table

    p = argparse.ArgumentParser(
        prog="python -m bilevel.experiments.repro_mrbo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="runs/repro_mrbo", help="folder of the per-(solver, seed) results")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 5; --quick 2)")
    p.add_argument("--quick", action="store_true", help="the test suite's tiny configuration")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a DEFAULTS entry")
    p.add_argument("--plot", metavar="PNG", help="draw the figure from the results in --out, print tables")
    p.add_argument("--no-run", action="store_true", help="with --plot: do not run missing results")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = dict(QUICK if a.quick else DEFAULTS)
    for kv in a.set:
        k, _, v = kv.partition("=")
        if k not in cfg:
            raise SystemExit(f"unknown key {k!r}; valid: {', '.join(cfg)}")
        cfg[k] = type(cfg[k])(float(v)) if isinstance(cfg[k], (int, float)) else v
    torch.set_num_threads(1)
    solvers = [s for s in a.solvers.split(",") if s]
    bad = [s for s in solvers if s not in SOLVERS]
    if bad:
        raise SystemExit(f"unknown solvers {bad}; valid: {', '.join(SOLVERS)}")
    out = Path(a.out)
    if not a.no_run:
        run_all(out, cfg, solvers, range(a.seeds or int(cfg["seeds"])))
    if a.plot:
        res = load_results(out, float(cfg["budget"]))
        print(plot(res, Path(a.plot)))
        print(markdown_table(["setting", "report", "ours", "note"], settings_rows(cfg)))
        print(markdown_table(FINAL_HEAD, final_rows(res)))
        budgets = [float(cfg["budget"]) / 2**j for j in range(int(cfg["halvings"]), -1, -1)]
        head = ["solver", "seeds", *(f"f at {b:.3g} calls" for b in budgets), "drop, last doubling"]
        print(markdown_table(head, budget_rows(res, budgets)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
