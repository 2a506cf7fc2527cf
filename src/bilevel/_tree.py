"""Pytree <-> flat tuple-of-tensors conversion and vector arithmetic on flat tuples.

Every algorithm in the package works on *flat tuples of tensors* (``Leaves``); user pytrees
(Tensor, tuple, list, dict, nested) are flattened once at the API boundary and rebuilt on the way
out. Keeping the hot loops on plain tuples keeps Python overhead to a few microseconds per op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Leaves = tuple[Tensor, ...]
Spec = Any

__all__ = [
    "Leaves",
    "Spec",
    "flatten",
    "unflatten",
    "add",
    "sub",
    "scale",
    "axpy",
    "dot",
    "norm",
    "sq_norm",
    "zeros_like",
    "detach",
    "requires_grad",
    "to_vector",
    "from_vector",
    "numel",
    "map_leaves",
    "is_leaf_spec",
    "to_vector_batched",
]


def flatten(tree: Any) -> tuple[Leaves, Spec]:
    """Flatten a pytree of tensors into ``(leaves, spec)``; non-tensor leaves are rejected."""
    leaves, spec = pytree.tree_flatten(tree)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"pytree leaf {i} is a {type(leaf).__name__}, expected a torch.Tensor "
                "(variables must be pytrees of tensors)"
            )
    return tuple(leaves), spec


def unflatten(leaves: Iterable[Tensor], spec: Spec) -> Any:
    return pytree.tree_unflatten(list(leaves), spec)


def is_leaf_spec(spec: Spec) -> bool:
    """True if ``spec`` describes a bare tensor (not a container)."""
    return spec.num_leaves == 1 and spec.is_leaf()


def map_leaves(fn: Callable[..., Tensor], *trees: Leaves) -> Leaves:
    return tuple(fn(*ts) for ts in zip(*trees))


# The leafwise helpers below run several times per oracle call: each has a fast path for the
# common single-leaf variable and builds tuples from lists (a generator costs microseconds more).


def add(a: Leaves, b: Leaves) -> Leaves:
    if len(a) == 1 == len(b):
        return (a[0] + b[0],)
    return tuple([u + v for u, v in zip(a, b)])


def sub(a: Leaves, b: Leaves) -> Leaves:
    if len(a) == 1 == len(b):
        return (a[0] - b[0],)
    return tuple([u - v for u, v in zip(a, b)])


def scale(a: Leaves, s: float | Tensor) -> Leaves:
    if len(a) == 1:
        return (a[0] * s,)
    return tuple([u * s for u in a])


def axpy(alpha: float | Tensor, x: Leaves, y: Leaves) -> Leaves:
    """``y + alpha * x`` leafwise."""
    if isinstance(alpha, Tensor):
        if len(x) == 1 == len(y):
            return (y[0] + alpha * x[0],)
        return tuple([v + alpha * u for u, v in zip(x, y)])
    if len(x) == 1 == len(y):
        return (torch.add(y[0], x[0], alpha=alpha),)
    return tuple([torch.add(v, u, alpha=alpha) for u, v in zip(x, y)])


def _flat_pair(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """u and v as 1-D tensors in one common order of their entries (their inner product does not
    depend on it), without a copy where both are laid out alike: a transposed (column-major) pair,
    e.g. a matrix gradient autograd returns as a transpose and the vectors a linear solver builds
    from it, is read in its storage order instead of being copied to row-major by ``reshape``."""
    if u.dim() > 1 and not u.is_contiguous() and u.stride() == v.stride():
        order = sorted(range(u.dim()), key=lambda i: -u.stride(i))
        up = u.permute(order)
        if up.is_contiguous():
            return up.reshape(-1), v.permute(order).reshape(-1)
    return u.reshape(-1), v.reshape(-1)


def dot(a: Leaves, b: Leaves) -> Tensor:
    """Euclidean inner product of two flat tuples (a 0-dim tensor)."""
    out = None
    for u, v in zip(a, b):
        d = torch.vdot(*_flat_pair(u, v))
        out = d if out is None else out + d
    if out is None:
        raise ValueError("dot of empty leaves")
    return out


def sq_norm(a: Leaves) -> Tensor:
    return dot(a, a)


def norm(a: Leaves) -> Tensor:
    return sq_norm(a).sqrt()


def zeros_like(a: Leaves) -> Leaves:
    return tuple([torch.zeros_like(u) for u in a])


def detach(a: Leaves) -> Leaves:
    if len(a) == 1:
        return (a[0].detach(),)
    return tuple([u.detach() for u in a])


def requires_grad(a: Leaves) -> Leaves:
    """Fresh autograd leaves with the same values (detached from any existing graph)."""
    if len(a) == 1:
        return (a[0].detach().requires_grad_(True),)
    return tuple([u.detach().requires_grad_(True) for u in a])


def numel(a: Leaves) -> int:
    return sum(u.numel() for u in a)


def to_vector(a: Leaves) -> Tensor:
    return torch.cat([u.reshape(-1) for u in a])


def from_vector(vec: Tensor, like: Leaves) -> Leaves:
    out, i = [], 0
    for u in like:
        n = u.numel()
        out.append(vec[..., i : i + n].reshape((*vec.shape[:-1], *u.shape)))
        i += n
    return tuple(out)


def to_vector_batched(a: Leaves) -> Tensor:
    """Leaves with a shared leading batch dimension B -> (B, n) matrix."""
    return torch.cat([u.reshape(u.shape[0], -1) for u in a], dim=1)
