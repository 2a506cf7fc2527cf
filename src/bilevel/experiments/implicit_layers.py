"""``bilevel run deq`` / ``neural-ode``: implicit layers trained through the library's estimators.

* ``deq-train`` — the deep-equilibrium regression of :func:`bilevel.problems.deq_regression`
  trained by Adam on the hypergradient of :class:`~bilevel.problems.implicit_layers.Equilibrium`
  (``method = "implicit"``: :func:`bilevel.fixed_point`, Bai et al. 2019 Eq. 8, warm-started
  forward iteration) or of reverse mode through K iterations from z = 0 (``"unrolled"``: a
  weight-tied K-layer network, :class:`~bilevel.hypergrad.Reverse` with
  :func:`~bilevel.problems.implicit_layers.map_step`). ``deq`` runs both and adds a gradient check
  at the trained parameters: the relative error of the unrolled gradient to the implicit one
  against K, with the contraction bound, and the autograd memory of each (``_memory.saved_bytes``).
* ``neural-ode-train`` — the fixed-step Neural ODE of :func:`bilevel.problems.neural_ode` trained
  through ``Reverse(GD(lr=1, steps=T), checkpoint=...)``. ``neural-ode`` trains with and without
  checkpointing (same derivative) and tabulates the peak saved memory and the time of one
  hypergradient for T = 16 … 1024: O(T) plain, O(√T) checkpointed.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .._memory import saved_bytes
from ..hypergrad import Reverse
from ..inner import GD, Adam
from ..problems.implicit_layers import Equilibrium, deq_regression, map_step, neural_ode
from ..solvers import HypergradientDescent
from .base import Experiment, Setup, SubResult, SubRun, Table, fmt, markdown_table, register, run_dtype
from .plots import save_figure

__all__ = ["DEQTrain", "DEQ", "NeuralODETrain", "NeuralODE"]


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in b))
    den = math.sqrt(sum(float(b[k].pow(2).sum()) for k in b))
    return num / max(den, 1e-300)


def _deq(cfg: dict[str, Any]):
    d = cfg["data"]
    return deq_regression(d["hidden"], n_train=d["n_train"], n_test=d["n_test"], rho=d["rho"],
                          seed=cfg["seed"],
                          dtype=run_dtype(cfg, torch.float64), device=cfg["device"])


def _deq_estimators(toy: Any, unroll_steps: int, tol: float) -> tuple[Equilibrium, Reverse]:
    u = toy.data["train"][0]
    phi = lambda x, z, k: toy.phi(x, z, u)  # noqa: E731
    return Equilibrium(phi, tol=tol), Reverse(GD(lr=1.0, steps=unroll_steps), grad_fn=map_step(phi))


@register
class DEQTrain(Experiment):
    name = "deq-train"
    description = "deep-equilibrium layer trained through fixed_point implicit differentiation (or unrolled)"
    reference = "Bai, Kolter & Koltun 2019 (deep equilibrium models), Eq. 1-2, 6-8"
    defaults = {
        "seed": 0, "steps": 300, "eval_every": 10, "checkpoint_every": 0,
        "method": "implicit",
        "unroll_steps": 30,          # "unrolled": K iterations from z = 0 (a weight-tied K-layer net)
        "tol": 1e-10,                # "implicit": forward iteration to this relative change
        "data": {"hidden": 16, "n_train": 256, "n_test": 1024, "rho": 0.9},
        "upper": {"lr": 0.01},
    }
    choices = {"method": ("implicit", "unrolled")}

    def build(self, cfg: dict[str, Any]) -> Setup:
        toy = _deq(cfg)
        imp, unr = _deq_estimators(toy, cfg["unroll_steps"], cfg["tol"])
        implicit = cfg["method"] == "implicit"
        # implicit: warm-started equilibrium; unrolled: always K iterations from z = 0
        solver = HypergradientDescent(imp if implicit else unr, upper=Adam(lr=cfg["upper"]["lr"]),
                                      warm_start=implicit)

        def evaluate(x: dict[str, torch.Tensor], z: torch.Tensor) -> dict[str, float]:
            return {"train_mse": toy.mse(x, "train"), "test_mse": toy.mse(x, "test")}

        x0, y0 = toy.start()
        return Setup(problem=toy.problem, x0=x0, y0=y0, solver=solver, evaluate=evaluate,
                     lower_star=lambda x, y: 0.0, progress=("train_mse", "test_mse"),
                     plot_metrics=("train_mse", "test_mse"),
                     unused={"unroll_steps"} if implicit else {"tol"}, info={"method": cfg["method"]})


@register
class DEQ(Table):
    name = "deq"
    description = "deep equilibrium: implicit (fixed_point) vs unrolled training, gradient check vs unrolling"
    reference = "Bai, Kolter & Koltun 2019, Eq. 8"
    defaults = {"seed": 0, "steps": 300, "unroll_steps": 30, "check_steps": [5, 10, 20, 40, 80, 160]}
    columns = ("train_mse", "test_mse")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        return [SubRun(label=m, experiment="deq-train", seed=cfg["seed"],
                       overrides={"method": m, "steps": cfg["steps"], "unroll_steps": cfg["unroll_steps"]})
                for m in ("implicit", "unrolled")]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        from ..experiments.base import get

        rows = [[r.run.label, fmt(r.final.get("train_mse")), fmt(r.final.get("test_mse")),
                 f"{r.info['solver_time_s']:.2f}"] for r in results]
        head = ["training", "train MSE", "test MSE", "solver time [s]"]
        exp = get("deq-train")
        dcfg = exp.resolve(overrides={"seed": cfg["seed"]})
        check = deq_gradient_check(dcfg, [int(k) for k in cfg["check_steps"]])
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = deq_figure(results, check, table_dir / "plots")
        crow = [[c["K"], fmt(c["rel_err"]), fmt(c["bound"]), fmt(c["saved_MB"]), fmt(c["time_ms"])]
                for c in check["rows"]]
        crow.append(["implicit (fixed_point)", "—", "—", fmt(check["implicit_MB"]),
                     fmt(check["implicit_ms"])])
        note = (f"## Deep equilibrium layer (ρ = ‖W‖₂ = {dcfg['data']['rho']}, width "
                f"{dcfg['data']['hidden']}, {cfg['steps']} Adam steps)\n\n")
        gnote = (f"\nGradient check at the initial parameters, N = {dcfg['data']['n_train']} inputs: "
                 "relative error of reverse mode through K iterations from z = 0 to the implicit gradient; "
                 f"measured contraction of the iteration {fmt(check['rate'])} per step (bound ρ = "
                 f"{dcfg['data']['rho']}); reference rate K q^K/(1 − q) with the measured q. Memory: peak "
                 "bytes autograd holds for one gradient (median time of 3).\n\n")
        chead = ["K unrolled", "rel. error to implicit", "K q^K/(1 − q)", "saved MB", "time [ms]"]
        return (note + markdown_table(head, rows) + gnote + markdown_table(chead, crow)
                + f"\nfigure: {fig}\n")


def _median_time(fn: Any, n: int = 3) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def deq_gradient_check(cfg: dict[str, Any], ks: list[int]) -> dict[str, Any]:
    """Relative error of the K-step unrolled gradient to the implicit one, memory and time."""
    toy = _deq(cfg)
    x, z0 = toy.start()
    imp, _ = _deq_estimators(toy, 1, 1e-13)
    g_imp = imp(toy.problem, x, z0).grad
    _, mem_imp = saved_bytes(lambda: imp(toy.problem, x, z0))
    t_imp = _median_time(lambda: imp(toy.problem, x, z0))
    # the measured contraction: ratio of successive fixed-point increments at the equilibrium
    u = toy.data["train"][0]
    with torch.no_grad():
        z = torch.zeros_like(z0)
        incs = []
        for _ in range(60):
            nz = toy.phi(x, z, u)
            incs.append(float((nz - z).norm()))
            z = nz
        q = (incs[40] / incs[20]) ** (1 / 20)
    rows = []
    for K in ks:
        _, unr = _deq_estimators(toy, K, 1e-13)
        res, mem = saved_bytes(lambda unr=unr: unr(toy.problem, x, z0))
        rows.append({"K": K, "rel_err": _rel(res.grad, g_imp), "bound": K * q**K / (1 - q),
                     "saved_MB": (mem or 0.0) / 1e6,
                     "time_ms": 1e3 * _median_time(lambda unr=unr: unr(toy.problem, x, z0))})
    return {"rows": rows, "rate": q, "implicit_MB": (mem_imp or 0.0) / 1e6, "implicit_ms": 1e3 * t_imp}


def deq_figure(results: list[SubResult], check: dict[str, Any], out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import load_trace

    fig = Figure(figsize=(10.0, 3.6))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.15, wspace=0.3)
    ax = fig.add_subplot(1, 3, 1)
    for c, r in enumerate(results):
        tr = load_trace(r.path)
        ax.plot([t["step"] for t in tr], [t["test_mse"] for t in tr], color=f"C{c}",
                label=f"{r.run.label} (test)")
        ax.plot([t["step"] for t in tr], [t["train_mse"] for t in tr], color=f"C{c}", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("MSE (dashed: train)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ks = [c["K"] for c in check["rows"]]
    ax = fig.add_subplot(1, 3, 2)
    ax.semilogy(ks, [max(c["rel_err"], 1e-17) for c in check["rows"]], "o-", label="unrolled vs implicit")
    ax.semilogy(ks, [c["bound"] for c in check["rows"]], "k--", lw=0.8, label="K q^K/(1−q)")
    ax.set_ylim(bottom=1e-17)
    ax.set_xlabel("K (unrolled iterations)")
    ax.set_ylabel("relative gradient error")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 3, 3)
    ax.plot(ks, [c["saved_MB"] for c in check["rows"]], "o-", label="unrolled (reverse)")
    ax.axhline(check["implicit_MB"], color="C1", label="implicit (fixed_point)")
    ax.set_xlabel("K")
    ax.set_ylabel("autograd memory [MB]")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "deq.png")


# --- Neural ODE ---------------------------------------------------------------------------------


def _ode(cfg: dict[str, Any], steps: int | None = None):
    d = cfg["data"]
    return neural_ode(cfg["ode_steps"] if steps is None else steps, method=cfg["method"], hidden=d["hidden"],
                      n_train=d["n_train"], n_test=d["n_test"], seed=cfg["seed"],
                      dtype=run_dtype(cfg, torch.float64), device=cfg["device"])


def _ode_estimator(toy: Any, checkpoint: bool | int) -> Reverse:
    return Reverse(GD(lr=1.0, steps=toy.steps), checkpoint=checkpoint, grad_fn=map_step(toy.phi))


@register
class NeuralODETrain(Experiment):
    name = "neural-ode-train"
    description = "fixed-step Neural ODE (Euler/RK4) trained by reverse mode, optionally checkpointed"
    reference = "Chen et al. 2018 (Neural ODE); Griewank & Walther 2008 (checkpointing)"
    defaults = {
        "seed": 0, "steps": 150, "eval_every": 10, "checkpoint_every": 0,
        "ode_steps": 32, "method": "rk4", "checkpoint": True,
        "data": {"hidden": 16, "n_train": 64, "n_test": 512},
        "upper": {"lr": 0.01},
    }
    choices = {"method": ("euler", "rk4")}

    def build(self, cfg: dict[str, Any]) -> Setup:
        toy = _ode(cfg)
        solver = HypergradientDescent(_ode_estimator(toy, cfg["checkpoint"]),
                                      upper=Adam(lr=cfg["upper"]["lr"]), warm_start=False)

        def evaluate(x: dict[str, torch.Tensor], z: torch.Tensor) -> dict[str, float]:
            return {"train_mse": toy.mse(x, "train"), "test_mse": toy.mse(x, "test")}

        x0, y0 = toy.start()
        return Setup(problem=toy.problem, x0=x0, y0=y0, solver=solver, evaluate=evaluate,
                     progress=("train_mse",), plot_metrics=("train_mse", "test_mse"),
                     info={"checkpoint": bool(cfg["checkpoint"]), "ode_steps": toy.steps})


def ode_memory(cfg: dict[str, Any], ts: list[int], repeats: int = 3) -> list[dict[str, Any]]:
    """Peak saved bytes and median time of one hypergradient, plain vs checkpointed, per T."""
    rows = []
    for T_ in ts:
        toy = _ode(cfg, T_)
        x, y0 = toy.start()
        out: dict[str, Any] = {"T": T_}
        grads = {}
        for ck in (False, True):
            est = _ode_estimator(toy, ck)
            res, mem = saved_bytes(lambda est=est, toy=toy, x=x, y0=y0: est(toy.problem, x, y0))
            grads[ck] = res.grad
            out["ckpt_MB" if ck else "plain_MB"] = (mem or 0.0) / 1e6
            out["ckpt_s" if ck else "plain_s"] = 0.0
        for _ in range(repeats):  # interleaved, medians
            for ck in (False, True):
                est = _ode_estimator(toy, ck)
                call = lambda est=est, toy=toy, x=x, y0=y0: est(toy.problem, x, y0)  # noqa: E731
                out.setdefault(f"t{ck}", []).append(_median_time(call, 1))
        out["plain_s"] = statistics.median(out.pop("tFalse"))
        out["ckpt_s"] = statistics.median(out.pop("tTrue"))
        out["max_abs_diff"] = max(float((grads[True][k] - grads[False][k]).abs().max()) for k in x)
        rows.append(out)
    return rows


@register
class NeuralODE(Table):
    name = "neural-ode"
    description = "Neural ODE: Reverse(checkpoint=True) = plain reverse mode, memory O(sqrt T) vs O(T)"
    reference = "Chen et al. 2018; Griewank & Walther 2008"
    defaults = {"seed": 0, "steps": 150, "ode_steps": 32, "memory_T": [16, 64, 256, 1024]}
    columns = ("train_mse", "test_mse")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        return [SubRun(label="checkpointed" if ck else "plain", experiment="neural-ode-train",
                       seed=cfg["seed"],
                       overrides={"checkpoint": ck, "steps": cfg["steps"], "ode_steps": cfg["ode_steps"]})
                for ck in (False, True)]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        from ..experiments.base import get

        rows = [[r.run.label, fmt(r.final.get("train_mse")), fmt(r.final.get("test_mse")),
                 f"{r.info['solver_time_s']:.2f}"] for r in results]
        head = ["reverse mode", "train MSE", "test MSE", "solver time [s]"]
        ocfg = get("neural-ode-train").resolve(overrides={"seed": cfg["seed"]})
        mem = ode_memory(ocfg, [int(t) for t in cfg["memory_T"]])
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = ode_figure(results, mem, table_dir / "plots")
        mrows = [[m["T"], fmt(m["plain_MB"]), fmt(m["ckpt_MB"]),
                  fmt(m["plain_MB"] / max(m["ckpt_MB"], 1e-300)), fmt(math.sqrt(m["T"])), fmt(m["plain_s"]),
                  fmt(m["ckpt_s"]), fmt(m["max_abs_diff"])]
                 for m in mem]
        mhead = ["T", "plain MB", "checkpointed MB", "ratio", "√T", "plain [s]", "checkpointed [s]",
                 "max abs Δ grad"]
        diff = ""
        if len(results) == 2:
            a, b = (r.final.get("train_mse") for r in results)
            if isinstance(a, float) and isinstance(b, float):
                diff = f"Final train MSE, plain vs checkpointed training: |Δ| = {fmt(abs(a - b))}.\n\n"
        note = (f"## Neural ODE ({ocfg['method']}, T = {cfg['ode_steps']} steps on [0, 1], "
                f"{cfg['steps']} Adam steps)\n\n")
        mnote = ("\nOne hypergradient at the initial parameters (N = "
                 f"{ocfg['data']['n_train']} points): peak bytes autograd holds (`_memory.saved_bytes`), "
                 "median time of 3 interleaved calls, and the largest difference between the two "
                 "gradients.\n\n")
        return (note + markdown_table(head, rows) + "\n" + diff + mnote + markdown_table(mhead, mrows)
                + f"\nfigure: {fig}\n")


def ode_figure(results: list[SubResult], mem: list[dict[str, Any]], out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import load_trace

    fig = Figure(figsize=(8.4, 3.6))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.88, bottom=0.15, wspace=0.3)
    ax = fig.add_subplot(1, 2, 1)
    ts = [m["T"] for m in mem]
    ax.loglog(ts, [m["plain_MB"] for m in mem], "o-", label="Reverse (plain)")
    ax.loglog(ts, [m["ckpt_MB"] for m in mem], "s-", label="Reverse(checkpoint=True)")
    t0, p0, c0 = ts[0], mem[0]["plain_MB"], mem[0]["ckpt_MB"]
    ax.loglog(ts, [p0 * t / t0 for t in ts], "k:", lw=0.8, label="∝ T")
    ax.loglog(ts, [c0 * math.sqrt(t / t0) for t in ts], "k--", lw=0.8, label="∝ √T")
    ax.set_xlabel("integration steps T")
    ax.set_ylabel("autograd memory [MB]")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax = fig.add_subplot(1, 2, 2)
    for c, r in enumerate(results):
        tr = load_trace(r.path)
        ax.semilogy([t["step"] for t in tr], [t["test_mse"] for t in tr], color=f"C{c}", label=r.run.label,
                    ls="-" if c == 0 else "--")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("test MSE")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "neural_ode.png")
