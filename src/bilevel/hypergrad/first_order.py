"""First-order hypergradient: drop the implicit term (dy/dx)^T ∇_y f.

    ∇̂h(x) = ∇_x f(x, y_T)  [+ (dy0/dx)^T ∇_y f(x, y_T) when y0 depends on x]

The first form is alternating gradient descent; the second is first-order MAML (Finn et al.
2017, Sec. 5.2; Nichol et al. 2018), where dy_T/dy0 is replaced by the identity.
"""

from __future__ import annotations

from .. import _tree as T
from .. import oracles as O
from ..formulation import Bound
from ..inner import Dynamics
from ..validation import check_finite
from .base import Estimator, solve_lower


class FirstOrder(Estimator):
    """First-order approximation: ∇h(x) ≈ ∇_x f(x, y_T), dropping the implicit term
    (dy*/dx)^T ∇_y f (first-order DARTS / "no hypergradient" baseline).

    Args:
        inner: lower-level dynamics from the given y, or ``None`` (use y as is).

    Returns: ``res.grad`` = ∇_x f(x, y_T), ``res.y`` = y_T.

    Reference: Liu, Simonyan & Yang 2019 (DARTS, first-order variant).
    """

    reference = "Finn et al. 2017 (first-order MAML); alternating GD"

    def __init__(self, inner: Dynamics | None):
        self.inner = inner

    def compute(self, bound: Bound, state: dict):
        ys, info = solve_lower(bound, self.inner, bound.xs, bound.init(bound.xs))
        fval, gx, gy = O.grads(bound.upper_with(info), bound.xs, ys)
        check_finite([fval, *gx, *gy], "upper", "f, ∇_x f or ∇_y f at the lower point")
        if bound.y_fn is not None:
            gx = T.add(gx, O.vjp(bound.init, bound.xs, gy))
        return gx, ys, info, state
