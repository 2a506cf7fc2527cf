"""A learned optimizer: a coordinate-wise network as the inner update rule (Andrychowicz, Denil,
Gómez, Hoffman, Pfau, Schaul, Shillingford & de Freitas 2016, "Learning to learn by gradient
descent by gradient descent", Sec. 2, Eq. 1–3, Sec. 2.1 coordinatewise, App. A preprocessing).

The optimizee's parameters θ (the lower variable y) follow

    m_{t+1} = β m_t + (1 − β) ∇f(θ_t),      θ_{t+1} = θ_t + s · N_φ(P(g_t), P(m_{t+1}), r g_t, r m_{t+1}),

with N_φ a small MLP applied to every coordinate independently (shared weights φ — the upper
variable x), P the log/sign gradient preprocessing of App. A (p = 10), r = 0.1 a fixed input scale
of the raw values (our addition, so the rule can scale steps with the gradient) and s = 0.1 the
output scale of the paper. Meta-training minimizes the summed loss along the trajectory (Eq. 3, w_t = 1) by
truncated back-propagation: the trajectory is cut into windows of ``unroll`` steps, each window's
summed loss is differentiated with respect to φ (through every step: second order through ∇f),
and the state is carried to the next window without a derivative (Sec. 3). Tasks are batched by
``torch.func.vmap``.

:class:`LearnedUpdate` is a :class:`bilevel.inner.Dynamics`: ``bind(x)`` takes φ = ``x["net"]``, so
it also runs inside ``bl.hypergrad.Reverse`` (final-iterate meta-objective).

Task family used here (Sec. 3.1): random quadratics f(θ) = ‖Wθ − b‖², W ∈ R^{10×10}, b ∈ R^{10}
with i.i.d. N(0, 1) entries; :func:`quadratic_tasks`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import vmap

from .. import _tree as T
from .. import oracles as O
from ..errors import ConfigError
from ..inner import Adam, Dynamics, unroll

__all__ = ["LearnedUpdate", "init_net", "preprocess", "quadratic_tasks", "quadratic_loss",
           "trajectory_loss", "meta_train_optimizer", "run_optimizer"]


#: per coordinate: P(g) (2), P(m) (2), and the raw g, m (scaled by ``raw_scale``)
FEATURES = 6


def preprocess(v: Tensor, p: float = 10.0) -> Tensor:
    """App. A: (log|v|/p, sign v) if |v| ≥ e^{−p}, else (−1, e^p v); returns (..., 2)."""
    big = v.abs() >= math.exp(-p)
    a = torch.where(big, torch.log(v.abs().clamp_min(math.exp(-p))) / p, -torch.ones_like(v))
    b = torch.where(big, torch.sign(v), math.exp(p) * v)
    return torch.stack([a, b], -1)


def init_net(hidden: int = 20, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32, skip: bool = False) -> dict[str, Tensor]:
    """Weights of the coordinate-wise MLP 6 → hidden → hidden → 1 (tanh); ``skip=True`` adds a
    linear skip connection from the 6 inputs to the output (``"skip"``, initialized to zero, so
    the initial rule is unchanged: a direct path to SGD / heavy-ball-like steps on the raw
    inputs)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    sizes = [FEATURES, hidden, hidden, 1]
    net = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        s = 1.0 / math.sqrt(a)
        net[f"{i}.weight"] = ((torch.rand(b, a, generator=g, dtype=torch.float64) * 2 - 1) * s).to(dtype)
        net[f"{i}.bias"] = torch.zeros(b, dtype=dtype)
    if skip:
        net["skip"] = torch.zeros(FEATURES, dtype=dtype)
    return net


def _mlp(net: dict[str, Tensor], h: Tensor) -> Tensor:
    n = sum(1 for k in net if k.endswith(".weight"))
    h0 = h
    for i in range(n):
        h = h @ net[f"{i}.weight"].T + net[f"{i}.bias"]
        if i < n - 1:
            h = torch.tanh(h)
    out = h[..., 0]
    if "skip" in net:
        out = out + h0 @ net["skip"]
    return out


class LearnedUpdate(Dynamics):
    """θ ← θ + s · N_φ(P(g), P(m), r g, r m), m ← β m + (1 − β) g; φ bound from ``x["net"]``
    (the raw, scaled inputs let the rule scale its steps with the gradient)."""

    slots = 2

    def __init__(self, steps: int = 100, *, beta: float = 0.9, scale: float = 0.1,
                 raw_scale: float = 0.1, net: dict[str, Tensor] | None = None):
        super().__init__(lr=scale, steps=steps)
        if not 0 <= beta < 1:
            raise ConfigError(f"beta must be in [0, 1), got {beta}")
        self.beta, self.scale, self.net = float(beta), float(scale), net
        self.raw_scale = float(raw_scale)

    @property
    def depends_on_x(self) -> bool:  # the network comes from x
        return True

    def bind(self, x: Any, y: Any = None) -> LearnedUpdate:
        out = copy.copy(self)
        out.net = x["net"] if isinstance(x, dict) and "net" in x else x
        return out

    def update(self, state, grad, k):
        if self.net is None:
            raise ConfigError("LearnedUpdate needs its network: bind(x) with x['net'] first")
        y, m = self.split(state)
        m = tuple(self.beta * mi + (1 - self.beta) * gi for mi, gi in zip(m, grad))
        r = self.raw_scale
        step = tuple(_mlp(self.net, torch.cat([preprocess(gi), preprocess(mi), r * gi[..., None],
                                               r * mi[..., None]], -1))
                     for gi, mi in zip(grad, m))
        return self.project(T.axpy(self.scale, step, y)) + m


def quadratic_tasks(n: int, dim: int = 10, seed: int = 0, dtype: torch.dtype = torch.float32
                    ) -> dict[str, Tensor]:
    """n random quadratics (Sec. 3.1): W (n, dim, dim), b (n, dim), θ0 (n, dim), all N(0, 1)."""
    rng = np.random.default_rng([seed, n, dim])
    W = torch.from_numpy(rng.standard_normal((n, dim, dim))).to(dtype)
    b = torch.from_numpy(rng.standard_normal((n, dim))).to(dtype)
    th = torch.from_numpy(rng.standard_normal((n, dim))).to(dtype)
    return {"W": W, "b": b, "theta0": th}


def quadratic_loss(task: dict[str, Tensor], theta: Tensor) -> Tensor:
    return ((task["W"] @ theta - task["b"]) ** 2).sum()


def trajectory_loss(dyn: Dynamics, loss: Callable[[Tensor], Tensor], state: T.Leaves, steps: int,
                    start: int = 0, log: bool = False) -> tuple[Tensor, T.Leaves]:
    """Σ_{t=1}^{steps} loss(θ_t) along ``dyn`` from ``state`` (Eq. 3, w_t = 1), and the end state.
    ``log=True`` sums log loss(θ_t) instead (scale-free across tasks and along the trajectory)."""
    gfun = O.grad_y_fn(lambda xs, ys: loss(ys[0]))
    total = 0.0
    for k in range(start, start + steps):
        state, _ = unroll(dyn, lambda ys, kk: gfun((), ys), state, 1, start=k, track=False)
        v = loss(dyn.output(state)[0])
        total = total + (torch.log(v + 1e-12) if log else v)
    return total / steps, state


def run_optimizer(dyn: Dynamics, tasks: dict[str, Tensor], steps: int) -> Tensor:
    """Loss after every step for every task, (n, steps), without a graph (vmapped over tasks)."""

    def one(task):
        state = dyn.init((task["theta0"],))
        gfun = O.grad_y_fn(lambda xs, ys: quadratic_loss(task, ys[0]))
        out = []
        for k in range(steps):
            state, _ = unroll(dyn, lambda ys, kk: gfun((), ys), state, 1, start=k, track=False)
            out.append(quadratic_loss(task, dyn.output(state)[0]))
        return torch.stack(out)

    with torch.no_grad():
        return vmap(one)(tasks)


def meta_train_optimizer(x: dict[str, Any], dyn: LearnedUpdate, *, meta_steps: int,
                         meta_batch: int = 16, horizon: int = 100, unroll_steps: int = 20,
                         outer: Dynamics | None = None, seed: int = 0, dim: int = 10,
                         log: bool = True,
                         callback: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Truncated-BPTT meta-training of ``x = {"net": φ}``: each meta-step draws ``meta_batch`` fresh
    quadratics and runs ``horizon`` steps in windows of ``unroll_steps``, one outer step per window."""
    if horizon % unroll_steps:
        raise ConfigError(f"horizon ({horizon}) must be a multiple of unroll_steps ({unroll_steps})")
    outer = outer if outer is not None else Adam(lr=1e-3)
    xs, spec = T.flatten(x)
    ostate = outer.init(xs)
    t = 0
    for it in range(meta_steps):
        tasks = quadratic_tasks(meta_batch, dim, seed=seed * 1_000_003 + it, dtype=xs[0].dtype)
        states = vmap(lambda th: dyn.init((th,)))(tasks["theta0"])
        for w in range(horizon // unroll_steps):
            def window(x_, task, state, w=w):
                d = dyn.bind(x_)
                return trajectory_loss(d, lambda th: quadratic_loss(task, th), state, unroll_steps,
                                       start=w * unroll_steps, log=log)

            def mean_window(x_, states=states, tasks=tasks):
                losses, ends = vmap(window, in_dims=(None, 0, 0))(x_, tasks, states)
                return losses.mean(), (losses, ends)

            g, (losses, ends) = func_grad(mean_window, has_aux=True)(T.unflatten(xs, spec))
            gl = T.flatten(g)[0]
            new = outer.update(ostate, gl, t)
            xs, ostate = outer.output(new), new
            t += 1
            states = T.detach(ends)
            if callback is not None:
                callback(t, float(losses.mean()))
    return T.unflatten(xs, spec)


def tuned_sgd(train: dict[str, Tensor], steps: int,
              lrs: tuple[float, ...] = (1e-3, 2e-3, 5e-3, 1e-2, 1.5e-2, 2e-2, 3e-2, 5e-2),
              criterion: str = "median", momentum: float = 0.0) -> tuple[float, dict]:
    """The SGD step size with the lowest ``criterion`` ("median" or "mean") of the final loss on
    ``train`` tasks (grid search): tuned for the statistic it is compared on. ``momentum > 0``:
    heavy-ball SGD (``bl.inner.Momentum``) with that momentum."""
    from ..inner import GD, Momentum

    if criterion not in ("median", "mean"):
        raise ConfigError(f"criterion must be 'median' or 'mean', got {criterion!r}")
    scores = {}
    for lr in lrs:
        dyn = Momentum(lr=lr, momentum=momentum, steps=steps) if momentum else GD(lr=lr, steps=steps)
        last = run_optimizer(dyn, train, steps)[:, -1]
        final = last.median() if criterion == "median" else last.mean()
        scores[lr] = float(final) if torch.isfinite(final) else math.inf
    return min(scores, key=scores.get), scores


def compare(meta_steps: int = 40, meta_batch: int = 16, horizon: int = 100, unroll_steps: int = 20,
            hidden: int = 20, outer_lr: float = 1e-2, seed: int = 0, test_tasks: int = 500,
            skip: bool = False, callback: Callable[[int, float], None] | None = None
            ) -> dict[str, Any]:
    """Meta-train on random quadratics, tune SGD on other training quadratics (once for the
    median and once for the mean final loss; and heavy-ball SGD, momentum 0.9, for the median),
    and compare on ``test_tasks`` held-out quadratics
    (final loss after ``horizon`` steps: mean, median, fraction of tasks won; mean along the path)."""
    from ..inner import GD

    dyn = LearnedUpdate(steps=horizon)
    x0 = {"net": init_net(hidden, torch.Generator().manual_seed(seed), skip=skip)}
    x = meta_train_optimizer(x0, dyn, meta_steps=meta_steps, meta_batch=meta_batch,
                             horizon=horizon, unroll_steps=unroll_steps, outer=Adam(lr=outer_lr),
                             seed=seed, callback=callback)
    train = quadratic_tasks(128, seed=seed + 555)
    test = quadratic_tasks(test_tasks, seed=seed + 777)
    learned = run_optimizer(dyn.bind(x), test, horizon)
    out: dict[str, Any] = {"learned_final": float(learned[:, -1].mean()),
                           "learned_median_final": float(learned[:, -1].median()),
                           "learned_path": float(learned.mean())}
    from ..inner import Momentum

    runs = (("sgd_median_tuned", "median", 0.0), ("sgd_mean_tuned", "mean", 0.0),
            ("momentum_median_tuned", "median", 0.9))
    for key, crit, mom in runs:
        lr, scores = tuned_sgd(train, horizon, criterion=crit, momentum=mom)
        dyn = Momentum(lr=lr, momentum=mom, steps=horizon) if mom else GD(lr=lr, steps=horizon)
        sgd = run_optimizer(dyn, test, horizon)
        out[key] = {
            "lr": lr, "grid": scores, "final": float(sgd[:, -1].mean()),
            "median_final": float(sgd[:, -1].median()), "path": float(sgd.mean()),
            "learned_wins": float((learned[:, -1] < sgd[:, -1]).double().mean())}
    out["x"] = x
    return out


if __name__ == "__main__":  # python -m bilevel.meta.learned_optimizer [meta_steps]
    import sys

    torch.set_num_threads(1)
    out = compare(meta_steps=int(sys.argv[1]) if len(sys.argv) > 1 else 40,
                  callback=lambda t, v: print(f"window {t}: mean log-loss {v:.3f}", flush=True)
                  if t % 25 == 0 else None)
    out.pop("x")
    for k, v in out.items():
        print(f"{k}: {v}")
