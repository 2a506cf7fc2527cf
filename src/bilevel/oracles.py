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

Sample-gradient accounting: inside ``with counting() as c:`` every oracle call adds the batch
size of its objective to ``c[level][kind]`` (kinds: value, grad, hvp, cross).

Data parallelism (:mod:`bilevel.distributed`): inside ``with reducing(r):`` every result of an
objective whose data are sharded is replaced by ``r.reduce(fn, leaves)`` — the union's result, one
flat all-reduce per oracle call (:func:`_reduce`, the only hook). Derivatives taken outside this
module through reduced results (the reverse sweep of unrolled differentiation) start from
:func:`objective` and end with :func:`rank_mean`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from . import _tree as T

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
    "reducing",
    "objective",
    "rank_mean",
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


_REDUCER: ContextVar = ContextVar("bilevel_reducer", default=None)


@contextmanager
def reducing(reducer) -> Iterator:
    """Reduce oracle results over ranks with ``reducer`` inside the block (see
    :func:`bilevel.distributed.distributed`, which is how users enter it)."""
    token = _REDUCER.set(reducer)
    try:
        yield reducer
    finally:
        _REDUCER.reset(token)


def _reduce(fn: Fn, *parts):
    """The union's values of per-rank results ``parts`` of fn (tensors or tuples of leaves), in
    one flat all-reduce; unchanged without a process group or when fn's data are not sharded."""
    r = _REDUCER.get()
    if r is None or not r.applies(fn):
        return parts if len(parts) > 1 else parts[0]
    flat = [(p,) if isinstance(p, Tensor) else tuple(p) for p in parts]
    out = iter(r.reduce(fn, [t for p in flat for t in p]))
    res = tuple(next(out) if isinstance(p, Tensor) else tuple(next(out) for _ in p) for p in parts)
    return res if len(parts) > 1 else res[0]


def objective(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> Tensor:
    """fn(xs, ys) with its graph, as the union's value when fn's data are sharded. Start of a
    derivative taken outside this module (e.g. f at the end of an unrolled graph); finish it
    with :func:`rank_mean`."""
    return _reduce(fn, fn(xs, ys))


def rank_mean(leaves: T.Leaves) -> T.Leaves:
    """Derivatives of an :func:`objective` w.r.t. variables held by every rank, taken through
    graphs of reduced results, are per-rank shares: their mean over ranks is the derivative.
    (Each rank seeds the replicated loss with 1 and the backward of each reduction all-reduces
    the adjoint, so the shares sum to world-size times the derivative.) Identity without a group."""
    r = _REDUCER.get()
    return tuple(leaves) if r is None else r.mean(tuple(leaves))


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
        return _reduce(fn, fn(xs, ys))


def grad_y(fn: Fn, xs: T.Leaves, ys: T.Leaves, *, create_graph: bool = False) -> T.Leaves:
    """∇_y fn(x, y). With ``create_graph`` the result stays differentiable in (x, y) (unrolling)."""
    _record(fn, "grad")
    with torch.enable_grad():
        if create_graph:
            ys_ = _diffable(ys)
            return _reduce(fn, _grad(fn(xs, ys_), ys_, create_graph=True))
        ys_ = T.requires_grad(ys)
        return _reduce(fn, _grad(fn(T.detach(xs), ys_), ys_))


def grad_x(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> T.Leaves:
    """∇_x fn(x, y) at fixed y."""
    _record(fn, "grad")
    with torch.enable_grad():
        xs_ = T.requires_grad(xs)
        return _reduce(fn, _grad(fn(xs_, T.detach(ys)), xs_))


def grads(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> tuple[Tensor, T.Leaves, T.Leaves]:
    """(value, ∇_x fn, ∇_y fn) from one backward pass."""
    _record(fn, "grad")
    with torch.enable_grad():
        xs_, ys_ = T.requires_grad(xs), T.requires_grad(ys)
        val = fn(xs_, ys_)
        g = _grad(val, xs_ + ys_)
    return _reduce(fn, val.detach(), g[: len(xs)], g[len(xs) :])


class Linearization:
    """∇_y g(x, y) with its graph kept, for repeated products with H = ∇²_yy g and J^T = ∇²_xy g.

    Building it costs one gradient; each :meth:`hvp`, :meth:`cross` or :meth:`both` then costs one
    backward through the stored graph (about one gradient), instead of the two passes of a fresh
    reverse-over-reverse HVP.
    """

    def __init__(self, fn: Fn, xs: T.Leaves, ys: T.Leaves):
        self.fn = fn
        _record(fn, "grad")
        with torch.enable_grad():
            self.xs = T.requires_grad(xs)
            self.ys = T.requires_grad(ys)
            value = fn(self.xs, self.ys)
            self._gy = _grad(value, self.ys, create_graph=True)
        # (value, ∇_y g) as computed here; reduced over ranks lazily, riding along with the
        # first product's all-reduce when data are sharded (see _reduce)
        self._pending: tuple | None = (value.detach(), T.detach(self._gy))
        self._value, self._grad_y = self._pending

    def _out(self, *parts):
        """Reduce products (and the pending value / ∇_y g, fused into the same all-reduce)."""
        if self._pending is None or _REDUCER.get() is None:
            return _reduce(self.fn, *parts) if len(parts) > 1 else _reduce(self.fn, parts[0])
        res = _reduce(self.fn, *self._pending, *parts)
        self._value, self._grad_y = res[0], res[1]
        self._pending = None
        return res[2:] if len(parts) > 1 else res[2]

    @property
    def value(self) -> Tensor:
        """g(x, y)."""
        if self._pending is not None and _REDUCER.get() is not None:
            self._value, self._grad_y = _reduce(self.fn, *self._pending)
            self._pending = None
        return self._value

    @property
    def grad_y(self) -> T.Leaves:
        """∇_y g(x, y) (detached)."""
        self.value  # noqa: B018  (reduces the pending pair once)
        return self._grad_y

    def hvp(self, v: T.Leaves) -> T.Leaves:
        """H v = ∇²_yy g · v."""
        _record(self.fn, "hvp")
        return self._out(_grad(self._gy, self.ys, v, retain_graph=True))

    def cross(self, v: T.Leaves) -> T.Leaves:
        """J^T v = ∇²_xy g · v (shape of x)."""
        _record(self.fn, "cross")
        return self._out(_grad(self._gy, self.xs, v, retain_graph=True))

    def both(self, v: T.Leaves) -> tuple[T.Leaves, T.Leaves]:
        """(H v, J^T v) from a single backward pass (and, data-parallel, one all-reduce)."""
        _record(self.fn, "hvp", "cross")
        g = _grad(self._gy, self.xs + self.ys, v, retain_graph=True)
        return self._out(g[len(self.xs) :], g[: len(self.xs)])

    def cross_t(self, u: T.Leaves) -> T.Leaves:
        """J u = ∇²_yx g · u (shape of y), the transpose of :meth:`cross`: the derivative of ∇_y g
        along an x-direction u (double backward: J u = ∂_w <∂_x <∇_y g, w>, u>). Counted as a cross."""
        _record(self.fn, "cross")
        with torch.enable_grad():
            w = tuple(torch.zeros_like(t).requires_grad_(True) for t in self.ys)
            jtw = _grad(self._gy, self.xs, w, create_graph=True, retain_graph=True)
            return self._out(T.detach(_grad(jtw, w, u, retain_graph=True)))


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
    gfun = torch.func.grad(lambda xs, ys: fn(xs, ys), argnums=1)
    if _REDUCER.get() is None:
        return gfun
    return lambda xs, ys: _reduce(fn, gfun(xs, ys))
