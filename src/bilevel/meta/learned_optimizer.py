"""A learned optimizer: a coordinate-wise network as the inner update rule (Andrychowicz, Denil,
Gómez, Hoffman, Pfau, Schaul, Shillingford & de Freitas 2016, "Learning to learn by gradient
descent by gradient descent", Sec. 2, Eq. 1–3, Sec. 2.1 coordinatewise), meta-trained on a
distribution of tasks (the survey's Eq. 10–14: the rule's weights are the upper variable x, the
optimizee's parameters θ the lower variable y).

The rule (:class:`LearnedUpdate`) keeps per coordinate the running averages m_j of the gradient at
several timescales β_j and a running mean square v (as Adam); its MLP sees the scale-free inputs
(g, m_1, …, m_J)/ρ, ρ the running RMS, plus log ρ (instead of the paper's log/sign preprocessing,
App. A, which is kept as :func:`preprocess`); a linear path on the raw (g, m_j), gated per
coordinate by the MLP, makes SGD and heavy ball exactly representable with O(1) weights. The
initial rule is exactly SGD with a small step (``init_lr``).

Meta-training (:func:`meta_train_optimizer`) minimizes the mean log-loss along the trajectory
(Eq. 3 with w_t = 1, in log scale so that tasks of very different loss scales weigh alike) by
back-propagation through the unrolled steps (second order through ∇f), optionally truncated to
windows of ``unroll_steps`` with the state carried without a derivative (Sec. 3); tasks are
batched by ``torch.func.vmap``; the meta-gradient's norm is clipped. :class:`LearnedUpdate` is a
:class:`bilevel.inner.Dynamics` (``bind(x)`` takes φ = ``x["net"]``), so it also runs inside
``bl.hypergrad.Reverse`` (final-iterate meta-objective).

Task family (Sec. 3.1): random quadratics f(θ) = ‖Wθ − b‖², W ∈ R^{10×10}, b, θ0 ∈ R^{10} with
i.i.d. N(0, 1) entries (:func:`quadratic_tasks`). :func:`compare` is the protocol of
docs/metalearning.md: the learned rule against SGD, heavy ball and Adam, each tuned on the same
tuning tasks, on held-out tasks of another seed.
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

__all__ = ["LearnedUpdate", "init_net", "n_features", "preprocess", "quadratic_tasks",
           "quadratic_loss", "trajectory_loss", "meta_train_optimizer", "run_optimizer",
           "summarize", "baseline", "tune", "compare"]


def preprocess(v: Tensor, p: float = 10.0) -> Tensor:
    """App. A: (log|v|/p, sign v) if |v| ≥ e^{−p}, else (−1, e^p v); returns (..., 2)."""
    big = v.abs() >= math.exp(-p)
    a = torch.where(big, torch.log(v.abs().clamp_min(math.exp(-p))) / p, -torch.ones_like(v))
    b = torch.where(big, torch.sign(v), math.exp(p) * v)
    return torch.stack([a, b], -1)


def n_features(betas: tuple[float, ...]) -> int:
    """Inputs of the MLP per coordinate: g/ρ, m_j/ρ (one per β_j) and log(ρ)/10."""
    return len(betas) + 2


def init_net(hidden: int = 20, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32, *, betas: tuple[float, ...] = (0.5, 0.9, 0.99),
             init_lr: float = 0.005, lin_scale: float = 1.0) -> dict[str, Tensor]:
    """Weights of the rule (see :class:`LearnedUpdate`): the MLP n → hidden → hidden → 2 (tanh;
    uniform ±1/√fan-in, the last layer zero: additive output 0, gate 1), the linear path
    ``"skip"`` on the same normalized inputs (zero) and the linear path ``"lin"`` on the raw
    g, m_1, …, m_J: −init_lr/lin_scale on g, zero on the averages. So the untrained rule is
    exactly SGD with step ``init_lr``."""
    if not init_lr >= 0:
        raise ConfigError(f"init_lr must be >= 0, got {init_lr}")
    if not lin_scale > 0:
        raise ConfigError(f"lin_scale must be positive, got {lin_scale}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    nf = n_features(betas)
    sizes = [nf, hidden, hidden, 2]
    net = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        s = 1.0 / math.sqrt(a) if i < len(sizes) - 2 else 0.0
        net[f"{i}.weight"] = ((torch.rand(b, a, generator=g, dtype=torch.float64) * 2 - 1) * s).to(dtype)
        net[f"{i}.bias"] = torch.zeros(b, dtype=dtype)
    net["skip"] = torch.zeros(nf, dtype=dtype)
    lin = torch.zeros(len(betas) + 1, dtype=dtype)
    lin[0] = -init_lr / lin_scale
    net["lin"] = lin
    return net


def _mlp(net: dict[str, Tensor], h: Tensor) -> tuple[Tensor, Tensor]:
    """The MLP's two outputs per coordinate: the additive step (plus the linear skip) and the
    gain 2σ(·) ∈ (0, 2) of the raw linear path (1 at the zero initialization)."""
    n = sum(1 for k in net if k.endswith(".weight"))
    h0 = h
    for i in range(n):
        h = h @ net[f"{i}.weight"].T + net[f"{i}.bias"]
        if i < n - 1:
            h = torch.tanh(h)
    return h[..., 0] + h0 @ net["skip"], 2 * torch.sigmoid(h[..., 1])


class LearnedUpdate(Dynamics):
    """A coordinate-wise learned rule with scale-invariant inputs and a linear path:

        m_j ← β_j m_j + (1 − β_j) g   (j = 1..J),     v ← β₂ v + (1 − β₂) g²,
        ρ = sqrt(v / (1 − β₂^{k+1}) + ε),   u = (g/ρ, m_1/ρ, …, m_J/ρ, log(ρ)/10),
        (a, b) = MLP_φ(u),   θ ← θ + s · (a + w_skip · u) + c · 2σ(b) · w_lin · (g, m_1, …, m_J),

    φ = {MLP weights, w_skip, w_lin} bound from ``x["net"]``. The MLP sees only bounded,
    gradient-scale-free inputs (Adam-style: the running RMS ρ; log ρ keeps the scale visible
    in a bounded form); the linear raw path c · w_lin, gated per coordinate by 2σ(b), makes SGD
    (w_lin on g) and heavy ball (w_lin on m_j: θ ← θ − η Σ β^i g with η = −c w_lin (1 − β))
    exactly representable with O(1) weights. s = ``scale`` (0.1, the paper's output scale),
    c = ``lin_scale``."""

    def __init__(self, steps: int = 100, *, betas: tuple[float, ...] = (0.5, 0.9, 0.99),
                 beta2: float = 0.99, scale: float = 0.1, lin_scale: float = 1.0,
                 eps: float = 1e-12, net: dict[str, Tensor] | None = None):
        super().__init__(lr=scale, steps=steps)
        betas = tuple(float(b) for b in betas)
        if not betas or any(not 0 <= b < 1 for b in betas):
            raise ConfigError(f"betas must be a non-empty tuple of values in [0, 1), got {betas}")
        if not 0 <= beta2 < 1:
            raise ConfigError(f"beta2 must be in [0, 1), got {beta2}")
        for name, v in (("scale", scale), ("lin_scale", lin_scale), ("eps", eps)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        self.betas, self.beta2 = betas, float(beta2)
        self.scale, self.lin_scale, self.eps, self.net = float(scale), float(lin_scale), float(eps), net
        self.slots = len(betas) + 2  # θ, m_1..m_J, v

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
        nf = n_features(self.betas)
        if self.net["skip"].shape != (nf,) or self.net["lin"].shape != (nf - 1,):
            raise ConfigError(f"the network was built for other betas: skip {tuple(self.net['skip'].shape)}"
                              f", lin {tuple(self.net['lin'].shape)}; expected ({nf},), ({nf - 1},) "
                              f"for betas={self.betas} (init_net(betas=...))")
        parts = self.split(state)
        y, ms, v = parts[0], parts[1:-1], parts[-1]
        ms = [tuple(b * mi + (1 - b) * gi for mi, gi in zip(m, grad)) for b, m in zip(self.betas, ms)]
        v = tuple(self.beta2 * vi + (1 - self.beta2) * gi * gi for vi, gi in zip(v, grad))
        c2 = 1 - self.beta2 ** (k + 1)
        new_y = []
        for i, (yi, gi, vi) in enumerate(zip(y, grad, v)):
            rho = torch.sqrt(vi / c2 + self.eps)
            raw = torch.stack([gi] + [m[i] for m in ms], -1)
            u = torch.cat([raw / rho[..., None], (torch.log(rho) / 10)[..., None]], -1)
            add, gain = _mlp(self.net, u)
            step = self.scale * add + self.lin_scale * gain * (raw @ self.net["lin"])
            new_y.append(yi + step)
        out = self.project(tuple(new_y))
        for m in ms:
            out = out + m
        return out + v


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
                         log: bool = True, clip: float | None = 1.0, reset_above: float = 1e6,
                         callback: Callable[[int, float], None] | None = None,
                         on_meta_step: Callable[[int, dict[str, Any]], None] | None = None,
                         stats: dict[str, int] | None = None) -> dict[str, Any]:
    """Truncated-BPTT meta-training of ``x = {"net": φ}``: each meta-step draws ``meta_batch`` fresh
    quadratics and runs ``horizon`` steps in windows of ``unroll_steps``, one outer step per window
    on the window's mean (log-)loss.

    ``clip``: the meta-gradient's global norm is clipped to this value (None: no clipping).
    A task whose carried state is non-finite or whose loss exceeds ``reset_above`` × its initial
    loss at a window's end restarts from its θ0 (a diverged trajectory would otherwise poison
    every later window with inf/NaN); a window whose meta-gradient is non-finite makes no outer
    step. ``stats`` (a dict, filled in) counts ``resets`` and ``skipped`` windows.
    ``on_meta_step(i, x)`` is called after every meta-step with the current x."""
    if horizon % unroll_steps:
        raise ConfigError(f"horizon ({horizon}) must be a multiple of unroll_steps ({unroll_steps})")
    if clip is not None and not clip > 0:
        raise ConfigError(f"clip must be positive or None, got {clip}")
    outer = outer if outer is not None else Adam(lr=1e-3)
    xs, spec = T.flatten(x)
    ostate = outer.init(xs)
    stats = stats if stats is not None else {}
    stats.setdefault("resets", 0)
    stats.setdefault("skipped", 0)
    t = 0
    for it in range(meta_steps):
        tasks = quadratic_tasks(meta_batch, dim, seed=seed * 1_000_003 + it, dtype=xs[0].dtype)
        start = vmap(lambda th: dyn.init((th,)))(tasks["theta0"])
        loss0 = vmap(quadratic_loss)(tasks, tasks["theta0"])
        states = start
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
            norm = torch.sqrt(sum((gi * gi).sum() for gi in gl))
            if torch.isfinite(norm):
                if clip is not None:  # clip the meta-gradient's global norm (exploding unrolls)
                    gl = tuple(gi * torch.clamp(clip / (norm + 1e-30), max=1.0) for gi in gl)
                new = outer.update(ostate, gl, t)
                xs, ostate = outer.output(new), new
                t += 1
            else:
                stats["skipped"] += 1
            ends = T.detach(ends)
            last = vmap(quadratic_loss)(tasks, dyn.output(ends)[0])
            ok = torch.isfinite(last) & (last <= reset_above * loss0)
            for e in ends:
                ok = ok & torch.isfinite(e.reshape(e.shape[0], -1)).all(1)
            stats["resets"] += int((~ok).sum())
            states = tuple(torch.where(ok.reshape((-1,) + (1,) * (e.dim() - 1)), e, s0)
                           for e, s0 in zip(ends, start))
            if callback is not None:
                callback(t, float(losses.mean()))
        if on_meta_step is not None:
            on_meta_step(it + 1, T.unflatten(xs, spec))
    return T.unflatten(xs, spec)


def summarize(losses: Tensor, loss0: Tensor) -> dict[str, float]:
    """Final-loss statistics of (n, steps) loss curves: median, mean, and ``diverged`` (tasks whose
    final loss is non-finite or above their initial loss ``loss0``)."""
    last = losses[:, -1]
    bad = ~torch.isfinite(last) | (last > loss0)
    return {"median_final": float(last.median()), "mean_final": float(last.mean()),
            "diverged": int(bad.sum()), "tasks": int(last.numel())}


#: the baselines' grids (step sizes; heavy ball also over its momentum)
SGD_GRID = (1e-3, 2e-3, 5e-3, 1e-2, 1.5e-2, 2e-2, 2.5e-2, 3e-2, 5e-2)
MOMENTUM_GRID = tuple((lr, mom) for mom in (0.5, 0.8, 0.9, 0.95)
                      for lr in (2e-3, 5e-3, 1e-2, 2e-2, 3e-2, 4e-2, 5e-2))
ADAM_GRID = (1e-2, 3e-2, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0)


def baseline(name: str, setting: Any, steps: int) -> Dynamics:
    """``"sgd"`` (step), ``"momentum"`` ((step, momentum), heavy ball) or ``"adam"`` (step)."""
    from ..inner import GD, Momentum

    if name == "sgd":
        return GD(lr=setting, steps=steps)
    if name == "momentum":
        return Momentum(lr=setting[0], momentum=setting[1], steps=steps)
    if name == "adam":
        return Adam(lr=setting, steps=steps)
    raise ConfigError(f"unknown baseline {name!r}; expected 'sgd', 'momentum' or 'adam'")


def tune(name: str, grid: tuple, tune_tasks: dict[str, Tensor], test_tasks: dict[str, Tensor],
         steps: int) -> dict[str, Any]:
    """Grid search of a baseline for the median final loss on ``tune_tasks`` (ties and
    non-finite medians: the first finite best); every setting's test statistics are reported too,
    but only the tuning median picks ``best``."""
    l0_tune = vmap(quadratic_loss)(tune_tasks, tune_tasks["theta0"])
    l0_test = vmap(quadratic_loss)(test_tasks, test_tasks["theta0"])
    rows = []
    for setting in grid:
        dyn = baseline(name, setting, steps)
        tu = summarize(run_optimizer(dyn, tune_tasks, steps), l0_tune)
        te = summarize(run_optimizer(dyn, test_tasks, steps), l0_test)
        score = tu["median_final"] if math.isfinite(tu["median_final"]) else math.inf
        rows.append({"setting": setting, "tune_median": score, "tune_diverged": tu["diverged"],
                     **{f"test_{k}": v for k, v in te.items()}})
    best = min(rows, key=lambda r: r["tune_median"])
    return {"best": best, "grid": rows}


def compare(meta_steps: int = 150, meta_batch: int = 32, horizon: int = 100,
            unroll_steps: int = 100, hidden: int = 20, outer_lr: float = 1e-2,
            lr_decay: float = 0.1, lin_scale: float = 1.0, init_lr: float = 0.005,
            clip: float | None = 1.0, select_every: int = 10, seed: int = 0,
            tune_tasks: int = 128, test_tasks: int = 500, dim: int = 10,
            dtype: torch.dtype = torch.float64,
            callback: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """The protocol of docs/metalearning.md: meta-train the rule on fresh random quadratics
    (``meta_steps`` × ``meta_batch`` tasks, seeds ``seed·1000003 + i``), outer Adam with step
    ``outer_lr`` decayed geometrically to ``lr_decay·outer_lr``; every ``select_every`` meta-steps
    the rule is scored by its median final loss on ``tune_tasks`` tuning quadratics and the best
    checkpoint is kept. SGD, heavy ball and Adam are grid-searched on the same tuning tasks for
    the same statistic. Everything is then run on ``test_tasks`` held-out quadratics (another
    seed) for ``horizon`` steps; reported: median / mean final loss, diverged tasks, and the
    fraction of test tasks on which the learned rule ends below tuned SGD."""
    import time

    from ..inner import PerStep

    if select_every < 1:
        raise ConfigError(f"select_every must be >= 1, got {select_every}")
    dyn = LearnedUpdate(steps=horizon, lin_scale=lin_scale)
    x0 = {"net": init_net(hidden, torch.Generator().manual_seed(seed), dtype, init_lr=init_lr,
                          lin_scale=lin_scale)}
    tune_set = quadratic_tasks(tune_tasks, dim, seed=seed + 555, dtype=dtype)
    test_set = quadratic_tasks(test_tasks, dim, seed=seed + 777, dtype=dtype)
    l0_tune = vmap(quadratic_loss)(tune_set, tune_set["theta0"])
    l0_test = vmap(quadratic_loss)(test_set, test_set["theta0"])

    def score(x):
        return summarize(run_optimizer(dyn.bind(x), tune_set, horizon), l0_tune)["median_final"]

    best = {"score": score(x0), "x": x0, "meta_step": 0}
    curve: list[tuple[int, float]] = [(0, best["score"])]

    def select(i, x):
        if i % select_every == 0 or i == meta_steps:
            v = score(x)
            curve.append((i, v))
            if math.isfinite(v) and v < best["score"]:
                best.update(score=v, x=x, meta_step=i)

    windows = meta_steps * (horizon // unroll_steps)
    outer = Adam(lr=PerStep(lambda k: outer_lr * lr_decay ** (k / max(windows - 1, 1))))
    stats: dict[str, int] = {}
    t0 = time.perf_counter()
    meta_train_optimizer(x0, dyn, meta_steps=meta_steps, meta_batch=meta_batch, horizon=horizon,
                         unroll_steps=unroll_steps, outer=outer, seed=seed, dim=dim, clip=clip,
                         callback=callback, on_meta_step=select, stats=stats)
    seconds = time.perf_counter() - t0
    x = best["x"]
    learned = run_optimizer(dyn.bind(x), test_set, horizon)
    out: dict[str, Any] = {
        "learned": {**summarize(learned, l0_test), "meta_step": best["meta_step"],
                    "tune_median": best["score"]},
        "untrained": summarize(run_optimizer(dyn.bind(x0), test_set, horizon), l0_test),
        "selection_curve": curve, "train_seconds": seconds, "init_lr": init_lr, **stats}
    for name, grid in (("sgd", SGD_GRID), ("momentum", MOMENTUM_GRID), ("adam", ADAM_GRID)):
        out[name] = tune(name, grid, tune_set, test_set, horizon)
    sgd = run_optimizer(baseline("sgd", out["sgd"]["best"]["setting"], horizon), test_set, horizon)
    out["learned"]["wins_vs_sgd"] = float((learned[:, -1] < sgd[:, -1]).double().mean())
    out["x"] = x
    return out


def _table(out: dict[str, Any]) -> str:
    """The markdown rows of docs/metalearning.md from :func:`compare`'s result."""
    rows = ["| optimizer (setting tuned on the tuning tasks) | median final loss | mean final loss "
            "| diverged / tasks |", "|---|---|---|---|"]

    def row(name, r, pre="test_"):
        rows.append(f"| {name} | {r[pre + 'median_final']:.4g} | {r[pre + 'mean_final']:.4g} | "
                    f"{r[pre + 'diverged']} / {r[pre + 'tasks']} |")

    for key, label in (("sgd", "SGD, step"), ("momentum", "heavy ball, (step, momentum)"),
                       ("adam", "Adam, step")):
        row(f"{label} {out[key]['best']['setting']}", out[key]["best"])
    lr = out["learned"]
    row(f"**learned** (checkpoint of meta-step {lr['meta_step']}; beats tuned SGD on "
        f"{100 * lr['wins_vs_sgd']:.0f}% of tasks)", lr, "")
    row(f"learned rule before meta-training (= SGD {out['init_lr']})", out["untrained"], "")
    rows.append("")
    rows.append("| SGD step | tuning median | test median | test diverged |")
    rows.append("|---|---|---|---|")
    for r in out["sgd"]["grid"]:
        rows.append(f"| {r['setting']} | {r['tune_median']:.4g} | {r['test_median_final']:.4g} | "
                    f"{r['test_diverged']} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m bilevel.meta.learned_optimizer [key=value ...]
    import inspect
    import sys

    torch.set_num_threads(1)
    defaults = {k: p.default for k, p in inspect.signature(compare).parameters.items()
                if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)}
    kw: dict[str, Any] = {}
    for arg in sys.argv[1:]:
        key, _, val = arg.partition("=")
        if key not in defaults:
            raise SystemExit(f"unknown setting {key!r}; settings: {', '.join(defaults)}")
        kw[key] = type(defaults[key])(val)
    out = compare(**kw, callback=lambda t, v: print(f"window {t}: mean log-loss {v:.3f}", flush=True)
                  if t % 25 == 0 else None)
    print(f"settings {kw}; meta-training {out['train_seconds']:.0f} s, resets {out['resets']}, "
          f"skipped {out['skipped']}, selection curve (meta-step, tuning median) "
          f"{[(i, round(v, 4)) for i, v in out['selection_curve']]}")
    print(_table(out))
