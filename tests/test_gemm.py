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
    monkeypatch.setattr(G, "_fastest", lambda a, b: chosen)

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
    monkeypatch.setattr(G, "_fastest", lambda a, b: "onednn")

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
def test_inductor_runs_the_rewritten_product(monkeypatch):
    """Through inductor (the kernels' Products pass, on-disk cache off so that the pass runs): a
    product and a linear layer by a forced oneDNN way, equal to eager to float32 rounding."""
    import torch._inductor.config as ic

    monkeypatch.setattr(ic, "fx_graph_cache", False)
    monkeypatch.setattr(G, "_CHOSEN", {})
    monkeypatch.setattr(G, "_fastest", lambda a, b: "onednn")
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
    with pytest.raises(ConfigError, match="'auto' or 'aten', got 'mkl'"):
        bl.compile(bl.hypergrad.Reverse(bl.inner.GD(ref.lr, 3)))(ref.problem, ref.x, ref.y0)
    for mode in ("step", "oracles"):
        with pytest.raises(ConfigError, match="'auto' or 'aten', got 'mkl'"):
            bl.solve(**tiny.solve_kwargs(), solver=SOBA(), steps=1, compile=mode)
