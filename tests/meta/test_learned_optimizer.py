"""The learned optimizer's meta-gradient equals autograd through a hand-written unroll (float64),
inside the vmapped truncated-BPTT window and inside ``bl.hypergrad.Reverse``."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel import _tree as T
from bilevel.meta import learned_optimizer as LO

F64 = torch.float64


def _hand_unroll(net, task, theta, m, steps, beta=0.9, s=0.1):
    """θ ← θ + s N(P(g), P(m)), m ← β m + (1 − β) g with g = 2Wᵀ(Wθ − b), written out."""
    losses = []
    for _ in range(steps):
        g = 2 * task["W"].T @ (task["W"] @ theta - task["b"])
        m = beta * m + (1 - beta) * g
        h = torch.cat([LO.preprocess(g), LO.preprocess(m), 0.1 * g[..., None], 0.1 * m[..., None]], -1)
        h0 = h
        for i in range(3):
            h = h @ net[f"{i}.weight"].T + net[f"{i}.bias"]
            if i < 2:
                h = torch.tanh(h)
        out = h[..., 0] + (h0 @ net["skip"] if "skip" in net else 0.0)  # skip
        theta = theta + s * out
        losses.append(LO.quadratic_loss(task, theta))
    return losses, theta


@pytest.mark.parametrize("skip", [False, True])
def test_window_meta_gradient_equals_hand_written_autograd(skip):
    net = LO.init_net(6, torch.Generator().manual_seed(0), F64, skip=skip)
    net["2.bias"] = torch.tensor([0.05], dtype=F64)
    if skip:
        net["skip"] = torch.linspace(-0.2, 0.3, LO.FEATURES, dtype=F64)
    tasks = LO.quadratic_tasks(3, dim=4, seed=1, dtype=F64)
    dyn = LO.LearnedUpdate(steps=4)

    def mean_window(x_):
        def one(task):
            d = dyn.bind(x_)
            return LO.trajectory_loss(d, lambda th: LO.quadratic_loss(task, th),
                                      d.init((task["theta0"],)), 4)[0]
        return torch.func.vmap(one)(tasks).mean()

    g = torch.func.grad(mean_window)({"net": net})["net"]
    leaves, spec = T.flatten(net)
    leaves = tuple(t.clone().requires_grad_(True) for t in leaves)
    nt = T.unflatten(leaves, spec)
    total = 0.0
    for i in range(3):
        task = {k: v[i] for k, v in tasks.items()}
        losses, _ = _hand_unroll(nt, task, task["theta0"], torch.zeros(4, dtype=F64), 4)
        total = total + sum(losses) / 4
    ref = T.unflatten(torch.autograd.grad(total / 3, leaves), spec)
    for k in net:
        torch.testing.assert_close(g[k], ref[k], rtol=1e-10, atol=1e-12)
    assert float(g["0.weight"].abs().max()) > 1e-6


def test_learned_update_runs_inside_reverse():
    net = LO.init_net(5, torch.Generator().manual_seed(2), F64)
    task = {k: v[0] for k, v in LO.quadratic_tasks(1, dim=3, seed=4, dtype=F64).items()}
    prob = bl.Problem(lambda x, y: LO.quadratic_loss(task, y), lambda x, y: LO.quadratic_loss(task, y))
    res = bl.hypergrad.Reverse(LO.LearnedUpdate(steps=3))(prob, {"net": net}, task["theta0"])
    leaves, spec = T.flatten(net)
    leaves = tuple(t.clone().requires_grad_(True) for t in leaves)
    losses, _ = _hand_unroll(T.unflatten(leaves, spec), task, task["theta0"],
                             torch.zeros(3, dtype=F64), 3)
    ref = T.unflatten(torch.autograd.grad(losses[-1], leaves), spec)
    for k in net:
        torch.testing.assert_close(res.grad["net"][k], ref[k], rtol=1e-10, atol=1e-12)
