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
from .. import compiled as C
from .. import oracles as O
from ..formulation import Bound
from ..inner import Dynamics, GradFn, unroll
from ..oracles import record
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

    def _bind(self, bound: Bound, xs: T.Leaves):
        """The inner dynamics with hyperparameters evaluated at x (differentiable when xs is)."""
        return self.inner.bind(bound.x_tree(xs), bound.y_tree(bound.ys0))

    def _unroll(self, bound: Bound, xs: T.Leaves, s: T.Leaves, n: int, *, graph: bool,
                start: int = 0, carry=None, buffers=None, track: bool = True):
        """n steps of the bound dynamics from state s (with a graph for ``graph``)."""
        return unroll(self._bind(bound, xs), self._direction(bound, xs, create_graph=graph), s, n,
                      start=start, carry=carry, buffers=buffers, track=track)

    def _unroll_compiled(self, bound: Bound, xs: T.Leaves, s: T.Leaves, n: int, *, graph: bool,
                         start: int = 0, carry=None, buffers=None, track: bool = True):
        """:meth:`_unroll` with each step one compiled kernel (``bl.compile(est)``): its compiled
        backward is the reverse sweep's (∂_y Φ)^T a and (∂_x Φ)^T a (no double backward)."""
        assert carry is None  # (why_not excludes carried buffers)
        return C.unroll(bound.G, self.inner, xs, s, n, start=start, track=track)

    def compute(self, bound: Bound, state: dict):
        if C.estimators_compiled():
            why = ("a custom step direction (grad_fn)" if self.grad_fn is not None
                   else C.why_not(bound, self.inner))
            if why is None:
                with O.backend("autograd"):  # the derivative: autograd chaining compiled steps
                    return self._compute(bound, state, self._unroll_compiled)
            C.fallback(self, why, "eagerly (autograd)")
            with O.backend("autograd"):  # (per-oracle kernels cannot be differentiated twice)
                return self._compute(bound, state, self._unroll)
        return self._compute(bound, state, self._unroll)

    def _compute(self, bound: Bound, state: dict, run: Callable[..., tuple]):
        steps = self.inner.steps
        K = steps if self.truncate is None else int(self.truncate)
        xs = bound.xs
        nx = len(xs)
        dyn = self._bind(bound, xs)  # hyperparameters(x), for the passes without a derivative
        s_trunc = None
        carry = bound.carry(xs)  # carried buffers (running statistics), or None
        b_start = bound.buffers0
        if steps > K:  # T-RHG: the first T-K steps carry no derivative
            with torch.no_grad():
                s_trunc, tinfo = run(bound, xs, dyn.init(bound.init(xs)), steps - K, graph=False,
                                     carry=carry, buffers=b_start)
            s_trunc = T.detach(s_trunc)
            b_start = tinfo.get("buffers")
        if self.wrt_init and bound.y_fn is not None:
            raise ValueError("wrt_init=True needs a fixed starting point, not y0(x)")
        # differentiate with respect to w = x (+ y0 with wrt_init)
        w0 = xs + bound.ys0 if self.wrt_init else xs

        def start_state(w: T.Leaves) -> T.Leaves:
            if s_trunc is not None:
                return s_trunc
            return dyn.init(w[nx:] if self.wrt_init else bound.init(w[:nx]))

        if self.checkpoint:
            seg = int(self.checkpoint) if not isinstance(self.checkpoint, bool) else 0
            gw, s_T, info = self._checkpointed(bound, w0, start_state, K, steps - K, seg,
                                               carry, b_start, run)
        else:
            def loss(w: T.Leaves):  # f at the end of the unrolled graph (the union's f, sharded)
                s_T, info = run(bound, w[:nx], start_state(w), K, graph=True, start=steps - K,
                                carry=carry, buffers=b_start)
                F = bound.upper_with(info)  # f reading the buffers after the last step
                return O.objective(F, w[:nx], dyn.output(s_T)), (T.detach(s_T), info)

            gw, (_, (s_T, info)) = O.value_and_grad(loss, w0, has_aux=True)
        gw = O.rank_mean(gw)  # data-parallel: per-rank shares -> derivative (else identity)
        gx = gw[:nx]
        if self.wrt_init:
            info["grad_init"] = T.detach(gw[nx:])
        # the reverse sweep applies (∂_y Φ_k)^T and (∂_x Φ_k)^T once per differentiated step
        record(bound.G, "hvp", "cross", times=K)
        info.update(steps=steps, truncate=K, checkpoint=bool(self.checkpoint))
        return T.detach(gx), T.detach(dyn.output(s_T)), info, state

    def _checkpointed(self, bound, w0, start_state, K, start, seg, carry=None, buffers=None,
                      run=None):
        """Segmented reverse sweep: store ⌈K/c⌉ states, recompute each segment with a graph
        (the buffers are carried in the forward sweep only: recomputation never steps them)."""
        run = self._unroll if run is None else run
        dyn = self._bind(bound, bound.xs)
        xs = bound.xs
        nx = len(xs)
        c = seg if seg > 0 else max(1, math.isqrt(K - 1) + 1 if K > 1 else 1)
        bounds = list(range(0, K, c)) + [K]
        with torch.no_grad():
            s = T.detach(start_state(w0))
        saved = []
        info: dict = {}
        with torch.no_grad():
            for a, b in zip(bounds[:-1], bounds[1:]):
                saved.append(s)
                s, info = run(bound, xs, s, b - a, graph=False, start=start + a, carry=carry,
                              buffers=buffers)
                buffers = info.get("buffers")
        s_T = s
        ns = len(s_T)
        F = bound.upper_with(info)
        # adjoint at the end: a_T = ∂F/∂state
        g, _ = O.value_and_grad(lambda w: O.objective(F, w[:nx], dyn.output(w[nx:])), xs + s_T)
        gx, adj = g[:nx], g[nx:]
        for i in range(len(saved) - 1, -1, -1):
            a, b = bounds[i], bounds[i + 1]

            def segment(w: T.Leaves, a: int = a, b: int = b) -> T.Leaves:
                return run(bound, w[:nx], w[nx:], b - a, graph=True, start=start + a,
                           track=False)[0]

            g = O.vjp(segment, xs + saved[i], adj)
            gx = T.add(gx, g[:nx])
            adj = g[nx:]
        assert len(adj) == ns
        # the adjoint of the start state -> derivative through y0(x), or w.r.t. y0 (wrt_init)
        if self.wrt_init or bound.y_fn is not None:
            gw = O.vjp(start_state, w0, adj)
            gx = T.add(gx, gw[:nx])
            gx = gx + tuple(gw[nx:])
        info["segments"] = len(saved)
        return tuple(gx), s_T, info
