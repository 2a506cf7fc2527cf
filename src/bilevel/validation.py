"""All input and numerical checks live here, so every error message has one wording."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._trace import require, tracing
from ._tree import Leaves, Spec
from .errors import (
    EmptyDataError,
    NonFiniteError,
    NonScalarObjectiveError,
    StructureMismatchError,
)

_LEVEL_NAME = {"upper": "upper-level objective f", "lower": "lower-level objective g"}


def check_scalar(value: object, level: str) -> Tensor:
    """Objectives must return a real floating scalar tensor (0-dim or one element)."""
    name = _LEVEL_NAME.get(level, level)
    if not isinstance(value, Tensor):
        raise NonScalarObjectiveError(
            f"{name} returned {type(value).__name__}; it must return a scalar torch.Tensor"
        )
    if value.numel() != 1:
        raise NonScalarObjectiveError(
            f"{name} returned a tensor of shape {tuple(value.shape)}; it must return a scalar "
            "(reduce it, e.g. with .mean() or .sum())"
        )
    if not value.dtype.is_floating_point:
        raise NonScalarObjectiveError(f"{name} returned dtype {value.dtype}; expected floating point")
    return value if value.dim() == 0 else value.reshape(())  # (a reshape is a node in the graph)


def check_variables(leaves: Leaves, name: str) -> None:
    """Variables must be non-empty floating tensors on one device with one dtype."""
    if len(leaves) == 0:
        raise StructureMismatchError(f"{name} is an empty pytree; it needs at least one tensor")
    dtype, device = leaves[0].dtype, leaves[0].device
    for i, t in enumerate(leaves):
        if not t.dtype.is_floating_point:
            raise StructureMismatchError(
                f"{name} leaf {i} has dtype {t.dtype}; variables must be floating point"
            )
        if t.dtype != dtype or t.device != device:
            raise StructureMismatchError(
                f"{name} mixes dtype/device: leaf 0 is {dtype} on {device}, "
                f"leaf {i} is {t.dtype} on {t.device}"
            )


def check_compatible(x: Leaves, y: Leaves) -> None:
    """Upper and lower variables must share dtype and device."""
    if x[0].dtype != y[0].dtype or x[0].device != y[0].device:
        raise StructureMismatchError(
            f"x is {x[0].dtype} on {x[0].device} but y is {y[0].dtype} on {y[0].device}; "
            "use one dtype and device for both levels"
        )


def check_like(a: Leaves, a_spec: Spec, b: Leaves, b_spec: Spec, what: str) -> None:
    """``a`` must have the same pytree structure and leaf shapes as ``b``."""
    if a_spec != b_spec:
        raise StructureMismatchError(f"{what}: pytree structure {a_spec} differs from {b_spec}")
    for i, (u, v) in enumerate(zip(a, b)):
        if u.shape != v.shape:
            raise StructureMismatchError(
                f"{what}: leaf {i} has shape {tuple(u.shape)}, expected {tuple(v.shape)}"
            )


def check_finite(leaves: Sequence[Tensor], level: str, what: str, step: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the level and step if any entry is NaN/inf (one
    host synchronisation for all leaves; deferred in traced mode, see :mod:`bilevel._trace`)."""
    where = f" at step {step}" if step is not None else ""
    if tracing():
        if leaves:
            ok = torch.stack([torch.isfinite(t.detach()).all() for t in leaves]).all()
            require(ok, lambda: NonFiniteError(
                f"non-finite values (NaN/inf) in {what} of the {level} level{where}",
                level=level, step=step))
        return
    if not leaves or bool(torch.stack([torch.isfinite(t).all() for t in leaves]).all()):
        return
    raise NonFiniteError(
        f"non-finite values (NaN/inf) in {what} of the {level} level{where}",
        level=level,
        step=step,
    )


def check_finite_groups(
    groups: Sequence[tuple[str, str, Sequence[Tensor]]], step: int | None = None
) -> None:
    """:func:`check_finite` for several ``(level, what, leaves)`` groups with one synchronisation;
    the error names the first group that holds a NaN/inf."""
    if tracing():
        for level, what, ts in groups:
            check_finite(ts, level, what, step)
        return
    flags = [torch.isfinite(t).all() for _, _, ts in groups for t in ts]
    if not flags or bool(torch.stack(flags).all()):
        return
    for level, what, ts in groups:
        check_finite(ts, level, what, step)


def check_batch(batch: object, n: int, level: str) -> None:
    """A data batch must hold at least one sample (a mean over none is NaN, a sum is 0)."""
    if batch is not None and n == 0:
        raise EmptyDataError(
            f"the {level}-level batch has no samples (leading dimension 0); "
            f"check the {level}-level data set, its split and the batch size"
        )


def first_nonfinite(sums: Sequence[Tensor]) -> int | None:
    """Index of the first non-finite entry of a list of per-step scalar summaries (one sync)."""
    if not sums:
        return None
    flat = torch.stack([s if s.dim() == 0 and not s.requires_grad else s.detach().reshape(())
                        for s in sums])
    if float(flat.mul(0).sum()) == 0.0:  # 0·s is 0 for finite s, NaN for ±inf / NaN: one read
        return None
    return int((~torch.isfinite(flat)).nonzero()[0, 0])
