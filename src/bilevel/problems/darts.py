"""A DARTS-style architecture-search toy where one candidate operation is clearly right.

Liu, Simonyan & Yang 2019, "DARTS: differentiable architecture search" (ICLR), Eq. 1–2 (continuous
relaxation of the choice among operations) and Eq. 3–4 (the bilevel problem). Survey 2207.11719,
Table 3 (architecture as the upper variable).

A one-hidden-layer network u ↦ vᵀ m(W u) whose activation is the *mixed operation*

    m(h) = Σ_k softmax(x)_k · o_k(h),      o_k ∈ {identity, relu, tanh, sin, square, ...},

with the architecture weights x (one per operation) as the upper variable and the network weights
y = (W, v) as the lower one:

    min_x f(x, y*(x)) = validation MSE,    y*(x) = argmin_y g(x, y) = training MSE + (λ/2)‖y‖².

The targets come from a teacher t = v*ᵀ o*(W* u) + noise with one operation o* (default
``square``, an even function that the odd candidates identity / tanh / sin cannot express), so the
search must end with argmax_k x_k = o*. The lower problem is non-convex in (W, v), and without the
ridge term it has flat directions (W → cW, v → v/c² leaves the square-activation network unchanged),
so ∇²_yy g is nearly singular; λ = 1e-2 lifts them (with λ = 1e-3 the exact implicit hypergradient,
which inverts that Hessian, sent the search to a wrong operation in our runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..formulation import Problem

__all__ = ["OPS", "DartsToy", "darts_toy", "mixed_op"]

#: the candidate operations (name -> elementwise function)
OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda h: h,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sin": torch.sin,
    "square": lambda h: h * h,
    "abs": torch.abs,
}


def mixed_op(x: Tensor, h: Tensor, ops: tuple[str, ...]) -> Tensor:
    """m(h) = Σ_k softmax(x)_k o_k(h) (DARTS Eq. 1)."""
    w = torch.softmax(x, dim=0)
    return sum(w[k] * OPS[name](h) for k, name in enumerate(ops))


@dataclass
class DartsToy:
    """The problem, its data, the candidate operations and the right one (``true_op``)."""

    problem: Problem
    x0: Tensor
    y0: dict[str, Tensor]
    ops: tuple[str, ...]
    true_op: str
    data: dict[str, tuple[Tensor, Tensor]]
    ridge: float
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> tuple[Tensor, dict[str, Tensor]]:
        return self.x0.clone(), {k: v.clone() for k, v in self.y0.items()}

    def predict(self, x: Tensor, y: dict[str, Tensor], u: Tensor) -> Tensor:
        return mixed_op(x, u @ y["W"].T, self.ops) @ y["v"]

    def mse(self, x: Tensor, y: dict[str, Tensor], split: str) -> float:
        u, t = self.data[split]
        with torch.no_grad():
            return float((self.predict(x, y, u) - t).pow(2).mean())

    def picked(self, x: Tensor) -> str:
        """The operation a discretised architecture keeps: argmax_k x_k."""
        return self.ops[int(torch.argmax(x))]


def darts_toy(
    ops: tuple[str, ...] = ("identity", "relu", "tanh", "sin", "square"),
    true_op: str = "square",
    *,
    dim: int = 5,
    hidden: int = 8,
    n_train: int = 200,
    n_val: int = 200,
    n_test: int = 1000,
    noise: float = 0.1,
    ridge: float = 1e-2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> DartsToy:
    """The architecture-search toy of the module docstring (x0 = 0: all operations equally weighted)."""
    unknown = [o for o in (*ops, true_op) if o not in OPS]
    if unknown:
        raise ConfigError(f"unknown operation(s) {unknown}; valid: {', '.join(OPS)}")
    if true_op not in ops:
        raise ConfigError(f"true_op {true_op!r} must be one of the candidates {ops}")
    if len(set(ops)) != len(ops) or len(ops) < 2:
        raise ConfigError(f"need at least two distinct candidate operations, got {ops}")
    g = torch.Generator().manual_seed(seed)
    W_t = torch.randn(hidden, dim, generator=g, dtype=dtype) / dim**0.5
    v_t = torch.randn(hidden, generator=g, dtype=dtype) / hidden**0.5

    def split(n: int) -> tuple[Tensor, Tensor]:
        u = torch.randn(n, dim, generator=g, dtype=dtype)
        t = OPS[true_op](u @ W_t.T) @ v_t
        return u, t + noise * torch.randn(n, generator=g, dtype=dtype)

    data = {"train": split(n_train), "val": split(n_val), "test": split(n_test)}
    ops = tuple(ops)

    def forward(x: Tensor, y: dict[str, Tensor], u: Tensor) -> Tensor:
        return mixed_op(x, u @ y["W"].T, ops) @ y["v"]

    def upper(x: Tensor, y: dict[str, Tensor]) -> Tensor:
        u, t = data["val"]
        return (forward(x, y, u) - t).pow(2).mean()

    def lower(x: Tensor, y: dict[str, Tensor]) -> Tensor:
        u, t = data["train"]
        reg = y["W"].pow(2).sum() + y["v"].pow(2).sum()
        return (forward(x, y, u) - t).pow(2).mean() + 0.5 * ridge * reg

    y0 = {"W": torch.randn(hidden, dim, generator=g, dtype=dtype) / dim**0.5,
          "v": torch.randn(hidden, generator=g, dtype=dtype) / hidden**0.5}
    return DartsToy(problem=Problem(upper, lower, name="darts-toy"), x0=torch.zeros(len(ops), dtype=dtype),
                    y0=y0, ops=ops, true_op=true_op, data=data, ridge=ridge,
                    extra={"teacher": {"W": W_t, "v": v_t}, "noise": noise})
