"""``bilevel run stackelberg``: every deterministic solver on the leader–follower duopoly.

The leader's quantity x and the follower's y of :func:`bilevel.problems.stackelberg_duopoly`
(linear inverse demand, quadratic costs; survey 2207.11719, Sec. 3.1.2) have the closed form
x* = (a − c_L − bα)/(2b(1 − β) + d_L), y* = α − βx*. Each solver of the toy experiments runs as a
``toy`` sub-run (``toy = "stackelberg"``) from x0 = y0 = 0; the table reports the final errors
|x − x*|, |y − y*| and the leader's profit gap, the figures the errors vs upper iterations and the
solvers' end points on the follower's best-response line with the leader's iso-profit curves.
BDA's K-step aggregation biases its end point by O(μ/K) (see docs/deterministic.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..problems.stackelberg import stackelberg_duopoly
from . import checkpoint as CK
from .base import SubResult, SubRun, Table, fmt, markdown_table, register
from .iaptt_toy import _group, toy_figures
from .plots import save_figure
from .runner import CHECKPOINTS
from .toy import TOY_SOLVERS

__all__ = ["Stackelberg", "equilibrium_figure"]


def end_point(r: SubResult) -> tuple[float | None, float | None]:
    """The final (x, y) of a ``toy`` sub-run, read from its last checkpoint (None if absent)."""
    blob, _, _ = CK.load_latest(Path(r.path) / CHECKPOINTS)
    if blob is None:
        return None, None
    state = blob["state"]  # load_latest verifies the checksum (checkpoint.py format)
    return float(state["x"][0]), float(state["y"][0])


def equilibrium_figure(results: list[SubResult], out: Path) -> Path:
    """Leader iso-profit curves, the follower's best response y*(x), the Stackelberg and Cournot
    points and every solver's final (x, y)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    toy = stackelberg_duopoly()
    e = toy.extra
    xs = np.linspace(0.0, 6.0, 200)
    X, Y = np.meshgrid(xs, xs)
    PL = X * (e["a"] - e["b"] * (X + Y)) - e["c_leader"] * X - 0.5 * e["d_leader"] * X * X
    fig = Figure(figsize=(5.2, 4.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.93, bottom=0.12)
    ax = fig.add_subplot(1, 1, 1)
    cs = ax.contour(X, Y, PL, levels=12, colors="0.6", linewidths=0.7)
    ax.clabel(cs, fontsize=6, fmt="%.0f")
    ax.contour(X, Y, PL, levels=[e["profit_leader"]], colors="r", linewidths=0.9, linestyles="--")
    ax.plot(xs, e["y_star_fn"](xs), "k-", lw=1.5, label="follower best response y*(x)")
    ax.plot([e["x_star"]], [e["y_star"]], "r*", ms=14, label="Stackelberg (closed form)")
    ax.plot([e["cournot_x"]], [e["cournot_y"]], "bs", ms=7, label="Cournot (simultaneous)")
    for c, (label, rs) in enumerate(_group(results).items()):
        for r in rs:
            x, y = end_point(r)
            if x is not None:
                ax.plot([x], [y], "o", color=f"C{c % 10}", ms=4, mfc="none", label=f"{label} (end point)")
    ax.set_xlabel("leader quantity x")
    ax.set_ylabel("follower quantity y")
    ax.set_title("leader iso-profit curves, best response, end points", fontsize=9)
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 6)
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    return save_figure(fig, out / "stackelberg_equilibrium.png")


@register
class Stackelberg(Table):
    name = "stackelberg"
    description = "leader-follower duopoly: every deterministic solver vs the closed-form equilibrium"
    reference = "survey 2207.11719, Sec. 3.1.2 (Stackelberg games); von Stackelberg 1934"
    defaults = {
        "seed": 0,
        "solvers": list(TOY_SOLVERS),
        "steps": 100,
        "inner_lr": 0.3,       # lower curvature 2b + d_F = 3: GD contracts by 0.1 per step
        "inner_steps": 20,
        "upper_lr": 0.3,       # curvature of x -> f(x, y*(x)) is 7/3: contraction 0.3 per step
        "mu": 0.5,
        "truncate": 10,
        "iters": 10,
        "tol": 1e-6,
    }
    columns = ("x_err", "y_err")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        out = []
        for s in cfg["solvers"]:
            if s.upper() not in TOY_SOLVERS:
                raise ConfigError(f"unknown solver {s!r} in solvers; valid: {', '.join(TOY_SOLVERS)}")
            over = {"toy": "stackelberg", "solver": s, "x0": 0.0, "y0": 0.0, "steps": cfg["steps"],
                    "eval_every": 1, "inner.lr": cfg["inner_lr"], "inner.steps": cfg["inner_steps"],
                    "upper.lr": cfg["upper_lr"], "method.mu": cfg["mu"], "method.truncate": cfg["truncate"],
                    "method.iters": cfg["iters"]}
            out.append(SubRun(label=s, experiment="toy", seed=cfg["seed"], overrides=over))
        return out

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        toy = stackelberg_duopoly()
        e = toy.extra
        tol = float(cfg["tol"])
        rows = []
        for r in results:
            xe, ye, fe = r.final.get("x_err"), r.final.get("y_err"), r.final.get("f_err")
            ok = isinstance(xe, float) and isinstance(ye, float) and xe < tol and ye < tol * float(toy.y_star)
            rows.append([r.run.label, fmt(xe), fmt(ye), fmt(fe), "yes" if ok else "no",
                         f"{r.info['solver_time_s']:.2f}"])
        head = ["method", "|x − x*|/x*", "|y − y*|", "leader profit gap (rel.)", f"reached (< {tol:g})",
                "time [s]"]
        table_dir = results[0].path.parent.parent if results else Path(".")
        figs = toy_figures(results, table_dir / "plots", "stackelberg", lambda r: "start (x0, y0) = (0, 0)",
                           metrics=("x_err", "y_err"), kstar=False)
        figs.append(equilibrium_figure(results, table_dir / "plots"))
        note = (f"## Stackelberg duopoly (a = {e['a']:g}, b = {e['b']:g}, c = ({e['c_leader']:g}, "
                f"{e['c_follower']:g}), d = ({e['d_leader']:g}, {e['d_follower']:g}))\n\n"
                f"Closed form: x* = {e['x_star']:.6f}, y* = {e['y_star']:.6f}, price {e['price']:.4f}, "
                f"leader profit {e['profit_leader']:.4f} (Cournot: x = y = {e['cournot_x']:.4f}). "
                f"{cfg['steps']} upper SGD steps of {cfg['upper_lr']}, K = {cfg['inner_steps']} lower GD "
                f"steps of {cfg['inner_lr']}, T-RHG truncation {cfg['truncate']}, AID "
                f"{cfg['iters']} linear-solver iterations, BDA mu = {cfg['mu']}.\n\n")
        return note + markdown_table(head, rows) + "\nfigures: " + ", ".join(str(p) for p in figs) + "\n"
