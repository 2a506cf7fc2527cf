"""Implicit differentiation (AID): hypergradient from the lower-level optimality condition.

If ∇_y g(x, y*) = 0 and H = ∇²_yy g is invertible, the implicit function theorem gives
(Pedregosa 2016, Eq. 4; Ghadimi & Wang 2018, Eq. 2.4)

    ∇h(x) = ∇_x f − ∇²_xy g · v,    where   H v = ∇_y f,      all at (x, y*).

The template below solves the lower level (``inner``, no graph), linearizes ∇_y g once at
(x, y_T) (:class:`bilevel.oracles.Linearization`: every H-product is one backward through a
stored graph), solves the linear system with a solver from :mod:`bilevel.linalg`, and applies
the cross term once. Subclasses only choose the linear solver:

* :class:`CG` — conjugate gradient (AID-CG, Pedregosa 2016; "LS" in Liu et al. 2021);
* :class:`Neumann` — α Σ_{q=0}^{Q} (I − αH)^q ∇_y f (Lorraine et al. 2020, Eq. 6; Ji et al. 2021);
* :class:`FixedPoint` — the adjoint fixed-point iteration of the GD map (AID-FP, Grazzi et al. 2020);
* :class:`Exact` — dense Hessian and Cholesky solve (BA of Ghadimi & Wang 2018; references).

``inner=None`` uses the given y as y*. With ``warm_start=True`` the solution v of the previous
call seeds the next solve (CG/FixedPoint), as in AmIGO (Arbel & Mairal 2022): v is carried in the
estimator state (``res.state["v"]``, pass ``state=res.state`` to the next call), never on the object.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _tree as T
from .. import linalg
from .. import oracles as O
from .._trace import require, scalar, tracing
from ..errors import LinearSolveError
from ..formulation import Bound
from ..inner import Dynamics
from .base import Estimator, solve_lower


class Implicit(Estimator):
    """Template: solve lower level, solve H v = ∇_y f, return ∇_x f − ∇²_xy g v."""

    state_keys = ("v",)

    def __init__(self, inner: Dynamics | None, *, warm_start: bool = False, strict: bool = False):
        self.inner = inner
        self.warm_start = warm_start
        self.strict = strict

    def init_state(self, bound: Bound) -> dict[str, Any]:
        """``{"v": None}``: no warm-start vector yet (with ``warm_start=True`` the next state holds
        the last solution v as flat leaves shaped like y)."""
        return {"v": None}

    def solve(
        self, lin: O.Linearization, b: T.Leaves, x0: T.Leaves | None, bound: Bound
    ) -> tuple[T.Leaves, dict[str, Any]]:
        raise NotImplementedError

    def compute(self, bound: Bound, state: dict[str, Any]):
        xs = bound.xs
        ys, info = solve_lower(bound, self.inner, xs, bound.init(xs))
        _, gx, b = O.grads(bound.F, xs, ys)
        lin = O.Linearization(bound.G, xs, ys)
        v_prev = state.get("v")
        x0 = tuple(v_prev) if self.warm_start and v_prev is not None else None
        if x0 is not None and any(u.shape != w.shape for u, w in zip(x0, b)):
            x0 = None
        v, sinfo = self.solve(lin, b, x0, bound)
        if tracing() and self.strict:  # under vmap: checked per task after the transform
            require(~sinfo["broke_down"], lambda: LinearSolveError(
                f"{type(self).__name__} linear solve broke down (strict=True)"))
        if sinfo["breakdown"] is not None and self.strict:
            raise LinearSolveError(f"{type(self).__name__} linear solve broke down: {sinfo}")
        if self.warm_start:
            state["v"] = T.detach(v)
        hg = T.sub(gx, lin.cross(v))
        info["inner_grad_norm"] = scalar(T.norm(lin.grad_y))
        info["linear_solve"] = sinfo
        return hg, ys, info, state


class CG(Implicit):
    reference = "Pedregosa 2016 (HOAG); Rajeswaran et al. 2019 (iMAML) — AID with CG"

    def __init__(self, inner: Dynamics | None, iters: int = 50, tol: float = 1e-10, **kw):
        super().__init__(inner, **kw)
        self.iters, self.tol = int(iters), float(tol)

    def solve(self, lin, b, x0, bound):
        return linalg.cg(lin.hvp, b, x0, iters=self.iters, tol=self.tol)


def _step_size(alpha: float | None, inner: Dynamics | None, name: str) -> float:
    if alpha is not None:
        return float(alpha)
    if inner is not None and isinstance(inner.lr, (int, float)):
        return float(inner.lr)
    raise ValueError(f"{name} needs alpha= (no numeric inner learning rate to default to)")


class Neumann(Implicit):
    reference = "Lorraine, Vicol & Duvenaud 2020, Eq. 6; Ji, Yang & Liang 2021 (stocBiO, Alg. 3)"

    def __init__(self, inner: Dynamics | None, iters: int = 20, alpha: float | None = None, **kw):
        super().__init__(inner, **kw)
        self.iters = int(iters)
        self.alpha = _step_size(alpha, inner, "Neumann")

    def solve(self, lin, b, x0, bound):
        return linalg.neumann(lin.hvp, b, iters=self.iters, alpha=self.alpha)


class FixedPoint(Implicit):
    reference = "Grazzi et al. 2020 (AID-FP); Ji, Yang & Liang 2021"

    def __init__(
        self, inner: Dynamics | None, iters: int = 50, lr: float | None = None, tol: float = 0.0,
        **kw,
    ):
        super().__init__(inner, **kw)
        self.iters, self.tol = int(iters), float(tol)
        self.lr = _step_size(lr, inner, "FixedPoint")

    def solve(self, lin, b, x0, bound):
        return linalg.fixed_point(lin.hvp, b, x0, iters=self.iters, alpha=self.lr, tol=self.tol)


class Exact(Implicit):
    reference = "Ghadimi & Wang 2018 (BA, explicit Hessian inverse)"

    def solve(self, lin, b, x0, bound):
        ys = lin.ys

        def g_vec(v: torch.Tensor) -> torch.Tensor:
            return bound.G(T.detach(lin.xs), T.from_vector(v, ys))

        H = torch.func.hessian(g_vec)(T.to_vector(T.detach(ys)))
        v, info = linalg.dense_solve(H, T.to_vector(b))
        info["hessian_dim"] = H.shape[0]
        return T.from_vector(v, ys), info
