"""Forward-mode differentiation of the unrolled dynamics (RTRL / FHG).

Franceschi et al. 2017, Sec. 2.2 (forward mode): the tangent Z_k = ds_k/dx · u follows

    Z_{k+1} = ∂_s Φ_k Z_k + ∂_x Φ_k u,   Z_0 = (dy0/dx) u,

computed with reverse-mode products: the tangent of the gradient, ∇²_yx g u + ∇²_yy g Z_k, is
one reverse pass through the gradient graph batched over the directions
(:func:`bilevel.oracles.grad_y_tangents`), and only the dynamics' elementwise update is pushed
forward with ``torch.func.jvp`` under ``vmap`` (``products="jvp"``: one jvp of the whole step
map per direction, which copies the data per tangent).

Where forward mode is arithmetic-bound: each step costs one gradient plus one batched backward
whose work grows with the number of directions n = dim(x): about (1 + n)/2 reverse steps of
products per step, against one for reverse mode — so it only competes when x is small.
Memory does not depend on the number of steps T, but each upper-level
direction costs one tangent: dh/dx·u = <∇_x f, u> + <∇_y f, Z_T>. The full gradient takes
dim(x) directions (``chunk`` of them at a time), so this mode pays off when x is small.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vmap

from .. import _tree as T
from .. import oracles as O
from .._trace import require, tracing
from .._warnings import forward_ad_ready
from ..errors import NonFiniteError
from ..formulation import Bound
from ..inner import Dynamics
from ..validation import first_nonfinite
from .base import Estimator


def _pd() -> int | None:
    """Out-dim of the primal of a vmapped jvp: traced (inside an outer vmap over tasks) the
    primal comes out batched over the tangents, so take it batched and keep row 0."""
    return 0 if tracing() else None


def _primal(s):
    return tuple(t[0] for t in s) if tracing() else s


class Forward(Estimator):
    """Forward-mode differentiation of the unrolled dynamics (RTRL / FHG): one tangent
    Z_k = ds_k/dx · u per direction u, propagated with ``torch.func.jvp`` and batched with
    ``vmap``; dh/dx·u = <∇_x f, u> + <∇_y f, Z_T>. Memory independent of the number of steps;
    cost grows with dim(x).

    Args:
        inner: the dynamics to unroll.
        chunk: directions propagated together (default: all dim(x) at once).

    Returns: ``res.grad`` (exact derivative of f(x, y_T(x))), ``res.y`` = y_T, ``res.info`` with
    ``directions`` and ``chunk``. Objectives must be ``vmap``-able; random operations (dropout)
    run with ``randomness="same"``: every tangent of a pass sees the one mask of the primal, so
    with seeded masks (:class:`bilevel.Functional`) Forward differentiates the same function as
    Reverse (tested equal; see docs/pytorch.md on dropout).

    Reference: Franceschi, Donini, Frasconi & Pontil 2017, Sec. 2.2.
    """

    reference = "Franceschi et al. 2017 (forward mode / RTRL)"

    def __init__(self, inner: Dynamics, chunk: int | None = None, *, products: str = "reverse"):
        if products not in ("reverse", "jvp"):
            raise ValueError(f"products must be 'reverse' or 'jvp', got {products!r}")
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"chunk must be >= 1 (or None), got {chunk}")
        self.inner = inner
        self.chunk = chunk
        self.products = products

    def compute(self, bound: Bound, state: dict):
        forward_ad_ready()
        dyn = self.inner
        xs = bound.xs
        n = T.numel(xs)
        chunk = n if self.chunk is None else int(self.chunk)
        eye = torch.eye(n, dtype=xs[0].dtype, device=xs[0].device)
        jac_rows = []  # rows: d y_T / dx along basis directions, as (n_dir, *y) leaves
        dstate = None  # the lower dynamics' final state (not the estimator state)
        carried: dict = {}  # buffers carried along the first chunk's primal (the same in every chunk)
        for lo in range(0, n, chunk):
            U = T.from_vector(eye[lo : lo + chunk], xs)  # batched directions shaped like x
            dstate, Z = self._tangents(bound, xs, U, carried if lo == 0 else None)
            jac_rows.append(Z)
        ys = T.detach(dyn.output(dstate))
        _, gx, gy = O.grads(bound.upper_with(carried), xs, ys)
        b = T.to_vector(gy)
        dirs = torch.cat([T.to_vector_batched(Z) for Z in jac_rows])
        indirect = dirs @ b  # (n,)
        hg = T.add(gx, T.from_vector(indirect, xs))
        info = {"directions": n, "chunk": chunk, "products": self.products, **carried}
        return hg, ys, info, state

    def _tangents(self, bound: Bound, xs, U, carried: dict | None = None):
        """Propagate a batch of tangents through the unrolled map; return (final state, Z_T).
        With ``carried`` (a dict) and a problem that carries buffers, the buffers are stepped
        along the primal and stored in ``carried["buffers"]``.

        ``products="reverse"`` (default): the tangent of the gradient, J u + H z, comes from
        :func:`bilevel.oracles.grad_y_tangents` (one gradient with graph and one reverse pass
        batched over the tangents); only the dynamics' own update (elementwise) is pushed forward
        with ``jvp``. ``products="jvp"``: one ``jvp`` of the whole step map per tangent.
        """
        dyn = self.inner

        def init(xs_):
            return dyn.init(bound.init(xs_))

        s, Z = vmap(lambda u: jvp(init, (xs,), (u,)), out_dims=(_pd(), 0),
                    randomness="same")(U) if bound.y_fn \
            else (dyn.init(bound.ys0), None)
        s = _primal(s) if bound.y_fn else s
        if Z is None:
            Z = tuple(torch.zeros((U[0].shape[0], *t.shape), dtype=t.dtype, device=t.device)
                      for t in s)
        if self.products == "jvp":
            gfun = O.grad_y_fn(bound.G)
        sums = []  # per-step summaries: the first non-finite step is found with one sync
        carry = bound.carry(xs) if carried is not None else None
        buffers = bound.buffers0
        for k in range(dyn.steps):
            if carry is not None:  # at the point where step k evaluates ∇_y g
                buffers = carry(k, dyn.point(s), buffers)
            if self.products == "jvp":
                def step(xs_, s_, k=k):  # hyperparameters bound at xs_: tangents through hp(x)
                    d = dyn.bind(bound.x_tree(xs_), bound.y_tree(bound.ys0))
                    return d.update(s_, gfun(xs_, d.point(s_)), k)

                s, Z = vmap(lambda u, z, s0=s, st=step: jvp(st, (xs, s0), (u, z)),
                            out_dims=(_pd(), 0), randomness="same")(U, Z)
                s = _primal(s)
                sums.append(sum(t.detach().sum() for t in dyn.output(s)))
                continue
            gy, dg = O.grad_y_tangents(bound.G, xs, dyn.point(s), U, dyn.point(Z))

            if dyn.depends_on_x:  # the update itself depends on x (hyperparameters of x)
                def upd_x(xs_, s_, g_, k=k):
                    return dyn.bind(bound.x_tree(xs_), bound.y_tree(bound.ys0)).update(s_, g_, k)

                s, Z = vmap(lambda u, z, d, s0=s, g0=gy, f=upd_x: jvp(f, (xs, s0, g0), (u, z, d)),
                            out_dims=(None, 0))(U, Z, dg)
                sums.append(sum(t.detach().sum() for t in dyn.output(s)))
                continue

            def upd(s_, g_, k=k):
                return dyn.update(s_, g_, k)

            s, Z = vmap(lambda z, d, s0=s, g0=gy, f=upd: jvp(f, (s0, g0), (z, d)),
                        out_dims=(_pd(), 0))(Z, dg)
            s = _primal(s)
            sums.append(sum(t.detach().sum() for t in dyn.output(s)))
        if carry is not None:
            carried["buffers"] = buffers
        if tracing():  # under vmap: checked per task after the transform
            if sums:
                require(torch.isfinite(torch.stack(sums)).all(), lambda: NonFiniteError(
                    f"non-finite values (NaN/inf) in the lower-level iterate of "
                    f"{type(dyn).__name__} (forward mode, lr={dyn.lr})", level="lower"))
            return T.detach(s), dyn.output(Z)
        bad = first_nonfinite(sums)
        if bad is not None:
            raise NonFiniteError(
                f"non-finite values (NaN/inf) in the lower-level iterate at step {bad + 1} of "
                f"{type(dyn).__name__} (forward mode, lr={dyn.lr}); reduce the step size or check "
                "the objective", level="lower", step=bad + 1)
        return T.detach(s), dyn.output(Z)
