"""Stochastic benchmark problems: exact / accurate y*, h, ∇h and x* against independent references
(float64 dense implicit differentiation ``bl.hypergrad.Exact``, central finite differences of h,
stationarity conditions) plus data-protocol checks (corruption, splits, svmlight parsing)."""

from __future__ import annotations

import sys

import pytest
import torch

import bilevel as bl
from bilevel import oracles as O
from bilevel.problems import hyperclean, regularization_selection, stochastic_quadratic
from bilevel.problems.regsel import load_ijcnn1, load_svmlight
from bilevel.sampling import FixedBatches, FullBatch, Minibatches

F64 = torch.float64


def lower_grad_full(p, x, y):
    """‖∇_y g(x, y)‖ on the full lower data (for stationarity of y*)."""
    G = bl.formulation.Bound(p.problem, x, y, lower_batch=p.lower_tensors).G
    return float(torch.linalg.vector_norm(O.grad_y(G, (x,), (y,))[0]))


def exact_hypergrad(p, x, y):
    """Dense float64 implicit hypergradient at a given y* (Exact = Hessian + Cholesky)."""
    lo = tuple(t.double() if t.is_floating_point() else t for t in p.lower_tensors)
    up = tuple(t.double() if t.is_floating_point() else t for t in p.upper_tensors)
    return bl.hypergrad.Exact(inner=None)(p.problem, x.double(), y.double(), upper_batch=up,
                                          lower_batch=lo).grad


def fd_directional(p, x, d, eps):
    """Central difference (h(x + εd) − h(x − εd)) / 2ε with accurate inner solves."""
    return (p.value(x + eps * d) - p.value(x - eps * d)) / (2 * eps)


# --- stochastic quadratic ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def quad():
    return stochastic_quadratic(dim_x=6, dim_y=9, n_lower=64, n_upper=48, kappa=20.0, L=2.0,
                                rho=0.05, batch_size=8, seed=3)


def test_quadratic_structure(quad):
    A = quad.info["A"]
    ev = torch.linalg.eigvalsh(A)
    assert float(ev[-1] / ev[0]) == pytest.approx(20.0, rel=1e-10)  # condition number exactly κ
    assert float(ev[-1]) == pytest.approx(2.0, rel=1e-12)
    # every sample Hessian is SPD: g restricted to one sample is convex
    assert quad.info["mu_min_sample"] > 0
    # the mean of per-sample objectives is the full-data objective (finite sum)
    x, y = torch.randn(6, dtype=F64), torch.randn(9, dtype=F64)
    per = torch.stack([quad.problem.g(x, y, tuple(t[i:i + 1] for t in quad.lower_tensors))
                       for i in range(64)])
    assert float(per.mean()) == pytest.approx(float(quad.problem.g(x, y, quad.lower_tensors)), rel=1e-12)
    per_f = torch.stack([quad.problem.f(x, y, tuple(t[j:j + 1] for t in quad.upper_tensors))
                         for j in range(48)])
    assert float(per_f.mean()) == pytest.approx(float(quad.problem.f(x, y, quad.upper_tensors)), rel=1e-12)
    # the per-sample Hessians really differ (stochastic HVPs)
    assert float(quad.lower_tensors[0].std(0).max()) > 0.1


def test_quadratic_exact_solution_and_hypergradient(quad):
    x = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(0))
    ys = quad.y_star(x)
    assert lower_grad_full(quad, x, ys) < 1e-12
    hg = quad.hypergrad(x)
    torch.testing.assert_close(hg, exact_hypergrad(quad, x, ys), rtol=1e-10, atol=1e-12)
    # h is quadratic: central differences are exact up to rounding
    for k in range(6):
        e = torch.zeros(6, dtype=F64)
        e[k] = 1.0
        assert fd_directional(quad, x, e, 1e-3) == pytest.approx(float(hg[k]), rel=1e-7, abs=1e-9)


def test_quadratic_x_star(quad):
    xs = quad.x_star
    assert quad.grad_norm(xs) < 1e-12
    h0 = quad.value(xs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        d = torch.randn(6, dtype=F64, generator=gen)
        assert quad.value(xs + 1e-2 * d) > h0  # strict minimum (h strongly convex)
    assert quad.info["h_strong_convexity"] >= 0.05 - 1e-12


def test_quadratic_samplers(quad):
    lo = quad.lower_data
    assert isinstance(lo, Minibatches) and lo.batch_size == 8
    s, B, c = lo.next()
    assert s.shape == (8, 9) and B.shape == (8, 9, 6) and c.shape == (8, 9)
    flo, fup = quad.samplers(batch_size=16, kind="fixed")
    assert isinstance(flo, FixedBatches) and flo.n_batches == 4 and fup.batch_size == 16
    full, _ = quad.samplers(kind="full")
    assert isinstance(full, FullBatch)
    with pytest.raises(ValueError, match="sampler kind"):
        quad.samplers(kind="nope")
    with pytest.raises(ValueError):
        stochastic_quadratic(kappa=0.5)
    with pytest.raises(ValueError):
        stochastic_quadratic(hessian_noise=1.0)


# --- regularization selection ----------------------------------------------------------------
@pytest.fixture(scope="module")
def regsel():
    return regularization_selection(n_train=600, n_val=400, batch_size=32, dtype=F64, seed=2)


def test_regsel_shape_and_start(regsel):
    A, b = regsel.lower_tensors
    assert A.shape == (600, 22) and set(b.unique().tolist()) == {-1.0, 1.0}
    assert float(A.abs().max()) < 1.0
    assert regsel.x0.shape == (22,) and bool((regsel.x0 < 0).all())  # log U(0, 1)
    assert regsel.info["source"] == "synthetic"
    big = regularization_selection(batch_size=64)
    assert big.lower_tensors[0].shape == (49_990, 22) and big.upper_tensors[0].shape == (91_701, 22)


def test_regsel_hypergradient(regsel):
    x = torch.linspace(-3.0, 1.0, 22, dtype=F64)
    ys = regsel.y_star(x)
    assert lower_grad_full(regsel, x, ys) < 1e-10
    hg = regsel.hypergrad(x)
    torch.testing.assert_close(hg, exact_hypergrad(regsel, x, ys), rtol=1e-8, atol=1e-12)
    d = hg / hg.norm()
    assert fd_directional(regsel, x, d, 1e-4) == pytest.approx(float(hg.norm()), rel=1e-6)
    err = regsel.test_error(x, ys)
    assert 0.0 <= err < 0.5


def _write_svm(path, rows):
    path.write_text("".join(f"{lab} " + " ".join(f"{j}:{v}" for j, v in feats) + "\n"
                            for lab, feats in rows))


def test_svmlight_and_ijcnn1_loader(tmp_path, monkeypatch):
    rows = [(1, [(1, 0.5), (22, -1.0)]), (-1, [(3, 0.25)]), (1, [])]
    _write_svm(tmp_path / "ijcnn1", rows)
    _write_svm(tmp_path / "ijcnn1.t", rows[:2])
    X, y = load_svmlight(tmp_path / "ijcnn1", 22)
    expected = torch.zeros(3, 22, dtype=F64)
    expected[0, 0], expected[0, 21], expected[1, 2] = 0.5, -1.0, 0.25
    torch.testing.assert_close(X.double(), expected)
    # the fallback parser (no scikit-learn) gives the same arrays
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    X2, y2 = load_svmlight(tmp_path / "ijcnn1", 22)
    torch.testing.assert_close(X2, expected)
    torch.testing.assert_close(y2, torch.tensor([1.0, -1.0, 1.0], dtype=F64))
    A, b, Av, bv = load_ijcnn1(tmp_path)
    assert A.shape == (3, 22) and Av.shape == (2, 22)
    p = regularization_selection(source="ijcnn1", data_dir=tmp_path, batch_size=1)
    assert p.info["source"] == "ijcnn1" and p.lower_tensors[0].shape == (3, 22)
    with pytest.raises(FileNotFoundError, match="ijcnn1"):
        regularization_selection(source="ijcnn1", data_dir=tmp_path / "missing")
    auto = regularization_selection(source="auto", data_dir=tmp_path / "missing", n_train=50, n_val=50,
                                    batch_size=10)
    assert auto.info["source"] == "synthetic"


# --- hyper-cleaning --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hc():
    return hyperclean(0.7, source="mnist5k", n_train=150, n_val=100, n_test=100, dtype=F64,
                      batch_size=16, seed=4)


def test_hyperclean_protocol(hc):
    A, lab, idx = hc.lower_tensors
    assert A.shape == (150, 784) and hc.y0.shape == (10, 784)
    torch.testing.assert_close(hc.x0, torch.full((150,), -2.0, dtype=F64))
    assert float(hc.y0.abs().max()) == 0.0
    corrupted, clean = hc.info["corrupted"], hc.info["clean_labels"]
    assert bool((lab[corrupted] != clean[corrupted]).all())   # redrawn to a *wrong* class
    assert bool((lab[~corrupted] == clean[~corrupted]).all())
    assert abs(float(corrupted.double().mean()) - 0.7) < 0.15
    assert float(A.mean(0).abs().max()) < 1e-10  # standardised with train statistics
    b = hc.lower_data.next()
    assert b[0].shape == (16, 784) and b[2].dtype == torch.int64
    default = hyperclean(0.5, source="mnist5k", batch_size=64)
    assert (default.info["n_train"], default.info["n_val"], default.info["n_test"]) == (3000, 1000, 1000)
    with pytest.raises(ValueError):
        hyperclean(1.5, source="mnist5k")
    with pytest.raises(ValueError, match="does not fit"):
        hyperclean(0.5, source="mnist5k", n_train=4900, n_val=200)


def test_hyperclean_hypergradient(hc):
    x = hc.x0 + 0.5 * torch.randn(150, dtype=F64, generator=torch.Generator().manual_seed(0))
    ys = hc.y_star(x)
    assert lower_grad_full(hc, x, ys) < 1e-7
    hg = hc.hypergrad(x, ys)
    # only the training samples' own weights enter g: ∇h against finite differences of h
    d = hg / hg.norm()
    assert fd_directional(hc, x, d, 1e-3) == pytest.approx(float(hg.norm()), rel=1e-4)
    ev = hc.evaluate(x, ys)
    assert ev["inner_distance"] < 1e-6 and ev["grad_norm"] == pytest.approx(float(hg.norm()), rel=1e-6)
    assert 0.0 <= ev["test_error"] <= 1.0


class _Products(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the (rows, cols) of every matrix product's output."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.shapes.append(tuple(out.shape))
        return out


def test_hyperclean_products_keep_the_classes_first():
    """Every matrix product of the SOBA-family oracles (∇_y g with its graph, H v and the cross
    term from one backward, ∇ f) has the 10 classes as its row dimension — the orientation
    single-threaded BLAS is fast at; a transposed view of Z as an operand would make autograd
    return its gradient as Aᵀ (784 × b) @ (b × 10) (docs/performance.md)."""
    from bilevel.estimates import soba_oracles

    p = hyperclean(0.5, source="mnist5k", n_train=300, n_val=100, n_test=100, batch_size=32)
    x, y = p.x0 + 0.1, 0.01 * torch.randn(10, 784, generator=torch.Generator().manual_seed(0))
    v = torch.randn(10, 784, generator=torch.Generator().manual_seed(1))
    G = bl.formulation.Bound(p.problem, x, y, lower_batch=p.lower_data.next()).G
    F = bl.formulation.Bound(p.problem, x, y, upper_batch=p.upper_data.next()).F
    with _Products() as rec:
        soba_oracles(G, F, (x,), (y,), (v,))
    assert len(rec.shapes) >= 5
    assert all(s[0] == 10 for s in rec.shapes), rec.shapes
    # and every y-shaped result comes out in Z's own row-major layout (no transposed gradient for
    # the updates to read; with Z stored 784 x 10 and used as Z.T it came out with strides (1, 784))
    gy, hv, jv, gxF, gyF = soba_oracles(G, F, (x,), (y,), (v,))
    for t in (gy[0], hv[0], gyF[0]):
        assert t.shape == (10, 784) and t.stride() == (784, 1), t.stride()
