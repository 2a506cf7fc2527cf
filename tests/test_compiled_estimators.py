"""``bl.compile(est)`` for hypergradient estimators: compiled inner steps (Reverse, and the lower
solve of the implicit estimators) and a compiled linearization (the H- and J^T-products of CG, ...).

Every compiled result equals today's eager estimator in float64 (the same mathematics, compiled),
with the same oracle counts; new points and new batches of the same shapes reuse the kernels
(counted with ``bl.compiled.stats()``); dynamics whose step depends on the step index, custom step
directions and objectives torch.compile cannot capture fall back to the eager path with a
:class:`~bilevel.compiled.CompileFallbackWarning` that says why. The ``aot_eager`` backend (capture
+ AOT autograd, no code generation) keeps this fast; the inductor run is marked ``slow``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
from bilevel import compiled as C
from bilevel.errors import NonFiniteError
from bilevel.hypergrad.base import lower_grad_fn
from tests.reference_problems import REFERENCE_PROBLEMS, rel_err

pytestmark = [pytest.mark.compiled, pytest.mark.usefixtures("aot_eager")]  # fixtures: conftest
H = bl.hypergrad
STEPS = 15


@pytest.fixture(autouse=True)
def one_step_per_kernel():
    """Kernels of one inner step, so that capture stays fast (the production default, 5 steps per
    kernel, traces graphs 5 times larger); ``test_several_steps_per_kernel`` checks those."""
    old = C.settings["steps_per_kernel"]
    C.settings["steps_per_kernel"] = 1
    yield
    C.settings["steps_per_kernel"] = old


def test_several_steps_per_kernel():
    """n steps per kernel (and the 1-step kernel for the rest of the steps) equal eager, with the
    truncation and checkpoint segments cutting across kernels."""
    C.settings["steps_per_kernel"] = 2
    ref = REFERENCE_PROBLEMS["ridge"]()
    gd = bl.inner.GD(ref.lr, 7)
    for est in (H.Reverse(gd, truncate=5, checkpoint=3), H.CG(gd, iters=4)):
        with bl.oracles.counting() as c_eager:
            a = est(ref.problem, ref.x, ref.y0)
        with bl.oracles.counting() as c_comp:
            b = bl.compile(est)(ref.problem, ref.x, ref.y0)
        assert rel_err(b.grad, a.grad) < 1e-10 and c_comp == c_eager


def _estimators(lr: float) -> dict:
    gd = bl.inner.GD(lr, STEPS)
    return {
        "reverse": H.Reverse(gd),
        "reverse-truncate": H.Reverse(gd, truncate=6),
        "reverse-checkpoint": H.Reverse(gd, checkpoint=True),
        "reverse-checkpoint-truncate": H.Reverse(gd, truncate=9, checkpoint=4),
        "reverse-momentum": H.Reverse(bl.inner.Momentum(lr, STEPS, momentum=0.5)),
        "reverse-nesterov": H.Reverse(bl.inner.Nesterov(lr, STEPS, momentum=0.3)),
        "reverse-projected": H.Reverse(bl.inner.GD(lr, STEPS, projection=lambda t: t.clamp(-0.3, 0.3))),
        "cg": H.CG(gd, iters=8),
        "cg-damped-warm": H.CG(gd, iters=8, damping=0.1, warm_start=True),
        "minres": H.MINRES(gd, iters=8),
        "neumann": H.Neumann(gd, iters=8),
    }


def _compiles() -> int:
    return C.stats()["compiles"]


#: Reverse and CG on every reference problem, each other setting on one of them (suite time)
CASES = [(n, p) for n in ("reverse", "cg") for p in sorted(REFERENCE_PROBLEMS)] + [
    (n, sorted(REFERENCE_PROBLEMS)[i % 3])
    for i, n in enumerate(k for k in _estimators(0.1) if k not in ("reverse", "cg"))]


@pytest.mark.parametrize("name,problem", CASES)
def test_compiled_estimator_equals_eager(name, problem):
    ref = REFERENCE_PROBLEMS[problem]()
    est = _estimators(ref.lr)[name]
    with bl.oracles.counting() as c_eager:
        a = est(ref.problem, ref.x, ref.y0)
    comp = bl.compile(est)
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CompileFallbackWarning)  # the compiled path, no fallback
        with bl.oracles.counting() as c_comp:
            b = comp(ref.problem, ref.x, ref.y0)
        assert rel_err(b.grad, a.grad) < 1e-10
        assert rel_err(b.y, a.y) < 1e-10
        assert c_comp == c_eager
        if "warm" in name:  # the carried state is the same too
            assert rel_err(b.state["v"], a.state["v"]) < 1e-10
        before = _compiles()
        comp(ref.problem, ref.x * 1.1 + 0.01, ref.y0 + 0.1)  # a new point: the same kernels
        assert _compiles() == before


def test_compiled_reverse_is_the_exact_hypergradient_in_the_limit():
    """Against the closed-form ∇h of the ridge reference: many GD steps converge to it, and the
    compiled and eager estimators converge together (CG with the exact linear solve)."""
    ref = REFERENCE_PROBLEMS["ridge"]()
    inner = bl.inner.GD(ref.lr, 400)
    rev = bl.compile(H.Reverse(inner))(ref.problem, ref.x, ref.y0)
    cg = bl.compile(H.CG(inner, iters=50))(ref.problem, ref.x, ref.y0)
    assert rel_err(rev.grad, ref.hypergrad) < 1e-8
    assert rel_err(cg.grad, ref.hypergrad) < 1e-8


def test_learned_hyperparameter_and_start_derivative():
    """lr as a callable of x (derivative through the step size) and wrt_init (∂f/∂y0)."""
    ref = REFERENCE_PROBLEMS["ridge"]()
    x = {"x": ref.x, "log_lr": torch.tensor(float(ref.lr), dtype=ref.x.dtype).log()}

    def up(x, y):
        return ref.problem.upper(x["x"], y)

    def low(x, y):
        return ref.problem.lower(x["x"], y)

    problem = bl.Problem(up, low)
    inner = bl.inner.GD(lambda x: x["log_lr"].exp(), 10)
    for est in (H.Reverse(inner), H.Reverse(bl.inner.GD(ref.lr, 10), wrt_init=True)):
        a = est(problem, x, ref.y0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", C.CompileFallbackWarning)
            b = bl.compile(est)(problem, x, ref.y0)
        assert rel_err(b.grad, a.grad) < 1e-10
        assert float(a.grad["log_lr"].abs()) > 0 or est.wrt_init
        if est.wrt_init:
            assert rel_err(b.info["grad_init"], a.info["grad_init"]) < 1e-10


def test_new_batches_reuse_the_kernels():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    t = torch.randn(40, generator=gen, dtype=torch.float64)

    def lower(x, y, batch):
        a, b = batch
        return 0.5 * ((a @ y - b) ** 2).mean() + 0.5 * (x.exp() * y * y).sum()

    def upper(x, y, batch):
        a, b = batch
        return 0.5 * ((a @ y - b) ** 2).mean()

    problem = bl.Problem(upper, lower)
    x, y0 = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for est in (H.Reverse(bl.inner.GD(0.5, 10)), H.CG(bl.inner.GD(0.5, 10), iters=5)):
        comp = bl.compile(est)
        comp(problem, x, y0, batch=(A[:20], t[:20]))
        before = _compiles()
        for lo in (5, 10, 20):
            batch = (A[lo:lo + 20], t[lo:lo + 20])
            b = comp(problem, x + 0.1, y0, batch=batch)
            a = est(problem, x + 0.1, y0, batch=batch)
            assert rel_err(b.grad, a.grad) < 1e-10
        assert _compiles() == before


@pytest.mark.parametrize("kind", ["adam", "schedule", "grad_fn"])
def test_fallback_when_the_step_depends_on_k(kind):
    ref = REFERENCE_PROBLEMS["ridge"]()
    if kind == "adam":
        est, why = H.Reverse(bl.inner.Adam(0.05, 10)), "depends on the step index"
    elif kind == "schedule":
        inner = bl.inner.GD(bl.inner.PerStep([ref.lr / (k + 1) for k in range(10)]), 10)
        est, why = H.Reverse(inner), "changes with the step index"
    else:
        est = H.Reverse(bl.inner.GD(ref.lr, 10),
                        grad_fn=lambda bound, xs, create_graph: lower_grad_fn(
                            bound, xs, create_graph=create_graph))
        why = "custom step direction"
    a = est(ref.problem, ref.x, ref.y0)
    C._WARNED.clear()
    with pytest.warns(C.CompileFallbackWarning, match=why):
        b = bl.compile(est)(ref.problem, ref.x, ref.y0)
    assert rel_err(b.grad, a.grad) < 1e-10


@pytest.mark.parametrize("batched", [True, False])
def test_zeroth_order_under_compile_equals_eager(batched):
    """bl.compile(ZerothOrder): the batched trajectories run under torch.func.vmap, where compiled
    kernels cannot (it used to fail with vmap's ``.item()`` error): the functional oracles, with a
    fallback warning; one by one, every trajectory is compiled inner steps."""
    ref = REFERENCE_PROBLEMS["ridge"]()
    est = H.ZerothOrder(bl.inner.GD(ref.lr, 10), samples=20, batched=batched)
    a = est(ref.problem, ref.x, ref.y0)
    C._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = bl.compile(est)(ref.problem, ref.x, ref.y0)
    said = [str(w.message) for w in caught if issubclass(w.category, C.CompileFallbackWarning)]
    assert bool(said) == batched and all("inside torch.func.vmap" in m for m in said)
    assert rel_err(b.grad, a.grad) < 1e-10


def test_fallback_when_the_objective_cannot_be_captured():
    ref = REFERENCE_PROBLEMS["ridge"]()

    def lower(x, y):  # data-dependent Python control flow: no single graph
        g = ref.problem.lower(x, y)
        return g * 2 if g.item() > 1e9 else g

    problem = bl.Problem(ref.problem.upper, lower)
    for est in (H.Reverse(bl.inner.GD(ref.lr, 5)), H.CG(bl.inner.GD(ref.lr, 5), iters=4)):
        a = est(problem, ref.x, ref.y0)
        with pytest.warns(C.CompileFallbackWarning, match="could not be captured.*reason:"):
            b = bl.compile(est)(problem, ref.x, ref.y0)
        assert rel_err(b.grad, a.grad) < 1e-10


def test_nonfinite_iterate_is_reported_with_its_step():
    ref = REFERENCE_PROBLEMS["ridge"]()
    est = H.Reverse(bl.inner.GD(50 * ref.lr, 400))
    with pytest.raises(NonFiniteError) as eager:
        est(ref.problem, ref.x, ref.y0)
    with pytest.raises(NonFiniteError) as comp:
        bl.compile(est)(ref.problem, ref.x, ref.y0)
    assert str(comp.value) == str(eager.value)


def test_thin_products_pass_rewrites_only_the_slow_layout():
    """C = A Bᵀ-stored with a thin A becomes (B Aᵀ)ᵀ; other products are left alone (values
    equal). The pass runs on an aten graph as inductor's post-grad passes do."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(w, X, P):
        return w.t().contiguous() @ X.t(), P @ X

    X, w, P = torch.randn(200, 30), torch.randn(30, 4), torch.randn(4, 200)
    gm = make_fx(f, tracing_mode="fake")(w, X, P)
    pass_ = C._Products()
    pass_(gm.graph)
    gm.recompile()
    assert pass_.rewrites == 1
    mms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert len(mms) == 2
    got, want = gm(w, X, P), f(w, X, P)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_data_read_transposed_come_as_cached_transposes():
    """An objective reading its data as X.t() (classes-first logits Wᵀ Xᵀ): the kernels take X's
    contiguous transpose as an extra input, cached per data tensor and recomputed when the data
    change in place; results equal eager."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,), generator=gen)

    def ce(W, batch):
        A, lab = batch
        return torch.nn.functional.cross_entropy((W.t() @ A.t()).unsqueeze(0), lab.unsqueeze(0))

    problem = bl.Problem(lambda x, W, b: ce(W, b),
                         lambda x, W, b: ce(W, b) + 0.5 * (x.exp() * W * W).sum())
    x, W0 = torch.zeros(6, 3, dtype=torch.float64), torch.zeros(6, 3, dtype=torch.float64)
    before = C.stats()["transposed_data"]
    for est in (H.Reverse(bl.inner.GD(0.5, 8)), H.CG(bl.inner.GD(0.5, 8), iters=5)):
        a = est(problem, x, W0, batch=(X, labels))
        b = bl.compile(est)(problem, x, W0, batch=(X, labels))
        assert rel_err(b.grad, a.grad) < 1e-10
    assert C.stats()["transposed_data"] > before
    X.mul_(0.5)  # in place: the cached transpose is stale and must be recomputed
    a = est(problem, x, W0, batch=(X, labels))
    b = bl.compile(est)(problem, x, W0, batch=(X, labels))
    assert rel_err(b.grad, a.grad) < 1e-10


@pytest.mark.slow
def test_inductor_compiled_estimators():
    """Real code generation (inductor, the thin-products pass on): Reverse and CG equal eager."""
    C.settings["backend"] = "inductor"
    ref = REFERENCE_PROBLEMS["logreg"]()
    for est in (H.Reverse(bl.inner.GD(ref.lr, 10)), H.CG(bl.inner.GD(ref.lr, 10), iters=5)):
        a = est(ref.problem, ref.x, ref.y0)
        b = bl.compile(est)(ref.problem, ref.x, ref.y0)
        assert rel_err(b.grad, a.grad) < 1e-10


@pytest.mark.skipif(torch.backends.mkl.is_available() is False, reason="torch built without MKL")
def test_inductor_reverse_with_packed_data_follows_the_data():
    """Inductor with the products pass on a float32 linear model whose data matrix is large enough
    to be packed (bilevel._gemm, MKL packed GEMM; the packed ways forced): compiled Reverse and CG
    equal eager; after the data change in place, and for a second problem on other data of the
    same shapes (the same kernels), they equal eager on the new data — a packed copy is never
    used stale."""
    from bilevel import _gemm as G

    C.settings["backend"] = "inductor"
    old_fastest = G._fastest
    G._fastest = lambda a, b, rounds=7, pack=None: f"{pack}/aten" if pack else "aten"
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(600, 300, generator=gen)
    Xv = torch.randn(600, 300, generator=gen)
    labels = torch.randint(0, 10, (600,), generator=gen)

    def make(X):
        def g(lam, W):
            logits_t = W.t() @ X.t()
            return (torch.nn.functional.cross_entropy(logits_t.unsqueeze(0), labels.unsqueeze(0))
                    + 0.5 * (torch.exp(lam) * W * W).sum())

        def f(lam, W):
            return torch.nn.functional.cross_entropy((W.t() @ Xv.t()).unsqueeze(0),
                                                     labels.unsqueeze(0))

        return bl.Problem(f, g, name="packed-logreg")

    lam, W0 = torch.full((300, 10), -1.0), torch.zeros(300, 10)
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):
            problem = make(X)
            for est in (H.Reverse(bl.inner.GD(0.5, 3)), H.CG(bl.inner.GD(0.5, 3), iters=3)):
                torch.testing.assert_close(bl.compile(est)(problem, lam, W0).grad,
                                           est(problem, lam, W0).grad, rtol=1e-4, atol=1e-7)
            assert any(w.startswith("packed") for w in G.choices().values())
            X.mul_(-1.5)  # in place: the packed copies of X and Xᵀ are stale now
            other = make(torch.randn(600, 300, generator=gen))
            for p in (problem, other):
                for est in (H.Reverse(bl.inner.GD(0.5, 3)), H.CG(bl.inner.GD(0.5, 3), iters=3)):
                    torch.testing.assert_close(bl.compile(est)(p, lam, W0).grad,
                                               est(p, lam, W0).grad, rtol=1e-4, atol=1e-7)
    finally:
        G._fastest = old_fastest


def test_compiled_implicit_estimators_take_the_upper_gradients_from_a_kernel():
    """Under ``bl.compile``, CG's and MINRES's upper gradients (∇_x f, ∇_y f) come from the
    compiled ``grads`` oracle kernel of the upper objective (its products then go through the
    products pass, as the lower ones'), with the eager estimator's result and oracle counts."""
    ref = REFERENCE_PROBLEMS[sorted(REFERENCE_PROBLEMS)[0]]()
    for name in ("cg", "minres"):
        est = _estimators(ref.lr)[name]
        with bl.oracles.counting() as c_eager:
            want = est(ref.problem, ref.x, ref.y0)
        with bl.oracles.counting() as c_comp:
            got = bl.compile(est)(ref.problem, ref.x, ref.y0)
        assert rel_err(got.grad, want.grad) < 1e-10 and c_comp == c_eager, name
        kinds = {k[:2] for k in C._CACHE.get(ref.problem, {}) if isinstance(k, tuple)}
        assert ("grads", "upper") in kinds, (name, kinds)
