"""Reverse-mode differentiation through the unrolled inner dynamics.

RHG / ITD (Franceschi et al. 2017, "Forward and reverse gradient-based hyperparameter
optimization", Sec. 2.1 reverse mode; Maclaurin et al. 2015): with y_{k+1} = Φ_k(x, y_k),

    dh/dx = ∇_x f(x, y_T) + Σ_k (∂_x Φ_k)^T a_{k+1},   a_T = ∇_y f(x, y_T),  a_k = (∂_y Φ_k)^T a_{k+1}.

``truncate=K`` keeps only the last K terms (T-RHG, Shaban et al. 2019, Alg. 1): the first T−K
steps run without a graph. ``checkpoint=True`` stores the state only every ⌈√K⌉ steps and
recomputes each segment during the backward sweep (Griewank & Walther 2008), so memory grows
like √K instead of K; ``checkpoint=c`` (int) sets the segment length. Both give the same
derivative as plain backpropagation (up to floating-point summation order).

Hooks for solvers that differentiate other trajectories through the same machinery:
``grad_fn(bound, xs, create_graph=...)`` replaces the lower gradient ∇_y g as the step direction
(e.g. BDA's aggregated UL/LL direction), and ``wrt_init=True`` also returns ∂f/∂y0 (the derivative
with respect to the starting point, for initialization-auxiliary methods) as ``info["grad_init"]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import _tree as T
from ..formulation import Bound
from ..inner import Dynamics, GradFn, unroll
from ..oracles import _grad, objective, rank_mean, record
from .base import Estimator, lower_grad_fn


class Reverse(Estimator):
    """Reverse-mode differentiation through the unrolled inner dynamics (RHG / ITD).

    With y_{k+1} = Φ_k(x, y_k) the steps of ``inner`` from the given y (or y0(x)):

        dh/dx = ∇_x f(x, y_T) + Σ_k (∂_x Φ_k)^T a_{k+1},  a_T = ∇_y f(x, y_T),  a_k = (∂_y Φ_k)^T a_{k+1}.

    Args:
        inner: the dynamics to unroll (``steps`` of them); their hyperparameters may be tensors.
        truncate: K ≤ steps: differentiate only the last K steps (T-RHG, Shaban et al. 2019).
        checkpoint: ``True`` stores the state every ⌈√K⌉ steps and recomputes segments in the
            backward sweep (memory ∝ √K); an int sets the segment length.
        grad_fn: ``(bound, xs, create_graph=...) -> direction``, replacing ∇_y g as the step
            direction (e.g. BDA's aggregated direction).
        wrt_init: also return ∂f/∂y0 as ``res.info["grad_init"]`` (needs the whole trajectory).

    Returns: ``res.grad`` (exact derivative of f(x, y_T(x))), ``res.y`` = y_T, ``res.info`` with
    ``steps``, ``truncate``, ``checkpoint`` (and ``segments`` when checkpointing).

    Reference: Franceschi, Donini, Frasconi & Pontil 2017, Sec. 2.1; Maclaurin et al. 2015;
    Shaban et al. 2019, Alg. 1.
    """

    reference = "Franceschi et al. 2017 (RHG); Shaban et al. 2019 (truncated, T-RHG)"

    def __init__(
        self,
        inner: Dynamics,
        truncate: int | None = None,
        checkpoint: bool | int = False,
        *,
        grad_fn: Callable[..., GradFn] | None = None,
        wrt_init: bool = False,
    ):
        if truncate is not None and not 0 < int(truncate) <= inner.steps:
            raise ValueError(f"truncate must be in [1, steps={inner.steps}], got {truncate}")
        if wrt_init and truncate is not None and int(truncate) < inner.steps:
            raise ValueError("wrt_init=True needs the whole trajectory (truncate=None or = steps)")
        self.inner = inner
        self.truncate = truncate
        self.checkpoint = checkpoint
        self.grad_fn = grad_fn  # None: the lower gradient ∇_y g
        self.wrt_init = wrt_init

    def _direction(self, bound: Bound, xs, *, create_graph: bool) -> GradFn:
        return (self.grad_fn or lower_grad_fn)(bound, xs, create_graph=create_graph)

    def compute(self, bound: Bound, state: dict):
        steps = self.inner.steps
        K = steps if self.truncate is None else int(self.truncate)
        xs = T.requires_grad(bound.xs)
        with torch.enable_grad():
            dyn = self.inner.bind(bound.x_tree(xs), bound.y_tree(bound.ys0))  # hyperparameters(x)
            if steps > K:  # T-RHG: the first T-K steps carry no derivative
                with torch.no_grad():
                    s0, _ = unroll(
                        dyn, self._direction(bound, xs, create_graph=False),
                        dyn.init(bound.init(T.detach(xs))), steps - K,
                    )
                s0 = T.detach(s0)
                init_graph = False
            else:
                y0 = bound.init(xs)
                if self.wrt_init:
                    if bound.y_fn is not None:
                        raise ValueError("wrt_init=True needs a fixed starting point, not y0(x)")
                    y0 = T.requires_grad(y0)
                s0 = dyn.init(y0)
                init_graph = bound.y_fn is not None
            wrt = xs + y0 if self.wrt_init else xs
            if self.checkpoint:
                seg = int(self.checkpoint) if not isinstance(self.checkpoint, bool) else 0
                gx, s_T, info = self._checkpointed(bound, xs, s0, K, steps - K, seg, init_graph)
                if self.wrt_init:  # adjoint of the start state -> derivative w.r.t. y0
                    with torch.enable_grad():
                        gx = gx + _grad(dyn.init(y0), y0, info.pop("adjoint"))
            else:
                s_T, info = unroll(dyn, self._direction(bound, xs, create_graph=True), s0, K,
                                   start=steps - K)
                F = objective(bound.F, xs, dyn.output(s_T))
                gx = _grad(F, wrt)
            gx = rank_mean(gx)  # data-parallel: per-rank shares -> derivative (else identity)
            if self.wrt_init:
                info["grad_init"] = T.detach(gx[len(xs) :])
                gx = gx[: len(xs)]
        # the reverse sweep applies (∂_y Φ_k)^T and (∂_x Φ_k)^T once per differentiated step
        record(bound.G, "hvp", "cross", times=K)
        info.update(steps=steps, truncate=K, checkpoint=bool(self.checkpoint))
        return T.detach(gx), T.detach(dyn.output(s_T)), info, state

    def _checkpointed(self, bound, xs, s0, K, start, seg, init_graph):
        """Segmented reverse sweep: store ⌈K/c⌉ states, recompute each segment with a graph."""
        with torch.enable_grad():
            dyn = self.inner.bind(bound.x_tree(xs), bound.y_tree(bound.ys0))
        c = seg if seg > 0 else max(1, math.isqrt(K - 1) + 1 if K > 1 else 1)
        bounds = list(range(0, K, c)) + [K]
        nograd = self._direction(bound, xs, create_graph=False)
        saved, s = [], T.detach(s0)
        with torch.no_grad():
            for a, b in zip(bounds[:-1], bounds[1:]):
                saved.append(s)
                s, info = unroll(dyn, nograd, s, b - a, start=start + a)
        s_T = s
        with torch.enable_grad():  # adjoint at the end: a_T = ∂F/∂state
            sT = T.requires_grad(s_T)
            F = objective(bound.F, xs, dyn.output(sT))
            g = _grad(F, xs + sT)
        gx, adj = list(g[: len(xs)]), g[len(xs) :]
        withgraph = self._direction(bound, xs, create_graph=True)
        for i in range(len(saved) - 1, -1, -1):
            a, b = bounds[i], bounds[i + 1]
            with torch.enable_grad():
                si = T.requires_grad(saved[i])
                se, _ = unroll(dyn, withgraph, si, b - a, start=start + a, track=False)
                g = _grad(se, xs + si, adj)
            gx = [u + v for u, v in zip(gx, g[: len(xs)])]
            adj = g[len(xs) :]
        if init_graph:  # derivative through the initialization y0(x)
            with torch.enable_grad():
                s0g = dyn.init(bound.init(xs))
                g0 = _grad(s0g, xs, adj)
            gx = [u + v for u, v in zip(gx, g0)]
        info["segments"] = len(saved)
        if self.wrt_init:
            info["adjoint"] = adj
        return tuple(gx), s_T, info
