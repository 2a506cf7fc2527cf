"""EvoGrad: a first-order hypergradient through a softmax-weighted average of perturbed weights.

Bohdal, Yang & Hospedales 2021 (EvoGrad), Alg. 1; survey 2207.11719, Sec. 4.2, Eq. 34–35. From
the lower point y (after ``inner``), K copies y_k = y + σ ε_k (ε_k ~ N(0, I)) are scored by the
lower loss and averaged:

    l_k(x) = g(x, y_k),   w = softmax(−[l_1, …, l_K] / τ),   y'(x) = Σ_k w_k(x) y_k,
    ∇̂h(x) = d/dx f(x, y'(x)) = ∇_x f(x, y') − (1/τ) Σ_k w_k (c_k − c̄) ∇_x g(x, y_k),

with c_k = <y_k − y', ∇_y f(x, y')> and c̄ = Σ_k w_k c_k (the y_k are constants: the derivative
runs through the weights only; a start y0(x) that depends on x contributes nothing). One value
and ∇_x of g per copy and one gradient of f: no second derivatives and no graph across steps.

What it converges to (our derivation, tested in tests/hypergrad/test_proxy.py): near a minimiser
g(x, y + σε) ≈ g + σ<∇_y g, ε> + (σ²/2) εᵀHε, so for K → ∞ the weights tilt N(0, I) into the
Gaussian N(−(σ/τ)Σ∇_y g, Σ) with Σ = (I + (σ²/τ) H)⁻¹, and the estimate tends to

    ∇_x f(x, y') − ∇²_xy g (H + λ I)⁻¹ ∇_y f(x, y'),   λ = τ / σ²,   y' = y − (H + λI)⁻¹ ∇_y g,

the *damped* implicit hypergradient at a proximal step from y (for a g quadratic in y with ∇_x g
affine in y, e.g. ridge with a learned prior mean, exactly so at any σ). It approaches the exact
hypergradient when λ ≪ λ_min(H), i.e. τ ≪ σ² λ_min(H) — where the weights are peaked and the
effective sample size 1/Σ_k w_k² (``info["ess"]``) is small, so K must grow. For λ ≫ λ_max(H)
it is (1/λ) times the one-step term, −(σ²/τ) ∇²_xy g ∇_y f.

The K evaluations run batched (:func:`bilevel.oracles.grads_at`: one ``torch.func.vmap``,
``chunk`` copies at a time) or, ``batched=False``, one after another (the reference path;
autograd's saved-tensor probe sees only this one). The generator state travels in
the estimator state (``state["rng"]``) as in :class:`~bilevel.hypergrad.ZerothOrder`.
"""

from __future__ import annotations

import math

import torch

from .. import _tree as T
from .. import oracles as O
from .._rng import advancing, initial_state
from ..errors import ConfigError
from ..formulation import Bound
from ..inner import Dynamics
from ..validation import check_finite
from .base import Estimator, solve_lower

__all__ = ["EvoGrad"]


class EvoGrad(Estimator):
    """EvoGrad's hypergradient (see the module docstring).

    Args:
        inner: lower-level dynamics from the given y (no graph), or ``None`` (use y as is).
        samples: K perturbed copies per call (>= 2: with one copy the weight is constant).
        sigma: perturbation scale σ > 0; tau: softmax temperature τ > 0.
        seed: seeds the generator of :meth:`init_state` (None: a fresh random seed).
        batched / chunk: vmapped evaluation of the K copies (see the module docstring).

    Returns: ``res.grad`` = d/dx f(x, y'(x)); ``res.y`` = y_T (the unperturbed lower point, for
    warm starts); ``res.info``: ``ess`` (effective sample size 1/Σw²), ``weights`` (K),
    ``proxy_shift`` = ‖y' − y_T‖, ``samples``.

    Reference: Bohdal, Yang & Hospedales 2021 (EvoGrad, NeurIPS), Alg. 1.
    """

    reference = "Bohdal, Yang & Hospedales 2021 (EvoGrad), Alg. 1; survey 2207.11719 Eq. 34-35"
    state_keys = ("rng",)
    shared_state = ("rng",)

    def __init__(
        self, inner: Dynamics | None, samples: int = 2, sigma: float = 1e-3, tau: float = 0.05,
        seed: int | None = 0, *, batched: bool = True, chunk: int | None = None,
    ):
        if int(samples) < 2:
            raise ConfigError(f"EvoGrad needs samples >= 2 (one copy has weight 1 whatever x), "
                              f"got {samples}")
        for name, v in (("sigma", sigma), ("tau", tau)):
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"EvoGrad: {name} must be positive and finite, got {v}")
        if chunk is not None and int(chunk) < 1:
            raise ConfigError(f"EvoGrad: chunk must be >= 1 (or None), got {chunk}")
        if chunk is not None and not batched:
            raise ConfigError("EvoGrad: chunk is only used with batched=True")
        self.inner = inner
        self.samples = int(samples)
        self.sigma = float(sigma)
        self.tau = float(tau)
        self.seed = seed
        self.batched = bool(batched)
        self.chunk = None if chunk is None else int(chunk)

    def init_state(self, bound: Bound) -> dict:
        return {"rng": initial_state(self.seed)}

    def compute(self, bound: Bound, state: dict):
        xs = bound.xs
        ys, info = solve_lower(bound, self.inner, xs, bound.init(xs))
        y = T.to_vector(ys)
        with advancing(state) as gen:
            E = torch.randn(self.samples, y.numel(), generator=gen, dtype=torch.float64)
        D = self.sigma * E.to(dtype=y.dtype, device=y.device)  # y_k − y
        l, GX, _ = O.grads_at(bound.G, xs, ys, None, y + D, batched=self.batched,
                              chunk=self.chunk)
        check_finite([l, GX], "lower", "g or ∇_x g at a perturbed copy y + σε (reduce sigma)")
        w = torch.softmax(-(l - l.min()) / self.tau, dim=0)
        shift = w @ D                                          # y' − y
        yp = T.from_vector(y + shift, ys)
        _, gx, gy = O.grads(bound.upper_with(info), xs, yp)  # (f with any carried buffers)
        c = (D - shift) @ T.to_vector(gy)                      # c_k − c̄ (no cancellation)
        hg = T.to_vector(gx) - ((w * c) @ GX) / self.tau
        info.update({"samples": self.samples, "weights": w.detach(),
                     "ess": (1.0 / (w * w).sum()).detach(), "proxy_shift": shift.norm().detach()})
        return T.from_vector(hg, xs), ys, info, state
