"""SUSTAIN — Single-timescale Double-momentum Stochastic Approximation (Khanduri, Zeng, Hong, Wai,
Wang & Yang, NeurIPS 2021b, Algorithm 1).

Single loop, STORM momentum on both levels (same samples at the current and previous point):

    x_{k+1} = x_k − α_k f_k,        y_{k+1} = y_k − β_k h_k
    h_{k+1} = ∇_y g(x_{k+1}, y_{k+1}; ζ) + (1 − η^g_{k+1}) (h_k − ∇_y g(x_k, y_k; ζ))
    f_{k+1} = ∇̄f(x_{k+1}, y_{k+1}; ξ̄) + (1 − η^f_{k+1}) (f_k − ∇̄f(x_k, y_k; ξ̄))

(the paper's η ∇ + (1−η)(h + ∇ − ∇') written in STORM form). The update structure is MRBO's —
this class reuses it — but the hypergradient ∇̄f is the randomly truncated Neumann estimator of
Ghadimi & Wang (2018) used in the paper (:func:`bilevel.estimates.sampled_neumann_hypergradient`:
η Q Π_{i=1}^{p} (I − η∇²_yy G(B_i)) ∇_y F, p ~ U{0..Q−1}, the same p at both points). Step sizes:
α_k = c_α/(w+k)^{1/3}, β_k = c_β α_k, η^f_{k+1} = c_f α_k², η^g_{k+1} = c_g α_k²  →  ``lr_x``,
``lr_y`` Schedules with e = 1/3 and ``momentum_x``/``momentum_y`` with e = 2/3.
Per iteration (k ≥ 1): 2 lower gradients + 2 × (1 upper gradient + p HVPs + 1 cross).
"""

from __future__ import annotations

from typing import Any

from ... import _tree as T
from ..._rng import initial_state
from ...estimates import Schedule, replay, sampled_neumann_hypergradient, truncation_index
from ..base import Context
from .mrbo import LR_X, MOMENTUM, MRBO

__all__ = ["SUSTAIN"]


class SUSTAIN(MRBO):
    """SUSTAIN: single loop, STORM momentum on both levels (MRBO's structure) with the randomly
    truncated Neumann hypergradient (see the module docstring).

    Args:
        lr_x, lr_y, momentum_x, momentum_y: as in :class:`MRBO` (α_k, β_k, η^f, η^g).
        Q: truncation range (≥ 1); eta: the Neumann step.
        seed: seeds the generator of the random truncation / directions (kept in the state).

    Reference: Khanduri et al. 2021b (NeurIPS), Algorithm 1.
    """

    reference = "Khanduri et al. 2021b (NeurIPS), Algorithm 1"

    def __init__(
        self,
        lr_x: float | Schedule | dict = LR_X,
        lr_y: float | Schedule | dict = LR_X,
        momentum_x: float | Schedule | dict = MOMENTUM,
        momentum_y: float | Schedule | dict | None = None,
        Q: int = 10,
        eta: float = 0.1,
        seed: int = 0,
        upper: Any = None,
    ):
        if int(Q) < 1:
            raise ValueError(f"SUSTAIN needs Q >= 1 (p is drawn in 0..Q-1), got Q={Q}")
        super().__init__(lr_x, lr_y, momentum_x, momentum_y, Q, eta, upper=upper)
        self.seed = int(seed)

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        state = super().init(ctx, xs, ys)
        state["rng"] = initial_state(self.seed)
        return state

    def prepare(self, state: dict[str, Any], t: int) -> None:
        state["p"] = truncation_index(state, self.Q)

    def draw(self, ctx: Context, state: dict[str, Any]) -> tuple:
        """ξ̄ = (B_F, B_0, B_1..B_p) with the truncation index p ~ U{0..Q−1} of ``prepare``."""
        p = state["p"]
        return ctx.fresh_F(), [ctx.fresh_G() for _ in range(p + 1)], p

    def hypergradient(self, xs: T.Leaves, ys: T.Leaves, samples: tuple) -> T.Leaves:
        F, Gs, p = samples
        hg, _ = sampled_neumann_hypergradient(F, replay(Gs[1:]), xs, ys, Q=self.Q, eta=self.eta, p=p,
                                              G_cross=Gs[0])
        return hg
