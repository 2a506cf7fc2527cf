"""Data poisoning by bounded perturbations of training points (Biggio, Nelson & Laskov 2012).

Biggio, Nelson & Laskov 2012, "Poisoning attacks against support vector machines" (ICML), Sec. 2–3:
the attacker adds a point with a fixed label and moves it, within a feasible box, by gradient
ascent on the validation (hinge) loss of the SVM retrained with it, differentiating the retrained
classifier through its optimality conditions. Survey 2207.11719, Table 2 (data as the upper
variable; Mei & Zhu 2015 cast poisoning as a bilevel problem). The variant here moves m existing
training points (labels kept) within per-point L2 balls, all at once, against a logistic
regression, differentiated implicitly.

The upper variable x = (δ_1, ..., δ_m) perturbs the first m training points (the split is
random, so these are m random training points), each within an L2 ball, ‖δ_i‖₂ ≤ ε:

    min_{‖δ_i‖ ≤ ε} f(δ, w*(δ)) = −L_val(w*(δ)),
    w*(δ) = argmin_w g(δ, w) = (1/n) Σ_i ℓ(t_i ⟨w, a_i + δ_i⟩ + t_i b) + (λ/2)‖w‖²,

with δ_i = 0 for i > m, ℓ(z) = log(1 + e^{−z}) (logistic loss), labels t_i = ±1, y = (w, b).
g is λ-strongly convex in w and strictly convex in b (the logistic curvature σ'(z) is positive),
so ∇²_yy g ≻ 0, y*(δ) is unique and ∇h(δ) = ∇_δ f − ∇²_{δy} g · (∇²_{yy} g)⁻¹ ∇_y f (CG).
The constraint is the projection onto the product of balls, :meth:`Poisoning.project`
(``x_projection``).

Data: two digit classes of the bundled MNIST sample (default 7 vs 1),
pixels in [0, 1] (mean image norm ≈ 8), split at random into train / validation (the attacker's
objective) / test (held out: how much the attack transfers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .. import _tree as T
from .. import linalg
from .. import oracles as O
from ..errors import ConfigError
from ..formulation import Bound, Problem
from ._stochastic import lbfgs_lower

__all__ = ["Poisoning", "poisoning", "project_rows"]


def project_rows(x: Tensor, eps: float) -> Tensor:
    """Projection onto {‖x_i‖₂ ≤ ε for every row i}: rows outside are scaled back to norm ε."""
    norms = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(eps / norms.clamp_min(torch.finfo(x.dtype).tiny), max=1.0)


@dataclass
class Poisoning:
    """The problem, its data and the helpers to retrain and score a poisoned classifier."""

    problem: Problem
    x0: Tensor
    y0: dict[str, Tensor]
    eps: float
    n_poison: int
    ridge: float
    data: dict[str, tuple[Tensor, Tensor]]
    #: an upper bound of the Lipschitz constant of ∇_y g for every feasible δ
    smoothness: float
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> tuple[Tensor, dict[str, Tensor]]:
        return self.x0.clone(), {k: v.clone() for k, v in self.y0.items()}

    def project(self, x: Tensor) -> Tensor:
        return project_rows(x, self.eps)

    def random(self, generator: torch.Generator) -> Tensor:
        """Random perturbations using the whole budget: uniform directions, ‖δ_i‖ = ε."""
        u = torch.randn(self.x0.shape, generator=generator, dtype=self.x0.dtype).to(self.x0.device)
        return self.eps * u / u.norm(dim=1, keepdim=True)

    @property
    def condition(self) -> float:
        """κ = L / λ: the condition number of the lower objective in w (nominal: along b the
        curvature comes from the data term alone and may be smaller than λ on separable data)."""
        return self.smoothness / self.ridge

    def retrain(self, x: Tensor, y: dict[str, Tensor] | None = None, tol: float = 1e-9,
                newton: int = 1) -> dict[str, Tensor]:
        """w*(δ): L-BFGS to max |∇g| ≤ ``tol`` (from ``y``, default 0), then ``newton`` Newton steps
        w ← w − H⁻¹∇_w g with H⁻¹ by CG on Hessian-vector products (quadratic convergence: one
        step takes a gradient of 1e-9 to the rounding level)."""
        d = self.x0.shape[1]
        v0 = torch.zeros(d + 1, dtype=self.x0.dtype, device=self.x0.device) if y is None else \
            torch.cat([y["w"].detach(), y["b"].detach().reshape(1)])
        split = lambda v: {"w": v[:d], "b": v[d]}  # noqa: E731
        v = lbfgs_lower(lambda v: self.problem.lower(x.detach(), split(v)), v0, tol=tol, max_iter=2000)
        w = split(v)
        for _ in range(newton):
            bound = Bound(self.problem, x.detach(), w)
            lin = O.Linearization(bound.G, bound.xs, bound.ys0)
            step, _ = linalg.cg(lin.hvp, lin.grad_y, iters=4 * (d + 1), tol=1e-13)
            w = bound.y_tree(T.detach(T.sub(bound.ys0, step)))
        return w

    def loss(self, y: dict[str, Tensor], split: str) -> float:
        a, t = self.data[split]
        with torch.no_grad():
            return float(F.softplus(-t * (a @ y["w"] + y["b"])).mean())

    def error(self, y: dict[str, Tensor], split: str) -> float:
        a, t = self.data[split]
        with torch.no_grad():
            return float(((a @ y["w"] + y["b"]) * t <= 0).double().mean())

    def scores(self, x: Tensor, y: dict[str, Tensor] | None = None) -> dict[str, float]:
        """Validation / test loss and error of the classifier retrained on the data poisoned by x."""
        w = self.retrain(x, y)
        return {"val_loss": self.loss(w, "val"), "test_loss": self.loss(w, "test"),
                "val_err": self.error(w, "val"), "test_err": self.error(w, "test")}


def poisoning(
    eps: float = 3.0,
    *,
    n_poison: int = 40,
    classes: tuple[int, int] = (7, 1),
    n_train: int = 400,
    n_val: int = 300,
    n_test: int = 300,
    ridge: float = 1e-2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Poisoning:
    """The poisoning problem of the module docstring (x0 = 0: the clean training set).

    ``eps``: the L2 budget per poisoned point (pixel units; an image has norm ≈ 8);
    ``n_poison`` = m ≤ ``n_train`` poisoned points; ``classes``: the two digits (label +1, −1).
    """
    if not eps > 0 or not math.isfinite(eps):
        raise ConfigError(f"eps must be a positive number, got {eps}")
    if not 1 <= int(n_poison) <= int(n_train):
        raise ConfigError(f"n_poison must be in [1, n_train={n_train}], got {n_poison}")
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= c <= 9 for c in classes):
        raise ConfigError(f"classes must be two different digits 0..9, got {classes}")
    if not ridge > 0:
        raise ConfigError(f"ridge must be positive (a strongly convex lower level), got {ridge}")
    from ..datasets import mnist5k

    d = mnist5k()
    X, lab = d.images.astype(np.float64) / d.max_value, d.labels.astype(np.int64)
    idx = np.flatnonzero((lab == classes[0]) | (lab == classes[1]))
    idx = idx[np.random.default_rng(seed).permutation(len(idx))]
    if min(n_train, n_val, n_test) < 1 or n_train + n_val + n_test > len(idx):
        raise ConfigError(f"split {n_train}/{n_val}/{n_test} does not fit the {len(idx)} images of "
                          f"digits {classes}")
    kw = {"dtype": dtype, "device": device}
    a = torch.as_tensor(X[idx], **kw)
    t = torch.as_tensor(np.where(lab[idx] == classes[0], 1.0, -1.0), **kw)
    cuts = np.cumsum([0, n_train, n_val, n_test])
    data = {s: (a[lo:hi], t[lo:hi]) for s, lo, hi in zip(("train", "val", "test"), cuts[:-1], cuts[1:])}
    a_tr, t_tr = data["train"]
    m = int(n_poison)

    def lower(x: Tensor, y: dict[str, Tensor]) -> Tensor:
        z = t_tr * (torch.cat([a_tr[:m] + x, a_tr[m:]]) @ y["w"] + y["b"])
        return F.softplus(-z).mean() + 0.5 * ridge * (y["w"] ** 2).sum()

    def upper(x: Tensor, y: dict[str, Tensor]) -> Tensor:
        av, tv = data["val"]
        return -F.softplus(-tv * (av @ y["w"] + y["b"])).mean()

    # ∇²_yy g ⪯ (1/4n) Σ_i [a_i + δ_i; 1][a_i + δ_i; 1]ᵀ + λI; with ‖δ_i‖ ≤ ε the largest
    # eigenvalue of the data part is at most (σ_max([A 1]/√n) + ε √(m/n))² (triangle inequality)
    aug = torch.cat([a_tr, torch.ones(len(t_tr), 1, **kw)], 1)
    s_max = float(torch.linalg.matrix_norm(aug, ord=2)) / math.sqrt(len(t_tr))
    smooth = 0.25 * (s_max + eps * math.sqrt(m / len(t_tr))) ** 2 + ridge
    y0 = {"w": torch.zeros(a.shape[1], **kw), "b": torch.zeros((), **kw)}
    return Poisoning(problem=Problem(upper, lower, name="poisoning"), x0=torch.zeros(m, a.shape[1], **kw),
                     y0=y0, eps=float(eps), n_poison=m, ridge=ridge, data=data, smoothness=smooth,
                     extra={"classes": tuple(classes)})
