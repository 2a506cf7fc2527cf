"""BDA: bi-level descent aggregation (lower level beyond the singleton assumption).

Liu, Mu, Yuan, Zeng & Zhang 2020, "A generic first-order algorithmic framework for bi-level
programming beyond lower-level singleton" (ICML), Alg. 1 with the gradient modules of Sec. 3.1.
Notation: the paper's F (upper) and f (lower) are our f and g.
The lower trajectory descends a convex combination of the upper and lower objectives:

    u_{k+1} = y_k − s_u ∇_y f(x, y_k),          v_{k+1} = y_k − s_l ∇_y g(x, y_k),
    y_{k+1} = P_Y( α_k u_{k+1} + (1 − α_k) v_{k+1} )
            = P_Y( y_k − (α_k s_u ∇_y f(x, y_k) + (1 − α_k) s_l ∇_y g(x, y_k)) ),   k = 0..K−1,

with the aggregation weight α_k = μ / (k + 1), μ ∈ (0, 1] — the schedule of the paper's
convergence analysis (α_k ↓ 0 with Σ α_k = ∞, so the lower objective dominates in the end while the
upper one is seen long enough to select among lower solutions). The authors' released code decays α
geometrically instead; ``schedule=callable`` (k -> α_k) covers such variants. Among the lower
solutions the UL term selects the optimistic one (min f), which is what makes BDA converge without a
unique lower solution. The upper variable descends x ↦ f(x, y_K(x)), differentiated in reverse mode
through the aggregated steps — the same :class:`bilevel.hypergrad.Reverse` as RHG, with the direction
hook ``grad_fn``.

Here s_l is the step of the ``inner`` dynamics (``inner.lr``) and the direction handed to it is
(1 − α_k) ∇_y g + α_k (s_u / s_l) ∇_y f, so the update above is reproduced exactly for GD (other
dynamics — momentum, Adam — receive the aggregated direction in place of ∇_y g).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _tree as T
from .. import oracles as O
from ..errors import ConfigError
from ..formulation import Bound
from ..hypergrad import Reverse
from ..inner import Dynamics, GradFn
from .hypergradient import HypergradientDescent

__all__ = ["BDA", "bda_schedule"]


def bda_schedule(mu: float) -> Callable[[int], float]:
    """The published aggregation weights α_k = μ / (k + 1), k = 0, 1, ..."""
    if not 0.0 <= mu <= 1.0:
        raise ConfigError(f"BDA needs mu in [0, 1] (alpha_k = mu/(k+1) must lie in [0, 1]), got {mu}")

    def alpha(k: int) -> float:
        return mu / (k + 1)

    return alpha


class Aggregation:
    """BDA's lower direction: ``(bound, xs, create_graph) -> (k -> (1 − α_k) ∇_y g + α_k (s_u/s_l) ∇_y f)``.

    Plugged into :class:`bilevel.hypergrad.Reverse` as its ``grad_fn``.
    """

    def __init__(self, alpha: Callable[[int], float], ratio: float):
        self.alpha, self.ratio = alpha, float(ratio)

    def __call__(self, bound: Bound, xs: T.Leaves, *, create_graph: bool) -> GradFn:
        G, F, alpha, ratio = bound.G, bound.F, self.alpha, self.ratio

        def grad_fn(ys: T.Leaves, k: int) -> T.Leaves:
            a = float(alpha(k))
            gl = O.grad_y(G, xs, ys, create_graph=create_graph)
            if a == 0.0:
                return gl
            gu = O.grad_y(F, xs, ys, create_graph=create_graph)
            return T.axpy(a * ratio, gu, T.scale(gl, 1.0 - a))

        return grad_fn

    def __repr__(self) -> str:
        return f"Aggregation(s_u/s_l={self.ratio:g})"


class BDA(HypergradientDescent):
    """Bi-level descent aggregation (see module docstring).

    ``mu``: aggregation strength (α_0 = μ); ``s_u``: upper step inside the lower loop (default:
    the lower step s_l = ``inner.lr``); ``schedule``: optional k -> α_k replacing μ/(k+1).
    """

    reference = "Liu et al. 2020 (ICML), Alg. 1 (BDA), alpha_k = mu/(k+1)"

    def __init__(
        self,
        inner: Dynamics,
        upper_lr: float = 0.1,
        *,
        upper: Any = None,
        mu: float = 0.5,
        s_u: float | None = None,
        schedule: Callable[[int], float] | None = None,
        warm_start: bool = False,
        truncate: int | None = None,
        checkpoint: bool | int = False,
    ):
        if not isinstance(inner.lr, (int, float)):
            raise ConfigError("BDA needs a numeric inner.lr (the lower step s_l)")
        self.mu = float(mu)
        alpha = schedule if schedule is not None else bda_schedule(self.mu)
        self.s_u = float(inner.lr if s_u is None else s_u)
        if not self.s_u > 0:
            raise ConfigError(f"BDA needs s_u > 0, got {self.s_u}")
        self.direction = Aggregation(alpha, self.s_u / float(inner.lr))
        est = Reverse(inner, truncate=truncate, checkpoint=checkpoint, grad_fn=self.direction)
        super().__init__(est, upper=upper if upper is not None else upper_lr, warm_start=warm_start)

    def alpha(self, k: int) -> float:
        """The aggregation weight α_k of lower step k."""
        return float(self.direction.alpha(k))
