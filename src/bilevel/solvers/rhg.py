"""RHG and T-RHG: hypergradient descent with reverse-mode differentiation through the lower loop.

RHG — Franceschi, Donini, Frasconi & Pontil 2017, "Forward and reverse gradient-based
hyperparameter optimization", Alg. 1 (REVERSE-HG); also Franceschi et al. 2018 (ICML), Sec. 3.
Each outer iteration runs K steps of the lower dynamics Φ from the starting point y0,

    y_{k+1} = Φ_k(x, y_k),   k = 0..K−1,

and descends the exact derivative of the approximate objective  x ↦ f(x, y_K(x)),  obtained by
backpropagation through the K steps (:class:`bilevel.hypergrad.Reverse`).

T-RHG — Shaban, Cheng, Hatch & Boots 2019, "Truncated back-propagation for bilevel
optimization", Alg. 1: the same, but the backward sweep stops after the last ``truncate`` steps
(memory O(truncate) instead of O(K)).

Both restart the lower loop from the fixed y0 at every outer iteration, as in the papers
(``warm_start=True`` continues from the previous lower iterate instead).
"""

from __future__ import annotations

from typing import Any

from ..hypergrad import Reverse
from ..inner import Dynamics
from .hypergradient import HypergradientDescent

__all__ = ["RHG", "TRHG"]


class RHG(HypergradientDescent):
    """Reverse hypergradient descent. ``upper_lr``: SGD step; ``upper``: any update rule (e.g. Adam)."""

    reference = "Franceschi et al. 2017, Alg. 1 (reverse-HG); Franceschi et al. 2018"

    def __init__(
        self,
        inner: Dynamics,
        upper_lr: float = 0.1,
        *,
        upper: Any = None,
        warm_start: bool = False,
        checkpoint: bool | int = False,
    ):
        est = Reverse(inner, checkpoint=checkpoint)
        super().__init__(est, upper=upper if upper is not None else upper_lr, warm_start=warm_start)


class TRHG(HypergradientDescent):
    """Truncated reverse hypergradient: backpropagate through the last ``truncate`` of K steps."""

    reference = "Shaban et al. 2019, Alg. 1 (truncated back-propagation, T-RHG)"

    def __init__(
        self,
        inner: Dynamics,
        truncate: int,
        upper_lr: float = 0.1,
        *,
        upper: Any = None,
        warm_start: bool = False,
    ):
        est = Reverse(inner, truncate=truncate)
        super().__init__(est, upper=upper if upper is not None else upper_lr, warm_start=warm_start)
