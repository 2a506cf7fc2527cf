"""Value-function solvers on toys with known solutions: ``bilevel run vf-toy`` / ``value-function``.

``vf-toy`` runs one of the first-order value-function solvers — :class:`bilevel.solvers.VPBGD`
(Shen & Chen 2023, penalty γ(g − v)) or :class:`bilevel.solvers.PrimalDualVF` (Sow et al. 2022b,
primal–dual on the smoothed value function of the lecture slides' Eq. 26/29) — on the LLC toy
(non-singleton follower, x* = e) or the quadratic toy (closed form). On the quadratic toy it also
records ``ref_err``: the distance of x to the closed-form solution of the solver's own single-level
reformulation (:mod:`bilevel.problems.reformulations`), which the solver must reach; the distance of
that solution to x* is the reformulation's bias (O(1/γ), O(√a)), reported once as a baseline.

``value-function`` runs both solvers on both toys and tabulates the final errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..inner import GD, Adam, Dynamics, Nesterov
from ..problems import llc_toy, quadratic_toy
from ..problems.reformulations import penalty_solution, smoothed_vf_solution
from ..solvers import VPBGD, PrimalDualVF
from .base import Experiment, Setup, SubResult, SubRun, Table, fmt, markdown_table, register
from .iaptt_toy import toy_figures

__all__ = ["VfToy", "ValueFunction"]

VF_SOLVERS = ("VPBGD", "PrimalDualVF")


def _rule(u: dict[str, Any]) -> Dynamics:
    if u["optimizer"] == "adam":
        return Adam(lr=u["lr"], betas=(0.9, u["beta2"]))
    if u["optimizer"] == "nesterov":
        return Nesterov(lr=u["lr"], momentum=u["momentum"] or None)
    return GD(lr=u["lr"])


@register
class VfToy(Experiment):
    name = "vf-toy"
    description = "one value-function solver (V-PBGD / primal-dual) on the LLC or quadratic toy"
    reference = "Shen & Chen 2023 (ICML), Alg. 1; Sow et al. 2022b; lecture slides Eq. 25-29"
    defaults = {
        "seed": 0, "steps": 600, "eval_every": 10, "checkpoint_every": 0,
        "toy": "llc",
        "n": 50,                  # LLC dimension
        "solver": "VPBGD",
        "inner": {"lr": 0.5, "steps": 5},
        "upper": {"optimizer": "adam", "lr": 0.01, "beta2": 0.9, "momentum": 0.0},
        "method": {"gamma": 10.0, "a1": 1e-6, "a2": 1e-6, "dual_lr": 10.0},
    }
    choices = {"toy": ("llc", "quadratic"), "solver": VF_SOLVERS,
               "upper.optimizer": ("adam", "nesterov", "gd")}

    def build(self, cfg: dict[str, Any]) -> Setup:
        toy = llc_toy(n=int(cfg["n"])) if cfg["toy"] == "llc" else quadratic_toy()
        m = cfg["method"]
        inner = GD(lr=cfg["inner"]["lr"], steps=cfg["inner"]["steps"])
        if cfg["solver"] == "VPBGD":
            solver: Any = VPBGD(inner, gamma=m["gamma"], upper=_rule(cfg["upper"]))
        else:
            solver = PrimalDualVF(inner, dual_lr=m["dual_lr"], a1=m["a1"], a2=m["a2"],
                                  upper=_rule(cfg["upper"]))
        ref = None
        if cfg["toy"] == "quadratic":
            ref = (penalty_solution(toy, m["gamma"])[0] if cfg["solver"] == "VPBGD"
                   else smoothed_vf_solution(toy, m["a1"], m["a2"])[0])

        def evaluate(x: Any, y: Any) -> dict[str, float]:
            out = toy.errors(x, y)
            if ref is not None:
                out["ref_err"] = float(torch.linalg.vector_norm(x - ref))
            return out

        def baselines() -> dict[str, Any]:
            if ref is None:
                return {}
            rel = torch.linalg.vector_norm(ref - toy.x_star) / torch.linalg.vector_norm(toy.x_star)
            return {"reformulation_bias": float(rel)}  # relative, like x_err

        x0, y0 = toy.start()
        return Setup(problem=toy.problem, x0=x0, y0=y0, solver=solver, evaluate=evaluate,
                     baselines=baselines, x_projection=toy.x_projection, y_projection=toy.y_projection,
                     progress=("x_err",),
                     plot_metrics=("x_err", "f_err") + (("ref_err",) if ref is not None else ()),
                     info={"toy": toy.name})


@register
class ValueFunction(Table):
    name = "value-function"
    description = "V-PBGD and the primal-dual value-function method on the LLC and quadratic toys"
    reference = "Shen & Chen 2023 (ICML); Sow et al. 2022b; lecture slides Eq. 25-29"
    defaults = {
        "seed": 0,
        "solvers": list(VF_SOLVERS),
        "toys": ["llc", "quadratic"],
        "llc_steps": 600,
        "quadratic_steps": 1000,
        "gamma": 10.0,
    }
    columns = ("x_err", "ref_err")

    #: per-toy settings: LLC as in ``llc-toy`` (Adam, the quartic f); the quadratic with the
    #: steps its curvature allows (penalized Hessian eigenvalues in [1, 68] for γ = 10: Nesterov
    #: with β = (√κ − 1)/(√κ + 1); the smoothed Lagrangian's in [1, 20] for a = 1e-2)
    SETTINGS: dict[tuple[str, str], dict[str, Any]] = {
        ("llc", "VPBGD"): {"upper.optimizer": "adam", "upper.lr": 0.01, "upper.beta2": 0.9},
        ("llc", "PrimalDualVF"): {"upper.optimizer": "adam", "upper.lr": 0.01, "upper.beta2": 0.9,
                                  "method.a1": 1e-6, "method.a2": 1e-6, "method.dual_lr": 10.0},
        ("quadratic", "VPBGD"): {"upper.optimizer": "nesterov", "upper.lr": 1 / 68, "upper.momentum": 0.784,
                                 "inner.lr": 2 / 3},
        ("quadratic", "PrimalDualVF"): {"upper.optimizer": "gd", "upper.lr": 0.04, "method.a1": 1e-2,
                                        "method.a2": 1e-2, "method.dual_lr": 1.0, "inner.lr": 2 / 3},
    }

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        out = []
        for toy in cfg["toys"]:
            for s in cfg["solvers"]:
                over = {"toy": toy, "solver": s, "method.gamma": cfg["gamma"],
                        "steps": cfg[f"{toy}_steps"], **self.SETTINGS[(toy, s)]}
                out.append(SubRun(label=f"{s}@{toy}", experiment="vf-toy", seed=cfg["seed"], overrides=over))
        return out

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        rows = []
        for r in results:
            f = r.final
            rows.append([r.run.label.split("@")[0], r.run.overrides["toy"], fmt(f.get("x_err")),
                         fmt(f.get("ref_err")) if "ref_err" in f else "—",
                         fmt(r.extras.get("reformulation_bias")) if r.extras else "—",
                         fmt(f.get("f")), f"{r.info['solver_time_s']:.2f}"])
        head = ["method", "toy", "‖x − x*‖/‖x*‖", "‖x − x_ref‖ (own reformulation)",
                "‖x_ref − x*‖/‖x*‖ (bias)", "f", "time [s]"]
        table_dir = results[0].path.parent.parent if results else Path(".")
        figs = toy_figures(results, table_dir / "plots", "value_function",
                           lambda r: f"{r.run.overrides['toy']} toy", metrics=("x_err", "ref_err"),
                           kstar=False)
        note = (f"## Value-function solvers: LLC toy (n = 50, x* = e) and quadratic toy (closed form)\n\n"
                f"V-PBGD penalty γ = {cfg['gamma']}; primal–dual with a1 = a2 = 1e-6 (LLC), 1e-2 "
                f"(quadratic); lower approximation: 5 warm-started GD steps. {cfg['llc_steps']} / "
                f"{cfg['quadratic_steps']} outer steps. x_ref: the exact solution of the solver's "
                "single-level reformulation (penalty / smoothed value function).\n\n")
        return note + markdown_table(head, rows) + "\nfigures: " + ", ".join(str(p) for p in figs) + "\n"
