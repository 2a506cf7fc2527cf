"""``bilevel run toy``: one deterministic solver on a toy of :mod:`bilevel.problems.toys`.

``bilevel run toy --set toy=nonconvex solver=IAPTTGM x0=5 y0=1`` records, every step, the errors
|f − f*|/|f*| and ‖x − x*‖/‖x*‖, the lower-level optimality (‖∇_y g‖ and g − g* from the toy's
closed-form g*), the truncation index k* (IA methods) and the autograd graph memory.

Defaults on the non-convex toy are the paper's (Liu et al. 2021, NeurIPS, App. C.1, Table 4):
K = 40 lower GD steps of size s_l = 5e-4, SGD step 0.1 on x and on the initialization auxiliary
z, 500 upper iterations. (The defaults before were K = 10, s_l = 1.2e-3, step 0.05, chosen so that x
climbs through the local solutions from the three published starts; from other starts they end
with an unsolved lower level — see docs/deterministic.md.)

Memory is measured as the bytes of the tensors autograd saves for the backward pass during one
outer step (every ``memory_every`` steps; :func:`bilevel._memory.saved_bytes`): the memory the
hypergradient computation itself needs, without the Python process baseline. On these toys it is
tiny in absolute terms; what matters is how it scales (RHG: O(K), IAPTT-GM: O(k*), AID: O(1)).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .. import oracles as O
from .._memory import saved_bytes
from ..compiled import Compiled
from ..hypergrad import Exact
from ..problems.toys import TOYS, Toy
from ..solvers.base import Context, Solver
from ..solvers.bda import BDA
from .base import Experiment, Setup, register, run_device, run_dtype
from .factory import Arg, Built, Lazy, build, find_solver

__all__ = ["ToyRun", "MemoryProbe", "TOY_SOLVERS", "TOY_SOLVER_KEYS", "build_toy_solver"]

#: solver labels of the toy experiments (LS / NS / FP = AID with CG / Neumann / fixed point)
TOY_SOLVERS = ("RHG", "TRHG", "LS", "NS", "FP", "BA", "BDA", "IAGM", "IAPTTGM", "IAGMA")

#: the config keys that configure the solver (the chosen one may use only some of them)
TOY_SOLVER_KEYS = frozenset({"inner.dynamics", "inner.lr", "inner.steps", "upper.optimizer", "upper.lr",
                             "upper.init_lr", "upper.beta2", "method.truncate", "method.iters", "method.mu",
                             "method.s_u", "method.adaptive", "method.warm_start"})


class MemoryProbe(Solver):
    """Runs ``solver``; every N steps adds ``graph_bytes``, the peak bytes of tensors held for backward.

    Not available for solvers built on ``torch.func`` transforms (BA's dense Hessian, an estimator
    wrapped in ``bl.compile``), which refuse the saved-tensor hooks, nor under compiled or
    functional oracles (``bl.solve(..., compile=...)``, ``bl.oracles.backend("func")``): such steps
    run unprobed and their records carry no ``graph_bytes``.
    """

    def __init__(self, solver: Solver, every: int = 10):
        self.solver, self.every = solver, max(1, int(every))
        self.reference = solver.reference
        est = getattr(solver, "estimator", None)  # (Exact and bl.compile(est) run torch.func)
        self.enabled = not isinstance(est, (Exact, Compiled))

    def init(self, ctx: Context, xs, ys) -> dict[str, Any]:
        return self.solver.init(ctx, xs, ys)

    def setup(self, ctx: Context, state: dict[str, Any]) -> None:
        self.solver.setup(ctx, state)

    def output(self, state: dict[str, Any]):
        return self.solver.output(state)

    @staticmethod
    def probes() -> bool:
        """Can a step be probed now? Plain eager autograd oracles only (the hooks see no tensors
        of a compiled graph, and torch.func transforms refuse them)."""
        return O.get_backend() == "autograd"

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        if t % self.every or not self.enabled or not self.probes():
            return self.solver.step(ctx, state, t)
        out, peak = saved_bytes(lambda: self.solver.step(ctx, state, t))
        return {**out, "graph_bytes": peak}

    def __repr__(self) -> str:
        return repr(self.solver)


def _rule(kind: str, lr: float, lr_key: str, beta2: float, projection: Any = None) -> Built:
    """An update rule for x or z: ``sgd`` / ``momentum`` / ``adam`` (β1 = 0.9, β2 = ``upper.beta2``)."""
    return build("dynamics", kind, {"lr": Arg(lr, (lr_key,)), "betas": Arg((0.9, beta2), ("upper.beta2",)),
                                    "projection": projection}, keys=("upper.optimizer",))


def build_toy_solver(cfg: dict[str, Any], projection: Any = None) -> Built:
    """The solver ``cfg["solver"]`` (:data:`TOY_SOLVERS` or any solver class) with the toy's options.

    ``projection``: the y-box applied to the initialization auxiliary z of the IA methods when the
    lower iterates are not projected (``method.inner_projection = false``).
    """
    ic, uc, m = cfg["inner"], cfg["upper"], cfg["method"]
    inner = build("dynamics", ic["dynamics"], {"lr": Arg(ic["lr"], ("inner.lr",)),
                                               "steps": Arg(ic["steps"], ("inner.steps",))},
                  keys=("inner.dynamics",))
    offer: dict[str, Any] = {
        "inner": inner,
        "upper": Arg(_rule(uc["optimizer"], uc["lr"], "upper.lr", uc["beta2"])),
        "init_rule": Arg(Lazy(lambda: _rule(uc["optimizer"], uc["init_lr"] or uc["lr"],
                                            "upper.init_lr" if uc["init_lr"] else "upper.lr", uc["beta2"],
                                            projection))),
        "iters": Arg(m["iters"], ("method.iters",)),
        "mu": Arg(m["mu"], ("method.mu",)),
        "s_u": Arg(m["s_u"] or None, ("method.s_u",)),
        "adaptive": Arg(bool(m["adaptive"]), ("method.adaptive",)),  # BDA: backtracked s_u (or fixed)
    }
    # method.truncate is T-RHG's truncation; BDA (which also takes truncate=) differentiates its
    # whole aggregated trajectory, as in the paper's Alg. 1 (it used to be truncated silently too)
    if find_solver(cfg["solver"]) is not BDA:
        offer["truncate"] = Arg(min(int(m["truncate"]), int(ic["steps"])), ("method.truncate",))
    if m["warm_start"] != "default":  # otherwise each method's own (paper) default
        offer["warm_start"] = Arg(m["warm_start"] == "true", ("method.warm_start",))
    return build("solver", cfg["solver"], offer, keys=("solver",))


def _fill(tree: Any, value: float) -> Any:
    if isinstance(tree, torch.Tensor):
        return torch.full_like(tree, float(value))
    return type(tree)(_fill(t, value) for t in tree)


@register
class ToyRun(Experiment):
    name = "toy"
    description = "one deterministic solver on a toy with a known solution (nonconvex / llc / quadratic)"
    reference = "Liu et al. 2021 (NeurIPS), Eq. 10 and 13, App. C.1; Liu et al. 2020 (ICML), Sec. 5.1"
    # the paper's settings of the non-convex toy (App. C.1, Table 4); see the module docstring
    defaults = {
        "seed": 0, "steps": 500, "eval_every": 1, "checkpoint_every": 0,
        "toy": "nonconvex",
        "solver": "IAPTTGM",
        "x0": 1.0,               # starting x (every entry)
        "y0": 2.0,               # starting y / initialization auxiliary z (every entry)
        "memory_every": 10,      # measure the autograd graph every N steps
        "inner": {"dynamics": "gd", "lr": 5e-4, "steps": 40},
        "upper": {"optimizer": "sgd", "lr": 0.1, "init_lr": 0.0, "beta2": 0.999},  # init_lr 0 = lr
        # warm_start: "default" = each method's own (RHG/T-RHG/BDA cold, AID/BA warm), or true/false.
        # inner_projection = false: lower iterates unconstrained (z and x still projected), as in the
        # authors' released code of the toy; the ablation rows of iaptt-toy
        # adaptive: BDA's backtracked upper step s_u (false: the paper's fixed s_u)
        "method": {"truncate": 5, "iters": 10, "mu": 0.5, "s_u": 0.0, "adaptive": True,
                   "warm_start": "default", "inner_projection": True},
    }
    choices = {
        "toy": tuple(TOYS),
        "solver": TOY_SOLVERS,
        "inner.dynamics": ("gd", "nesterov", "momentum"),
        "upper.optimizer": ("sgd", "adam", "momentum"),
        "method.warm_start": ("default", "true", "false"),
    }

    def build(self, cfg: dict[str, Any]) -> Setup:
        builder = TOYS[cfg["toy"]]
        params = inspect.signature(builder).parameters
        kw = {"dtype": run_dtype(cfg, torch.float64), "device": run_device(cfg)}
        # a builder without these options keeps its own (the runner rejects a mismatch with the config)
        toy: Toy = builder(**{k: v for k, v in kw.items() if k in params})
        x0, y0 = toy.start()
        x0, y0 = _fill(x0, cfg["x0"]), _fill(y0, cfg["y0"])
        project_inner = bool(cfg["method"]["inner_projection"])
        solver = build_toy_solver(cfg, None if project_inner else toy.y_projection)
        g_star = toy.g_star
        return Setup(
            problem=toy.problem, x0=x0, y0=y0, solver=MemoryProbe(solver.obj, cfg["memory_every"]),
            evaluate=toy.errors,
            x_projection=toy.x_projection, y_projection=toy.y_projection if project_inner else None,
            progress=("x_err", "f_err"), plot_metrics=("f_err", "x_err", "y_err", "lower_gap"),
            info={"solver": solver.describe(), "toy": toy.name, "x_star": toy.x_star, "f_star": toy.f_star},
            unused=TOY_SOLVER_KEYS - solver.used,
            lower_star=None if g_star is None else (lambda x, y: g_star(x)),
        )
