"""Differentiable optimization dynamics, as pure functions of a flat state.

A dynamics maps ``state_k -> state_{k+1}`` given a gradient evaluated at ``point(state_k)``.
The state is a flat tuple of tensors made of ``slots`` blocks, each shaped like the variable
(block 0 is always the iterate y_k). Nothing is updated in place, so the same code runs

* without a graph (implicit estimators, solving the lower level),
* with ``create_graph`` (reverse-mode unrolling: RHG / T-RHG),
* under ``torch.func.jvp`` / ``vmap`` (forward-mode unrolling),
* as the upper-level optimizer of the solvers (one step per outer iteration).

Each dynamics takes ``projection``: a callable applied to the new iterate (e.g. a box clamp),
leafwise on a tensor or on the whole flat tuple (``projection_on="tuple"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _tree as T
from ._trace import require, scalar, tracing
from .errors import NonFiniteError
from .validation import first_nonfinite

__all__ = [
    "Dynamics", "GD", "Momentum", "Nesterov", "Adam", "unroll", "fista_momentum", "with_projection"
]

GradFn = Callable[[T.Leaves, int], T.Leaves]


class Dynamics:
    """Base class. Subclasses set ``slots`` and implement :meth:`update`."""

    slots = 1

    def __init__(
        self,
        lr: float | Tensor,
        steps: int = 100,
        projection: Callable[[Any], Any] | None = None,
    ):
        if isinstance(lr, (int, float)) and not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.lr = lr
        self.steps = int(steps)
        self.projection = projection

    # -- state layout --------------------------------------------------------------------
    def init(self, y: T.Leaves) -> T.Leaves:
        """State at step 0: the iterate followed by zero-initialised auxiliary blocks."""
        return tuple(y) + tuple(torch.zeros_like(t) for _ in range(self.slots - 1) for t in y)

    def split(self, state: T.Leaves) -> list[T.Leaves]:
        n = len(state) // self.slots
        return [tuple(state[i * n : (i + 1) * n]) for i in range(self.slots)]

    def output(self, state: T.Leaves) -> T.Leaves:
        """The iterate y_k."""
        return tuple(state[: len(state) // self.slots])

    def point(self, state: T.Leaves) -> T.Leaves:
        """Where the next gradient is evaluated (y_k except for Nesterov)."""
        return self.output(state)

    def project(self, y: T.Leaves) -> T.Leaves:
        if self.projection is None:
            return y
        return tuple(self.projection(t) for t in y)

    def update(self, state: T.Leaves, grad: T.Leaves, k: int) -> T.Leaves:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr}, steps={self.steps})"


class GD(Dynamics):
    """Projected gradient descent  y_{k+1} = P(y_k − η ∇_y g(x, y_k))."""

    def update(self, state, grad, k):
        return self.project(T.axpy(-self.lr, grad, state))


class Momentum(Dynamics):
    """Heavy ball (Polyak 1964):  m_{k+1} = β m_k + ∇g(y_k),  y_{k+1} = P(y_k − η m_{k+1})."""

    slots = 2

    def __init__(self, lr, steps=100, momentum: float = 0.9, projection=None):
        super().__init__(lr, steps, projection)
        self.momentum = momentum

    def update(self, state, grad, k):
        y, m = self.split(state)
        m = T.axpy(self.momentum, m, grad)
        return self.project(T.axpy(-self.lr, m, y)) + m


def fista_momentum(k: int) -> float:
    """β_k = (t_k − 1) / t_{k+1} with t_0 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k²)) / 2 (Beck & Teboulle 2009)."""
    t = 1.0
    for _ in range(k):
        t = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
    t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
    return (t - 1.0) / t_next


class Nesterov(Dynamics):
    """Nesterov / FISTA (Beck & Teboulle 2009, Alg. FISTA with constant step):

        z_{k+1} = P(w_k − η ∇g(w_k)),   w_{k+1} = z_{k+1} + β_k (z_{k+1} − z_k),   w_0 = z_0 = y_0.

    ``momentum=None`` uses the FISTA schedule β_k = (t_k − 1)/t_{k+1}; a float uses a constant β
    (for μ-strongly convex g, β = (√κ − 1)/(√κ + 1) is the optimal choice). Output is z_k.
    """

    slots = 2

    def __init__(self, lr, steps=100, momentum: float | None = None, projection=None):
        super().__init__(lr, steps, projection)
        self.momentum = momentum
        self._betas: list[float] = []

    def beta(self, k: int) -> float:
        if self.momentum is not None:
            return float(self.momentum)
        while len(self._betas) <= k:
            self._betas.append(fista_momentum(len(self._betas)))
        return self._betas[k]

    def init(self, y):
        return tuple(y) + tuple(y)

    def point(self, state):
        return self.split(state)[1]

    def update(self, state, grad, k):
        z, w = self.split(state)
        z_new = self.project(T.axpy(-self.lr, grad, w))
        w_new = T.axpy(self.beta(k), T.sub(z_new, z), z_new)
        return z_new + w_new


class Adam(Dynamics):
    """Adam (Kingma & Ba 2015, Alg. 1) with bias correction, differentiable end to end.

    Denominator sqrt(v̂ + eps_root) + eps: ``eps_root > 0`` keeps the derivative of sqrt finite
    where a gradient entry is exactly zero (needed when differentiating through Adam, as in optax).
    """

    slots = 3

    def __init__(
        self,
        lr,
        steps=100,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_root: float = 1e-16,
        projection=None,
    ):
        super().__init__(lr, steps, projection)
        self.betas, self.eps, self.eps_root = betas, eps, eps_root

    def update(self, state, grad, k):
        y, m, v = self.split(state)
        b1, b2 = self.betas
        m = tuple(b1 * mi + (1 - b1) * gi for mi, gi in zip(m, grad))
        v = tuple(b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, grad))
        c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
        step = tuple(
            (mi / c1) / (torch.sqrt(vi / c2 + self.eps_root) + self.eps) for mi, vi in zip(m, v)
        )
        return self.project(T.axpy(-self.lr, step, y)) + m + v


def _batched(t: Tensor) -> bool:
    """True for a tensor being vmapped (host synchronisation is impossible there)."""
    return bool(torch._C._functorch.is_batchedtensor(t))


def unroll(
    dyn: Dynamics,
    grad_fn: GradFn,
    state: T.Leaves,
    steps: int,
    *,
    start: int = 0,
    level: str = "lower",
    track: bool = True,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Run ``steps`` updates from ``state`` (step counter starting at ``start``).

    ``grad_fn(point, k)`` returns the direction at ``point``. Whether a graph is built is decided
    by ``grad_fn``. Non-finite iterates raise :class:`NonFiniteError` naming the first bad step
    (checked with a single synchronisation after the loop).
    """
    sums: list[Tensor] = []
    last_grad: T.Leaves | None = None
    for k in range(start, start + steps):
        last_grad = grad_fn(dyn.point(state), k)
        state = dyn.update(state, last_grad, k)
        if track:
            sums.append(sum(t.detach().sum() for t in state[: len(state) // dyn.slots]))
    if track and tracing() and sums:  # traced (vmap): no host read, the check runs afterwards
        ok = torch.isfinite(torch.stack([s.reshape(()) for s in sums])).all()
        require(ok, lambda: NonFiniteError(
            f"non-finite values (NaN/inf) in the {level}-level iterate of {type(dyn).__name__} "
            f"(lr={dyn.lr}) within steps {start + 1}..{start + steps}; reduce the step size or "
            "check the objective", level=level))
    if track and any(_batched(t) for t in state):  # inside a plain vmap: the caller checks
        track = False
    bad = first_nonfinite(sums) if track and not tracing() else None
    if bad is not None:
        step = start + bad + 1
        raise NonFiniteError(
            f"non-finite values (NaN/inf) in the {level}-level iterate at step {step} of "
            f"{type(dyn).__name__} (lr={dyn.lr}); reduce the step size or check the objective",
            level=level,
            step=step,
        )
    info: dict[str, Any] = {"steps": steps}
    if last_grad is not None and (tracing() or not _batched(last_grad[0])):
        info["last_grad_norm"] = scalar(T.norm(T.detach(last_grad)))
    return state, info


def with_projection(dyn: Dynamics, projection: Callable[[Any], Any] | None) -> Dynamics:
    """A copy of ``dyn`` that also applies ``projection`` (after its own, if any)."""
    import copy

    if projection is None:
        return dyn
    out = copy.copy(dyn)
    own = dyn.projection
    out.projection = projection if own is None else (lambda t: projection(own(t)))
    return out
