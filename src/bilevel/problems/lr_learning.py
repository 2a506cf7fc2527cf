"""Learning-rate (and momentum) schedule learning by hypergradients (Franceschi et al. 2017).

Franceschi, Donini, Frasconi & Pontil 2017, "Forward and reverse gradient-based hyperparameter
optimization" (ICML), Sec. 2 (the hypergradient of the validation loss after T steps of the training
dynamics, in forward and reverse mode; their experiments tune the learning rate and momentum);
per-step learning-rate and momentum schedules as in Maclaurin, Duvenaud & Adams 2015 (ICML);
survey 2207.11719, Table 2 (hyperparameters as the upper variable).

The lower level is T steps of heavy-ball momentum on a training loss, started at a fixed y_0 = 0,
with a per-step learning rate η_k and momentum β_k read from the upper variable x:

    m_{k+1} = β_k m_k + ∇_y g(y_k),   y_{k+1} = y_k − η_k m_{k+1},   k = 0, ..., T − 1,
    η_k = exp(x["log_lr"][k]),   β_k = σ(x["logit_momentum"][k])      (σ = logistic sigmoid),

    min_x f(x) = L_val(y_T(x)),    g(y) = L_train(y) + (λ/2)‖W‖².

The upper objective is the validation loss of the *T-th iterate*, not of a minimiser: the map
x ↦ y_T(x) is the unrolled dynamics itself, differentiated in forward mode (``Forward``: 2T
directions, memory independent of T) or reverse mode (``Reverse``). The schedule can then use
the finite horizon (large steps where they help, early stopping where the validation loss would
rise); a constant rate cannot.

Model: multinomial logistic regression y = (W, b) on raw pixels in [0, 1] (no standardisation:
the pixel features are ill-conditioned, which is where a schedule matters), cross-entropy,
ridge λ on W. ``momentum="scalar"`` learns one β for all steps, ``"none"`` runs plain GD (x has
``log_lr`` only). Data: the bundled 5000-image MNIST sample (``source="mnist5k"``) or the sklearn
digits, split at random into train / validation / test (held out: never seen by the search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import ConfigError, NonFiniteError
from ..formulation import Bound, Problem
from ..hypergrad.base import solve_lower
from ..inner import GD, Dynamics, Momentum

__all__ = ["LRLearning", "lr_learning", "MOMENTUM_MODES"]

MOMENTUM_MODES = ("per-step", "scalar", "none")


@dataclass
class LRLearning:
    """The problem, its data, the schedule-reading dynamics and helpers to evaluate a schedule."""

    problem: Problem
    x0: dict[str, Tensor]
    y0: dict[str, Tensor]
    dynamics: Dynamics
    steps: int
    momentum: str
    data: dict[str, tuple[Tensor, Tensor]]
    ridge: float
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return ({k: v.clone() for k, v in self.x0.items()}, {k: v.clone() for k, v in self.y0.items()})

    def schedule(self, x: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(η_0..η_{T−1}, β_0..β_{T−1}) of an upper variable (β = 0 without momentum)."""
        with torch.no_grad():
            lrs = x["log_lr"].exp()
            if self.momentum == "none":
                return lrs, torch.zeros_like(lrs)
            b = torch.sigmoid(x["logit_momentum"])
            return lrs, b.expand_as(lrs).clone()

    def train(self, x: Any = None, dynamics: Dynamics | None = None) -> dict[str, Tensor]:
        """y_T: the dynamics (default: the learned schedule bound at ``x``) run from y_0, no graph."""
        dyn = self.dynamics if dynamics is None else dynamics
        bound = Bound(self.problem, x if x is not None else self.x0, self.y0)
        ys, _ = solve_lower(bound, dyn, bound.xs, bound.ys0)
        return bound.y_tree(ys)

    def loss(self, y: dict[str, Tensor], split: str) -> float:
        """Mean cross-entropy of the classifier y on a split (train: without the ridge term)."""
        a, lab = self.data[split]
        with torch.no_grad():
            return float(F.cross_entropy(a @ y["W"] + y["b"], lab))

    def error(self, y: dict[str, Tensor], split: str) -> float:
        a, lab = self.data[split]
        with torch.no_grad():
            return float(((a @ y["W"] + y["b"]).argmax(1) != lab).double().mean())

    def constant(self, lr: float, momentum: float = 0.0) -> Dynamics:
        """The same T steps with a constant rate (and constant momentum; 0 = plain GD)."""
        if momentum:
            return Momentum(lr=lr, momentum=momentum, steps=self.steps)
        return GD(lr=lr, steps=self.steps)

    def grid(self, lrs: list[float], momenta: list[float]) -> list[dict[str, float]]:
        """Every constant (η, β) of the grid: validation / test loss and error of its y_T
        (a diverging rate gets inf)."""
        out = []
        for beta in momenta:
            for lr in lrs:
                row = {"lr": float(lr), "momentum": float(beta)}
                try:
                    y = self.train(dynamics=self.constant(lr, beta))
                except NonFiniteError:  # the rate diverges within T steps
                    y = None
                for split in ("val", "test"):
                    v = self.loss(y, split) if y is not None else math.inf
                    row[f"{split}_loss"] = v if math.isfinite(v) else math.inf
                    row[f"{split}_err"] = self.error(y, split) if y is not None else 1.0
                out.append(row)
        return out


def _load(source: str) -> tuple[np.ndarray, np.ndarray, float]:
    from ..datasets import load

    d = load(source)
    return d.images.astype(np.float64), d.labels.astype(np.int64), float(d.max_value)


def lr_learning(
    steps: int = 20,
    *,
    momentum: str = "per-step",
    source: str = "mnist5k",
    n_train: int = 1000,
    n_val: int = 500,
    n_test: int = 2000,
    ridge: float = 1e-2,
    lr0: float = 0.1,
    momentum0: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> LRLearning:
    """The schedule-learning problem of the module docstring.

    ``steps`` = T inner steps; ``momentum`` ∈ ``MOMENTUM_MODES``; x0: η_k = ``lr0``, β_k =
    ``momentum0`` for every k; ``seed`` fixes the random split.
    """
    if momentum not in MOMENTUM_MODES:
        raise ConfigError(f"momentum must be one of {MOMENTUM_MODES}, got {momentum!r}")
    if int(steps) < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if not lr0 > 0:
        raise ConfigError(f"lr0 must be positive, got {lr0}")
    if momentum != "none" and not 0.0 < momentum0 < 1.0:
        raise ConfigError(f"momentum0 must lie in (0, 1) (it is σ of a logit), got {momentum0}")
    if ridge < 0:
        raise ConfigError(f"ridge must be >= 0, got {ridge}")
    X, lab, vmax = _load(source)
    if min(n_train, n_val, n_test) < 1 or n_train + n_val + n_test > len(lab):
        raise ConfigError(f"split {n_train}/{n_val}/{n_test} does not fit the {source} data "
                          f"({len(lab)} rows)")
    perm = np.random.default_rng(seed).permutation(len(lab))
    cuts = np.cumsum([0, n_train, n_val, n_test])
    data = {}
    for name, lo, hi in zip(("train", "val", "test"), cuts[:-1], cuts[1:]):
        idx = perm[lo:hi]
        data[name] = (torch.as_tensor(X[idx] / vmax, dtype=dtype, device=device),
                      torch.as_tensor(lab[idx], device=device))
    T = int(steps)
    n_classes = int(lab.max()) + 1
    d = X.shape[1]

    def upper(x: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
        a, t = data["val"]
        return F.cross_entropy(a @ y["W"] + y["b"], t)

    def lower(x: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
        a, t = data["train"]
        return F.cross_entropy(a @ y["W"] + y["b"], t) + 0.5 * ridge * (y["W"] ** 2).sum()

    kw = {"dtype": dtype, "device": device}
    x0 = {"log_lr": torch.full((T,), math.log(lr0), **kw)}
    if momentum == "none":
        dyn: Dynamics = GD(lr=lambda x, k: x["log_lr"][k].exp(), steps=T)
    else:
        logit = math.log(momentum0 / (1.0 - momentum0))
        if momentum == "per-step":
            x0["logit_momentum"] = torch.full((T,), logit, **kw)
            beta = lambda x, k: torch.sigmoid(x["logit_momentum"][k])  # noqa: E731
        else:
            x0["logit_momentum"] = torch.tensor(logit, **kw)
            beta = lambda x: torch.sigmoid(x["logit_momentum"])  # noqa: E731
        dyn = Momentum(lr=lambda x, k: x["log_lr"][k].exp(), momentum=beta, steps=T)
    y0 = {"W": torch.zeros(d, n_classes, **kw), "b": torch.zeros(n_classes, **kw)}
    return LRLearning(problem=Problem(upper, lower, name="lr-learning"), x0=x0, y0=y0, dynamics=dyn,
                      steps=T, momentum=momentum, data=data, ridge=ridge,
                      extra={"source": source, "lr0": lr0, "momentum0": momentum0})
