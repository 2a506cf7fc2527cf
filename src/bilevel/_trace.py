"""Traced mode: estimators running inside ``torch.func`` transforms (``vmap`` over tasks).

Under ``torch.func.vmap`` a tensor has one value per task, so Python cannot branch on it, read it
with ``float()`` / ``bool()``, or raise because of it. Inside :func:`traced`:

* :mod:`bilevel.oracles` differentiates with ``torch.func`` (``grad``, ``vjp``, ``jvp``) instead of
  ``torch.autograd.grad`` (which cannot run on batched tensors);
* the iterative solvers of :mod:`bilevel.linalg` run their full iteration budget with masks (an
  entry that has converged or broken down is frozen) instead of stopping early;
* checks that would read a value (:func:`require`: non-finite values, ``strict=True`` breakdowns)
  are *deferred*: their flags are collected and evaluated after the transform, when the caller
  (:func:`bilevel.hypergrad.vmap`) can say which task failed;
* diagnostics that are numbers in eager mode stay tensors (:func:`scalar`).

Outside :func:`traced` every function here behaves exactly as the eager code always did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["tracing", "graph_path", "traced", "require", "scalar", "Check", "split_tensors", "fill_tensors"]


@dataclass
class Check:
    """A deferred check: ``ok`` (a bool tensor, one value per task under vmap) and the error.
    ``redo``: a failure means the values left the path the graph took (not an error of the run):
    a compiled step that fails only such checks is run again eagerly (:mod:`bilevel.compiled_step`);
    elsewhere the error is raised."""

    ok: Tensor
    error: Callable[[], BaseException]
    redo: bool = False


_CHECKS: ContextVar[list[Check] | None] = ContextVar("bilevel_traced_checks", default=None)


#: the deferred checks of a whole solver step while ``torch.compile`` traces it (a plain list:
#: ``ContextVar.get`` cannot be traced); :mod:`bilevel.compiled_step` clears and reads it
COMPILE_CHECKS: list[Check] = []


#: nested :func:`traced` blocks while torch.compile traces (their lists; innermost last)
_COMPILE_NESTED: list[list[Check]] = []


def _checks() -> list[Check] | None:
    if torch.compiler.is_compiling():
        return _COMPILE_NESTED[-1] if _COMPILE_NESTED else COMPILE_CHECKS
    return _CHECKS.get()


#: non-empty while :mod:`bilevel.compiled_step` runs the eager step that records a pattern
PROBING: list[bool] = []


def graph_path() -> bool:
    """Take the path a compiled step's graph takes — while torch.compile traces a whole step, and in
    the eager step that records its pattern (whose batch draws and oracle counts every compiled
    step of the pattern repeats) — where a step's path would depend on values (IAPTT-GM's
    truncation)."""
    return bool(PROBING) or tracing()


def tracing() -> bool:
    """True inside :func:`traced` (torch.func oracles, masked solvers, deferred checks) and while
    ``torch.compile`` traces a whole solver step."""
    return _checks() is not None


@contextmanager
def traced() -> Iterator[list[Check]]:
    """Run the block in traced mode; yields the list that collects the deferred checks."""
    checks: list[Check] = []
    if torch.compiler.is_compiling():
        _COMPILE_NESTED.append(checks)
        try:
            yield checks
        finally:
            _COMPILE_NESTED.pop()
        return
    token = _CHECKS.set(checks)
    try:
        yield checks
    finally:
        _CHECKS.reset(token)


def require(ok: Tensor | bool, error: Callable[[], BaseException], redo: bool = False) -> None:
    """Raise ``error()`` unless ``ok``; in traced mode record the check for later instead
    (``redo``: see :class:`Check`)."""
    checks = _checks()
    if checks is None:
        if not bool(ok):
            raise error()
        return
    checks.append(Check(torch.as_tensor(ok).detach().reshape(()), error, redo))


def scalar(t: Tensor) -> float | Tensor:
    """A 0-dim diagnostic: a Python float in eager mode, the (detached) tensor in traced mode."""
    return t.detach() if tracing() else float(t)


class _Slot:
    """Marks where a tensor was in a split pytree."""

    def __repr__(self) -> str:
        return "<tensor>"


SLOT = _Slot()


def split_tensors(tree: Any) -> tuple[list[Tensor], list[Any], Any]:
    """(tensor leaves, leaves with every tensor replaced by :data:`SLOT`, spec): what a
    ``torch.func`` transform may return (tensors) and what must travel beside it (numbers,
    strings, None — e.g. an ``info`` dict)."""
    leaves, spec = pytree.tree_flatten(tree)
    return ([t for t in leaves if isinstance(t, Tensor)],
            [SLOT if isinstance(t, Tensor) else t for t in leaves], spec)


def fill_tensors(tensors: list[Tensor], marks: list[Any], spec: Any) -> Any:
    """Inverse of :func:`split_tensors`."""
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if m is SLOT else m for m in marks], spec)
