"""Build estimators, dynamics and solvers from config strings: the one factory of every experiment.

* :func:`make_dynamics` — ``"gd" | "sgd" | "momentum" | "nesterov" | "fista" | "adam"``
  (:mod:`bilevel.inner`), used for the lower level and as the upper-level update rule;
* :func:`make_estimator` — any :class:`~bilevel.hypergrad.Estimator` subclass by class name
  (case-insensitive, ``-``/``_`` ignored) or alias (:data:`ESTIMATOR_ALIASES`);
* :func:`make_solver` — any :class:`~bilevel.solvers.Solver` subclass found in
  :mod:`bilevel.solvers` (its submodules are scanned, so a new solver file is picked up) or a
  method alias (:data:`SOLVER_ALIASES`: ``LS`` = AID with CG, ...).

All three are strict: a keyword the constructor does not take raises
:class:`~bilevel.errors.ConfigError` naming the parameters it does take.

Experiments that offer one superset of options to whatever class the config names use
:func:`build` with :class:`Arg` values: an ``Arg(value, keys)`` carries the config keys it
comes from, is passed when the constructor takes it, and otherwise its keys are reported as
not used. :attr:`Built.used` collects the keys that reached a constructor (nested builds
included); an experiment reports the rest of its solver-related keys as ``Setup.unused``, the
runner rejects a config key the user set explicitly that is unused, and the run summary
describes what was built (:meth:`Built.describe`)::

    inner = build("dynamics", cfg["lower"]["dynamics"], {
        "lr": Arg(lc["lr"], ("lower.lr",)), "steps": Arg(lc["steps"], ("lower.steps",)),
        "momentum": Arg(lc["momentum"], ("lower.momentum",))})       # unused for "gd"
    solver = build("solver", cfg["solver"], {"inner": Arg(inner), "lr_y": Arg(lc["lr"], ("lower.lr",))})
    setup = Setup(..., solver=solver.obj, unused=SOLVER_KEYS - solver.used,
                  info={"solver": solver.describe()})

``Arg(Lazy(fn))`` builds a nested object only when it is taken (``fn() -> Built``), so an
estimator that a stochastic solver would ignore is never constructed. ``build(..., keys=...)``
names the config keys that chose the class itself (e.g. ``("lower.dynamics",)``).

The method names and their aliases are listed once, here (:data:`ESTIMATOR_ALIASES`,
:data:`SOLVER_ALIASES`, :data:`DYNAMICS_ALIASES`); ``bilevel list`` prints them.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .. import hypergrad, inner, solvers
from ..errors import ConfigError
from ..hypergrad.base import Estimator
from ..inner import Dynamics
from ..solvers.base import Solver

__all__ = [
    "make_dynamics",
    "make_estimator",
    "make_solver",
    "build",
    "Arg",
    "Lazy",
    "Built",
    "build_estimator",
    "estimator_classes",
    "solver_classes",
    "dynamics_classes",
    "find_solver",
    "normalize_name",
    "ESTIMATOR_ALIASES",
    "DYNAMICS_ALIASES",
    "SOLVER_ALIASES",
]

#: alias -> dynamics class name (bilevel.inner)
DYNAMICS_ALIASES: dict[str, str] = {
    "gd": "GD", "sgd": "GD", "momentum": "Momentum", "heavyball": "Momentum",
    "nesterov": "Nesterov", "fista": "Nesterov", "adam": "Adam",
}

#: alias -> estimator class name (bilevel.hypergrad); the paper names of Liu et al. 2021 included
ESTIMATOR_ALIASES: dict[str, str] = {
    "rhg": "Reverse", "itd": "Reverse", "trhg": "Reverse", "reverse": "Reverse",
    "ls": "CG", "aidcg": "CG", "cg": "CG",
    "ns": "Neumann", "aidns": "Neumann", "neumann": "Neumann",
    "fp": "FixedPoint", "aidfp": "FixedPoint", "fixedpoint": "FixedPoint",
    "fo": "FirstOrder", "firstorder": "FirstOrder",
    "fd": "FiniteDifference", "finitedifference": "FiniteDifference",
    "zo": "ZerothOrder", "pzobo": "ZerothOrder", "zerothorder": "ZerothOrder",
    "fhg": "Forward", "forward": "Forward", "exact": "Exact", "ba": "Exact",
}

#: alias -> (solver class name, fixed constructor arguments); class names themselves always work
SOLVER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "hypergradient": ("HypergradientDescent", {}),
    "hg": ("HypergradientDescent", {}),
    "ls": ("AID", {"linear_solver": "cg"}),
    "aidcg": ("AID", {"linear_solver": "cg"}),
    "ns": ("AID", {"linear_solver": "neumann"}),
    "aidns": ("AID", {"linear_solver": "neumann"}),
    "fp": ("AID", {"linear_solver": "fp"}),
    "aidfp": ("AID", {"linear_solver": "fp"}),
    "itd": ("RHG", {}),
}


def normalize_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def _submodules(pkg: ModuleType) -> list[ModuleType]:
    """The package and every importable submodule (a broken one is reported, not fatal)."""
    mods = [pkg]
    if not hasattr(pkg, "__path__"):  # a plain module
        return mods
    for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        try:
            mods.append(importlib.import_module(info.name))
        except Exception as e:  # a half-written module must not break `bilevel list`
            warnings.warn(f"could not import {info.name}: {e}", stacklevel=2)
    return mods


def _subclasses(pkg: ModuleType, base: type) -> dict[str, type]:
    """Concrete subclasses of ``base`` defined in ``pkg`` or its submodules, by class name.

    A class with an empty ``reference`` that has subclasses of its own is a template (e.g.
    ``Implicit``) and is left out, as is ``base`` itself.
    """
    found: dict[str, type] = {}
    for mod in _submodules(pkg):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, base) and cls is not base and cls.__module__.startswith(pkg.__name__):
                found[cls.__name__] = cls
    templates = {
        c.__name__ for c in found.values()
        if not getattr(c, "reference", "") and any(o is not c and issubclass(o, c) for o in found.values())
    }
    return {k: v for k, v in sorted(found.items()) if k not in templates and not inspect.isabstract(v)}


def estimator_classes() -> dict[str, type[Estimator]]:
    return _subclasses(hypergrad, Estimator)


def solver_classes() -> dict[str, type[Solver]]:
    return _subclasses(solvers, Solver)


def dynamics_classes() -> dict[str, type[Dynamics]]:
    # proximal dynamics (ISTA, FISTA) need a prox callable, which a config cannot give; leaving
    # them out keeps "fista" the alias of Nesterov's FISTA schedule
    return {k: c for k, c in _subclasses(inner, Dynamics).items() if not hasattr(c, "_set_prox")}


def _accepted(cls: type) -> tuple[set[str], set[str], bool]:
    """(all parameter names, required ones, takes **kwargs) of ``cls.__init__`` along the MRO."""
    names: set[str] = set()
    required: set[str] = set()
    first = True
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            names.add(p.name)
            if first and p.default is p.empty:
                required.add(p.name)
        first = False
        if not var_kw:
            return names, required, False
    return names, required, True


# --- offers with provenance ------------------------------------------------------------------------
@dataclass
class Built:
    """An object built by :func:`build`, with the arguments it received and the config keys used.

    ``used``: the config keys whose values reached a constructor (nested builds included).
    """

    obj: Any
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    used: frozenset[str] = frozenset()

    def describe(self) -> str:
        """``SOBA(lr_x=10.0, lr_y=0.01)``: the class and the arguments it was built with."""
        parts = []
        for k, v in self.args.items():
            parts.append(f"{k}={v.describe() if isinstance(v, Built) else _short(v)}")
        return f"{self.name}({', '.join(parts)})"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if type(v).__name__ == "Schedule" and not getattr(v, "e", 1):  # a constant step size
        return f"{v.c:g}"
    return repr(v)


@dataclass(frozen=True)
class Lazy:
    """A nested object built only if the constructor takes it: ``fn() -> Built``."""

    fn: Callable[[], Built]


@dataclass(frozen=True)
class Arg:
    """An optional constructor argument offered by an experiment, and the config keys it comes from.

    ``value`` may be a :class:`Built` (its used keys carry over when it is taken) or a
    :class:`Lazy`. An ``Arg`` the class does not take is dropped (its ``keys`` are not used); a
    plain (non-``Arg``) value must be taken, else :func:`build` raises.
    """

    value: Any
    keys: tuple[str, ...] = ()


def _lookup(name: str, classes: dict[str, type], aliases: Mapping[str, Any], kind: str) -> tuple[type, dict]:
    key = normalize_name(name)
    by_norm = {normalize_name(k): v for k, v in classes.items()}
    if key in by_norm:
        return by_norm[key], {}
    if key in aliases:
        target = aliases[key]
        cname, fixed = (target, {}) if isinstance(target, str) else target
        if cname in classes:
            return classes[cname], dict(fixed)
    valid = sorted(set(classes) | {a for a, c in aliases.items()
                                    if (c if isinstance(c, str) else c[0]) in classes})
    raise ConfigError(f"unknown {kind} {name!r}; available: {', '.join(valid)}")


_KINDS = {
    "dynamics": (dynamics_classes, DYNAMICS_ALIASES),
    "estimator": (estimator_classes, ESTIMATOR_ALIASES),
    "solver": (solver_classes, SOLVER_ALIASES),
}


def _resolve_value(v: Any) -> tuple[Any, Any, frozenset[str]]:
    """(object to pass, what to describe, used keys) of an offered value."""
    if isinstance(v, Lazy):
        v = v.fn()
    if isinstance(v, Built):
        return v.obj, v, v.used
    return v, v, frozenset()


def build(kind: str, name: str, offer: Mapping[str, Any] | None = None, *,
          keys: tuple[str, ...] = ()) -> Built:
    """Build the ``kind`` (``"dynamics" | "estimator" | "solver"``) called ``name`` from ``offer``.

    ``offer`` maps constructor parameter names to plain values (must be taken) or :class:`Arg`
    (taken if the constructor has that parameter, else its config keys are unused). A solver
    alias's fixed arguments (``LS`` -> ``linear_solver="cg"``) win over offers of the same name.
    ``keys``: the config keys that chose ``name`` (counted as used).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    classes, aliases = _KINDS[kind]
    cls, fixed = _lookup(name, classes(), aliases, kind)
    names, required, _ = _accepted(cls)
    args: dict[str, Any] = {}
    shown: dict[str, Any] = {}
    used: set[str] = set(keys)
    extra = []
    for k, v in (offer or {}).items():
        optional = isinstance(v, Arg)
        arg_keys = v.keys if optional else ()
        val = v.value if optional else v
        if k in fixed or k not in names:
            if not optional and k not in fixed:
                extra.append(k)
            continue
        obj, show, u = _resolve_value(val)
        args[k], shown[k] = obj, show
        used.update(arg_keys)
        used.update(u)
    if extra:
        raise ConfigError(
            f"{kind} {cls.__name__} does not take {', '.join(sorted(extra))}; its parameters: "
            f"{', '.join(sorted(names)) or '(none)'}"
        )
    args.update(fixed)
    shown.update(fixed)
    missing = sorted(required - set(args))
    if missing:
        raise ConfigError(f"{kind} {cls.__name__} needs {', '.join(missing)}")
    try:
        obj = cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind} {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())}): {e}") \
            from e
    same = normalize_name(name) == normalize_name(cls.__name__)
    label = cls.__name__ if same else f"{cls.__name__} [{name}]"
    return Built(obj, label, shown, frozenset(used))


def make_dynamics(name: str, lr: float, steps: int = 0, **kw: Any) -> Dynamics:
    """``make_dynamics("adam", lr=0.1)`` -> :class:`bilevel.inner.Adam` (strict keywords)."""
    return build("dynamics", name, {"lr": lr, "steps": steps, **kw}).obj


def _check_trhg(name: str, truncate: Any) -> None:
    if normalize_name(name) == "trhg" and not truncate:
        raise ConfigError("estimator 'trhg' (truncated reverse) needs truncate >= 1")


def make_estimator(name: str, inner: Dynamics | None = None, **kw: Any) -> Estimator:
    """``make_estimator("cg", inner=GD(...), iters=20)``; ``"trhg"`` requires ``truncate``."""
    _check_trhg(name, kw.get("truncate"))
    return build("estimator", name, {"inner": inner, **kw}).obj


def build_estimator(name: str, offer: Mapping[str, Any], *, keys: tuple[str, ...] = ()) -> Built:
    """:func:`build` for estimators, with the ``trhg`` check (it needs ``truncate``)."""
    t = offer.get("truncate")
    _check_trhg(name, t.value if isinstance(t, Arg) else t)
    return build("estimator", name, offer, keys=keys)


def find_solver(name: str) -> type[Solver] | None:
    """The solver class called ``name`` (class name or alias, case-insensitive), or None."""
    try:
        return _lookup(name, solver_classes(), SOLVER_ALIASES, "solver")[0]
    except ConfigError:
        return None


def make_solver(name: str, **kw: Any) -> Solver:
    """``make_solver("HypergradientDescent", estimator=..., upper=...)``; see :func:`find_solver`."""
    return build("solver", name, kw).obj
