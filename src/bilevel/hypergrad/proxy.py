"""Best-response proxies: a hypernetwork y_φ(x) fitted to the lower level, differentiated through.

Survey 2207.11719, Sec. 4.2, Eq. 33: instead of solving the lower level for each x, fit a map
P_φ(x) ≈ y*(x) by minimising the lower objective along it, and take the hypergradient through it:

    φ ← φ − η ∇_φ E_{x̃ ~ p}[ g(x̃, y_φ(x̃)) ]                      (fitting, ``steps`` per call)
    ∇̂h(x) = d/dx f(x, y_φ(x)) = ∇_x f(x, y_φ(x)) + (∂y_φ/∂x)^T ∇_y f(x, y_φ(x)).

* global fitting (Lorraine & Duvenaud 2018, Alg. 1): x̃ drawn over the domain, uniform in a box
  ``box=(low, high)`` or Gaussian ``c + radius·N(0, I)`` around the center c (x at ``init``);
* local fitting (self-tuning networks, MacKay et al. 2019, Alg. 1; Lorraine & Duvenaud 2018,
  Alg. 2): x̃ = x + radius·N(0, I) around the current x, a few φ steps per call, so the proxy
  tracks the best response near the iterate. A linear-in-x proxy is STN's best-response
  approximation: locally, y*(x̃) ≈ y*(x) + (dy*/dx)(x̃ − x); ``"structured"`` adds their
  per-unit structure.

Architectures (on the flattened variables, m = dim x, d = dim y, c the center):

* ``"linear"``: y_φ(x) = a + U (x − c), φ = (a ∈ R^d, U ∈ R^{d×m}); a starts at y0, U at 0.
  When y*(x) is affine in x (a ridge problem with a learned prior mean) it is exact everywhere.
* ``"structured"``: STN's structured best response (MacKay et al. 2019, Sec. 4.2: each unit's
  weights scaled by a linear function of x), y_φ(x) = a + b ⊙ E V(x − c), where V ∈ R^{u×m}
  gives one scale per unit (row of a weight leaf, entry of a bias; :func:`units`) and E copies it
  to the unit's entries; φ = (a, b ∈ R^d, V), O(d + u·m) parameters instead of O(d·m);
  a = y0, b = 1, V = 0 at the start;
* ``"mlp"``: y_φ(x) = a + W₂ tanh(W₁ (x − c) + b₁) with ``hidden`` units; W₁ ~ N(0, 1/m)
  (from the seed), b₁ = 0, W₂ = 0 (so it starts as the constant a = y0).

Global fitting only teaches the proxy the box (or the Gaussian's bulk): an x outside it gets an
extrapolation. The proxy replaces the lower solve, so a lower-level projection (``y_projection``
of :func:`bilevel.solve`) is not applied to y_φ(x).

State is data: φ, the Adam moments of its optimiser, the center, the generator state and the
number of fitting steps so far live in the estimator state (``torch.save``-able), so a resumed
run is exact. The start ``y`` passed to a call is only used by :meth:`init` (a = y0); every
later call returns the proxy's y_φ(x). The fitting gradient is ∇_φ g = (∂y_φ/∂φ)^T ∇_y g: one
lower gradient per sample x̃ (:func:`bilevel.oracles.grads_at`) and one vector-Jacobian product
through the proxy (:func:`bilevel.oracles.vjp`); no second derivatives of g or f.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _tree as T
from .. import oracles as O
from ..errors import ConfigError
from ..formulation import Bound
from ..inner import Adam
from ..validation import check_finite
from .base import Estimator, seeded_generator

__all__ = ["Hypernetwork", "STN", "proxy_apply", "units"]

ARCHS = ("linear", "structured", "mlp")
FITS = ("global", "local")


def units(ys: T.Leaves) -> Tensor:
    """For each entry of the flat lower variable, the index of its unit (the row of its leaf:
    an output unit of a weight matrix (out, ...), one entry of a bias; a 0-dim leaf is one unit)."""
    idx, base = [], 0
    for t in ys:
        rows = t.shape[0] if t.dim() >= 1 else 1
        per = t.numel() // max(rows, 1)
        idx.append(base + torch.arange(rows, device=t.device).repeat_interleave(per))
        base += rows
    return torch.cat(idx)


def proxy_apply(arch: str, phi: T.Leaves, center: Tensor, X: Tensor, unit: Tensor | None = None) -> Tensor:
    """y_φ at the rows of ``X`` ((S, m) flat upper points) as an (S, d) matrix (``unit``: the
    entry -> unit map of :func:`units`, for ``"structured"``)."""
    Z = X - center
    if arch == "linear":
        a, U = phi
        return a + Z @ U.T
    if arch == "structured":
        a, b, V = phi
        return a + b * (Z @ V.T)[..., unit]
    a, W1, b1, W2 = phi
    return a + torch.tanh(Z @ W1.T + b1) @ W2.T


class Hypernetwork(Estimator):
    """Best-response hypernetwork (see the module docstring).

    Args:
        arch: ``"linear"``, ``"structured"`` or ``"mlp"``; ``hidden``: units of the MLP (default 16;
            MLP only).
        fit: ``"global"`` (x̃ over the domain) or ``"local"`` (x̃ around the current x; :class:`STN`).
        radius: standard deviation of the Gaussian x̃ (default 0.5 global, 0.1 local); not with ``box``.
        box: ``(low, high)`` (numbers or tensors shaped like the flat x): global fitting draws x̃
            uniformly in it (global only).
        samples: x̃ per fitting step; steps: fitting steps per call; warmup: extra fitting
            steps at the first call (global fitting: fit once, then keep up).
        lr: Adam step of the fitting; seed: seeds the generator of :meth:`init_state` (None: fresh).
        batched: the S lower gradients of a fitting step in one vmapped call
            (:func:`bilevel.oracles.grads_at`); ``False``: one after another.

    Returns: ``res.grad`` = d/dx f(x, y_φ(x)); ``res.y`` = y_φ(x); ``res.info``: ``fit_loss``
    (mean g over the last fitting batch), ``fit_steps`` (this call), ``fit_steps_total``,
    ``proxy_grad_norm`` = ‖∇_y g(x, y_φ(x))‖ (how far the proxy's point is from stationary).

    Reference: Lorraine & Duvenaud 2018 (Alg. 1 global, Alg. 2 local); MacKay et al. 2019 (STN).
    """

    reference = "Lorraine & Duvenaud 2018 (hypernetworks, Alg. 1-2); survey 2207.11719 Eq. 33"
    state_keys = ("phi", "opt", "center", "rng", "fit_steps")
    shared_state = ("rng",)
    default_fit = "global"

    def __init__(
        self,
        arch: str = "linear",
        fit: str | None = None,
        *,
        hidden: int | None = None,
        radius: float | None = None,
        box: tuple[Any, Any] | None = None,
        samples: int = 8,
        steps: int = 10,
        warmup: int = 0,
        lr: float = 1e-2,
        seed: int | None = 0,
        batched: bool = True,
    ):
        fit = self.default_fit if fit is None else fit
        name = type(self).__name__
        if arch not in ARCHS:
            raise ConfigError(f"{name}: arch must be one of {ARCHS}, got {arch!r}")
        if fit not in FITS:
            raise ConfigError(f"{name}: fit must be one of {FITS}, got {fit!r}")
        if hidden is not None and arch != "mlp":
            raise ConfigError(f"{name}: hidden={hidden} is only used with arch='mlp'")
        if arch == "mlp" and int(16 if hidden is None else hidden) < 1:
            raise ConfigError(f"{name}: hidden must be >= 1, got {hidden}")
        if box is not None:
            if fit != "global":
                raise ConfigError(f"{name}: box is only used by global fitting (fit='global'); "
                                  "local fitting draws x̃ = x + radius·N(0, I)")
            if radius is not None:
                raise ConfigError(f"{name}: give either box (uniform x̃) or radius (Gaussian x̃), "
                                  "not both")
            if not isinstance(box, (tuple, list)) or len(box) != 2:
                raise ConfigError(f"{name}: box must be a pair (low, high), got {box!r}")
            low, high = (torch.as_tensor(b, dtype=torch.float64) for b in box)
            finite = bool(torch.isfinite(low).all() & torch.isfinite(high).all())
            if not finite or not bool(torch.all(high > low)):
                raise ConfigError(f"{name}: box needs finite low < high, got {box!r}")
        elif radius is not None and not (radius > 0 and math.isfinite(radius)):
            raise ConfigError(f"{name}: radius must be positive and finite, got {radius}")
        if int(samples) < 1:
            raise ConfigError(f"{name}: samples must be >= 1, got {samples}")
        if int(steps) < 0 or int(warmup) < 0:
            raise ConfigError(f"{name}: steps and warmup must be >= 0, got {steps}, {warmup}")
        if int(steps) + int(warmup) == 0:
            raise ConfigError(f"{name}: steps = warmup = 0 would never fit the proxy")
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"{name}: lr must be positive and finite, got {lr}")
        self.arch = arch
        self.fit = fit
        self.hidden = (16 if hidden is None else int(hidden)) if arch == "mlp" else None
        self.radius = None if box is not None else float(
            radius if radius is not None else (0.5 if fit == "global" else 0.1))
        self.box = None if box is None else tuple(box)
        self.samples = int(samples)
        self.steps = int(steps)
        self.warmup = int(warmup)
        self.lr = float(lr)
        self.seed = seed
        self.batched = bool(batched)
        self._opt = Adam(lr=self.lr, steps=1)

    # -- state -------------------------------------------------------------------------------
    def init_state(self, bound: Bound) -> dict[str, Any]:
        gen = seeded_generator(self.seed)
        x = T.to_vector(bound.xs).detach()
        y0 = T.to_vector(T.detach(bound.init(bound.xs))).detach()
        m, d = x.numel(), y0.numel()
        if self.box is not None and any(torch.as_tensor(b).numel() not in (1, m) for b in self.box):
            raise ConfigError(f"{type(self).__name__}: box bounds must be numbers or have dim x = {m} "
                              "entries (the flattened upper variable)")
        like = {"dtype": y0.dtype, "device": y0.device}
        if self.arch == "linear":
            phi = (y0.clone(), torch.zeros(d, m, **like))
        elif self.arch == "structured":
            u = int(units(bound.ys0).max()) + 1
            phi = (y0.clone(), torch.ones(d, **like), torch.zeros(u, m, **like))
        else:
            h = self.hidden
            W1 = torch.randn(h, m, generator=gen, dtype=torch.float64) / math.sqrt(m)
            phi = (y0.clone(), W1.to(**like), torch.zeros(h, **like), torch.zeros(d, h, **like))
        opt = tuple(self._opt.init(phi)[len(phi):])
        return {"phi": phi, "opt": opt, "center": x.to(**like), "rng": gen.get_state(),
                "fit_steps": 0}

    # -- fitting -----------------------------------------------------------------------------
    def draw(self, x: Tensor, center: Tensor, gen: torch.Generator) -> Tensor:
        """The fitting points x̃ of one step, an (S, m) matrix (drawn in float64)."""
        S, m = self.samples, x.numel()
        if self.box is not None:
            low, high = (torch.as_tensor(b, dtype=torch.float64).expand(m) for b in self.box)
            X = low + (high - low) * torch.rand(S, m, generator=gen, dtype=torch.float64)
        else:
            base = center if self.fit == "global" else x
            X = base.double() + self.radius * torch.randn(S, m, generator=gen, dtype=torch.float64)
        return X.to(dtype=x.dtype, device=x.device)

    def fit_step(self, bound: Bound, phi: T.Leaves, opt: T.Leaves, center: Tensor, X: Tensor,
                 k: int, unit: Tensor | None = None) -> tuple[T.Leaves, T.Leaves, Tensor]:
        """One Adam step on φ for the mean of g(x̃_s, y_φ(x̃_s)) over the rows x̃_s of X; returns
        (φ, optimiser moments, the mean lower value before the step)."""
        xs, ys = bound.xs, bound.ys0
        with torch.no_grad():
            Y = proxy_apply(self.arch, phi, center, X, unit)
        vals, _, GY = O.grads_at(bound.G, xs, ys, X, Y, batched=self.batched)
        cot = GY / X.shape[0]
        gphi = O.vjp(lambda p: (proxy_apply(self.arch, p, center, X, unit),), phi, (cot,))
        new = self._opt.update(tuple(phi) + tuple(opt), gphi, k)
        n = len(phi)
        return tuple(new[:n]), tuple(new[n:]), vals.mean().detach()

    def compute(self, bound: Bound, state: dict[str, Any]):
        if bound.carries:  # no lower trajectory to step running statistics along
            raise ConfigError(
                f"{type(self).__name__} fits a best-response proxy instead of running lower "
                "dynamics, so it cannot carry the problem's buffers (Problem(buffers=...)); use an "
                "estimator with inner dynamics")
        xs = bound.xs
        x = T.to_vector(xs)
        phi, opt, center = tuple(state["phi"]), tuple(state["opt"]), state["center"]
        if center.numel() != x.numel() or phi[0].numel() != T.numel(bound.ys0):
            raise ConfigError(f"{type(self).__name__}: the state was made for dim x = "
                              f"{center.numel()}, dim y = {phi[0].numel()}; this problem has "
                              f"{x.numel()}, {T.numel(bound.ys0)}")
        unit = units(bound.ys0) if self.arch == "structured" else None
        gen = torch.Generator().set_state(state["rng"])
        k0 = int(state["fit_steps"])
        n = self.steps + (self.warmup if k0 == 0 else 0)
        fit_loss = torch.full((), float("nan"))
        for k in range(k0, k0 + n):
            X = self.draw(x, center, gen)
            phi, opt, fit_loss = self.fit_step(bound, phi, opt, center, X, k, unit)
        check_finite(phi, "lower", "the proxy's parameters φ after fitting (reduce lr)")

        def response(a: T.Leaves) -> T.Leaves:
            return T.from_vector(proxy_apply(self.arch, phi, center, T.to_vector(a)[None], unit)[0],
                                 bound.ys0)

        with torch.no_grad():
            yp = response(xs)
        _, gx, gy = O.grads(bound.F, xs, yp)
        hg = T.add(gx, O.vjp(response, xs, gy))
        info = {"fit_loss": fit_loss, "fit_steps": n, "fit_steps_total": k0 + n,
                "proxy_grad_norm": T.norm(O.grad_y(bound.G, xs, yp)).detach()}
        new_state = {"phi": T.detach(phi), "opt": T.detach(opt), "center": center,
                     "rng": gen.get_state(), "fit_steps": k0 + n}
        return hg, T.detach(yp), info, new_state


class STN(Hypernetwork):
    """Self-tuning network's local best-response fitting (MacKay et al. 2019, Alg. 1): a
    :class:`Hypernetwork` with ``fit="local"`` — x̃ = x + radius·N(0, I) around the current x,
    ``steps`` Adam steps on φ per call (default 5; ``warmup`` extra at the first call), then the
    hypergradient through y_φ. Default arch ``"linear"``: a linear-in-x best response;
    ``arch="structured"``: STN's per-unit structure (see the module docstring). STN's learned
    perturbation scale (its entropy term) is not modelled: ``radius`` is fixed.
    """

    reference = "MacKay et al. 2019 (self-tuning networks), Alg. 1; survey 2207.11719 Eq. 33"
    default_fit = "local"

    def __init__(self, arch: str = "linear", *, steps: int = 5, **kw: Any):
        if kw.get("fit", "local") != "local":
            raise ConfigError("STN fits locally; use Hypernetwork(fit='global') for global fitting")
        kw.pop("fit", None)
        super().__init__(arch, "local", steps=steps, **kw)
