"""bl.argmin / bl.fixed_point: autograd functions checked against closed forms, bl.hypergrad and
gradcheck (float64); nested argmins (three levels) against the closed form of nested quadratics."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

F64 = torch.float64


def _ridge(n=20, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X, t = torch.randn(n, d, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    Xv, tv = torch.randn(10, d, generator=gen, dtype=F64), torch.randn(10, generator=gen, dtype=F64)

    def g(x, w):
        return ((X @ w - t) ** 2).mean() / 2 + 0.5 * (x.exp() * w**2).sum()

    def f(x, w):
        return ((Xv @ w - tv) ** 2).mean() / 2

    def w_star(x):  # closed form of the lower level, differentiable by autograd
        return torch.linalg.solve(X.T @ X / n + torch.diag(x.exp()), X.T @ t / n)

    return g, f, w_star, d


def test_argmin_backward_matches_the_closed_form_and_the_cg_estimator():
    g, f, w_star, d = _ridge()
    x0 = torch.linspace(-1, 0.5, d, dtype=F64)
    x = x0.clone().requires_grad_(True)
    w = bl.argmin(g, x, torch.zeros(d, dtype=F64), solver=bl.inner.GD(lr=0.5, steps=200))
    f(x, w).backward()
    xr = x0.clone().requires_grad_(True)
    f(xr, w_star(xr)).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-8, atol=1e-12)
    est = bl.hypergrad.CG(bl.inner.GD(lr=0.5, steps=200), iters=100)
    res = est(bl.Problem(upper=f, lower=g), x0, torch.zeros(d, dtype=F64))
    torch.testing.assert_close(x.grad, res.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("diff", [bl.hypergrad.CG(None, iters=50), bl.hypergrad.Exact(None)])
def test_argmin_gradcheck(diff):
    g, _, w_star, d = _ridge()

    def layer(x):
        return bl.argmin(g, x, torch.zeros(d, dtype=F64), solver=lambda x, y0: w_star(x), diff=diff)

    assert torch.autograd.gradcheck(layer, (torch.randn(d, dtype=F64, requires_grad=True),))


@pytest.mark.parametrize("diff", [bl.hypergrad.CG(None, iters=50), bl.hypergrad.Exact(None)])
def test_argmin_second_derivative_matches_the_closed_form(diff):
    g, f, w_star, d = _ridge()
    x0 = torch.linspace(-1, 0.5, d, dtype=F64)

    def h(x):
        return f(x, bl.argmin(g, x, torch.zeros(d, dtype=F64), solver=lambda x, y0: w_star(x),
                              diff=diff))

    H = torch.autograd.functional.hessian(h, x0)
    H_ref = torch.autograd.functional.hessian(lambda x: f(x, w_star(x)), x0)
    torch.testing.assert_close(H, H_ref, rtol=1e-8, atol=1e-12)


def test_argmin_inside_a_torch_optim_loop_follows_the_closed_form_trajectory():
    g, f, w_star, d = _ridge()
    xa = torch.zeros(d, dtype=F64, requires_grad=True)
    xb = torch.zeros(d, dtype=F64, requires_grad=True)
    opt_a, opt_b = torch.optim.Adam([xa], lr=0.1), torch.optim.Adam([xb], lr=0.1)
    for _ in range(5):
        opt_a.zero_grad()
        f(xa, bl.argmin(g, xa, torch.zeros(d, dtype=F64), solver=lambda x, y0: w_star(x))).backward()
        opt_a.step()
        opt_b.zero_grad()
        f(xb, w_star(xb)).backward()
        opt_b.step()
    torch.testing.assert_close(xa, xb, rtol=1e-9, atol=1e-12)


def test_argmin_on_pytrees():
    g, f, w_star, d = _ridge()
    lam = {"log_l2": torch.zeros(d, dtype=F64, requires_grad=True)}

    def g_tree(x, y):
        return g(x["log_l2"], torch.cat([y["a"], y["b"]]))

    y0 = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(d - 2, dtype=F64)}
    y = bl.argmin(g_tree, lam, y0, solver=bl.inner.GD(lr=0.5, steps=200))
    assert set(y) == {"a", "b"} and y["b"].shape == (d - 2,)
    f(None, torch.cat([y["a"], y["b"]])).backward()
    xr = torch.zeros(d, dtype=F64, requires_grad=True)
    f(xr, w_star(xr)).backward()
    torch.testing.assert_close(lam["log_l2"].grad, xr.grad, rtol=1e-8, atol=1e-12)


def test_fixed_point_layer_matches_the_linear_closed_form_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    d = 5
    A = 0.3 * torch.randn(d, d, generator=gen, dtype=F64) / d**0.5
    B = torch.randn(d, 3, generator=gen, dtype=F64)
    x = torch.randn(3, dtype=F64, requires_grad=True)
    z = bl.fixed_point(lambda x, z: A @ z + B @ x, x, torch.zeros(d, dtype=F64), iters=500,
                       tol=1e-15)
    torch.testing.assert_close(z, torch.linalg.solve(torch.eye(d, dtype=F64) - A, B @ x.detach()))
    z.sum().backward()
    ref = B.T @ torch.linalg.solve((torch.eye(d, dtype=F64) - A).T, torch.ones(d, dtype=F64))
    torch.testing.assert_close(x.grad, ref, rtol=1e-10, atol=1e-12)

    def layer(x):
        return bl.fixed_point(lambda x, z: torch.tanh(A @ z + B @ x), x, torch.zeros(d, dtype=F64),
                              iters=500, tol=1e-15)

    assert torch.autograd.gradcheck(layer, (torch.randn(3, dtype=F64, requires_grad=True),))


def test_bad_arguments_are_rejected_by_name():
    g, _, w_star, d = _ridge()
    x = torch.zeros(d, dtype=F64, requires_grad=True)
    with pytest.raises(bl.ConfigError, match="implicit estimator"):
        bl.argmin(g, x, torch.zeros(d, dtype=F64), solver=bl.inner.GD(lr=0.1, steps=1),
                  diff=bl.hypergrad.Reverse(bl.inner.GD(lr=0.1, steps=1)))
    with pytest.raises(bl.ConfigError, match="needs solver="):
        bl.argmin(g, x, torch.zeros(d, dtype=F64))
    with pytest.raises(bl.ConfigError, match="solver=...\\) must be"):
        bl.argmin(g, x, torch.zeros(d, dtype=F64), solver=3)
    with pytest.raises(bl.StructureMismatchError):
        bl.argmin(g, x, torch.zeros(d, dtype=F64), solver=lambda x, y0: torch.zeros(d + 1))


def test_three_levels_by_nesting_match_the_closed_form():
    """min_x f(x, y*),  y*(x) = argmin_y g(x, y, z*(x, y)),  z*(x, y) = argmin_z h(x, y, z):

    h = ½ zᵀAz − zᵀ(Bx + Cy)        ⇒ z* = Mx x + My y,   Mx = A⁻¹B, My = A⁻¹C;
    g = ½ yᵀPy − yᵀDx + ½‖z* − Ey‖²  ⇒ y* = N x,  N = (P + KᵀK)⁻¹(D − KᵀMx),  K = My − E;
    f = ½‖y − c‖² + ½ρ‖x‖²          ⇒ ∇h(x) = Nᵀ(Nx − c) + ρx.
    """
    gen = torch.Generator().manual_seed(2)
    dx, dy, dz = 3, 4, 5

    def spd(n):
        Q = torch.randn(n, n, generator=gen, dtype=F64)
        return Q @ Q.T / n + torch.eye(n, dtype=F64)

    A, P = spd(dz), spd(dy)
    B, C = torch.randn(dz, dx, generator=gen, dtype=F64), torch.randn(dz, dy, generator=gen, dtype=F64)
    D, E = torch.randn(dy, dx, generator=gen, dtype=F64), torch.randn(dz, dy, generator=gen, dtype=F64)
    c, rho = torch.randn(dy, generator=gen, dtype=F64), 0.1

    def h(xy, z):
        x, y = xy
        return 0.5 * z @ A @ z - z @ (B @ x + C @ y)

    def g(x, y):
        # the innermost forward solve in closed form keeps the test fast; its backward is CG
        z = bl.argmin(h, (x, y), torch.zeros(dz, dtype=F64),
                      solver=lambda xy, z0: torch.linalg.solve(A, B @ xy[0] + C @ xy[1]),
                      diff=bl.hypergrad.CG(None, iters=30))
        return 0.5 * y @ P @ y - y @ D @ x + 0.5 * ((z - E @ y) ** 2).sum()

    Mx, My = torch.linalg.solve(A, B), torch.linalg.solve(A, C)
    K = My - E
    N = torch.linalg.solve(P + K.T @ K, D - K.T @ Mx)
    ev = torch.linalg.eigvalsh(P + K.T @ K)  # the middle level's Hessian: step 1/L, rate 1 − μ/L
    steps = int(30 / float(ev[0] / ev[-1]))
    x = torch.randn(dx, generator=gen, dtype=F64).requires_grad_(True)
    y = bl.argmin(g, x, torch.zeros(dy, dtype=F64),
                  solver=bl.inner.GD(lr=float(1 / ev[-1]), steps=steps),
                  diff=bl.hypergrad.CG(None, iters=30))
    (0.5 * ((y - c) ** 2).sum() + 0.5 * rho * (x**2).sum()).backward()
    assert steps < 400

    xd = x.detach()
    torch.testing.assert_close(y.detach(), N @ xd, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(x.grad, N.T @ (N @ xd - c) + rho * xd, rtol=1e-7, atol=1e-10)


@pytest.mark.compiled
@pytest.mark.usefixtures("aot_eager")
def test_an_argmin_inside_the_lower_objective_under_functional_and_compiled_oracles():
    """g(x, y) = ½‖y − z*(x, y)‖²-type middle level with z* an argmin: an estimator on (f, g) with
    the functional oracles (torch.func.grad of g runs the argmin inside a transform, where
    autograd's requires_grad_ is refused) or compiled ones equals the eager one. It used to fail
    ("autograd.Function ... must override the setup_context staticmethod")."""
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(4, 4, generator=gen, dtype=F64)
    A = A @ A.T / 4 + torch.eye(4, dtype=F64)
    B = torch.randn(4, 3, generator=gen, dtype=F64)

    def h(xy, z):  # z*(x, y) = A⁻¹(B x + y)
        x, y = xy
        return 0.5 * z @ A @ z - z @ (B @ x + y)

    def g(x, y):
        z = bl.argmin(h, (x, y), torch.zeros(4, dtype=F64),
                      solver=lambda xy, z0: torch.linalg.solve(A, B @ xy[0] + xy[1]),
                      diff=bl.hypergrad.CG(None, iters=20))
        return 0.5 * ((y - 1.0) ** 2).sum() + 0.5 * (z**2).sum()

    problem = bl.Problem(lambda x, y: 0.5 * (y**2).sum() + 0.1 * (x**2).sum(), g)
    x, y0 = torch.tensor([0.3, -0.2, 0.5], dtype=F64), torch.zeros(4, dtype=F64)
    est = bl.hypergrad.CG(bl.inner.GD(lr=0.3, steps=60), iters=20)
    ref = est(problem, x, y0)
    with bl.oracles.backend("func"):
        func = est(problem, x, y0)
    comp = bl.compile(est)(problem, x, y0)
    for res in (func, comp):
        torch.testing.assert_close(res.grad, ref.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res.y, ref.y, rtol=1e-9, atol=1e-12)
