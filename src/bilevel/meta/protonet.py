"""Prototypical networks (Snell, Swersky & Zemel 2017, Eq. 1–2): the non-bilevel baseline.

Class prototypes are mean support embeddings, c_k = (1/|S_k|) Σ_{(x, y) ∈ S_k} φ(x), and a query
is classified by a softmax over negative squared Euclidean distances, p(y = k | x) ∝
exp(−‖φ(x) − c_k‖²). There is no lower problem to solve; the meta-gradient is plain
backpropagation (the loop path is the same loss differentiated one task at a time).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as Fn

from ..errors import StructureMismatchError
from .base import MetaLearner
from .models import features, one_hot

__all__ = ["ProtoNet"]


class ProtoNet(MetaLearner):
    reference = "Snell, Swersky & Zemel 2017, Eq. 1-2"
    uses_head = False

    def __init__(self, model, *, ways: int):
        super().__init__(model, loss="ce", ways=ways)

    def init(self, generator=None, dtype=torch.float32, device=None) -> Any:
        return {"body": self.model.init(generator, dtype, device)["body"]}

    def check(self, tasks):
        """Every class needs at least one support example (its prototype is a mean)."""
        tasks = super().check(tasks)
        counts = Fn.one_hot(tasks["support_y"], self.ways).sum(1)  # (B, N)
        empty = torch.nonzero(counts == 0)
        if len(empty):
            i, k = (int(v) for v in empty[0])
            raise StructureMismatchError(f"task {i}: field 'support_y' has no example of class {k}; "
                                         "every class needs a support example for its prototype")
        return tasks

    def query_outputs(self, x, task):
        s = features(x["body"], task["support_x"])
        onehot = one_hot(task["support_y"], self.ways, s.dtype)  # (n, N)
        protos = (onehot.T @ s) / onehot.sum(0)[:, None]
        q = features(x["body"], task["query_x"])
        return -((q[:, None, :] - protos[None]) ** 2).sum(-1)

    def estimator(self):
        return None  # no lower problem: the query loss is differentiated directly
