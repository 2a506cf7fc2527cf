"""torch's own warnings that a strict filter would turn into failures of bilevel's calls.

Under ``python -W error`` (or pytest's ``filterwarnings = ["error"]``, common in research code
bases) three warnings that torch itself emits — not the user's code, not ours — become exceptions:

* the first forward-mode derivative of the process (``torch.func.jvp``: compiled or functional
  ``Forward``, ``grad_y_tangents``, J u products) loads torch's jvp decompositions with the
  deprecated ``torch.jit.script``: a ``DeprecationWarning``;
* importing inductor (the first compiled kernel of the process) imports ``torch.utils.mkldnn``,
  which uses the deprecated ``torch.jit.script_method``: a ``DeprecationWarning``;
* dynamo, tracing a compiled kernel whose input is a non-leaf tensor (the unrolled state of a
  compiled ``Reverse``, a start y0(x)), reads that tensor's ``.grad``: a ``UserWarning``. Tracing
  then fails, and the kernel would fall back to eager (itself a warning, so an error too).

:func:`forward_ad_ready` loads the decompositions once with that warning ignored; the compiled
backend imports inductor under :func:`quiet`; :func:`retry_quietly` reruns a compiled call that
failed only because one of these warnings was raised as an error, with them ignored. Every other
warning keeps the user's filters.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["NOISE", "quiet", "is_noise", "retry_quietly", "forward_ad_ready"]

R = TypeVar("R")

#: (category, message regex) of the torch-internal warnings above
NOISE: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"`torch\.jit\.script(_method)?` is deprecated"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
)

_READY = False


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The user's warning filters, with only :data:`NOISE` ignored."""
    with warnings.catch_warnings():
        for category, message in NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def is_noise(exc: BaseException) -> bool:
    """Was ``exc`` caused by one of :data:`NOISE` raised as an error (``exc`` itself, or an
    exception in its cause / context chain, as dynamo wraps it)?"""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, Warning) and any(isinstance(e, c) and re.search(m, str(e)) for c, m in NOISE):
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_quietly(fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)``; if it failed because of :data:`NOISE` raised as an error, ``fn(*args)`` again
    with that noise ignored (a failed trace leaves nothing behind; the success path costs nothing)."""
    try:
        return fn(*args)
    except Exception as exc:
        if not is_noise(exc):
            raise
    with quiet():
        return fn(*args)


def forward_ad_ready() -> None:
    """Load torch's jvp decompositions once per process with their DeprecationWarning ignored
    (call before a ``torch.func.jvp``; a no-op afterwards and while tracing)."""
    global _READY
    if _READY or torch.compiler.is_compiling():
        return
    with quiet():
        _tiny_jvp()
    _READY = True


def _tiny_jvp() -> Any:
    one = torch.ones(())
    return torch.func.jvp(torch.sin, (one,), (one,))
