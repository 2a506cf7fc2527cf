"""Implicit hypergradients when the lower Hessian is indefinite or singular.

The lower objective g(x, y) = ½ yᵀAy − yᵀBx has a saddle point y*(x) = A⁻¹Bx when A is indefinite
(as around the weights of any neural network). The implicit hypergradient of f(x, y*(x)) with
f = ½‖y − t‖² is ∇h(x) = Bᵀ A⁻¹ (y* − t). CG assumes A ≻ 0: it breaks down, warns and falls back to
its last good iterate. MINRES and CG on the normal equations solve the indefinite system exactly.
Damped CG solves (A + λI) v = ∇_y f (iMAML's proximal system): positive definite only once
λ > −λ_min(A) = 2.9 here, and then biased — by a lot when λ is comparable to A's eigenvalues, as
below: damping buys stability, not accuracy.

Run: python examples/indefinite_lower_level.py
"""

import warnings

import torch

import bilevel as bl

torch.manual_seed(0)
n, m = 20, 4
Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
A = Q @ torch.diag(torch.linspace(-3.0, 5.0, n, dtype=torch.float64) + 0.1) @ Q.T  # indefinite
B = torch.randn(n, m, dtype=torch.float64)
t = torch.randn(n, dtype=torch.float64)

problem = bl.Problem(
    upper=lambda x, y: 0.5 * ((y - t) ** 2).sum(),
    lower=lambda x, y: 0.5 * y @ A @ y - y @ (B @ x),
)
x = torch.ones(m, dtype=torch.float64)
y_star = torch.linalg.solve(A, B @ x)                      # the lower stationary point
exact = B.T @ torch.linalg.solve(A, y_star - t)            # dense reference

estimators = {
    "CG": bl.hypergrad.CG(None, iters=100),
    "MINRES": bl.hypergrad.MINRES(None, iters=100),
    "NormalCG": bl.hypergrad.NormalCG(None, iters=400),
    "CG damping=0.01": bl.hypergrad.CG(None, iters=100, damping=0.01),
    "CG damping=4": bl.hypergrad.CG(None, iters=100, damping=4.0),  # > −λ_min: positive definite
}
for name, est in estimators.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = est(problem, x, y_star)                      # inner=None: y_star is taken as y*
    err = float((res.grad - exact).norm() / exact.norm())
    sinfo = res.info["linear_solve"]
    warned = any(issubclass(w.category, bl.LinearSolveWarning) for w in caught)
    print(f"{name:16s} relative error {err:.2e}  breakdown {sinfo['breakdown']}  warned {warned}")
