"""Experiments run by ``bilevel run NAME``: registry, config handling, runner, plots.

Adding an experiment is one file in this package (it is found automatically)::

    # src/bilevel/experiments/my_toy.py
    from bilevel.experiments import Experiment, Setup, register
    from bilevel.experiments.factory import Arg, build

    @register                                   # or @register("my-toy")
    class MyToy(Experiment):
        name = "my-toy"
        description = "one line for `bilevel list`"
        reference = "Author et al. 2021, Sec. 4"
        defaults = {                           # or a file configs/my-toy.toml
            "seed": 0, "steps": 500, "eval_every": 10, "checkpoint_every": 100,
            "solver": "IAPTTGM",
            "inner": {"lr": 0.1, "steps": 20},
        }
        choices = {"solver": ("IAPTTGM", "RHG")}  # optional: allowed values of string keys

        def build(self, cfg):                  # cfg: validated nested dict
            problem = ...                      # bilevel.Problem
            inner = build("dynamics", "gd", {"lr": Arg(cfg["inner"]["lr"], ("inner.lr",)),
                                             "steps": Arg(cfg["inner"]["steps"], ("inner.steps",))})
            solver = build("solver", cfg["solver"], {"inner": inner}, keys=("solver",))
            return Setup(problem=problem, x0=..., y0=..., solver=solver.obj,
                         info={"solver": solver.describe()},            # shown in the summary
                         unused={"inner.lr", "inner.steps"} - solver.used,  # set explicitly -> error
                         lower_star=None,                                # (x, y) -> min_y g, if known
                         lower_prox=None,                 # prox of a non-smooth lower term (ISTA/FISTA)
                         evaluate=lambda x, y: {"x_err": ...},      # metrics, outside the clock
                         x_projection=None, y_projection=None,       # optional
                         lower_data=None, upper_data=None,           # samplers (bilevel.sampling)
                         baselines=None)                             # () -> dict, run once

        # optional: def summarize(self, cfg, final, extras, info) -> markdown str

A table (several sub-runs, one summary) subclasses :class:`Table` instead::

    @register
    class MyTable(Table):
        name = "my-table"
        defaults = {"seed": 0, "seeds": 3, "solvers": ["RHG", "IAPTTGM"]}
        columns = ("test_acc", "f1")           # mean ± std over seeds per label
        def runs(self, cfg):
            return [SubRun(label=s, experiment="hyperclean", seed=cfg["seed"] + k,
                           overrides={"solver": s, "steps": 100})
                    for s in cfg["solvers"] for k in range(cfg["seeds"])]
        # optional: def summarize_table(self, cfg, results) -> markdown str

Every setting is used or rejected: :func:`factory.build` passes an ``Arg`` to a constructor only
if it takes it and records the config keys that reached one (``Built.used``); the experiment puts
the rest of its solver keys in ``Setup.unused`` and the runner refuses a run that sets one of them
explicitly (``--set`` or ``--config``). The runner adds the lower-level optimality to every record
(``lower_grad_norm``; ``lower_gap`` = g − g* where ``Setup.lower_star`` gives g*) and a verdict
(solved / NOT SOLVED, tolerance ``lower_tol``) to every summary and ``result.json``.

Conventions: single runs always have the keys ``seed``, ``steps``, ``eval_every``,
``checkpoint_every``, ``threads`` and ``lower_tol`` (defaults from :data:`RUNNER_DEFAULTS`); config
values are str / int / float / bool / list, in at most one level of tables; ``0`` or ``""`` stand
for "unset" (TOML has no null). Unknown keys and wrongly typed values raise
:class:`~bilevel.errors.ConfigError` listing the valid keys. Everything stateful that is not in the
solver's ``state`` dict, its attributes, the samplers or the global RNGs must be listed in
``Setup.stateful`` for ``--resume`` to reproduce the uninterrupted run.
"""

from .base import (
    RUNNER_DEFAULTS,
    Experiment,
    Setup,
    SubResult,
    SubRun,
    Table,
    available,
    get,
    markdown_table,
    register,
)
from .runner import RunResult, load_trace, run

__all__ = [
    "Experiment",
    "Table",
    "Setup",
    "SubRun",
    "SubResult",
    "register",
    "get",
    "available",
    "run",
    "RunResult",
    "load_trace",
    "markdown_table",
    "RUNNER_DEFAULTS",
]
