"""``bilevel._gemm``: the compiled kernels' large float32 products by the fastest of BLAS and
oneDNN. Every way equals ``torch.mm`` (float64 reference, float32 rounding), for every layout of
the operands; the pass rewrites exactly the products it should, with the way the timing chose, and
the rewritten graph computes the same numbers, eagerly and compiled by inductor."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
import torch

from bilevel import _gemm as G
from bilevel import compiled as C
from bilevel.errors import ConfigError

needs_onednn = pytest.mark.skipif(G._LINEAR is None, reason="torch built without oneDNN")


@pytest.fixture
def no_inductor_cache():
    """Inductor's on-disk cache off, so that the products pass runs (torch's own config patch: a
    monkeypatched attribute of the config module is not restored as the module expects)."""
    import torch._inductor.config as ic

    with ic.patch(fx_graph_cache=False):
        yield


def _operand(rows: int, cols: int, transposed: bool, gen: torch.Generator) -> torch.Tensor:
    if transposed:
        return torch.randn(cols, rows, generator=gen).t()
    return torch.randn(rows, cols, generator=gen)


@needs_onednn
@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
def test_every_way_is_the_product(ta, tb):
    gen = torch.Generator().manual_seed(0)
    a, b = _operand(37, 300, ta, gen), _operand(300, 11, tb, gen)
    want = a.double() @ b.double()
    for name, way in G._WAYS.items():
        got = way(a, b)
        assert got.shape == (37, 11) and got.is_contiguous(), name
        # float32 rounding of a 300-term sum: |error| ≤ ~K·eps·Σ|a||b|
        bound = 300 * torch.finfo(torch.float32).eps * (a.abs().double() @ b.abs().double())
        assert ((got.double() - want).abs() <= bound).all(), name
        assert torch.equal(torch.ops.bilevel.mm(a, b, name), got), name


def test_fastest_is_the_best_time_of_interleaved_calls(monkeypatch):
    """A fake clock: each call of a way advances it by that way's cost; onednn_t's first timed
    call is slowed down (a neighbour's load), and it still wins on its best time."""
    now, calls = [0.0], []
    cost = {"aten": [3.0] * 4, "onednn": [2.0] * 4, "onednn_t": [1.0, 50.0, 1.0, 1.0]}
    monkeypatch.setattr(G.time, "perf_counter", lambda: now[0])

    def way(name):
        def run(a, b):
            now[0] += cost[name][sum(c == name for c in calls)]
            calls.append(name)
        return run

    monkeypatch.setattr(G, "_WAYS", {n: way(n) for n in cost})
    assert G._fastest(torch.ones(2, 2), torch.ones(2, 2), rounds=3) == "onednn_t"
    assert calls == list(cost) * 4  # one warm-up round, then 3 interleaved rounds
    # a close call (oneDNN 10 % faster, within the margin) keeps BLAS
    calls.clear()
    cost.update(aten=[1.0] * 4, onednn=[0.9] * 4, onednn_t=[2.0] * 4)
    assert G._fastest(torch.ones(2, 2), torch.ones(2, 2), rounds=3) == "aten"


def test_a_way_that_rejects_the_layout_is_not_a_candidate(monkeypatch):
    def rejects(a, b):
        raise RuntimeError("unsupported layout")

    monkeypatch.setattr(G, "_WAYS", {**G._WAYS, "onednn": rejects, "onednn_t": rejects})
    assert G._fastest(torch.ones(3, 4), torch.ones(4, 2), rounds=2) == "aten"


def _graph(f, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(f, tracing_mode="fake")(*args)


def _products(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (torch.ops.aten.mm.default, torch.ops.bilevel.mm.default)]


@needs_onednn
@pytest.mark.parametrize("chosen", ["onednn", "onednn_t", "aten"])
def test_pass_rewrites_large_float32_products_with_the_chosen_way(monkeypatch, chosen):
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b, pack=None: chosen)

    def f(X, W, v, Xd, Wd):
        return X @ W, v @ W.t(), Xd @ Wd  # large float32, small float32, large float64

    gen = torch.Generator().manual_seed(1)
    X, W = torch.randn(700, 400, generator=gen), torch.randn(400, 10, generator=gen)
    v = torch.randn(3, 10, generator=gen)
    Xd, Wd = X.double(), W.double()
    assert 700 * 400 * 10 >= G.MIN_MACS > 3 * 10 * 400
    gm = _graph(f, X, W, v, Xd, Wd)
    assert G.rewrite(gm.graph) == (chosen != "aten")
    gm.recompile()
    targets = [(n.target, n.args[2:]) for n in _products(gm)]
    big = (torch.ops.bilevel.mm.default, (chosen,)) if chosen != "aten" \
        else (torch.ops.aten.mm.default, ())
    assert targets == [big, (torch.ops.aten.mm.default, ()), (torch.ops.aten.mm.default, ())]
    assert list(G.choices().values()) == [chosen]
    for got, want in zip(gm(X, W, v, Xd, Wd), f(X, W, v, Xd, Wd)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_pass_rewrites_a_linear_layer_as_product_plus_bias(monkeypatch):
    """``F.linear`` (aten.addmm(bias, x, Wᵀ)): the product by the chosen way, then + bias; an
    addmm with β ≠ 1 is left alone."""
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b, pack=None: "onednn")

    def f(x, W, bias, c):
        return torch.nn.functional.linear(x, W, bias), torch.addmm(c, x, W.t(), beta=0.5)

    gen = torch.Generator().manual_seed(2)
    x, W = torch.randn(700, 400, generator=gen), torch.randn(10, 400, generator=gen)
    bias, c = torch.randn(10, generator=gen), torch.randn(700, 10, generator=gen)
    gm = _graph(f, x, W, bias, c)
    assert G.rewrite(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.bilevel.mm.default in targets and targets.count(torch.ops.aten.addmm.default) == 1
    for got, want in zip(gm(x, W, bias, c), f(x, W, bias, c)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="inductor's C++ code generation needs a compiler")
@pytest.mark.usefixtures("no_inductor_cache")
def test_inductor_runs_the_rewritten_product(monkeypatch):
    """Through inductor (the kernels' Products pass, on-disk cache off so that the pass runs): a
    product and a linear layer by a forced oneDNN way, equal to eager to float32 rounding."""
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b, pack=None: "onednn")
    monkeypatch.setitem(C.settings, "backend", "inductor")
    monkeypatch.setitem(C.settings, "gemm", "auto")

    def f(X, W, V, bias):
        return torch.tanh(X @ W).sum(0) + torch.nn.functional.linear(X, V, bias).sum(0)

    X, W, V, bias = torch.randn(700, 400), torch.randn(400, 10), torch.randn(10, 400), torch.randn(10)
    got = torch.compile(f, backend=C._kernel_backend, fullgraph=True)(X, W, V, bias)
    torch.testing.assert_close(got, f(X, W, V, bias), rtol=1e-5, atol=1e-3)
    assert list(G.choices().values()) == ["onednn", "onednn"]  # X @ W and X @ Vᵀ


@pytest.mark.usefixtures("aot_eager")
def test_unknown_gemm_setting_is_rejected(monkeypatch, tiny):
    """By ``bl.compile(est)`` and by ``bl.solve(..., compile="step" / "oracles")``."""
    import bilevel as bl
    from bilevel.solvers import SOBA  # noqa: I001
    from tests.reference_problems import REFERENCE_PROBLEMS

    monkeypatch.setitem(C.settings, "gemm", "mkl")
    ref = REFERENCE_PROBLEMS["ridge"]()
    with pytest.raises(ConfigError, match="'auto' or 'unpacked' or 'aten', got 'mkl'"):
        bl.compile(bl.hypergrad.Reverse(bl.inner.GD(ref.lr, 3)))(ref.problem, ref.x, ref.y0)
    for mode in ("step", "oracles"):
        with pytest.raises(ConfigError, match="'auto' or 'unpacked' or 'aten', got 'mkl'"):
            bl.solve(**tiny.solve_kwargs(), solver=SOBA(), steps=1, compile=mode)


# --- packed products: MKL's packed GEMM with the large operand (a kernel input) packed once ------

needs_pack = pytest.mark.skipif(G._PACK is None, reason="torch built without MKL")


@pytest.fixture
def fresh_packs(monkeypatch):
    monkeypatch.setattr(G, "_PACKED", G.OrderedDict())
    monkeypatch.setattr(G, "_MISSES", {})
    monkeypatch.setattr(G, "_UNPACKED", set())


def _bound(a, b):
    return a.shape[1] * torch.finfo(torch.float32).eps * (a.abs().double() @ b.abs().double())


@needs_pack
@pytest.mark.usefixtures("fresh_packs")
@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
def test_packed_ways_are_the_product_in_their_layout(ta, tb):
    """packed_b (b packed) and packed_a (a packed) equal a b to float32 rounding for every layout
    of the operands: as eager helpers (packed_a column-major), and as the kernels' op
    ``packed_linear(x, w)`` = x wᵀ, row-major, on the operands the pass gives it (packed_b: x = a,
    w = bᵀ; packed_a: x = bᵀ, w = a, the product's transpose), on the packed path and on the
    fallback path alike."""
    gen = torch.Generator().manual_seed(3)
    thin, big = _operand(10, 300, ta, gen), _operand(300, 400, tb, gen)
    for name, a, b in (("packed_b", thin, big), ("packed_a", big.t(), thin.t())):
        want = a.double() @ b.double()
        got = G._PACKED_WAYS[name](a, b, "eager")
        assert got.stride() == ((1, got.shape[0]) if name == "packed_a" else (got.shape[1], 1))
        assert ((got.double() - want).abs() <= _bound(a, b)).all(), name
        x, w = (a.contiguous(), b.t()) if name == "packed_b" else (b.t().contiguous(), a)
        for site, fallback in (("s", "aten"), ("never", "onednn")):
            if site == "never":
                G._UNPACKED.add(site)
            got = torch.ops.bilevel.packed_linear(x, w, f"{name}/{fallback}/{site}")
            assert got.is_contiguous(), (name, site)
            got = got if name == "packed_b" else got.t()
            assert got.shape == want.shape, (name, site)
            assert ((got.double() - want).abs() <= _bound(a, b)).all(), (name, site)


@needs_pack
@pytest.mark.usefixtures("fresh_packs")
def test_packed_operand_is_kept_until_it_changes():
    """The packed form is reused while the operand's storage and version stay; an in-place change
    (version counter), another tensor of the same shape, or another offset into the same storage
    each get their own packing — the product is always the current one."""
    gen = torch.Generator().manual_seed(4)
    X, a = torch.randn(300, 400, generator=gen), torch.randn(10, 400, generator=gen)
    p1 = G.packed(X, 10, "s")
    assert G.packed(X, 10, "s") is p1 and G.packed(X.t().t(), 10, "s") is p1  # a view: the same
    torch.testing.assert_close(G._packed_b(a, X.t(), "s"), a @ X.t(), rtol=0, atol=1e-3)
    X.mul_(2.0)  # in place: version bump
    p2 = G.packed(X, 10, "s")
    assert p2 is not p1
    torch.testing.assert_close(G._packed_b(a, X.t(), "s"), a @ X.t(), rtol=0, atol=2e-3)
    Y = X.clone()
    assert G.packed(Y, 10, "s") is not p2
    big = torch.randn(600, 400, generator=gen)
    top, bottom = big[:300], big[300:]
    pt, pb = G.packed(top, 10, "s"), G.packed(bottom, 10, "s")
    assert pt is not pb
    torch.testing.assert_close(G._packed_b(a, bottom.t(), "s"), a @ bottom.t(), rtol=0, atol=1e-3)
    with torch.inference_mode():
        Z = torch.randn(300, 400)
    assert G.packed(Z, 10, "inference") is None and "inference" in G._UNPACKED


@needs_pack
@pytest.mark.usefixtures("fresh_packs")
def test_a_product_that_meets_a_new_operand_every_call_stops_packing():
    """PACK_MISSES misses in a row (no hit between them) and that product packs no more; a hit
    resets the count; other products are not affected."""
    a = torch.randn(10, 400)
    Xs = [torch.randn(300, 400) for _ in range(G.PACK_MISSES + 2)]
    for X in Xs[:2]:
        assert G.packed(X, 10, "new-each-call") is not None
    assert G.packed(Xs[1], 10, "new-each-call") is not None  # a hit: the count starts again
    for X in Xs[2:G.PACK_MISSES + 1]:  # PACK_MISSES - 1 misses in a row: still packing
        assert G.packed(X, 10, "new-each-call") is not None
    assert G.packed(Xs[-1], 10, "new-each-call") is None  # the PACK_MISSES-th miss in a row
    assert "new-each-call" in G._UNPACKED and "other" not in G._UNPACKED
    got = torch.ops.bilevel.packed_linear(a, Xs[0], "packed_b/aten/new-each-call")  # fallback
    torch.testing.assert_close(got, a @ Xs[0].t(), rtol=0, atol=1e-3)


@needs_pack
@pytest.mark.usefixtures("fresh_packs")
def test_packed_cache_is_bounded(monkeypatch):
    """At most PACK_BYTES of packed operands; the least recently used go first, and entries of
    freed tensors are dropped."""
    one = G._PACK(torch.randn(300, 400), 10)
    monkeypatch.setattr(G, "PACK_BYTES", 2 * one.numel() * one.element_size())
    Xs = [torch.randn(300, 400) for _ in range(3)]
    for X in Xs:
        G.packed(X, 10, "s")
    assert len(G._PACKED) == 2
    del Xs[1:]
    G.packed(torch.randn(300, 400), 10, "t")
    assert len(G._PACKED) == 2  # both freed entries dropped, then X0's and the new one


def test_packed_way_wins_on_its_best_time(monkeypatch):
    """The packed way takes no margin: it wins whenever its best time is below the best unpacked
    way's, and the answer names that unpacked way as its fallback."""
    now = [0.0]
    cost = {"aten": 3.0, "onednn": 2.0, "onednn_t": 2.5, "packed_b": 1.9}
    monkeypatch.setattr(G.time, "perf_counter", lambda: now[0])

    def way(name):
        def run(a, b, *site):
            now[0] += cost[name]
            return a
        return run

    monkeypatch.setattr(G, "_WAYS", {n: way(n) for n in ("aten", "onednn", "onednn_t")})
    monkeypatch.setattr(G, "_PACKED_WAYS", {"packed_b": way("packed_b")})
    assert G._fastest(torch.ones(2, 2), torch.ones(2, 2), rounds=2, pack="packed_b") \
        == "packed_b/onednn"
    cost["packed_b"] = 2.1
    assert G._fastest(torch.ones(2, 2), torch.ones(2, 2), rounds=2, pack="packed_b") == "onednn"


@needs_pack
def test_pack_candidates_are_large_kernel_inputs():
    """A product's large operand is packed only if it is a kernel input (or a view of one) with at
    least PACK_RATIO times the other's entries — never a value computed in the kernel, nor a
    backward graph's saved value (a placeholder named after its forward node, which may be a view
    inductor made, with a version counter that never moves). make_fx names the placeholders
    after the arguments: ``arg0`` → ``arg0_1``, as AOT autograd's inputs; ``permute`` →
    ``permute_1``, as a saved view."""

    def f(arg0, arg1, arg2, permute):
        X, W, Y = arg0, arg1, arg2
        return W.t() @ X.t(), X.t() @ (X @ W), (Y * 2) @ W, Y @ W, permute.t() @ W

    X, W, Y = torch.randn(700, 400), torch.randn(400, 10), torch.randn(700, 400)
    gm = _graph(f, X, W, Y, Y.t())
    got = []
    for n in _products(gm):
        pa, pb = n.args[:2]
        got.append(G._pack_candidate(pa, pb, pa.meta["val"], pb.meta["val"]))
    # Wᵀ Xᵀ: b = Xᵀ (input view); Xᵀ (X W): a = Xᵀ; X @ W inside it: a = X; (2Y) W: computed;
    # Y W: input; a saved view: no
    assert sorted(map(str, got)) == sorted(map(str, ["packed_b", "packed_a", "packed_a", None,
                                                     "packed_a", None]))


@needs_pack
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="inductor's C++ code generation needs a compiler")
@pytest.mark.usefixtures("fresh_packs", "no_inductor_cache")
def test_inductor_runs_packed_products(monkeypatch):
    """Through inductor, with the packed ways forced: equal to eager; after an in-place change of
    the data and with other data of the same shape (no recompile: a guard does not see values),
    still equal to eager on the new values."""
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b, pack=None: f"{pack}/aten" if pack else "aten")
    monkeypatch.setitem(C.settings, "backend", "inductor")
    monkeypatch.setitem(C.settings, "gemm", "auto")

    def f(X, W):
        P = torch.softmax(W.t() @ X.t(), 0)  # [10, 700]: Xᵀ packed (packed_b)
        return X.t() @ P.t()                 # [400, 10]: Xᵀ packed (packed_a)

    gen = torch.Generator().manual_seed(5)
    X, W = torch.randn(700, 400, generator=gen), torch.randn(400, 10, generator=gen)
    run = torch.compile(f, backend=C._kernel_backend, fullgraph=True)
    torch.testing.assert_close(run(X, W), f(X, W), rtol=1e-5, atol=1e-4)
    assert sorted(v.split("/")[0] for v in G.choices().values()) == ["packed_a", "packed_b"]
    assert len(G._PACKED) == 2
    X.mul_(-0.5)
    torch.testing.assert_close(run(X, W), f(X, W), rtol=1e-5, atol=1e-4)
    X2 = torch.randn(700, 400, generator=gen)
    torch.testing.assert_close(run(X2, W), f(X2, W), rtol=1e-5, atol=1e-4)


@needs_pack
def test_unpacked_setting_never_packs(monkeypatch):
    """``settings["gemm"] = "unpacked"``: the pass is asked for no packed way (and "auto" is)."""
    seen = []
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b, pack=None: seen.append(pack) or "aten")

    def f(arg0, arg1):
        return arg1.t() @ arg0.t()

    for gemm, want in (("unpacked", None), ("auto", "packed_b")):
        monkeypatch.setitem(C.settings, "gemm", gemm)
        seen.clear()
        gm = _graph(f, torch.randn(700, 400), torch.randn(400, 10))
        C._Products(thin=False)(gm.graph)
        assert seen == [want], gemm


@needs_pack
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="inductor's C++ code generation needs a compiler")
@pytest.mark.usefixtures("fresh_packs", "no_inductor_cache")
def test_inductor_backward_of_packed_products_follows_the_data(monkeypatch):
    """A training graph (W requires grad) on data X read both ways: the forward's and the
    backward's packed products equal eager, also after X changes in place between calls — the
    backward reads X through the kernel input (views recomputed, not saved), never a stale copy."""
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b, pack=None: f"{pack}/aten" if pack else "aten")
    monkeypatch.setitem(C.settings, "backend", "inductor")
    monkeypatch.setitem(C.settings, "gemm", "auto")

    def f(X, W):
        return (torch.softmax(W.t() @ X.t(), 0) ** 2).sum() + torch.tanh(X @ W).sum()

    gen = torch.Generator().manual_seed(6)
    X = torch.randn(700, 400, generator=gen)
    W = torch.randn(400, 10, generator=gen, requires_grad=True)
    run = torch.compile(f, backend=C._kernel_backend, fullgraph=True)
    for change in (None, lambda: X.mul_(-0.7), lambda: X.add_(0.3)):
        if change is not None:
            change()
        (want,) = torch.autograd.grad(f(X, W), W)
        (got,) = torch.autograd.grad(run(X, W), W)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert any(v.startswith("packed") for v in G.choices().values())


@needs_pack
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="inductor's C++ code generation needs a compiler")
@pytest.mark.usefixtures("fresh_packs", "no_inductor_cache")
def test_inductor_gives_packed_products_their_small_operand_in_the_layout_mkl_reads(monkeypatch):
    """The small operand of a packed product reaches ``_mkl_linear`` row-major (read without a
    copy) although the graph computes it transposed (packed_b: a = Wᵀ, a view of W; packed_a:
    b = tanh(P)ᵀ); the products equal eager."""
    seen: list[tuple[str, bool]] = []
    linear = G._packed_linear

    def spy(x, w, site="", root=None):
        seen.append((site, x.is_contiguous()))
        return linear(x, w, site, root)

    monkeypatch.setattr(G, "_packed_linear", spy)
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b, pack=None: f"{pack}/aten" if pack else "aten")
    monkeypatch.setitem(C.settings, "backend", "inductor")
    monkeypatch.setitem(C.settings, "gemm", "auto")

    def f(X, W):
        P = torch.softmax(W.t() @ X.t(), 0)   # packed_b, a = Wᵀ: column-major as traced
        return X.t() @ torch.tanh(P).t()      # packed_a, b = tanh(P)ᵀ

    gen = torch.Generator().manual_seed(8)
    X, W = torch.randn(700, 400, generator=gen), torch.randn(400, 10, generator=gen)
    run = torch.compile(f, backend=C._kernel_backend, fullgraph=True)
    torch.testing.assert_close(run(X, W), f(X, W), rtol=1e-5, atol=1e-4)
    assert len(seen) == 2 and all(contiguous for _, contiguous in seen)
    assert sorted(v.split("/")[0] for v in G.choices().values()) == ["packed_a", "packed_b"]


@needs_pack
def test_pass_writes_packed_products_with_their_operands_in_place(monkeypatch):
    """At the graph level: a packed product becomes ``packed_linear(x, w)`` = x wᵀ with w the
    big operand (packed_b: w = bᵀ; packed_a: w = a, the result read transposed) and x row-major
    (a ``clone`` where the traced operand is not: Wᵀ here, and Z read as Zᵀ); the op's recorded
    input values carry those layouts (what inductor's ``needs_exact_strides`` reads), its root is
    the kernel input, and the rewritten graph computes the same numbers."""
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b, pack=None: f"{pack}/aten" if pack else "aten")

    def f(arg0, arg1, arg2):
        return arg1.t() @ arg0.t(), arg0.t() @ arg2   # packed_b (a = Wᵀ), packed_a (b = Z)

    X, W, Z = torch.randn(700, 400), torch.randn(400, 10), torch.randn(700, 10)
    gm = _graph(f, X, W, Z)
    want = gm(X, W, Z)
    assert G.rewrite(gm.graph) == 2
    gm.recompile()
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.bilevel.packed_linear.default]
    assert sorted(n.args[2].split("/")[0] for n in ops) == ["packed_a", "packed_b"]
    for n in ops:
        x, w, _, root = n.meta["eager_input_vals"][0]
        assert x.is_contiguous() and x.stride() == n.args[0].meta["val"].stride()
        assert w.stride() == n.args[1].meta["val"].stride() and n.args[3].name == "arg0_1"
    assert sum(n.target is torch.ops.aten.clone.default for n in gm.graph.nodes) == 2
    for got, ref in zip(gm(X, W, Z), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
