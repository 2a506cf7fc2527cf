"""First- and second-order oracles on flat leaves. Nothing else in the package differentiates twice.

Notation: g(x, y) an objective (an :class:`~bilevel.problem.Objective` or any scalar function of
flat leaves ``(xs, ys)``), H = ∇²_yy g, and the *cross term* J^T v = ∇²_xy g · v = ∂_x <∇_y g, v>.

* :func:`grads` — value, ∇_x and ∇_y from one backward pass.
* :class:`Linearization` — builds ∇_y g once with its graph; each product with H (and J^T) is then
  one backward through that graph (the cost of one gradient), and :meth:`Linearization.both`
  returns H v and J^T v from the *same* backward pass. Linear solves that need many HVPs at one
  point use it.
* :func:`hvp_and_cross` — one-shot H v and J^T v (stochastic algorithms, fresh batch per call).
* :func:`grad_y_fn` — a ``torch.func`` version of ∇_y g for forward-mode (jvp) and vmap.
* :func:`grad_of` / :func:`vjp` — the gradient of a scalar function of leaves / a vector-Jacobian
  product of a function of leaves: what estimators use to differentiate their own computations
  (an unrolled trajectory, a closed-form solve, an initialization y0(x)).

Two backends, chosen by the mode (:mod:`bilevel._trace`): eager ``torch.autograd.grad`` (default,
fastest eager), and inside :func:`bilevel._trace.traced` the ``torch.func`` formulation (``grad``,
``vjp`` — a :class:`Linearization` is one ``vjp`` of ∇_y g, each product one call of its pullback —
and ``jvp``), which composes with ``torch.func.vmap`` (tasks batched: :func:`bilevel.hypergrad.vmap`).

Sample-gradient accounting: inside ``with counting() as c:`` every oracle call adds the batch
size of its objective to ``c[level][kind]`` (kinds: value, grad, hvp, cross).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from . import _tree as T
from ._trace import fill_tensors, split_tensors, tracing

__all__ = [
    "counting",
    "record",
    "OracleCounts",
    "value",
    "grad_y",
    "grad_x",
    "grads",
    "Linearization",
    "hvp",
    "cross",
    "hvp_and_cross",
    "grad_y_fn",
    "grad_of",
    "vjp",
]

Fn = Callable[[T.Leaves, T.Leaves], Tensor]


class OracleCounts(dict):
    """``counts[level][kind]`` = number of per-sample oracle evaluations."""

    def add(self, level: str, kind: str, n: int) -> None:
        lvl = self.setdefault(level, {})
        lvl[kind] = lvl.get(kind, 0) + n

    def total(self, level: str | None = None) -> int:
        levels = [level] if level is not None else list(self)
        return sum(sum(self.get(lv, {}).values()) for lv in levels)

    def flat(self) -> dict[str, int]:
        return {f"{lv}_{k}": v for lv, d in self.items() for k, v in d.items()}


_ACTIVE: ContextVar[OracleCounts | None] = ContextVar("bilevel_oracle_counts", default=None)


@contextmanager
def counting(counts: OracleCounts | None = None) -> Iterator[OracleCounts]:
    """Count sample-oracle calls made inside the block (nested blocks each get their own)."""
    c = OracleCounts() if counts is None else counts
    token = _ACTIVE.set(c)
    try:
        yield c
    finally:
        _ACTIVE.reset(token)


def _record(fn: Fn, *kinds: str, times: int = 1) -> None:
    c = _ACTIVE.get()
    if c is not None:
        level, n = getattr(fn, "level", "objective"), getattr(fn, "n", 1)
        for kind in kinds:
            c.add(level, kind, n * times)


def record(fn: Fn, *kinds: str, times: int = 1) -> None:
    """Count oracle work done outside this module (e.g. the reverse sweep through an unrolled
    graph, which costs one Hessian- and one cross-product per step)."""
    _record(fn, *kinds, times=times)


def _grad(
    out: Sequence[Tensor] | Tensor,
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> T.Leaves:
    """``torch.autograd.grad`` that returns zeros (not None) for inputs the output ignores."""
    outs = [out] if isinstance(out, Tensor) else list(out)
    gos = None if grad_outputs is None else list(grad_outputs)
    live = [i for i, o in enumerate(outs) if o.requires_grad]
    if not live:
        return tuple(torch.zeros_like(t) for t in inputs)
    outs = [outs[i] for i in live]
    if gos is not None:
        gos = [gos[i] for i in live]
    gs = torch.autograd.grad(
        outs,
        list(inputs),
        gos,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs))


def _diffable(ts: T.Leaves) -> T.Leaves:
    """Keep tensors already in a graph; make the others fresh leaves that require grad."""
    return tuple(t if t.requires_grad else t.detach().requires_grad_(True) for t in ts)


def value(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> Tensor:
    """f(x, y) without building a graph."""
    _record(fn, "value")
    with torch.no_grad():
        return fn(xs, ys)


def grad_y(fn: Fn, xs: T.Leaves, ys: T.Leaves, *, create_graph: bool = False) -> T.Leaves:
    """∇_y fn(x, y). With ``create_graph`` the result stays differentiable in (x, y) (unrolling)."""
    _record(fn, "grad")
    if tracing():
        if create_graph:  # differentiable in (x, y) for an enclosing torch.func transform
            return torch.func.grad(lambda y: fn(xs, y))(tuple(ys))
        return T.detach(torch.func.grad(lambda y: fn(T.detach(xs), y))(T.detach(ys)))
    with torch.enable_grad():
        if create_graph:
            ys_ = _diffable(ys)
            return _grad(fn(xs, ys_), ys_, create_graph=True)
        ys_ = T.requires_grad(ys)
        return _grad(fn(T.detach(xs), ys_), ys_)


def grad_x(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> T.Leaves:
    """∇_x fn(x, y) at fixed y."""
    _record(fn, "grad")
    if tracing():
        return T.detach(torch.func.grad(lambda x: fn(x, T.detach(ys)))(T.detach(xs)))
    with torch.enable_grad():
        xs_ = T.requires_grad(xs)
        return _grad(fn(xs_, T.detach(ys)), xs_)


def grads(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> tuple[Tensor, T.Leaves, T.Leaves]:
    """(value, ∇_x fn, ∇_y fn) from one backward pass."""
    _record(fn, "grad")
    if tracing():
        (gx, gy), val = torch.func.grad_and_value(lambda a, b: fn(a, b), argnums=(0, 1))(
            T.detach(xs), T.detach(ys))
        return val.detach(), T.detach(gx), T.detach(gy)
    with torch.enable_grad():
        xs_, ys_ = T.requires_grad(xs), T.requires_grad(ys)
        val = fn(xs_, ys_)
        g = _grad(val, xs_ + ys_)
    return val.detach(), g[: len(xs)], g[len(xs) :]


class Linearization:
    """∇_y g(x, y) with its graph kept, for repeated products with H = ∇²_yy g and J^T = ∇²_xy g.

    Building it costs one gradient; each :meth:`hvp`, :meth:`cross` or :meth:`both` then costs one
    backward through the stored graph (about one gradient), instead of the two passes of a fresh
    reverse-over-reverse HVP.
    """

    def __init__(self, fn: Fn, xs: T.Leaves, ys: T.Leaves):
        self.fn = fn
        _record(fn, "grad")
        self._pullback = None
        if tracing():  # torch.func: ∇_y g and its pullback (v -> (J^T v, H v)) from one vjp
            self.xs, self.ys = T.detach(xs), T.detach(ys)

            def gy(a: T.Leaves, b: T.Leaves):
                return torch.func.grad_and_value(lambda y: fn(a, y))(b)

            self._gy_fn = gy
            self._gy, self._pullback, value = torch.func.vjp(gy, self.xs, self.ys, has_aux=True)
            self.value = value.detach()
            self.grad_y = T.detach(self._gy)
            return
        with torch.enable_grad():
            self.xs = T.requires_grad(xs)
            self.ys = T.requires_grad(ys)
            self.value = fn(self.xs, self.ys)
            self._gy = _grad(self.value, self.ys, create_graph=True)
        self.value = self.value.detach()
        self.grad_y = T.detach(self._gy)

    def hvp(self, v: T.Leaves) -> T.Leaves:
        """H v = ∇²_yy g · v."""
        _record(self.fn, "hvp")
        if self._pullback is not None:
            return T.detach(self._pullback(tuple(v))[1])
        return _grad(self._gy, self.ys, v, retain_graph=True)

    def cross(self, v: T.Leaves) -> T.Leaves:
        """J^T v = ∇²_xy g · v (shape of x)."""
        _record(self.fn, "cross")
        if self._pullback is not None:
            return T.detach(self._pullback(tuple(v))[0])
        return _grad(self._gy, self.xs, v, retain_graph=True)

    def both(self, v: T.Leaves) -> tuple[T.Leaves, T.Leaves]:
        """(H v, J^T v) from a single backward pass."""
        _record(self.fn, "hvp", "cross")
        if self._pullback is not None:
            gx, gy = self._pullback(tuple(v))
            return T.detach(gy), T.detach(gx)
        g = _grad(self._gy, self.xs + self.ys, v, retain_graph=True)
        return g[len(self.xs) :], g[: len(self.xs)]

    def cross_t(self, u: T.Leaves) -> T.Leaves:
        """J u = ∇²_yx g · u (shape of y), the transpose of :meth:`cross`: the derivative of ∇_y g
        along an x-direction u (double backward: J u = ∂_w <∂_x <∇_y g, w>, u>). Counted as a cross."""
        _record(self.fn, "cross")
        if self._pullback is not None:
            ys = self.ys
            _, ju = torch.func.jvp(lambda a: self._gy_fn(a, ys)[0], (self.xs,), (tuple(u),))
            return T.detach(ju)
        with torch.enable_grad():
            w = tuple(torch.zeros_like(t).requires_grad_(True) for t in self.ys)
            jtw = _grad(self._gy, self.xs, w, create_graph=True, retain_graph=True)
            return T.detach(_grad(jtw, w, u, retain_graph=True))


def hvp(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> T.Leaves:
    """One-shot H v (reverse-over-reverse)."""
    return Linearization(fn, xs, ys).hvp(v)


def cross(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> T.Leaves:
    """One-shot J^T v = ∇²_xy g · v."""
    return Linearization(fn, xs, ys).cross(v)


def hvp_and_cross(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> tuple[T.Leaves, T.Leaves]:
    """One-shot (H v, J^T v): one gradient with graph plus one backward for both products."""
    return Linearization(fn, xs, ys).both(v)


def grad_y_fn(fn: Fn) -> Callable[[T.Leaves, T.Leaves], T.Leaves]:
    """∇_y fn as a pure ``torch.func`` function, composable with ``jvp`` and ``vmap``."""
    return torch.func.grad(lambda xs, ys: fn(xs, ys), argnums=1)


def grad_of(
    fn: Callable[[T.Leaves], Tensor | tuple[Tensor, object]], xs: T.Leaves, *, has_aux: bool = False
):
    """∇ of a scalar function of flat leaves (``fn`` may return ``(value, aux)`` with ``has_aux``).

    Returns the gradient (detached), or ``(gradient, aux)``. Whatever ``fn`` computes with
    differentiable oracles (``grad_y(..., create_graph=True)``, unrolled dynamics) is
    differentiated through; not counted (the caller records the work it represents).
    """
    if tracing():
        if not has_aux:
            return T.detach(torch.func.grad(fn)(T.detach(xs)))
        side: dict = {}

        def tensor_aux(w: T.Leaves):  # torch.func returns tensors only: numbers travel beside
            val, aux = fn(w)
            tensors, side["marks"], side["spec"] = split_tensors(aux)
            return val, tensors

        g, tensors = torch.func.grad(tensor_aux, has_aux=True)(T.detach(xs))
        return T.detach(g), fill_tensors(tensors, side["marks"], side["spec"])
    with torch.enable_grad():
        xs_ = T.requires_grad(xs)
        out = fn(xs_)
        val, aux = out if has_aux else (out, None)
        g = T.detach(_grad(val, xs_))
    return (g, aux) if has_aux else g


def vjp(fn: Callable[[T.Leaves], T.Leaves], xs: T.Leaves, cotangent: T.Leaves) -> T.Leaves:
    """(∂ fn / ∂xs)^T · cotangent for a function of flat leaves returning flat leaves (detached)."""
    if tracing():
        _, pull = torch.func.vjp(lambda a: tuple(fn(a)), T.detach(xs))
        return T.detach(pull(tuple(cotangent))[0])
    with torch.enable_grad():
        xs_ = T.requires_grad(xs)
        return T.detach(_grad(fn(xs_), xs_, cotangent))
