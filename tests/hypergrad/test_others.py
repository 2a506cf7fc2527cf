"""FirstOrder, FiniteDifference, ZerothOrder and ClosedForm against exact references; every estimator
in float32 and on each available device; the solve loop on a quadratic with a closed-form optimum."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel.hypergrad import (
    CG,
    ClosedForm,
    Exact,
    FiniteDifference,
    FirstOrder,
    FixedPoint,
    Forward,
    Neumann,
    Reverse,
    ZerothOrder,
)
from tests.reference_problems import (
    converged_gd,
    fd_grad,
    mixed,
    rel_err,
    ridge,
    ridge_data,
    ridge_exact,
    ridge_objectives,
    textbook_unroll,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# FirstOrder
# ------------------------------------------------------------------------------------------------
def test_first_order_is_grad_x_f_and_wrong_by_the_implicit_term():
    ref = mixed()
    res = FirstOrder(inner=converged_gd(ref))(ref.problem, ref.x, ref.y0)
    # exactly ∇_x f at the inner solution ...
    xr = ref.x.clone().requires_grad_(True)
    gx = torch.autograd.grad(ref.f_vec(xr, res.y), xr)[0]
    torch.testing.assert_close(res.grad, gx, rtol=1e-14, atol=1e-15)
    assert rel_err(res.grad, ref.grad_x_f) < 1e-10
    # ... so it misses the implicit term −∇²_xy g H⁻¹ ∇_y f, which is large here
    missing = ref.hypergrad - ref.grad_x_f
    assert rel_err(res.grad, ref.hypergrad) == pytest.approx(float(missing.norm() / ref.hypergrad.norm()),
                                                             rel=1e-8)
    assert float(missing.norm()) > 0.3 * float(ref.hypergrad.norm())
    # when f does not depend on x (ridge), the first-order estimate is exactly zero
    r = ridge()
    assert torch.equal(FirstOrder(inner=converged_gd(r))(r.problem, r.x, r.y0).grad, torch.zeros_like(r.x))


def test_first_order_maml_form_includes_the_initialization():
    """FOMAML: ∇_x f(x, y_T) + (dy0/dx)ᵀ ∇_y f(x, y_T), i.e. the derivative of x ↦ f(x, y0(x) + Δ)
    with the inner displacement Δ = y_T − y0 held fixed (dy_T/dy0 replaced by the identity)."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(7, 5, generator=gen, dtype=F64) / 2
    ref = mixed()

    def y_fn(x):
        return A @ x

    dyn = bl.inner.GD(lr=ref.lr, steps=5)
    res = FirstOrder(inner=dyn)(ref.problem, ref.x, y_fn)
    delta = res.y - y_fn(ref.x)
    fd = fd_grad(lambda x: ref.f_vec(x, y_fn(x) + delta), ref.x)
    assert rel_err(res.grad, fd) < 1e-8
    plain = FirstOrder(inner=dyn)(ref.problem, ref.x, y_fn(ref.x))
    assert rel_err(plain.grad, fd) > 1e-2  # without the initialization term it is different


# ------------------------------------------------------------------------------------------------
# FiniteDifference (DARTS)
# ------------------------------------------------------------------------------------------------
def test_finite_difference_is_one_step_reverse_with_error_O_eps2():
    ref = mixed()
    T = 4
    y0 = torch.full_like(ref.y0, 0.3)
    target = Reverse(inner=bl.inner.GD(lr=ref.lr, steps=T + 1), truncate=1)(ref.problem, ref.x, y0)
    errs = []
    for eps in (0.08, 0.04, 0.02, 0.01):
        res = FiniteDifference(inner=bl.inner.GD(lr=ref.lr, steps=T), eps=eps)(ref.problem, ref.x, y0)
        torch.testing.assert_close(res.y, target.y, rtol=1e-14, atol=1e-15)  # the virtual step y_{T+1}
        errs.append(float((res.grad - target.grad).norm()))
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(3.5 < r < 4.5 for r in ratios), (errs, ratios)  # halving eps divides the error by 4
    assert errs[-1] < 1e-5 * float(target.grad.norm())


def test_finite_difference_is_exact_when_the_cross_term_is_linear_in_y():
    """Ridge: ∇_x g = ½ eˣ ⊙ w² is quadratic in w, so the central difference has no error."""
    ref = ridge()
    y0 = torch.full_like(ref.y0, 0.2)
    target = Reverse(inner=bl.inner.GD(lr=ref.lr, steps=4), truncate=1)(ref.problem, ref.x, y0)
    res = FiniteDifference(inner=bl.inner.GD(lr=ref.lr, steps=3), eps=0.5)(ref.problem, ref.x, y0)
    assert rel_err(res.grad, target.grad) < 1e-12
    with pytest.raises(ValueError, match="xi"):
        FiniteDifference(inner=None)
    assert FiniteDifference(inner=None, xi=0.1).xi == 0.1


# ------------------------------------------------------------------------------------------------
# ZerothOrder (PZOBO)
# ------------------------------------------------------------------------------------------------
def _unrolled_jacobian(ref, steps, y_fn=None):
    """J = dy_T/dx of the textbook GD unroll (exact, by autograd through the recursion)."""
    def yT(x):
        y0 = y_fn(x) if y_fn is not None else torch.zeros_like(ref.y0)
        return textbook_unroll("gd", ref.g_vec, x, y0, steps, lr=ref.lr, graph=True)[0]

    return torch.autograd.functional.jacobian(yT, ref.x)


@pytest.mark.parametrize("with_init", [False, True])
def test_zeroth_order_is_the_gaussian_sketch_of_the_unrolled_jacobian(with_init):
    """∇̂h = ∇_x f + (1/Q) Uᵀ U Jᵀ ∇_y f + O(μ) with the directions U the estimator drew."""
    ref = mixed()
    steps, Q = 6, 8
    A = torch.linspace(-1, 1, 35, dtype=F64).reshape(7, 5)
    y_fn = (lambda x: A @ x) if with_init else None
    y = y_fn if with_init else ref.y0
    J = _unrolled_jacobian(ref, steps, y_fn)
    errs = []
    for mu in (2e-4, 1e-4, 5e-5):
        est = ZerothOrder(inner=bl.inner.GD(lr=ref.lr, steps=steps), samples=Q, mu=mu, seed=0)
        res = est(ref.problem, ref.x, y)
        U = res.info["directions"]
        assert U.shape == (Q, 5)
        xr, yr = ref.x.clone().requires_grad_(True), res.y.clone().requires_grad_(True)
        fx, fy = torch.autograd.grad(ref.f_vec(xr, yr), (xr, yr))
        expected = fx + U.T @ (U @ (J.T @ fy)) / Q
        errs.append(float((res.grad - expected).norm()))
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)  # error O(μ)
    assert errs[-1] < 1e-4 * float(expected.norm())


def test_zeroth_order_approaches_the_unrolled_hypergradient_with_many_samples():
    ref = mixed()
    steps, n = 4, 5
    dyn = bl.inner.GD(lr=ref.lr, steps=steps)
    exact = Reverse(inner=dyn)(ref.problem, ref.x, ref.y0)
    first = FirstOrder(inner=dyn)(ref.problem, ref.x, ref.y0)
    implicit_part = float((exact.grad - first.grad).norm())  # ‖Jᵀ ∇_y f‖
    errs = {}
    for Q in (10, 400):
        est = ZerothOrder(inner=dyn, samples=Q, mu=1e-6, seed=1)
        errs[Q] = float((est(ref.problem, ref.x, ref.y0).grad - exact.grad).norm())
        # Monte-Carlo error: E‖(UᵀU/Q − I) a‖² = (n + 1)‖a‖²/Q for Gaussian U
        assert errs[Q] < 3 * math.sqrt((n + 1) / Q) * implicit_part, (Q, errs)
    assert errs[400] < 0.3 * errs[10]


# ------------------------------------------------------------------------------------------------
# ClosedForm
# ------------------------------------------------------------------------------------------------
def test_closed_form_ridge_is_exact():
    ref = ridge()
    X, t, Xv, tv, _ = ridge_data(0)
    res = ClosedForm(bl.closed_form.ridge(X, t))(ref.problem, ref.x, ref.y0)
    assert rel_err(res.grad, ref.hypergrad) < 1e-12
    assert rel_err(res.y, ref.y_star) < 1e-12


def test_closed_form_ridge_with_one_regularization_per_output():
    """t of shape (n, k) and x of shape (d, k): k independent ridge problems, each exact by hand."""
    gen = torch.Generator().manual_seed(7)
    n, m, d, k = 20, 15, 4, 3
    X, Xv = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(m, d, generator=gen, dtype=F64)
    t, tv = torch.randn(n, k, generator=gen, dtype=F64), torch.randn(m, k, generator=gen, dtype=F64)
    x = 0.3 * torch.randn(d, k, generator=gen, dtype=F64)

    def f_all(x, W):  # the sum of the k validation losses of ridge_objectives
        return 0.5 * ((Xv @ W - tv) ** 2).mean(0).sum()

    problem = bl.Problem(f_all, lambda x, W: W.sum())  # g is not used by ClosedForm
    res = ClosedForm(bl.closed_form.ridge(X, t))(problem, x, torch.zeros(d, k, dtype=F64))
    for j in range(k):
        w, hg = ridge_exact(X, t[:, j], Xv, tv[:, j], x[:, j])
        torch.testing.assert_close(res.y[:, j], w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(res.grad[:, j], hg, rtol=1e-11, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# float32 and devices
# ------------------------------------------------------------------------------------------------
def _estimators(lr: float, steps: int):
    gd = bl.inner.GD(lr=lr, steps=steps)
    short = bl.inner.GD(lr=lr, steps=15)
    X, t, *_ = ridge_data(0)
    return {
        "CG": (CG(inner=gd, iters=50, tol=1e-7), "exact"),
        "Exact": (Exact(inner=gd), "exact"),
        "Neumann": (Neumann(inner=gd, iters=150), "exact"),
        "FixedPoint": (FixedPoint(inner=gd, iters=150), "exact"),
        "ClosedForm": (None, "exact"),
        "Reverse": (Reverse(inner=short, checkpoint=True), "self"),
        "Forward": (Forward(inner=short), "self"),
        "FirstOrder": (FirstOrder(inner=gd), "self"),
        "FiniteDifference": (FiniteDifference(inner=short, eps=1e-2), "self"),
        "ZerothOrder": (ZerothOrder(inner=short, samples=4, mu=1e-2), "self"),
    }


@pytest.mark.parametrize("name", list(_estimators(0.1, 1)))
def test_float32_and_device(name, device):
    """Same estimators in float32 (on each device): dtype/device kept, accuracy ~ float32 round-off."""
    ref64 = ridge()
    X, t, Xv, tv, x = (u.to(device) for u in ridge_data(0))
    gd_steps = converged_gd(ref64, accuracy=1e-7).steps
    results = {}
    for dtype in (torch.float32, F64):
        Xd, td, Xvd, tvd, xd = (u.to(dtype) for u in (X, t, Xv, tv, x))
        problem = bl.Problem(*ridge_objectives(Xd, td, Xvd, tvd))
        est, kind = _estimators(ref64.lr, gd_steps)[name]
        if est is None:
            est = ClosedForm(bl.closed_form.ridge(Xd, td))
        results[dtype] = est(problem, xd, torch.zeros_like(xd))
    res32 = results[torch.float32]
    assert res32.grad.dtype == torch.float32 and res32.y.dtype == torch.float32
    assert res32.grad.device.type == device and res32.y.device.type == device
    target = ref64.hypergrad if kind == "exact" else results[F64].grad
    tol = 1e-3 if name == "ZerothOrder" else 2e-5 if kind == "self" else 1e-4
    assert rel_err(res32.grad, target) < tol, name
    if kind == "exact":  # and float64 is much more accurate, so the comparison means something
        assert rel_err(results[F64].grad, target) < 1e-6


def test_scalar_upper_variable():
    """A 0-dim x (one hyperparameter) works for every estimator family."""
    ref = ridge()
    X, t, Xv, tv, _ = ridge_data(0)
    f, g = ridge_objectives(X, t, Xv, tv)
    problem = bl.Problem(f, g)
    x = torch.tensor(0.2, dtype=F64)
    w, hg = ridge_exact(X, t, Xv, tv, x.expand(X.shape[1]))
    dyn = bl.inner.GD(lr=ref.lr, steps=5)
    rev = Reverse(inner=dyn)(problem, x, ref.y0)
    assert rev.grad.shape == ()
    torch.testing.assert_close(Forward(inner=dyn)(problem, x, ref.y0).grad, rev.grad, rtol=1e-10, atol=0)
    zo = ZerothOrder(inner=dyn, samples=3)(problem, x, ref.y0)
    assert zo.grad.shape == ()
    cg = CG(inner=converged_gd(ref), iters=50, tol=1e-14)(problem, x, ref.y0)
    torch.testing.assert_close(cg.grad, hg.sum(), rtol=1e-8, atol=0)  # shared x: sum of per-feature terms


# ------------------------------------------------------------------------------------------------
# the solve loop
# ------------------------------------------------------------------------------------------------
def test_hypergradient_descent_converges_to_closed_form_optimum():
    """g = ½yᵀAy − yᵀBx, f = ½‖y − b‖² + ½ρ‖x‖²: y*(x) = Mx with M = A⁻¹B, and h(x) is a strongly
    convex quadratic with minimizer x* = (MᵀM + ρI)⁻¹ Mᵀ b."""
    gen = torch.Generator().manual_seed(11)
    n, m, rho = 4, 6, 0.5
    Q = torch.randn(m, m, generator=gen, dtype=F64) / math.sqrt(m)
    A = torch.eye(m, dtype=F64) + 0.5 * Q @ Q.T
    B = torch.randn(m, n, generator=gen, dtype=F64) / math.sqrt(n)
    b = torch.randn(m, generator=gen, dtype=F64)
    M = torch.linalg.solve(A, B)
    x_star = torch.linalg.solve(M.T @ M + rho * torch.eye(n, dtype=F64), M.T @ b)
    L_h = float(torch.linalg.eigvalsh(M.T @ M)[-1]) + rho
    L_g = float(torch.linalg.eigvalsh(A)[-1])

    problem = bl.Problem(lambda x, y: 0.5 * ((y - b) ** 2).sum() + 0.5 * rho * (x**2).sum(),
                         lambda x, y: 0.5 * y @ (A @ y) - y @ (B @ x))
    est = CG(inner=bl.inner.GD(lr=1.0 / L_g, steps=5), iters=30, tol=1e-14)  # warm start makes 5 enough
    solver = bl.solvers.HypergradientDescent(est, upper=1.0 / L_h)
    out = bl.solve(problem, torch.zeros(n, dtype=F64), torch.zeros(m, dtype=F64), solver=solver, steps=80)
    assert float((out.x - x_star).norm()) < 1e-6 * float(x_star.norm())
    assert float((out.y - M @ out.x).norm()) < 1e-6
    assert len(out.history) == 80 and out.history[-1]["step"] == 80
    h_star = 0.5 * float(((M @ x_star - b) ** 2).sum()) + 0.5 * rho * float((x_star**2).sum())
    assert out.history[-1]["upper_loss"] == pytest.approx(h_star, rel=1e-10)
    assert out.history[-1]["hypergrad_norm"] < 1e-6
    # oracle counts are cumulative: 5 inner gradients + 1 linearization per outer step
    assert [r["lower_grad"] for r in out.history[:3]] == [6, 12, 18]


CORE = ["_tree.py", "formulation.py", "oracles.py", "linalg.py", "inner.py", "validation.py", "sampling.py",
        "hypergrad", "solvers/base.py", "solvers/hypergradient.py"]


def test_core_hard_codes_no_device():
    """Tensors are created on the device of the inputs; a literal device would break CUDA runs (this
    machine has no GPU, so test_float32_and_device covers CUDA only where one is present)."""
    import pathlib
    import re

    root = pathlib.Path(bl.__file__).parent
    files = [p for c in CORE for p in ((root / c).glob("*.py") if (root / c).is_dir() else [root / c])]
    assert len(files) >= 15
    pattern = re.compile(r"\.cuda\(|\.cpu\(|device\s*=\s*['\"]|torch\.device\(['\"]")
    offenders = [f"{p.name}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, offenders


@pytest.mark.parametrize("chunk", [None, 3])
def test_zeroth_order_batched_equals_one_by_one(chunk):
    """One vmapped unroll over all directions (unperturbed folded in, in chunks) gives the estimate
    of the one-trajectory-at-a-time loop to float64 rounding, and the same oracle counts."""
    ref = mixed()
    dyn = bl.inner.Momentum(lr=ref.lr, steps=5, momentum=0.5)
    with bl.oracles.counting() as c_loop:
        loop = ZerothOrder(inner=dyn, samples=7, mu=1e-3, seed=3, batched=False)(ref.problem, ref.x,
                                                                                  ref.y0)
    with bl.oracles.counting() as c_batch:
        batch = ZerothOrder(inner=dyn, samples=7, mu=1e-3, seed=3, chunk=chunk)(ref.problem, ref.x,
                                                                                 ref.y0)
    # every vmapped trajectory is counted (7 perturbed + 1 unperturbed, 5 steps each)
    assert c_batch == c_loop and c_batch.flat()["lower_grad"] > 0
    torch.testing.assert_close(batch.info["directions"], loop.info["directions"], rtol=0, atol=0)
    torch.testing.assert_close(batch.y, loop.y, rtol=1e-13, atol=1e-14)
    # δ_j = (y_j − y_0)/μ amplifies rounding of y by 1/μ: 1e-16 · 1e3 relative
    torch.testing.assert_close(batch.grad, loop.grad, rtol=1e-10, atol=1e-12)


def test_zeroth_order_batched_reports_blow_up():
    ref = mixed()
    est = ZerothOrder(inner=bl.inner.GD(lr=100 * ref.lr, steps=200), samples=3)
    with pytest.raises(bl.NonFiniteError) as e:
        est(ref.problem, ref.x, ref.y0)
    assert e.value.level == "lower" and e.value.step is not None


def test_zeroth_order_rejects_bad_settings():
    with pytest.raises(ValueError, match="samples >= 1"):
        ZerothOrder(inner=bl.inner.GD(0.1, 2), samples=0)
    with pytest.raises(ValueError, match="chunk"):
        ZerothOrder(inner=bl.inner.GD(0.1, 2), chunk=0)
