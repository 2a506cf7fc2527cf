"""BA: the bilevel approximation algorithm with an explicit Hessian inverse.

Ghadimi & Wang 2018, "Approximation methods for bilevel programming", Alg. 1 (BA, deterministic):

    y_{t+1} = T steps of gradient descent on g(x_t, ·) from y_t            (warm start)
    x_{t+1} = P_X( x_t − β [∇_x f − ∇²_xy g (∇²_yy g)⁻¹ ∇_y f](x_t, y_{t+1}) )

The Hessian ∇²_yy g is formed densely and factorized (:class:`bilevel.hypergrad.Exact`), so BA is
meant for small lower levels (a few thousand variables at most); it is the exact-inverse reference
for AID. The paper lets the number of inner steps grow with t; here it is the fixed ``inner.steps``
(with the warm start the lower level keeps converging across outer iterations).
"""

from __future__ import annotations

from typing import Any

from ..hypergrad import Exact
from ..inner import Dynamics
from .hypergradient import HypergradientDescent

__all__ = ["BA"]


class BA(HypergradientDescent):
    """Hypergradient descent with the exact (dense Cholesky) implicit hypergradient."""

    reference = "Ghadimi & Wang 2018, Alg. 1 (BA, explicit Hessian inverse)"

    def __init__(self, inner: Dynamics, upper_lr: float = 0.1, *, upper: Any = None,
                 warm_start: bool = True):
        super().__init__(Exact(inner), upper=upper if upper is not None else upper_lr, warm_start=warm_start)
