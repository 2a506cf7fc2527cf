"""Meta-SGD (Li, Zhou, Chen & Li 2017, Eq. 3–4): learn the initialization θ *and* a per-parameter
learning rate α (same shape as θ) with one adaptation step

    θ'_i = θ − α ∘ ∇_θ L(θ; support_i),      min_{θ, α} Σ_i L(θ'_i; query_i).

Bilevel form: x = {"init": θ, "lr": α}, y0 = x["init"], inner dynamics
``GD(lr=lambda x: x["lr"], steps=1)`` (a learning rate that is a per-leaf tensor depending on x,
bound by the estimator) differentiated by ``bl.hypergrad.Reverse``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hypergrad import Reverse
from ..inner import GD
from .base import MetaLearner, adapt, task_loss

__all__ = ["MetaSGD"]


class MetaSGD(MetaLearner):
    """``lr0``: the initial value of every per-parameter rate (the paper draws them from
    U[0.005, 0.1]; a constant keeps runs comparable); ``steps``: inner steps (1 in the paper)."""

    reference = "Li, Zhou, Chen & Li 2017, Eq. 3-4"

    def __init__(self, model, *, lr0: float = 0.01, steps: int = 1, loss: str = "ce",
                 ways: int | None = None):
        super().__init__(model, loss=loss, ways=ways)
        self.lr0 = float(lr0)
        self.inner = GD(lr=lambda x: x["lr"], steps=steps)

    def init(self, generator=None, dtype=torch.float32, device=None) -> Any:
        theta = self.model.init(generator, dtype, device)
        rates = torch.utils._pytree.tree_map(lambda t: torch.full_like(t, self.lr0), theta)
        return {"init": theta, "lr": rates}

    def lower(self, task):
        return lambda x, y: task_loss(self.loss, self.model(y, task["support_x"]), task["support_y"])

    def upper(self, task):
        return lambda x, y: task_loss(self.loss, self.model(y, task["query_x"]), task["query_y"])

    def start(self, x: Any) -> Any:
        return x["init"]

    def estimator(self):
        return Reverse(self.inner)

    def query_outputs(self, x, task):
        return self.model(adapt(self.inner, self.lower(task), x, self.start(x)), task["query_x"])
