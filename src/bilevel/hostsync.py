"""Count host synchronisations: the points where Python reads a tensor's value.

On a GPU, ``float(t)``, ``bool(t)``, ``int(t)``, ``t.item()``, ``t.tolist()`` (and ``if t:``)
wait for every queued kernel; a hot loop that does it every iteration runs at the speed of the
host round trip. ``with count() as c:`` counts these conversions on *any* device (so CPU tests can
assert how many a GPU run would make); ``c.calls`` is the number, ``c.sites`` where they came
from (file:line, with ``where=True``). On CUDA, ``torch.cuda.set_sync_debug_mode("warn")``
reports the same points (and implicit syncs such as ``nonzero``) from the driver's side.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["count", "SyncCount"]

_METHODS = ("__bool__", "__float__", "__int__", "item", "tolist")


class SyncCount:
    def __init__(self) -> None:
        self.calls = 0
        self.sites: Counter[str] = Counter()


@contextmanager
def count(where: bool = False) -> Iterator[SyncCount]:
    """Count tensor -> Python conversions inside the block (not thread-safe; tests only)."""
    c = SyncCount()
    saved = {m: getattr(torch.Tensor, m) for m in _METHODS}

    def wrap(name, orig):
        def f(self, *a, **k):
            c.calls += 1
            if where:
                fr = sys._getframe(1)
                c.sites[f"{fr.f_code.co_filename}:{fr.f_lineno} {name}"] += 1
            return orig(self, *a, **k)

        return f

    for m, orig in saved.items():
        setattr(torch.Tensor, m, wrap(m, orig))
    try:
        yield c
    finally:
        for m, orig in saved.items():
            setattr(torch.Tensor, m, orig)
