"""Compiled mode: every oracle as a cached ``torch.compile``-d kernel of its ``torch.func`` form.

``bl.solve(..., compile="oracles")``, ``bl.compile(est)`` and ``with bl.oracles.backend("compiled"):``
all switch the oracle layer (:mod:`bilevel.oracles`) to compiled kernels, so every solver and
estimator gets them without a line of its own changed:

* one kernel per (oracle kind, problem, level, pytree structure) — ``grad_y``, ``grads``, the
  vjp-based ``hvp`` / ``cross`` / ``both`` (H v and J^T v from one vjp of ∇_y g), ... — compiled
  with ``fullgraph=True``; the data batch is an *argument*, so new batches of the same shapes reuse
  the kernel (no recompile); the oracles that build a graph (``grad_y(..., create_graph=True)``,
  reverse-mode unrolling) are compiled with their backward, and eager autograd chains them;
* a recompile counter (:func:`stats`): ``compiles`` counts graphs handed to the compiler backend;
* a clear fallback: if ``torch.compile`` cannot capture a user objective (data-dependent Python
  control flow, ``.item()``, unsupported calls ...) the kernel runs eagerly in its ``torch.func``
  form, and a :class:`CompileFallbackWarning` says which objective and why (once per kernel).
  Errors the objective raises in eager mode too (e.g. a non-scalar output) propagate unchanged.

The per-iteration arithmetic of the algorithms (axpy's, schedules) stays eager; only the
differentiation work is compiled.

Estimators (``bl.compile(est)``) go further: ``Reverse`` and the lower solve of the implicit
estimators run each block of ``settings["steps_per_kernel"]`` inner steps as one kernel (the step
Φ(x, y) = update(y, ∇_y g(x, y)) with its ∇_y g by ``torch.func.grad``), whose compiled backward
(AOT autograd) is the reverse sweep; the implicit estimators' H- and Jᵀ-products are the compiled
backward of one ∇_y g kernel at y_T (:class:`Linearization`). Their kernels read data used
transposed (``X.t()``) from cached contiguous copies and reorder thin products for MKL
(``settings["data_layout"]``). Settings they cannot honour (a step that depends on the step
index: Adam, schedules; custom directions; carried buffers; data-parallel) fall back to the eager
path with a :class:`CompileFallbackWarning` giving the reason.

Objectives that are not a :class:`bilevel.formulation.Objective` (have no stable identity to
cache a kernel on) run in their eager ``torch.func`` form.
"""

from __future__ import annotations

import builtins
import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

from . import _gemm
from . import _tree as T
from . import oracles as O
from ._warnings import quiet, retry_quietly
from .formulation import Objective
from .inner import Dynamics, _summary, nonfinite_error
from .validation import first_nonfinite

__all__ = ["compile", "Compiled", "CompileFallbackWarning", "settings", "stats", "reset"]


class CompileFallbackWarning(UserWarning):
    """A kernel could not be compiled and runs eagerly (the message gives the reason)."""


#: ``backend``: the ``torch.compile`` backend ("inductor", or "aot_eager" to check capture
#: without code generation); ``mode``: its mode (None, "reduce-overhead", "max-autotune", ...).
settings: dict[str, Any] = {"backend": "inductor", "mode": None}

_STATS = {"compiles": 0, "kernels": 0, "fallbacks": 0, "compiled_steps": 0, "eager_steps": 0,
          "transposed_data": 0}
_FALLBACK_REASONS: list[str] = []

#: problem -> {(kind, level, xspec, yspec, backend, mode): kernel}
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_IMPL: dict[str, Callable[..., Any]] = {
    "value": lambda fn, xs, ys: fn(xs, ys).detach(),
    "grad_y": lambda fn, xs, ys: O.f_grad_y(fn, _d(xs), _d(ys)),
    "grad_y_graph": O.f_grad_y,
    "grad_x": lambda fn, xs, ys: O.f_grad_x(fn, _d(xs), _d(ys)),
    "grads": lambda fn, xs, ys: O.f_grads(fn, _d(xs), _d(ys)),
    "value_grad_y": lambda fn, xs, ys: O.f_value_grad_y(fn, _d(xs), _d(ys)),
    "hvp": lambda fn, xs, ys, v: O.f_hvp(fn, _d(xs), _d(ys), tuple(v)),
    "cross": lambda fn, xs, ys, v: O.f_cross(fn, _d(xs), _d(ys), tuple(v)),
    "both": lambda fn, xs, ys, v: O.f_both(fn, _d(xs), _d(ys), tuple(v)),
    "value_grad_y_both": lambda fn, xs, ys, v: O.f_value_grad_y_both(fn, _d(xs), _d(ys), tuple(v)),
    # estimator kernels: differentiable in (xs, ys) by their compiled backward
    # (the value detached: nothing differentiates it, and as a differentiable output it would give
    # every backward of the kernel a zero tangent and its terms to carry)
    "value_grad_y_graph": lambda fn, xs, ys: _value_detached(*O.f_value_grad_y(fn, tuple(xs),
                                                                                tuple(ys))),
}


def _d(ts):
    return tuple(t.detach() for t in ts)


def _value_detached(val: torch.Tensor, g: T.Leaves) -> tuple[torch.Tensor, T.Leaves]:
    return val.detach(), g


def stats() -> dict[str, Any]:
    """``compiles`` (graphs compiled so far: a count that grows in a steady loop means
    recompiles), ``kernels`` (kernels created), ``fallbacks`` and their ``reasons``; whole-step
    mode (:mod:`bilevel.compiled_step`): ``compiled_steps`` and ``eager_steps`` (the first step
    of each pattern); ``transposed_data``: data inputs of estimator kernels read through cached
    transposes."""
    return {**_STATS, "reasons": list(_FALLBACK_REASONS)}


def reset() -> None:
    """Forget every cached kernel and zero the counters (the next calls compile again)."""
    from .compiled_step import _CODE

    _CACHE.clear()
    _CODE.clear()
    for k in _STATS:
        _STATS[k] = 0
    _FALLBACK_REASONS.clear()


def _counting_backend(gm: torch.fx.GraphModule, example_inputs: list,
                      patches: dict[str, Any] | None = None) -> Callable:
    _STATS["compiles"] += 1
    name, mode = settings["backend"], settings["mode"]
    if name == "inductor":
        with quiet():  # (its first import warns that torch.jit.script_method is deprecated)
            from torch._inductor.compile_fx import compile_fx

        if mode is None and not patches:
            return compile_fx(gm, example_inputs)
        from torch._functorch import config as functorch_config
        from torch._inductor import list_mode_options

        # views are recomputed in the backward, never saved: its products then read the data
        # through the kernel's input itself, whose version counter _gemm's packed copies need
        with functorch_config.patch(recompute_views=settings["gemm"] == "auto"):
            return compile_fx(gm, example_inputs,
                              config_patches={**(list_mode_options(mode) if mode else {}),
                                              **(patches or {})})
    from torch._dynamo import lookup_backend

    return lookup_backend(name)(gm, example_inputs)


def _kernel_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """:func:`_counting_backend` with the large products by :mod:`bilevel._gemm`
    (``settings["gemm"] == "auto"``): the oracle kernels and the whole solver steps of
    :mod:`bilevel.compiled_step`."""
    if settings["gemm"] == "aten" or settings["backend"] != "inductor":
        return _counting_backend(gm, example_inputs)
    return _counting_backend(gm, example_inputs,
                             {"post_grad_custom_post_pass": _products_pass(thin=False)})


class _Kernel:
    """One compiled oracle for one objective family; falls back to eager with a warning."""

    def __init__(self, kind: str, obj: Objective, impl: Callable[..., Any] | None = None,
                 backend: Callable[..., Any] = _kernel_backend):
        self.kind, self.level = kind, obj.level
        problem, xspec, yspec = obj.problem, obj.xspec, obj.yspec
        impl = _IMPL[kind] if impl is None else impl

        def make(batch: Any) -> Objective:
            return Objective(problem, obj.level, batch, xspec, yspec)

        # a fresh code object per kernel, so that torch.compile's per-code cache (and its
        # recompile limit) is per kernel, not shared by every problem of the process
        src = "def kernel(xs, ys, batch, *extra):\n    return impl(make(batch), xs, ys, *extra)\n"
        ns: dict[str, Any] = {"impl": impl, "make": make}
        exec(builtins.compile(src, f"<bilevel {kind} kernel: {problem!r} {obj.level}>", "exec"), ns)
        self._eager = ns["kernel"]
        self._compiled = torch.compile(ns["kernel"], fullgraph=True, dynamic=False,
                                       backend=backend)
        self.fallback: str | None = None
        _STATS["kernels"] += 1

    def __call__(self, batch: Any, xs, ys, *extra):
        if self.fallback is not None:
            return self._eager(xs, ys, batch, *extra)
        try:
            return retry_quietly(self._compiled, tuple(xs), tuple(ys), batch, *extra)
        except Exception as exc:  # capture failed, or the objective is wrong: tell them apart
            out = self._eager(xs, ys, batch, *extra)  # re-raises the user's own errors
            self.fallback = reason = reason_of(exc)
            report_fallback(f"bilevel compiled mode: the {self.level}-level objective could not be "
                            f"captured by torch.compile for the {self.kind} oracle; running it "
                            f"eagerly instead (reason: {reason})", stacklevel=3)
            return out


class _Uncompiled:
    """Kernel stand-in for objectives that are plain callables (no identity to cache on)."""

    def __init__(self, kind: str, fn: O.Fn):
        self.impl, self.fn = _IMPL[kind], fn

    def __call__(self, xs, ys, *extra):
        return self.impl(self.fn, tuple(xs), tuple(ys), *extra)


def oracle_kernel(kind: str, fn: O.Fn) -> Callable[..., Any]:
    """The compiled ``kind`` oracle of ``fn`` as a callable ``(xs, ys[, v])`` (cached)."""
    if not isinstance(fn, Objective) or fn.buffers is not None:  # carried buffers: eager
        return _Uncompiled(kind, fn)
    per_problem = _CACHE.setdefault(fn.problem, {})
    key = (kind, fn.level, fn.xspec, fn.yspec, settings["backend"], settings["mode"],
           settings["gemm"])
    k = per_problem.get(key)
    if k is None:
        check_settings()
        k = per_problem[key] = _Kernel(kind, fn)
    batch = fn.batch
    return lambda xs, ys, *extra: k(batch, xs, ys, *extra)


# --- compiled estimators (``bl.compile(est)``): the inner step and the linearization ---------
#
# Reverse-mode unrolling (RHG) differentiates T steps y_{k+1} = Φ(x, y_k); implicit estimators
# run T steps without a graph and then many products with H at y_T. Per-oracle kernels cannot
# serve the first (a compiled ∇_y g would have to be differentiated twice by AOT autograd), so
# ``bl.compile(est)`` compiles, instead, the *whole step* Φ(x, ·) = update(·, ∇_y g(x, ·)) as one
# kernel (its ∇_y g by ``torch.func.grad``): AOT autograd derives its backward, which keeps the
# step's residuals (softmax probabilities, ...), so the reverse sweep applies (∂_y Φ)^T a and
# (∂_x Φ)^T a with the matrix products of one gradient, chained by the ordinary autograd engine —
# no double backward anywhere. Implicit estimators get ∇_y g at y_T as one kernel whose compiled
# backward is every H-product (and J^T product) of the linear solve.


class _Products:
    """Inductor post-grad pass over the compiled kernels' matrix products.

    * ``thin`` (the estimator kernels, which reuse one data batch for all T steps): C = A B with a
      thin A (M ≤ 64 rows, M ≤ N/4) and B stored transposed (a ``.t()`` view of a row-major
      matrix, e.g. ``W.t() @ X.t()`` on data X) is computed as C = (Bᵀ Aᵀ)ᵀ — the same numbers,
      but MKL's sgemm takes a slow path for the first layout (measured 1.4 vs 0.9 ms for
      10×784 @ 784×2500 on an Intel Xeon);
    * then, with ``settings["gemm"] == "auto"``, the large float32 products become
      ``bilevel::mm`` (:mod:`bilevel._gemm`: the fastest of BLAS and oneDNN for their shapes)."""

    def __init__(self, thin: bool = True) -> None:
        self.thin, self.rewrites = thin, 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.thin:
            self._thin(graph)
        if settings["gemm"] != "aten":
            _gemm.rewrite(graph, pack=settings["gemm"] == "auto")

    def _thin(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for n in list(graph.nodes):
            if n.op != "call_function" or n.target is not aten.mm.default:
                continue
            a, b = n.args
            va, vb = a.meta.get("val"), b.meta.get("val")
            if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
                continue
            (M, K), N = va.shape, vb.shape[1]
            if not (K > 1 and vb.stride() == (1, K) and M <= 64 and 4 * M <= N):
                continue
            with graph.inserting_before(n):
                bt = graph.call_function(aten.permute.default, (b, [1, 0]))
                at = graph.call_function(aten.permute.default, (a, [1, 0]))
                mm = graph.call_function(aten.mm.default, (bt, at))
                out = graph.call_function(aten.permute.default, (mm, [1, 0]))
            bt.meta["val"], at.meta["val"] = vb.permute(1, 0), va.permute(1, 0)
            mm.meta["val"] = torch.mm(bt.meta["val"], at.meta["val"])
            out.meta["val"] = mm.meta["val"].permute(1, 0)
            n.replace_all_uses_with(out)
            graph.erase_node(n)
            self.rewrites += 1

    def uuid(self) -> str:  # FX-graph-cache key of this pass (bump the version when it changes)
        # (the products' timing depends on the thread count: a part of the key)
        return (f"bilevel-products-16-thin{int(self.thin)}-{settings['gemm']}-{_gemm.MIN_MACS}-"
                f"{_gemm.MARGIN}-{_gemm.PACK_RATIO}-{_gemm._PACK is not None}-"
                f"{torch.get_num_threads()}")


_PASSES: dict[bool, Any] = {}


def _products_pass(thin: bool) -> Any:
    """The :class:`_Products` pass as an inductor ``CustomGraphPass`` (inductor is imported only
    when compiling)."""
    if thin not in _PASSES:
        from torch._inductor.custom_graph_pass import CustomGraphPass

        _PASSES[thin] = type("Products", (_Products, CustomGraphPass), {})(thin)
    return _PASSES[thin]


def check_choices(where: str, values: dict[str, Any], allowed: dict[str, tuple[str, ...]]) -> None:
    """Reject a setting of ``values`` (the ``settings`` of module ``where``) outside its allowed
    values, with a :class:`~bilevel.errors.ConfigError` naming it."""
    for name, ok in allowed.items():
        if values[name] not in ok:
            from .errors import ConfigError

            raise ConfigError(f"{where}.settings[{name!r}] must be {' or '.join(map(repr, ok))}, "
                              f"got {values[name]!r}")


def check_settings() -> None:
    """Reject a ``settings["gemm"]`` the kernels cannot honour."""
    check_choices("bilevel.compiled", settings, {"gemm": ("auto", "unpacked", "aten")})


def _estimator_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """:func:`_counting_backend` for the estimator kernels, with their data layout
    (``settings["data_layout"]``): data read transposed come as cached contiguous copies
    (:func:`_hoist_transposed`), and their products go through :class:`_Products`."""
    if not settings["data_layout"]:
        return _kernel_backend(gm, example_inputs)
    new, idx, example_inputs = _hoist_transposed(gm, example_inputs)
    run = _counting_backend(new, example_inputs,
                            {"post_grad_custom_post_pass": _products_pass(thin=True)})
    if not idx:
        return run
    return lambda *args: run(*args, *[_transposed(args[i]) for i in idx])


_TRANSPOSES = ("t", "T", "mT")


def _reads_transposed(u: torch.fx.Node, p: torch.fx.Node) -> bool:
    """Is node u the transpose of the 2-D input p (``p.t()``, ``p.T``, ``p.transpose(0, 1)``, ...)?"""
    if not u.args or u.args[0] is not p:
        return False
    rest = tuple(u.args[1:])
    if u.op == "call_method":
        return ((u.target == "t" and not rest)
                or (u.target == "transpose" and len(rest) == 2 and {a % 2 for a in rest} == {0, 1})
                or (u.target == "permute" and rest in ((1, 0), ((1, 0),), ([1, 0],))))
    if u.op == "call_function":
        return (u.target is torch.t and not rest) or (u.target is getattr and rest[:1] in
                                                      (("T",), ("mT",)))
    return False


def _hoist_transposed(gm: torch.fx.GraphModule, example_inputs: list
                      ) -> tuple[torch.fx.GraphModule, list[int], list]:
    """A copy of the captured graph in which every ``X.t()`` of a 2-D input X that needs no
    gradient (a data matrix) reads a new input, X's contiguous transpose, instead: the kernel's
    products then see both layouts of the data (as XLA's constant folding of Xᵀ gives plain JAX),
    and the derivatives AOT autograd takes of them too. Returns (graph, indices of the inputs
    transposed, example inputs with the transposes appended)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = [(i, p, [u for u in p.users if _reads_transposed(u, p)])
             for i, (p, ex) in enumerate(zip(phs, example_inputs))
             if isinstance(ex, torch.Tensor) and ex.dim() == 2 and not ex.requires_grad]
    found = [f for f in found if f[2]]
    if not found:
        return gm, [], example_inputs
    graph = torch.fx.Graph()
    vmap: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, vmap, return_output_node=True)
    graph.output(out[0] if isinstance(out, tuple) else out)
    for a, b in vmap.items():  # AOT autograd reads each input's dynamo source
        if hasattr(a, "_dynamo_source"):
            b._dynamo_source = a._dynamo_source
    last = vmap[phs[-1]]
    for _, p, uses in found:
        with graph.inserting_after(last):
            last = q = graph.placeholder(f"{p.name}_transposed")
        q._dynamo_source = None
        if "example_value" in p.meta:
            q.meta["example_value"] = p.meta["example_value"].t().contiguous()
        for u in uses:
            vmap[u].replace_all_uses_with(q)
            graph.erase_node(vmap[u])
    new = torch.fx.GraphModule(gm, graph)
    new.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    idx = [i for i, _, _ in found]
    _STATS["transposed_data"] += len(idx)
    return new, idx, list(example_inputs) + [example_inputs[i].t().contiguous() for i in idx]


#: id(tensor) -> (weak reference, version, contiguous transpose), dropped with the tensor
_TCACHE: dict[int, tuple[Any, int, torch.Tensor]] = {}


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """t.t().contiguous(), computed once per data tensor (and again if it is modified in place)."""
    key = id(t)
    hit = _TCACHE.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    tt = t.detach().t().contiguous()
    _TCACHE[key] = (weakref.ref(t, lambda _, key=key: _TCACHE.pop(key, None)), t._version, tt)
    return tt


#: the data layout of the estimator kernels: cached transposes of data read transposed, and the
#: thin-product rule of the _Products pass (inductor); False compiles the objective's products
#: in the layout it writes them (``settings["gemm"]`` still applies)
settings["data_layout"] = True
#: the compiled kernels' large float32 CPU products (:mod:`bilevel._gemm`; inductor): "auto"
#: computes each with the faster of BLAS and oneDNN for its shapes (timed when the kernel compiles;
#: the ways agree to rounding, not bit for bit) and, where its large operand is a kernel input
#: (data), MKL's packed GEMM with that operand packed once (2.4× its memory, kept while it does not
#: change); "unpacked" the same without packing; "aten" with BLAS (``torch.mm``) only
settings["gemm"] = "auto"
#: inner steps per compiled kernel call (Reverse / the lower solve): n > 1 saves n − 1 calls'
#: overhead per n steps, for a graph (and compile time) n times larger
settings["steps_per_kernel"] = 5

_EST: ContextVar[bool] = ContextVar("bilevel_compiled_estimators", default=False)
_WARNED: set[str] = set()


def estimators_compiled() -> bool:
    """True inside ``bl.compile(est)(...)`` (estimators then take their compiled paths), except
    where the oracles must stay pure ``torch.func`` — the ``"func"`` backend, inside
    :func:`bilevel.hypergrad.vmap` or the vmap of a batched ``ZerothOrder`` over its directions:
    a compiled kernel does not run under ``torch.func.vmap`` (nor do its host-side checks)."""
    # (no ContextVar read while tracing)
    return not torch.compiler.is_compiling() and _EST.get() and O._BACKEND.get() != "func"


def _step_impl(inner: Dynamics, n: int) -> Callable[..., Any]:
    """(G, xs, state) -> (n steps Φ(x, ·) of state, ∇_y g at the last step's point, the n sums
    Σ of the new iterates (finiteness check))."""

    def impl(fn: Objective, xs, state):
        state = tuple(state)
        ny = len(state) // inner.slots
        dyn = inner.bind(T.unflatten(xs, fn.xspec), T.unflatten(state[:ny], fn.yspec))
        sums = []
        for _ in range(n):
            grad = O.f_grad_y(fn, xs, dyn.point(state))
            state = tuple(dyn.update(state, grad, 0))
            sums.append(_summary(state[:ny]))
        return state, grad, torch.stack(sums)

    return impl


def _estimator_kernel(kind: str, fn: Objective, inner: Dynamics | None = None, n: int = 1
                      ) -> Callable:
    check_settings()
    per_problem = _CACHE.setdefault(fn.problem, {})
    key = ("estimator", kind, fn.level, fn.xspec, fn.yspec, settings["backend"], settings["mode"],
           settings["data_layout"], settings["gemm"], inner, n)
    k = per_problem.get(key)
    if k is None:
        impl = _step_impl(inner, n) if kind == "step" else _IMPL[kind]
        k = per_problem[key] = _Kernel(kind, fn, impl, backend=_estimator_backend)
    batch = fn.batch
    return lambda xs, ys, *extra: k(batch, xs, ys, *extra)


def why_not(bound: Any, inner: Dynamics | None) -> str | None:
    """Why the compiled estimator path cannot run this problem with these dynamics (None: it can)."""
    from .inner import GD, Momentum, Nesterov

    if O._reducer() is not None:
        return "data-parallel oracles (a process group is active)"
    if bound.carries:
        return "the problem carries buffers through the lower dynamics"
    if not isinstance(bound.G, Objective):
        return "the lower objective is not a bilevel Objective"
    if inner is None:
        return None
    name = type(inner).__name__
    if type(inner).update not in (GD.update, Momentum.update, Nesterov.update):
        return (f"the step of {name} depends on the step index k (one compiled step serves every "
                "k only for GD, Momentum and Nesterov/ISTA with a constant momentum)")
    for hp, (kind, _) in inner._hp.items():
        if kind not in ("const", "x"):
            return f"{name}.{hp} changes with the step index k (a per-step schedule)"
    return None


def fallback(est: Any, reason: str, instead: str = "its eager path with per-oracle kernels") -> None:
    """Say once per (estimator class, reason) that the compiled path is not taken, and why."""
    report_fallback(f"bilevel compiled mode: {type(est).__name__} runs {instead} instead of "
                    f"compiled inner steps (reason: {reason})", once=True, stacklevel=4)


def reason_of(exc: BaseException) -> str:
    """An exception as a one-line fallback reason: its type and the first line of its message;
    for a backend that failed (dynamo's ``BackendCompilerFailed``, whose first line is only
    "backend=... raised:"), the backend's own error."""
    inner = getattr(exc, "inner_exception", None)
    if isinstance(inner, BaseException):
        return f"{type(exc).__name__}: {reason_of(inner)}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def report_fallback(msg: str, *, once: bool = False, stacklevel: int = 3) -> None:
    """Count a fallback in :func:`stats`, keep ``msg`` among its reasons and warn with it
    (:class:`CompileFallbackWarning`; ``once``: only the first time this message is reported).
    ``stacklevel`` is that of the caller's own ``warnings.warn``."""
    _STATS["fallbacks"] += 1
    if once:
        if msg in _WARNED:
            return
        _WARNED.add(msg)
    _FALLBACK_REASONS.append(msg)
    warnings.warn(msg, CompileFallbackWarning, stacklevel=stacklevel + 1)


def unroll(G: Objective, inner: Dynamics, xs: T.Leaves, state: T.Leaves, steps: int, *,
           start: int = 0, level: str = "lower", track: bool = True
           ) -> tuple[T.Leaves, dict[str, Any]]:
    """:func:`bilevel.inner.unroll` of ``inner`` on ∇_y G with each step one compiled kernel
    (differentiable in ``xs`` and ``state`` by the kernel's compiled backward when they require
    grad). Same result, finiteness check, ``info`` and oracle counts (``steps`` gradients)."""
    n = max(1, int(settings["steps_per_kernel"]))
    O.record(G, "grad", times=steps)
    sums, grad = [], None
    for size, count in ((n, steps // n), (1, steps % n)):
        k = _estimator_kernel("step", G, inner, size) if count else None
        for _ in range(count):
            state, grad, s = k(xs, state)
            sums.append(s)
    if track:
        bad = first_nonfinite(torch.cat(sums).unbind() if sums else [])
        if bad is not None:
            raise nonfinite_error(inner, level, start + bad + 1)
    info: dict[str, Any] = {"steps": steps}
    if grad is not None and track:
        info["last_grad_norm"] = float(T.norm(T.detach(grad)))
    return tuple(state), info


def grads(fn: Objective, xs: T.Leaves, ys: T.Leaves) -> tuple[torch.Tensor, T.Leaves, T.Leaves]:
    """:func:`bilevel.oracles.grads` as its compiled oracle kernel (the implicit estimators' upper
    gradients under ``bl.compile(est)``: the upper data's large products go through the same
    products pass as the lower ones', e.g. packed)."""
    with O.backend("compiled"):
        return O.grads(fn, xs, ys)


class Linearization(O.Linearization):
    """:class:`bilevel.oracles.Linearization` with (g, ∇_y g) at (x, y) one compiled kernel: its
    compiled backward (AOT autograd, residuals kept) is every product H v, J^T v, (H v, J^T v)."""

    def __init__(self, fn: Objective, xs: T.Leaves, ys: T.Leaves):
        self.fn = fn
        self._pending = None
        O.record(fn, "grad")
        self._mode = "autograd"
        k = _estimator_kernel("value_grad_y_graph", fn)
        with torch.enable_grad():
            self.xs, self.ys = T.requires_grad(xs), T.requires_grad(ys)
            val, self._gy = k(self.xs, self.ys)
        self.value, self.grad_y = val, T.detach(self._gy)  # (val: detached by the kernel)

    def cross_t(self, u: T.Leaves) -> T.Leaves:
        """J u by ``torch.func.jvp`` (a compiled backward cannot be differentiated again)."""
        O.record(self.fn, "cross")
        return O.f_cross_t(self.fn, T.detach(self.xs), T.detach(self.ys), tuple(u))


class Compiled:
    """``bl.compile(est)``: the estimator ``est`` with its oracles compiled (same call, same
    result to floating-point rounding). Attribute access is forwarded to ``est``."""

    def __init__(self, est: Any):
        if isinstance(est, Compiled):
            est = est.estimator
        if not callable(est):
            raise TypeError(f"bl.compile expects an estimator, got {type(est).__name__}")
        self.estimator = est

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with O.backend("compiled"), _estimators_on():
            return self.estimator(*args, **kwargs)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """``est.apply`` (what solvers call on their bound problem), compiled."""
        with O.backend("compiled"), _estimators_on():
            return self.estimator.apply(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "estimator":
            raise AttributeError(name)
        return getattr(self.estimator, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # e.g. a solver attaching the problem's projection to ``inner`` of its copy
        if name == "estimator":
            object.__setattr__(self, name, value)
        else:
            setattr(self.estimator, name, value)

    def __copy__(self) -> Compiled:
        import copy

        return Compiled(copy.copy(self.estimator))

    def __repr__(self) -> str:
        return f"compile({self.estimator!r})"


@contextlib.contextmanager
def _estimators_on() -> Iterator[None]:
    token = _EST.set(True)
    try:
        yield
    finally:
        _EST.reset(token)


def compile(est: Any) -> Compiled:  # noqa: A001 - the public name is bl.compile
    """Wrap a hypergradient estimator so that every oracle it calls runs compiled
    (``torch.compile`` of the ``torch.func`` oracles; see :mod:`bilevel.compiled`)."""
    return Compiled(est)
