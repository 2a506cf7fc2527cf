"""Per-oracle compiled mode (``bl.solve(..., compile="oracles")``, ``bl.compile(est)``): equal to
eager to float rounding, same oracle counts, no recompiles on new batches (counted), a clear fallback with the
reason when an objective cannot be captured, and user errors unchanged.

These run with the ``aot_eager`` backend (dynamo capture with ``fullgraph=True`` + AOT autograd,
no code generation) so that the suite stays fast; one test compiles with inductor.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
from bilevel import compiled as C
from bilevel.errors import NonScalarObjectiveError
from tests.reference_problems import REFERENCE_PROBLEMS

pytestmark = [pytest.mark.compiled, pytest.mark.usefixtures("aot_eager")]  # fixtures: conftest
S = bl.solvers


@pytest.mark.parametrize("make", [lambda: S.SOBA(), lambda: S.StocBiO(inner_steps=2, Q=3)],
                         ids=["SOBA", "stocBiO"])
def test_solve_compiled_equals_eager_without_recompiles(tiny, make):
    kw = dict(batch_size=4, seed=0)
    eager = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=6, track=False)
    bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=1, track=False,
             compile="oracles")  # warm up
    before = C.stats()["compiles"]
    comp = bl.solve(**tiny.solve_kwargs(**kw), solver=make(), steps=6, track=False,
                    compile="oracles")
    assert C.stats()["compiles"] == before  # 6 iterations, fresh batches each: no recompile
    torch.testing.assert_close(comp.x, eager.x, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(comp.y, eager.y, rtol=1e-13, atol=1e-15)
    assert comp.state["counts"] == eager.state["counts"]


@pytest.mark.parametrize("name", ["CG", "Reverse"])
def test_compiled_estimator_equals_eager(name):
    ref = REFERENCE_PROBLEMS["ridge"]()
    inner = bl.inner.GD(ref.lr, 30)
    est = bl.hypergrad.CG(inner, iters=10) if name == "CG" else bl.hypergrad.Reverse(inner)
    a = est(ref.problem, ref.x, ref.y0)
    with bl.oracles.counting() as c_eager:
        est(ref.problem, ref.x, ref.y0)
    comp = bl.compile(est)
    assert comp.inner is inner and "compile(" in repr(comp)
    with bl.oracles.counting() as c_comp:
        b = comp(ref.problem, ref.x, ref.y0)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14)
    assert c_comp == c_eager
    before = C.stats()["compiles"]
    comp(ref.problem, ref.x + 0.01, ref.y0)  # another point: same kernels
    assert C.stats()["compiles"] == before


def test_fallback_when_objective_cannot_be_captured():
    ref = REFERENCE_PROBLEMS["ridge"]()

    def lower(x, y):  # data-dependent Python control flow: dynamo cannot capture it in one graph
        g = ref.problem.lower(x, y)
        return g * 2 if g.item() > 1e9 else g

    problem = bl.Problem(ref.problem.upper, lower)
    est = bl.hypergrad.CG(bl.inner.GD(ref.lr, 5), iters=5)
    a = est(problem, ref.x, ref.y0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b = bl.compile(est)(problem, ref.x, ref.y0)
    msgs = [str(m.message) for m in w if issubclass(m.category, C.CompileFallbackWarning)]
    assert msgs and "lower-level objective could not be captured" in msgs[0]
    assert "reason:" in msgs[0] and C.stats()["fallbacks"] >= 1
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14)


def test_user_errors_are_not_swallowed():
    ref = REFERENCE_PROBLEMS["ridge"]()
    problem = bl.Problem(ref.problem.upper, lambda x, y: (y * y).sum() * x)  # not a scalar
    with pytest.raises(NonScalarObjectiveError):
        bl.compile(bl.hypergrad.CG(bl.inner.GD(0.1, 2), iters=2))(problem, ref.x, ref.y0)


@pytest.mark.slow
def test_inductor_kernel_smoke():
    """One real (inductor, C++ code generation) kernel: ∇_y g of the ridge problem."""
    C.settings["backend"] = "inductor"
    ref = REFERENCE_PROBLEMS["ridge"]()
    G = bl.formulation.Bound(ref.problem, ref.x, ref.y0).G
    want = bl.oracles.grad_y(G, (ref.x,), (ref.y0,))
    with bl.oracles.backend("compiled"):
        got = bl.oracles.grad_y(G, (ref.x,), (ref.y0,))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)


def test_compiled_estimator_inside_a_solver_keeps_the_projection():
    """A solver copies the estimator to attach the y-projection: the copy stays compiled and the
    projection reaches the wrapped estimator (same result as eager)."""
    ref = REFERENCE_PROBLEMS["ridge"]()
    est = bl.hypergrad.CG(bl.inner.GD(ref.lr, 10), iters=5)
    kw = dict(solver=None, steps=2, track=False, y_projection=lambda t: t.clamp(-0.05, 0.05))
    a = bl.solve(ref.problem, ref.x, ref.y0, **{**kw, "solver": S.HypergradientDescent(est)})
    b = bl.solve(ref.problem, ref.x, ref.y0,
                 **{**kw, "solver": S.HypergradientDescent(bl.compile(est))})
    assert float(a.y.abs().max()) <= 0.05 + 1e-15
    torch.testing.assert_close(b.x, a.x, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.y, a.y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["oracles", "step"])
def test_clearing_the_objective_and_step_memos_causes_no_recompile(tiny, mode):
    """Graphs and kernels build objectives (and stocBiO its inner GD) while they are traced; the
    eager memos behind those constructors (``formulation._LEAF_SPECS``, ``estimates._GD_CACHE``)
    are cleared when they grow, and a graph that read them was guarded on their entries: it
    recompiled after every clear (found with iMAML in a long process)."""
    from bilevel import estimates, formulation

    kw = dict(batch_size=4, seed=0)

    def run():
        return bl.solve(**tiny.solve_kwargs(**kw), solver=S.StocBiO(inner_steps=2, Q=3, lr_y=0.1),
                        steps=3, track=False, compile=mode)

    run(), run()  # (step: the first run probes its patterns eagerly)
    before = C.stats()["compiles"]
    formulation._LEAF_SPECS.clear()
    estimates._GD_CACHE.clear()
    run()
    assert C.stats()["compiles"] == before
