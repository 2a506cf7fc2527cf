"""Loops that a compiled graph keeps as one loop: :func:`fori_loop` over ``torch``'s ``while_loop``
(JAX's ``lax.fori_loop``), and :func:`row` to read the k-th of stacked batches inside its body.
Used by the whole-step compiled mode with ``settings["loops"] = "while_loop"``
(:mod:`bilevel.compiled_step`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["fori_loop", "row"]


def fori_loop(n: int, body: Callable[[Tensor, Any], Any], init: Any) -> Any:
    """``carry = init; for k in range(n): carry = body(k, carry)`` as one ``while_loop``; ``k`` is a
    0-dim int64 tensor, ``carry`` a pytree of tensors whose shapes and dtypes ``body`` keeps."""
    from torch._higher_order_ops.while_loop import while_loop

    leaves, spec = pytree.tree_flatten(init)
    # (while_loop refuses a carry that holds one tensor twice: e.g. an iterate and its best copy)
    leaves = [t.clone() if any(t is u for u in leaves[:i]) else t for i, t in enumerate(leaves)]

    def cond(k: Tensor, *carry: Tensor) -> Tensor:
        return k < n

    def step(k: Tensor, *carry: Tensor) -> tuple[Tensor, ...]:
        out = body(k, pytree.tree_unflatten(list(carry), spec))
        return (k + 1, *pytree.tree_flatten(out)[0])

    start = (torch.zeros((), dtype=torch.int64, device=leaves[0].device), *leaves)
    return pytree.tree_unflatten(list(while_loop(cond, step, start)[1:]), spec)


def row(stacked: Any, k: Tensor) -> Any:
    """Entry ``k`` (a 0-dim integer tensor) of every leaf of ``stacked`` along its first axis."""
    at = k.reshape(1)
    return pytree.tree_map(lambda s: s.index_select(0, at)[0], stacked)
