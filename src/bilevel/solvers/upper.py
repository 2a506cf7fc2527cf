"""The upper-level step of every solver: one vocabulary for update rules and step sizes.

Every solver (deterministic and stochastic) takes ``upper=`` — how x moves given the
hypergradient estimate d_t:

* a number c (``bl.inner.GD(lr=c)``) or a :class:`~bilevel.estimates.Schedule` (or a
  ``{c, e, t0}`` dict from a config): projected SGD  x_{t+1} = P_X(x_t − c_t d_t)  with
  c_t = c / (t + t0)^e;
* an update rule of :mod:`bilevel.inner` (``bl.inner.Adam(lr=1e-3)``, ``Momentum``, ...);
* a ``torch.optim.Optimizer`` class, a factory ``params -> optimizer`` (e.g.
  ``functools.partial(torch.optim.Adam, lr=1e-2)``), a pair ``(torch.optim.Adam, {"lr": 1e-2})``
  or a :class:`TorchOptimizer` (which also takes a ``torch.optim.lr_scheduler``).

Stochastic solvers keep their published step-size names (``lr_x``, a number or Schedule) as the
default of ``upper``; deterministic ones keep ``upper_lr``. Whatever the rule, its state lives in the
solver state (``state["upper"]``; for a torch optimizer its ``state_dict`` and the scheduler's), so a
resumed run is exact.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .. import _tree as T
from ..errors import ConfigError
from ..estimates import Schedule
from ..inner import GD, Dynamics

__all__ = ["TorchOptimizer", "ScheduledSGD", "upper_rule", "step_rule", "Rule"]

Rule = Any  # an object with init(xs) -> state, update(state, grad, t) -> state, output(state) -> xs


class ScheduledSGD:
    """x_{t+1} = x_t − c_t d_t with c_t from a :class:`~bilevel.estimates.Schedule` (the
    projection is applied by the solver). State: the iterate (like :class:`bilevel.inner.GD`)."""

    slots = 1

    def __init__(self, lr: float | Schedule | dict):
        self.schedule = Schedule.of(lr)

    def init(self, xs: T.Leaves) -> T.Leaves:
        return tuple(xs)

    def output(self, state: T.Leaves) -> T.Leaves:
        return tuple(state)

    def update(self, state: T.Leaves, grad: T.Leaves, t: int) -> T.Leaves:
        return T.axpy(-self.schedule(t), grad, state)

    def __repr__(self) -> str:
        return f"SGD({self.schedule!r})"


def _is_optimizer_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)


class TorchOptimizer:
    """A ``torch.optim.Optimizer`` as the upper update rule, with its state as data.

    Args:
        optimizer: an Optimizer class or a factory ``params -> Optimizer``.
        scheduler: optional ``torch.optim.lr_scheduler`` class or factory ``optimizer -> scheduler``
            (or a pair ``(class, kwargs)``), stepped once per outer step after the optimizer.
        **kwargs: passed to ``optimizer`` (e.g. ``lr=1e-2``).

    Each outer step builds the optimizer on fresh parameter tensors holding x, loads the saved
    ``state_dict`` (deep-copied: saved states are never written into), sets ``.grad`` to the
    hypergradient, calls ``step()`` and stores the new ``state_dict`` back in the solver state.
    """

    def __init__(self, optimizer: Any, scheduler: Any = None, **kwargs: Any):
        if _is_optimizer_class(optimizer):
            factory = functools.partial(optimizer, **kwargs)
        elif inspect.isclass(optimizer):
            raise ConfigError(
                f"upper=: {optimizer.__qualname__} is not a torch.optim.Optimizer subclass"
                + (" (a bl.inner rule class: pass an instance, e.g. bl.inner.Adam(lr=1e-3))"
                   if issubclass(optimizer, Dynamics) else "")
            )
        elif callable(optimizer):
            factory = functools.partial(optimizer, **kwargs) if kwargs else optimizer
        else:
            raise ConfigError(f"upper=: expected an optimizer class or factory, got "
                              f"{type(optimizer).__name__}")
        self.factory = factory
        self.name = getattr(getattr(factory, "func", factory), "__name__", type(factory).__name__)
        probe = factory([torch.zeros(1, requires_grad=True)])
        if not isinstance(probe, torch.optim.Optimizer):
            raise ConfigError(f"upper=: the factory {self.name} returned {type(probe).__name__}, "
                              "not a torch.optim.Optimizer")
        self.scheduler = _scheduler_factory(scheduler)
        if self.scheduler is not None:
            self.scheduler(probe)  # fails now, not at the first step, on a bad scheduler

    def _build(self, xs: T.Leaves, meta: dict[str, Any] | None):
        params = [t.detach().clone().requires_grad_(True) for t in xs]
        opt = self.factory(params)
        sched = self.scheduler(opt) if self.scheduler is not None else None
        if meta is not None:
            opt.load_state_dict(copy.deepcopy(meta["optimizer"]))
            if sched is not None:
                sched.load_state_dict(copy.deepcopy(meta["scheduler"]))
        return params, opt, sched

    @staticmethod
    def _meta(opt, sched) -> dict[str, Any]:
        return {"optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None}

    def init(self, xs: T.Leaves) -> T.Leaves:
        """State: the x leaves followed by one dict ``{"optimizer": ..., "scheduler": ...}``."""
        params, opt, sched = self._build(xs, None)
        return tuple(xs) + (self._meta(opt, sched),)

    def output(self, state: T.Leaves) -> T.Leaves:
        return tuple(state[:-1])

    def update(self, state: T.Leaves, grad: T.Leaves, t: int) -> T.Leaves:
        xs, meta = tuple(state[:-1]), state[-1]
        params, opt, sched = self._build(xs, meta)
        for p, g in zip(params, grad):
            p.grad = g.detach().clone()
        with torch.no_grad():
            opt.step()
        if sched is not None:
            sched.step()
        return tuple(p.detach() for p in params) + (self._meta(opt, sched),)

    def __repr__(self) -> str:
        return f"TorchOptimizer({self.name})"


def _scheduler_factory(spec: Any) -> Callable[[Any], Any] | None:
    if spec is None:
        return None
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        cls, kw = spec
        return functools.partial(cls, **kw)
    if callable(spec):
        return spec
    raise ConfigError(f"scheduler=: expected an lr_scheduler class/factory or (class, kwargs), got "
                      f"{type(spec).__name__}")


def upper_rule(spec: Any, name: str = "upper") -> Rule:
    """The update rule described by ``spec`` (see the module docstring); ``name`` is the argument
    named in errors."""
    if isinstance(spec, bool):
        raise ConfigError(f"{name}= must be a step size, a Schedule, an update rule or a torch "
                          f"optimizer, got {spec!r}")
    if isinstance(spec, (int, float)):
        if not spec > 0:
            raise ConfigError(f"{name}= step size must be positive, got {spec}")
        return GD(lr=float(spec))
    if isinstance(spec, (Schedule, dict)):
        return ScheduledSGD(spec)
    if isinstance(spec, (Dynamics, ScheduledSGD, TorchOptimizer)):
        return spec
    if isinstance(spec, tuple) and len(spec) in (2, 3) and isinstance(spec[1], dict):
        try:
            return TorchOptimizer(spec[0], spec[2] if len(spec) == 3 else None, **spec[1])
        except ConfigError as e:
            raise ConfigError(str(e).replace("upper=", f"{name}=")) from None
    if inspect.isclass(spec) or callable(spec):
        if inspect.isclass(spec) and not _is_optimizer_class(spec):
            hint = (" (a bl.inner rule class: pass an instance, e.g. bl.inner.Adam(lr=1e-3))"
                    if issubclass(spec, Dynamics) else "")
            raise ConfigError(
                f"{name}=: {spec.__qualname__} is neither a bl.inner update rule nor a "
                f"torch.optim.Optimizer subclass{hint}"
            )
        try:
            return TorchOptimizer(spec)
        except ConfigError as e:
            raise ConfigError(str(e).replace("upper=", f"{name}=")) from None
        except TypeError as e:
            raise ConfigError(f"{name}=: {spec!r} is not an optimizer factory ({e})") from None
    raise ConfigError(
        f"{name}= must be a step size, a Schedule, a bl.inner update rule, a torch.optim.Optimizer "
        f"class/factory or (class, kwargs); got {type(spec).__name__}"
    )


def step_rule(solver: Any, lr_x: Any, upper: Any) -> Rule:
    """The x rule of a solver whose published step size is ``lr_x``: ``upper`` if given, else SGD
    with the schedule ``lr_x``. Both at once is ambiguous (one would be silently ignored) unless
    ``lr_x`` is left at the solver's default."""
    if upper is None:
        return upper_rule(Schedule.of(lr_x), "lr_x")
    default = inspect.signature(type(solver).__init__).parameters["lr_x"].default
    if not (lr_x is default or (isinstance(lr_x, (int, float)) and lr_x == default)):
        raise ConfigError(f"{type(solver).__name__}: pass either lr_x= (SGD step sizes) or upper= "
                          "(any update rule), not both")
    return upper_rule(upper)
