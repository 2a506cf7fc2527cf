"""``bilevel run proxy-ridge`` / ``proxy``: best-response proxies vs unrolled and implicit
hypergradients on per-feature ridge regularisation (survey 2207.11719, Sec. 4.2).

The upper variable x of :func:`bilevel.problems.proxy_ridge` (``kind="regularization"``) is one
log weight decay per feature, clamped to the box [low, high]; the lower level is ridge regression
on 40 training points, the upper level the validation loss. Every estimator drives the same
hypergradient descent (Adam on x, warm-started lower level):

* ``hypernet`` — :class:`~bilevel.hypergrad.Hypernetwork`, global fitting: an MLP y_φ(x) fitted
  over the whole box (``warmup`` steps at the first call, ``steps`` more per call; Lorraine &
  Duvenaud 2018, Alg. 1);
* ``stn`` — :class:`~bilevel.hypergrad.STN`, local fitting of a linear-in-x proxy around the
  current x (MacKay et al. 2019);
* ``evograd`` — :class:`~bilevel.hypergrad.EvoGrad` (Bohdal et al. 2021) after ``inner`` GD steps;
* ``reverse`` — :class:`~bilevel.hypergrad.Reverse` through ``inner`` GD steps (the reference
  for time and memory); ``cg`` — :class:`~bilevel.hypergrad.CG` (implicit, AID).

Each step records ``cos_exact``, the cosine between the hypergradient the descent uses and the
closed-form ∇h(x_t) (a dim-x linear solve, inside the solver clock, negligible), and the time of
the estimator call (``est_time``). Evaluations record h(x) = f(x, y*(x)) by the closed form and
its gap to h*, the value reached by 2000 Adam steps on the exact hypergradient from x0. The
table adds a side-by-side measurement at x0 (calls interleaved, medians; each proxy from its
state after its first call, so the warm-up fit is not counted): time per hypergradient and the
peak of the tensors autograd saves for backward (:func:`bilevel._memory.saved_bytes`; the
proxies in their loop form, ``batched=False``, which the probe can see), both relative to
``reverse``.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .. import _tree as T
from .._memory import saved_bytes
from ..errors import ConfigError
from ..hypergrad import CG, STN, EvoGrad, Hypernetwork, Reverse
from ..inner import GD, Adam
from ..problems.proxy import ProxyRidge, proxy_ridge
from ..solvers import HypergradientDescent
from ..solvers.base import descend
from .base import Experiment, Setup, SubResult, SubRun, Table, fmt, markdown_table, register
from .plots import save_figure

__all__ = ["ProxyRidgeExperiment", "ProxyTable", "ScoredDescent"]

ESTIMATORS = ("hypernet", "stn", "evograd", "reverse", "cg")
LABELS = {"hypernet": "hypernetwork, global (MLP)", "stn": "STN, local (linear)",
          "evograd": "EvoGrad", "reverse": "Reverse (RHG)", "cg": "CG (implicit)"}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


class ScoredDescent(HypergradientDescent):
    """:class:`~bilevel.solvers.HypergradientDescent` (warm start) that also records, per step,
    ``cos_exact`` = cos(∇̂h(x_t), ∇h(x_t)) against a closed form ``exact(x)`` and ``est_time``."""

    def __init__(self, estimator: Any, upper: Any, exact: Any):
        super().__init__(estimator, upper=upper, warm_start=True)
        self.exact = exact

    def metrics(self, x: Any, grad: Any, info: dict[str, Any]) -> dict[str, Any]:
        return {"est_time": info["time"], "cos_exact": _cos(T.to_vector(grad), self.exact(T.to_vector(x)))}


def make_estimator(name: str, cfg: dict[str, Any], pr: ProxyRidge, *, batched: bool = True) -> Any:
    """The estimator ``name`` of the experiment with the settings of ``cfg``."""
    lr = 1.0 / max(pr.lower_lipschitz(torch.full_like(pr.x0, float(cfg["box"]["high"]))), 1e-12)
    inner = GD(lr=lr, steps=cfg["inner"]["steps"])
    if name == "hypernet":
        h = cfg["hypernet"]
        return Hypernetwork("mlp", "global", hidden=h["hidden"], box=(cfg["box"]["low"], cfg["box"]["high"]),
                            samples=h["samples"], warmup=h["warmup"], steps=h["steps"], lr=h["lr"],
                            seed=cfg["seed"], batched=batched)
    if name == "stn":
        s = cfg["stn"]
        return STN(radius=s["radius"], samples=s["samples"], warmup=s["warmup"], steps=s["steps"],
                   lr=s["lr"], seed=cfg["seed"], batched=batched)
    if name == "evograd":
        e = cfg["evograd"]
        return EvoGrad(inner, samples=e["samples"], sigma=e["sigma"], tau=e["tau"], seed=cfg["seed"],
                       batched=batched)
    if name == "reverse":
        return Reverse(inner)
    if name == "cg":
        return CG(inner, iters=cfg["cg"]["iters"], tol=1e-10)
    raise ConfigError(f"unknown estimator {name!r}; valid: {', '.join(ESTIMATORS)}")


def _problem(cfg: dict[str, Any]) -> ProxyRidge:
    d = cfg["data"]
    return proxy_ridge("regularization", dim=d["dim"], n_train=d["n_train"], n_val=d["n_val"],
                       noise=d["noise"], x0=d["x0"], seed=cfg["seed"])


@functools.lru_cache(maxsize=8)
def _h_star(key: tuple, low: float, high: float, steps: int = 2000) -> float:
    """min h over the box by Adam on the closed-form hypergradient (the reference optimum)."""
    pr = _PROBLEMS[key]
    x = pr.x0.clone()
    rule = Adam(lr=0.05)
    st = rule.init((x,))
    best = pr.h(x)
    for t in range(steps):
        (x,), st = descend(rule, st, (pr.hypergrad(x),), t, lambda xs: tuple(u.clamp(low, high) for u in xs))
        best = min(best, pr.h(x))
    return best


_PROBLEMS: dict[tuple, ProxyRidge] = {}


@register
class ProxyRidgeExperiment(Experiment):
    name = "proxy-ridge"
    description = "best-response proxies (hypernetwork, STN, EvoGrad) vs Reverse/CG on ridge regularisation"
    reference = "Lorraine & Duvenaud 2018; MacKay et al. 2019; Bohdal et al. 2021; survey 2207.11719 Sec. 4.2"
    defaults = {
        "seed": 0, "steps": 150, "eval_every": 5, "checkpoint_every": 0,
        "estimator": "stn",
        "data": {"dim": 10, "n_train": 40, "n_val": 200, "noise": 0.5, "x0": 0.0},
        "box": {"low": -4.0, "high": 2.0},
        "upper": {"lr": 0.05},
        "inner": {"steps": 50},
        "hypernet": {"hidden": 32, "samples": 16, "warmup": 1500, "steps": 5, "lr": 0.01},
        "stn": {"radius": 0.1, "samples": 8, "warmup": 100, "steps": 10, "lr": 0.01},
        "evograd": {"samples": 100, "sigma": 0.1, "tau": 0.01},
        "cg": {"iters": 20},
    }
    choices = {"estimator": ESTIMATORS}

    def build(self, cfg: dict[str, Any]) -> Setup:
        pr = _problem(cfg)
        low, high = float(cfg["box"]["low"]), float(cfg["box"]["high"])
        if not low < high:
            raise ConfigError(f"box: needs low < high, got {low}, {high}")
        key = (cfg["seed"], *sorted(cfg["data"].items()))
        _PROBLEMS.setdefault(key, pr)
        name = cfg["estimator"]
        est = make_estimator(name, cfg, pr)
        solver = ScoredDescent(est, Adam(lr=cfg["upper"]["lr"]), pr.hypergrad)
        unused = {f"{k}.{s}" for k in ("hypernet", "stn", "evograd", "cg") if k != name
                  for s in cfg[k]}
        if name in ("hypernet", "stn"):
            unused.add("inner.steps")
        h_star = _h_star(key, low, high)

        def evaluate(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
            h = pr.h(x)
            ys = pr.y_star(x)
            return {"h": h, "h_gap": h - h_star, "y_err": float((y - ys).norm() / ys.norm())}

        def baselines() -> dict[str, float]:
            return {"h_star": h_star, "h_x0": pr.h(pr.x0)}

        return Setup(problem=pr.problem, x0=pr.x0, y0=pr.y0, solver=solver, evaluate=evaluate,
                     baselines=baselines,
                     x_projection=lambda t: t.clamp(low, high), progress=("h_gap", "cos_exact"),
                     plot_metrics=("h_gap", "cos_exact", "y_err"), unused=unused,
                     info={"estimator": repr(est)})


def measure(cfg: dict[str, Any], names: list[str], reps: int = 7) -> dict[str, dict[str, float]]:
    """Side-by-side cost of one hypergradient at x0: median time (calls interleaved across the
    estimators, ``reps`` rounds) and peak saved-tensor bytes; proxies from their state after a
    first call (``batched=False`` copies for the memory probe)."""
    pr = _problem(cfg)
    ests = {n: make_estimator(n, cfg, pr) for n in names}
    states = {}
    for n, e in ests.items():  # the first call (proxies: the warm-up fit) is not measured
        states[n] = e(pr.problem, pr.x0, pr.y0).state
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        for n, e in ests.items():
            t0 = time.perf_counter()
            e(pr.problem, pr.x0, pr.y0, state=states[n])
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n in names:
        probe = make_estimator(n, cfg, pr, batched=False)
        _, peak = saved_bytes(lambda probe=probe, n=n: probe(pr.problem, pr.x0, pr.y0, state=states[n]))
        out[n] = {"time": statistics.median(times[n]), "saved_bytes": peak}
    return out


def curves_figure(results: list[SubResult], out: Path) -> Path:
    """h(x_t) − h* and cos(∇̂h, ∇h) vs upper step, one line per estimator."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .runner import load_trace

    fig = Figure(figsize=(9.0, 3.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.15, wspace=0.28)
    a1, a2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for c, r in enumerate(results):
        tr = load_trace(r.path)
        steps = [t["step"] for t in tr]
        lab = LABELS.get(r.run.label, r.run.label)
        a1.semilogy(steps, [max(t["h_gap"], 1e-12) for t in tr], color=f"C{c}", label=lab)
        pts = [(t["step"], t["cos_exact"]) for t in tr if "cos_exact" in t]
        a2.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{c}", label=lab)
    a1.set_xlabel("upper step", fontsize=8)
    a1.set_title("h(x_t) − h*  (closed form)", fontsize=9)
    a2.set_xlabel("upper step", fontsize=8)
    a2.set_title("cos(estimate, exact hypergradient)", fontsize=9)
    a2.set_ylim(-0.1, 1.05)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    return save_figure(fig, out / "proxy_curves.png")


@register
class ProxyTable(Table):
    name = "proxy"
    description = ("proxy hypergradients (hypernetwork global, STN local, EvoGrad) vs Reverse / CG: "
                   "cos to exact, loss, time, memory")
    reference = ("survey 2207.11719 Sec. 4.2 (Eq. 33-35); Lorraine & Duvenaud 2018; MacKay et al. 2019; "
                 "Bohdal et al. 2021")
    defaults = {"seed": 0, "estimators": list(ESTIMATORS), "steps": 150, "reps": 7}
    columns = ("h_gap", "cos_exact")

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        for e in cfg["estimators"]:
            if e not in ESTIMATORS:
                raise ConfigError(f"unknown estimator {e!r} in estimators; valid: {', '.join(ESTIMATORS)}")
        return [SubRun(label=e, experiment="proxy-ridge", seed=cfg["seed"],
                       overrides={"estimator": e, "steps": cfg["steps"]}) for e in cfg["estimators"]]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        from .runner import load_trace

        names = [r.run.label for r in results]
        sub = ProxyRidgeExperiment().resolve(overrides={"seed": cfg["seed"]})
        cost = measure(sub, names, reps=int(cfg["reps"]))
        ref = cost.get("reverse")
        rows = []
        for r in results:
            tr = [t for t in load_trace(r.path) if "cos_exact" in t]
            coss = [t["cos_exact"] for t in tr]
            c = cost[r.run.label]
            rt = f"{c['time'] / ref['time']:.2f}" if ref else "—"
            mem = c["saved_bytes"]
            rm = f"{mem / ref['saved_bytes']:.3f}" if ref and mem is not None and ref["saved_bytes"] else "—"
            rows.append([LABELS.get(r.run.label, r.run.label), fmt(r.final.get("h")),
                         fmt(r.final.get("h_gap")), fmt(statistics.median(coss) if coss else None),
                         fmt(min(coss) if coss else None),
                         f"{1e3 * c['time']:.2f}", rt,
                         "—" if mem is None else f"{mem / 1024:.1f}", rm])
        head = ["estimator", "final h", "h − h*", "cos to exact (median over steps)", "cos (worst step)",
                "time / hypergradient [ms]", "× Reverse", "saved for backward [KiB]", "× Reverse"]
        info = results[0].extras if results else {}
        table_dir = results[0].path.parent.parent if results else Path(".")
        fig = curves_figure(results, table_dir / "plots")
        note = (f"## Proxy hypergradients on ridge regularisation ({cfg['steps']} upper Adam steps of "
                f"{sub['upper']['lr']}, dim x = dim y = {sub['data']['dim']}, x in [{sub['box']['low']}, "
                f"{sub['box']['high']}]^d)\n\nh(x0) = {fmt(info.get('h_x0'))}, "
                f"h* = {fmt(info.get('h_star'))} (2000 Adam steps on the closed-form hypergradient). "
                f"Time and memory: one hypergradient at x0, {cfg['reps']} interleaved rounds, medians "
                "(shared machine: times are noisy).\n\n")
        return note + markdown_table(head, rows) + f"\nfigure: {fig}\n"
