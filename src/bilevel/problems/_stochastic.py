"""Shared container of the stochastic (finite-sum) benchmark problems.

Every builder in :mod:`bilevel.problems.quadratic`, :mod:`~bilevel.problems.regsel` and
:mod:`~bilevel.problems.hyperclean` returns a :class:`StochasticProblem`: the
:class:`~bilevel.Problem` with minibatch objectives ``f(x, y, batch)``, ``g(x, y, batch)``, the
starting point, ready-made samplers and the evaluation functions

    y*(x) (accurate inner solve),   h(x) = f(x, y*(x)),   ∇h(x),   ‖∇h(x)‖,   test error.

Evaluation runs outside :func:`bilevel.oracles.counting` blocks of the caller (it is not counted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import oracles as O
from ..formulation import Problem
from ..sampling import FixedBatches, FullBatch, Minibatches, Sampler

__all__ = ["StochasticProblem", "make_sampler"]

SAMPLERS = ("minibatch", "fixed", "full")


def make_sampler(tensors: tuple[Tensor, ...], kind: str, batch_size: int, seed: int) -> Sampler:
    """``kind``: "minibatch" (:class:`Minibatches`), "fixed" (:class:`FixedBatches`, for SAGA-type
    memories) or "full" (:class:`FullBatch`)."""
    if kind == "minibatch":
        return Minibatches(*tensors, batch_size=batch_size, seed=seed)
    if kind == "fixed":
        return FixedBatches(*tensors, batch_size=batch_size, seed=seed)
    if kind == "full":
        return FullBatch(*tensors)
    raise ValueError(f"unknown sampler kind {kind!r}; expected one of {SAMPLERS}")


@dataclass
class StochasticProblem:
    """A finite-sum bilevel problem with its data, samplers and exact/accurate evaluation.

    ``lower_tensors`` / ``upper_tensors`` are the per-sample data the samplers slice; a batch is a
    tuple of row-slices of them. ``y_star(x, y_init)``, ``hypergrad(x)`` and ``value(x)`` are the
    evaluation functions (``value`` defaults to f(x, y*(x)) on the full upper data); ``test_error``
    (x, y) -> float is set where the problem has a test set.
    """

    name: str
    problem: Problem
    x0: Tensor
    y0: Tensor
    lower_tensors: tuple[Tensor, ...]
    upper_tensors: tuple[Tensor, ...]
    lower_data: Sampler
    upper_data: Sampler
    y_star_fn: Callable[[Tensor, Tensor | None], Tensor]
    hypergrad_fn: Callable[[Tensor, Tensor | None], Tensor]
    test_error_fn: Callable[[Tensor, Tensor], float] | None = None
    x_star: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    # samplers -------------------------------------------------------------------------------
    def samplers(
        self, batch_size: int | None = None, seed: int = 0, kind: str = "minibatch",
        upper_batch_size: int | None = None,
    ) -> tuple[Sampler, Sampler]:
        """Fresh (lower, upper) samplers, e.g. ``kind="fixed"`` for SABA / SRBA."""
        b = self.lower_data.batch_size if batch_size is None else batch_size
        ub = b if upper_batch_size is None else upper_batch_size
        return (make_sampler(self.lower_tensors, kind, b, seed),
                make_sampler(self.upper_tensors, kind, ub, seed + 1))

    def solve_kwargs(self, **sampler_kw: Any) -> dict[str, Any]:
        """``bl.solve(**p.solve_kwargs(), solver=..., steps=...)`` (fresh samplers each call)."""
        lower, upper = self.samplers(**sampler_kw) if sampler_kw else (self.lower_data, self.upper_data)
        return {"problem": self.problem, "x0": self.x0, "y0": self.y0,
                "lower_data": lower, "upper_data": upper}

    # evaluation -----------------------------------------------------------------------------
    def y_star(self, x: Tensor, y_init: Tensor | None = None) -> Tensor:
        """Accurate (or exact) lower solution y*(x); ``y_init`` warm-starts iterative solvers."""
        with torch.no_grad(), O.counting():
            return self.y_star_fn(x.detach(), None if y_init is None else y_init.detach())

    def value(self, x: Tensor, y_init: Tensor | None = None) -> float:
        """Value function h(x) = f(x, y*(x)) on the full upper data."""
        ys = self.y_star(x, y_init)
        with torch.no_grad():
            return float(self.problem.f(x.detach(), ys, self.upper_tensors))

    def hypergrad(self, x: Tensor, y_init: Tensor | None = None) -> Tensor:
        """∇h(x) (exact, or by implicit differentiation at an accurate y*)."""
        with O.counting():
            return self.hypergrad_fn(x.detach(), None if y_init is None else y_init.detach())

    def grad_norm(self, x: Tensor, y_init: Tensor | None = None) -> float:
        return float(torch.linalg.vector_norm(self.hypergrad(x, y_init)))

    def test_error(self, x: Tensor, y: Tensor) -> float:
        if self.test_error_fn is None:
            raise ValueError(f"problem {self.name!r} has no test set")
        with torch.no_grad():
            return float(self.test_error_fn(x.detach(), y.detach()))

    def evaluate(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Everything a benchmark records at (x, y): value function h(x), ‖∇h(x)‖, ‖y − y*(x)‖,
        upper loss f(x, y), test error of the solver's y (if any). y warm-starts the inner solve."""
        ys = self.y_star(x, y)
        with torch.no_grad():
            out = {
                "value": float(self.problem.f(x.detach(), ys, self.upper_tensors)),
                "upper_loss": float(self.problem.f(x.detach(), y.detach(), self.upper_tensors)),
                "inner_distance": float(torch.linalg.vector_norm(y.detach() - ys)),
            }
        out["grad_norm"] = self.grad_norm(x, ys)
        if self.test_error_fn is not None:
            out["test_error"] = self.test_error(x, y)
        return out


def implicit_hypergrad(
    problem: Problem, x: Tensor, ys: Tensor, lower_full: Any, upper_full: Any, *,
    iters: int = 500, tol: float = 1e-10,
) -> Tensor:
    """∇h(x) = ∇_x f − ∇²_xy g · H⁻¹ ∇_y f at a given accurate y*, by CG on the full data."""
    from ..hypergrad import CG

    est = CG(inner=None, iters=iters, tol=tol)
    res = est(problem, x, ys, upper_batch=upper_full, lower_batch=lower_full)
    return res.grad


def lbfgs_lower(
    g: Callable[[Tensor], Tensor], y0: Tensor, *, tol: float = 1e-7, max_iter: int = 500,
) -> Tensor:
    """Minimise a smooth strongly convex g(y) by L-BFGS (strong Wolfe line search) until
    max_k |∂g/∂y_k| ≤ tol (or ``max_iter`` iterations)."""
    y = y0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([y], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        val = g(y)
        val.backward()
        return val

    with torch.enable_grad():
        opt.step(closure)
    return y.detach()
