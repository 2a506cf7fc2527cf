"""Primal–dual method on the smoothed value-function reformulation (Sow et al. 2022b).

Sow et al. 2022, "A constrained optimization approach to bilevel optimization with multiple inner
minima" (arXiv 2203.01123), as stated in the lecture slides *Algorithms and analysis of stochastic
bi-level optimization problems*, Eq. 25–29. The value-function constraint g(x, y) ≤ v(x) of the
bilevel problem (Eq. 25) is neither smooth nor strictly feasible; it is relaxed with the smooth upper
bound (Eq. 26)

    ṽ_a(x) = min_y { g(x, y) + (a1/2) ‖y‖² } + a2,      a1, a2 > 0,

(the inner problem is strongly convex whenever g is convex in y, ∇ṽ_a(x) = ∇_x g(x, ŷ_a(x)) by
Danskin), and the constrained problem min f s.t. g(x, y) ≤ ṽ_a(x) (Eq. 27) is solved through its
Lagrangian saddle point (Eq. 29)

    max_{λ ≥ 0} min_{x, y}  L(x, y, λ) = f(x, y) + λ (g(x, y) − ṽ_a(x)).

One outer iteration k (gradient descent–ascent):

    ŷ_k     = T steps of the lower dynamics on g(x_k, ·) + (a1/2)‖·‖², warm-started at ŷ_{k−1}
    c_k     = g(x_k, y_k) − g(x_k, ŷ_k) − (a1/2)‖ŷ_k‖² − a2                 (constraint value)
    (x, y)  ← P_{X×Y}((x_k, y_k) − α (∇f(x_k, y_k) + λ_k (∇g(x_k, y_k) − (∇_x g(x_k, ŷ_k), 0))))
    λ_{k+1} = min(max(λ_k + η c_k, 0), λ_max)

First-order oracles only. The relaxation enlarges the feasible set to {½ (y − y*)ᵀ∇²g (y − y*) ≲
ṽ_a − v} (for quadratic g), so the solution is that of the bilevel problem up to a bias that vanishes
as a → 0. Departures: (x, y) may use any update rule of :mod:`bilevel.inner` (``upper=``) instead of
plain gradient steps; the dual step uses the constraint at the current primal point (simultaneous
descent–ascent). ``state["y"]`` is y_k, the multiplier ``state["lmbda"]``, ŷ_k ``state["y_hat"]``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _tree as T
from .. import oracles as O
from .._trace import scalar
from ..errors import ConfigError
from ..inner import GD, Dynamics, unroll
from .base import Context, Solver, descend

__all__ = ["PrimalDualVF"]


class PrimalDualVF(Solver):
    """Primal–dual value-function method (module docstring). ``a1``, ``a2``: the smoothing of Eq. 26;
    ``dual_lr``: η; ``lmbda0`` / ``lmbda_max``: start and cap of the multiplier."""

    reference = "Sow et al. 2022b (arXiv 2203.01123); lecture slides Eq. 26 and 29"

    def __init__(self, inner: Dynamics, lr: float = 0.01, *, dual_lr: float = 1.0, a1: float = 1e-3,
                 a2: float = 1e-3, lmbda0: float = 0.0, lmbda_max: float = 1e6,
                 upper: Dynamics | None = None):
        if not (a1 > 0 and a2 > 0):
            raise ConfigError(f"the smoothing of Eq. 26 needs a1 > 0 and a2 > 0, got a1={a1}, a2={a2}")
        if not (dual_lr > 0 and lmbda0 >= 0 and lmbda_max >= lmbda0):
            raise ConfigError(f"need dual_lr > 0 and 0 <= lmbda0 <= lmbda_max, got {dual_lr}, {lmbda0}, "
                              f"{lmbda_max}")
        if upper is None and not lr > 0:
            raise ConfigError(f"PrimalDualVF needs lr > 0, got {lr}")
        self.inner, self.dual_lr, self.a1, self.a2 = inner, float(dual_lr), float(a1), float(a2)
        self.lmbda0, self.lmbda_max = float(lmbda0), float(lmbda_max)
        self.upper = GD(lr=lr) if upper is None else upper

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        lam0 = torch.tensor(self.lmbda0, dtype=xs[0].dtype, device=xs[0].device)
        return {"x": xs, "y": ys, "y_hat": ys, "lmbda": lam0,
                "rule_x": self.upper.init(xs), "rule_y": self.upper.init(ys)}

    def smoothed_lower(self, dyn: Dynamics, G, xs: T.Leaves, y0: T.Leaves) -> T.Leaves:
        """ŷ_a(x): the dynamics ``dyn`` on g(x, ·) + (a1/2)‖·‖² (no graph)."""
        a1 = self.a1

        def grad_fn(ys: T.Leaves, k: int) -> T.Leaves:
            return T.axpy(a1, ys, O.grad_y(G, xs, ys))

        with torch.no_grad():
            state, _ = unroll(dyn, grad_fn, dyn.init(y0), dyn.steps)
        return T.detach(dyn.output(state))

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        xs, ys = state["x"], state["y"]
        bound = ctx.bound(xs, ys, ctx.upper_batch(), ctx.lower_batch())
        y_hat = self.smoothed_lower(ctx.inner(self.inner), bound.G, xs, state["y_hat"])
        _, fx, fy = O.grads(bound.F, xs, ys)
        gval, gx, gy = O.grads(bound.G, xs, ys)
        gx_hat = O.grad_x(bound.G, xs, y_hat)
        # λ a 0-dim tensor (one compiled graph for every λ; a Python float in older states)
        lam = torch.as_tensor(state["lmbda"], dtype=gval.dtype, device=gval.device)
        v_a = O.value(bound.G, xs, y_hat) + 0.5 * self.a1 * T.dot(y_hat, y_hat) + self.a2
        c = gval - v_a
        d_x = T.axpy(lam, T.sub(gx, gx_hat), fx)
        d_y = T.axpy(lam, gy, fy)
        state["x"], state["rule_x"] = descend(self.upper, state["rule_x"], d_x, t, ctx.project_x)
        state["y"], state["rule_y"] = descend(self.upper, state["rule_y"], d_y, t, ctx.project_y)
        state["y_hat"] = y_hat
        state["lmbda"] = (lam + self.dual_lr * c).clamp(0.0, self.lmbda_max)
        return {"constraint": scalar(c), "lmbda": scalar(lam)}
