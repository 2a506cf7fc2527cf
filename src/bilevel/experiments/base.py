"""Experiment definitions and the registry.

An experiment is a class registered with :func:`register`. Two kinds:

* :class:`Experiment` (single run): :meth:`Experiment.build` turns a resolved config into a
  :class:`Setup` (problem, start point, solver, samplers, an ``evaluate`` function and optional
  baselines); the runner owns the loop, the trace, checkpoints, plots and the summary.
* :class:`Table`: :meth:`Table.runs` lists sub-runs (any registered single experiment with
  config overrides and a seed); the runner executes each in its own folder and
  :meth:`Table.summarize` turns their final records into one markdown table.

Modules of :mod:`bilevel.experiments` are imported on first use of the registry, so an
experiment module only has to exist to be found.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import statistics
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..formulation import Problem
from ..sampling import Sampler
from ..solvers.base import Solver
from . import config as C

__all__ = [
    "Experiment",
    "Table",
    "Setup",
    "SubRun",
    "SubResult",
    "register",
    "get",
    "available",
    "RUNNER_DEFAULTS",
    "DTYPES",
    "run_device",
    "run_dtype",
    "markdown_table",
    "fmt",
    "lower_cell",
]

#: keys every single-run experiment has (its defaults may change the values). ``threads``: torch
#: intra-op threads during the run (0 = torch's default); 1 is fastest for the small matrix
#: products of these experiments and does not collapse on a busy machine the way 2+ do.
#: ``lower_tol`` (1e-2): the final lower level counts as solved when g − g* ≤ lower_tol·max(1, |g*|)
#: (g* known) or ‖∇_y g‖ ≤ lower_tol·max(1, ‖∇_y g‖ at step 0); the summary flags it otherwise.
#: ``device`` / ``dtype``: where and in which precision the data and variables live ("" = the
#: experiment's own default dtype); an experiment reads them with :func:`run_device` /
#: :func:`run_dtype`, and the runner rejects a run whose variables do not follow them.
#: ``loggers``: comma-separated extra loggers beside trace.jsonl (``csv``, ``tensorboard``).
RUNNER_DEFAULTS: dict[str, Any] = {"seed": 0, "steps": 100, "eval_every": 10, "checkpoint_every": 50,
                                   "threads": 1, "lower_tol": 1e-2, "device": "cpu", "dtype": "",
                                   "loggers": "", "compile": ""}

#: ``compile`` values -> ``bl.solve(..., compile=...)``
COMPILE_MODES: dict[str, Any] = {"": False, "off": False, "step": "step", "oracles": "oracles"}


def run_compile(cfg: dict[str, Any]) -> Any:
    """The ``compile`` of a config, checked: ``""`` / ``off`` (eager), ``step`` (each outer step one
    compiled graph), ``oracles`` (per-oracle kernels)."""
    name = str(cfg.get("compile", "") or "")
    if name not in COMPILE_MODES:
        raise ConfigError(f"compile: {name!r} is not one of {', '.join(repr(k) for k in COMPILE_MODES)}")
    return COMPILE_MODES[name]

#: accepted ``dtype`` values
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                  "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_device(cfg: dict[str, Any]) -> torch.device:
    """The ``device`` of a config, checked: ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""
    name = str(cfg.get("device", "cpu") or "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device: {name!r} is not a torch device (use cpu, cuda, cuda:N or mps)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name}: CUDA is not available here (torch.cuda.is_available() is "
                              f"False; torch {torch.__version__}); use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device={name}: MPS is not available here; use device=cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"device={name}: unsupported device type {dev.type!r} (cpu, cuda, mps)")
    return dev


def run_dtype(cfg: dict[str, Any], default: torch.dtype) -> torch.dtype:
    """The ``dtype`` of a config (``""`` = ``default``, the experiment's own precision)."""
    name = str(cfg.get("dtype", "") or "")
    if not name:
        return default
    if name not in DTYPES:
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Setup:
    """Everything the runner needs for one run (built by :meth:`Experiment.build`).

    ``evaluate(x, y) -> {metric: float}`` runs outside the clock after every ``eval_every`` steps
    (the runner adds ``upper_loss`` and ``lower_loss`` on the full data itself).
    ``baselines() -> {name: float}`` runs once at the start of a fresh run; its result is stored
    in ``extras.json`` and passed to :meth:`Experiment.summarize`.
    ``stateful`` lists extra objects with ``state_dict``/``load_state_dict`` to checkpoint.
    ``info["solver"]``: a description of the solver that runs (:meth:`factory.Built.describe`),
    shown in the summary and ``result.json``.
    """

    problem: Problem
    x0: Any
    y0: Any
    solver: Solver
    evaluate: Callable[[Any, Any], dict[str, float]] | None = None
    lower_data: Sampler | None = None
    upper_data: Sampler | None = None
    x_projection: Callable | None = None
    y_projection: Callable | None = None
    baselines: Callable[[], dict[str, Any]] | None = None
    progress: Sequence[str] = ()
    plot_metrics: Sequence[str] | None = None
    #: horizontal reference lines: {metric: {legend label: key of the baselines dict}}
    plot_refs: dict[str, dict[str, str]] = field(default_factory=dict)
    stateful: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    #: config keys this configuration does not read (e.g. ``hypergrad.iters`` with a stochastic
    #: solver): the runner rejects them when set explicitly and lists them in the summary
    unused: Collection[str] = ()
    #: ``lower_star(x, y) -> g*(x)``, the best known lower value (closed form, or a solve started
    #: from y); the runner records ``lower_gap`` = g(x, y) − g*(x) and flags an unsolved lower level
    lower_star: Callable[[Any, Any], float] | None = None
    #: compute ``lower_star`` only at the final evaluation (expensive solves)
    lower_star_final_only: bool = False
    #: the prox of the lower level's non-smooth part h at step 1 (proximal inner dynamics: the
    #: problem's g is the smooth part); ``lower_grad_norm`` is then ‖y − prox_h(y − ∇_y g)‖, zero
    #: exactly at a minimiser of g + h
    lower_prox: Callable[[Any], Any] | None = None
    #: a lower level that is *not* an argmin by design (e.g. "T training steps": the upper objective
    #: is the loss of the T-th iterate): the runner still records ``lower_grad_norm`` but gives no
    #: solved / NOT SOLVED verdict; the summary states this reason instead
    lower_by_design: str = ""


class Experiment:
    """A single-run experiment. Subclass, set the class attributes, implement :meth:`build`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    kind: ClassVar[str] = "single"
    #: default config as a dict; if None, ``configs/<name>.toml`` is read
    defaults: ClassVar[dict[str, Any] | None] = None
    #: allowed values of string keys, e.g. ``{"model.kind": ("linear", "mlp")}``
    choices: ClassVar[dict[str, Sequence[Any]]] = {}

    def default_config(self) -> dict[str, Any]:
        if self.defaults is not None:
            base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.defaults.items()}
        else:
            path = resources.files("bilevel.experiments") / "configs" / f"{self.name}.toml"
            if not path.is_file():
                raise ConfigError(f"experiment {self.name!r} has no defaults and no configs/{self.name}.toml")
            base = C.loads(path.read_text(encoding="utf-8"), str(path))
        if self.kind == "single":
            return {**RUNNER_DEFAULTS, **base}
        return {"seed": 0, **base}

    def resolve(self, file: dict | None = None, overrides: dict | None = None) -> dict[str, Any]:
        cfg = C.resolve(self.default_config(), file=file, overrides=overrides, choices=self.choices)
        for k, lo in (("steps", 0), ("eval_every", 1), ("checkpoint_every", 0), ("threads", 0)):
            if k in cfg and cfg[k] < lo:
                raise ConfigError(f"{k} must be >= {lo}, got {cfg[k]}")
        if "device" in cfg:
            run_device(cfg)
        if "dtype" in cfg:
            run_dtype(cfg, torch.float32)
        return cfg

    def build(self, cfg: dict[str, Any]) -> Setup:
        raise NotImplementedError

    def summarize(self, cfg: dict[str, Any], final: dict[str, Any], extras: dict[str, Any],
                  info: dict[str, Any]) -> str:
        """Markdown summary of a finished run (default: the final record as a table)."""
        rows = [[k, fmt(v)] for k, v in final.items()]
        rows += [[f"baseline: {k}", fmt(v)] for k, v in extras.items()]
        rows += [[k, fmt(v)] for k, v in info.items() if k not in ("lower", "unused_keys")]
        return markdown_table(["quantity", "value"], rows)


@dataclass
class SubRun:
    """One run of a :class:`Table`: ``experiment`` with dotted-key ``overrides`` and ``seed``."""

    label: str
    experiment: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def folder(self) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.label)
        return f"{safe}-seed{self.seed}"


@dataclass
class SubResult:
    run: SubRun
    path: Any
    final: dict[str, Any]
    extras: dict[str, Any]
    info: dict[str, Any]


class Table(Experiment):
    """Several sub-runs summarized in one table (e.g. methods x seeds)."""

    kind: ClassVar[str] = "table"
    #: metrics of the sub-runs' final records reported as mean ± std over seeds
    columns: ClassVar[Sequence[str]] = ()

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        raise NotImplementedError

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        """Default: one row per label, mean ± std over its seeds of :attr:`columns` and time."""
        groups: dict[str, list[SubResult]] = {}
        for r in results:
            groups.setdefault(r.run.label, []).append(r)
        cols = list(self.columns) + ["time"]
        rows = []
        for label, rs in groups.items():
            row = [label, str(len(rs))]
            for c in cols:
                vals = [float(r.final[c]) for r in rs if isinstance(r.final.get(c), (int, float))]
                row.append(mean_std(vals))
            rows.append(row)
        return markdown_table(["run", "seeds", *cols], rows)


def mean_std(vals: Sequence[float]) -> str:
    if not vals:
        return "—"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return fmt(m)
    return f"{fmt(m)} ± {fmt(statistics.stdev(vals))}"


def lower_cell(r: SubResult) -> str:
    """A sub-run's lower-level verdict as a table cell: "yes", "NO", or "—" where none was given
    (a lower level that is not an argmin by design, ``Setup.lower_by_design``)."""
    solved = r.info.get("lower", {}).get("solved")
    return "—" if solved is None else ("yes" if solved else "NO")


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])]) + "\n"


# --- registry -----------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Experiment]] = {}
_BROKEN: dict[str, str] = {}
_INFRA = {"base", "config", "factory", "runner", "plots", "trace", "checkpoint"}
_discovered = False


def register(arg: Any = None) -> Any:
    """Class decorator: ``@register`` (uses the class's ``name``) or ``@register("name")``."""

    def deco(cls: type[Experiment], name: str | None = None) -> type[Experiment]:
        key = name or cls.name
        if not key:
            raise ValueError(f"{cls.__name__}: set the class attribute `name` or use @register('name')")
        if not issubclass(cls, Experiment):
            raise TypeError(f"{cls.__name__} must subclass bilevel.experiments.Experiment")
        if key in _REGISTRY and _REGISTRY[key].__qualname__ != cls.__qualname__:
            raise ValueError(f"experiment {key!r} is registered twice ({_REGISTRY[key].__qualname__}, "
                             f"{cls.__qualname__})")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    if isinstance(arg, str):
        return lambda cls: deco(cls, arg)
    if arg is None:
        return deco
    return deco(arg)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import bilevel.experiments as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in _INFRA:
            continue
        try:
            importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:  # keep the others usable; `get` reports the failure for this one
            _BROKEN[info.name] = traceback.format_exc(limit=3)


def available() -> dict[str, type[Experiment]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> Experiment:
    """A fresh instance of the experiment registered as ``name``."""
    _discover()
    if name in _REGISTRY:
        return _REGISTRY[name]()
    broken = {k: v for k, v in _BROKEN.items() if k.replace("_", "-") == name.replace("_", "-")}
    if broken:
        raise ConfigError(f"experiment module for {name!r} failed to import:\n{next(iter(broken.values()))}")
    raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(sorted(_REGISTRY)) or '(none)'}")


def broken_modules() -> dict[str, str]:
    _discover()
    return dict(_BROKEN)
