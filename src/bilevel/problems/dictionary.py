"""Dictionary learning as a bilevel problem: the dictionary above, the sparse codes (lasso) below.

Mairal, Bach & Ponce 2012, "Task-driven dictionary learning" (IEEE TPAMI; first as Mairal et al.
2010), Eq. 8–9: the sparse codes are the solution of a lasso that depends on the dictionary D, and
D is learned through them. With n signals S = [s_1 … s_n] ∈ R^{m×n}, p atoms D ∈ R^{m×p} with
unit-norm columns (the constraint set 𝒟) and codes Y ∈ R^{p×n}:

    min_{D ∈ 𝒟} f(D, Y*(D)) = 1/(2n) ‖S − D Y*(D)‖²_F,
    Y*(D) = argmin_Y  g(D, Y) + h(Y),   g = 1/(2n) ‖S − D Y‖²_F,   h = λ/n ‖Y‖₁

(the task here is the reconstruction itself — the unsupervised case of the task-driven loss). The
lower problem is the lasso, solved by proximal gradient (:class:`bilevel.inner.FISTA` /
:class:`~bilevel.inner.ISTA` with :class:`~bilevel.inner.L1`); the problem's ``lower`` is the
smooth part g only. Step size η = n / p ≤ 1/L for every D ∈ 𝒟 (L = ‖D‖²₂ / n ≤ ‖D‖²_F / n = p/n).

Synthetic data from a known dictionary D★ (random unit columns), each signal a combination of
``sparsity`` atoms with coefficients of magnitude in [0.5, 1.5] and random signs, plus Gaussian
noise. :meth:`DictionaryToy.match` scores a dictionary by the mean over the true atoms of the
largest |cosine| to a learned atom (1 = every atom recovered up to sign and permutation).

The baseline :meth:`DictionaryToy.alternating_step` is alternating minimization of the joint
objective g + h (method of optimal directions, Engan, Aase & Husøy 1999): lasso codes by the same
proximal dynamics, then the least-squares dictionary D = S Yᵀ (Y Yᵀ)⁻¹ and column normalization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..formulation import Problem
from ..inner import FISTA, ISTA, L1, Dynamics, soft_threshold

__all__ = ["DictionaryToy", "dictionary_learning", "normalize_columns", "atom_match"]


def normalize_columns(D: Tensor) -> Tensor:
    """Projection onto unit-norm columns (a column of norm 0 is left as it is)."""
    n = D.norm(dim=0, keepdim=True)
    return torch.where(n > 1e-12, D / n.clamp_min(1e-12), D)


def atom_match(D_true: Tensor, D: Tensor) -> Tensor:
    """For each true atom the largest |cos| to a column of D (invariant to sign and permutation)."""
    c = (normalize_columns(D_true).T @ normalize_columns(D)).abs()
    return c.max(dim=1).values


@dataclass
class DictionaryToy:
    """The problem, data, the known dictionary and the lasso pieces (prox, step size)."""

    problem: Problem
    x0: Tensor
    y0: Tensor
    D_true: Tensor
    codes_true: Tensor
    S: Tensor
    lam: float
    lr: float
    prox: L1
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> tuple[Tensor, Tensor]:
        return self.x0.clone(), self.y0.clone()

    def dynamics(self, steps: int, accelerated: bool = True) -> Dynamics:
        """FISTA (or ISTA) on the lasso, step η = n/p."""
        cls = FISTA if accelerated else ISTA
        return cls(lr=self.lr, steps=steps, prox=self.prox)

    @property
    def n(self) -> int:
        return self.S.shape[1]

    def match(self, D: Tensor) -> float:
        """Mean over the true atoms of max |cos| to a learned atom."""
        return float(atom_match(self.D_true, D).mean())

    def found(self, D: Tensor, threshold: float = 0.99) -> int:
        """Number of true atoms matched with |cos| ≥ threshold."""
        return int((atom_match(self.D_true, D) >= threshold).sum())

    def lasso(self, D: Tensor, Y: Tensor) -> float:
        """g + h at (D, Y)."""
        with torch.no_grad():
            return float(self.problem.g(D, Y) + self.prox.value(Y))

    def kkt(self, D: Tensor, Y: Tensor) -> float:
        """‖Y − prox_h(Y − ∇_Y g)‖ scaled by n (the lasso's prox-gradient mapping; 0 iff Y = Y*(D))."""
        with torch.no_grad():
            grad = D.T @ (D @ Y - self.S) / self.n
            step = Y - soft_threshold(Y - self.n * grad, self.lam)
            return float(step.norm())

    def alternating_step(self, D: Tensor, Y: Tensor, dyn: Dynamics) -> tuple[Tensor, Tensor]:
        """One round of alternating minimization: codes by ``dyn`` from Y (warm start), then the
        least-squares dictionary S Yᵀ (Y Yᵀ)⁻¹, columns normalized (an atom no code uses is kept)."""
        with torch.no_grad():
            s = dyn.init((Y,))
            for k in range(dyn.steps):
                w = dyn.point(s)[0]
                s = dyn.update(s, (D.T @ (D @ w - self.S) / self.n,), k)
            Y = dyn.output(s)[0]
            G = Y @ Y.T
            eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
            D_ls = torch.linalg.solve(G + 1e-10 * G.diagonal().mean().clamp_min(1e-30) * eye, Y @ self.S.T).T
            used = Y.abs().sum(dim=1) > 0
            D_new = torch.where(used[None, :], D_ls, D)
            return normalize_columns(D_new), Y


def dictionary_learning(
    dim: int = 8,
    atoms: int = 10,
    n: int = 200,
    *,
    sparsity: int = 2,
    noise: float = 0.0,
    lam: float = 0.3,
    init: str = "data",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> DictionaryToy:
    """The dictionary-learning problem of the module docstring on synthetic data from a known
    dictionary. ``init="data"``: D0 = normalized random signals (the usual start), ``"random"``:
    random unit columns. Codes start at 0."""
    if not 1 <= sparsity <= atoms:
        raise ConfigError(f"sparsity must be in [1, atoms={atoms}], got {sparsity}")
    if init not in ("data", "random"):
        raise ConfigError(f"init must be 'data' or 'random', got {init!r}")
    if lam < 0 or noise < 0 or min(dim, atoms, n) < 1:
        raise ConfigError("dim, atoms, n must be >= 1 and lam, noise >= 0")
    if init == "data" and n < atoms:
        raise ConfigError(f"init='data' needs n >= atoms ({n} < {atoms})")
    g = torch.Generator().manual_seed(seed)
    D_true = normalize_columns(torch.randn(dim, atoms, generator=g, dtype=dtype))
    C = torch.zeros(atoms, n, dtype=dtype)
    for i in range(n):
        idx = torch.randperm(atoms, generator=g)[:sparsity]
        mag = 0.5 + torch.rand(sparsity, generator=g, dtype=dtype)
        C[idx, i] = torch.sign(torch.randn(sparsity, generator=g, dtype=dtype)) * mag
    S = D_true @ C + noise * torch.randn(dim, n, generator=g, dtype=dtype)
    if init == "data":
        D0 = normalize_columns(S[:, torch.randperm(n, generator=g)[:atoms]].clone())
    else:
        D0 = normalize_columns(torch.randn(dim, atoms, generator=g, dtype=dtype))
    dev = torch.device(device) if device is not None else None
    D_true, C, S, D0 = (t.to(dev) if dev is not None else t for t in (D_true, C, S, D0))

    def reconstruction(D: Tensor, Y: Tensor) -> Tensor:
        return 0.5 * (S - D @ Y).pow(2).sum() / n

    problem = Problem(upper=reconstruction, lower=reconstruction, name="dictionary-learning")
    return DictionaryToy(problem=problem, x0=D0, y0=torch.zeros(atoms, n, dtype=dtype, device=S.device),
                         D_true=D_true, codes_true=C, S=S, lam=lam, lr=n / atoms, prox=L1(lam / n),
                         extra={"sparsity": sparsity, "noise": noise, "init": init})
