"""Mixed precision: objectives under ``torch.autocast``, everything else in the variables' dtype.

:func:`autocast` wraps a problem so that f and g are evaluated under ``torch.autocast`` (bf16 by
default; fp16 on CUDA works the same way). The variables x, y stay in float32 ("master" copies):
autograd returns every gradient, Hessian- and cross-product in the dtype of the variable it is
taken with respect to, so the linear solves (CG, Neumann, fixed point), the inner and outer
updates and the data-parallel all-reduces (:mod:`bilevel.distributed`, at least float32) all
run in float32, while the matmuls inside the objectives run in bf16. The objective's value is
returned in float32.

Accuracy: the products are those of the bf16 objective (unit roundoff 2⁻⁸ ≈ 4e-3), so the
hypergradient agrees with the float32 one to a relative error of order 1e-2, while the linear
solves converge on that operator to float32 accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _tree as T
from .formulation import Problem

__all__ = ["autocast"]


def _device_type(x: Any) -> str:
    leaves, _ = T.flatten(x)
    return leaves[0].device.type if leaves else "cpu"


def _wrap(fn: Callable[..., Tensor], dtype: torch.dtype) -> Callable[..., Tensor]:
    @functools.wraps(fn)  # keeps the signature (the problem's batch-arity check reads it)
    def wrapped(x, y, *batch):
        with torch.autocast(_device_type(y), dtype=dtype):
            out = fn(x, y, *batch)
        return out.to(torch.promote_types(out.dtype, torch.float32)) if isinstance(out, Tensor) else out

    return wrapped


def autocast(problem: Problem, dtype: torch.dtype = torch.bfloat16) -> Problem:
    """The same problem with both objectives evaluated under ``torch.autocast(dtype)``."""
    if not isinstance(problem, Problem):
        raise TypeError(f"autocast expects a bilevel.Problem, got {type(problem).__name__}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return Problem(_wrap(problem.upper, dtype), _wrap(problem.lower, dtype),
                   name=f"{problem.name or 'problem'}[autocast {str(dtype).split('.')[-1]}]")
