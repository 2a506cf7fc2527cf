"""Implicit layers as bilevel problems: a deep-equilibrium layer and a fixed-step Neural-ODE.

Both are "lower levels" that are not minimizations but iterations of a map Φ of the parameters x
and the state y; the upper objective is a task loss on the layer's output.

**Deep equilibrium** (Bai, Kolter & Koltun 2019, Eq. 1–2 and 6–8). For inputs u_i (rows of U_in),

    z* = Φ(x, z*),   Φ(x, z) = tanh(z Wᵀ + u Bᵀ + b),   W = ρ V / ‖V‖₂,

with the spectral normalization making Φ a ρ-contraction in z (tanh is 1-Lipschitz, ‖W‖₂ = ρ < 1),
so z* exists, is unique and the iteration converges at rate ρ^k. Prediction z* a + c; the upper
objective is the training MSE. The implicit derivative (Bai et al. Eq. 8) is what
:func:`bilevel.fixed_point` applies: w = z̄ + (∂_z Φ)ᵀ w, x̄ = (∂_x Φ)ᵀ w. The problem's lower
objective g = ½‖z − Φ(x, z)‖² / N (minimum 0 exactly at the equilibrium) measures the residual.

**Neural ODE, fixed step** (Chen et al. 2018, with a fixed-step solver instead of the adjoint ODE):
dz/dt = v_x(z) = A₂ tanh(A₁ z + b₁) + b₂, integrated over [0, 1] from z(0) = u by T steps of
Euler or classical RK4; the upper objective is the MSE of z(1) to the targets of a teacher flow
(a damped rotation, z(1) = exp(M) u). Reverse mode through the T steps stores the T states;
``Reverse(checkpoint=True)`` (Griewank & Walther 2008) stores ⌈√T⌉ of them and recomputes each
segment, memory O(√T) for the same derivative.

Both run through the library's unrolled estimator with :func:`map_step`: GD with step 1 on the
direction y − Φ_k(x, y) iterates y_{k+1} = Φ_k(x, y_k) (``Reverse(GD(lr=1, steps=T),
grad_fn=map_step(...))``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import _tree as T
from .. import oracles as O
from ..errors import ConfigError
from ..formulation import Bound, Problem
from ..hypergrad.base import Estimator

__all__ = ["map_step", "Equilibrium", "DEQToy", "deq_regression", "NeuralODEToy", "neural_ode"]


def map_step(phi: Callable[[Any, Any, int], Any]) -> Callable[..., Callable[[T.Leaves, int], T.Leaves]]:
    """The ``grad_fn`` hook of :class:`~bilevel.hypergrad.Reverse` for an iterated map: with
    ``phi(x, y, k) -> y_next`` (pytrees), the direction is y − Φ_k(x, y), so ``GD(lr=1)`` steps
    y ← Φ_k(x, y) and reverse mode differentiates the iteration (with or without checkpointing)."""

    def grad_fn(bound: Bound, xs: T.Leaves, *, create_graph: bool) -> Callable[[T.Leaves, int], T.Leaves]:
        def direction(ys: T.Leaves, k: int) -> T.Leaves:
            with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
                xt = bound.x_tree(xs if create_graph else T.detach(xs))
                nxt = T.flatten(phi(xt, bound.y_tree(ys), k))[0]
                return tuple(y - n for y, n in zip(ys, nxt))

        return direction

    return grad_fn


class Equilibrium(Estimator):
    """Hypergradient of f(x, z*(x)) for the fixed point z* = Φ(x, z*) of a contraction, through the
    differentiable layer :func:`bilevel.fixed_point` (Bai, Kolter & Koltun 2019, Eq. 8): the forward
    iteration runs from the given y (a warm start) until the relative change is ≤ ``tol``; the
    backward solves w = z̄ + (∂_z Φ)ᵀ w and returns ∇_x f + (∂_x Φ)ᵀ w. ``phi(x, y, k)`` as in
    :func:`map_step` (called with k = 0). Memory: one linearization of Φ, independent of the
    number of iterations."""

    reference = "Bai, Kolter & Koltun 2019 (deep equilibrium models), Eq. 8"

    def __init__(self, phi: Callable[[Any, Any, int], Any], iters: int = 500, tol: float = 1e-12):
        self.phi, self.iters, self.tol = phi, int(iters), float(tol)

    def compute(self, bound: Bound, state: dict[str, Any]):
        from ..layers import fixed_point

        with torch.enable_grad():
            xs = T.requires_grad(T.detach(bound.xs))
            z = fixed_point(lambda x, y: self.phi(x, y, 0), bound.x_tree(xs),
                            bound.y_tree(T.detach(bound.ys0)), iters=self.iters, tol=self.tol)
            zs = T.flatten(z)[0]
            loss = O.objective(bound.F, xs, zs)
            gx = torch.autograd.grad(loss, xs, allow_unused=True)
        gx = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, gx))
        return T.detach(gx), T.detach(zs), {}, state


def _split(n: int, g: torch.Generator, dtype: torch.dtype, fn: Callable[[Tensor], Tensor],
           dim: int = 2, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    u = scale * (2 * torch.rand(n, dim, generator=g, dtype=dtype) - 1)
    return u, fn(u)


# --- deep equilibrium ----------------------------------------------------------------------------


@dataclass
class DEQToy:
    """Regression with one deep-equilibrium layer; ``phi(x, z, u)`` is the layer's map."""

    problem: Problem
    x0: dict[str, Tensor]
    y0: Tensor
    rho: float
    data: dict[str, tuple[Tensor, Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> tuple[dict[str, Tensor], Tensor]:
        return {k: v.clone() for k, v in self.x0.items()}, self.y0.clone()

    def weight(self, x: dict[str, Tensor]) -> Tensor:
        """W = ρ V / ‖V‖₂ (spectral normalization: ‖W‖₂ = ρ)."""
        return self.rho * x["V"] / torch.linalg.matrix_norm(x["V"], 2)

    def phi(self, x: dict[str, Tensor], z: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(z @ self.weight(x).T + u @ x["B"].T + x["b"])

    def readout(self, x: dict[str, Tensor], z: Tensor) -> Tensor:
        return z @ x["a"] + x["c"]

    def equilibrium(self, x: dict[str, Tensor], u: Tensor, iters: int = 500, tol: float = 1e-12) -> Tensor:
        """z*(x) on inputs u by the differentiable layer :func:`bilevel.fixed_point`."""
        from ..layers import fixed_point

        z0 = torch.zeros(u.shape[0], self.y0.shape[1], dtype=u.dtype, device=u.device)
        return fixed_point(lambda xx, z: self.phi(xx, z, u), x, z0, iters=iters, tol=tol)

    def mse(self, x: dict[str, Tensor], split: str) -> float:
        u, t = self.data[split]
        with torch.no_grad():
            z = self.equilibrium({k: v.detach() for k, v in x.items()}, u)
            return float((self.readout(x, z) - t).pow(2).mean())


def deq_regression(
    hidden: int = 16,
    *,
    n_train: int = 256,
    n_test: int = 1024,
    rho: float = 0.9,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> DEQToy:
    """Fit t = sin(u₁) cos(u₂) on u ∈ [−2, 2]² with one DEQ layer of width ``hidden``."""
    if not 0 < rho < 1:
        raise ConfigError(f"rho (the contraction ‖W‖₂) must be in (0, 1), got {rho}")
    g = torch.Generator().manual_seed(seed)

    def target(u: Tensor) -> Tensor:
        return torch.sin(u[:, 0]) * torch.cos(u[:, 1])

    data = {"train": _split(n_train, g, dtype, target), "test": _split(n_test, g, dtype, target)}
    x0 = {"V": torch.randn(hidden, hidden, generator=g, dtype=dtype),
          "B": torch.randn(hidden, 2, generator=g, dtype=dtype),
          "b": 0.1 * torch.randn(hidden, generator=g, dtype=dtype),
          "a": torch.randn(hidden, generator=g, dtype=dtype) / math.sqrt(hidden),
          "c": torch.zeros((), dtype=dtype)}
    if device is not None:
        data = {k: (u.to(device), t.to(device)) for k, (u, t) in data.items()}
        x0 = {k: v.to(device) for k, v in x0.items()}
    z0 = torch.zeros(n_train, hidden, dtype=dtype, device=data["train"][0].device)
    toy = DEQToy(problem=None, x0=x0, y0=z0, rho=rho, data=data)  # type: ignore[arg-type]
    u_tr, t_tr = data["train"]

    def upper(x: dict[str, Tensor], z: Tensor) -> Tensor:
        return (toy.readout(x, z) - t_tr).pow(2).mean()

    def lower(x: dict[str, Tensor], z: Tensor) -> Tensor:  # fixed-point residual, 0 at z*
        return 0.5 * (z - toy.phi(x, z, u_tr)).pow(2).sum() / z.shape[0]

    toy.problem = Problem(upper, lower, name="deq")
    return toy


# --- Neural ODE ----------------------------------------------------------------------------------


@dataclass
class NeuralODEToy:
    """z(1) of dz/dt = v_x(z) from z(0) = u by ``steps`` fixed steps of ``method``."""

    problem: Problem
    x0: dict[str, Tensor]
    y0: Tensor
    steps: int
    method: str
    data: dict[str, tuple[Tensor, Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> tuple[dict[str, Tensor], Tensor]:
        return {k: v.clone() for k, v in self.x0.items()}, self.y0.clone()

    @staticmethod
    def field(x: dict[str, Tensor], z: Tensor) -> Tensor:
        """v_x(z) = A₂ tanh(A₁ z + b₁) + b₂ (rows of z are points)."""
        return torch.tanh(z @ x["A1"].T + x["b1"]) @ x["A2"].T + x["b2"]

    def phi(self, x: dict[str, Tensor], z: Tensor, k: int = 0) -> Tensor:
        """One step of size h = 1/T: Euler z + h v(z), or classical RK4."""
        h = 1.0 / self.steps
        if self.method == "euler":
            return z + h * self.field(x, z)
        k1 = self.field(x, z)
        k2 = self.field(x, z + 0.5 * h * k1)
        k3 = self.field(x, z + 0.5 * h * k2)
        k4 = self.field(x, z + h * k3)
        return z + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)

    def integrate(self, x: dict[str, Tensor], u: Tensor) -> Tensor:
        z = u
        for k in range(self.steps):
            z = self.phi(x, z, k)
        return z

    def mse(self, x: dict[str, Tensor], split: str) -> float:
        u, t = self.data[split]
        with torch.no_grad():
            return float((self.integrate(x, u) - t).pow(2).mean())


def neural_ode(
    steps: int = 64,
    *,
    method: str = "rk4",
    hidden: int = 16,
    n_train: int = 128,
    n_test: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> NeuralODEToy:
    """Learn the flow of the damped rotation dz/dt = M z, M = [[−0.1, −1.5], [1.5, −0.1]], over
    [0, 1] (targets exp(M) u) with a tanh vector field integrated by ``steps`` steps of ``method``."""
    if method not in ("euler", "rk4"):
        raise ConfigError(f"method must be 'euler' or 'rk4', got {method!r}")
    if int(steps) < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    g = torch.Generator().manual_seed(seed)
    M = torch.tensor([[-0.1, -1.5], [1.5, -0.1]], dtype=dtype)
    E = torch.linalg.matrix_exp(M)

    def target(u: Tensor) -> Tensor:
        return u @ E.T

    data = {"train": _split(n_train, g, dtype, target, scale=1.0),
            "test": _split(n_test, g, dtype, target, scale=1.0)}
    x0 = {"A1": torch.randn(hidden, 2, generator=g, dtype=dtype) / math.sqrt(2),
          "b1": 0.1 * torch.randn(hidden, generator=g, dtype=dtype),
          "A2": torch.randn(2, hidden, generator=g, dtype=dtype) / math.sqrt(hidden),
          "b2": torch.zeros(2, dtype=dtype)}
    if device is not None:
        data = {k: (u.to(device), t.to(device)) for k, (u, t) in data.items()}
        x0 = {k: v.to(device) for k, v in x0.items()}
    u_tr, t_tr = data["train"]
    toy = NeuralODEToy(problem=None, x0=x0, y0=u_tr.clone(), steps=int(steps), method=method,  # type: ignore[arg-type]
                       data=data, extra={"M": M})

    def upper(x: dict[str, Tensor], z: Tensor) -> Tensor:
        return (z - t_tr).pow(2).mean()

    def lower(x: dict[str, Tensor], z: Tensor) -> Tensor:  # 0 exactly at z = z(1) from z(0) = u
        with torch.no_grad():
            end = toy.integrate({k: v.detach() for k, v in x.items()}, u_tr)
        return 0.5 * (z - end).pow(2).sum() / z.shape[0]

    toy.problem = Problem(upper, lower, name="neural-ode")
    return toy
