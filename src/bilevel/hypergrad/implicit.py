"""Implicit differentiation (AID): hypergradient from the lower-level optimality condition.

If ∇_y g(x, y*) = 0 and H = ∇²_yy g is invertible, the implicit function theorem gives
(Pedregosa 2016, Eq. 4; Ghadimi & Wang 2018, Eq. 2.4)

    ∇h(x) = ∇_x f − ∇²_xy g · v,    where   (H + λI) v = ∇_y f,      all at (x, y*)

(λ = ``damping``, 0 by default). The template below solves the lower level (``inner``, no graph),
linearizes ∇_y g once at (x, y_T) (:class:`bilevel.oracles.Linearization`: every H-product is one
backward through a stored graph), solves the linear system with a solver from
:mod:`bilevel.linalg`, and applies the cross term once. Subclasses only choose the linear solver:

* :class:`CG` — conjugate gradient (AID-CG, Pedregosa 2016; "LS" in Liu et al. 2021): H ≻ 0;
* :class:`MINRES` — minimum residual (Paige & Saunders 1975): any symmetric H, also indefinite
  (the lower Hessian of a neural network);
* :class:`NormalCG` — CG on H² v = H ∇_y f (CGLS): any H, the minimum-norm least-squares v for a
  singular one (a lower level with several solutions);
* :class:`Neumann` — α Σ_{q=0}^{Q} (I − αH)^q ∇_y f (Lorraine et al. 2020, Eq. 6; Ji et al. 2021);
* :class:`FixedPoint` — the adjoint fixed-point iteration of the GD map (AID-FP, Grazzi et al. 2020);
* :class:`Exact` — dense Hessian and Cholesky solve (BA of Ghadimi & Wang 2018; references).

``damping=λ > 0`` solves the Tikhonov / proximal system (H + λI) v = ∇_y f with any of them: the
system of iMAML (Rajeswaran et al. 2019, Eq. 6), whose (I + H/λ)⁻¹ equals λ (H + λI)⁻¹. It is
positive definite once λ > −λ_min(H), so CG applies to an indefinite H, at a bias of order λ in v.

``inner=None`` uses the given y as y*. With ``warm_start=True`` the solution v of the previous
call seeds the next solve, as in AmIGO (Arbel & Mairal 2022): v is carried in the estimator state
(``res.state["v"]``, pass ``state=res.state`` to the next call), never on the object.

Reliability policy (every implicit estimator):

* NaN/inf in f, ∇f, g or ∇_y g at the lower point, or in the Hessian products, raises
  :class:`~bilevel.errors.NonFiniteError` naming the level — never a zero hypergradient.
* A linear-solve breakdown (``info["linear_solve"]["breakdown"]``: negative or zero curvature,
  divergence, overflow): a warm-started solve that broke down is first repeated from v = 0. If
  that breaks down too, ``strict=True`` raises :class:`~bilevel.errors.LinearSolveError`;
  otherwise a :class:`~bilevel.errors.LinearSolveWarning` is issued once per run (the count is in
  the state and in ``info["linear_solve"]["breakdowns"]``) and the solver's last good iterate is
  used (for CG the minimiser of the quadratic on the directions explored before the bad one,
  Steihaug 1983); a broken-down v is never carried to the next call as a warm start.
* A start y0(x) that depends on x (a learned initialization) is ignored by the implicit
  hypergradient — y*(x) does not depend on the start — which is said once per run with a
  :class:`~bilevel.errors.StartIndependenceWarning`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import _tree as T
from .. import compiled as C
from .. import linalg
from .. import oracles as O
from .._trace import require, scalar, tracing
from .._warnings import forward_ad_ready
from ..errors import (
    ConfigError,
    LinearSolveError,
    LinearSolveWarning,
    StartIndependenceWarning,
)
from ..formulation import Bound
from ..inner import Dynamics
from ..validation import check_finite, check_finite_groups
from .base import Estimator, solve_lower


def _damping(value: float) -> float:
    lam = float(value)
    if not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"damping must be a finite number >= 0, got {value!r}")
    return lam


#: the options and returned fields every implicit estimator shares, appended to each subclass's
#: docstring by :meth:`Implicit.__init_subclass__` (one text, so ``help()`` shows it everywhere)
_SHARED_DOC = """
    Options passed as keywords (``**kw``, handled by :class:`Implicit`):
        warm_start (bool, default False): start the linear solve from the previous call's v
            (kept in ``res.state["v"]``; AmIGO, Arbel & Mairal 2022).
        strict (bool, default False): raise :class:`~bilevel.LinearSolveError` on a solver
            breakdown instead of warning and using the last good iterate.
        damping (float, default 0): solve (H + λI) v = ∇_y f instead (λ = damping ≥ 0).

    Returns (``res = est(problem, x, y)``): ``res.grad`` shaped like x, ``res.y`` the lower point
    (detached), ``res.info`` with ``linear_solve`` (iterations, residual, converged, breakdown)
    and ``inner_grad_norm``, ``res.state`` for the next call.
"""


class Implicit(Estimator):
    """Template: solve lower level, solve (H + λI) v = ∇_y f, return ∇_x f − ∇²_xy g v."""

    state_keys = ("v", "breakdowns", "start_warned")
    #: what the hypergradient uses after a breakdown (said in the warning)
    fallback = "the solver's last good iterate (and no warm start from it)"

    def __init__(
        self,
        inner: Dynamics | None,
        *,
        warm_start: bool = False,
        strict: bool = False,
        damping: float = 0.0,
    ):
        if getattr(inner, "prox", None) is not None:  # bilevel.inner.ISTA / FISTA
            raise ConfigError(
                f"{type(self).__name__} linearizes the smooth lower objective only, but "
                f"{type(inner).__name__} also minimizes the non-smooth term of its prox, which the "
                "implicit derivative would silently ignore; differentiate the unrolled dynamics "
                "(Reverse / Forward) instead")
        self.inner = inner
        self.warm_start = warm_start
        self.strict = strict
        self.damping = _damping(damping)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__doc__ and not cls.__name__.startswith("_"):
            cls.__doc__ = cls.__doc__.rstrip() + "\n" + _SHARED_DOC

    def init_state(self, bound: Bound) -> dict[str, Any]:
        """``{"v": None, "breakdowns": 0, "start_warned": False}``: no warm-start vector yet (with
        ``warm_start=True`` the next state holds the last good solution v as flat leaves shaped
        like y), no linear-solve breakdown in this run yet, no warning about a start y0(x) yet."""
        return {"v": None, "breakdowns": 0, "start_warned": False}

    def operator(self, lin: O.Linearization) -> linalg.MatVec:
        """v -> (H + λI) v at the linearization point."""
        return linalg.damped(lin.hvp, self.damping)

    def solve(
        self, lin: O.Linearization, b: T.Leaves, x0: T.Leaves | None, bound: Bound
    ) -> tuple[T.Leaves, dict[str, Any]]:
        raise NotImplementedError

    def compute(self, bound: Bound, state: dict[str, Any]):
        if C.estimators_compiled():
            why = C.why_not(bound, self.inner)
            if why is None and not isinstance(self, Exact):
                with O.backend("autograd"):  # compiled inner steps, linearization, upper grads
                    return self._compute(bound, state, C.Linearization, C.grads)
            if why is not None:
                C.fallback(self, why)
        return self._compute(bound, state, O.Linearization)

    def _compute(self, bound: Bound, state: dict[str, Any], linearize: type[O.Linearization],
                 grads: Callable[..., Any] = O.grads):
        xs = bound.xs
        if bound.y_fn is not None and not state.get("start_warned", False):
            _warn_start(self)
            state["start_warned"] = True
        ys, info = solve_lower(bound, self.inner, xs, bound.init(xs))
        fval, gx, b = grads(bound.upper_with(info), xs, ys)  # (f with the carried buffers)
        lin = linearize(bound.G, xs, ys)
        check_finite_groups([
            ("upper", "f, ∇_x f or ∇_y f at the lower point", (fval, *gx, *b)),
            ("lower", "g or ∇_y g at the lower point", (lin.value, *lin.grad_y)),
        ])
        v_prev = state.get("v")
        x0 = tuple(v_prev) if self.warm_start and v_prev is not None else None
        if x0 is not None and any(u.shape != w.shape for u, w in zip(x0, b)):
            x0 = None
        v, sinfo = self._solve_safely(lin, b, x0, bound)
        if tracing() and self.strict:  # under vmap: checked per task after the transform
            require(~sinfo["broke_down"], lambda: LinearSolveError(
                f"{type(self).__name__} linear solve broke down (strict=True)"))
        if sinfo["breakdown"] is not None:
            if not state.get("breakdowns", 0):  # once per run: the first breakdown of this state
                _warn_breakdown(self, sinfo)
            state["breakdowns"] = int(state.get("breakdowns", 0)) + 1
        sinfo["breakdowns"] = int(state.get("breakdowns", 0))
        if self.warm_start:
            state["v"] = T.detach(v) if sinfo["breakdown"] is None else None
        hg = T.sub(gx, lin.cross(v))
        info["inner_grad_norm"] = scalar(T.norm(lin.grad_y))
        info["linear_solve"] = sinfo
        return hg, ys, info, state

    def _solve_safely(
        self, lin: O.Linearization, b: T.Leaves, x0: T.Leaves | None, bound: Bound
    ) -> tuple[T.Leaves, dict[str, Any]]:
        """:meth:`solve` with the breakdown policy of the module docstring."""
        v, sinfo = self.solve(lin, b, x0, bound)
        if sinfo["breakdown"] is not None and x0 is not None:
            # the warm start may be what went wrong: one retry from v = 0
            first = sinfo
            v, sinfo = self.solve(lin, b, None, bound)
            sinfo["warm_start_breakdown"] = first["breakdown"]
        if sinfo["breakdown"] is None:
            return v, sinfo
        if sinfo["breakdown"] == "nonfinite":
            _check_hessian(self, lin, b)
        if self.strict:
            raise LinearSolveError(
                f"{type(self).__name__} linear solve broke down ({sinfo['breakdown']}) after "
                f"{sinfo['iterations']} iterations, relative residual "
                f"{sinfo['relative_residual']:.3g}: {_advice(sinfo['breakdown'])}"
            )
        check_finite(v, "lower", f"the {type(self).__name__} linear-solve iterate")
        return v, sinfo


def estimator_for(solver: Any) -> type[Implicit]:
    """The implicit estimator of this module whose linear solver is ``solver`` (a function of
    :data:`bilevel.linalg.SOLVERS`): CG for ``linalg.cg``, Neumann for ``linalg.neumann``, ..."""
    todo, found = list(Implicit.__subclasses__()), []
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__ == __name__ and getattr(cls, "method", None) is solver:
            found.append(cls)
    if len(found) != 1:
        raise ValueError(f"no implicit estimator uses the linear solver {solver!r}")
    return found[0]


def _advice(reason: str) -> str:
    if reason in ("negative_curvature", "not_positive_definite"):
        return ("the lower Hessian is indefinite (a non-convex lower level); use MINRES, NormalCG "
                "or damping=λ > 0 (iMAML's proximal system), or a solver that does not need H ≻ 0")
    if reason == "singular":
        return ("the lower Hessian is singular (several lower solutions); use NormalCG (minimum-norm "
                "least squares), damping=λ > 0, or a method for non-singleton followers (BDA, IA-GM)")
    if reason == "diverging":
        return ("the step size is above 2/λ_max(H) or H is indefinite; reduce alpha/lr, or use CG "
                "(H ≻ 0) / MINRES (indefinite H)")
    return "the linear solve overflowed; use damping=λ > 0, MINRES or NormalCG"


def _check_hessian(est: Implicit, lin: O.Linearization, b: T.Leaves) -> None:
    """A non-finite solve from finite data: NaN in the Hessian itself is the lower level's fault."""
    bn = float(T.norm(b))
    hv = lin.hvp(T.scale(b, 1.0 / bn) if bn > 0 else b)
    check_finite(hv, "lower", f"the Hessian-vector products of g ({type(est).__name__} solve)")


def _warn_start(est: Implicit) -> None:
    warnings.warn(
        f"{type(est).__name__}: the lower start y0(x) depends on x, but the implicit hypergradient "
        "does not: y*(x) is a function of x alone, so the derivative through the start is zero "
        "by construction. For a meta-gradient through a learned initialization (MAML) use "
        "hypergrad.Reverse (backpropagation through the lower steps), or iMAML's proximal "
        "formulation: a lower objective g(x, y) + λ/2‖y − x‖² with the start as part of x "
        "(Rajeswaran et al. 2019).",
        StartIndependenceWarning,
        stacklevel=5,
    )


def _warn_breakdown(est: Implicit, sinfo: dict[str, Any]) -> None:
    warnings.warn(
        f"{type(est).__name__} linear solve broke down ({sinfo['breakdown']}, relative residual "
        f"{sinfo['relative_residual']:.3g}); the hypergradient uses {est.fallback}. "
        f"{_advice(sinfo['breakdown'])}. Further breakdowns in this run are counted in "
        "info['linear_solve']['breakdowns'] without a warning; pass strict=True to raise instead.",
        LinearSolveWarning,
        stacklevel=5,
    )


class _Krylov(Implicit):
    """A Krylov solver of :mod:`bilevel.linalg` (``method``) on (H + λI) v = ∇_y f, at most
    ``iters`` iterations, stopping at relative residual ``tol``, its tests read on the host once
    per block of ``check_every`` iterations (None: the device default; 0: fixed iterations)."""

    method: Any = None

    def __init__(self, inner: Dynamics | None, iters: int = 50, tol: float = 1e-10, *,
                 check_every: int | None = None, **kw):
        super().__init__(inner, **kw)
        self.iters, self.tol = int(iters), float(tol)
        self.check_every = _check_every(check_every)

    def solve(self, lin, b, x0, bound):
        return self.method(self.operator(lin), b, x0, iters=self.iters, tol=self.tol,
                           check_every=self.check_every)


class CG(_Krylov):
    """Implicit differentiation with conjugate gradient (AID-CG).

    ∇h(x) ≈ ∇_x f − ∇²_xy g · v,   v ≈ H⁻¹ ∇_y f by CG,  all at the lower point y_T.

    Args:
        inner: dynamics of :mod:`bilevel.inner` that solve the lower level from the given y
            (no graph), or ``None`` to use the given y as y*.
        iters: at most this many Hessian-vector products.
        tol: stop when ‖H v − ∇_y f‖ ≤ tol ‖∇_y f‖.
        check_every: read the stopping / breakdown tests on the host once per block of this
            many iterations (default: 1 on the CPU, 10 on an accelerator); 0: all ``iters``
            iterations with device masks and one read at the end (see :func:`bilevel.linalg.cg`).

    Reference: Pedregosa 2016 (HOAG, Alg. 1); Rajeswaran et al. 2019 (iMAML, Sec. 3.2).
    H must be positive definite (else ``breakdown="negative_curvature"``: use MINRES or damping).
    """

    reference = "Pedregosa 2016 (HOAG); Rajeswaran et al. 2019 (iMAML) — AID with CG"

    method = staticmethod(linalg.cg)


class MINRES(_Krylov):
    """Implicit differentiation with MINRES: H v = ∇_y f for a symmetric, possibly indefinite H.

    Args:
        inner: lower-level dynamics, or ``None`` (the given y is y*).
        iters: at most this many Hessian-vector products.
        tol: stop when ‖H v − ∇_y f‖ ≤ tol ‖∇_y f‖.
        check_every: host reads once per block of this many iterations (as for :class:`CG`).

    Reference: Paige & Saunders 1975.
    """

    reference = "Paige & Saunders 1975 (MINRES) — AID for indefinite lower Hessians"

    method = staticmethod(linalg.minres)


class NormalCG(_Krylov):
    """Implicit differentiation with CG on the normal equations H² v = H ∇_y f (CGLS): the
    least-squares solution when H is singular.

    Args:
        inner: lower-level dynamics, or ``None`` (the given y is y*).
        iters: at most this many iterations (two Hessian-vector products each).
        tol: stop when the normal-equation residual is ≤ tol times its initial value.
        check_every: host reads once per block of this many iterations (as for :class:`CG`).

    Reference: Hestenes & Stiefel 1952.
    """

    reference = "Hestenes & Stiefel 1952 (CG on the normal equations, CGLS) — AID, singular H"

    method = staticmethod(linalg.normal_cg)


def _check_every(value: int | None) -> int | None:
    """``check_every`` of CG / Neumann / FixedPoint: None (the device default) or an int ≥ 0."""
    if value is not None and int(value) < 0:
        raise ValueError(f"check_every must be >= 0 (0: fixed iterations), got {value}")
    return None if value is None else int(value)


def _step_size(alpha: float | None, inner: Dynamics | None, name: str) -> float:
    if alpha is not None:
        return float(alpha)
    if inner is not None and isinstance(inner.lr, (int, float)):
        return float(inner.lr)
    raise ValueError(f"{name} needs alpha= (no numeric inner learning rate to default to)")


def _renamed_lr(cls: str, alpha: float | None, kw: dict[str, Any]) -> float | None:
    """``lr=`` was FixedPoint's name for the step α (issue 8.12: one name, ``alpha``, as in Neumann,
    AID and :mod:`bilevel.linalg`); still taken, with a ``DeprecationWarning``."""
    if "lr" not in kw:
        return alpha
    lr = kw.pop("lr")
    if alpha is not None:
        raise TypeError(f"{cls}: pass the step size as alpha= only (lr= is its deprecated name)")
    warnings.warn(f"{cls}(lr=...) is deprecated: the step size is called alpha (as in Neumann and AID)",
                  DeprecationWarning, stacklevel=3)
    return lr


class Neumann(Implicit):
    """Implicit differentiation with a truncated Neumann series:

    v = α Σ_{q=0}^{Q} (I − αH)^q ∇_y f  ≈ H⁻¹ ∇_y f   (converges for 0 < α < 2/λ_max(H)).

    Args:
        inner: lower-level dynamics, or ``None`` (the given y is y*).
        iters: Q, the number of Hessian-vector products.
        alpha: the step α; default the inner learning rate (an error if there is none).
        check_every: host reads once per block of this many terms (as for :class:`CG`).

    Reference: Lorraine, Vicol & Duvenaud 2020, Eq. 6; Ji, Yang & Liang 2021 (Alg. 3).
    """

    reference = "Lorraine, Vicol & Duvenaud 2020, Eq. 6; Ji, Yang & Liang 2021 (stocBiO, Alg. 3)"

    method = staticmethod(linalg.neumann)

    def __init__(self, inner: Dynamics | None, iters: int = 20, alpha: float | None = None, *,
                 check_every: int | None = None, **kw):
        super().__init__(inner, **kw)
        self.iters = int(iters)
        self.alpha = _step_size(alpha, inner, "Neumann")
        self.check_every = _check_every(check_every)

    def solve(self, lin, b, x0, bound):
        return linalg.neumann(self.operator(lin), b, iters=self.iters, alpha=self.alpha, growth=2.0,
                              check_every=self.check_every)


class FixedPoint(Implicit):
    """Implicit differentiation with the adjoint fixed-point iteration of the GD map (AID-FP):

    v ← v − α (H v − ∇_y f),   v₀ = 0 (or the warm start).

    Args:
        inner: lower-level dynamics, or ``None`` (the given y is y*).
        iters: at most this many Hessian-vector products.
        alpha: the step α; default the inner learning rate (an error if there is none).
            (``lr=`` is its deprecated former name: it still works, with a DeprecationWarning.)
        tol: stop when ‖H v − ∇_y f‖ ≤ tol ‖∇_y f‖ (0: never early).
        check_every: host reads once per block of this many iterations (as for :class:`CG`).

    Reference: Grazzi, Franceschi, Pontil & Salzo 2020 (AID-FP); Ji, Yang & Liang 2021.
    """

    reference = "Grazzi et al. 2020 (AID-FP); Ji, Yang & Liang 2021"

    method = staticmethod(linalg.fixed_point)

    def __init__(
        self, inner: Dynamics | None, iters: int = 50, alpha: float | None = None, tol: float = 0.0,
        *, check_every: int | None = None, **kw,
    ):
        alpha = _renamed_lr("FixedPoint", alpha, kw)
        super().__init__(inner, **kw)
        self.iters, self.tol = int(iters), float(tol)
        self.alpha = _step_size(alpha, inner, "FixedPoint")
        self.check_every = _check_every(check_every)

    @property
    def lr(self) -> float:
        """Deprecated name of :attr:`alpha`."""
        warnings.warn("FixedPoint.lr is deprecated: use FixedPoint.alpha", DeprecationWarning,
                      stacklevel=2)
        return self.alpha

    def solve(self, lin, b, x0, bound):
        return linalg.fixed_point(self.operator(lin), b, x0, iters=self.iters, alpha=self.alpha,
                                  tol=self.tol, growth=2.0, check_every=self.check_every)


class Exact(Implicit):
    """Implicit differentiation with the dense Hessian: H = ∇²_yy g by ``torch.func.hessian``
    and a Cholesky solve (LU / least squares fallbacks reported in ``info``). For small y and
    as a reference; memory O(dim(y)²).

    Args:
        inner: lower-level dynamics, or ``None`` (the given y is y*).

    Reference: Ghadimi & Wang 2018 (BA, explicit Hessian inverse).
    """

    reference = "Ghadimi & Wang 2018 (BA, explicit Hessian inverse)"
    fallback = "the LU (indefinite H) or least-squares (singular H) solution of the dense system"

    def solve(self, lin, b, x0, bound):
        ys = lin.ys

        def g_vec(v: torch.Tensor) -> torch.Tensor:
            return bound.G(T.detach(lin.xs), T.from_vector(v, ys))

        forward_ad_ready()  # (torch.func.hessian is forward-over-reverse)
        H = O.reduced(bound.G, torch.func.hessian(g_vec)(T.to_vector(T.detach(ys))))
        check_finite([H], "lower", "the dense Hessian of g")
        if self.damping:
            H = H + self.damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        v, info = linalg.dense_solve(H, T.to_vector(b))
        info["hessian_dim"] = H.shape[0]
        return T.from_vector(v, ys), info
