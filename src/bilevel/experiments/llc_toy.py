"""``bilevel run llc-toy``: the convex, non-singleton follower toy (BDA example; IAPTT-GM Sec. 4.3).

    f = ‖x − y2‖⁴ + ‖y1 − e‖⁴,   g = ½‖y1‖² − xᵀy1,   x ∈ [−100, 100]^50,   solution x* = e.

Every solver (default: IA-GM, IA-GM(A), IAPTT-GM, RHG, T-RHG, BDA, AID-CG, AID-NS) runs K lower steps
with step size s_l for each s_l of ``inner_lrs``; the table reports the number of upper iterations
after which ‖x − e‖/‖e‖ stays below ``tol`` and the final error, the figure the error vs upper iterations.

The upper objective is quartic, so a fixed-step SGD slows down like (ηt)^(−1/2) near the solution
(10⁵+ iterations to 1e-3); every method therefore uses Adam with β2 = 0.9 for x (and z), which
takes step sizes of the order of ``upper_lr`` whatever the scale of the gradient. The paper used SGD
(meta step 0.005, 1000 iterations); see docs/deterministic.md.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import SubResult, SubRun, Table, fmt, markdown_table, register
from .iaptt_toy import _group, toy_figures
from .toy import TOY_SOLVERS
from .trace import load_trace

__all__ = ["LlcToy"]


def settles_below(trace: list[dict[str, Any]], key: str, tol: float) -> int | None:
    """The first step from which ``key`` stays below ``tol`` until the end (None if it ends above)."""
    pts = [(int(r["step"]), r[key]) for r in trace if isinstance(r.get(key), (int, float))]
    if not pts or not pts[-1][1] < tol:
        return None
    out = pts[-1][0]
    for step, v in reversed(pts):
        if not v < tol:
            break
        out = step
    return out


def _s_u_rule(cfg: dict[str, Any]) -> str:
    """How BDA's upper step s_u was chosen (recorded in the table's note)."""
    if cfg["adaptive"]:
        return f"by Armijo backtracking (ours, not the paper's) capped at {cfg['s_u']:g}"
    return f"= {cfg['s_u']:g} fixed (the paper's rule)"


@register
class LlcToy(Table):
    name = "llc-toy"
    description = "convex non-singleton follower toy (n = 50): upper iterations to ||x - e||/||e|| < tol"
    reference = "Liu et al. 2020 (ICML), Sec. 5.1; Liu et al. 2021 (NeurIPS), Sec. 4.3, Eq. 13"
    defaults = {
        "seed": 0,
        "solvers": ["IAGM", "IAGMA", "IAPTTGM", "RHG", "TRHG", "BDA", "LS", "NS"],
        "inner_lrs": [0.5, 0.1],
        "inner_steps": 10,
        "steps": 600,
        "upper_lr": 0.01,
        "beta2": 0.9,
        "mu": 0.5,
        # BDA's upper step inside the lower loop: with adaptive = true the cap (and first trial) of
        # its Armijo backtracking (our safeguard), with adaptive = false the fixed step of the paper
        # (0.01 works only from x0 = y0 = 0, see docs/deterministic.md)
        "s_u": 10.0,
        "adaptive": True,
        "truncate": 5,
        "iters": 10,
        "tol": 1e-3,
        "x0": 0.0,               # start: every entry of x (and of y, z: y0); docs/deterministic.md
        "y0": 0.0,               # lists the results from other starts
    }
    columns = ("x_err",)

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        out = []
        for s in cfg["solvers"]:
            if s.upper() not in TOY_SOLVERS:
                raise ConfigError(f"unknown solver {s!r} in solvers; valid: {', '.join(TOY_SOLVERS)}")
            for lr in cfg["inner_lrs"]:
                over = {"toy": "llc", "solver": s, "x0": float(cfg["x0"]), "y0": float(cfg["y0"]),
                        "steps": cfg["steps"],
                        "inner.lr": lr, "inner.steps": cfg["inner_steps"], "upper.optimizer": "adam",
                        "upper.lr": cfg["upper_lr"], "upper.beta2": cfg["beta2"], "method.mu": cfg["mu"],
                        "method.s_u": cfg["s_u"], "method.adaptive": bool(cfg["adaptive"]),
                        "method.truncate": cfg["truncate"],
                        "method.iters": cfg["iters"]}
                out.append(SubRun(label=f"{s}@{lr:g}", experiment="toy", seed=cfg["seed"], overrides=over))
        return out

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        lrs = list(cfg["inner_lrs"])
        tol = float(cfg["tol"])
        rows = []
        for label, rs in _group(results).items():
            by_lr = {r.run.overrides["inner.lr"]: r for r in rs}
            row = [label]
            for lr in lrs:
                r = by_lr.get(lr)
                hit = settles_below(load_trace(r.path), "x_err", tol) if r is not None else None
                row += [str(hit) if hit is not None else f"> {cfg['steps']}",
                        fmt(r.final.get("x_err")) if r is not None else "—"]
            row.append(f"{sum(r.info['solver_time_s'] for r in rs) / max(len(rs), 1):.2f}")
            rows.append(row)
        head = ["method"]
        for lr in lrs:
            head += [f"iters to stay < {tol:g} (s_l={lr:g})", f"final x err (s_l={lr:g})"]
        head.append("time [s]")
        table_dir = results[0].path.parent.parent
        figs = toy_figures(results, table_dir / "plots", "llc_toy",
                           lambda r: f"lower step s_l = {r.run.overrides['inner.lr']:g}", metrics=("x_err",),
                           kstar=False)
        note = (f"## Convex non-singleton follower (n = 50), {cfg['steps']} upper iterations\n\n"
                f"K = {cfg['inner_steps']} lower steps (GD; FISTA for IAGMA), Adam(lr {cfg['upper_lr']}, "
                f"β2 {cfg['beta2']}) on x and on z, start x0 = {cfg['x0']:g}, y0 = z0 = {cfg['y0']:g}; "
                f"BDA mu = {cfg['mu']}, "
                f"s_u {_s_u_rule(cfg)}, "
                f"T-RHG truncation {cfg['truncate']} (BDA: the whole trajectory), "
                f"AID {cfg['iters']} linear-solver iterations.\n\n")
        return note + markdown_table(head, rows) + "\nfigures: " + ", ".join(str(p) for p in figs) + "\n"
