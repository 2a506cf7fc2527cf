"""Every estimator under ``bl.hypergrad.vmap`` (torch.func.vmap over a leading task dimension) equals
a Python loop over the tasks to 1e-10 in float64: tasks' data and lower variables batched, x shared or
batched, a shared learned start y0(x); estimator states (warm starts, generator state) carried across
calls; deferred checks name the failing task; bad input names the field.

The per-task problem is nonlinear in y (log-cosh penalty) so the linear solves and the unrolled
trajectories are not trivially linear:  g_i(x, w) = ½ mean (X_i w − t_i)² + Σ_j e^{x_j} logcosh(w_j),
f_i(x, w) = ½ mean (V_i w − s_i)² + 0.1 Σ_j x_j w_j.
"""

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
    vmap,
)

F64 = torch.float64
B, N, D = 3, 10, 4


def _logcosh(y):
    return y + torch.nn.functional.softplus(-2 * y) - math.log(2)


def _lower(x, w, batch):
    X, t = batch
    return 0.5 * ((X @ w - t) ** 2).mean() + (torch.exp(x) * _logcosh(w)).sum()


def _upper(x, w, batch):
    V, s = batch
    return 0.5 * ((V @ w - s) ** 2).mean() + 0.1 * (x * w).sum()


def _ridge_lower(x, w, batch):
    X, t = batch
    return 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (torch.exp(x) * w * w).sum()


def _ridge_solve(x, batch):
    X, t = batch
    return torch.linalg.solve(X.T @ X / X.shape[0] + torch.diag(torch.exp(x)), X.T @ t / X.shape[0])


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    return (r(B, N, D), r(B, N)), (r(B, N, D), r(B, N)), 0.3 * r(D), 0.3 * r(B, D), 0.1 * r(B, D)


DYN = bl.inner.GD(lr=0.3, steps=12)
ESTIMATORS = {
    "reverse": lambda: Reverse(DYN),
    "reverse_truncate": lambda: Reverse(DYN, truncate=4),
    "reverse_checkpoint": lambda: Reverse(DYN, checkpoint=True),
    "forward": lambda: Forward(DYN),
    "first_order": lambda: FirstOrder(DYN),
    "finite_difference": lambda: FiniteDifference(DYN),
    "cg": lambda: CG(DYN, iters=6, tol=1e-8),
    "neumann": lambda: Neumann(DYN, iters=6),
    "fixed_point": lambda: FixedPoint(DYN, iters=6),
    "exact": lambda: Exact(DYN),
    "zeroth_order": lambda: ZerothOrder(DYN, samples=3, mu=1e-4, seed=3),
    "closed_form": lambda: ClosedForm(_ridge_solve),
}


def _task(tree, i):
    return tuple(t[i] for t in tree)


def _loop(est, problem, x, y, up, lo, *, x_batched=False, states=None):
    out = []
    for i in range(B):
        xi = x[i] if x_batched else x
        yi = y if callable(y) else y[i]
        out.append(est(problem, xi, yi, upper_batch=_task(up, i), lower_batch=_task(lo, i),
                       state=None if states is None else states[i]))
    return out


def _close(a, b, tol=1e-10):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale, (float((a - b).abs().max()), scale)


@pytest.mark.parametrize("x_batched", [False, True], ids=["x_shared", "x_batched"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_vmap_equals_the_loop_over_tasks(name, x_batched):
    lo, up, x, xb, y = _data()
    problem = bl.Problem(_upper, _ridge_lower if name == "closed_form" else _lower)
    est = ESTIMATORS[name]()
    xx = xb if x_batched else x
    res = vmap(est, problem, xx, y, upper_batch=up, lower_batch=lo, x_batched=x_batched)
    loop = _loop(est, problem, xx, y, up, lo, x_batched=x_batched)
    assert res.grad.shape == (B, D) and res.y.shape == (B, D)
    _close(res.grad, torch.stack([r.grad for r in loop]))
    _close(res.y, torch.stack([r.y for r in loop]))
    assert float(res.grad.abs().max()) > 1e-6  # not a trivially zero hypergradient


@pytest.mark.parametrize("name", ["reverse", "reverse_checkpoint", "forward", "first_order", "zeroth_order"])
def test_vmap_with_a_shared_learned_start(name):
    """MAML's case: the start y0(x) = A x is a function of the shared upper variable."""
    lo, up, x, _, _ = _data(1)
    A = torch.linspace(-1, 1, D * D, dtype=F64).reshape(D, D)
    y0 = lambda x: A @ x  # noqa: E731
    problem = bl.Problem(_upper, _lower)
    est = ESTIMATORS[name]()
    res = vmap(est, problem, x, y0, upper_batch=up, lower_batch=lo)
    _close(res.grad, torch.stack([r.grad for r in _loop(est, problem, x, y0, up, lo)]))


def test_vmap_carries_warm_starts_and_generator_state_like_the_loop():
    lo, up, x, _, y = _data(2)
    problem = bl.Problem(_upper, _lower)
    cg = CG(DYN, iters=3, tol=0.0, warm_start=True)
    first = vmap(cg, problem, x, y, upper_batch=up, lower_batch=lo)
    assert first.state["v"][0].shape == (B, D)
    second = vmap(cg, problem, x, first.y, upper_batch=up, lower_batch=lo, state=first.state)
    loop1 = _loop(cg, problem, x, y, up, lo)
    loop2 = _loop(cg, problem, x, torch.stack([r.y for r in loop1]), up, lo,
                  states=[r.state for r in loop1])
    _close(second.grad, torch.stack([r.grad for r in loop2]))
    assert float((second.grad - first.grad).abs().max()) > 1e-8  # the warm start mattered
    zo = ZerothOrder(DYN, samples=2, mu=1e-4, seed=5)
    a = vmap(zo, problem, x, y, upper_batch=up, lower_batch=lo)
    b = vmap(zo, problem, x, y, upper_batch=up, lower_batch=lo, state=a.state)
    assert a.state["rng"].dim() == 1  # one generator state shared by the tasks
    la = _loop(zo, problem, x, y, up, lo)
    lb = _loop(zo, problem, x, y, up, lo, states=[r.state for r in la])
    _close(b.grad, torch.stack([r.grad for r in lb]))
    assert not torch.equal(a.info["directions"], b.info["directions"])


def test_vmap_info_holds_per_task_diagnostics():
    lo, up, x, _, y = _data(3)
    res = vmap(CG(DYN, iters=40, tol=1e-9), bl.Problem(_upper, _lower), x, y, upper_batch=up,
               lower_batch=lo)
    ls = res.info["linear_solve"]
    assert ls["iterations"].shape == (B,) and bool(ls["converged"].all())
    assert bool((ls["relative_residual"] <= 1e-9).all()) and res.info["steps"] == DYN.steps
    loop = _loop(CG(DYN, iters=40, tol=1e-9), bl.Problem(_upper, _lower), x, y, up, lo)
    assert ls["iterations"].tolist() == [r.info["linear_solve"]["iterations"] for r in loop]


def test_vmap_checks_run_after_the_transform_and_name_the_task():
    lo, up, x, _, y = _data(4)
    X, t = lo
    t = t.clone()
    t[1, 0] = float("nan")
    with pytest.raises(bl.NonFiniteError, match="task 1 of 3"):
        vmap(Reverse(DYN), bl.Problem(_upper, _lower), x, y, upper_batch=up, lower_batch=(X, t))
    with pytest.raises(bl.NonFiniteError, match="task 1 of 3"):
        vmap(CG(DYN, iters=3), bl.Problem(_upper, _lower), x, y, upper_batch=up, lower_batch=(X, t))


def test_vmap_bad_input_names_the_field():
    lo, up, x, _, y = _data(5)
    problem = bl.Problem(_upper, _lower)
    with pytest.raises(bl.StructureMismatchError, match="lower_batch leaf 1 has 2 tasks.*expected 3"):
        vmap(Reverse(DYN), problem, x, y, upper_batch=up, lower_batch=(lo[0], lo[1][:2]))
    with pytest.raises(bl.StructureMismatchError, match="nothing has a task dimension"):
        vmap(Reverse(DYN), problem, x, lambda x: x)
    with pytest.raises(TypeError, match="needs an Estimator"):
        vmap(DYN, problem, x, y)
    with pytest.raises(TypeError, match="got bl.compile.*pass est"):
        vmap(bl.compile(Reverse(DYN)), problem, x, y)
