"""Partial zeroth-order hypergradient: the response Jacobian from perturbed inner trajectories.

PZOBO (Sow, Ji & Liang 2022, Alg. 1): for Gaussian u_j ~ N(0, I),

    δ_j = [y_N(x + μ u_j) − y_N(x)] / μ,
    ∇̂h(x) = ∇_x f(x, y_N) + (1/Q) Σ_j <δ_j, ∇_y f(x, y_N)> u_j,

with every trajectory run on the same batches from the same y0 (from y0(x + μu) when the
initialization depends on x, so the estimate includes that path too). Only gradients of g are
used — no Hessian- or Jacobian-vector products. E[u uᵀ] = I, so as μ → 0 the estimate is an
unbiased estimate of the unrolled hypergradient, with variance O(dim(x)/Q).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _tree as T
from .. import oracles as O
from ..formulation import Bound
from ..inner import Dynamics
from .base import Estimator, solve_lower


class ZerothOrder(Estimator):
    """PZOBO's estimator (see module docstring). ``samples``: Q directions per call; ``mu``: the
    perturbation size; ``seed``: seeds the generator of :meth:`init_state` (None: a fresh random
    seed). The generator state travels in the estimator state (``state["rng"]``, a uint8 tensor),
    so a run resumed from a saved state draws the same directions; the directions of a call are
    returned in ``info["directions"]`` (a (Q, dim x) matrix).
    """

    reference = "Sow, Ji & Liang 2022 (PZOBO), Alg. 1"
    state_keys = ("rng",)
    shared_state = ("rng",)  # under hypergrad.vmap every task draws the same directions

    def __init__(self, inner: Dynamics, samples: int = 10, mu: float = 1e-3, seed: int | None = 0):
        self.inner = inner
        self.samples = int(samples)
        self.mu = float(mu)
        self.seed = seed

    def init_state(self, bound: Bound) -> dict:
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(self.seed))
        return {"rng": gen.get_state()}

    def compute(self, bound: Bound, state: dict):
        xs = bound.xs
        ys, info = solve_lower(bound, self.inner, xs, bound.init(xs))
        gen = torch.Generator().set_state(state["rng"])
        U = gaussian_directions(self.samples, xs, gen)
        state["rng"] = gen.get_state()

        def run(x_pert: T.Leaves) -> T.Leaves:
            return solve_lower(bound, self.inner, x_pert, bound.init(x_pert))[0]

        hg = zeroth_order_hypergradient(bound.F, run, xs, ys, U, self.mu)
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
) -> T.Leaves:
    """The partial zeroth-order estimate  ∇_x F(x, y_N) + (1/Q) Σ_j <δ_j, ∇_y F(x, y_N)> u_j  with
    δ_j = (run_lower(x + μ u_j) − y_N) / μ, ``ys`` = y_N = run_lower(x) and the rows of ``U`` the
    directions u_j. ``run_lower`` must replay the same inner trajectory (same start, same batches)
    at every point; it is called once per direction. Shared by :class:`ZerothOrder` and the
    stochastic solvers PZOBO and MRBO-ZO.
    """
    _, gx, gy = O.grads(F, xs, ys)
    coef = []
    for u in U:
        y_pert = run_lower(T.axpy(mu, T.from_vector(u, xs), xs))
        coef.append(T.dot(T.sub(y_pert, ys), gy) / mu)
    est = (torch.stack(coef) @ U) / U.shape[0]
    return T.add(gx, T.from_vector(est, xs))
