"""Data hyper-cleaning (Franceschi et al. 2017, Sec. 5.1; Liu et al. 2021, IAPTT-GM, Sec. 4.2.2).

A fraction of the training labels is corrupted; one logit x_i per training sample weighs it:

    min_x  f(x, w*(x)) = CE(w*(x); D_val)                                  (clean validation)
    w*(x) ∈ argmin_w  (1/n) Σ_i σ(x_i) CE(w; a_i, ỹ_i) + (λ/2) ||w||²      (noisy training set)

The data come from the one hyper-cleaning pipeline,
:func:`bilevel.problems.hyperclean.hyperclean_data` (stratified splits, seeded corruption among the
wrong classes, pixels centred by the training mean). The lower model is softmax regression (784x10,
convex follower) or a two-layer MLP (non-convex follower), called with
``torch.func.functional_call`` on ``bl.params(model)``. Any estimator of
:mod:`bilevel.hypergrad` can be chosen (``hypergrad.estimator``) with an upper update rule from
:mod:`bilevel.inner` (``upper.optimizer``); the lower level is warm-started across outer steps.

Metrics: test accuracy of w; precision / recall / F1 of the "kept" samples (σ(x_i) > 0.5, i.e.
x_i > 0) against the clean mask; upper/lower loss. Baselines (same lower objective, solved by
L-BFGS): all samples with weight 1 (noisy) and the clean samples only (oracle).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from ..estimates import Schedule
from ..formulation import Problem, params
from ..problems.hyperclean import HypercleanData, hyperclean_data
from ..sampling import FullBatch, Minibatches
from .base import Experiment, Setup, fmt, markdown_table, register, run_device, run_dtype
from .factory import Arg, Built, Lazy, build, build_estimator, find_solver

__all__ = ["HyperClean", "HypercleanData", "load_data", "make_model", "kept_scores"]


#: the experiment's data loader is the one hyper-cleaning pipeline (centred pixels by default)
load_data = hyperclean_data


def make_model(kind: str, d_in: int, n_classes: int, hidden: int = 300,
               activation: str = "relu") -> nn.Module:
    """``linear``: Linear(d, C); ``mlp``: Linear(d, h) -> activation -> Linear(h, C)."""
    if kind == "linear":
        return nn.Linear(d_in, n_classes)
    if kind == "mlp":
        act = {"relu": [nn.ReLU()], "tanh": [nn.Tanh()], "none": []}[activation]
        return nn.Sequential(nn.Linear(d_in, hidden), *act, nn.Linear(hidden, n_classes))
    raise ConfigError(f"model.kind must be linear or mlp, got {kind!r}")


def kept_scores(x: Tensor, corrupted: Tensor) -> dict[str, float]:
    """Precision / recall / F1 of kept samples (x_i > 0 ⇔ σ(x_i) > 0.5) against the clean ones."""
    kept, clean = x > 0, ~corrupted
    tp = int((kept & clean).sum())
    n_kept, n_clean = int(kept.sum()), int(clean.sum())
    p = tp / n_kept if n_kept else 0.0
    r = tp / n_clean if n_clean else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"f1": f1, "precision": p, "recall": r, "kept": n_kept / max(len(x), 1)}


def build_solver(cfg: dict[str, Any], extra: dict[str, Any] | None = None) -> Built:
    """The solver named by ``cfg["solver"]``, offered every option of the config that it may take.

    Deterministic solvers get the lower dynamics (``[lower]``), the upper update rule
    (``upper.optimizer``, ``upper.lr``) and the estimator options (``[hypergrad]``);
    ``HypergradientDescent`` gets the estimator ``hypergrad.estimator``; stochastic solvers get
    the step sizes ``lr_x`` = ``upper.lr`` / (t + 1)^``upper.decay`` and ``lr_y`` = ``lower.lr`` /
    (t + 1)^``lower.decay`` and ``inner_steps`` = ``lower.steps``. The keys the chosen solver does
    not take are :attr:`Built.unused` (the runner rejects those set explicitly). ``extra``: more
    offers (e.g. ``hyperclean-det``'s ``mu``).
    """
    lc, hc, uc = cfg["lower"], cfg["hypergrad"], cfg["upper"]

    def lower_dynamics() -> Built:
        return build("dynamics", lc["dynamics"], {
            "lr": Arg(lc["lr"], ("lower.lr",)), "steps": Arg(lc["steps"], ("lower.steps",)),
            "momentum": Arg(lc["momentum"], ("lower.momentum",))}, keys=("lower.dynamics",))

    def upper_rule() -> Built:
        return build("dynamics", uc["optimizer"], {
            "lr": Arg(uc["lr"], ("upper.lr",)), "momentum": Arg(0.9)}, keys=("upper.optimizer",))

    def estimator() -> Built:
        return build_estimator(hc["estimator"], {
            "inner": Lazy(lower_dynamics),
            "iters": Arg(hc["iters"], ("hypergrad.iters",)),
            "truncate": Arg(hc["truncate"] or None, ("hypergrad.truncate",)),
            "alpha": Arg(hc["alpha"] or None, ("hypergrad.alpha",)),
            "warm_start": Arg(hc["warm_start"], ("hypergrad.warm_start",)),
            "damping": Arg(hc["damping"], ("hypergrad.damping",))}, keys=("hypergrad.estimator",))

    offer: dict[str, Any] = {
        "estimator": Arg(Lazy(estimator)),
        "inner": Arg(Lazy(lower_dynamics)),
        "upper": Arg(Lazy(upper_rule)),
        "warm_start": Arg(lc["warm_start"], ("lower.warm_start",)),
        # AID / RHG / TRHG / BDA: the estimator options as their own constructor arguments
        "linear_solver": Arg(hc["estimator"], ("hypergrad.estimator",)),
        "iters": Arg(hc["iters"], ("hypergrad.iters",)),
        "alpha": Arg(hc["alpha"] or None, ("hypergrad.alpha",)),
        "warm_start_v": Arg(hc["warm_start"], ("hypergrad.warm_start",)),
        # stochastic solvers
        "lr_x": Arg(Schedule(uc["lr"], uc["decay"]), ("upper.lr", "upper.decay")),
        "lr_y": Arg(Schedule(lc["lr"], lc["decay"]), ("lower.lr", "lower.decay")),
        "inner_steps": Arg(lc["steps"], ("lower.steps",)),
    }
    if hc["truncate"]:
        offer["truncate"] = Arg(hc["truncate"], ("hypergrad.truncate",))
    cls = find_solver(cfg["solver"])
    if cls is not None and "lr_x" in inspect.signature(cls).parameters:
        # stochastic solvers take upper= too, but here upper.lr / upper.decay are their lr_x
        del offer["upper"]
    offer.update(extra or {})
    return build("solver", cfg["solver"], offer, keys=("solver",))


#: the config keys that configure the solver (the chosen one may use only some of them)
SOLVER_KEYS = frozenset({"lower.dynamics", "lower.lr", "lower.steps", "lower.momentum", "lower.warm_start",
                         "lower.decay", "hypergrad.estimator", "hypergrad.iters", "hypergrad.truncate",
                         "hypergrad.alpha", "hypergrad.warm_start", "hypergrad.damping", "upper.optimizer",
                         "upper.lr", "upper.decay"})


@register
class HyperClean(Experiment):
    name = "hyperclean"
    description = "data hyper-cleaning on corrupted MNIST: learn per-sample weights on a clean validation set"
    reference = "Franceschi et al. 2017 (Sec. 5.1); Liu et al. 2021 (IAPTT-GM, Sec. 4.2.2)"
    choices = {
        "data.dataset": ("mnist5k", "digits", "mnist", "fashion-mnist"),
        "model.kind": ("linear", "mlp"),
        "model.activation": ("relu", "tanh", "none"),
        "lower.dynamics": ("gd", "momentum", "nesterov", "adam"),
        "upper.optimizer": ("sgd", "adam", "momentum"),
    }
    #: the config keys that configure the solver (the chosen one may use only some of them)
    solver_keys = SOLVER_KEYS

    def solver_offers(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """More constructor offers for :func:`build_solver` (subclasses add their options)."""
        return {}

    def build(self, cfg: dict[str, Any]) -> Setup:
        dc, mc, uc = cfg["data"], cfg["model"], cfg["upper"]
        if not 0.0 <= dc["corruption"] <= 1.0:
            raise ConfigError(f"data.corruption must be in [0, 1], got {dc['corruption']}")
        if mc["l2"] < 0:
            raise ConfigError(f"model.l2 must be >= 0, got {mc['l2']}")
        seed = int(cfg["seed"])
        data = hyperclean_data(dc["dataset"], dc["n_train"], dc["n_val"], dc["n_test"], dc["corruption"],
                               seed, scale="center" if dc["center"] else "none", root=dc["root"],
                               download=dc["download"])
        dev, dt = run_device(cfg), run_dtype(cfg, torch.float32)
        data = data.to(dev, dt)
        model = make_model(mc["kind"], data.X_train.shape[1], data.n_classes, mc["hidden"],
                           mc["activation"]).to(device=dev, dtype=dt)
        w0 = params(model)
        l2 = float(mc["l2"])

        def weighted_loss(w: dict[str, Tensor], X: Tensor, y: Tensor, weights: Tensor) -> Tensor:
            ce = Fn.cross_entropy(functional_call(model, w, (X,)), y, reduction="none")
            reg = sum((t * t).sum() for t in w.values())
            return (weights * ce).mean() + 0.5 * l2 * reg

        def lower(x: Tensor, w: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
            X, y, idx = batch
            return weighted_loss(w, X, y, torch.sigmoid(x[idx]))

        def upper(x: Tensor, w: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
            X, y = batch
            return Fn.cross_entropy(functional_call(model, w, (X,)), y)

        problem = Problem(upper=upper, lower=lower, name="hyperclean")
        n = data.X_train.shape[0]
        idx = torch.arange(n, device=dev)
        bs = int(dc["batch_size"])
        if bs < 0:
            raise ConfigError(f"data.batch_size must be >= 0 (0 = full batch), got {bs}")
        if bs == 0:
            lower_data = FullBatch(data.X_train, data.y_train, idx)
            upper_data = FullBatch(data.X_val, data.y_val)
        else:
            lower_data = Minibatches(data.X_train, data.y_train, idx, batch_size=min(bs, n), seed=seed)
            upper_data = Minibatches(data.X_val, data.y_val, batch_size=min(bs, len(data.y_val)),
                                     seed=seed + 1)

        solver = build_solver(cfg, self.solver_offers(cfg))
        x0 = torch.full((n,), float(uc["x0"]), dtype=dt, device=dev)

        def accuracy(w: dict[str, Tensor], X: Tensor, y: Tensor) -> float:
            return float((functional_call(model, w, (X,)).argmax(1) == y).float().mean())

        def evaluate(x: Tensor, w: dict[str, Tensor]) -> dict[str, float]:
            return {"test_acc": accuracy(w, data.X_test, data.y_test),
                    "val_acc": accuracy(w, data.X_val, data.y_val),
                    **kept_scores(x, data.corrupted)}

        def fit(weights: Tensor, start: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
            """argmin_w of the lower objective at fixed sample weights (L-BFGS, strong Wolfe)."""
            w = {k: v.detach().clone().requires_grad_(True) for k, v in (start or w0).items()}
            opt = torch.optim.LBFGS(list(w.values()), lr=1.0, max_iter=int(cfg["baseline"]["max_iter"]),
                                    history_size=20, tolerance_grad=1e-7, tolerance_change=1e-12,
                                    line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad()
                loss = weighted_loss(w, data.X_train, data.y_train, weights)
                loss.backward()
                return loss

            with torch.enable_grad():
                opt.step(closure)
            return {k: v.detach() for k, v in w.items()}

        def lower_star(x: Tensor, w: dict[str, Tensor]) -> float:
            """Best known min_w g(x, w): L-BFGS started from the run's w (global for the linear model)."""
            weights = torch.sigmoid(x.detach())
            with torch.no_grad():
                here = float(weighted_loss(w, data.X_train, data.y_train, weights))
                there = float(weighted_loss(fit(weights, w), data.X_train, data.y_train, weights))
            return min(here, there)

        def baselines() -> dict[str, Any]:
            out: dict[str, Any] = {}
            clean = (~data.corrupted).to(data.X_train.dtype)
            ones = torch.ones(n, dtype=dt, device=dev)
            for tag, weights, x_equiv in (("noisy", ones, ones),
                                          ("oracle", clean, clean * 2 - 1)):
                w = fit(weights)
                out[f"{tag}_test_acc"] = accuracy(w, data.X_test, data.y_test)
                out.update({f"{tag}_{k}": v for k, v in kept_scores(x_equiv, data.corrupted).items()
                            if k != "kept"})
            return out

        return Setup(
            problem=problem, x0=x0, y0=w0, solver=solver.obj, evaluate=evaluate,
            lower_data=lower_data, upper_data=upper_data, baselines=baselines,
            progress=("test_acc", "f1"),
            plot_metrics=("upper_loss", "lower_loss", "test_acc", "f1", "precision", "recall"),
            plot_refs={"test_acc": {"noisy baseline": "noisy_test_acc",
                                    "oracle (clean only)": "oracle_test_acc"}},
            unused=self.solver_keys - solver.used, lower_star=lower_star, lower_star_final_only=True,
            info={"solver": solver.describe()},
        )

    def summarize(self, cfg: dict[str, Any], final: dict[str, Any], extras: dict[str, Any],
                  info: dict[str, Any]) -> str:
        dc, mc = cfg["data"], cfg["model"]
        head = (f"## Data hyper-cleaning: {dc['dataset']}, {dc['n_train']} train / {dc['n_val']} val / "
                f"{dc['n_test']} test, {dc['corruption']:.0%} of training labels corrupted\n\n"
                f"model {mc['kind']}, l2 {mc['l2']}; {info.get('steps', final.get('step'))} outer steps; "
                f"seed {cfg['seed']}\n\nsolver: {info.get('solver', cfg['solver'])}\n\n")
        rows = []
        for tag, label in (("noisy", "baseline: all samples, unweighted"),
                           ("oracle", "oracle: clean samples only")):
            if f"{tag}_test_acc" in extras:
                rows.append([label] + [fmt(extras.get(f"{tag}_{k}")) for k in ("test_acc", "f1", "precision",
                                                                               "recall")])
        rows.append([f"hyper-cleaning (step {final.get('step')})"]
                    + [fmt(final.get(k)) for k in ("test_acc", "f1", "precision", "recall")])
        table = markdown_table(["method", "test acc", "F1 (kept vs clean)", "precision", "recall"], rows)
        calls = {k: v for k, v in final.items() if k.startswith(("lower_", "upper_")) and isinstance(v, int)}
        foot = (f"\nsolver time {info.get('solver_time_s', 0):.1f} s (evaluation excluded), evaluation "
                f"{info.get('eval_time_s', 0):.1f} s, baselines {info.get('baseline_time_s', 0):.1f} s, "
                f"total wall time {info.get('wall_time_s', 0):.1f} s; final upper loss "
                f"{fmt(final.get('upper_loss'))}, lower loss {fmt(final.get('lower_loss'))}, kept "
                f"{fmt(final.get('kept'))} of the training samples\n"
                f"per-sample oracle calls: " + ", ".join(f"{k} {v:.3g}" for k, v in calls.items()) + "\n")
        if isinstance(final.get("breakdowns"), int):  # implicit estimators: safeguarded linear solves
            foot += (f"linear-solve breakdowns: {final['breakdowns']} of {final.get('step')} outer steps"
                     + (" (safeguarded, see docs/guide.md)" if final["breakdowns"] else "") + "\n")
        return head + table + foot
