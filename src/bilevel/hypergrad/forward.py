"""Forward-mode differentiation of the unrolled dynamics (RTRL / FHG).

Franceschi et al. 2017, Sec. 2.2 (forward mode): the tangent Z_k = ds_k/dx · u follows

    Z_{k+1} = ∂_s Φ_k Z_k + ∂_x Φ_k u,   Z_0 = (dy0/dx) u,

computed here as one ``torch.func.jvp`` of the step map per step, batched over upper-level
directions with ``vmap``. Memory does not depend on the number of steps T, but each upper-level
direction costs one tangent: dh/dx·u = <∇_x f, u> + <∇_y f, Z_T>. The full gradient takes
dim(x) directions (``chunk`` of them at a time), so this mode pays off when x is small.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vmap

from .. import _tree as T
from .. import oracles as O
from .._trace import require, tracing
from ..errors import NonFiniteError
from ..formulation import Bound
from ..inner import Dynamics
from ..validation import first_nonfinite
from .base import Estimator


class Forward(Estimator):
    reference = "Franceschi et al. 2017 (forward mode / RTRL)"

    def __init__(self, inner: Dynamics, chunk: int | None = None):
        self.inner = inner
        self.chunk = chunk

    def compute(self, bound: Bound, est_state: dict):
        dyn = self.inner
        xs = bound.xs
        n = T.numel(xs)
        gfun = O.grad_y_fn(bound.G)
        chunk = n if self.chunk is None else max(1, int(self.chunk))
        eye = torch.eye(n, dtype=xs[0].dtype, device=xs[0].device)
        jac_rows = []  # rows: d y_T / dx along basis directions, as (n_dir, *y) leaves
        dstate = None  # the lower dynamics' final state (not the estimator state)
        for lo in range(0, n, chunk):
            U = T.from_vector(eye[lo : lo + chunk], xs)  # batched directions shaped like x
            dstate, Z = self._tangents(bound, gfun, xs, U)
            jac_rows.append(Z)
        ys = T.detach(dyn.output(dstate))
        _, gx, gy = O.grads(bound.F, xs, ys)
        b = T.to_vector(gy)
        dirs = torch.cat([T.to_vector_batched(Z) for Z in jac_rows]) if jac_rows else None
        indirect = dirs @ b  # (n,)
        hg = T.add(gx, T.from_vector(indirect, xs))
        return hg, ys, {"directions": n, "chunk": chunk}, est_state

    def _tangents(self, bound: Bound, gfun, xs, U):
        """Propagate a batch of tangents through the unrolled map; return (final state, Z_T)."""
        dyn = self.inner

        def init(xs_):
            return dyn.init(bound.init(xs_))

        traced = tracing()
        if bound.y_fn:
            state, Z = vmap(lambda u: jvp(init, (xs,), (u,)), out_dims=(0 if traced else None, 0))(U)
            state = tuple(t[0] for t in state) if traced else state
        else:
            state, Z = dyn.init(bound.ys0), None
        if Z is None:
            Z = tuple(torch.zeros((U[0].shape[0], *t.shape), dtype=t.dtype, device=t.device)
                      for t in state)
        sums = []  # per-step summaries: the first non-finite step is found with one sync
        for k in range(dyn.steps):
            def step(xs_, s_, k=k):
                return dyn.update(s_, gfun(xs_, dyn.point(s_)), k)

            # (traced, inside an outer vmap over tasks, the primal comes out batched: take row 0)
            state_new, Z = vmap(lambda u, z, s=state, st=step: jvp(st, (xs, s), (u, z)),
                                out_dims=(0 if traced else None, 0))(U, Z)
            state = tuple(t[0] for t in state_new) if traced else state_new
            sums.append(sum(t.detach().sum() for t in dyn.output(state)))
        if traced:  # under vmap: checked per task after the transform
            if sums:
                require(torch.isfinite(torch.stack(sums)).all(), lambda: NonFiniteError(
                    f"non-finite values (NaN/inf) in the lower-level iterate of "
                    f"{type(dyn).__name__} (forward mode, lr={dyn.lr})", level="lower"))
            return T.detach(state), dyn.output(Z)
        bad = first_nonfinite(sums)
        if bad is not None:
            raise NonFiniteError(
                f"non-finite values (NaN/inf) in the lower-level iterate at step {bad + 1} of "
                f"{type(dyn).__name__} (forward mode, lr={dyn.lr}); reduce the step size or check "
                "the objective", level="lower", step=bad + 1)
        return T.detach(state), dyn.output(Z)
