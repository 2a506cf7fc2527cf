"""Label learning (soft labels as x) and Meta-Weight-Net sample reweighting on noisy and on
class-imbalanced splits of the bundled MNIST sample (survey 2207.11719, Table 2, "data-centric"
upper variables).

Data (:func:`label_data`): the 5,000-image sample :func:`bilevel.datasets.mnist5k`, average-pooled
by ``pool`` (2: 14×14 pixels), cut into disjoint stratified train / validation / test sets by
:func:`bilevel.datasets.split_indices`, standardised with the training mean and standard
deviation, plus a constant bias feature. Two kinds of split:

* ``"noise"``: a fraction ``noise`` of the training labels is replaced by a wrong class
  (:func:`bilevel.datasets.corrupt_labels`, uniform over the 9 wrong classes);
* ``"imbalance"``: long-tailed training classes, n_c = ⌊n_max · ρ^(−c/9)⌉ samples of class c
  (ρ = ``imbalance`` = n_0 / n_9, as the long-tailed splits of Shu et al. 2019, Sec. 4.1).

Validation (the upper level's data) and test sets are clean and balanced. The lower variable is a
linear softmax classifier Z ∈ R^{(d+1)×10} (last row: bias), CE the softmax cross-entropy, and
reg‖Z‖² makes every lower problem strongly convex.

**Label learning** (:func:`label_learning`): x ∈ R^{n×10} are per-sample label logits,

    g(x, Z) = (1/n) Σ_i CE(softmax(x_i); Z, a_i) + reg‖Z‖²,    f(x, Z) = (1/m) Σ_k CE(e_{ℓ_k}; Z, a_k),

x0 = κ · onehot(observed label). A training label is *detected* as noisy when its relative
confidence p_i / mean_j p_j falls below ``threshold`` (1/2), p_i = softmax(x_i)[observed label].

**Meta-Weight-Net** (Shu et al. 2019, "Meta-Weight-Net: learning an explicit mapping for sample
weighting", NeurIPS, Eq. 2–4 and Alg. 1): x = parameters of an MLP V(·; x): R → (0, 1) with one
hidden ReLU layer, mapping a sample's current loss to its weight,

    g(x, Z) = (1/n) Σ_i ŵ_i CE(Z; a_i, ℓ̃_i) + reg‖Z‖²,   ŵ_i = V(sg[CE_i(Z)]; x) / mean_j V(sg[CE_j(Z)]; x),

with sg = stop-gradient: the loss enters the weight net as data, as in the authors' code
(``vnet(cost.data)``), so ∇_Z g = (1/n) Σ ŵ_i ∇CE_i + 2 reg Z is MW-Net's weighted step. The
weights are normalised to mean 1, so the loss scale cannot drift against reg. One warm-started
GD step differentiated in reverse mode (``Reverse(GD(lr=α, steps=1))``) is Alg. 1's look-ahead
ŵ(Θ) exactly; more steps
and implicit estimators differentiate the same dynamics with the weights' loss input held fixed
(sg): an approximation beyond one step, stated in docs/survey.md. A sample is detected as noisy
when ŵ_i < ``threshold`` (1/2).

Evaluation: test accuracy of a classifier; :meth:`LabelProblem.refit` gives Z*(x) (L-BFGS to
max|∇| ≤ 1e-7 on the frozen soft labels / weights); the *uninformed baseline* is plain training
on the observed labels with uniform weights (:meth:`LabelProblem.baseline`); detection F1 is
against the true corruption mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..datasets import corrupt_labels, mnist5k, split_indices
from ..errors import ConfigError
from ..formulation import Problem
from ._stochastic import lbfgs_lower

__all__ = [
    "LabelData",
    "LabelProblem",
    "label_data",
    "label_learning",
    "meta_weight_net",
    "weight_net",
    "detection_scores",
    "soft_cross_entropy",
]

KINDS = ("noise", "imbalance")


@dataclass
class LabelData:
    """Features (with bias column) and labels of the three splits; ``noisy`` marks corrupted
    training labels (all False for the imbalanced split); ``clean`` are the true training labels."""

    A: Tensor
    labels: Tensor
    clean: Tensor
    noisy: Tensor
    A_val: Tensor
    labels_val: Tensor
    A_test: Tensor
    labels_test: Tensor
    n_classes: int
    kind: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        return int(self.A.shape[1])

    def accuracy(self, Z: Tensor, split: str = "test") -> float:
        A, lab = (self.A_test, self.labels_test) if split == "test" else (self.A_val, self.labels_val)
        with torch.no_grad():
            return float(((A @ Z.to(A.dtype)).argmax(1) == lab).double().mean())


def _pool(images: np.ndarray, side: int, pool: int) -> np.ndarray:
    """Average-pool square images (n, side²) by ``pool`` × ``pool`` blocks."""
    if side % pool:
        raise ConfigError(f"pool={pool} must divide the image side {side}")
    n, s = len(images), side // pool
    return images.reshape(n, s, pool, s, pool).mean(axis=(2, 4)).reshape(n, s * s)


def label_data(
    kind: str = "noise",
    *,
    noise: float | None = None,
    imbalance: float = 50.0,
    n_train: int = 1000,
    n_val: int = 100,
    n_test: int = 1000,
    pool: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> LabelData:
    """The noisy (``kind="noise"``) or long-tailed (``"imbalance"``) split of the module docstring.

    With ``"imbalance"``, ``n_train`` is the size of the largest class (n_max). ``noise`` (None:
    0.4 for ``"noise"``, 0 for ``"imbalance"``) is the fraction of corrupted training labels."""
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if noise is None:
        noise = 0.4 if kind == "noise" else 0.0
    if not 0.0 <= noise < 0.9:
        raise ConfigError(
            f"noise must be in [0, 0.9) (above 0.9 the wrong class is the majority), got {noise}"
        )
    if kind == "imbalance" and not imbalance >= 1.0:
        raise ConfigError(f"imbalance ratio n_0/n_9 must be >= 1, got {imbalance}")
    if min(n_train, n_val, n_test) < 1 or pool < 1:
        raise ConfigError(
            f"n_train, n_val, n_test and pool must be positive, got {n_train}, {n_val}, {n_test}, {pool}"
        )
    d = mnist5k()
    X, y, C = d.images.astype(np.float64) / d.max_value, d.labels, d.n_classes
    X = _pool(X, 28, pool)
    per_class = np.bincount(y, minlength=C).min()
    if kind == "noise":
        if n_train + n_val + n_test > len(y):
            raise ConfigError(f"split {n_train}/{n_val}/{n_test} does not fit the {len(y)} images")
        tr, va, te = split_indices(y, [n_train, n_val, n_test], seed=seed)
    else:
        counts = np.rint(n_train * float(imbalance) ** (-np.arange(C) / (C - 1))).astype(int).clip(1)
        if n_train + (n_val + n_test) // C + 1 > per_class:
            raise ConfigError(
                f"n_max={n_train} plus validation/test shares exceed {per_class} images per class"
            )
        va, te, rest = split_indices(y, [n_val, n_test, len(y) - n_val - n_test], seed=seed)
        rng = np.random.default_rng(seed)
        tr = np.concatenate([rng.permutation(rest[y[rest] == c])[: counts[c]] for c in range(C)])
        tr = rng.permutation(tr)
    y_tr_clean = y[tr].astype(np.int64)
    if noise > 0:
        y_tr, mask = corrupt_labels(y_tr_clean, noise, C, seed=seed + 1)
    else:
        y_tr, mask = y_tr_clean.copy(), np.zeros(len(tr), dtype=bool)
    mean, std = X[tr].mean(0), X[tr].std(0)
    std[std == 0] = 1.0

    def prep(rows: np.ndarray) -> Tensor:
        Z = (X[rows] - mean) / std
        return torch.from_numpy(np.hstack([Z, np.ones((len(rows), 1))])).to(device=device, dtype=dtype)

    def lab(v: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(v, dtype=np.int64)).to(device)

    return LabelData(
        A=prep(tr),
        labels=lab(y_tr),
        clean=lab(y_tr_clean),
        noisy=torch.from_numpy(mask).to(device),
        A_val=prep(va),
        labels_val=lab(y[va]),
        A_test=prep(te),
        labels_test=lab(y[te]),
        n_classes=C,
        kind=kind,
        info={
            "n_train": len(tr),
            "n_val": len(va),
            "n_test": len(te),
            "pool": pool,
            "class_counts": np.bincount(y_tr_clean, minlength=C).tolist(),
            "noise_fraction": float(mask.mean()) if len(mask) else 0.0,
        },
    )


def soft_cross_entropy(Z: Tensor, A: Tensor, targets: Tensor) -> Tensor:
    """Per-sample CE(t_i; Z, a_i) = −Σ_c t_ic log softmax(a_i Z)_c for soft targets t (n × C)."""
    return -(targets * torch.log_softmax(A @ Z, dim=1)).sum(1)


def _hard_ce(Z: Tensor, A: Tensor, labels: Tensor) -> Tensor:
    logits = A @ Z
    return torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None])[:, 0]


def weight_net(x: dict[str, Tensor], loss: Tensor) -> Tensor:
    """V(ℓ; x) = σ(w2ᵀ relu(w1 ℓ + b1) + b2), applied to each entry of ``loss`` (Shu et al. 2019,
    the 1-100-1 MLP of Sec. 4; here the hidden width is a setting)."""
    h = torch.relu(loss[:, None] * x["w1"] + x["b1"])
    return torch.sigmoid(h @ x["w2"] + x["b2"])  # (n,)


def detection_scores(scores: Tensor, noisy: Tensor, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of "noisy = score < threshold" against the true mask ``noisy``."""
    pred = scores < threshold
    tp = float((pred & noisy).sum())
    prec = tp / max(float(pred.sum()), 1.0)
    rec = tp / max(float(noisy.sum()), 1.0)
    f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return {
        "det_precision": prec,
        "det_recall": rec,
        "det_f1": f1,
        "det_fraction": float(pred.double().mean()),
    }


@dataclass
class LabelProblem:
    """A label-learning or Meta-Weight-Net problem on :class:`LabelData`.

    ``scores(x, Z)``: per-sample relative confidence / normalised weight (the detection score);
    ``refit(x, Z)``: Z*(x) from scratch with the soft labels / weights frozen (weights evaluated at
    the losses of Z); ``baseline()``: plain training on the observed labels."""

    method: str
    problem: Problem
    x0: Any
    y0: Tensor
    data: LabelData
    reg: float
    threshold: float
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> tuple[Any, Tensor]:
        x = {k: v.clone() for k, v in self.x0.items()} if isinstance(self.x0, dict) else self.x0.clone()
        return x, self.y0.clone()

    def sample_weights(self, x: Any, Z: Tensor) -> Tensor:
        """The per-sample weights of the lower loss (label learning: all 1)."""
        if self.method == "label-learning":
            return torch.ones_like(self.data.labels, dtype=self.y0.dtype)
        with torch.no_grad():
            v = weight_net(x, _hard_ce(Z, self.data.A, self.data.labels))
        return v / v.mean()

    def targets(self, x: Any) -> Tensor:
        if self.method == "label-learning":
            return torch.softmax(x.detach(), dim=1)
        return torch.nn.functional.one_hot(self.data.labels, self.data.n_classes).to(self.y0.dtype)

    def scores(self, x: Any, Z: Tensor) -> Tensor:
        if self.method == "label-learning":
            p = self.targets(x).gather(1, self.data.labels[:, None])[:, 0]
            return p / p.mean()
        return self.sample_weights(x, Z)

    def refit(
        self, x: Any, Z: Tensor | None = None, *, weights: Tensor | None = None, targets: Tensor | None = None
    ) -> Tensor:
        d = self.data
        w = self.sample_weights(x, Z if Z is not None else self.y0) if weights is None else weights
        t = self.targets(x) if targets is None else targets
        w, t, A = w.double(), t.double(), d.A.double()

        def g(Zv: Tensor) -> Tensor:
            return torch.dot(w, soft_cross_entropy(Zv, A, t)) / d.n + self.reg * (Zv * Zv).sum()

        z0 = torch.zeros(d.dim, d.n_classes, dtype=torch.float64, device=A.device)
        return lbfgs_lower(g, z0, tol=1e-7).to(self.y0.dtype)

    def baseline(self) -> Tensor:
        """Plain training on the observed labels, uniform weights (the uninformed baseline)."""
        d = self.data
        hard = torch.nn.functional.one_hot(d.labels, d.n_classes).to(self.y0.dtype)
        return self.refit(None, weights=torch.ones_like(d.labels, dtype=self.y0.dtype), targets=hard)


def _upper(data: LabelData):
    def f(x: Any, Z: Tensor) -> Tensor:
        return _hard_ce(Z, data.A_val, data.labels_val).mean()

    return f


def label_learning(
    data: LabelData, *, reg: float = 1e-3, init_logit: float = 3.0, threshold: float = 0.5
) -> LabelProblem:
    """Soft labels as the upper variable (module docstring); x0 = ``init_logit`` · onehot(label)."""
    if not reg > 0:
        raise ConfigError(f"reg must be positive (strongly convex lower level), got {reg}")
    A, n, C = data.A, data.n, data.n_classes
    reg_f = float(reg)

    def g(x: Tensor, Z: Tensor) -> Tensor:
        return soft_cross_entropy(Z, A, torch.softmax(x, dim=1)).mean() + reg_f * (Z * Z).sum()

    x0 = float(init_logit) * torch.nn.functional.one_hot(data.labels, C).to(A.dtype)
    return LabelProblem(
        "label-learning",
        Problem(upper=_upper(data), lower=g, name="label-learning"),
        x0,
        torch.zeros(data.dim, C, dtype=A.dtype, device=A.device),
        data,
        reg_f,
        float(threshold),
        {"init_logit": float(init_logit), "n": n},
    )


def meta_weight_net(
    data: LabelData, *, hidden: int = 32, reg: float = 1e-3, threshold: float = 0.5, seed: int = 0
) -> LabelProblem:
    """Meta-Weight-Net (module docstring): x = the weight net's parameters (``hidden`` ReLU units),
    initialised with PyTorch's default linear-layer rule (uniform ±1/√fan_in), seeded."""
    if not reg > 0:
        raise ConfigError(f"reg must be positive (strongly convex lower level), got {reg}")
    if hidden < 1:
        raise ConfigError(f"hidden must be >= 1, got {hidden}")
    A, lab, C = data.A, data.labels, data.n_classes
    reg_f = float(reg)
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, bound: float) -> Tensor:
        u = 2 * torch.rand(*shape, generator=gen, dtype=torch.float64) - 1
        return u.mul(bound).to(device=A.device, dtype=A.dtype)

    x0 = {
        "w1": uniform(hidden, bound=1.0),
        "b1": uniform(hidden, bound=1.0),
        "w2": uniform(hidden, bound=hidden**-0.5),
        "b2": uniform(1, bound=hidden**-0.5),
    }

    def g(x: dict[str, Tensor], Z: Tensor) -> Tensor:
        ce = _hard_ce(Z, A, lab)
        v = weight_net(x, ce.detach())
        return torch.dot(v / v.mean(), ce) / ce.shape[0] + reg_f * (Z * Z).sum()

    return LabelProblem(
        "meta-weight-net",
        Problem(upper=_upper(data), lower=g, name="meta-weight-net"),
        x0,
        torch.zeros(data.dim, C, dtype=A.dtype, device=A.device),
        data,
        reg_f,
        float(threshold),
        {"hidden": hidden},
    )
