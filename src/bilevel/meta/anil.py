"""ANIL: almost no inner loop (Raghu, Raghu, Bengio & Vinyals 2020, Sec. 4, "ANIL").

Only the head adapts in the inner loop; the body (feature extractor) is meta-learned but frozen
per task. With x = (body φ, head init w):

    w'_i = w − α ∇_w L(φ, w; support_i)  (K steps),      min_{φ, w} Σ_i L(φ, w'_i; query_i),

a bilevel problem with y = the head, y0 = x["head"], and the second-order meta-gradient through
the K head steps (``bl.hypergrad.Reverse``) reaching both the head init and, through the features
inside g_i, the body.
"""

from __future__ import annotations

from typing import Any

from ..hypergrad import Reverse
from ..inner import GD
from .base import MetaLearner, adapt, task_loss
from .models import features, linear

__all__ = ["ANIL"]


class ANIL(MetaLearner):
    reference = "Raghu, Raghu, Bengio & Vinyals 2020, Sec. 4 (ANIL)"

    def __init__(self, model, *, lr: float = 0.1, steps: int = 5, loss: str = "ce",
                 ways: int | None = None):
        super().__init__(model, loss=loss, ways=ways)
        self.inner = GD(lr=lr, steps=steps)

    def _loss(self, x, head, xs, ys):
        return task_loss(self.loss, linear(head, features(x["body"], xs)), ys)

    def lower(self, task):
        return lambda x, y: self._loss(x, y, task["support_x"], task["support_y"])

    def upper(self, task):
        return lambda x, y: self._loss(x, y, task["query_x"], task["query_y"])

    def start(self, x: Any) -> Any:
        return x["head"]

    def estimator(self):
        return Reverse(self.inner)

    def query_outputs(self, x, task):
        head = adapt(self.inner, self.lower(task), x, self.start(x))
        return linear(head, features(x["body"], task["query_x"]))
