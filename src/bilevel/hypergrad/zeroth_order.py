"""Partial zeroth-order hypergradient: the response Jacobian from perturbed inner trajectories.

PZOBO (Sow, Ji & Liang 2022, Alg. 1; reproduction report sec. 7.3): for Gaussian u_j ~ N(0, I),

    δ_j = [y_N(x + μ u_j) − y_N(x)] / μ,
    ∇̂h(x) = ∇_x f(x, y_N) + (1/Q) Σ_j <δ_j, ∇_y f(x, y_N)> u_j,

with every trajectory run on the same batches from the same y0 (from y0(x + μu) when the
initialization depends on x, so the estimate includes that path too). Only gradients of g are
used — no Hessian- or Jacobian-vector products. E[u uᵀ] = I, so as μ → 0 the estimate is an
unbiased estimate of the unrolled hypergradient, with variance O(dim(x)/Q).

All Q + 1 trajectories (the unperturbed one folded in as direction 0) run as ONE batched unroll:
``torch.func.vmap`` over the stacked points x + μ u_j with the pure ``torch.func`` oracles
(:func:`bilevel.oracles.backend`), in chunks of at most ``chunk`` trajectories (default: about
2^21 lower-variable entries per chunk), so the cost per step is one batched gradient instead of
Q + 1 separate ones. ``batched=False`` runs them one after another (the reference path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .. import _tree as T
from .. import compiled as C
from .. import oracles as O
from .._rng import advancing, initial_state
from .._trace import require, traced, tracing
from ..errors import ConfigError, NonFiniteError
from ..formulation import Bound
from ..inner import Dynamics
from .base import Estimator, solve_lower


class ZerothOrder(Estimator):
    """PZOBO's estimator (see module docstring). ``samples``: Q directions per call; ``mu``: the
    perturbation size; ``seed``: seeds the generator of :meth:`init_state` (None: a fresh random
    seed). The generator state travels in the estimator state (``state["rng"]``, a uint8 tensor),
    so a run resumed from a saved state draws the same directions; the directions of a call are
    returned in ``info["directions"]`` (a (Q, dim x) matrix). ``batched`` / ``chunk``: see the
    module docstring.
    """

    reference = "Sow, Ji & Liang 2022 (PZOBO), Alg. 1"
    state_keys = ("rng",)
    shared_state = ("rng",)  # under hypergrad.vmap every task draws the same directions

    def __init__(
        self, inner: Dynamics, samples: int = 10, mu: float = 1e-3, seed: int | None = 0, *,
        batched: bool = True, chunk: int | None = None,
    ):
        if int(samples) < 1 or not mu > 0:
            raise ValueError(f"ZerothOrder needs samples >= 1 and mu > 0, got {samples}, {mu}")
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1 (or None), got {chunk}")
        self.inner = inner
        self.samples = int(samples)
        self.mu = float(mu)
        self.seed = seed
        self.batched = bool(batched)
        self.chunk = None if chunk is None else int(chunk)

    def init_state(self, bound: Bound) -> dict:
        return {"rng": initial_state(self.seed)}

    def compute(self, bound: Bound, state: dict):
        xs = bound.xs
        with advancing(state) as gen:
            U = gaussian_directions(self.samples, xs, gen)

        def run(x_pert: T.Leaves) -> T.Leaves:  # (perturbed runs carry no buffers)
            return solve_lower(bound, self.inner, x_pert, bound.init(x_pert), carry=False)[0]

        if self.batched and bound.carries:
            raise ConfigError(
                "ZerothOrder(batched=True) runs the perturbed trajectories under vmap, where the "
                "problem's carried buffers cannot follow; pass batched=False")
        if self.batched:
            if C.estimators_compiled():
                C.fallback(self, "compiled kernels do not run inside torch.func.vmap",
                           "its trajectories batched by torch.func.vmap (functional oracles)")
            hg, ys = zeroth_order_estimate(bound.F, run, xs, U, self.mu, bound.ys0,
                                           chunk=self.chunk)
            info = {"steps": self.inner.steps}
        else:
            ys, info = solve_lower(bound, self.inner, xs, bound.init(xs))
            hg = zeroth_order_hypergradient(bound.upper_with(info), run, xs, ys, U, self.mu,
                                            batched=False)
        info["samples"] = self.samples
        info["directions"] = U
        return hg, ys, info, state


def gaussian_directions(samples: int, like: T.Leaves, generator: torch.Generator) -> torch.Tensor:
    """``samples`` directions u_j ~ N(0, I) in the flat space of ``like`` (drawn in float64 so a
    seed gives the same directions in any dtype), as a (samples, dim) matrix."""
    U = torch.randn(samples, T.numel(like), generator=generator, dtype=torch.float64)
    return U.to(dtype=like[0].dtype, device=like[0].device)


def zeroth_order_hypergradient(
    F: O.Fn,
    run_lower: Callable[[T.Leaves], T.Leaves],
    xs: T.Leaves,
    ys: T.Leaves,
    U: torch.Tensor,
    mu: float,
    *,
    batched: bool = True,
    chunk: int | None = None,
) -> T.Leaves:
    """The partial zeroth-order estimate  ∇_x F(x, y_N) + (1/Q) Σ_j <δ_j, ∇_y F(x, y_N)> u_j  with
    δ_j = (run_lower(x + μ u_j) − y_N) / μ, ``ys`` = y_N = run_lower(x) and the rows of ``U`` the
    directions u_j. ``run_lower`` must replay the same inner trajectory (same start, same batches)
    at every point. ``batched``: all directions in one vmapped run (see the module docstring);
    otherwise one call per direction. Shared by :class:`ZerothOrder` and the stochastic solvers
    PZOBO and MRBO-ZO (which use :func:`zeroth_order_estimate`, y_N folded into the batch).
    """
    if batched:
        Y = batched_lower(run_lower, xs, U, mu, ys, chunk=chunk)
        return _estimate(F, xs, ys, Y, U, mu)
    _, gx, gy = O.grads(F, xs, ys)
    coef = []
    for u in U:
        y_pert = run_lower(T.axpy(mu, T.from_vector(u, xs), xs))
        coef.append(T.dot(T.sub(y_pert, ys), gy) / mu)
    est = (torch.stack(coef) @ U) / U.shape[0]
    return T.add(gx, T.from_vector(est, xs))


def zeroth_order_estimate(
    F: O.Fn,
    run_lower: Callable[[T.Leaves], T.Leaves],
    xs: T.Leaves,
    U: torch.Tensor,
    mu: float,
    like: T.Leaves,
    *,
    chunk: int | None = None,
) -> tuple[T.Leaves, T.Leaves]:
    """(estimate, y_N): :func:`zeroth_order_hypergradient` with the unperturbed trajectory
    y_N = run_lower(x) computed in the same batched run (as direction 0); ``like``: the lower
    variable (sizes the chunks)."""
    zero = torch.zeros_like(U[:1])
    Y = batched_lower(run_lower, xs, torch.cat([zero, U]), mu, like, chunk=chunk)
    ys = tuple(t[0] for t in Y)
    return _estimate(F, xs, ys, tuple(t[1:] for t in Y), U, mu), ys


def _estimate(F: O.Fn, xs: T.Leaves, ys: T.Leaves, Y: T.Leaves, U: torch.Tensor, mu: float):
    _, gx, gy = O.grads(F, xs, ys)
    D = T.to_vector_batched(tuple(a - b for a, b in zip(Y, ys)))  # (Q, dim y): μ δ_j
    coef = (D @ T.to_vector(gy)) / mu
    return T.add(gx, T.from_vector((coef @ U) / U.shape[0], xs))


def default_chunk(like: T.Leaves) -> int:
    """Trajectories per vmapped chunk: about 2^21 lower-variable entries (at least one)."""
    return max(1, (1 << 21) // max(1, T.numel(like)))


def batched_lower(
    run_lower: Callable[[T.Leaves], T.Leaves],
    xs: T.Leaves,
    U: torch.Tensor,
    mu: float,
    like: T.Leaves,
    *,
    chunk: int | None = None,
) -> T.Leaves:
    """run_lower(x + μ u_j) for every row u_j of ``U``, as leaves with a leading (Q,) dimension:
    ``vmap`` over the directions with the ``torch.func`` oracles, ``chunk`` trajectories at a time
    (default :func:`default_chunk` of ``like``, the lower variable). A non-finite trajectory raises
    :class:`~bilevel.errors.NonFiniteError` (the unperturbed one with its step)."""
    Q = U.shape[0]
    size = default_chunk(like) if chunk is None else int(chunk)
    outs: list[T.Leaves] = []
    for lo in range(0, Q, size):
        D = T.from_vector(U[lo : lo + size], xs)
        Xp = tuple(x + mu * d for x, d in zip(xs, D))
        # (traced: checks inside this inner vmap cannot leave it; Y is checked below instead)
        with O.backend("func"), (traced() if tracing() else contextlib.nullcontext()), \
                O.batched(D[0].shape[0]):  # (vmap: one count per oracle for all the trajectories)
            outs.append(tuple(torch.func.vmap(lambda *x: tuple(run_lower(tuple(x))))(*Xp)))
    Y = tuple(torch.cat(parts) for parts in zip(*outs))
    if tracing():  # under hypergrad.vmap: checked per task after the transform
        require(torch.stack([torch.isfinite(t).all() for t in Y]).all(), lambda: NonFiniteError(
            "non-finite values (NaN/inf) in a perturbed lower-level trajectory y_N(x + μ u_j) of "
            f"the zeroth-order estimator (μ = {mu})", level="lower"))
        return Y
    if not all(bool(torch.isfinite(t).all()) for t in Y):
        run_lower(xs)  # raises with the step if the unperturbed trajectory blows up
        raise NonFiniteError(
            "non-finite values (NaN/inf) in a perturbed lower-level trajectory y_N(x + μ u_j) of "
            f"the zeroth-order estimator (μ = {mu}); reduce μ or the inner step size",
            level="lower", step=None)
    return Y
