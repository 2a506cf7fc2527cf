"""Matrix products of the compiled CPU kernels: the faster of BLAS and oneDNN, per shape.

torch's CPU ``mm`` calls the BLAS it links (MKL). On some CPUs that BLAS takes a slow path for the
thin float32 products of a linear model: on a 2-core AMD EPYC, 2739 µs for [784, 2500] @
[2500, 10] with both operands row-major, where oneDNN (which torch also bundles) takes 569 µs. On
other shapes BLAS wins (16.7 vs 27.9 µs for [10, 784] @ [784, 64]), and on other CPUs the
balance differs. So when a kernel is compiled, :func:`rewrite` times three ways of computing each
of its float32 CPU products of at least :data:`MIN_MACS` multiply-adds, on tensors of the
product's shapes and strides (the best of 7 interleaved calls each):

* ``aten``: ``torch.mm(a, b)`` — the product stays as it is;
* ``onednn``: oneDNN's linear layer ``a (bᵀ)ᵀ``, b read in place;
* ``onednn_t``: the same for ``(bᵀ aᵀ)ᵀ``, copied to row-major;

and a product for which a oneDNN way is faster by more than 15 % (:data:`MARGIN`) becomes
``bilevel::mm(a, b, way)``. The choice is made once per (shapes, strides, thread count) and
process, and is part of the compiled kernel (inductor's on-disk cache keeps it). The three agree
to float32 rounding, not bit for bit. ``bilevel.compiled.settings["gemm"] = "aten"`` leaves every
product to BLAS.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["MIN_MACS", "choices", "rewrite"]

#: products smaller than this many multiply-adds stay ``aten.mm`` untimed (the op's dispatch,
#: ~10 µs, would cost more than oneDNN could save)
MIN_MACS = 1 << 18

_LINEAR = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
           if torch.backends.mkldnn.is_available() else None)

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _aten(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b)


def _onednn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _LINEAR(a, b.t(), None, "none", [], "")


def _onednn_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _LINEAR(b.t(), a, None, "none", [], "").t().contiguous()


_WAYS: dict[str, Product] = {"aten": _aten, "onednn": _onednn, "onednn_t": _onednn_t}
#: (a.shape, a.stride(), b.shape, b.stride(), threads) -> the way chosen for it in this process
_CHOSEN: dict[tuple, str] = {}


def choices() -> dict[tuple, str]:
    """The way chosen so far for each float32 (a.shape, a.stride(), b.shape, b.stride(), threads)."""
    return dict(_CHOSEN)


#: a oneDNN way replaces ``torch.mm`` only if its best time is below this fraction of BLAS's: on
#: close calls the timing's noise could pick the slower way, so BLAS keeps them
MARGIN = 0.85


def _fastest(a: torch.Tensor, b: torch.Tensor, rounds: int = 7) -> str:
    """The way with the smallest best time over ``rounds`` interleaved calls of each (the best
    time: a neighbour's load only ever adds to a call's time), "aten" unless another way's is below
    :data:`MARGIN` times its."""
    ways = {}
    for name, way in _WAYS.items():  # warm-up (oneDNN creates its primitive on the first call)
        try:
            way(a, b)
        except RuntimeError:  # a layout this way does not take: not a candidate
            if name == "aten":
                raise
            continue
        ways[name] = way
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(rounds):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way(a, b)
            best[name] = min(best[name], time.perf_counter() - t0)
    fastest = min(best, key=best.__getitem__)
    return fastest if best[fastest] < MARGIN * best["aten"] else "aten"


def _mm(a: torch.Tensor, b: torch.Tensor, way: str) -> torch.Tensor:
    return _WAYS[way](a, b)


_LIB = torch.library.Library("bilevel", "DEF")
_LIB.define("mm(Tensor a, Tensor b, str way) -> Tensor")
_LIB.impl("mm", _mm, "CPU")
torch.library.register_fake("bilevel::mm", lambda a, b, way: a.new_empty(a.shape[0], b.shape[1]),
                            lib=_LIB)


def _hint(s: int | torch.SymInt) -> int:
    """A size, or the value a symbolic size had when the graph was traced (0 if unknown)."""
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    return hint if isinstance(hint, int) else 0


def _sample(v: torch.Tensor) -> torch.Tensor | None:
    """A real CPU tensor with the shape and strides of the traced value v (None if symbolic)."""
    shape, stride = [_hint(s) for s in v.shape], [_hint(s) for s in v.stride()]
    if 0 in shape:
        return None
    return torch.empty_strided(shape, stride, dtype=v.dtype).normal_()


def rewrite(graph: torch.fx.Graph) -> int:
    """Put ``bilevel::mm(a, b, way)`` in place of every float32 CPU ``aten.mm`` of at least
    :data:`MIN_MACS` multiply-adds in a post-grad graph for which a oneDNN way is the fastest, and
    ``bilevel::mm(a, b, way) + bias`` in place of such an ``aten.addmm(bias, a, b)`` (a linear
    layer; β = α = 1 only); returns how many products it rewrote."""
    if _LINEAR is None:
        return 0
    aten, done = torch.ops.aten, 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in (aten.mm.default, aten.addmm.default):
            continue
        addmm = n.target is aten.addmm.default
        if addmm and (len(n.args) > 3 or n.kwargs.get("beta", 1) != 1
                      or n.kwargs.get("alpha", 1) != 1):
            continue
        pa, pb = n.args[1:3] if addmm else n.args
        va, vb = pa.meta.get("val"), pb.meta.get("val")
        if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
                and va.dtype == vb.dtype == torch.float32 and va.device.type == "cpu"
                and _hint(va.shape[0]) * _hint(va.shape[1]) * _hint(vb.shape[1]) >= MIN_MACS):
            continue
        a, b = _sample(va), _sample(vb)
        if a is None or b is None:
            continue
        key = (tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), torch.get_num_threads())
        if key not in _CHOSEN:
            _CHOSEN[key] = _fastest(a, b)
        if _CHOSEN[key] == "aten":
            continue
        if addmm:
            with graph.inserting_before(n):
                mm = graph.call_function(torch.ops.bilevel.mm.default, (pa, pb, _CHOSEN[key]))
                out = graph.call_function(aten.add.Tensor, (mm, n.args[0]))
            mm.meta["val"], out.meta["val"] = torch.mm(va, vb), n.meta["val"]
            n.replace_all_uses_with(out)
            graph.erase_node(n)
        else:
            n.target, n.args = torch.ops.bilevel.mm.default, (*n.args, _CHOSEN[key])
        done += 1
    return done
