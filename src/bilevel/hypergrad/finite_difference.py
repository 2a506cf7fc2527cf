"""DARTS second-order approximation (Liu, Simonyan & Yang 2019, Eqs. 6–8).

After the inner dynamics, take one virtual step y' = y − ξ ∇_y g(x, y) and approximate

    ∇h ≈ ∇_x f(x, y') − ξ ∇²_xy g(x, y) · v,      v = ∇_y f(x, y'),

with the mixed second derivative replaced by a central difference of gradients (Eq. 8):

    ∇²_xy g · v ≈ [∇_x g(x, y + ε v) − ∇_x g(x, y − ε v)] / (2ε),   ε = eps / ‖v‖.

As eps → 0 this equals reverse-mode through that one virtual step (error O(eps²)); ξ defaults
to the inner learning rate.
"""

from __future__ import annotations

import torch

from .. import _tree as T
from .. import oracles as O
from .._trace import tracing
from ..formulation import Bound
from ..inner import Dynamics
from .base import Estimator, solve_lower


class FiniteDifference(Estimator):
    """DARTS' second-order approximation: one virtual step y' = y − ξ∇_y g, then
    ∇h ≈ ∇_x f(x, y') − ξ ∇²_xy g · ∇_y f(x, y'), the mixed term by a central difference of
    ∇_x g at y ± ε v (ε = eps / ‖v‖).

    Args:
        inner: lower-level dynamics, or ``None`` (then ``xi`` is required).
        eps: finite-difference size (relative to ‖∇_y f‖).
        xi: the virtual step ξ; default the inner learning rate.

    Returns: ``res.grad``, ``res.y`` = y' (the virtual point), ``res.info["fd_eps"]``.

    Reference: Liu, Simonyan & Yang 2019 (DARTS), Eqs. 6–8.
    """

    reference = "Liu, Simonyan & Yang 2019 (DARTS, Eq. 8)"

    def __init__(self, inner: Dynamics | None, eps: float = 0.01, xi: float | None = None):
        if xi is None and (inner is None or not isinstance(inner.lr, (int, float))):
            raise ValueError("FiniteDifference needs xi= when inner is None or has a tensor lr")
        self.inner = inner
        self.eps = eps
        self.xi = float(inner.lr) if xi is None else float(xi)

    def compute(self, bound: Bound, state: dict):
        xs = bound.xs
        ys, info = solve_lower(bound, self.inner, xs, bound.init(xs))
        y_virtual = T.axpy(-self.xi, O.grad_y(bound.G, xs, ys), ys)
        _, gx, v = O.grads(bound.upper_with(info), xs, y_virtual)
        if tracing():  # no branch on a value: v = 0 gives g+ = g− and a zero mixed term anyway
            vn = T.norm(v)
            eps = self.eps / torch.where(vn > 0, vn, torch.ones_like(vn))
        else:
            vnorm = float(T.norm(v))
            if vnorm == 0.0:
                return gx, y_virtual, info, state
            eps = self.eps / vnorm
        g_plus = O.grad_x(bound.G, xs, T.axpy(eps, v, ys))
        g_minus = O.grad_x(bound.G, xs, T.axpy(-eps, v, ys))
        mixed = T.scale(T.sub(g_plus, g_minus), 1.0 / (2 * eps))
        info["fd_eps"] = eps
        return T.axpy(-self.xi, mixed, gx), y_virtual, info, state
