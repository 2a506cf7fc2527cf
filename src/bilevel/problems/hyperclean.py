"""Data hyper-cleaning on MNIST (Franceschi et al. 2017; benchopt's bilevel benchmark protocol as
in Dagréou et al. 2022, sec. 4): learn one weight σ(x_i) per (possibly corrupted) training sample.

    g(x, Z) = (1/n) Σ_i σ(x_i) CE(Z; a_i, ℓ_i) + reg ‖Z‖²      (train, corrupted labels)
    f(x, Z) = (1/m) Σ_k CE(Z; a_k, ℓ_k)                         (clean validation)

Z ∈ R^{10×784} is a linear classifier (no bias) stored classes first, as ``nn.Linear(784, 10)``
stores its weight (logits of a row a: Z a); CE the softmax cross-entropy, reg = 0.2,
x0 = −2 (every weight σ(−2) ≈ 0.12), Z0 = 0. Pixels are standardised with the training mean and
standard deviation (constant pixels: scale 1), as sklearn's StandardScaler does.

**The one hyper-cleaning data pipeline** is :func:`hyperclean_data` (also behind ``bilevel run
hyperclean`` and ``hyperclean-table``): stratified disjoint train / validation / test splits
(:func:`bilevel.datasets.split_indices`; the test rows come from the data set's official test
split when it has one), exactly round(corruption·n) training labels redrawn uniformly among the
*wrong* classes (:func:`bilevel.datasets.corrupt_labels`), pixels in [0, 1] normalised with
training statistics (``scale``: ``"standardize"``, ``"center"`` or ``"none"``).

Data of :func:`hyperclean`: ``source="mnist"`` — 20,000 train / 5,000 validation rows drawn from
the official MNIST training set, test = 10,000 official test images (benchopt's split; needs the
IDX files, see :func:`bilevel.datasets.mnist`); ``source="mnist5k"`` — a 3000 / 1000 / 1000 split
of the bundled 5,000-image sample :func:`bilevel.datasets.mnist5k` (offline default); ``"auto"``
— full MNIST when its files are present, else the 5k sample.

A lower batch is ``(A_b, labels_b, index_b)`` (index_b selects the weights x_i of the batch), an
upper batch ``(A_b, labels_b)``. Evaluation (float64): Z*(x) by L-BFGS to max|∇g| ≤ 1e-8 (warm-started),
∇h(x) by CG on the full data at Z*, test error of a classifier Z on the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import datasets
from ..errors import ConfigError
from ..formulation import Problem
from ._stochastic import StochasticProblem, implicit_hypergrad, lbfgs_lower, make_sampler

__all__ = ["hyperclean", "hyperclean_data", "HypercleanData"]

SPLITS = {"mnist5k": (3000, 1000, 1000), "mnist": (20000, 5000, 10000)}
#: data sets with an official test split (the test rows are drawn from it)
_HAS_TEST_SPLIT = ("mnist", "fashion-mnist")


@dataclass
class HypercleanData:
    """Disjoint train / validation / test splits; ``corrupted`` marks the flipped training labels."""

    X_train: Tensor
    y_train: Tensor  # noisy labels (what the lower level sees)
    y_train_true: Tensor
    corrupted: Tensor  # bool
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    n_classes: int

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> HypercleanData:
        """The same splits on ``device``; the features (not the labels) in ``dtype``."""
        def mv(t: Tensor, feat: bool) -> Tensor:
            return t.to(device=device, dtype=dtype if feat else None)

        return HypercleanData(mv(self.X_train, True), mv(self.y_train, False), mv(self.y_train_true, False),
                              mv(self.corrupted, False), mv(self.X_val, True), mv(self.y_val, False),
                              mv(self.X_test, True), mv(self.y_test, False), self.n_classes)


def hyperclean_data(
    dataset: str = "mnist5k",
    n_train: int = 2000,
    n_val: int = 1000,
    n_test: int = 2000,
    corruption: float = 0.5,
    seed: int = 0,
    *,
    scale: str = "center",
    root: str | Path | None = None,
    download: bool = False,
    dtype: torch.dtype = torch.float32,
) -> HypercleanData:
    """The hyper-cleaning data: stratified disjoint splits of ``dataset`` (test rows from its
    official test split when it has one), ``corruption``·n training labels redrawn among the
    wrong classes (seeded), pixels in [0, 1] normalised by the training rows (``scale``)."""
    if not 0.0 <= float(corruption) <= 1.0:
        raise ConfigError(f"corruption must be in [0, 1], got {corruption}")
    if scale not in ("center", "standardize", "none"):
        raise ConfigError(f"scale must be 'center', 'standardize' or 'none', got {scale!r}")
    key = dataset.lower().replace("_", "-")
    kw = {"root": root or None, "download": download} if key in _HAS_TEST_SPLIT else {}
    pool = datasets.load(key, **kw)
    test = datasets.load(key, split="test", **kw) if key in _HAS_TEST_SPLIT else None
    need = n_train + n_val + (n_test if test is None else 0)
    if min(n_train, n_val, n_test) < 1 or need > len(pool) or (test is not None and n_test > len(test)):
        raise ConfigError(
            f"split {n_train}/{n_val}/{n_test} does not fit the {dataset} data: each must be >= 1 and "
            f"n_train + n_val{'' if test else ' + n_test'} = {need} must be in [2, {len(pool)}]"
            + (f" ({len(test)} test rows)" if test else ""))
    if test is None:
        tr, va, te = datasets.split_indices(pool.labels, [n_train, n_val, n_test], seed=seed)
    else:
        tr, va = datasets.split_indices(pool.labels, [n_train, n_val], seed=seed)
        (te,) = datasets.split_indices(test.labels, [n_test], seed=seed + 1)
    noisy, mask = datasets.corrupt_labels(pool.labels[tr], corruption, pool.n_classes, seed=seed)
    X, y = pool.features(dtype), pool.targets()
    Xt, yt = (X, y) if test is None else (test.features(dtype), test.targets())
    Xtr = X[torch.from_numpy(tr)]
    shift = Xtr.mean(0) if scale != "none" else torch.zeros(X.shape[1], dtype=dtype)
    div = torch.ones_like(shift)
    if scale == "standardize":
        div = Xtr.std(0, unbiased=False)
        div[div == 0] = 1.0

    def part(A: Tensor, labels: Tensor, idx) -> tuple[Tensor, Tensor]:
        i = torch.from_numpy(idx)
        return (A[i] - shift) / div, labels[i]

    Xtr, ytr_true = part(X, y, tr)
    Xva, yva = part(X, y, va)
    Xte, yte = part(Xt, yt, te)
    return HypercleanData(Xtr, torch.from_numpy(noisy), ytr_true, torch.from_numpy(mask), Xva, yva, Xte,
                          yte, pool.n_classes)


def _cross_entropy(Z: Tensor, A: Tensor, labels: Tensor) -> Tensor:
    """Per-sample softmax cross-entropy of the linear classifier Z (10 × 784) on rows A (vector of
    length b).

    Computed on transposed logits Z Aᵀ (10 × b, Aᵀ a view): every matrix product of the forward,
    backward and double-backward passes then has the 10 classes as its row dimension, which
    single-threaded BLAS handles several times faster than the b × 10 layout; the gradient of Z
    comes out of its product (∂lt Aᵀᵀ = ∂lt A) in Z's own row-major layout, so the iterate updates
    read every operand in one order. (With Z stored 784 × 10 and used as Zᵀ, each update of a
    compiled step transposed the gradient; a contiguous copy of Aᵀ cost more than the product:
    docs/performance.md.)
    """
    lt = Z @ A.T
    return torch.logsumexp(lt, 0) - lt.gather(0, labels[None])[0]


def _source(source: str) -> str:
    """The data set :func:`hyperclean` uses for ``source`` ("auto": full MNIST if present)."""
    if source not in ("mnist", "mnist5k", "auto"):
        raise ValueError(f"source must be 'mnist5k', 'mnist' or 'auto', got {source!r}")
    if source != "auto":
        return source
    try:
        datasets.load("mnist")
        return "mnist"
    except OSError:
        return "mnist5k"


def hyperclean(
    corruption: float = 0.5,
    *,
    source: str = "auto",
    root: str | Path | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    reg: float = 0.2,
    x_init: float = -2.0,
    batch_size: int = 64,
    seed: int = 0,
    sampler: str = "minibatch",
    dtype: torch.dtype = torch.float32,
) -> StochasticProblem:
    """Build the hyper-cleaning problem (see module docstring).

    ``corruption`` ∈ [0, 1]: fraction of training labels replaced by a wrong class (benchopt uses
    0.5, 0.7, 0.9). ``n_train``/``n_val``/``n_test`` override the split sizes of the source.
    ``seed`` fixes the split, the corruption and the samplers.
    """
    if not 0.0 <= corruption <= 1.0:
        raise ValueError(f"corruption must be in [0, 1], got {corruption}")
    if not reg > 0:
        raise ValueError(f"reg must be positive (strongly convex lower level), got {reg}")
    used = _source(source)
    d_train, d_val, d_test = SPLITS[used]
    n_tr = d_train if n_train is None else int(n_train)
    n_va = d_val if n_val is None else int(n_val)
    n_te = d_test if n_test is None else int(n_test)
    try:
        data = hyperclean_data(used, n_tr, n_va, n_te, corruption, seed, scale="standardize", root=root,
                               dtype=torch.float64)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    A64, Av64, At64 = data.X_train, data.X_val, data.X_test
    l_tr, l_va, l_te = data.y_train, data.y_val, data.y_test
    idx = torch.arange(n_tr)
    lower = (A64.to(dtype), l_tr, idx)
    upper = (Av64.to(dtype), l_va)
    n_feat, n_cls = A64.shape[1], 10
    reg_f = float(reg)

    def g(x: Tensor, Z: Tensor, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        A, lab, i = batch
        ce = _cross_entropy(Z, A, lab)
        return torch.dot(torch.sigmoid(x.index_select(0, i)), ce) / ce.shape[0] + reg_f * (Z * Z).sum()

    def f(x: Tensor, Z: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        A, lab = batch
        return _cross_entropy(Z, A, lab).mean()

    full64_lower: Any = (A64, l_tr, idx)
    full64_upper: Any = (Av64, l_va)
    problem = Problem(upper=f, lower=g, name="hyperclean")

    def z_star64(x64: Tensor, z_init: Tensor | None) -> Tensor:
        """Z*(x) in float64 by L-BFGS on the full lower data (from z_init, else Z = 0)."""
        z0 = torch.zeros(n_cls, n_feat, dtype=torch.float64) if z_init is None else z_init.double()
        return lbfgs_lower(lambda Z: g(x64, Z, full64_lower), z0, tol=1e-8)

    def y_star(x: Tensor, z_init: Tensor | None = None) -> Tensor:
        return z_star64(x.double(), z_init).to(dtype)

    def hypergrad(x: Tensor, z_init: Tensor | None = None) -> Tensor:
        x64 = x.double()
        z = z_star64(x64, z_init)
        return implicit_hypergrad(problem, x64, z, full64_lower, full64_upper).to(dtype)

    def test_error(x: Tensor, Z: Tensor) -> float:
        return float(((At64 @ Z.double().T).argmax(1) != l_te).double().mean())

    return StochasticProblem(
        name=f"hyperclean{corruption:g}",
        problem=problem,
        x0=torch.full((n_tr,), float(x_init), dtype=dtype),
        y0=torch.zeros(n_cls, n_feat, dtype=dtype),
        lower_tensors=lower,
        upper_tensors=upper,
        lower_data=make_sampler(lower, sampler, batch_size, seed),
        upper_data=make_sampler(upper, sampler, batch_size, seed + 1),
        y_star_fn=y_star,
        hypergrad_fn=hypergrad,
        test_error_fn=test_error,
        info={"source": used, "n_train": n_tr, "n_val": n_va, "n_test": n_te, "reg": reg_f,
              "corruption": corruption, "corrupted": data.corrupted, "clean_labels": data.y_train_true},
    )
