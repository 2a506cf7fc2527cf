"""Compiled mode: every oracle as a cached ``torch.compile``-d kernel of its ``torch.func`` form.

``bl.solve(..., compile="oracles")``, ``bl.compile(est)`` and ``with bl.oracles.backend("compiled"):``
all switch the oracle layer (:mod:`bilevel.oracles`) to compiled kernels, so every solver and
estimator gets them without a line of its own changed:

* one kernel per (oracle kind, problem, level, pytree structure) — ``grad_y``, ``grads``, the
  vjp-based ``hvp`` / ``cross`` / ``both`` (H v and J^T v from one vjp of ∇_y g), ... — compiled
  with ``fullgraph=True``; the data batch is an *argument*, so new batches of the same shapes reuse
  the kernel (no recompile); the oracles that build a graph (``grad_y(..., create_graph=True)``,
  reverse-mode unrolling) are compiled with their backward, and eager autograd chains them;
* a recompile counter (:func:`stats`): ``compiles`` counts graphs handed to the compiler backend;
* a clear fallback: if ``torch.compile`` cannot capture a user objective (data-dependent Python
  control flow, ``.item()``, unsupported calls ...) the kernel runs eagerly in its ``torch.func``
  form, and a :class:`CompileFallbackWarning` says which objective and why (once per kernel).
  Errors the objective raises in eager mode too (e.g. a non-scalar output) propagate unchanged.

The per-iteration arithmetic of the algorithms (axpy's, schedules) stays eager; only the
differentiation work is compiled. Objectives that are not a :class:`bilevel.formulation.Objective`
(have no stable identity to cache a kernel on) run in their eager ``torch.func`` form.
"""

from __future__ import annotations

import builtins
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import oracles as O
from .formulation import Objective

__all__ = ["compile", "Compiled", "CompileFallbackWarning", "settings", "stats", "reset"]


class CompileFallbackWarning(UserWarning):
    """A kernel could not be compiled and runs eagerly (the message gives the reason)."""


#: ``backend``: the ``torch.compile`` backend ("inductor", or "aot_eager" to check capture
#: without code generation); ``mode``: its mode (None, "reduce-overhead", "max-autotune", ...).
settings: dict[str, Any] = {"backend": "inductor", "mode": None}

_STATS = {"compiles": 0, "kernels": 0, "fallbacks": 0, "compiled_steps": 0, "eager_steps": 0}
_FALLBACK_REASONS: list[str] = []

#: problem -> {(kind, level, xspec, yspec, backend, mode): kernel}
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_IMPL: dict[str, Callable[..., Any]] = {
    "value": lambda fn, xs, ys: fn(xs, ys).detach(),
    "grad_y": lambda fn, xs, ys: O.f_grad_y(fn, _d(xs), _d(ys)),
    "grad_y_graph": O.f_grad_y,
    "grad_x": lambda fn, xs, ys: O.f_grad_x(fn, _d(xs), _d(ys)),
    "grads": lambda fn, xs, ys: O.f_grads(fn, _d(xs), _d(ys)),
    "value_grad_y": lambda fn, xs, ys: O.f_value_grad_y(fn, _d(xs), _d(ys)),
    "hvp": lambda fn, xs, ys, v: O.f_hvp(fn, _d(xs), _d(ys), tuple(v)),
    "cross": lambda fn, xs, ys, v: O.f_cross(fn, _d(xs), _d(ys), tuple(v)),
    "both": lambda fn, xs, ys, v: O.f_both(fn, _d(xs), _d(ys), tuple(v)),
    "value_grad_y_both": lambda fn, xs, ys, v: O.f_value_grad_y_both(fn, _d(xs), _d(ys), tuple(v)),
}


def _d(ts):
    return tuple(t.detach() for t in ts)


def stats() -> dict[str, Any]:
    """``compiles`` (graphs compiled so far: a count that grows in a steady loop means
    recompiles), ``kernels`` (kernels created), ``fallbacks`` and their ``reasons``; whole-step
    mode (:mod:`bilevel.compiled_step`): ``compiled_steps`` and ``eager_steps`` (the first step
    of each pattern)."""
    return {**_STATS, "reasons": list(_FALLBACK_REASONS)}


def reset() -> None:
    """Forget every cached kernel and zero the counters (the next calls compile again)."""
    from .compiled_step import _CODE

    _CACHE.clear()
    _CODE.clear()
    for k in _STATS:
        _STATS[k] = 0
    _FALLBACK_REASONS.clear()


def _counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    _STATS["compiles"] += 1
    name, mode = settings["backend"], settings["mode"]
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        if mode is None:
            return compile_fx(gm, example_inputs)
        from torch._inductor import list_mode_options

        return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode))
    from torch._dynamo import lookup_backend

    return lookup_backend(name)(gm, example_inputs)


class _Kernel:
    """One compiled oracle for one objective family; falls back to eager with a warning."""

    def __init__(self, kind: str, obj: Objective):
        self.kind, self.level = kind, obj.level
        problem, xspec, yspec = obj.problem, obj.xspec, obj.yspec
        impl = _IMPL[kind]

        def make(batch: Any) -> Objective:
            return Objective(problem, obj.level, batch, xspec, yspec)

        # a fresh code object per kernel, so that torch.compile's per-code cache (and its
        # recompile limit) is per kernel, not shared by every problem of the process
        src = "def kernel(xs, ys, batch, *extra):\n    return impl(make(batch), xs, ys, *extra)\n"
        ns: dict[str, Any] = {"impl": impl, "make": make}
        exec(builtins.compile(src, f"<bilevel {kind} kernel: {problem!r} {obj.level}>", "exec"), ns)
        self._eager = ns["kernel"]
        self._compiled = torch.compile(ns["kernel"], fullgraph=True, dynamic=False,
                                       backend=_counting_backend)
        self.fallback: str | None = None
        _STATS["kernels"] += 1

    def __call__(self, batch: Any, xs, ys, *extra):
        if self.fallback is not None:
            return self._eager(xs, ys, batch, *extra)
        try:
            return self._compiled(tuple(xs), tuple(ys), batch, *extra)
        except Exception as exc:  # capture failed, or the objective is wrong: tell them apart
            out = self._eager(xs, ys, batch, *extra)  # re-raises the user's own errors
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            self.fallback = reason
            _STATS["fallbacks"] += 1
            msg = (f"bilevel compiled mode: the {self.level}-level objective could not be captured "
                   f"by torch.compile for the {self.kind} oracle; running it eagerly instead "
                   f"(reason: {reason})")
            _FALLBACK_REASONS.append(msg)
            warnings.warn(msg, CompileFallbackWarning, stacklevel=3)
            return out


class _Uncompiled:
    """Kernel stand-in for objectives that are plain callables (no identity to cache on)."""

    def __init__(self, kind: str, fn: O.Fn):
        self.impl, self.fn = _IMPL[kind], fn

    def __call__(self, xs, ys, *extra):
        return self.impl(self.fn, tuple(xs), tuple(ys), *extra)


def oracle_kernel(kind: str, fn: O.Fn) -> Callable[..., Any]:
    """The compiled ``kind`` oracle of ``fn`` as a callable ``(xs, ys[, v])`` (cached)."""
    if not isinstance(fn, Objective) or fn.buffers is not None:  # carried buffers: eager
        return _Uncompiled(kind, fn)
    per_problem = _CACHE.setdefault(fn.problem, {})
    key = (kind, fn.level, fn.xspec, fn.yspec, settings["backend"], settings["mode"])
    k = per_problem.get(key)
    if k is None:
        k = per_problem[key] = _Kernel(kind, fn)
    batch = fn.batch
    return lambda xs, ys, *extra: k(batch, xs, ys, *extra)


class Compiled:
    """``bl.compile(est)``: the estimator ``est`` with its oracles compiled (same call, same
    result to floating-point rounding). Attribute access is forwarded to ``est``."""

    def __init__(self, est: Any):
        if isinstance(est, Compiled):
            est = est.estimator
        if not callable(est):
            raise TypeError(f"bl.compile expects an estimator, got {type(est).__name__}")
        self.estimator = est

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with O.backend("compiled"):
            return self.estimator(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "estimator":
            raise AttributeError(name)
        return getattr(self.estimator, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # e.g. a solver attaching the problem's projection to ``inner`` of its copy
        if name == "estimator":
            object.__setattr__(self, name, value)
        else:
            setattr(self.estimator, name, value)

    def __copy__(self) -> Compiled:
        import copy

        return Compiled(copy.copy(self.estimator))

    def __repr__(self) -> str:
        return f"compile({self.estimator!r})"


def compile(est: Any) -> Compiled:  # noqa: A001 - the public name is bl.compile
    """Wrap a hypergradient estimator so that every oracle it calls runs compiled
    (``torch.compile`` of the ``torch.func`` oracles; see :mod:`bilevel.compiled`)."""
    return Compiled(est)
