"""MAML and first-order MAML.

Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
Alg. 2 / Eq. 1: with θ the initialization (the upper variable x),

    θ'_i = θ − α ∇_θ L(θ; support_i)   (K such steps),      min_θ  Σ_i L(θ'_i; query_i).

As a bilevel problem: y_i = the task parameters, g_i(x, y) = L(y; support_i) run by ``GD(α, K)``
from y0 = x, f_i(x, y) = L(y; query_i). The second-order meta-gradient differentiates through the
K steps (``bl.hypergrad.Reverse`` with the initialization as the upper variable: Hessian-vector
products through the unroll). FOMAML (Sec. 5.2) drops the second-order terms,
dθ'_i/dθ ≈ I, i.e. ``bl.hypergrad.FirstOrder``: the meta-gradient is ∇L(θ'_i; query_i).
"""

from __future__ import annotations

from typing import Any

from .. import _tree as T
from ..hypergrad import FirstOrder, Reverse
from ..inner import GD
from .base import MetaLearner, adapt, task_loss

__all__ = ["MAML", "FOMAML"]


class MAML(MetaLearner):
    """``lr`` α and ``steps`` K of the inner GD; ``first_order=True`` is FOMAML."""

    reference = "Finn, Abbeel & Levine 2017, Alg. 2, Eq. 1"

    def __init__(self, model, *, lr: float = 0.01, steps: int = 5, loss: str = "ce",
                 ways: int | None = None, first_order: bool = False):
        super().__init__(model, loss=loss, ways=ways)
        self.inner = GD(lr=lr, steps=steps)
        self.first_order = bool(first_order)

    def lower(self, task):
        return lambda x, y: task_loss(self.loss, self.model(y, task["support_x"]), task["support_y"])

    def upper(self, task):
        return lambda x, y: task_loss(self.loss, self.model(y, task["query_x"]), task["query_y"])

    def start(self, x: Any) -> Any:
        return x

    def estimator(self):
        return FirstOrder(self.inner) if self.first_order else Reverse(self.inner)

    def adapted(self, x: Any, task) -> Any:
        """θ'_i (first order: the same value, with dθ'/dθ replaced by the identity)."""
        low = self.lower(task)
        if not self.first_order:
            return adapt(self.inner, low, x, self.start(x))
        y = adapt(self.inner, low, T.unflatten(T.detach(T.flatten(x)[0]), T.flatten(x)[1]),
                  self.start(x))
        xs, spec = T.flatten(x)
        ys = T.flatten(y)[0]
        return T.unflatten(tuple(a + (b - a).detach() for a, b in zip(xs, ys)), spec)

    def query_outputs(self, x, task):
        return self.model(self.adapted(x, task), task["query_x"])


class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017, Sec. 5.2)."""

    reference = "Finn, Abbeel & Levine 2017, Sec. 5.2 (first-order approximation)"

    def __init__(self, model, **kw):
        super().__init__(model, first_order=True, **kw)
