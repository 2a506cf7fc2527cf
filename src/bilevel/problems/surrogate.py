"""Surrogate-loss learning for F1 on an imbalanced binary split (Grabocka, Scholz & Schmidt-Thieme
2019, "Learning surrogate losses", arXiv 1905.10108; survey 2207.11719, Table 2).

Grabocka et al. learn a set-wise surrogate network ℓ̂_θ that regresses the true (non-differentiable,
non-decomposable) metric on mini-batches of predictions, and train the model on ℓ̂_θ, alternating
the two fits. Here the same idea is posed as one bilevel problem with an explicit metric
relaxation in the upper level (our choice, stated in docs/survey.md):

    x = θ = (b, m_0, m_1),   ℓ_θ(s, y) = c_y(b) · softplus(m_y − σ_y s),   σ_y = 2y − 1,
    c_1 = 2 sigmoid(b),  c_0 = 2 − c_1 = 2 sigmoid(−b),
    y*(θ) = argmin_w g(θ, w) = (1/n) Σ_i ℓ_θ(a_iᵀw, y_i) + reg‖w‖²          (train),
    f(θ, w) = 1 − F̃1(w) = 1 − 2 Σ_k p_k y_k / (Σ_k p_k + Σ_k y_k),  p_k = sigmoid(a_kᵀw / τ)   (validation).

ℓ_θ is a per-class weighted, margin-shifted logistic loss: θ = 0 is the binary cross-entropy, so the
search starts at the baseline; the class weights c_y ∈ (0, 2) trade false positives against false
negatives (their sum is fixed, so θ cannot simply rescale the loss against the ridge, and the lower
curvature stays within twice the cross-entropy's) and m_y sets the margin each class must clear.
F̃1 is the usual soft-F1 relaxation (counts of a threshold-0 classifier replaced by probabilities),
→ F1 as τ → 0. g is strongly convex in w for every θ, so
implicit differentiation applies; the model is linear with a bias (the last feature is 1).

Data (:func:`f1_data`): the bundled MNIST sample via :func:`bilevel.problems.labels.label_data`
(clean split, pooled, standardised), relabelled "digit ``positive``" vs the rest, positives of each
split subsampled to ``pos_fraction``. Evaluation: F1 and accuracy of the threshold-0 classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import softplus

from ..errors import ConfigError
from ..formulation import Problem
from ._stochastic import lbfgs_lower
from .labels import label_data

__all__ = ["F1Data", "SurrogateProblem", "f1_data", "surrogate_loss", "f1_score", "soft_f1"]


@dataclass
class F1Data:
    """Features (bias column last) and binary labels of the train / validation / test splits."""

    A: Tensor
    y: Tensor
    A_val: Tensor
    y_val: Tensor
    A_test: Tensor
    y_test: Tensor
    info: dict[str, Any] = field(default_factory=dict)


def f1_score(scores: Tensor, y: Tensor, threshold: float = 0.0) -> float:
    """F1 of the positive class for the classifier "positive iff score > threshold"."""
    pred = scores > threshold
    tp = float((pred & (y > 0.5)).sum())
    denom = float(pred.sum()) + float((y > 0.5).sum())
    return 2 * tp / denom if denom > 0 else 0.0


def soft_f1(scores: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """F̃1 = 2 Σ p y / (Σ p + Σ y), p = sigmoid(score / τ) (module docstring)."""
    p = torch.sigmoid(scores / temperature)
    return 2 * (p * y).sum() / (p.sum() + y.sum())


def f1_data(
    positive: int = 3,
    *,
    pos_fraction: float = 0.03,
    n_train: int = 2000,
    n_val: int = 1500,
    n_test: int = 1500,
    pool: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> F1Data:
    """ "Digit ``positive``" vs the rest; each split keeps all negatives and enough positives for a
    positive fraction ``pos_fraction`` (n_* are the sizes before subsampling the positives)."""
    if not 0 <= int(positive) <= 9:
        raise ConfigError(f"positive must be a digit 0..9, got {positive}")
    if not 0.0 < pos_fraction <= 0.1:
        raise ConfigError(
            f"pos_fraction must be in (0, 0.1] (MNIST has 10% of each digit), got {pos_fraction}"
        )
    d = label_data(
        "noise", noise=0.0, n_train=n_train, n_val=n_val, n_test=n_test, pool=pool, seed=seed, dtype=dtype
    )
    rng = np.random.default_rng(seed + 7)

    def split(A: Tensor, lab: Tensor) -> tuple[Tensor, Tensor]:
        pos = np.flatnonzero(lab.numpy() == positive)
        neg = np.flatnonzero(lab.numpy() != positive)
        k = max(1, int(round(pos_fraction * len(neg) / (1 - pos_fraction))))
        keep = np.sort(np.concatenate([neg, rng.permutation(pos)[:k]]))
        idx = torch.from_numpy(keep)
        return A[idx].to(device), (lab[idx] == positive).to(device=device, dtype=dtype)

    (A, y), (Av, yv), (At, yt) = (
        split(d.A, d.labels),
        split(d.A_val, d.labels_val),
        split(d.A_test, d.labels_test),
    )
    return F1Data(
        A,
        y,
        Av,
        yv,
        At,
        yt,
        info={
            "positive": int(positive),
            "n_train": len(y),
            "n_val": len(yv),
            "n_test": len(yt),
            "positives": [int(v.sum()) for v in (y, yv, yt)],
        },
    )


@dataclass
class SurrogateProblem:
    """The surrogate-loss bilevel problem; ``fit(theta)`` = y*(θ) by L-BFGS (float64)."""

    problem: Problem
    x0: Tensor
    y0: Tensor
    data: F1Data
    reg: float
    temperature: float

    def start(self) -> tuple[Tensor, Tensor]:
        return self.x0.clone(), self.y0.clone()

    def fit(self, theta: Tensor) -> Tensor:
        th = theta.detach().double()
        A, y = self.data.A.double(), self.data.y.double()
        z0 = torch.zeros(A.shape[1], dtype=torch.float64, device=A.device)
        w = lbfgs_lower(lambda w: surrogate_value(th, A @ w, y) + self.reg * (w * w).sum(), z0, tol=1e-8)
        return w.to(self.y0.dtype)

    def metrics(self, w: Tensor, split: str = "test") -> dict[str, float]:
        A, y = (self.data.A_test, self.data.y_test) if split == "test" else (self.data.A_val, self.data.y_val)
        with torch.no_grad():
            s = A @ w
            return {
                f"{split}_f1": f1_score(s, y),
                f"{split}_acc": float(((s > 0).to(y.dtype) == y).double().mean()),
            }


def surrogate_value(theta: Tensor, scores: Tensor, y: Tensor) -> Tensor:
    """(1/n) Σ_i c_{y_i} softplus(m_{y_i} − σ_i s_i), c_y = 2 sigmoid(σ_y b), θ = (b, m_0, m_1)."""
    sign = 2 * y - 1
    c = 2 * torch.sigmoid(sign * theta[0])
    m = theta[1] + (theta[2] - theta[1]) * y
    return (c * softplus(m - sign * scores)).mean()


def surrogate_loss(data: F1Data, *, reg: float = 1e-2, temperature: float = 0.3) -> SurrogateProblem:
    """The bilevel problem of the module docstring, θ0 = 0 (cross-entropy), w0 = 0."""
    if not reg > 0:
        raise ConfigError(f"reg must be positive (strongly convex lower level), got {reg}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    reg_f, tau = float(reg), float(temperature)

    def g(theta: Tensor, w: Tensor) -> Tensor:
        return surrogate_value(theta, data.A @ w, data.y) + reg_f * (w * w).sum()

    def f(theta: Tensor, w: Tensor) -> Tensor:
        return 1 - soft_f1(data.A_val @ w, data.y_val, tau)

    dtype = data.A.dtype
    return SurrogateProblem(
        Problem(upper=f, lower=g, name="surrogate-loss"),
        torch.zeros(3, dtype=dtype, device=data.A.device),
        torch.zeros(data.A.shape[1], dtype=dtype, device=data.A.device),
        data,
        reg_f,
        tau,
    )
