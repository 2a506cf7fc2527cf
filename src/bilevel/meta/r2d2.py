"""R2D2: ridge-regression differentiable discriminator (Bertinetto, Henriques, Torr & Vedaldi
2019, Sec. 3.2, Eq. 4–6).

The lower problem has a closed form: on support features Φ = φ_x(X_s) (n × d) and one-hot
targets Y (n × N), the ridge head

    W*(x) = argmin_W ‖Φ W − Y‖² + λ ‖W‖² = (ΦᵀΦ + λI_d)^{-1} Φᵀ Y = Φᵀ (ΦΦᵀ + λI_n)^{-1} Y,

the second (Woodbury) form solving an n × n system — cheaper in the few-shot regime n = N·K < d
(Eq. 5). Query logits are α Φ_q W* + β with learned scale α and bias β (Eq. 6); the meta-gradient
differentiates through the solve (``bl.hypergrad.ClosedForm``). λ is learned too
(as log λ), as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..hypergrad import ClosedForm
from .base import MetaLearner, task_loss
from .models import features, one_hot

__all__ = ["R2D2", "ridge_head"]


def ridge_head(phi: Tensor, targets: Tensor, lam: Tensor | float, woodbury: bool | None = None
               ) -> Tensor:
    """W* = (ΦᵀΦ + λI)^{-1}ΦᵀY, via the n × n Woodbury system when ``woodbury`` (default: n < d)."""
    n, d = phi.shape
    if woodbury is None:
        woodbury = n < d
    if woodbury:
        A = phi @ phi.T + lam * torch.eye(n, dtype=phi.dtype, device=phi.device)
        return phi.T @ torch.linalg.solve(A, targets)
    A = phi.T @ phi + lam * torch.eye(d, dtype=phi.dtype, device=phi.device)
    return torch.linalg.solve(A, phi.T @ targets)


class R2D2(MetaLearner):
    """``ways`` N (one-hot targets), ``lam0`` initial λ, ``woodbury`` None = automatic."""

    reference = "Bertinetto, Henriques, Torr & Vedaldi 2019, Sec. 3.2, Eq. 4-6"
    uses_head = False

    def __init__(self, model, *, ways: int, lam0: float = 1.0, woodbury: bool | None = None):
        super().__init__(model, loss="ce", ways=ways)
        if not lam0 > 0:
            raise ValueError(f"R2D2 needs lam0 > 0, got {lam0}")
        self.lam0, self.woodbury = float(lam0), woodbury

    def init(self, generator=None, dtype=torch.float32, device=None) -> Any:
        body = self.model.init(generator, dtype, device)["body"]
        t = next(iter(body.values()))
        return {"body": body, "log_lam": torch.tensor(self.lam0, dtype=dtype, device=device).log(),
                "scale": torch.ones((), dtype=t.dtype, device=t.device),
                "bias": torch.zeros((), dtype=t.dtype, device=t.device)}

    def solve(self, x: Any, task) -> Tensor:
        """The ridge head W*(x) on the task's support set (differentiable in x)."""
        phi = features(x["body"], task["support_x"])
        Y = one_hot(task["support_y"], self.ways, phi.dtype)
        return ridge_head(phi, Y, x["log_lam"].exp(), self.woodbury)

    def _logits(self, x, W, inputs):
        return x["scale"] * (features(x["body"], inputs) @ W) + x["bias"]

    def query_outputs(self, x, task):
        return self._logits(x, self.solve(x, task), task["query_x"])

    # loop path: the closed-form estimator on each task
    def lower(self, task):
        def g(x, W):
            phi = features(x["body"], task["support_x"])
            Y = one_hot(task["support_y"], self.ways, phi.dtype)
            return ((phi @ W - Y) ** 2).sum() + x["log_lam"].exp() * (W ** 2).sum()

        return g

    def upper(self, task):
        return lambda x, W: task_loss("ce", self._logits(x, W, task["query_x"]), task["query_y"])

    def start(self, x: Any) -> Any:
        d = self.model.feature_dim
        t = x["scale"]
        return torch.zeros(d, self.ways, dtype=t.dtype, device=t.device)

    def estimator(self):
        """Backpropagation through the ridge solve on the task's support set (the lower batch);
        built once per learner (its constructor inspects the solve's signature, which a compiled
        meta-step cannot trace)."""
        return self.built_once("_estimator",
                               lambda: ClosedForm(lambda x_, support: self.solve(x_, support)))
