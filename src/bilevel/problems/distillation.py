"""Dataset distillation: a few synthetic images (and their learning rate) as the upper variable.

Wang, Zhu, Torralba & Efros 2018, "Dataset distillation" (arXiv 1811.10959), Alg. 1; survey
2207.11719, Table 2 (data as the upper variable). Kernel variant: Nguyen, Chen & Lee 2021,
"Dataset meta-learning from kernel ridge-regression" (KIP, ICLR), Eq. 2–3.

**Unrolled (Wang et al.)** The upper variable is x = (x̃, log η): m = C·ipc synthetic images x̃ with
fixed labels (ipc per class) and a learning rate. The lower variable y = θ are the weights of a small
classifier (linear softmax or a one-hidden-layer MLP), trained on the synthetic set by T steps of GD
from a *random* initialization θ₀ ~ p(θ₀):

    θ_{k+1} = θ_k − η ∇_θ ℓ(x̃, θ_k),  k < T;     min_x  f(x, θ_T) = E_{θ₀} ℓ(real data, θ_T(x, θ₀)).

The paper's notation: distilled data x̃ ↔ our x["images"], η̃ ↔ exp(x["log_lr"]), θ ↔ y. The
hypergradient is reverse mode through the T steps (:class:`~bilevel.hypergrad.Reverse`). Random
initializations enter as the lower start: :class:`RandomInitDescent` draws a fresh θ₀ (a stack of
``n_inits`` independent models, the paper's batch of initial weights) at every outer step, a
deterministic function of (seed, step) so a resumed run is exact. ``g`` sums the models' losses,
so GD on the stack is GD on each model; ``f`` averages them (the expectation over θ₀).

**Kernel (KIP)** The lower level is kernel ridge regression with the distilled images as support:

    y*(x) = α* = argmin_α ½ tr(αᵀ(K_ss + λI)α) − tr(αᵀ Y_s) = (K_ss + λI)⁻¹ Y_s,
    f(x, α) = (1/2n_t) ‖K_ts α − Y_t‖²_F   (real images t, K_ts = k(real, x̃)),

solved in closed form and differentiated through the solve (:class:`~bilevel.hypergrad.ClosedForm`);
x = (x̃, log λ), k the RBF kernel k(a, b) = exp(−γ ‖a − b‖² / d). Labels: one-hot minus 1/C.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _tree as T
from ..errors import ConfigError
from ..formulation import Bound, Problem
from ..hypergrad import ClosedForm, Reverse
from ..hypergrad.base import Estimator, solve_lower
from ..inner import GD
from ..solvers import HypergradientDescent

__all__ = [
    "MODELS",
    "INITS",
    "StackedModel",
    "Distillation",
    "KernelDistillation",
    "RandomInitDescent",
    "distillation",
    "kernel_distillation",
    "load_distillation_data",
    "class_centroids",
    "random_real",
    "rbf_kernel",
]

MODELS = ("linear", "mlp")
#: MNIST pixel mean / std (on [0, 1]); inputs are standardized with them
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


# --- data -----------------------------------------------------------------------------------------
def load_distillation_data(
    n_train: int = 4000, n_test: int = 1000, *, downsample: int = 1, seed: int = 0,
    dtype: torch.dtype = torch.float32, device: Any = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """A stratified train / test split of the bundled 5000-image MNIST sample, standardized
    ((p − 0.1307)/0.3081 on [0, 1] pixels), optionally average-pooled by ``downsample`` (28/s px)."""
    from ..datasets import mnist5k, split_indices

    if downsample not in (1, 2, 4, 7):
        raise ConfigError(f"downsample must divide 28 (1, 2, 4 or 7), got {downsample}")
    ds = mnist5k()
    if n_train < ds.n_classes or n_test < ds.n_classes or n_train + n_test > len(ds):
        raise ConfigError(f"n_train={n_train}, n_test={n_test}: need ≥ {ds.n_classes} each and a sum "
                          f"≤ {len(ds)} (the bundled sample)")
    tr, te = split_indices(ds.labels, [n_train, n_test], seed=seed)
    out = {}
    for name, idx in (("train", tr), ("test", te)):
        sub = ds.subset(idx)
        X = (sub.features(torch.float64) - MNIST_MEAN) / MNIST_STD
        if downsample > 1:
            s = 28 // downsample
            X = X.view(-1, s, downsample, s, downsample).mean((2, 4)).reshape(-1, s * s)
        out[name] = (X.to(device=device, dtype=dtype), sub.targets().to(device))
    return out


def _support_labels(n_classes: int, ipc: int) -> Tensor:
    """Labels of the support set: ``ipc`` per class, class-major (0, 0, …, 1, 1, …)."""
    return torch.arange(n_classes).repeat_interleave(ipc)


def random_real(X: Tensor, t: Tensor, ipc: int, n_classes: int, generator: torch.Generator) -> Tensor:
    """``ipc`` real images per class drawn at random (class-major, like the support labels)."""
    rows = []
    for c in range(n_classes):
        idx = torch.nonzero(t == c).flatten()
        if len(idx) < ipc:
            raise ConfigError(f"class {c} has {len(idx)} training images, fewer than ipc={ipc}")
        rows.append(idx[torch.randperm(len(idx), generator=generator)[:ipc]])
    return X[torch.cat(rows)]


def class_centroids(X: Tensor, t: Tensor, ipc: int, n_classes: int, *, iters: int = 25,
                    seed: int = 0) -> Tensor:
    """Per-class means: k-means centroids (Lloyd iterations, k = ipc, started at random members)
    of each class; for ipc = 1 the class mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_classes):
        Xc = X[t == c]
        if ipc == 1:
            out.append(Xc.mean(0, keepdim=True))
            continue
        C = Xc[torch.randperm(len(Xc), generator=g)[:ipc]].clone()
        for _ in range(iters):
            assign = torch.cdist(Xc, C).argmin(1)
            for k in range(ipc):
                members = Xc[assign == k]
                if len(members):
                    C[k] = members.mean(0)
        out.append(C)
    return torch.cat(out)


# --- the classifier: a stack of independent models ----------------------------------------------
@dataclass(frozen=True)
class StackedModel:
    """``n`` independent copies of a linear softmax classifier or a one-hidden-layer ReLU MLP, as
    one pytree with a leading model axis (so a batch of initializations trains in one unroll)."""

    kind: str
    dim: int
    n_classes: int
    hidden: int = 0

    def __post_init__(self):
        if self.kind not in MODELS:
            raise ConfigError(f"model kind {self.kind!r}; valid: {', '.join(MODELS)}")
        if self.kind == "mlp" and self.hidden < 1:
            raise ConfigError(f"an mlp needs hidden ≥ 1, got {self.hidden}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        d, C, H = self.dim, self.n_classes, self.hidden
        if self.kind == "linear":
            return {"W": (d, C), "b": (C,)}
        return {"W1": (d, H), "b1": (H,), "W2": (H, C), "b2": (C,)}

    def init(self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
             device: Any = None) -> dict[str, Tensor]:
        """PyTorch's nn.Linear default: weights and biases U(−1/√fan_in, 1/√fan_in)."""
        out = {}
        for name, shape in self.shapes().items():
            fan_in = self.dim if name in ("W", "b", "W1", "b1") else self.hidden
            u = torch.rand((n, *shape), generator=generator, dtype=dtype)
            out[name] = ((2 * u - 1) / math.sqrt(fan_in)).to(device)
        return out

    def logits(self, y: dict[str, Tensor], X: Tensor) -> Tensor:
        """(models, rows, classes)."""
        if self.kind == "linear":
            return X @ y["W"] + y["b"][:, None]
        h = torch.relu(X @ y["W1"] + y["b1"][:, None])
        return h @ y["W2"] + y["b2"][:, None]

    def loss(self, y: dict[str, Tensor], X: Tensor, t: Tensor, reduce: str = "mean") -> Tensor:
        """Cross-entropy; ``mean`` over models and rows, or ``sum`` over models of each model's mean."""
        z = self.logits(y, X)
        m = z.shape[0]
        ce = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), t.repeat(m))
        return ce * m if reduce == "sum" else ce

    def accuracy(self, y: dict[str, Tensor], X: Tensor, t: Tensor) -> Tensor:
        """Accuracy of each model, shape (models,)."""
        with torch.no_grad():
            return (self.logits(y, X).argmax(-1) == t).to(torch.float64).mean(1)


INITS = ("noise", "real")


def _initial_images(data: dict[str, tuple[Tensor, Tensor]], ipc: int, n_classes: int, init: str,
                    seed: int) -> Tensor:
    """x̃₀: N(0, 1) pixels (``noise``, Wang et al.) or ``ipc`` random training images per class
    (``real``, as KIP often starts)."""
    X, t = data["train"]
    g = torch.Generator().manual_seed(seed)
    if init == "noise":
        return torch.randn(n_classes * ipc, X.shape[1], generator=g, dtype=X.dtype).to(X.device)
    if init == "real":
        return random_real(X, t, ipc, n_classes, g).clone()
    raise ConfigError(f"init {init!r}; valid: {', '.join(INITS)}")


def _init_seed(seed: int, t: int) -> int:
    """A per-step seed, independent streams for different (seed, step)."""
    return int(np.random.SeedSequence([seed, t]).generate_state(1)[0])


# --- the unrolled problem ------------------------------------------------------------------------
@dataclass
class Distillation:
    """Wang et al.'s problem (module docstring) with its data, model and evaluation protocol."""

    problem: Problem
    x0: dict[str, Tensor]
    labels: Tensor
    model: StackedModel
    data: dict[str, tuple[Tensor, Tensor]]
    ipc: int
    steps: int
    n_inits: int
    per_step_lr: bool
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    def inner(self, steps: int | None = None) -> GD:
        """The lower dynamics: ``steps`` (default T) GD steps with the learned rate η = exp(log_lr)
        (per step: η_k = exp(log_lr[k]), the last rate beyond T)."""
        last = self.steps - 1

        def per_step(x: dict[str, Tensor], k: int) -> Tensor:
            return x["log_lr"][min(k, last)].exp()

        def constant(x: dict[str, Tensor]) -> Tensor:
            return x["log_lr"].exp()

        return GD(lr=per_step if self.per_step_lr else constant, steps=self.steps if steps is None else steps)

    def estimator(self, **kw: Any) -> Reverse:
        """Reverse mode through the T unrolled steps (``kw``: e.g. ``checkpoint=True``)."""
        return Reverse(self.inner(), **kw)

    def init(self, t: int, n: int | None = None, seed: int | None = None) -> dict[str, Tensor]:
        """θ₀ for outer step ``t``: ``n`` (default ``n_inits``) fresh models, seeded by (seed, t)."""
        g = torch.Generator().manual_seed(_init_seed(self.seed if seed is None else seed, t))
        dtype = self.x0["images"].dtype
        return self.model.init(self.n_inits if n is None else n, g, dtype, self.x0["images"].device)

    def start(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return {k: v.clone() for k, v in self.x0.items()}, self.init(0)

    def solver(self, upper: Any, estimator: Estimator | None = None) -> RandomInitDescent:
        """Wang et al. Alg. 1: every outer step a fresh θ₀, T unrolled steps, an upper step."""
        return RandomInitDescent(estimator or self.estimator(), self.init, upper=upper)

    def train(self, images: Tensor, lr: float | Tensor, inits: dict[str, Tensor],
              steps: int | None = None) -> dict[str, Tensor]:
        """Fresh models from ``inits`` trained on (images, support labels) by ``steps`` GD steps
        of ``lr`` (the evaluation protocol; the same dynamics as the lower level)."""
        log_lr = torch.as_tensor(lr, dtype=images.dtype).log()
        if self.per_step_lr and log_lr.dim() == 0:
            log_lr = log_lr.expand(self.steps)
        x = {"images": images, "log_lr": log_lr}
        bound = Bound(self.problem, x, inits)
        ys, _ = solve_lower(bound, self.inner(steps), bound.xs, bound.ys0)
        return bound.y_tree(ys)

    def evaluate(self, images: Tensor, lr: float | Tensor, *, n_inits: int = 10, seed: int = 10**6,
                 steps: int | None = None, split: str = "test") -> Tensor:
        """Test accuracy of ``n_inits`` fresh models (seeded, not the training draws) trained on
        ``images``: one accuracy per initialization."""
        y = self.train(images, lr, self.init(0, n_inits, seed), steps)
        return self.model.accuracy(y, *self.data[split])


class RandomInitDescent(HypergradientDescent):
    """Hypergradient descent whose lower start is drawn afresh at every outer step.

    y0_t = ``init(t)`` (a deterministic function of the step, so resuming is exact), then the
    estimator from y0_t (no warm start) and the upper step: Wang et al. 2018, Alg. 1 with θ₀ ~ p(θ₀).
    """

    reference = "Wang et al. 2018 (dataset distillation), Alg. 1"

    def __init__(self, estimator: Estimator, init: Callable[[int], Any], upper: Any = 0.1):
        if not callable(init):
            raise ConfigError(f"RandomInitDescent needs a callable init(t) -> y0, got {type(init).__name__}")
        super().__init__(estimator, upper=upper, warm_start=False)
        self.init_fn = init

    def step(self, ctx, state: dict[str, Any], t: int) -> dict[str, Any]:
        ys, spec = T.flatten(self.init_fn(t))
        if spec != ctx.yspec:
            raise ConfigError("init(t) must return a pytree shaped like y0")
        state["y0"] = ys
        return super().step(ctx, state, t)


def distillation(
    ipc: int = 1,
    *,
    model: str = "linear",
    hidden: int = 0,
    steps: int = 10,
    n_inits: int = 4,
    lr0: float = 0.01,
    per_step_lr: bool = False,
    data: dict[str, tuple[Tensor, Tensor]] | None = None,
    n_train: int = 4000,
    n_test: int = 1000,
    downsample: int = 1,
    init: str = "noise",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> Distillation:
    """Wang et al.'s distillation problem on the bundled MNIST sample (or ``data``: a dict with
    ``train`` and ``test`` pairs (X (n, d), labels (n,))). x0: N(0, 1) images, log η = log lr0.

    ``f(x, y, batch)`` takes a real batch (X, t) (``upper_data``; the whole training split when no
    batch is given); ``g(x, y)`` = Σ_models CE(model(x̃), support labels). ``init``: x̃₀ =
    N(0, 1) noise or random real images (:data:`INITS`)."""
    if ipc < 1 or steps < 1 or n_inits < 1 or lr0 <= 0:
        raise ConfigError(f"need ipc, steps, n_inits ≥ 1 and lr0 > 0; got {ipc}, {steps}, {n_inits}, {lr0}")
    data = data if data is not None else load_distillation_data(n_train, n_test, downsample=downsample,
                                                               seed=seed, dtype=dtype, device=device)
    Xtr, ttr = data["train"]
    n_classes = int(ttr.max()) + 1
    net = StackedModel(model, Xtr.shape[1], n_classes, hidden)
    labels = _support_labels(n_classes, ipc).to(Xtr.device)

    def upper(x: dict[str, Tensor], y: dict[str, Tensor],
              batch: tuple[Tensor, Tensor] | None = None) -> Tensor:
        X, t = data["train"] if batch is None else batch
        return net.loss(y, X, t)

    def lower(x: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
        return net.loss(y, x["images"], labels, reduce="sum")

    images = _initial_images(data, ipc, n_classes, init, seed)
    log_lr = torch.full((steps,) if per_step_lr else (), math.log(lr0), dtype=Xtr.dtype, device=Xtr.device)
    return Distillation(problem=Problem(upper, lower, name="distillation"),
                        x0={"images": images, "log_lr": log_lr}, labels=labels, model=net, data=data,
                        ipc=ipc, steps=steps, n_inits=n_inits, per_step_lr=per_step_lr, seed=seed)


# --- kernel ridge regression (KIP) --------------------------------------------------------------
def rbf_kernel(A: Tensor, B: Tensor, gamma: float) -> Tensor:
    """k(a, b) = exp(−γ ‖a − b‖² / d), d the input dimension."""
    sq = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2 * A @ B.T
    return torch.exp(-gamma * sq.clamp_min(0) / A.shape[1])


@dataclass
class KernelDistillation:
    """KIP's problem (module docstring): support images as x, KRR coefficients α as y."""

    problem: Problem
    x0: dict[str, Tensor]
    labels: Tensor
    targets: Tensor
    data: dict[str, tuple[Tensor, Tensor]]
    ipc: int
    gamma: float
    n_classes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def one_hot(self, t: Tensor) -> Tensor:
        """Regression targets: one-hot minus 1/C."""
        hot = torch.nn.functional.one_hot(t, self.n_classes).to(self.x0["images"].dtype)
        return hot - 1.0 / self.n_classes

    def solve(self, x: dict[str, Tensor], *, labels: Tensor | None = None) -> Tensor:
        """α*(x) = (K_ss + λI)⁻¹ Y_s, differentiable in x (for :class:`ClosedForm`); ``labels``
        replace the support labels (e.g. a real support set of any size)."""
        S = x["images"]
        Y = self.targets if labels is None else self.one_hot(labels)
        K = rbf_kernel(S, S, self.gamma)
        lam = x["log_reg"].exp()
        return torch.linalg.solve(K + lam * torch.eye(len(S), dtype=S.dtype, device=S.device), Y)

    def estimator(self) -> ClosedForm:
        return ClosedForm(self.solve)

    def start(self) -> tuple[dict[str, Tensor], Tensor]:
        return {k: v.clone() for k, v in self.x0.items()}, torch.zeros_like(self.targets)

    def predict(self, images: Tensor, log_reg: float | Tensor, X: Tensor,
                labels: Tensor | None = None) -> Tensor:
        """KRR scores K(X, support) α* for support ``images`` (with ``labels``, default the support's)."""
        x = {"images": images, "log_reg": torch.as_tensor(log_reg, dtype=images.dtype)}
        with torch.no_grad():
            return rbf_kernel(X, images, self.gamma) @ self.solve(x, labels=labels)

    def accuracy(self, images: Tensor, log_reg: float | Tensor, split: str = "test",
                 labels: Tensor | None = None) -> float:
        """Accuracy on ``split`` of the KRR predictor with support ``images``."""
        X, t = self.data[split]
        return float((self.predict(images, log_reg, X, labels).argmax(1) == t).to(torch.float64).mean())


def kernel_distillation(
    ipc: int = 1,
    *,
    gamma: float = 1.0,
    reg0: float = 1e-2,
    data: dict[str, tuple[Tensor, Tensor]] | None = None,
    n_train: int = 4000,
    n_test: int = 1000,
    downsample: int = 1,
    init: str = "noise",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> KernelDistillation:
    """KIP on the bundled MNIST sample: x0 = N(0, 1) (or random real, ``init``) images and
    log λ = log reg0; y = α (n_s, C)."""
    if ipc < 1 or gamma <= 0 or reg0 <= 0:
        raise ConfigError(f"need ipc ≥ 1, gamma > 0, reg0 > 0; got {ipc}, {gamma}, {reg0}")
    data = data if data is not None else load_distillation_data(n_train, n_test, downsample=downsample,
                                                               seed=seed, dtype=dtype, device=device)
    Xtr, ttr = data["train"]
    n_classes = int(ttr.max()) + 1
    labels = _support_labels(n_classes, ipc).to(Xtr.device)
    images = _initial_images(data, ipc, n_classes, init, seed)
    x0 = {"images": images, "log_reg": torch.tensor(math.log(reg0), dtype=Xtr.dtype, device=Xtr.device)}
    kd = KernelDistillation(problem=None, x0=x0, labels=labels, targets=None, data=data,  # type: ignore[arg-type]
                            ipc=ipc, gamma=gamma, n_classes=n_classes)
    kd.targets = kd.one_hot(labels)

    def upper(x: dict[str, Tensor], alpha: Tensor, batch: tuple[Tensor, Tensor] | None = None) -> Tensor:
        X, t = data["train"] if batch is None else batch
        r = rbf_kernel(X, x["images"], gamma) @ alpha - kd.one_hot(t)
        return 0.5 * r.pow(2).sum() / len(X)

    def lower(x: dict[str, Tensor], alpha: Tensor) -> Tensor:
        S = x["images"]
        K = rbf_kernel(S, S, gamma)
        quad = (alpha * (K @ alpha)).sum() + x["log_reg"].exp() * alpha.pow(2).sum()
        return 0.5 * quad - (alpha * kd.targets).sum()

    kd.problem = Problem(upper, lower, name="kernel-distillation")
    return kd
