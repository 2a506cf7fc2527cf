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

A product whose large operand is an input of the kernel (a data matrix, read by every step of an
unrolled loop) and at least :data:`PACK_RATIO` times the size of the other has two more candidates,
``packed_b`` / ``packed_a``: MKL's packed GEMM (``cblas_sgemm_pack``, through torch's
``mkl::_mkl_linear``) with that operand packed once and kept (:func:`packed`) while its storage
lives and its version counter does not move (an in-place change repacks it; a change torch does not
see, e.g. through a numpy view of the storage, is not seen here either — the same contract as
autograd's saved tensors). Measured on an Intel Xeon, one thread: 355 µs for [10, 784] @
[784, 2500] against 460–500 µs for the best unpacked way. If the operand turns out to change from
call to call (a packing per call costs ~10 products), the product stops being packed after
:data:`PACK_MISSES` misses in a row and takes the best unpacked way (written after the ``/`` of its
way).
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MIN_MACS", "PACK_BYTES", "PACK_MISSES", "PACK_RATIO", "choices", "packed", "rewrite"]

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

_PACK = (getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None)
         if torch.backends.mkl.is_available() else None)
#: the large operand must have at least this many times the other's entries to be packed (a thin
#: product: packing pays when one small operand meets the same large one many times)
PACK_RATIO = 16
#: packed operands kept at most (bytes, all together; the least recently used go first). MKL's
#: packed form of a [2500, 784] float32 matrix takes 2.4× its 7.8 MB
PACK_BYTES = 1 << 29
#: a product that missed its packed operand's cache this many times in a row (a new operand at
#: every call) stops packing and takes its unpacked way
PACK_MISSES = 4
#: (storage, offset, shape, stride, rows of the other operand) -> (weak reference to the storage,
#: version, packed operand); least recently used first
_PACKED: OrderedDict[tuple, tuple[Any, int, torch.Tensor]] = OrderedDict()
#: product (its site in a kernel) -> misses in a row; sites in _UNPACKED pack no more
_MISSES: dict[str, int] = {}
_UNPACKED: set[str] = set()


def packed(w: torch.Tensor, m: int, site: str = "", root: torch.Tensor | None = None
           ) -> torch.Tensor | None:
    """MKL's packed form of w ([N, K], the weight of ``_mkl_linear``) for products with m-row
    inputs, from the cache while w's storage lives and its version counter stays; None where it
    is not worth it (the product at ``site`` met a new w at each of its last :data:`PACK_MISSES`
    calls) or cannot be tracked (an inference tensor has no version counter).

    ``root``: the tensor w is a view of, whose version counter counts w's changes. Inside a
    compiled kernel it must be given: inductor's views of the kernel's inputs
    (``reinterpret_tensor``) have version counters of their own, which never move."""
    if site in _UNPACKED:
        return None
    try:
        version = (w if root is None else root)._version
    except RuntimeError:  # an inference tensor: no way to see it change
        _UNPACKED.add(site)
        return None
    storage = w.untyped_storage()
    key = (storage._cdata, w.storage_offset(), tuple(w.shape), w.stride(), m)
    hit = _PACKED.get(key)
    # the entry's weak reference keeps the storage's record allocated, so no other storage can
    # have its address: a hit is w's own storage (alive: w holds it)
    if hit is not None and hit[1] == version:
        _PACKED.move_to_end(key)
        _MISSES[site] = 0
        return hit[2]
    _MISSES[site] = misses = _MISSES.get(site, 0) + 1
    if misses >= PACK_MISSES:
        _UNPACKED.add(site)
        _PACKED.pop(key, None)
        return None
    from torch.multiprocessing.reductions import StorageWeakRef

    p = _PACK(w.detach(), m)
    size = p.numel() * p.element_size()
    for k in [k for k, v in _PACKED.items() if v[0].expired()] + [key]:
        _PACKED.pop(k, None)
    while _PACKED and size + sum(v[2].numel() * v[2].element_size()
                                 for v in _PACKED.values()) > PACK_BYTES:
        _PACKED.popitem(last=False)
    if size <= PACK_BYTES:
        _PACKED[key] = (StorageWeakRef(storage), version, p)
    return p


def _packed_b(a: torch.Tensor, b: torch.Tensor, site: str = "", root: torch.Tensor | None = None
              ) -> torch.Tensor | None:
    """a b with b packed: ``_mkl_linear(a, pack(bᵀ))`` (= a (bᵀ)ᵀ)."""
    w = b.t()
    p = packed(w, a.shape[0], site, root)
    return None if p is None else torch.ops.mkl._mkl_linear(a, p, w, None, a.shape[0])


def _packed_a(a: torch.Tensor, b: torch.Tensor, site: str = "", root: torch.Tensor | None = None
              ) -> torch.Tensor | None:
    """a b with a packed: ``_mkl_linear(bᵀ, pack(a))ᵀ`` (= (bᵀ aᵀ)ᵀ), column-major (no copy: the
    op's output layout for this way, see :func:`_layout`)."""
    p = packed(a, b.shape[1], site, root)
    return None if p is None else torch.ops.mkl._mkl_linear(b.t(), p, a, None, b.shape[1]).t()


#: ways that keep one operand packed; None from them means "not packed": take the fallback way
_PACKED_WAYS: dict[str, Callable[..., torch.Tensor | None]] = {
    "packed_a": _packed_a, "packed_b": _packed_b}
#: (a.shape, a.stride(), b.shape, b.stride(), threads) -> the way chosen for it in this process
_CHOSEN: dict[tuple, str] = {}


def choices() -> dict[tuple, str]:
    """The way chosen so far for each float32 (a.shape, a.stride(), b.shape, b.stride(), threads)."""
    return dict(_CHOSEN)


#: a oneDNN way replaces ``torch.mm`` only if its best time is below this fraction of BLAS's: on
#: close calls the timing's noise could pick the slower way, so BLAS keeps them
MARGIN = 0.85


def _fastest(a: torch.Tensor, b: torch.Tensor, rounds: int = 7, pack: str | None = None) -> str:
    """The way with the smallest best time over ``rounds`` interleaved calls of each (the best
    time: a neighbour's load only ever adds to a call's time), "aten" unless another way's is below
    :data:`MARGIN` times its. ``pack`` ("packed_a" / "packed_b"): that packed way is a candidate
    too (its packing in the warm-up call, not timed: it is paid once per data matrix); if it
    wins, the answer is "packed_x/fallback" with the unpacked way that would have been chosen."""
    ways: dict[str, Product] = {}
    candidates = dict(_WAYS)
    if pack:
        candidates[pack] = lambda a, b: _PACKED_WAYS[pack](a, b, "timing")
        _UNPACKED.discard("timing")
        _MISSES.pop("timing", None)
    for name, way in candidates.items():  # warm-up (oneDNN creates its primitive on the first call)
        try:
            out = way(a, b)
        except RuntimeError:  # a layout this way does not take: not a candidate
            if name == "aten":
                raise
            continue
        if out is not None or name != pack:  # (a packed way's None: it declined to pack)
            ways[name] = way
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(rounds):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way(a, b)
            best[name] = min(best[name], time.perf_counter() - t0)

    def pick(names: list[str]) -> str:
        fastest = min(names, key=best.__getitem__)
        return fastest if best[fastest] < MARGIN * best["aten"] else "aten"

    unpacked = pick([n for n in best if n in _WAYS])
    # no margin for the packed way: in a kernel its gain is larger than in this timing of one
    # product alone (compiled Reverse, T = 100, 7.8 MB of data: 199 ms packed, 223 ms by this
    # timing's choice with the margin, 235 unpacked)
    if pack in best and best[pack] < best[unpacked]:
        return f"{pack}/{unpacked}"
    return unpacked


def _layout(a: torch.Tensor, b: torch.Tensor, way: str, root: torch.Tensor | None = None
            ) -> torch.Tensor:
    """An empty output of ``bilevel::mm(a, b, way)``: row-major, column-major for packed_a (the
    op's fake implementation, hence ``root``, unused, in its signature)."""
    if way.startswith("packed_a/"):
        return a.new_empty(b.shape[1], a.shape[0]).t()
    return a.new_empty(a.shape[0], b.shape[1])


def _mm(a: torch.Tensor, b: torch.Tensor, way: str, root: torch.Tensor | None = None
        ) -> torch.Tensor:
    """``a @ b`` by ``way``: a name of :data:`_WAYS`, or "packed_x/fallback/site" (``root``: the
    kernel input the packed operand is a view of, see :func:`packed`)."""
    name, _, fallback = way.partition("/")
    if not fallback:
        return _WAYS[name](a, b)
    fallback, _, site = fallback.partition("/")
    out = _PACKED_WAYS[name](a, b, site, root)
    if out is not None:
        return out
    out = _WAYS[fallback](a, b)  # in the layout the compiled kernel expects of this way
    return _layout(a, b, way).copy_(out) if name == "packed_a" else out


_LIB = torch.library.Library("bilevel", "DEF")
_LIB.define("mm(Tensor a, Tensor b, str way, Tensor? root=None) -> Tensor")
_LIB.impl("mm", _mm, "CPU")
torch.library.register_fake("bilevel::mm", _layout, lib=_LIB)


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


_VIEWS = {torch.ops.aten.permute.default, torch.ops.aten.t.default,
          torch.ops.aten.transpose.int, torch.ops.aten.alias.default, torch.ops.aten.view.default}


def _input_of(n: torch.fx.Node) -> torch.fx.Node | None:
    """The kernel input n is (or is a view of: a transpose, a reshape without copy), or None.

    Only inputs proper count (AOT autograd's ``primals_i`` / ``argi_j``; in a backward graph a
    saved input keeps its ``primals_i`` name): a value the forward computed and saved for the
    backward (a placeholder of the backward graph with its node's name) may be a view inductor
    made, whose version counter never moves, so its changes could not be seen."""
    while n.op == "call_function" and n.target in _VIEWS:
        n = n.args[0]
    if n.op == "placeholder" and (n.name.startswith("primals_") or re.fullmatch(r"arg\d+_\d+",
                                                                                   n.name)):
        return n
    return None


def _pack_candidate(pa: torch.fx.Node, pb: torch.fx.Node, va: torch.Tensor, vb: torch.Tensor
                    ) -> str | None:
    """"packed_a" / "packed_b" if that operand is a graph input (or a view of one) with at least
    :data:`PACK_RATIO` times the other's entries, else None (or if torch has no MKL)."""
    if _PACK is None:
        return None
    na, nb = _hint(va.shape[0]) * _hint(va.shape[1]), _hint(vb.shape[0]) * _hint(vb.shape[1])
    if nb >= PACK_RATIO * na and _input_of(pb) is not None:
        return "packed_b"
    if na >= PACK_RATIO * nb and _input_of(pa) is not None:
        return "packed_a"
    return None


def rewrite(graph: torch.fx.Graph, pack: bool = True) -> int:
    """Put ``bilevel::mm(a, b, way)`` in place of every float32 CPU ``aten.mm`` of at least
    :data:`MIN_MACS` multiply-adds in a post-grad graph for which a oneDNN way (or, with
    ``pack``, a packed way: :func:`_pack_candidate`) is the fastest, and ``bilevel::mm(a, b, way) +
    bias`` in place of such an ``aten.addmm(bias, a, b)`` (a linear layer; β = α = 1 only);
    returns how many products it rewrote."""
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
        packing = _pack_candidate(pa, pb, va, vb) if pack else None
        key = (tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), torch.get_num_threads(),
               packing)
        if key not in _CHOSEN:
            _CHOSEN[key] = _fastest(a, b, pack=packing)
        way = _CHOSEN[key]
        if way == "aten":
            continue
        extra: tuple = ()
        if "/" in way:  # a packed way: each packed product counts its own misses, and is given
            way = f"{way}/{uuid.uuid4().hex[:12]}"  # the input its packed operand views
            extra = (_input_of(pa if way.startswith("packed_a") else pb),)
        if addmm:
            with graph.inserting_before(n):
                mm = graph.call_function(torch.ops.bilevel.mm.default, (pa, pb, way, *extra))
                out = graph.call_function(aten.add.Tensor, (mm, n.args[0]))
            mm.meta["val"], out.meta["val"] = _layout(va, vb, way), n.meta["val"]
            n.replace_all_uses_with(out)
            graph.erase_node(n)
        else:
            n.target, n.args = torch.ops.bilevel.mm.default, (*n.args, way, *extra)
            n.meta["val"] = _layout(va, vb, way)
        done += 1
    return done
