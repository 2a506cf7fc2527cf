"""``bilevel run hyperclean-table``: data hyper-cleaning with LS / NS / RHG / T-RHG / BDA / IAPTT-GM.

The analogue of Liu et al. 2021 (NeurIPS), Table 3: every method runs the ``hyperclean`` experiment
(:mod:`bilevel.experiments.hyperclean` — same data protocol, model, metrics and baselines) for
``seeds`` seeds, and the table reports test accuracy and the F1 score of the kept samples as
mean ± std. LS / NS / RHG / T-RHG are hypergradient descent with the CG / Neumann / reverse /
truncated-reverse estimator; BDA and IAPTT-GM are the solvers of :mod:`bilevel.solvers`. Not in
the paper, selectable with ``--set 'methods=[...]'``: LS-MINRES, LS-normal and LS-damped, the implicit
method with a linear solver for the indefinite lower Hessian of the MLP (MINRES, CG on the normal
equations, CG on (H + damping I); see docs/deterministic.md).

The sub-experiment is ``hyperclean-det``: ``hyperclean`` plus the options the deterministic solvers
need beyond its config — the step of IAPTT-GM's initialization auxiliary z (the lower model's
starting weights; the paper uses Adam with step 0.01 for it, far below the step of the sample
logits x) and BDA's μ and s_u.

Defaults are small so that the whole table (6 methods x 3 seeds) takes a few minutes on 2 CPU cores:
a two-layer lower model Linear(784, h) -> ReLU -> Linear(h, 10) with h = 64 (the paper: 300, no
activation stated), 1000 / 1000 / 2000 train / validation / test images of the bundled MNIST
subset with 50 % of the training labels corrupted, K = 10 lower steps, 60 outer steps. Use
``--set hidden=300 steps=300`` for the paper's width (much slower on a CPU).
"""

from __future__ import annotations

import statistics
from typing import Any

from .base import SubResult, SubRun, Table, markdown_table, mean_std, register
from .factory import Arg, Built, Lazy, build
from .hyperclean import HyperClean

__all__ = ["HypercleanDet", "HypercleanTable", "METHODS"]

#: label -> hyperclean overrides selecting the method
METHODS: dict[str, dict[str, Any]] = {
    "LS": {"solver": "hypergradient", "hypergrad.estimator": "cg"},
    # implicit methods for an indefinite lower Hessian (not in the paper's table)
    "LS-MINRES": {"solver": "hypergradient", "hypergrad.estimator": "minres"},
    "LS-normal": {"solver": "hypergradient", "hypergrad.estimator": "normalcg"},
    "LS-damped": {"solver": "hypergradient", "hypergrad.estimator": "cg"},  # + hypergrad.damping
    "NS": {"solver": "hypergradient", "hypergrad.estimator": "neumann"},
    "RHG": {"solver": "hypergradient", "hypergrad.estimator": "rhg"},
    "TRHG": {"solver": "hypergradient", "hypergrad.estimator": "trhg"},  # + hypergrad.truncate
    "BDA": {"solver": "BDA"},
    "IAPTTGM": {"solver": "IAPTTGM"},
}


@register
class HypercleanDet(HyperClean):
    name = "hyperclean-det"
    description = "hyperclean + options of the deterministic solvers (IA init step, BDA mu / s_u)"
    reference = "Liu et al. 2021 (NeurIPS), Sec. 4.2.2 and Table 6"

    solver_keys = HyperClean.solver_keys | {"det.init_lr", "det.mu", "det.s_u", "det.adaptive"}

    def default_config(self) -> dict[str, Any]:
        cfg = HyperClean().default_config()  # configs/hyperclean.toml
        # init_lr: step of IAPTT-GM's z (same optimizer as x); s_u 0 = the lower step; adaptive:
        # BDA's backtracked s_u (false: the paper's fixed s_u)
        cfg["det"] = {"init_lr": 0.01, "mu": 0.5, "s_u": 0.0, "adaptive": True}
        return cfg

    def solver_offers(self, cfg: dict[str, Any]) -> dict[str, Any]:
        dc, uc = cfg["det"], cfg["upper"]

        def init_rule() -> Built:  # IA-GM / IAPTT-GM: the rule of x with its own step size
            return build("dynamics", uc["optimizer"], {"lr": Arg(dc["init_lr"], ("det.init_lr",)),
                                                        "momentum": Arg(0.9)}, keys=("upper.optimizer",))

        return {"init_rule": Arg(Lazy(init_rule)), "mu": Arg(dc["mu"], ("det.mu",)),
                "s_u": Arg(dc["s_u"] or None, ("det.s_u",)),
                "adaptive": Arg(bool(dc["adaptive"]), ("det.adaptive",))}


@register
class HypercleanTable(Table):
    name = "hyperclean-table"
    description = "hyper-cleaning: LS / NS / RHG / T-RHG / BDA / IAPTT-GM, test acc and F1 over seeds"
    reference = "Liu et al. 2021 (NeurIPS), Table 3"
    defaults = {
        "seed": 0,
        "seeds": 3,
        "methods": ["LS", "NS", "RHG", "TRHG", "BDA", "IAPTTGM"],  # the paper's; + LS-MINRES, ...
        "steps": 60,
        "eval_every": 10,
        "model": "mlp",
        "hidden": 64,
        "activation": "relu",
        "n_train": 1000,
        "n_val": 1000,
        "n_test": 2000,
        "corruption": 0.5,
        "lower_lr": 0.5,
        "lower_steps": 10,
        "upper_lr": 0.3,
        "truncate": 5,
        "iters": 10,
        "damping": 1.0,
        "init_lr": 0.01,
        "mu": 0.5,
        "baseline_iters": 100,
    }
    columns = ("test_acc", "f1")
    choices = {"model": ("linear", "mlp"), "activation": ("relu", "tanh", "none")}

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        from ..errors import ConfigError

        bad = [m for m in cfg["methods"] if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
        if cfg["seeds"] < 1:
            raise ConfigError(f"seeds must be >= 1, got {cfg['seeds']}")
        common = {
            "steps": cfg["steps"], "eval_every": cfg["eval_every"], "checkpoint_every": 0,
            "model.kind": cfg["model"], "model.hidden": cfg["hidden"], "model.activation": cfg["activation"],
            "data.n_train": cfg["n_train"], "data.n_val": cfg["n_val"], "data.n_test": cfg["n_test"],
            "data.corruption": cfg["corruption"], "lower.lr": cfg["lower_lr"],
            "lower.steps": cfg["lower_steps"], "upper.lr": cfg["upper_lr"],
            "hypergrad.iters": cfg["iters"],
            "det.init_lr": cfg["init_lr"], "det.mu": cfg["mu"], "baseline.max_iter": cfg["baseline_iters"],
        }
        trunc = {"hypergrad.truncate": cfg["truncate"]}  # T-RHG only (RHG backpropagates all K steps)
        damp = {"hypergrad.damping": cfg["damping"]}  # LS-damped only: (H + damping I) v = ∇_y f
        return [SubRun(label=m, experiment="hyperclean-det", seed=cfg["seed"] + k,
                       overrides={**common, **METHODS[m], **(trunc if m == "TRHG" else {}),
                                  **(damp if m == "LS-damped" else {})})
                for m in cfg["methods"] for k in range(cfg["seeds"])]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        groups: dict[str, list[SubResult]] = {}
        for r in results:
            groups.setdefault(r.run.label, []).append(r)
        rows = []
        for label, rs in groups.items():
            rows.append([label, str(len(rs))]
                        + [mean_std([float(r.final[c]) for r in rs]) for c in ("test_acc", "f1")]
                        + [f"{statistics.fmean(r.info['solver_time_s'] for r in rs):.1f}"])
        seeds = {r.run.seed: r.extras for r in results}  # the baselines depend on the seed only
        for tag, label in (("noisy", "baseline: all samples, weight 1"), ("oracle", "oracle: clean only")):
            vals = [e[f"{tag}_test_acc"] for e in seeds.values() if f"{tag}_test_acc" in e]
            f1 = [e[f"{tag}_f1"] for e in seeds.values() if f"{tag}_f1" in e]
            if vals:
                rows.append([label, str(len(vals)), mean_std(vals), mean_std(f1), "—"])
        lower = (f"Linear({784}, {cfg['hidden']}) -> {cfg['activation']} -> Linear({cfg['hidden']}, 10)"
                 if cfg["model"] == "mlp" else "Linear(784, 10)")
        note = (f"## Data hyper-cleaning, bundled MNIST subset: {cfg['n_train']} / {cfg['n_val']} / "
                f"{cfg['n_test']} train / val / test, {cfg['corruption']:.0%} of the training labels "
                f"corrupted\n\nlower model {lower}; K = {cfg['lower_steps']} lower GD steps of size "
                f"{cfg['lower_lr']} (warm-started, except IAPTT-GM which learns its start z with Adam step "
                f"{cfg['init_lr']}); Adam step {cfg['upper_lr']} on the sample logits x; {cfg['steps']} "
                f"outer steps; CG / Neumann {cfg['iters']} iterations; T-RHG backpropagates the last "
                f"{cfg['truncate']} steps; BDA mu = {cfg['mu']}, s_u backtracked with cap s_l (the "
                f"default). Mean ± std over seeds "
                f"{sorted(seeds)} (the seed also draws the split and the corruption); time = mean solver "
                "seconds per run (evaluation excluded).\n\n")
        return note + markdown_table(["method", "seeds", "test acc", "F1 (kept vs clean)", "time [s]"], rows)
