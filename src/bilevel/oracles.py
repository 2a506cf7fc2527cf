"""First- and second-order oracles on flat leaves. Nothing else in the package differentiates twice.

Notation: g(x, y) an objective (an :class:`~bilevel.formulation.Objective` or any scalar function of
flat leaves ``(xs, ys)``), H = ∇²_yy g, and the *cross term* J^T v = ∇²_xy g · v = ∂_x <∇_y g, v>.

* :func:`grads` — value, ∇_x and ∇_y from one backward pass.
* :class:`Linearization` — builds ∇_y g once with its graph; each product with H (and J^T) is then
  one backward through that graph (the cost of one gradient), and :meth:`Linearization.both`
  returns H v and J^T v from the *same* backward pass. Linear solves that need many HVPs at one
  point use it.
* :func:`hvp_and_cross` — one-shot H v and J^T v (stochastic algorithms, fresh batch per call).
* :func:`grad_y_fn` — a ``torch.func`` version of ∇_y g for forward-mode (jvp) and vmap.
* :func:`value_and_grad` — the gradient of any function of leaves (the outer derivative of an
  unrolled map), in either backend; :func:`vjp` — a vector-Jacobian product of a function of
  leaves (a checkpointed segment, an initialization y0(x)).

Backends (one switch for every algorithm): ``"autograd"`` (default; tape-based
``torch.autograd.grad``, the fastest eager path) and ``"func"`` (pure ``torch.func``: ``grad`` for
gradients, ``vjp`` of the gradient for H v and J^T v). Inside ``with backend("func"):`` every
oracle is a pure function of its inputs, so the same algorithm code runs under ``torch.func.vmap``
(e.g. over tasks) and is captured whole by ``torch.compile(fullgraph=True)`` (double backward
through ``torch.autograd.grad`` cannot be compiled). ``with backend("compiled"):`` runs each oracle
as a cached compiled kernel (``torch.compile``) of its ``"func"`` form (:mod:`bilevel.compiled`).

Sample-gradient accounting: inside ``with counting() as c:`` every oracle call adds the batch
size of its objective to ``c[level][kind]`` (kinds: value, grad, hvp, cross).

Data parallelism (:mod:`bilevel.distributed`): inside ``with reducing(r):`` every result of an
objective whose data are sharded is replaced by the union's result, one flat all-reduce per oracle
call, whatever the backend (:func:`_reduce`, the only hook; a Linearization's value and ∇_y g
ride along with its first product unless read before). Derivatives taken outside this module
through reduced results (the reverse sweep of unrolled differentiation) start from
:func:`objective` and end with :func:`rank_mean`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from . import _tree as T
from ._trace import Check, fill_tensors, split_tensors
from ._trace import _checks as _trace_checks
from ._warnings import forward_ad_ready

__all__ = [
    "backend",
    "get_backend",
    "BACKENDS",
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
    "grad_y_hvp_cross",
    "grad_y_fn",
    "value_and_grad",
    "vjp",
    "grad_y_tangents",
    "reducing",
    "reduced",
    "objective",
    "rank_mean",
    "implicit_products",
    "MapLinearization",
    "grads_at",
]

Fn = Callable[[T.Leaves, T.Leaves], Tensor]


class OracleCounts(dict):
    """``counts[level][kind]`` = number of per-sample oracle evaluations."""

    def add(self, level: str, kind: str, n: int) -> None:
        lvl = self.get(level)
        if lvl is None:
            lvl = self[level] = {}
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
    if torch.compiler.is_compiling():  # (a compiled step's counts are its eager probe's)
        yield c
        return
    token = _ACTIVE.set(c)
    try:
        yield c
    finally:
        _ACTIVE.reset(token)


@contextmanager
def batched(k: int) -> Iterator[None]:
    """Count the block's oracle calls ``k`` times: under ``torch.func.vmap`` over k points the
    Python code, and so each oracle's count, runs once for all k."""
    if torch.compiler.is_compiling():  # (a compiled step's counts are its eager probe's)
        yield
        return
    outer = _ACTIVE.get()
    with counting() as c:
        yield
    if outer is not None:
        for level, kinds in c.items():
            for kind, n in kinds.items():
                outer.add(level, kind, n * k)


BACKENDS = ("autograd", "func", "compiled")
_BACKEND: ContextVar[str] = ContextVar("bilevel_oracle_backend", default="autograd")


@contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the oracles inside the block with backend ``name`` (one of :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown oracle backend {name!r}; choose one of {BACKENDS}")
    if torch.compiler.is_compiling():  # (traced code runs the "func" backend: get_backend)
        yield name
        return
    token = _BACKEND.set(name)
    try:
        yield name
    finally:
        _BACKEND.reset(token)


def get_backend() -> str:
    """The oracle backend in effect (``"autograd"`` unless inside :func:`backend`; ``"func"``
    while ``torch.compile`` traces a whole solver step, see :mod:`bilevel.compiled_step` —
    ``ContextVar.get`` cannot be traced, so no context variable is read there)."""
    return "func" if torch.compiler.is_compiling() else _BACKEND.get()


def _functional() -> bool:
    return get_backend() != "autograd"


def _kernel(kind: str, fn: Fn):
    """The compiled kernel for ``kind`` when the compiled backend is on (else None). None also
    inside a ``torch.func`` transform (e.g. the ``grad_and_value`` of an unrolled loss): dynamo
    refuses to trace there ("Unsupported functorch tracing attempt"), so the oracle runs its
    ``torch.func`` form eagerly instead of failing a capture."""
    if torch.compiler.is_compiling() or _BACKEND.get() != "compiled" or _in_transform():
        return None
    from .compiled import oracle_kernel

    return oracle_kernel(kind, fn)


_LEVEL = getattr(torch._C._functorch, "maybe_current_level", lambda: None)


def _in_transform() -> bool:
    """Is a ``torch.func`` transform (grad, vjp, jvp, vmap) active?"""
    return _LEVEL() is not None


_REDUCER: ContextVar[Any] = ContextVar("bilevel_reducer", default=None)


@contextmanager
def reducing(reducer: Any) -> Iterator[Any]:
    """Reduce oracle results over ranks with ``reducer`` inside the block (users enter it with
    :func:`bilevel.distributed.distributed`)."""
    if torch.compiler.is_compiling():  # (compiled steps are single-process: no reducer there)
        yield reducer
        return
    token = _REDUCER.set(reducer)
    try:
        yield reducer
    finally:
        _REDUCER.reset(token)


def _reducer() -> Any:
    """The active reducer (None while compiling: compiled steps are single-process)."""
    return None if torch.compiler.is_compiling() else _REDUCER.get()


def _reducing(fn: Fn) -> bool:
    r = _reducer()
    return r is not None and r.applies(fn)


def _reduce(fn: Fn, *parts: Any) -> Any:
    """The union's values of per-rank results ``parts`` of fn (tensors or tuples of leaves), in
    one flat all-reduce; unchanged without a process group or when fn's data are not sharded."""
    if not _reducing(fn):
        return parts if len(parts) > 1 else parts[0]
    if torch.compiler.is_compiling():
        raise RuntimeError("data-parallel oracles cannot run inside a compiled region (use the "
                           "'compiled' oracle backend: kernels are compiled, reductions are not)")
    flat = [(p,) if isinstance(p, Tensor) else tuple(p) for p in parts]
    out = iter(_REDUCER.get().reduce(fn, [t for p in flat for t in p]))
    res = tuple(next(out) if isinstance(p, Tensor) else tuple(next(out) for _ in p) for p in parts)
    return res if len(parts) > 1 else res[0]


def reduced(fn: Fn, *parts: Any) -> Any:
    """The union's value of results of fn computed outside this module that are linear in fn
    (e.g. a dense Hessian): one all-reduce when fn's data are sharded, else ``parts`` as given."""
    return _reduce(fn, *parts)


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
    r = _reducer()
    return tuple(leaves) if r is None else r.mean(tuple(leaves))


def _record(fn: Fn, *kinds: str, times: int = 1) -> None:
    if torch.compiler.is_compiling():  # counted by the caller (ContextVar.get cannot be traced)
        return
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
    if not isinstance(out, Tensor) and len(out) == 1:  # one output leaf (the common case): the
        out = out[0]                                    # fast path below, a few µs per call less
        grad_outputs = None if grad_outputs is None else grad_outputs[0]
    if isinstance(out, Tensor):
        if not out.requires_grad:
            return tuple([torch.zeros_like(t) for t in inputs])
        gs = torch.autograd.grad(out, inputs, grad_outputs, create_graph=create_graph,
                                 retain_graph=retain_graph, allow_unused=True)
        if len(gs) == 1 and gs[0] is not None:
            return gs
        return tuple([torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)])
    outs = list(out)
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


_ON = contextlib.nullcontext()


def _grad_on() -> Any:
    """``torch.enable_grad()``, or a no-op when grad mode is already on (entering the context
    manager costs microseconds on every oracle call; :func:`bilevel.solve` runs steps with it on)."""
    return _ON if torch.is_grad_enabled() else torch.enable_grad()


_is_compiling = torch.compiler.is_compiling


def _eager() -> bool:
    """The plain eager path — ``"autograd"`` backend, no data-parallel reducer, not tracing a
    compiled step — in one test: the oracles then skip the kernel / functional / reduction
    dispatch (a few µs per call, which a loop of small oracle calls pays hundreds of times)."""
    # (is_compiling first: ContextVar.get cannot be traced)
    return not _is_compiling() and _BACKEND.get() == "autograd" and _REDUCER.get() is None


def _flat(xs: T.Leaves, ys: T.Leaves, fn: Fn | None = None, *kinds: str) -> bool:
    """The flattest eager path applies: one leaf each, plain eager autograd, grad mode on (what
    :func:`bilevel.solve` runs). Its oracles below call autograd directly, without the
    leafwise helpers — a loop of small oracle calls pays every Python call between two kernels.
    Where it applies, the oracle calls ``kinds`` of ``fn`` are counted too (:func:`_count`, in
    the same call)."""
    if not (len(ys) == 1 and len(xs) == 1 and _eager() and torch.is_grad_enabled()):
        return False
    if kinds:
        _count(fn, *kinds)
    return True


def _count(fn: Fn, *kinds: str) -> None:
    """:func:`_record` of one call of each of ``kinds`` on the eager path (known not to be
    compiling)."""
    c = _ACTIVE.get()
    if c is not None:
        level, n = getattr(fn, "level", "objective"), getattr(fn, "n", 1)
        for kind in kinds:
            c.add(level, kind, n)


def _fixed(ts: T.Leaves) -> T.Leaves:
    """``T.detach(ts)``, skipped for one leaf outside any graph (a detach costs a dispatch)."""
    return ts if len(ts) == 1 and not ts[0].requires_grad else T.detach(ts)


def _diffable(ts: T.Leaves) -> T.Leaves:
    """Keep tensors already in a graph; make the others fresh leaves that require grad."""
    return tuple(t if t.requires_grad else t.detach().requires_grad_(True) for t in ts)


def value(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> Tensor:
    """f(x, y) without building a graph."""
    _record(fn, "value")
    k = _kernel("value", fn)
    if k is not None:
        return _reduce(fn, k(xs, ys))
    with torch.no_grad():
        return _reduce(fn, fn(xs, ys))


def grad_y(fn: Fn, xs: T.Leaves, ys: T.Leaves, *, create_graph: bool = False) -> T.Leaves:
    """∇_y fn(x, y). With ``create_graph`` the result stays differentiable in (x, y) (unrolling)."""
    if not create_graph and _flat(xs, ys, fn, "grad"):
        x, y = xs[0], ys[0].detach().requires_grad_(True)
        out = fn((x.detach() if x.requires_grad else x,), (y,))
        g = torch.autograd.grad(out, y, allow_unused=True)[0] if out.requires_grad else None
        return (torch.zeros_like(y) if g is None else g,)
    if not create_graph and _eager():
        _count(fn, "grad")
        with _grad_on():
            ys_ = T.requires_grad(ys)
            return _grad(fn(_fixed(xs), ys_), ys_)
    _record(fn, "grad")
    k = _kernel("grad_y_graph" if create_graph else "grad_y", fn)
    if k is not None:
        return _reduce(fn, k(xs, ys))
    if _functional():
        if not create_graph:
            xs, ys = T.detach(xs), T.detach(ys)
        return _reduce(fn, f_grad_y(fn, xs, ys))
    with _grad_on():
        if create_graph:
            ys_ = _diffable(ys)
            return _reduce(fn, _grad(fn(xs, ys_), ys_, create_graph=True))
        ys_ = T.requires_grad(ys)
        return _reduce(fn, _grad(fn(T.detach(xs), ys_), ys_))


def grad_x(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> T.Leaves:
    """∇_x fn(x, y) at fixed y."""
    if _eager():
        _count(fn, "grad")
        with _grad_on():
            xs_ = T.requires_grad(xs)
            return _grad(fn(xs_, _fixed(ys)), xs_)
    _record(fn, "grad")
    k = _kernel("grad_x", fn)
    if k is not None:
        return _reduce(fn, k(xs, ys))
    if _functional():
        return _reduce(fn, f_grad_x(fn, T.detach(xs), T.detach(ys)))
    with _grad_on():
        xs_ = T.requires_grad(xs)
        return _reduce(fn, _grad(fn(xs_, T.detach(ys)), xs_))


def grads(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> tuple[Tensor, T.Leaves, T.Leaves]:
    """(value, ∇_x fn, ∇_y fn) from one backward pass."""
    if _flat(xs, ys, fn, "grad"):
        x, y = xs[0].detach().requires_grad_(True), ys[0].detach().requires_grad_(True)
        val = fn((x,), (y,))
        gx, gy = torch.autograd.grad(val, (x, y), allow_unused=True) if val.requires_grad else (None, None)
        return (val.detach(), (torch.zeros_like(x) if gx is None else gx,),
                (torch.zeros_like(y) if gy is None else gy,))
    if _eager():
        _count(fn, "grad")
        with _grad_on():
            xs_, ys_ = T.requires_grad(xs), T.requires_grad(ys)
            val = fn(xs_, ys_)
            g = _grad(val, xs_ + ys_)
        nx = len(xs)
        return val.detach(), g[:nx], g[nx:]
    _record(fn, "grad")
    k = _kernel("grads", fn)
    if k is not None:
        return _reduce(fn, *k(xs, ys))
    if _functional():
        return _reduce(fn, *f_grads(fn, T.detach(xs), T.detach(ys)))
    with _grad_on():
        xs_, ys_ = T.requires_grad(xs), T.requires_grad(ys)
        val = fn(xs_, ys_)
        g = _grad(val, xs_ + ys_)
    return _reduce(fn, val.detach(), g[: len(xs)], g[len(xs) :])


class Linearization:
    """∇_y g(x, y) with its graph kept, for repeated products with H = ∇²_yy g and J^T = ∇²_xy g.

    Building it costs one gradient; each :meth:`hvp`, :meth:`cross` or :meth:`both` then costs one
    backward through the stored graph (about one gradient), instead of the two passes of a fresh
    reverse-over-reverse HVP. With the ``"func"`` backend the graph is a ``torch.func.vjp`` of
    ∇_y g (pure, vmap-able); with ``"compiled"`` every product is one compiled kernel.
    """

    _flat = False  # built on the flat eager path (see _flat)

    def __init__(self, fn: Fn, xs: T.Leaves, ys: T.Leaves):
        self.fn = fn
        self._pending: tuple | None = None  # data-parallel: local (value, ∇_y g) to reduce
        if _flat(xs, ys, fn, "grad"):  # the autograd branch below, written out (see _flat)
            self._mode, self._flat = "autograd", True
            self.xs, self.ys = (xs[0].detach().requires_grad_(True),), (ys[0].detach().requires_grad_(True),)
            value = fn(self.xs, self.ys)
            self._gy = _grad(value, self.ys, create_graph=True)
            self.value, self.grad_y = value.detach(), (self._gy[0].detach(),)
            return
        _record(fn, "grad")
        self._mode = get_backend() if not torch.compiler.is_compiling() else "func"
        if self._mode == "compiled":  # value and ∇_y g come with the first product (one kernel)
            self.xs, self.ys = T.detach(xs), T.detach(ys)
            self._first: tuple | None = None
            return
        if self._mode == "func":
            self.xs, self.ys = T.detach(xs), T.detach(ys)

            def gy_val(a: T.Leaves, b: T.Leaves) -> tuple[T.Leaves, Tensor]:
                g, val = torch.func.grad_and_value(fn, argnums=1)(a, b)
                return g, val

            self.grad_y, self._vjp, self.value = torch.func.vjp(gy_val, self.xs, self.ys,
                                                                has_aux=True)
            self._hold()
            return
        with _grad_on():
            self.xs = T.requires_grad(xs)
            self.ys = T.requires_grad(ys)
            self.value = fn(self.xs, self.ys)
            self._gy = _grad(self.value, self.ys, create_graph=True)
        self.value = self.value.detach()
        self.grad_y = T.detach(self._gy)
        self._hold()

    def _hold(self) -> None:
        """Data-parallel: keep this rank's (value, ∇_y g) aside; they are reduced on first read
        or ride along with the first product's all-reduce (:meth:`_out`)."""
        if _reducing(self.fn):
            self._pending = (self.__dict__.pop("value"), tuple(self.__dict__.pop("grad_y")))

    def __getattr__(self, name: str) -> Any:
        # compiled mode: ``value`` / ``grad_y`` computed on first access, or by the first
        # :meth:`both` (fused with the products); data-parallel: reduced on first access
        d = self.__dict__
        if name in ("value", "grad_y") and (d.get("_pending") is not None or d.get("_mode") == "compiled"):
            if d.get("_pending") is None:
                if self._first is None:
                    self._first = _kernel("value_grad_y", self.fn)(self.xs, self.ys)
                if not _reducing(self.fn):
                    self.value, self.grad_y = self._first
                    return d[name]
                d["_pending"] = self._first
            pending, d["_pending"] = d["_pending"], None
            self.value, self.grad_y = _reduce(self.fn, *pending)
            return d[name]
        raise AttributeError(name)

    def _out(self, *parts: Any) -> Any:
        """Products as the union's (data-parallel), with a pending (value, ∇_y g) fused into the
        same all-reduce; ``parts`` unchanged otherwise."""
        if not _reducing(self.fn):
            return parts if len(parts) > 1 else parts[0]
        d = self.__dict__
        pending = d.get("_pending")
        if pending is None and self._mode == "compiled" and self._first is not None \
                and "grad_y" not in d:
            pending = self._first  # the fused first product's value and ∇_y g
        if pending is None:
            return _reduce(self.fn, *parts)
        d["_pending"] = None
        res = _reduce(self.fn, *pending, *parts)
        self.value, self.grad_y = res[0], res[1]
        return res[2:] if len(parts) > 1 else res[2]

    def hvp(self, v: T.Leaves) -> T.Leaves:
        """H v = ∇²_yy g · v."""
        _record(self.fn, "hvp")
        if self._mode == "compiled":
            return self._out(_kernel("hvp", self.fn)(self.xs, self.ys, v))
        if self._mode == "func":
            return self._out(self._vjp(tuple(v))[1])
        return self._out(_grad(self._gy, self.ys, v, retain_graph=True))

    def cross(self, v: T.Leaves) -> T.Leaves:
        """J^T v = ∇²_xy g · v (shape of x)."""
        _record(self.fn, "cross")
        if self._mode == "compiled":
            return self._out(_kernel("cross", self.fn)(self.xs, self.ys, v))
        if self._mode == "func":
            return self._out(self._vjp(tuple(v))[0])
        return self._out(_grad(self._gy, self.xs, v, retain_graph=True))

    def both(self, v: T.Leaves) -> tuple[T.Leaves, T.Leaves]:
        """(H v, J^T v) from a single backward pass (and, data-parallel, one all-reduce)."""
        if self._flat:  # built on the flat path: plain eager, one leaf each, nothing to reduce
            _count(self.fn, "hvp", "cross")
            g = _grad(self._gy, self.xs + self.ys, v, retain_graph=True)
            return g[1:], g[:1]
        _record(self.fn, "hvp", "cross")
        if self._mode == "compiled":
            if self._first is None and "grad_y" not in self.__dict__ and self._pending is None:
                val, gy, hv, jt = _kernel("value_grad_y_both", self.fn)(self.xs, self.ys, v)
                self._first = (val, gy)
                return self._out(hv, jt)
            return self._out(*_kernel("both", self.fn)(self.xs, self.ys, v))
        if self._mode == "func":
            jt, hv = self._vjp(tuple(v))
            return self._out(hv, jt)
        g = _grad(self._gy, self.xs + self.ys, v, retain_graph=True)
        return self._out(g[len(self.xs) :], g[: len(self.xs)])

    def cross_t(self, u: T.Leaves) -> T.Leaves:
        """J u = ∇²_yx g · u (shape of y), the transpose of :meth:`cross`: the derivative of ∇_y g
        along an x-direction u (double backward: J u = ∂_w <∂_x <∇_y g, w>, u>). Counted as a cross."""
        _record(self.fn, "cross")
        if self._mode != "autograd":
            return self._out(f_cross_t(self.fn, self.xs, self.ys, tuple(u)))
        with _grad_on():
            w = tuple(torch.zeros_like(t).requires_grad_(True) for t in self.ys)
            jtw = _grad(self._gy, self.xs, w, create_graph=True, retain_graph=True)
            return self._out(T.detach(_grad(jtw, w, u, retain_graph=True)))


def _flat_products(fn: Fn, x: Tensor, y: Tensor, wrt: tuple[Tensor, ...], v: Tensor
                   ) -> tuple[Tensor | None, list[Tensor]]:
    """(∇_y fn(x, y), [(∂/∂w ∇_y fn)ᵀ v for w in wrt]) for one-leaf variables (y requires grad;
    w = y for H v, x for Jᵀ v): one gradient with graph and one backward that frees it; zeros
    where fn does not depend on the variables (∇_y fn: None where fn ignores y; still in the
    graph, if it is, and not detached)."""
    out = fn((x,), (y,))
    gy = torch.autograd.grad(out, y, create_graph=True, allow_unused=True)[0] \
        if out.requires_grad else None
    if gy is None or not gy.requires_grad:  # (g ignores y, or is linear in it)
        return gy, [torch.zeros_like(w) for w in wrt]
    rs = torch.autograd.grad(gy, wrt, v, allow_unused=True)
    return gy, [torch.zeros_like(w) if r is None else r for r, w in zip(rs, wrt)]


def hvp(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> T.Leaves:
    """One-shot H v (reverse-over-reverse).

    Eager (no data-parallel reduction): ∇_y g is built with x *outside* the graph (x detached, only
    y a graph input — the product never differentiates in x) and its graph is freed by the one
    backward; the numbers are those of ``Linearization(fn, xs, ys).hvp(v)``."""
    if _flat(xs, ys, fn, "grad", "hvp"):
        x = xs[0].detach() if xs[0].requires_grad else xs[0]
        y = ys[0].detach().requires_grad_(True)
        return (_flat_products(fn, x, y, (y,), v[0])[1][0],)
    if _functional():
        _record(fn, "grad", "hvp")
        k = _kernel("hvp", fn)
        return _reduce(fn, k(xs, ys, v) if k is not None
                       else f_hvp(fn, T.detach(xs), T.detach(ys), tuple(v)))
    if _reducing(fn):
        return Linearization(fn, xs, ys).hvp(v)
    _count(fn, "grad", "hvp")  # (not compiling: that is functional)
    with _grad_on():
        ys_ = T.requires_grad(ys)
        gy = _grad(fn(_fixed(xs), ys_), ys_, create_graph=True)
        return _grad(gy, ys_, v)


def cross(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> T.Leaves:
    """One-shot J^T v = ∇²_xy g · v (eager: one gradient with graph, one backward that frees it;
    the numbers of ``Linearization(fn, xs, ys).cross(v)``)."""
    if _flat(xs, ys, fn, "grad", "cross"):
        x, y = xs[0].detach().requires_grad_(True), ys[0].detach().requires_grad_(True)
        return (_flat_products(fn, x, y, (x,), v[0])[1][0],)
    if _functional():
        _record(fn, "grad", "cross")
        k = _kernel("cross", fn)
        return _reduce(fn, k(xs, ys, v) if k is not None
                       else f_cross(fn, T.detach(xs), T.detach(ys), tuple(v)))
    if _reducing(fn):
        return Linearization(fn, xs, ys).cross(v)
    _count(fn, "grad", "cross")  # (not compiling: that is functional)
    with _grad_on():
        xs_, ys_ = T.requires_grad(xs), T.requires_grad(ys)
        gy = _grad(fn(xs_, ys_), ys_, create_graph=True)
        return _grad(gy, xs_, v)


def hvp_and_cross(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> tuple[T.Leaves, T.Leaves]:
    """One-shot (H v, J^T v): one gradient with graph plus one backward for both products."""
    return grad_y_hvp_cross(fn, xs, ys, v)[1:]


def grad_y_hvp_cross(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves
                     ) -> tuple[T.Leaves, T.Leaves, T.Leaves]:
    """One-shot (∇_y g, H v, J^T v): one gradient with graph plus one backward for both products,
    the numbers of ``Linearization(fn, xs, ys)``'s ``grad_y`` and ``both(v)``. On the flat eager
    path (one leaf each) the backward frees the graph and no linearization object is built."""
    if _flat(xs, ys, fn, "grad", "hvp", "cross"):
        x, y = xs[0].detach().requires_grad_(True), ys[0].detach().requires_grad_(True)
        gy, (jv, hv) = _flat_products(fn, x, y, (x, y), v[0])
        gy = torch.zeros_like(y) if gy is None else gy.detach() if gy.requires_grad else gy
        return (gy,), (hv,), (jv,)
    lin = Linearization(fn, xs, ys)
    hv, jv = lin.both(v)
    return lin.grad_y, hv, jv


def grad_y_tangents(
    fn: Fn, xs: T.Leaves, ys: T.Leaves, U: T.Leaves, Z: T.Leaves
) -> tuple[T.Leaves, T.Leaves]:
    """∇_y fn(x, y) and its directional derivatives along B tangents (u_i, z_i) at once:
    d_i = J u_i + H z_i = ∇²_yx fn · u_i + ∇²_yy fn · z_i (``U``, ``Z``: leaves with a leading
    dimension B; forward-mode unrolling). By symmetry of the Hessian of fn in (x, y),
    d_i = ∂_y [<∇_x fn, u_i> + <∇_y fn, z_i>]: one gradient with graph and ONE reverse pass batched
    over the tangents (``is_grads_batched``) — no jvp, no copies of the data per tangent. With
    the functional backends it is a vmapped ``torch.func.jvp`` of ∇_y fn. Counted as one gradient
    plus B Hessian- and B cross-products."""
    nb = U[0].shape[0] if U else Z[0].shape[0]
    _record(fn, "grad")
    _record(fn, "hvp", "cross", times=nb)
    if _functional():
        forward_ad_ready()
        xs, ys = T.detach(xs), T.detach(ys)
        gy = f_grad_y(fn, xs, ys)

        def tangent(u: T.Leaves, z: T.Leaves) -> T.Leaves:
            return torch.func.jvp(lambda a, b: f_grad_y(fn, a, b), (xs, ys), (u, z))[1]

        # randomness="same": a random op (dropout) draws one mask for all tangents, the primal's
        return _reduce(fn, gy, tuple(torch.func.vmap(tangent, randomness="same")(tuple(U), tuple(Z))))
    with _grad_on():
        xs_, ys_ = T.requires_grad(xs), T.requires_grad(ys)
        g = _grad(fn(xs_, ys_), xs_ + ys_, create_graph=True)
        outs = [(gi, ti) for gi, ti in zip(g, tuple(U) + tuple(Z)) if gi.requires_grad]
        if not outs:
            return _reduce(fn, T.detach(g[len(xs) :]), tuple(torch.zeros_like(t) for t in Z))
        if nb == 1:  # one tangent: a plain backward (a batched one adds a product and a bmm)
            d = torch.autograd.grad([o for o, _ in outs], ys_, [t[0] for _, t in outs],
                                    allow_unused=True)
            d = tuple(None if di is None else di.unsqueeze(0) for di in d)
        else:
            d = torch.autograd.grad([o for o, _ in outs], ys_, [t for _, t in outs],
                                    is_grads_batched=True, allow_unused=True)
    d = tuple(torch.zeros_like(z) if di is None else di for di, z in zip(d, Z))
    return _reduce(fn, T.detach(g[len(xs) :]), d)


def value_and_grad(
    fun: Callable[..., Any], args: T.Leaves, *, has_aux: bool = False
) -> tuple[T.Leaves, Any]:
    """Gradient of a scalar function of flat leaves: returns ``(∇fun(args), out)`` where ``out``
    is fun's value (``(value, aux)`` with ``has_aux``; value and aux detached). With the
    ``"autograd"`` backend it records a tape and calls ``torch.autograd.grad`` (so ``fun`` may
    itself build graphs with ``create_graph`` oracles — reverse-mode unrolling); otherwise it is
    ``torch.func.grad_and_value`` (composable with vmap / torch.compile)."""
    if _functional():
        checks = _trace_checks()  # (traced mode: the deferred checks fun records)
        if not has_aux and checks is None:
            g, out = torch.func.grad_and_value(lambda *a: fun(tuple(a)), argnums=tuple(
                range(len(args))))(*args)
            return tuple(g), out
        side: dict[str, Any] = {}
        n0 = 0 if checks is None else len(checks)

        def tensor_aux(*a: Tensor):  # torch.func returns tensors only: numbers travel beside
            out = fun(tuple(a))
            val, aux = out if has_aux else (out, None)
            tensors, side["marks"], side["spec"] = split_tensors(aux)
            # checks recorded inside the transform leave it as outputs: a flag kept from in
            # there would be a tensor of the transform's level (a compiled graph cannot return it)
            new = [] if checks is None else checks[n0:]
            if new:
                del checks[n0:]
            side["errors"] = [(c.error, c.redo) for c in new]
            return val, (tensors, [c.ok for c in new])

        g, (val, (tensors, oks)) = torch.func.grad_and_value(
            tensor_aux, argnums=tuple(range(len(args))), has_aux=True)(*args)
        if checks is not None:
            checks.extend(Check(ok, err, redo) for ok, (err, redo) in zip(oks, side["errors"]))
        if not has_aux:
            return tuple(g), val
        return tuple(g), (val, fill_tensors(tensors, side["marks"], side["spec"]))
    with _grad_on():
        a = T.requires_grad(args)
        out = fun(a)
        val = out[0] if has_aux else out
        g = _grad(val, a)
    if has_aux:
        return g, (val.detach(), _detach_tree(out[1]))
    return g, val.detach()


def vjp(fun: Callable[[T.Leaves], T.Leaves], args: T.Leaves, cotangent: T.Leaves) -> T.Leaves:
    """(∂fun/∂args)^T · cotangent for a function of flat leaves returning flat leaves (detached):
    the adjoint of a segment of an unrolled map, or of an initialization y0(x). ``torch.func.vjp``
    in the functional backends, one ``torch.autograd.grad`` otherwise."""
    if _functional():
        _, pull = torch.func.vjp(lambda a: tuple(fun(a)), tuple(args))
        return T.detach(pull(tuple(cotangent))[0])
    with _grad_on():
        a = T.requires_grad(args)
        return T.detach(_grad(fun(a), a, cotangent))


def _detach_tree(obj: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.detach() if isinstance(t, Tensor) else t, obj)


# --- the pure torch.func forms (what the "func" and "compiled" backends run) ------------------


def f_grad_y(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> T.Leaves:
    """∇_y fn as ``torch.func.grad`` (pure; differentiable by enclosing transforms)."""
    return tuple(torch.func.grad(fn, argnums=1)(tuple(xs), tuple(ys)))


def f_grad_x(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> T.Leaves:
    """∇_x fn as ``torch.func.grad``."""
    return tuple(torch.func.grad(fn, argnums=0)(tuple(xs), tuple(ys)))


def f_grads(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> tuple[Tensor, T.Leaves, T.Leaves]:
    """(value, ∇_x fn, ∇_y fn) from one ``torch.func.grad_and_value``."""
    (gx, gy), val = torch.func.grad_and_value(fn, argnums=(0, 1))(tuple(xs), tuple(ys))
    return val, tuple(gx), tuple(gy)


def f_value_grad_y(fn: Fn, xs: T.Leaves, ys: T.Leaves) -> tuple[Tensor, T.Leaves]:
    """(value, ∇_y fn)."""
    g, val = torch.func.grad_and_value(fn, argnums=1)(tuple(xs), tuple(ys))
    return val, tuple(g)


def f_hvp(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> T.Leaves:
    """H v as the vjp of y -> ∇_y fn(x, y) (H is symmetric)."""
    xs = tuple(xs)
    _, pull = torch.func.vjp(lambda b: f_grad_y(fn, xs, b), tuple(ys))
    return tuple(pull(tuple(v))[0])


def f_cross(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> T.Leaves:
    """J^T v = ∇²_xy fn · v as the vjp of x -> ∇_y fn(x, y)."""
    ys = tuple(ys)
    _, pull = torch.func.vjp(lambda a: f_grad_y(fn, a, ys), tuple(xs))
    return tuple(pull(tuple(v))[0])


def f_both(fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves) -> tuple[T.Leaves, T.Leaves]:
    """(H v, J^T v) from one vjp of (x, y) -> ∇_y fn(x, y)."""
    _, pull = torch.func.vjp(lambda a, b: f_grad_y(fn, a, b), tuple(xs), tuple(ys))
    jt, hv = pull(tuple(v))
    return tuple(hv), tuple(jt)


def f_value_grad_y_both(
    fn: Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves
) -> tuple[Tensor, T.Leaves, T.Leaves, T.Leaves]:
    """(value, ∇_y fn, H v, J^T v) from one vjp of (x, y) -> ∇_y fn(x, y)."""

    def gy_val(a: T.Leaves, b: T.Leaves) -> tuple[T.Leaves, Tensor]:
        g, val = torch.func.grad_and_value(fn, argnums=1)(a, b)
        return tuple(g), val

    gy, pull, val = torch.func.vjp(gy_val, tuple(xs), tuple(ys), has_aux=True)
    jt, hv = pull(tuple(v))
    return val, tuple(gy), tuple(hv), tuple(jt)


def f_cross_t(fn: Fn, xs: T.Leaves, ys: T.Leaves, u: T.Leaves) -> T.Leaves:
    """J u = ∇²_yx fn · u as the jvp of x -> ∇_y fn(x, y) along u."""
    forward_ad_ready()
    ys = tuple(ys)
    return tuple(torch.func.jvp(lambda a: f_grad_y(fn, a, ys), (tuple(xs),), (tuple(u),))[1])


def grad_y_fn(fn: Fn) -> Callable[[T.Leaves, T.Leaves], T.Leaves]:
    """∇_y fn as a pure ``torch.func`` function, composable with ``jvp`` and ``vmap``."""
    gfun = torch.func.grad(lambda xs, ys: fn(xs, ys), argnums=1)
    if _reducer() is None:
        return gfun
    return lambda xs, ys: _reduce(fn, gfun(xs, ys))


# --- products for implicit layers (bilevel.layers) ----------------------------------------------


def implicit_products(fn: Fn, xs: T.Leaves, ys: T.Leaves):
    """``(∇_y g, v -> H v, w -> J^T w)`` at (x, y), built with ``torch.func``.

    The three are pure functions of ``xs`` and ``ys`` (partial derivatives, whatever graph the
    tensors carry), and stay differentiable by ordinary autograd: used for the double backward
    of :func:`bilevel.argmin` (implicit differentiation inside implicit differentiation).
    """
    gfun = grad_y_fn(fn)
    gy, vjp_y = torch.func.vjp(lambda ys_: gfun(xs, ys_), tuple(ys))
    _, vjp_x = torch.func.vjp(lambda xs_: gfun(xs_, tuple(ys)), tuple(xs))

    def hvp_(v: T.Leaves) -> T.Leaves:
        _record(fn, "hvp")
        return tuple(vjp_y(tuple(v))[0])

    def cross_(w: T.Leaves) -> T.Leaves:
        _record(fn, "cross")
        return tuple(vjp_x(tuple(w))[0])

    return tuple(gy), hvp_, cross_


class MapLinearization:
    """A map ``(xs, zs) -> Φ(x, z)`` (flat leaves shaped like z) evaluated once with its graph, for
    repeated vector-Jacobian products ``(∂_z Φ)^T w`` and ``(∂_x Φ)^T w`` (fixed-point layers)."""

    def __init__(self, phi: Callable[[T.Leaves, T.Leaves], T.Leaves], xs: T.Leaves, zs: T.Leaves):
        with _grad_on():
            self.xs, self.zs = T.requires_grad(xs), T.requires_grad(zs)
            self.out = tuple(phi(self.xs, self.zs))

    def vjp_z(self, w: T.Leaves) -> T.Leaves:
        return _grad(self.out, self.zs, w, retain_graph=True)

    def vjp_x(self, w: T.Leaves) -> T.Leaves:
        return _grad(self.out, self.xs, w, retain_graph=True)


# --- many points at once (proxy estimators: hypergrad.proxy, hypergrad.evograd) -----------------


def grads_at(
    fn: Fn,
    xs: T.Leaves,
    ys: T.Leaves,
    X: Tensor | None,
    Y: Tensor,
    *,
    batched: bool = True,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(values (S,), ∇_x fn (S, dim x), ∇_y fn (S, dim y)) at S points given as the rows of flat
    matrices: ``X`` (S, dim x), or ``None`` for x = ``xs`` at every row, and ``Y`` (S, dim y);
    ``xs`` / ``ys`` give the leaf shapes. ``batched``: one ``torch.func.vmap`` of the pure form
    (``chunk`` rows at a time, default all); otherwise a loop of :func:`grads` (also used for
    data-parallel objectives). Counted as S gradients either way."""
    S = Y.shape[0]

    def at(i: int) -> tuple[T.Leaves, T.Leaves]:
        return (xs if X is None else T.from_vector(X[i], xs)), T.from_vector(Y[i], ys)

    if not batched or _reducing(fn) or S == 0:
        out = [grads(fn, *at(i)) for i in range(S)]
        return (torch.stack([v for v, _, _ in out]),
                torch.stack([T.to_vector(gx) for _, gx, _ in out]),
                torch.stack([T.to_vector(gy) for _, _, gy in out]))
    _record(fn, "grad", times=S)
    xd = T.detach(xs)
    size = S if chunk is None else int(chunk)
    parts = []
    for lo in range(0, S, size):
        Yc = Y[lo : lo + size].detach()

        def one(xrow: Tensor | None, yrow: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            a = xd if xrow is None else T.from_vector(xrow, xs)
            val, gx, gy = f_grads(fn, a, T.from_vector(yrow, ys))
            return val, T.to_vector(gx), T.to_vector(gy)

        if X is None:
            parts.append(torch.func.vmap(lambda yrow: one(None, yrow))(Yc))
        else:
            parts.append(torch.func.vmap(one)(X[lo : lo + size].detach(), Yc))
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]
