"""Whole-iteration eager overhead (issue 9 item 2): each solver's outer iteration against a
hand-written loop of bare ``torch.autograd.grad`` calls doing the same iteration.

    python -m bilevel.bench stochastic --whole-iteration [--solvers StocBiO,BSA] [--iters 60]
    python -m bilevel.bench stochastic --whole-iteration --against OLD/src --rounds 3   (before / after)

For every solver :class:`Bare` subclass below writes one outer iteration with nothing but the
problem's own ``f`` / ``g`` and ``torch.autograd.grad``: the same oracle calls on the same batches
(its own samplers, seeded like the solver's, drawn in the same order), the same random truncation
index, the same updates — ``tests/bench/test_whole_iteration.py`` checks in float64 on a tiny problem
that both produce the same iterates. Differences a hand-written loop would make: an HVP
differentiates with respect to y only (x is not a graph input), the two same-sample evaluations of
a STORM / SPIDER recursion (MRBO, VRBO, SUSTAIN) are two plain calls, no finiteness checks, no
residual norms, no counting.

Timing (:func:`whole_iteration`): ``bl.solve`` runs the solver; after every outer step its callback
runs one bare iteration (the same step index, the same batches), so the two alternate in one process
and see the same machine state. Measured in CPU seconds of the process (a loaded machine inflates
the wall clock, not this): *step* = the solver's ``prepare`` + ``step`` only; *solve* = everything
``bl.solve`` does per iteration between two callbacks (step, counting, sampler positions, state
copy, finiteness check, history record); *bare* = the bare iteration. Ratios: the median over the
iterations of the per-iteration ratio ours / bare (both did the same work at that step: BSA's random
truncation draws the same p in both) — robust to load drifting between iterations — the ratio
of the medians, and the ratio of the totals (*solve ÷ bare, totals*: work ``bl.solve`` does only
every few steps — the batched finiteness check of small CPU iterates, every 16th step by default —
lands in one iteration, which a median under-weights; the totals count it in full).

This file imports only what every bilevel version since the stochastic benchmark has, so it can
time an older checkout too: ``--against OLD/src`` runs it as a script in fresh processes with
``PYTHONPATH=OLD/src`` and with this checkout's sources, alternately (:func:`against`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import bilevel as bl
from bilevel.bench.stochastic.measure import _with_steps
from bilevel.bench.stochastic.problem import _problem_config, build_problem, solver_from_config

__all__ = ["Bare", "BARE", "whole_iteration", "bare_for", "main"]

_grad = torch.autograd.grad

try:
    from bilevel._rng import index as _index  # the solvers' stateless truncation draw
except ImportError:  # an older checkout (--against): its BSA / TTSA drew from random.Random(seed)
    _index = None


def _truncation(s: Any) -> Callable[[int], int]:
    """t -> the random truncation index p_t ~ U{0..Q−1} that ``s`` (BSA / TTSA) draws at step t."""
    if _index is not None:
        return lambda t: _index(s.seed, t, s.Q)
    rng = random.Random(s.seed)
    return lambda t: rng.randrange(s.Q)


# --- bare oracle calls (what a hand-written loop writes) -------------------------------------------
def _z(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def grad_y(g: Callable, x: torch.Tensor, y: torch.Tensor, b: Any) -> torch.Tensor:
    """∇_y g(x, y; b)."""
    yr = _leaf(y)
    return _grad(g(x, yr, b), yr)[0]


def grads(f: Callable, x: torch.Tensor, y: torch.Tensor, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇_x f, ∇_y f) from one backward."""
    xr, yr = _leaf(x), _leaf(y)
    gx, gy = _grad(f(xr, yr, b), (xr, yr), allow_unused=True)
    return _z(gx, x), _z(gy, y)


def grad_x(f: Callable, x: torch.Tensor, y: torch.Tensor, b: Any) -> torch.Tensor:
    """∇_x f at fixed y (zeros when f does not depend on x)."""
    xr = _leaf(x)
    out = f(xr, y, b)
    return _z(_grad(out, xr, allow_unused=True)[0], x) if out.requires_grad else torch.zeros_like(x)


def hvp(g: Callable, x: torch.Tensor, y: torch.Tensor, b: Any, v: torch.Tensor) -> torch.Tensor:
    """∇²_yy g v (x not a graph input)."""
    yr = _leaf(y)
    (gy,) = _grad(g(x, yr, b), yr, create_graph=True)
    return _grad(gy, yr, v)[0]


def cross(g: Callable, x: torch.Tensor, y: torch.Tensor, b: Any, v: torch.Tensor) -> torch.Tensor:
    """∇²_xy g v."""
    xr, yr = _leaf(x), _leaf(y)
    (gy,) = _grad(g(xr, yr, b), yr, create_graph=True)
    return _z(_grad(gy, xr, v, allow_unused=True)[0], x)


def _lr(s: Any) -> Callable[[int], float]:
    """A step size c / (t + t0)^e as a plain closure (from the solver's schedule's numbers)."""
    c, e, t0 = float(s.c), float(s.e), float(s.t0)
    return (lambda t: c / (t + t0) ** e) if e else (lambda t: c)


def _weight(s: Any) -> Callable[[int], float]:
    lr = _lr(s)
    return lambda t: min(1.0, max(0.0, lr(t)))


# --- the bare iterations ---------------------------------------------------------------------------
class Bare:
    """One outer iteration of a solver in bare autograd. ``f``, ``g``: the problem's objectives
    (x, y, batch) -> scalar; ``lo``, ``up``: samplers seeded like the solver's; ``solver``: the
    configured solver (its hyperparameters are read once, here)."""

    def __init__(self, f: Callable, g: Callable, x0: torch.Tensor, y0: torch.Tensor, lo: Any, up: Any,
                 solver: Any):
        self.f, self.g, self.lo, self.up = f, g, lo, up
        self.x, self.y = x0.detach().clone(), y0.detach().clone()
        upper = getattr(solver, "upper", None)
        sched = getattr(upper, "schedule", None)
        if sched is None:  # a bl.inner.GD(lr=c) rule
            sched = bl.estimates.Schedule(float(upper.lr)) if hasattr(upper, "lr") else solver.lr_x
        self.lr_x = _lr(sched)
        self.setup(solver)

    def setup(self, s: Any) -> None:
        raise NotImplementedError

    def step(self, t: int) -> None:
        raise NotImplementedError

    def inner(self, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        for _ in range(steps):
            y = torch.add(y, grad_y(self.g, x, y, self.lo.next()), alpha=-lr)
        return y

    def neumann(self, x: torch.Tensor, y: torch.Tensor, gy: torch.Tensor, Q: int, eta: float,
                Gs: Sequence[Any] | None = None) -> torch.Tensor:
        """v = η Σ_{q=0}^{Q} (I − ηH)^q ∇_y F as the recursion v ← v − η (H v − ∇_y F), v₀ = η ∇_y F;
        a fresh batch per product (or the given ones)."""
        v = gy * eta
        for q in range(Q):
            b = self.lo.next() if Gs is None else Gs[q]
            v = torch.add(v, hvp(self.g, x, y, b, v) - gy, alpha=-eta)
        return v

    def descend(self, x: torch.Tensor, y: torch.Tensor, t: int,
                v_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The upper step of the Neumann-type double loops: (∇_x F, ∇_y F) on an upper batch,
        v = v_of(∇_y F), Jᵀv on a lower batch, x ← x − α_t (∇_x F − Jᵀv); y is kept."""
        gx, gy = grads(self.f, x, y, self.up.next())
        v = v_of(gy)  # (its lower batches are drawn before the cross product's)
        jv = cross(self.g, x, y, self.lo.next(), v)
        self.x, self.y = torch.add(x, gx - jv, alpha=-self.lr_x(t)), y

    def sampled(self, x: torch.Tensor, y: torch.Tensor, gy: torch.Tensor, p: int, Q: int, eta: float,
                Gs: Sequence[Any] | None = None) -> torch.Tensor:
        """v = η Q Π_{i=1}^{p} (I − ηH_i) ∇_y F."""
        v = gy
        for i in range(p):
            b = self.lo.next() if Gs is None else Gs[i]
            v = torch.add(v, hvp(self.g, x, y, b, v), alpha=-eta)
        return v * (eta * Q)


class StocBiO(Bare):
    def setup(self, s):
        self.T, self.Q, self.eta, self.lr_y = s.inner_steps, s.Q, s.eta, _lr(s.lr_y)
        if s.neumann != "fresh":
            raise NotImplementedError("the bare stocBiO loop is the fresh-batch estimator")

    def step(self, t):
        x = self.x
        y = self.inner(x, self.y, self.T, self.lr_y(t))
        self.descend(x, y, t, lambda gy: self.neumann(x, y, gy, self.Q, self.eta))


class BSA(Bare):
    def setup(self, s):
        self.T, self.Q, self.eta, self.lr_y = s.inner_steps, s.Q, s.eta, _lr(s.lr_y)
        self.draw = _truncation(s)

    def step(self, t):
        p = self.draw(t)
        x = self.x
        y = self.inner(x, self.y, self.T, self.lr_y(t))
        self.descend(x, y, t, lambda gy: self.sampled(x, y, gy, p, self.Q, self.eta))


class TTSA(Bare):
    def setup(self, s):
        self.Q, self.eta, self.lr_y = s.Q, s.eta, _lr(s.lr_y)
        self.draw = _truncation(s)

    def step(self, t):
        p = self.draw(t)
        x = self.x
        y = torch.add(self.y, grad_y(self.g, x, self.y, self.lo.next()), alpha=-self.lr_y(t))
        self.descend(x, y, t, lambda gy: self.sampled(x, y, gy, p, self.Q, self.eta))


class AmIGO(Bare):
    def setup(self, s):
        self.T, self.M, self.lr_y, self.lr_v = s.inner_steps, s.v_steps, _lr(s.lr_y), _lr(s.lr_v)
        self.v = torch.zeros_like(self.y)

    def step(self, t):
        x = self.x
        y = self.inner(x, self.y, self.T, self.lr_y(t))
        gx, b = grads(self.f, x, y, self.up.next())
        v, lr_v = self.v, self.lr_v(t)
        for _ in range(self.M):
            v = torch.add(v, hvp(self.g, x, y, self.lo.next(), v) - b, alpha=-lr_v)
        jv = cross(self.g, x, y, self.lo.next(), v)
        self.x, self.y, self.v = torch.add(x, gx - jv, alpha=-self.lr_x(t)), y, v


class SOBA(Bare):
    def setup(self, s):
        self.lr_y, self.lr_v = _lr(s.lr_y), _lr(s.lr_v)
        self.v = torch.zeros_like(self.y)

    def oracles(self, bG: Any, bF: Any) -> tuple[torch.Tensor, ...]:
        """∇_y G, H v and ∇²_xy G v from one gradient with graph + one backward; ∇_x F, ∇_y F."""
        x, y, v = self.x, self.y, self.v
        xr, yr = _leaf(x), _leaf(y)
        (gy,) = _grad(self.g(xr, yr, bG), yr, create_graph=True)
        jv, hv = _grad(gy, (xr, yr), v, allow_unused=True)
        gxF, gyF = grads(self.f, x, y, bF)
        return gy.detach(), hv, _z(jv, x), gxF, gyF

    def step(self, t):
        gy, hv, jv, gxF, gyF = self.oracles(self.lo.next(), self.up.next())
        self.update(t, gy, hv - gyF, gxF - jv)

    def update(self, t: int, d_y: torch.Tensor, d_v: torch.Tensor, d_x: torch.Tensor) -> None:
        self.x, self.y, self.v = (torch.add(self.x, d_x, alpha=-self.lr_x(t)),
                                  torch.add(self.y, d_y, alpha=-self.lr_y(t)),
                                  torch.add(self.v, d_v, alpha=-self.lr_v(t)))


class SABA(SOBA):
    """SAGA memories over the samplers' fixed partitions (``last_index``), starting at zero."""

    def setup(self, s):
        super().setup(s)
        if s.init_memory != "zero":
            raise NotImplementedError("the bare SABA loop starts its memories at zero")
        n, m = self.lo.n_batches, self.up.n_batches
        self.mem = {k: ([torch.zeros_like(like)] * cnt, torch.zeros_like(like), cnt)
                    for k, like, cnt in (("gy", self.y, n), ("hv", self.y, n), ("jv", self.x, n),
                                         ("gxF", self.x, m), ("gyF", self.y, m))}

    def saga(self, key: str, i: int, g: torch.Tensor) -> torch.Tensor:
        table, mean, n = self.mem[key]
        diff = g - table[i]
        table[i] = g
        self.mem[key] = (table, torch.add(mean, diff, alpha=1.0 / n), n)
        return diff + mean

    def step(self, t):
        bG, bF = self.lo.next(), self.up.next()
        i, j = self.lo.last_index, self.up.last_index
        gy, hv, jv, gxF, gyF = self.oracles(bG, bF)
        d_y = self.saga("gy", i, gy)
        d_v = self.saga("hv", i, hv) - self.saga("gyF", j, gyF)
        d_x = self.saga("gxF", j, gxF) - self.saga("jv", i, jv)
        self.update(t, d_y, d_v, d_x)


class FSLA(Bare):
    def setup(self, s):
        self.lr_y, self.lr_v, self.a = _lr(s.lr_y), _lr(s.lr_v), _weight(s.momentum)
        self.v, self.d, self.prev = torch.zeros_like(self.y), None, None

    def step(self, t):
        x, v = self.x, self.v
        y = torch.add(self.y, grad_y(self.g, x, self.y, self.lo.next()), alpha=-self.lr_y(t))
        b2, bF = self.lo.next(), self.up.next()
        xr, yr = _leaf(x), _leaf(y)
        (gyG,) = _grad(self.g(xr, yr, b2), yr, create_graph=True)
        gxF, gyF = grads(self.f, x, y, bF)
        hv = _grad(gyG, yr, v, retain_graph=True)[0]
        v_new = torch.add(v, hv - gyF, alpha=-self.lr_v(t))
        nu = gxF - _z(_grad(gyG, xr, v_new, allow_unused=True)[0], x)
        if self.d is None:
            d = nu
        else:
            xp, yp, vp = self.prev
            nu_old = grad_x(self.f, xp, yp, bF) - cross(self.g, xp, yp, b2, vp)
            d = torch.add(nu, self.d - nu_old, alpha=1.0 - self.a(t))
        self.prev, self.d = (x, y, v_new), d
        self.x, self.y, self.v = torch.add(x, d, alpha=-self.lr_x(t)), y, v_new


class MRBO(Bare):
    def setup(self, s):
        self.Q, self.eta, self.lr_y = s.Q, s.eta, _lr(s.lr_y)
        self.a_x, self.a_y = _weight(s.momentum_x), _weight(s.momentum_y)
        self.u = self.v = self.xp = self.yp = None

    def draw(self) -> tuple:
        return self.up.next(), [self.lo.next() for _ in range(self.Q + 1)]

    def hypergradient(self, x, y, samples) -> torch.Tensor:
        bF, Gs = samples
        gx, gy = grads(self.f, x, y, bF)
        v = self.neumann(x, y, gy, self.Q, self.eta, Gs[1:])
        return gx - cross(self.g, x, y, Gs[0], v)

    def step(self, t):
        x, y = self.x, self.y
        by = self.lo.next()
        samples = self.draw()
        if self.u is None:
            u, v = grad_y(self.g, x, y, by), self.hypergradient(x, y, samples)
        else:  # the two points of each STORM term on the same samples: two plain evaluations
            gy, gy_prev = grad_y(self.g, x, y, by), grad_y(self.g, self.xp, self.yp, by)
            hg, hg_prev = self.hypergradient(x, y, samples), self.hypergradient(self.xp, self.yp, samples)
            u = torch.add(gy, self.u - gy_prev, alpha=1.0 - self.a_y(t))
            v = torch.add(hg, self.v - hg_prev, alpha=1.0 - self.a_x(t))
        self.xp, self.yp, self.u, self.v = x, y, u, v
        self.x, self.y = torch.add(x, v, alpha=-self.lr_x(t)), torch.add(y, u, alpha=-self.lr_y(t))


class SUSTAIN(MRBO):
    def setup(self, s):
        super().setup(s)
        self.gen = torch.Generator().manual_seed(s.seed)
        self.p = 0

    def draw(self) -> tuple:
        self.p = int(torch.randint(self.Q, (1,), generator=self.gen))
        return self.up.next(), [self.lo.next() for _ in range(self.p + 1)]

    def hypergradient(self, x, y, samples) -> torch.Tensor:
        bF, Gs = samples
        gx, gy = grads(self.f, x, y, bF)
        v = self.sampled(x, y, gy, self.p, self.Q, self.eta, Gs[1:])
        return gx - cross(self.g, x, y, Gs[0], v)


class VRBO(Bare):
    def setup(self, s):
        if s.large_batches is not None:
            raise NotImplementedError("the bare VRBO loop restarts on the full data")
        self.Q, self.eta, self.lr_y, self.m, self.period = s.Q, s.eta, _lr(s.lr_y), s.inner_steps, s.period
        self.u = self.v = self.anchor = None

    def hypergradient(self, x, y, bF, Gs) -> torch.Tensor:
        gx, gy = grads(self.f, x, y, bF)
        v = self.neumann(x, y, gy, self.Q, self.eta, Gs[1:])
        return gx - cross(self.g, x, y, Gs[0], v)

    def step(self, t):
        x, y = self.x, self.y
        if t % self.period == 0 or self.u is None:  # restart on the full data
            bF, bG = self.up.full(), self.lo.full()
            self.u = grad_y(self.g, x, y, bG)
            self.v = self.hypergradient(x, y, bF, [bG] * (self.Q + 1))
            self.anchor = (x, y)
        u, v = self.u, self.v
        x_new = torch.add(x, v, alpha=-self.lr_x(t))
        (xp, yp), yt, beta = self.anchor, y, self.lr_y(t)
        for _ in range(self.m):
            bF = self.up.next()
            Gs = [self.lo.next() for _ in range(self.Q + 2)]
            hg, hg_prev = (self.hypergradient(x_new, yt, bF, Gs[:-1]),
                           self.hypergradient(xp, yp, bF, Gs[:-1]))
            gy, gy_prev = grad_y(self.g, x_new, yt, Gs[-1]), grad_y(self.g, xp, yp, Gs[-1])
            v, u = v + (hg - hg_prev), u + (gy - gy_prev)
            xp, yp = x_new, yt
            yt = torch.add(yt, u, alpha=-beta)
        self.x, self.y, self.u, self.v, self.anchor = x_new, yt, u, v, (xp, yp)


#: solver class name -> its bare iteration
BARE: dict[str, type[Bare]] = {c.__name__: c for c in (StocBiO, BSA, SOBA, SABA, MRBO, VRBO, TTSA, AmIGO,
                                                        FSLA, SUSTAIN)}


def bare_for(solver: Any, f: Callable, g: Callable, x0: torch.Tensor, y0: torch.Tensor, lo: Any,
             up: Any) -> Bare:
    """The bare iteration of ``solver`` (by its class name) on its own samplers ``lo``, ``up``."""
    name = type(solver).__name__
    if name not in BARE:
        raise KeyError(f"no bare iteration for {name}; have {', '.join(BARE)}")
    return BARE[name](f, g, x0, y0, lo, up, solver)


# --- timing ----------------------------------------------------------------------------------------
class _StepTimed(bl.solvers.Solver):
    """The solver with ``prepare`` + ``step`` timed in CPU seconds (every hook forwarded)."""

    def __init__(self, solver: Any):
        self.solver, self.cpu, self._t0 = solver, [], 0.0
        self.carries_buffers = getattr(solver, "carries_buffers", False)

    def init(self, ctx, xs, ys):
        return self.solver.init(ctx, xs, ys)

    def setup(self, ctx, state):
        self.solver.setup(ctx, state)

    def prepare(self, state, t):
        self._t0 = time.process_time()
        prep = getattr(self.solver, "prepare", None)
        if prep is not None:
            prep(state, t)

    def phase(self, state, t):
        ph = getattr(self.solver, "phase", None)
        return None if ph is None else ph(state, t)

    def step(self, ctx, state, t):
        out = self.solver.step(ctx, state, t)
        self.cpu.append(time.process_time() - self._t0)
        return out

    def output(self, state):
        return self.solver.output(state)

    def lower_pair(self, state):
        return self.solver.lower_pair(state)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def time_solver(prob: Any, name: str, scfg: dict[str, Any], *, steps: int, iters: int, warmup: int,
                batch_size: int, max_seconds: float = math.inf) -> dict[str, Any]:
    """One solver: ``warmup + iters`` outer iterations of ours, each followed by the bare one."""
    cfg = _with_steps(name, scfg, steps)
    cfg.pop("batch_size", None)
    kind = cfg.get("sampler", "minibatch")
    solver = solver_from_config(name, cfg)
    lo, up = prob.samplers(seed=0, kind=kind, batch_size=batch_size)
    blo, bup = prob.samplers(seed=0, kind=kind, batch_size=batch_size)
    bare = bare_for(solver, prob.problem.upper, prob.problem.lower, prob.x0, prob.y0, blo, bup)
    timed = _StepTimed(solver)
    solve_cpu: list[float] = []
    bare_cpu: list[float] = []
    mark = {"t": 0.0, "start": time.process_time()}

    def callback(t: int, x: Any, y: Any, rec: dict[str, Any]) -> bool:
        now = time.process_time()
        solve_cpu.append(now - mark["t"])
        with torch.enable_grad():
            t0 = time.process_time()
            bare.step(t - 1)
            bare_cpu.append(time.process_time() - t0)
        mark["t"] = time.process_time()
        return t > warmup and mark["t"] - mark["start"] > max_seconds

    gc.collect()
    gc.disable()
    try:
        mark["t"] = time.process_time()
        res = bl.solve(prob.problem, prob.x0, prob.y0, solver=timed, steps=warmup + iters,
                       lower_data=lo, upper_data=up, track=False, callback=callback)
    finally:
        gc.enable()
    k = slice(warmup, None)
    st, so, ba = timed.cpu[k], solve_cpu[k], bare_cpu[k]
    x, y = res.x, res.y
    return {
        "solver": name, **_ratios(st, so, ba),
        # float32, different op order in places: the iterates agree to rounding, not bitwise
        "x_rel_diff": _rel(x, bare.x), "y_rel_diff": _rel(y, bare.y),
        "step_cpu": st, "solve_cpu": so, "bare_cpu": ba,
    }


def _ratios(st: list[float], so: list[float], ba: list[float]) -> dict[str, Any]:
    """Medians (ms) and the three kinds of ratio ours ÷ bare of per-iteration CPU times: median of
    the per-iteration ratios, ratio of the medians, ratio of the totals."""
    med = statistics.median
    return {
        "iters": len(ba), "step_ms": 1e3 * med(st), "solve_ms": 1e3 * med(so), "bare_ms": 1e3 * med(ba),
        "step_ratio": med([a / b for a, b in zip(st, ba)]),
        "solve_ratio": med([a / b for a, b in zip(so, ba)]),
        "step_ratio_of_medians": med(st) / med(ba), "solve_ratio_of_medians": med(so) / med(ba),
        "step_ratio_of_sums": sum(st) / sum(ba), "solve_ratio_of_sums": sum(so) / sum(ba),
    }


DEFAULT_ITERS = {"VRBO": 12, "SOBA": 300, "SABA": 300, "FSLA": 150, "TTSA": 100}


def whole_iteration(prob: Any, solvers: dict[str, dict[str, Any]], *, steps: int = 10,
                    iters: int | None = None, rounds: int = 1, warmup: int = 3, batch_size: int = 64,
                    log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """:func:`time_solver` for every solver with a bare iteration, ``rounds`` times round-robin
    (the per-iteration samples of all rounds pooled before the medians)."""
    names = [n for n in solvers if solvers[n].get("class", n) in BARE]
    pooled: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for name in names:
            n_it = iters if iters is not None else DEFAULT_ITERS.get(solvers[name].get("class", name), 60)
            row = time_solver(prob, name, solvers[name], steps=steps, iters=n_it, warmup=warmup,
                              batch_size=batch_size)
            if name not in pooled:
                pooled[name] = row
            else:
                for key in ("step_cpu", "solve_cpu", "bare_cpu"):
                    pooled[name][key] = pooled[name][key] + row[key]
            if log is not None:
                log(f"  round {r + 1} {name:10s} step/bare {row['step_ratio']:.3f}  solve/bare "
                    f"{row['solve_ratio']:.3f}  bare {row['bare_ms']:.3g} ms  (x rel diff "
                    f"{row['x_rel_diff']:.1e})")
    out = []
    for name in names:
        p = pooled[name]
        p.update(_ratios(p["step_cpu"], p["solve_cpu"], p["bare_cpu"]))
        out.append(p)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`whole_iteration` rows."""
    lines = ["| solver | iters | bare CPU ms | step CPU ms | solve CPU ms | step ÷ bare | solve ÷ bare "
             "| solve ÷ bare, totals |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['iters']} | {r['bare_ms']:.3g} | {r['step_ms']:.3g} | "
                     f"{r['solve_ms']:.3g} | {r['step_ratio']:.3f} | {r['solve_ratio']:.3f} | "
                     f"{r['solve_ratio_of_sums']:.3f} |")
    return "\n".join(lines)


def _child(src: str, args: argparse.Namespace, out: str) -> list[dict[str, Any]]:
    """This file run in a fresh process against the bilevel sources under ``src``."""
    import os
    import subprocess

    cmd = [sys.executable, __file__, "--json", out, "--steps", str(args.steps)]
    for flag in ("solvers", "iters"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + (["--quick"] if args.quick else []), check=True, env=env, stdout=subprocess.DEVNULL)
    with open(out) as fh:
        return json.load(fh)


def against(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--against OLD_SRC``: the two code versions (OLD_SRC, and the sources this file belongs to)
    in alternating fresh processes (old, new, new, old, ...; ``--rounds`` pairs), each timing every
    solver against its bare loop; per solver the medians over the rounds."""
    import pathlib
    import tempfile

    new_src = str(pathlib.Path(bl.__file__).resolve().parents[1])
    runs: dict[str, list[list[dict[str, Any]]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for tag in (("old", "new") if r % 2 == 0 else ("new", "old")):
                src = args.against if tag == "old" else new_src
                runs[tag].append(_child(src, args, f"{tmp}/{tag}{r}.json"))
                print(f"  round {r + 1} {tag} done", flush=True)
    rows = []
    for i, row in enumerate(runs["new"][0]):
        med = {tag: {k: statistics.median(rr[i][k] for rr in runs[tag])
                     for k in ("step_ratio", "solve_ratio", "solve_ratio_of_sums", "step_ms", "solve_ms",
                           "bare_ms")}
               for tag in runs}
        rows.append({"solver": row["solver"], "rounds": args.rounds, **{f"{t}_{k}": v for t in med
                                                                          for k, v in med[t].items()}})
    return rows


def against_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| solver | step ÷ bare before | step ÷ bare after | solve ÷ bare before | solve ÷ bare after "
             "| solve ÷ bare totals before | after "
             "| step CPU ms before | step CPU ms after | bare CPU ms (before run / after run) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['old_step_ratio']:.3f} | {r['new_step_ratio']:.3f} | "
                     f"{r['old_solve_ratio']:.3f} | {r['new_solve_ratio']:.3f} | "
                     f"{r['old_solve_ratio_of_sums']:.3f} | {r['new_solve_ratio_of_sums']:.3f} | "
                     f"{r['old_step_ms']:.3g} | "
                     f"{r['new_step_ms']:.3g} | {r['old_bare_ms']:.3g} / {r['new_bare_ms']:.3g} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilevel bench stochastic --whole-iteration",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--solvers", help=f"comma-separated (default: {','.join(BARE)})")
    p.add_argument("--iters", type=int, help="timed iterations per solver and round (default: per solver)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="inner / Neumann steps (default 10)")
    p.add_argument("--quick", action="store_true", help="the config's small problem")
    p.add_argument("--json", help="write the rows (with the per-iteration samples) to this file")
    p.add_argument("--against", metavar="OLD_SRC",
                   help="before / after: also time the bilevel sources under OLD_SRC (e.g. an older "
                        "checkout's src/), alternating fresh processes, --rounds pairs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)
    if args.against:
        rows = against(args)
        print(against_table(rows))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh)
        return 0
    cfg = _problem_config("hyperclean", args.quick, None)
    prob = build_problem(cfg)
    names = args.solvers.split(",") if args.solvers else list(BARE)
    solvers = {n: cfg["solvers"][n] for n in names}
    rows = whole_iteration(prob, solvers, steps=args.steps, iters=args.iters, rounds=args.rounds,
                           batch_size=int(cfg["problem"].get("batch_size", 64)))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
