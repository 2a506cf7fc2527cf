"""Saved-tensor memory probe: peak bytes of the tensors autograd holds for the backward pass.

:func:`saved_bytes` runs a function under ``torch.autograd.graph.saved_tensors_hooks`` and counts
every saved storage once while any graph node holds it; the peak over the call is the size of the
largest set of autograd graphs alive at one time (so recomputation / checkpointing shows up), the
memory the derivative computation itself needs, independent of the allocator and of the Python
process. Forward mode and no-graph code save nothing; code under ``torch.func.grad``/``vjp``
refuses the hooks (then the result is ``None``). Used by the benchmarks
(:mod:`bilevel.bench._timing`) and by the toy experiment's per-step probe
(:class:`bilevel.experiments.toy.MemoryProbe`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["saved_bytes", "hooks_refused", "allocated_bytes"]


class _Live:
    """Reference-counted bytes of the storages currently saved for backward, and their peak."""

    def __init__(self) -> None:
        self.refs: dict[int, list[int]] = {}
        self.live = 0
        self.peak = 0

    def acquire(self, key: int, nbytes: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1

    def release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[key]
            self.live -= entry[1]


class _Packed:
    """What autograd stores instead of a saved tensor while the hooks are active."""

    __slots__ = ("t", "key", "live")

    def __init__(self, t: torch.Tensor, live: _Live):
        try:
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            key, nbytes = id(t), t.numel() * t.element_size()
        self.t, self.key, self.live = t, key, live
        live.acquire(key, nbytes)

    def __del__(self) -> None:
        self.live.release(self.key)


def hooks_refused(err: BaseException) -> bool:
    """Whether ``err`` is torch.func refusing saved-tensor hooks."""
    return isinstance(err, RuntimeError) and "saved tensor hooks" in str(err)


def saved_bytes(fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """Run ``fn`` once; return (result, peak bytes of the storages autograd holds for backward).

    ``(None, None)`` when ``fn`` uses ``torch.func`` transforms that refuse the hooks (the call is
    then incomplete: callers that must not lose the result check :func:`hooks_refused` up front or
    rerun ``fn`` without the probe).
    """
    live = _Live()
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _Packed(t, live), lambda p: p.t):
            out = fn()
    except RuntimeError as err:
        if not hooks_refused(err):
            raise
        return None, None
    return out, float(live.peak)


class _Alloc(TorchDispatchMode):
    """Counts the storages of every tensor an operator returns (once per storage, reference-counted
    over the tensors that view it, released when the last of them is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = _Live()

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # never compiled: no need to import torch._dynamo
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {k[0] for t in _tensors((args, kwargs)) if (k := _storage(t)) is not None}
        for t in _tensors(out):
            key = _storage(t)
            if key is None or (key[0] in inputs and key[0] not in self.live.refs):
                continue  # no storage, or a view of a tensor that existed before the call
            self.live.acquire(*key)
            weakref.finalize(t, self.live.release, key[0])
        return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in nested tuples / lists / dicts (operator arguments and results)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _storage(t: Any) -> tuple[int, int] | None:
    """(address, bytes) of a tensor's storage; None for non-tensors and storage-less tensors."""
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (st.data_ptr(), st.nbytes()) if st.nbytes() else None


def allocated_bytes(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` once; return (result, peak bytes of the tensors it created that were alive at the
    same time). Every operator's outputs are seen through a ``TorchDispatchMode`` (forward and
    backward passes, ``torch.func`` transforms, saved and temporary tensors alike); each storage is
    counted once while any tensor viewing it lives. Tensors that existed before the call (inputs,
    data) are not counted. Deterministic (no allocator, no process state): the same call gives the
    same bytes, so it can be compared across methods and sizes on a loaded machine."""
    mode = _Alloc()
    with mode:
        out = fn()
    return out, float(mode.live.peak)
