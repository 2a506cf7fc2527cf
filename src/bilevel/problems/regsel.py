"""Regularization selection: one ridge weight per feature for binary logistic regression
(the ijcnn1 problem of benchopt's bilevel benchmark; Dagréou et al. 2022, sec. 4).

    g(x, z) = (1/n) Σ_i log(1 + exp(−b_i a_iᵀ z)) + ½ Σ_j exp(x_j) z_j²      (train)
    f(x, z) = (1/m) Σ_k log(1 + exp(−b_k a_kᵀ z))                            (validation)

Evaluation: y*(x) by damped Newton in float64 (d = 22, dense Hessian), and the exact implicit
hypergradient (∇_x f = 0 and ∇²_xz g = diag(exp(x) ⊙ z)):

    ∇h(x) = −exp(x) ⊙ z* ⊙ H⁻¹ ∇_z f(x, z*),    H = Aᵀ diag(σ'(b ⊙ A z*)) A / n + diag(exp(x)).

Data: :func:`load_ijcnn1` reads the libsvm files ``ijcnn1`` (49,990 training rows) and ``ijcnn1.t``
(91,701 rows, the validation set, as in benchopt) when you have them (optionally ``.bz2``); the
default offline source is a synthetic data set of the same shape (22 features in [−1, 1], labels
from a sparse logistic model). Batches are ``(A_b, b_b)`` with labels b ∈ {−1, +1}.
"""

from __future__ import annotations

import bz2
import gzip
import os
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import Tensor

from ..formulation import Problem
from ._stochastic import StochasticProblem, make_sampler

__all__ = ["regularization_selection", "load_ijcnn1", "synthetic_ijcnn1", "load_svmlight"]

N_FEATURES = 22
IJCNN1_TRAIN, IJCNN1_VAL = 49_990, 91_701


# data ------------------------------------------------------------------------------------------
def _open(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rt")
    if path.suffix == ".gz":
        return gzip.open(path, "rt")
    return open(path)


def load_svmlight(path: str | Path, n_features: int) -> tuple[Tensor, Tensor]:
    """Dense (X, labels) from a libsvm / svmlight text file (1-based feature indices).

    Uses ``sklearn.datasets.load_svmlight_file`` when scikit-learn is installed, else a small
    parser of the same format.
    """
    path = Path(path)
    try:
        from sklearn.datasets import load_svmlight_file
    except ImportError:  # pragma: no cover - exercised only without scikit-learn
        load_svmlight_file = None
    if load_svmlight_file is not None:
        X, y = load_svmlight_file(str(path), n_features=n_features)
        return torch.as_tensor(X.toarray()), torch.as_tensor(y)
    rows, labels = [], []
    with _open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            row = torch.zeros(n_features, dtype=torch.float64)
            for item in parts[1:]:
                k, _, v = item.partition(":")
                j = int(k) - 1
                if not 0 <= j < n_features:
                    raise ValueError(f"{path}:{lineno}: feature index {k} outside 1..{n_features}")
                row[j] = float(v)
            rows.append(row)
            labels.append(float(parts[0]))
    return torch.stack(rows), torch.tensor(labels, dtype=torch.float64)


def _find(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in ("", ".bz2", ".gz"):
            p = data_dir / (name + suffix)
            if p.is_file():
                return p
    return None


def load_ijcnn1(data_dir: str | Path | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(A_train, b_train, A_val, b_val) from the libsvm ijcnn1 files in ``data_dir``.

    ``data_dir`` defaults to ``<cache>/ijcnn1`` (cache: ``$BILEVEL_DATA`` or ``~/.cache/bilevel``,
    see :func:`bilevel.datasets.cache_dir`). Files: ``ijcnn1`` (train) and ``ijcnn1.t``
    (validation), plain or ``.bz2``/``.gz`` as distributed by LIBSVM.
    """
    if data_dir is None:
        env = os.environ.get("BILEVEL_DATA")
        data_dir = (Path(env).expanduser() if env else Path.home() / ".cache" / "bilevel") / "ijcnn1"
    root = Path(data_dir)
    train = _find(root, ("ijcnn1", "ijcnn1.tr"))
    val = _find(root, ("ijcnn1.t", "ijcnn1_test"))
    if train is None or val is None:
        raise FileNotFoundError(
            f"ijcnn1 files not found in {root} (expected 'ijcnn1' and 'ijcnn1.t', optionally .bz2; "
            "download them from the LIBSVM data sets page) — or use source='synthetic'"
        )
    A, b = load_svmlight(train, N_FEATURES)
    Av, bv = load_svmlight(val, N_FEATURES)
    return A, torch.where(b > 0, 1.0, -1.0).double(), Av, torch.where(bv > 0, 1.0, -1.0).double()


def synthetic_ijcnn1(n_train: int = IJCNN1_TRAIN, n_val: int = IJCNN1_VAL, *, seed: int = 0
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Offline stand-in with ijcnn1's shape: 22 correlated features in (−1, 1) (tanh of a Gaussian
    mixture), labels ±1 drawn from a logistic model whose weights are zero on 8 features (so a
    per-feature regularization has something to select)."""
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    mix = torch.randn(N_FEATURES, N_FEATURES, generator=gen, dtype=torch.float64) / N_FEATURES**0.5
    mix += torch.eye(N_FEATURES, dtype=torch.float64)
    A = torch.tanh(torch.randn(n, N_FEATURES, generator=gen, dtype=torch.float64) @ mix)
    w = 2.0 * torch.randn(N_FEATURES, generator=gen, dtype=torch.float64)
    w[torch.randperm(N_FEATURES, generator=gen)[:8]] = 0.0
    p = torch.sigmoid(A @ w)
    b = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < p, 1.0, -1.0)
    return A[:n_train], b[:n_train], A[n_train:], b[n_train:]


# problem ---------------------------------------------------------------------------------------
def _logistic(A: Tensor, b: Tensor, z: Tensor) -> Tensor:
    return Fn.softplus(-b * (A @ z)).mean()


def _newton(A: Tensor, b: Tensor, lam: Tensor, z0: Tensor, tol: float = 1e-12, max_iter: int = 100
            ) -> Tensor:
    """argmin_z mean log(1 + exp(−b Az)) + ½ Σ λ_j z_j² by Newton with backtracking (float64)."""
    z, n = z0.clone(), A.shape[0]

    def obj(z: Tensor) -> Tensor:
        return _logistic(A, b, z) + 0.5 * torch.dot(lam * z, z)

    for _ in range(max_iter):
        m = b * (A @ z)
        sig = torch.sigmoid(-m)
        grad = -(A.T @ (b * sig)) / n + lam * z
        if float(torch.linalg.vector_norm(grad)) <= tol:
            break
        H = (A.T * (sig * (1 - sig))) @ A / n + torch.diag(lam)
        step = torch.linalg.solve(H, grad)
        t, f0, slope = 1.0, obj(z), float(torch.dot(grad, step))
        while float(obj(z - t * step)) > float(f0) - 0.25 * t * slope and t > 1e-10:
            t *= 0.5
        z = z - t * step
    return z


def regularization_selection(
    *,
    source: str = "synthetic",
    data_dir: str | Path | None = None,
    n_train: int = IJCNN1_TRAIN,
    n_val: int = IJCNN1_VAL,
    batch_size: int = 64,
    seed: int = 0,
    sampler: str = "minibatch",
    dtype: torch.dtype = torch.float32,
) -> StochasticProblem:
    """Build the problem. ``source``: "synthetic" (offline, sizes ``n_train``/``n_val``),
    "ijcnn1" (the libsvm files, see :func:`load_ijcnn1`; sizes ignored) or "auto" (ijcnn1 when
    found, else synthetic). Start (benchopt): z0 ~ N(0, I), x0 = log U(0, 1) (seeded)."""
    if source not in ("synthetic", "ijcnn1", "auto"):
        raise ValueError(f"source must be 'synthetic', 'ijcnn1' or 'auto', got {source!r}")
    data = None
    if source in ("ijcnn1", "auto"):
        try:
            data, used = load_ijcnn1(data_dir), "ijcnn1"
        except FileNotFoundError:
            if source == "ijcnn1":
                raise
    if data is None:
        data, used = synthetic_ijcnn1(n_train, n_val, seed=seed), "synthetic"
    A64, b64, Av64, bv64 = data
    lower = (A64.to(dtype), b64.to(dtype))
    upper = (Av64.to(dtype), bv64.to(dtype))

    def g(x: Tensor, z: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        A, b = batch
        return Fn.softplus(-b * (A @ z)).mean() + 0.5 * torch.dot(torch.exp(x) * z, z)

    def f(x: Tensor, z: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        A, b = batch
        return Fn.softplus(-b * (A @ z)).mean()

    def y_star(x: Tensor, z_init: Tensor | None = None) -> Tensor:
        z0 = torch.zeros(N_FEATURES, dtype=torch.float64) if z_init is None else z_init.double()
        return _newton(A64, b64, torch.exp(x.double()), z0).to(dtype)

    def hypergrad(x: Tensor, z_init: Tensor | None = None) -> Tensor:
        lam = torch.exp(x.double())
        z = _newton(A64, b64, lam, torch.zeros_like(lam) if z_init is None else z_init.double())
        sig = torch.sigmoid(-b64 * (A64 @ z))
        H = (A64.T * (sig * (1 - sig))) @ A64 / A64.shape[0] + torch.diag(lam)
        sv = torch.sigmoid(-bv64 * (Av64 @ z))
        gz = -(Av64.T @ (bv64 * sv)) / Av64.shape[0]
        return (-lam * z * torch.linalg.solve(H, gz)).to(dtype)

    def val_error(x: Tensor, z: Tensor) -> float:
        return float(((Av64 @ z.double()) * bv64 <= 0).double().mean())

    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(N_FEATURES, generator=gen, dtype=torch.float64)
    x0 = torch.log(torch.rand(N_FEATURES, generator=gen, dtype=torch.float64))
    return StochasticProblem(
        name="regsel",
        problem=Problem(upper=f, lower=g, name="regularization_selection"),
        x0=x0.to(dtype),
        y0=z0.to(dtype),
        lower_tensors=lower,
        upper_tensors=upper,
        lower_data=make_sampler(lower, sampler, batch_size, seed),
        upper_data=make_sampler(upper, sampler, batch_size, seed + 1),
        y_star_fn=y_star,
        hypergrad_fn=hypergrad,
        test_error_fn=val_error,
        info={"source": used, "n_train": A64.shape[0], "n_val": Av64.shape[0],
              "test_error": "misclassification rate on the validation set"},
    )
