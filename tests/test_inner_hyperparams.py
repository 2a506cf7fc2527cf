"""Dynamics hyperparameters that depend on the upper variable (issue 10, item 4).

Every hypergradient with respect to a learning rate / momentum / weight decay / Adam beta that is a
callable of x is compared with central finite differences of the unrolled map h(x) = f(x, y_K(x))
in float64 (step 1e-6: truncation O(1e-12), rounding O(1e-10), hence rtol 1e-6).
"""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel import inner
from bilevel.errors import ConfigError, StructureMismatchError
from bilevel.formulation import Bound
from bilevel.hypergrad.base import lower_grad_fn

F64 = torch.float64
C = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
TARGET = torch.tensor([0.3, -0.2, 1.0], dtype=F64)


def lower(x, y):
    """Non-quadratic, so Adam and momentum paths are not linear in y."""
    return 0.5 * (C * (y - x["w"]) ** 2).sum() + 0.05 * (y ** 4).sum()


def upper(x, y):
    return 0.5 * ((y - TARGET) ** 2).sum() + 0.1 * (x["w"] ** 2).sum()


PROBLEM = bl.Problem(upper, lower)
Y0 = torch.tensor([0.5, 0.1, -0.4], dtype=F64)


def unrolled_value(dyn: inner.Dynamics, x: dict) -> float:
    """h(x) = f(x, y_K(x)) with the dynamics bound at x (no graph): the map we differentiate."""
    bound = Bound(PROBLEM, x, Y0)
    d = dyn.bind(x, Y0)
    with torch.no_grad():
        s, _ = inner.unroll(d, lower_grad_fn(bound, bound.xs, create_graph=False),
                            d.init((Y0,)), d.steps)
    return float(upper(x, d.output(s)[0]))


def fd_grad(dyn: inner.Dynamics, x: dict, eps: float = 1e-6) -> dict:
    out = {}
    for k, v in x.items():
        g = torch.zeros_like(v)
        for i in range(v.numel()):
            xp = {kk: vv.clone() for kk, vv in x.items()}
            xm = {kk: vv.clone() for kk, vv in x.items()}
            xp[k].view(-1)[i] += eps
            xm[k].view(-1)[i] -= eps
            g.view(-1)[i] = (unrolled_value(dyn, xp) - unrolled_value(dyn, xm)) / (2 * eps)
        out[k] = g
    return out


def X(**extra):
    return {"w": torch.tensor([0.2, -0.1, 0.4], dtype=F64),
            **{k: torch.as_tensor(v, dtype=F64) for k, v in extra.items()}}


CASES = {
    "gd-log-lr": (lambda: inner.GD(lr=lambda x: x["log_lr"].exp(), steps=6), X(log_lr=-1.5)),
    "gd-per-param-lr": (lambda: inner.GD(lr=lambda x: x["lr"], steps=5), X(lr=[0.2, 0.1, 0.3])),
    "gd-per-step-lr": (lambda: inner.GD(lr=lambda x, k: x["lrs"][k], steps=4),
                       X(lrs=[0.3, 0.2, 0.25, 0.1])),
    "gd-weight-decay": (lambda: inner.GD(lr=0.2, weight_decay=lambda x: x["wd"], steps=5),
                        X(wd=0.3)),
    "momentum": (lambda: inner.Momentum(lr=lambda x: x["lr"], momentum=lambda x: x["beta"],
                                        weight_decay=lambda x: x["wd"], steps=6),
                 X(lr=0.15, beta=0.6, wd=0.1)),
    "nesterov": (lambda: inner.Nesterov(lr=lambda x: x["lr"], momentum=lambda x: x["beta"],
                                        steps=6), X(lr=0.2, beta=0.5)),
    "nesterov-fista-lr": (lambda: inner.Nesterov(lr=lambda x: x["lr"], steps=6), X(lr=0.2)),
    "adam": (lambda: inner.Adam(lr=lambda x: x["lr"], betas=(lambda x: x["b1"], 0.99),
                                weight_decay=lambda x: x["wd"], steps=5),
             X(lr=0.05, b1=0.8, wd=0.2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hypergradient_through_hyperparameters_matches_finite_differences(name):
    make, x = CASES[name]
    dyn = make()
    ref = fd_grad(dyn, x)
    ests = [bl.hypergrad.Reverse(dyn), bl.hypergrad.Reverse(dyn, checkpoint=2)]
    if name in ("gd-log-lr", "momentum"):
        ests.append(bl.hypergrad.Forward(dyn))
    for est in ests:
        g = est(PROBLEM, x, Y0).grad
        for k in x:
            torch.testing.assert_close(g[k], ref[k], rtol=1e-6, atol=1e-9, msg=f"{est} {k}")
    # the derivative really flows through the hyperparameters (not a zero that happens to match)
    assert all(float(ref[k].abs().max()) > 1e-3 for k in x if k != "w")


def test_truncated_reverse_differentiates_only_the_last_steps_hyperparameters():
    """T-RHG with per-step rates: the first T−K rates get exactly zero, the last K match FD of the
    map that restarts from the (fixed) state after T−K steps."""
    dyn = inner.GD(lr=lambda x, k: x["lrs"][k], steps=4)
    x = X(lrs=[0.3, 0.2, 0.25, 0.1])
    g = bl.hypergrad.Reverse(dyn, truncate=2)(PROBLEM, x, Y0).grad
    assert torch.equal(g["lrs"][:2], torch.zeros(2, dtype=F64))
    full = bl.hypergrad.Reverse(dyn)(PROBLEM, x, Y0).grad
    assert float(full["lrs"][:2].abs().min()) > 1e-4  # the untruncated estimator does see them


def test_per_leaf_rates_are_matched_to_y_by_key():
    """A dict of per-leaf rates in another key order than y gives the same result as one in y's
    order (matched by key, not by position); the result equals a hand-written loop."""
    y0 = {"a": torch.tensor([1.0, -2.0, 0.5], dtype=F64), "b": torch.tensor([0.3, 0.7], dtype=F64)}
    x = {"la": torch.tensor([0.1, 0.2, 0.3], dtype=F64), "lb": torch.tensor(0.4, dtype=F64)}

    def g(x, y):
        return 0.5 * (y["a"] ** 2).sum() + 0.5 * 3.0 * (y["b"] ** 2).sum()

    def f(x, y):
        return (y["a"].sum() - 1.0) ** 2 + (y["b"] ** 2).sum()

    prob = bl.Problem(f, g)
    fwd = inner.GD(lr=lambda x: {"a": x["la"], "b": x["lb"]}, steps=3)
    rev = inner.GD(lr=lambda x: {"b": x["lb"], "a": x["la"]}, steps=3)
    ga = bl.hypergrad.Reverse(fwd)(prob, x, y0).grad
    gb = bl.hypergrad.Reverse(rev)(prob, x, y0).grad
    xr = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    a, b = y0["a"], y0["b"]
    for _ in range(3):
        a, b = a - xr["la"] * a, b - xr["lb"] * 3.0 * b
    ref = torch.autograd.grad(f(xr, {"a": a, "b": b}), [xr["la"], xr["lb"]])
    for gg in (ga, gb):
        torch.testing.assert_close(gg["la"], ref[0], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(gg["lb"], ref[1], rtol=1e-13, atol=1e-15)


def test_zeroth_order_and_first_order_see_the_bound_rates():
    """Estimators that only run the dynamics forward (solve_lower) bind too: FirstOrder's y_T is
    the y_T of the rate evaluated at x."""
    dyn = inner.GD(lr=lambda x: x["log_lr"].exp(), steps=6)
    x = X(log_lr=-1.5)
    y_fo = bl.hypergrad.FirstOrder(dyn)(PROBLEM, x, Y0).y
    y_ref = bl.hypergrad.FirstOrder(inner.GD(lr=float(torch.exp(torch.tensor(-1.5, dtype=F64))), steps=6))(
        PROBLEM, x, Y0).y
    torch.testing.assert_close(y_fo, y_ref, rtol=1e-14, atol=1e-15)


def test_tensor_that_requires_grad_is_rejected():
    x = torch.tensor(0.0, requires_grad=True)
    with pytest.raises(ConfigError, match="requires grad.*callable of x"):
        inner.GD(lr=x.exp())
    with pytest.raises(ConfigError, match="requires grad"):
        inner.Momentum(lr=0.1, momentum=torch.tensor(0.5, requires_grad=True))


def test_unbound_callable_and_bad_shapes_raise():
    dyn = inner.GD(lr=lambda x: x["lr"], steps=2)
    with pytest.raises(ConfigError, match="bind"):
        dyn.update((Y0,), (Y0,), 0)
    with pytest.raises(ConfigError, match="callable"):
        inner.GD(lr=lambda: 0.1)
    bad = inner.GD(lr=lambda x: x["lr"], steps=2)
    with pytest.raises(StructureMismatchError, match="broadcast"):
        bl.hypergrad.Reverse(bad)(PROBLEM, X(lr=[0.1, 0.2]), Y0)
    y2 = {"a": Y0, "b": Y0.clone()}
    with pytest.raises(StructureMismatchError, match="keys"):
        inner.GD(lr=lambda x: {"a": x["lr"]}).bind(X(lr=0.1), y2).update((Y0, Y0), (Y0, Y0), 0)
    with pytest.raises(StructureMismatchError, match="leaves"):
        inner.GD(lr=torch.ones(3, dtype=F64)).bind(X(), y2)


def test_constants_bind_to_self_and_numeric_paths_unchanged():
    dyn = inner.Adam(lr=0.1, steps=3)
    assert dyn.bind(X(), Y0) is dyn and not dyn.depends_on_x
    assert inner.GD(lr=lambda x: 1.0).depends_on_x
    per_leaf = inner.GD(lr=torch.full((3,), 0.1, dtype=F64), steps=3)
    s = per_leaf.update((Y0,), (torch.ones(3, dtype=F64),), 0)
    torch.testing.assert_close(s[0], Y0 - 0.1, rtol=0, atol=1e-16)
