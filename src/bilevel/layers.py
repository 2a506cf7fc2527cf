"""Implicit layers: ``y = argmin(g, x, y0)`` and ``z = fixed_point(T, x, z0)`` as autograd functions.

The idea of JAXopt's ``custom_root`` (Blondel et al. 2022, "Efficient and modular implicit
differentiation", Eq. 3) and of deep equilibrium models (Bai, Kolter & Koltun 2019, Eq. 6), done
with ``torch.autograd.Function``: the forward pass *solves*, the backward pass applies the implicit
function theorem, so the solution composes with any outer loss, ``torch.optim`` loop and
``.backward()``.

**argmin.** y*(x) = argmin_y g(x, y), characterized by ∇_y g(x, y*) = 0. For an outer loss L with
ȳ = ∂L/∂y*, the backward pass returns

    x̄ = −∇²_xy g · v,     H v = ȳ,     H = ∇²_yy g(x, y*)

— exactly what a hypergradient estimator of :mod:`bilevel.hypergrad.implicit` computes for the
linear upper objective f(x, y) = <ȳ, y>; the backward calls the given ``diff`` estimator on that
problem (so CG / Neumann / FixedPoint / Exact and their options apply unchanged). When a graph of
the backward is requested (``create_graph=True``: a Hessian of an outer loss, or an argmin nested
inside another level's objective), the backward is itself differentiable (the linear solve's
derivative is one more solve with the same solver; H and ∇²_xy g are ``torch.func`` products that
stay differentiable), which gives the derivatives of the implicit derivative (multilevel problems:
the middle level's objective contains an ``argmin``; see docs/pytorch.md).

**fixed_point.** z* = T(x, z*) with T a contraction in z. With ȳ = ∂L/∂z*, the backward solves
the adjoint equation  w = ȳ + (∂_z T)^T w  (fixed-point iteration, :func:`bilevel.linalg.fixed_point`
on I − (∂_z T)^T) and returns  x̄ = (∂_x T)^T w  (Bai et al. 2019, Eq. 8). First-order only.

Gradients flow to the tensors passed as ``x`` (a tensor or any pytree of tensors). Tensors that
g or T capture from the enclosing scope are treated as constants: put everything that needs a
gradient into ``x``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _tree as T
from . import linalg
from . import oracles as O
from .errors import ConfigError, NonFiniteError
from .formulation import Objective, Problem
from .hypergrad.base import Estimator
from .hypergrad.implicit import CG, Implicit
from .inner import Dynamics, unroll
from .validation import check_finite, check_like, check_variables

__all__ = ["argmin", "fixed_point"]


class _Spec:
    """Everything the autograd function needs besides the tensors (not saved for backward)."""

    def __init__(self, g: Callable, xspec: T.Spec, yspec: T.Spec, ys0: T.Leaves, batch: Any,
                 solver: Any, diff: Estimator):
        self.g, self.xspec, self.yspec, self.ys0, self.batch = g, xspec, yspec, ys0, batch
        self.solver, self.diff = solver, diff
        self.problem = Problem(upper=_zero_upper, lower=g)
        self.info: dict[str, Any] = {}

    def G(self) -> Objective:
        return Objective(self.problem, "lower", self.batch, self.xspec, self.yspec)

    def solve(self, xs: T.Leaves) -> T.Leaves:
        xs = T.detach(xs)
        if isinstance(self.solver, Dynamics):
            G = self.G()

            def direction(ys: T.Leaves, k: int) -> T.Leaves:
                return O.grad_y(G, xs, ys)

            with torch.no_grad():
                state, info = unroll(self.solver, direction, self.solver.init(self.ys0),
                                     self.solver.steps)
            ys = T.detach(self.solver.output(state))
        else:  # a callable (x, y0) -> y*
            with torch.no_grad():
                out = self.solver(T.unflatten(xs, self.xspec), T.unflatten(self.ys0, self.yspec))
            ys, spec = T.flatten(out)
            check_like(ys, spec, self.ys0, self.yspec, "solver(x, y0)")
            ys, info = T.detach(ys), {}
        check_finite(ys, "lower", "the argmin solution")
        self.info = info
        return tuple(t.clone() for t in ys)

    def vjp(self, xs: T.Leaves, ys: T.Leaves, ybar: T.Leaves) -> T.Leaves:
        """x̄ = −J^T H⁻¹ ȳ by the ``diff`` estimator on the linear upper objective <ȳ, y>."""
        ybar = T.detach(ybar)
        prob = Problem(upper=_linear_upper(ybar), lower=self.g)
        res = self.diff(prob, T.unflatten(T.detach(xs), self.xspec),
                        T.unflatten(T.detach(ys), self.yspec), lower_batch=self.batch)
        return T.flatten(res.grad)[0]

    def linear_solve(self, xs: T.Leaves, ys: T.Leaves, rhs: T.Leaves) -> T.Leaves:
        """H⁻¹ rhs at (x, y) with the ``diff`` estimator's linear solver (no graph)."""
        lin = O.Linearization(self.G(), T.detach(xs), T.detach(ys))
        with torch.no_grad():
            v, _ = self.diff.solve(lin, T.detach(rhs), None, _BoundLike(self.G()))
        return T.detach(v)

    def vjp_differentiable(self, xs: T.Leaves, ys: T.Leaves, ybar: T.Leaves) -> T.Leaves:
        """The same product, with a graph through xs, ys and ȳ (for double backward).

        With w₀ = H⁻¹ȳ solved once without a graph, w = w₀ + S(ȳ − H w₀), where S applies H⁻¹ as
        a constant linear map (:class:`_Solve`, whose backward is another solve), has the value
        w₀ and the derivative of H⁻¹ȳ: dw = H⁻¹(dȳ − dH w₀). Then x̄ = −J^T w, with H and J^T
        as ``torch.func`` products that stay differentiable in (x, y).
        """
        with torch.enable_grad():
            _, hvp, cross = O.implicit_products(self.G(), tuple(xs), tuple(ys))
            w0 = self.linear_solve(xs, ys, ybar)
            resid = T.sub(tuple(ybar), hvp(w0))
            corr = _Solve.apply(self, len(xs), *T.detach(xs), *T.detach(ys), *resid)
            return tuple(-u for u in cross(T.add(w0, corr)))


class _BoundLike:
    """What :class:`bilevel.hypergrad.Exact`'s ``solve`` reads from a bound: the lower objective."""

    def __init__(self, G: Objective):
        self.G = G


class _Solve(torch.autograd.Function):
    """rhs -> H⁻¹ rhs for a fixed (x, y): linear in rhs, H symmetric, so the backward is a solve."""

    @staticmethod
    def forward(spec: _Spec, nx: int, *tensors: Tensor):  # type: ignore[override]
        n = len(spec.ys0)
        xs, ys, rhs = tensors[:nx], tensors[nx : nx + n], tensors[nx + n :]
        return spec.linear_solve(xs, ys, rhs)

    @staticmethod
    def setup_context(ctx, inputs, output):  # (the separate form: torch.func can differentiate it)
        spec, nx, *tensors = inputs
        ctx.spec, ctx.nx, ctx.n = spec, nx, len(spec.ys0)
        ctx.save_for_backward(*tensors[: nx + ctx.n])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        xs, ys = saved[: ctx.nx], saved[ctx.nx :]
        none = (None,) * (2 + ctx.nx + ctx.n)
        return (*none, *ctx.spec.linear_solve(xs, ys, grad))


def _oracles_here() -> Any:
    """The oracle backend for the solves of a layer: ``"func"`` when the layer itself runs inside
    a ``torch.func`` transform (an argmin inside the lower objective of the functional or compiled
    oracles: autograd's ``requires_grad_`` is refused there), else the one in effect."""
    return O.backend("func") if O._in_transform() else contextlib.nullcontext()


def _zero_upper(x: Any, y: Any) -> Tensor:  # placeholder: the lower-only problem of the forward
    raise AssertionError("unused")


def _linear_upper(ybar: T.Leaves) -> Callable[[Any, Any], Tensor]:
    def f(x: Any, y: Any) -> Tensor:
        return T.dot(ybar, T.flatten(y)[0])

    return f


class _Argmin(torch.autograd.Function):
    @staticmethod
    def forward(spec: _Spec, nx: int, *xs: Tensor):  # type: ignore[override]
        with _oracles_here():
            return spec.solve(xs)

    @staticmethod
    def setup_context(ctx, inputs, output):  # (the separate form: torch.func can differentiate it,
        spec, nx, *xs = inputs               # e.g. an argmin inside the functional oracles' g)
        ctx.spec, ctx.nx = spec, nx
        ctx.save_for_backward(*xs, *output)

    @staticmethod
    def backward(ctx, *ybar: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        xs, ys = saved[: ctx.nx], saved[ctx.nx :]
        with _oracles_here():
            if torch.is_grad_enabled():  # a graph of the backward was requested
                gx = ctx.spec.vjp_differentiable(xs, ys, ybar)
            else:
                gx = ctx.spec.vjp(xs, ys, ybar)
        return (None, None, *gx)


def argmin(
    lower: Callable[..., Tensor],
    x: Any,
    y0: Any,
    *,
    solver: Dynamics | Callable[[Any, Any], Any] | None = None,
    diff: Estimator | None = None,
    batch: Any = None,
) -> Any:
    """y*(x) = argmin_y lower(x, y[, batch]) as a differentiable function of ``x``.

    Args:
        lower: g(x, y) or g(x, y, batch), returning a scalar tensor.
        x: the tensor(s) the solution depends on (a tensor or a pytree); gradients of any loss of
            the result flow back to them by the implicit function theorem.
        y0: starting point (a tensor or a pytree), also fixing the structure of the result.
        solver: how the forward pass solves the lower level: an inner dynamics of
            :mod:`bilevel.inner` (e.g. ``bl.inner.GD(lr=0.1, steps=200)``, run from ``y0``
            without a graph) or a callable ``(x, y0) -> y*`` (closed form, L-BFGS, ...). ``None``:
            the dynamics of ``diff.inner``.
        diff: an implicit estimator of :mod:`bilevel.hypergrad` (``CG``, ``Neumann``,
            ``FixedPoint``, ``Exact``) whose linear solver the backward pass uses; its own
            ``inner`` is not run again (the backward starts at the solution). Default
            ``CG(None, iters=100, tol=1e-10)``.
        batch: data passed to ``lower`` as its third argument.

    Returns:
        y*(x), shaped like ``y0``, whose ``grad_fn`` applies x̄ = −∇²_xy g (∇²_yy g)⁻¹ ȳ.

    Example::

        lam = torch.tensor(0.1, requires_grad=True)
        w = bl.argmin(lambda lam, w: ((X @ w - t) ** 2).mean() + lam * (w ** 2).sum(),
                      lam, torch.zeros(d), solver=bl.inner.GD(lr=0.1, steps=500))
        ((Xv @ w - tv) ** 2).mean().backward()          # lam.grad = the hypergradient
    """
    if diff is None:
        diff = CG(None, iters=100, tol=1e-10)
    if not isinstance(diff, Implicit):
        raise ConfigError(
            f"argmin(diff=...) needs an implicit estimator (CG, Neumann, FixedPoint, Exact), got "
            f"{type(diff).__name__}; to differentiate through an unrolled solver, call the solver "
            "with autograd instead"
        )
    if solver is None:
        solver = diff.inner
        if solver is None:
            raise ConfigError("argmin needs solver=... (or a diff estimator with inner dynamics)")
    elif not isinstance(solver, Dynamics) and not callable(solver):
        raise ConfigError(
            f"argmin(solver=...) must be a bilevel.inner dynamics or a callable (x, y0) -> y, "
            f"got {type(solver).__name__}"
        )
    back = copy.copy(diff)
    back.inner = None  # the backward linearizes at the solution of the forward pass
    xs, xspec = T.flatten(x)
    check_variables(xs, "x")
    ys0, yspec = T.flatten(y0)
    check_variables(ys0, "y0")
    spec = _Spec(lower, xspec, yspec, T.detach(ys0), batch, solver, back)
    ys = _Argmin.apply(spec, len(xs), *xs)
    return T.unflatten(ys, yspec)


class _FixedPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: dict, nx: int, *xs: Tensor):  # type: ignore[override]
        phi, zs = spec["phi"], spec["z0"]
        xs_d = T.detach(xs)
        k, delta = 0, float("inf")
        with torch.no_grad():
            while k < spec["iters"]:
                new = tuple(phi(xs_d, zs))
                delta = float(T.norm(T.sub(new, zs))) / max(float(T.norm(new)), 1e-30)
                zs, k = new, k + 1
                if delta != delta or delta == float("inf"):
                    raise NonFiniteError(
                        f"fixed_point: non-finite iterate at step {k}; T is not a contraction "
                        "from z0", level="lower", step=k)
                if delta <= spec["tol"]:
                    break
        spec["info"] = {"iterations": k, "relative_change": delta}
        ctx.spec, ctx.nx = spec, nx
        zs = tuple(t.clone() for t in zs)
        ctx.save_for_backward(*xs_d, *zs)
        return zs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *zbar: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        xs, zs = saved[: ctx.nx], saved[ctx.nx :]
        lin = O.MapLinearization(ctx.spec["phi"], xs, zs)
        # (I − (∂_z T)^T) w = z̄ by the fixed-point iteration w ← z̄ + (∂_z T)^T w
        w, info = linalg.fixed_point(lambda v: T.sub(v, lin.vjp_z(v)), tuple(zbar), None,
                                     iters=ctx.spec["backward_iters"], alpha=1.0,
                                     tol=ctx.spec["tol"])
        ctx.spec["backward_info"] = info
        return (None, None, *lin.vjp_x(w))


def fixed_point(
    T_map: Callable[[Any, Any], Any],
    x: Any,
    z0: Any,
    *,
    iters: int = 100,
    tol: float = 1e-10,
    backward_iters: int | None = None,
) -> Any:
    """z*(x) with z* = T_map(x, z*), differentiable in ``x`` (a deep-equilibrium / fixed-point layer).

    Args:
        T_map: ``(x, z) -> z'`` (pytrees shaped like ``x`` and ``z0``), a contraction in z.
        x: tensor(s) the fixed point depends on; gradients flow to them.
        z0: starting point of the forward iteration z_{k+1} = T_map(x, z_k).
        iters, tol: the forward iteration stops after ``iters`` steps or when
            ‖z_{k+1} − z_k‖ ≤ tol ‖z_{k+1}‖.
        backward_iters: iterations of the adjoint fixed-point solve (default ``iters``).

    Returns:
        z*(x) shaped like ``z0``; its backward returns (∂_x T)^T w with w = z̄ + (∂_z T)^T w.
    """
    xs, xspec = T.flatten(x)
    check_variables(xs, "x")
    zs0, zspec = T.flatten(z0)
    check_variables(zs0, "z0")

    def phi(xs_: T.Leaves, zs_: T.Leaves) -> T.Leaves:
        out, spec = T.flatten(T_map(T.unflatten(xs_, xspec), T.unflatten(zs_, zspec)))
        check_like(out, spec, zs0, zspec, "T_map(x, z)")
        return out

    spec = {"phi": phi, "z0": T.detach(zs0), "iters": int(iters), "tol": float(tol),
            "backward_iters": int(iters if backward_iters is None else backward_iters)}
    zs = _FixedPoint.apply(spec, len(xs), *xs)
    return T.unflatten(zs, zspec)
