"""The seeds' complexity tables, measured (issue 14, sections 2 and 4 of docs/reproduction.md).

    python -m bilevel.experiments.repro_complexity [--part sample|survey|all] [--fast] [--out DIR]

**Part "sample"** (sample complexity against the tables of the MRBO/VRBO report, seed 000, and of
the lecture, seed 001). On the stochastic quadratic (:func:`bilevel.problems.stochastic_quadratic`,
exact ∇h), every stochastic solver runs with the step-size schedule of its theorem (:data:`ALGOS`:
decaying schedules run once per seed; schedules whose constants depend on the target ε — batch sizes
∝ 1/ε, constant steps ∝ 1/√K — run once per ε) and we count the per-sample oracle calls
(:func:`bilevel.oracles.counting`, both levels, every kind) until the relative squared hypergradient
norm r(x) = ‖∇h(x)‖² / ‖∇h(x0)‖² first falls to ε. The median over seeds of calls(ε) is fitted by
log10 calls = a · log10(1/ε) + b; ``a`` is set beside the claimed exponent (calls = O(ε^−a)).
:func:`constrained_ttsa` does the same for TTSA on a box-constrained upper level with the lecture's
two stationarity measures: the squared gradient mapping ‖L(x − P_X(x − ∇h(x)/L))‖² (ε-stationary)
and ρ²‖x̂(x) − x‖² = ‖∇M_{1/ρ}(x)‖², x̂ the proximal point of the Moreau envelope (ε-nearly
stationary, lecture Eq. 37–38), both computed exactly (:func:`box_qp`).

**Part "survey"** (the time/memory table of the survey, seed 003, sec. 4.5 / table 6). Each
hypergradient family — Reverse, truncated Reverse, Forward, implicit CG / Neumann, closed form —
on a lower level g(x, y) = ½yᵀAy + Σ softplus(y) − yᵀBx (dim y = d, dim x = m, T GD steps) while T, m
and d grow; time is the median of interleaved repetitions (noisy on a shared machine), memory the
peak bytes of the tensors the call creates (:func:`bilevel._memory.allocated_bytes`: every
operator's outputs seen through a dispatch mode; deterministic). The claimed slope of each row is the
least-squares slope of the survey's formula evaluated on the same grid, with c(d, m) = d² + d·m
(the flops of one gradient of g).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import hypergrad as H
from .. import inner as I
from .. import solvers as S
from .._memory import allocated_bytes
from ..estimates import Schedule
from ..formulation import Problem
from ..problems.quadratic import stochastic_quadratic
from ..solvers import solve

__all__ = [
    "Algo", "ALGOS", "CONFIGS", "loglog_slope", "box_qp", "Stationarity", "sample_complexity",
    "constrained_ttsa", "survey_complexity", "main",
]

# --- configurations ------------------------------------------------------------------------------
#: ``full``: the documented run (≈ 5 CPU-minutes); ``fast``: the test suite's (a few seconds).
CONFIGS: dict[str, dict[str, Any]] = {
    "full": {
        "problem": {"dim_x": 5, "dim_y": 10, "n_lower": 512, "n_upper": 512, "kappa": 2.0,
                    "hessian_noise": 0.25, "noise": 1.0, "rho": 0.5, "seed": 0},
        "batch": 4, "eta": 0.75, "eps_max": 0.1, "eps_min": 10 ** -2.75, "n_eps": 8, "seeds": 3,
        "max_iters": 2000, "max_iters_eps": 3000, "eps_stride": 2,
        "algos": None,  # None: all of ALGOS
        "box": 0.5,
        "survey": {"T": [8, 16, 32, 64, 128], "m": [2, 4, 8, 16, 32], "d": [64, 128, 256, 512, 1024],
                   "T0": 16, "m0": 4, "d0": 128, "K": 10, "truncate": 4, "reps": 3},
    },
    "fast": {
        "problem": {"dim_x": 3, "dim_y": 5, "n_lower": 256, "n_upper": 256, "kappa": 2.0,
                    "hessian_noise": 0.25, "noise": 1.0, "rho": 0.5, "seed": 0},
        "batch": 4, "eta": 0.75, "eps_max": 0.3, "eps_min": 0.03, "n_eps": 3, "seeds": 1,
        "max_iters": 400, "max_iters_eps": 300, "eps_stride": 1,
        "algos": ["SOBA", "TTSA"],
        "box": 0.5,
        "survey": {"T": [8, 16, 32], "m": [2, 4, 8], "d": [8, 16, 32], "T0": 8, "m0": 2, "d0": 8,
                   "K": 3, "truncate": 2, "reps": 0,  # reps 0: memory only
                   "families": ["Reverse", "Truncated reverse", "Forward", "Implicit CG",
                                "Implicit Neumann", "Closed form"]},
    },
}


# --- fitting -------------------------------------------------------------------------------------
def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log10 y against log10 x over the finite positive pairs (NaN with
    fewer than 3)."""
    pts = [(math.log10(x), math.log10(y)) for x, y in zip(xs, ys)
           if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    if len(pts) < 3:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else math.nan


def _median(vals: Sequence[float]) -> float:
    """Median that keeps ``inf`` (a seed that never reached the target) in the ranking."""
    return statistics.median(vals) if vals else math.nan


# --- the algorithms and their theoretical schedules ----------------------------------------------
@dataclass
class Algo:
    """One row of the sample-complexity table.

    ``make(eps, c)`` returns (solver, batch size, sampler kind) for the target ``eps`` (horizon-free
    schedules ignore it and get ``eps=None``: one run serves every ε); ``c`` is the run config.
    ``claim`` = (exponent of S(f_u, ε), exponent of S(f_l, ε)); ``source``: where the claim is.
    """

    name: str
    claim: tuple[float, float]
    source: str
    schedule: str
    make: Callable[[float | None, dict[str, Any]], tuple[Any, int, str]]
    per_eps: bool = False
    #: per-sample lower-level calls after t iterations, where the counter misses some (see
    #: :func:`mrbo_zo_lower_calls`); the row uses the larger of this and the counted number
    lower_calls: Callable[[int, dict[str, Any]], int] | None = None
    #: the iteration cap of a horizon-free run, when the config's ``max_iters`` is too small
    max_iters: int | None = None


def _Q(eps: float, c: dict[str, Any]) -> int:
    """Neumann terms for target ε (Q = O(log 1/ε) in every theorem): the truncation bias factor
    (1 − ημ)^(Q+1) of the hypergradient ≤ 0.3 √ε (μ = L/κ of the mean lower Hessian, L = 1)."""
    rate = 1.0 - c["eta"] / c["problem"]["kappa"]
    return max(1, math.ceil(math.log(0.3 * math.sqrt(eps)) / math.log(rate)) - 1)


def _scale(eps: float | None, c: dict[str, Any]) -> float:
    """ε_max / ε ≥ 1: how much harder the target is than the easiest one."""
    return 1.0 if eps is None else c["eps_max"] / eps


def _sched(c0: float, e: float, t0: float = 1.0) -> Schedule:
    return Schedule(c0, e, t0)


def _stocbio(eps, c):
    s = _scale(eps, c)
    return (S.StocBiO(lr_x=0.1, lr_y=0.5, inner_steps=5, Q=_Q(eps, c), eta=c["eta"]),
            math.ceil(c["batch"] * s), "minibatch")


def _vrbo(eps, c):
    s = _scale(eps, c)
    r = math.sqrt(s)
    return (S.VRBO(lr_x=0.1, lr_y=0.5, Q=_Q(eps, c), eta=c["eta"], inner_steps=3,
                   period=math.ceil(2 * r), large_batches=math.ceil(4 * r)),
            math.ceil(c["batch"] * r), "minibatch")


def _stable(eps, c):
    s = _scale(eps, c)
    return (S.STABLE(lr_x=0.1 / s, lr_y=0.5 / s, Q=_Q(eps, c), eta=c["eta"]), c["batch"], "minibatch")


def _soba(eps, c):
    s = _scale(eps, c)
    return S.SOBA(lr_x=0.03 / s, lr_y=0.5 / s), c["batch"], "minibatch"


def _qmin(c):
    return _Q(c["eps_min"], c)


#: MRBO-ZO's Gaussian directions per hypergradient
ZO_SAMPLES = 5


def mrbo_zo_lower_calls(t: int, c: dict[str, Any]) -> int:
    """Per-sample lower-level gradients of MRBO-ZO after t ≥ 1 iterations: per iteration ∇_y G at the
    current and the previous point (2) and two hypergradient estimates (current and previous point,
    the STORM pair; one at t = 1) of Q+1 trajectories of N SGD steps each, on batches of b:
    b·[(2 + 2(Q+1)N)·t − (1 + (Q+1)N)]. The oracle counter sees the Q+1 trajectories, which run
    under one ``torch.func.vmap``, as one (it counts N per estimate), so the row uses this formula
    (tested against a count with the trajectories run one at a time)."""
    n, q, b = _qmin(c), ZO_SAMPLES, c["batch"]
    return b * ((2 + 2 * (q + 1) * n) * t - (1 + (q + 1) * n))


ALGOS: dict[str, Algo] = {a.name: a for a in [
    Algo("StocBiO", (2, 2), "report table (Ji, Yang & Liang 2021)",
         "constant α=0.1, β=0.5, T=5 inner steps; batch ∝ 1/ε; Q = O(log 1/ε)",
         _stocbio, per_eps=True),
    Algo("MRBO", (1.5, 1.5), "report table / Thm 1 (Yang, Ji & Liang 2021)",
         "η_k ∝ (k+1)^(−1/3) (γη_k = 0.05/…, λη_k = 0.5/…), momentum ∝ η_k² (0.1 (k+1)^(−2/3))",
         lambda eps, c: (S.MRBO(lr_x=_sched(0.05, 1 / 3), lr_y=_sched(0.5, 1 / 3),
                                momentum_x=_sched(0.1, 2 / 3), Q=_qmin(c), eta=c["eta"]),
                         c["batch"], "minibatch")),
    Algo("MRBO-ZO", (1.5, 1.5), "report's own table (sec. 8), row MRBO-ZO (no theorem; the report's sec. 7)",
         "MRBO's schedule (as above); partial zeroth-order hypergradient: N = Q SGD steps of η, "
         f"{ZO_SAMPLES} Gaussian directions, μ = 1e-3",
         lambda eps, c: (S.MRBOZO(lr_x=_sched(0.05, 1 / 3), lr_y=_sched(0.5, 1 / 3),
                                  momentum_x=_sched(0.1, 2 / 3), inner_steps=_qmin(c), inner_lr=c["eta"],
                                  samples=ZO_SAMPLES, mu=1e-3, seed=int(c.get("seed", 0))),
                         c["batch"], "minibatch"),
         lower_calls=mrbo_zo_lower_calls, max_iters=6000),
    Algo("VRBO", (1.5, 1.5), "report table / Thm 2 (Yang, Ji & Liang 2021)",
         "constant α=0.1, β=0.5, m+1=3; S₁ ∝ 1/ε, S₂ ∝ ε^(−1/2), period q ∝ ε^(−1/2)",
         _vrbo, per_eps=True),
    Algo("TTSA", (2.5, 2.5), "lecture table (Hong et al. 2023, non-convex h)",
         "α_k = 0.15 (k+1)^(−3/5), β_k = 0.5 (k+1)^(−2/5) (anytime form of K^(−3/5), K^(−2/5))",
         lambda eps, c: (S.TTSA(lr_x=_sched(0.15, 0.6), lr_y=_sched(0.5, 0.4), Q=_qmin(c) + 1,
                                eta=c["eta"]), c["batch"], "minibatch")),
    Algo("TTSA-SC", (1.5, 1.5), "lecture, strongly convex h (Eq. 48)",
         "α_k = 2/(μ_h (k+t₀)), β_k = 0.5 ((k+t₀)/t₀)^(−2/3), t₀ = 8 L_h/μ_h",
         lambda eps, c: (S.TTSA(lr_x=_sched(2.0 / c["mu_h"], 1.0, 8 * c["L_h"] / c["mu_h"]),
                                lr_y=_sched(0.5 * (8 * c["L_h"] / c["mu_h"]) ** (2 / 3), 2 / 3,
                                            8 * c["L_h"] / c["mu_h"]),
                                Q=_qmin(c) + 1, eta=c["eta"]), c["batch"], "minibatch")),
    Algo("SOBA", (2, 2), "issue 14 (Dagréou et al. 2022, constant steps ∝ 1/√K)",
         "constant γ = 0.03 ε/ε_max, ρ = 0.5 ε/ε_max (∝ 1/√K with K ∝ ε^(−2))",
         _soba, per_eps=True),
    Algo("SABA", (1, 1), "issue 14 (Dagréou et al. 2022, finite sum, ×(n+m)^(2/3))",
         "constant γ = 0.02, ρ = 0.3, SAGA memories over a fixed partition",
         lambda eps, c: (S.SABA(lr_x=0.02, lr_y=0.3), c["batch"], "fixed")),
    Algo("BSA", (2, 3), "lecture table (Ghadimi & Wang 2018)",
         "α_k = 0.15 (k+1)^(−1/2), β = 0.5, T = 5 inner steps (fixed: the theorem's T_k grows)",
         lambda eps, c: (S.BSA(lr_x=_sched(0.15, 0.5), lr_y=0.5, inner_steps=5, Q=_qmin(c) + 1,
                               eta=c["eta"]), c["batch"], "minibatch")),
    Algo("MSTSA", (2, 2), "report table (Khanduri et al. 2021a)",
         "α_k = 0.15 (k+1)^(−1/2), β_k = 0.5 (k+1)^(−1/2), momentum ∝ α_k",
         lambda eps, c: (S.MSTSA(lr_x=_sched(0.15, 0.5), lr_y=_sched(0.5, 0.5),
                                 momentum=_sched(1.0, 0.5), Q=_qmin(c) + 1, eta=c["eta"]),
                         c["batch"], "minibatch")),
    Algo("SUSTAIN", (1.5, 1.5), "Khanduri et al. 2021b (in the report's solver list)",
         "α_k = 0.05 (k+1)^(−1/3), β_k = 0.5 (k+1)^(−1/3), momentum ∝ α_k²",
         lambda eps, c: (S.SUSTAIN(lr_x=_sched(0.05, 1 / 3), lr_y=_sched(0.5, 1 / 3),
                                   momentum_x=_sched(0.5, 2 / 3), Q=_qmin(c) + 1, eta=c["eta"]),
                         c["batch"], "minibatch")),
    Algo("STABLE", (2, 2), "lecture table (Chen, Sun, Xiao & Yin 2022)",
         "constant α = 0.1 ε/ε_max, β = 0.5 ε/ε_max (∝ 1/√K, K ∝ ε^(−2)); Neumann form",
         _stable, per_eps=True),
]}


# --- part A: sample complexity -------------------------------------------------------------------
def _build(c: dict[str, Any]):
    prob = stochastic_quadratic(**c["problem"], batch_size=c["batch"])
    c = dict(c, mu_h=prob.info["h_strong_convexity"], L_h=prob.info["h_smoothness"])
    return prob, c


def _eps_grid(c: dict[str, Any]) -> list[float]:
    a, b, n = math.log10(c["eps_max"]), math.log10(c["eps_min"]), int(c["n_eps"])
    return [10 ** (a + (b - a) * i / (n - 1)) for i in range(n)] if n > 1 else [c["eps_max"]]


def _first_hits(prob, algo_make, eps_list, seed, c, max_iters, measures=None, x_projection=None):
    """One run; for every ε the (total, upper, lower) calls and the iteration t at the first
    evaluation where the mean of each measure over the evaluated iterates in [t/2, t] is ≤ ε (the
    expectation over a random iterate of the last half, as the theorems bound it; a single iterate
    crossing zero while x oscillates around x* does not count). Evaluated at every step up to 200,
    then every 0.5 % of t. ``measures``: name -> x -> relative value (default r(x))."""
    solver, batch, kind = algo_make
    lo, up = prob.samplers(batch_size=min(batch, prob.lower_data.n), seed=seed, kind=kind)
    g0 = float(prob.hypergrad(prob.x0).pow(2).sum())
    if measures is None:
        measures = {"grad": lambda x: float(prob.hypergrad(x).pow(2).sum()) / g0}
    hits: dict[str, dict[float, tuple]] = {m: {} for m in measures}
    pending = {m: sorted(eps_list, reverse=True) for m in measures}
    ts: list[int] = []
    sums = {m: [0.0] for m in measures}
    bad: list[str] = []

    def cb(t, x, y, rec):
        if t > 200 and t % max(1, t // 200):
            return False
        calls = [sum(v for k, v in rec.items() if k.startswith(p) and isinstance(v, int))
                 for p in ("upper_", "lower_")]
        ts.append(t)
        start = bisect.bisect_left(ts, t / 2)
        for m, fn in measures.items():
            val = fn(x)
            if not math.isfinite(val) or val > 1e12:
                bad.append(f"diverged: {m} = {val:.3g} at step {t}")
                return True
            sums[m].append(sums[m][-1] + val)
            mean = (sums[m][-1] - sums[m][start]) / (len(ts) - start)
            while pending[m] and mean <= pending[m][0]:
                hits[m][pending[m].pop(0)] = (calls[0] + calls[1], calls[0], calls[1], t)
        return not any(pending.values())

    torch.manual_seed(seed)
    err = None
    try:
        solve(prob.problem, prob.x0, prob.y0, solver=solver, steps=max_iters, lower_data=lo, upper_data=up,
              track=False, callback=cb, x_projection=x_projection)
    except Exception as e:  # a diverging schedule: the targets not reached stay missing
        err = f"{type(e).__name__}: {str(e)[:120]}"
    return hits, err or (bad[0] if bad else None)


def _aggregate(per_seed: list[dict[float, tuple]], eps_list: list[float]) -> dict[str, Any]:
    """Median over seeds of calls(ε) (a missing hit counts as +inf) and the fitted slopes."""
    med = {"total": [], "upper": [], "lower": [], "iters": []}
    for e in eps_list:
        for j, k in enumerate(("total", "upper", "lower", "iters")):
            med[k].append(_median([h[e][j] if e in h else math.inf for h in per_seed]))
    inv = [1.0 / e for e in eps_list]
    fin = [i for i, v in enumerate(med["total"]) if math.isfinite(v)][-3:]
    return {"eps": eps_list, **{f"median_{k}": v for k, v in med.items()},
            "slope_tail": loglog_slope([inv[i] for i in fin], [med["total"][i] for i in fin]),
            "slope_total": loglog_slope(inv, med["total"]), "slope_upper": loglog_slope(inv, med["upper"]),
            "slope_lower": loglog_slope(inv, med["lower"]), "slope_iters": loglog_slope(inv, med["iters"])}


def sample_complexity(config: str | dict[str, Any] = "full", log: Callable[[str], None] = print
                      ) -> dict[str, Any]:
    """Part A for every algorithm of the config; returns a JSON-able dict (rows by name)."""
    c = CONFIGS[config] if isinstance(config, str) else config
    prob, c = _build(c)
    eps_list = _eps_grid(c)
    names = c["algos"] or list(ALGOS)
    out: dict[str, Any] = {"eps": eps_list, "problem": dict(c["problem"]), "mu_h": c["mu_h"],
                           "L_h": c["L_h"], "rows": {}}
    for name in names:
        algo = ALGOS[name]
        t0 = time.process_time()
        per_seed, errors = [], []
        for s in range(int(c["seeds"])):
            cs = dict(c, seed=s)  # the run's seed, for a solver's own generator (MRBO-ZO's directions)
            if algo.per_eps:  # one run per ε, on every eps_stride-th target (they cost the most)
                hits: dict[float, tuple] = {}
                for e in eps_list[::int(c["eps_stride"])]:
                    h, err = _first_hits(prob, algo.make(e, cs), [e], s, c, c["max_iters_eps"])
                    hits.update(h["grad"])
                    if err:
                        errors.append(err)
            else:
                cap = max(int(c["max_iters"]), int(algo.max_iters or 0))
                h, err = _first_hits(prob, algo.make(None, cs), eps_list, s, c, cap)
                hits = h["grad"]
                if err:
                    errors.append(err)
            if algo.lower_calls is not None:  # (total, upper, lower, t) with the uncounted calls added
                hits = {e: (up + max(lo, algo.lower_calls(t, cs)), up, max(lo, algo.lower_calls(t, cs)), t)
                        for e, (_, up, lo, t) in hits.items()}
            per_seed.append(hits)
        row = _aggregate(per_seed, eps_list)
        row.update(claim=list(algo.claim), source=algo.source, schedule=algo.schedule,
                   per_eps=algo.per_eps, errors=errors[:3], cpu_s=time.process_time() - t0)
        out["rows"][name] = row
        log(f"{name:8s} slope {row['slope_total']:.2f} (claim {algo.claim[0]:g}/{algo.claim[1]:g})  "
            f"calls {[f'{v:.3g}' for v in row['median_total']]}  cpu {row['cpu_s']:.1f}s")
    return out


# --- constrained upper level: the lecture's two stationarity measures ----------------------------
def box_qp(Hm: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *,
           x0: torch.Tensor | None = None, tol: float = 1e-13, max_iter: int = 100_000) -> torch.Tensor:
    """argmin_{lo ≤ x ≤ hi} ½ xᵀHx − bᵀx for symmetric positive definite H, by projected gradient
    with step 1/λ_max(H) until the fixed-point residual ‖x − P(x − (Hx − b)/λ_max)‖ ≤ tol·(1 + ‖x‖)
    (linear convergence at rate 1 − λ_min/λ_max; the residual certifies the KKT conditions)."""
    ev = torch.linalg.eigvalsh(Hm)
    if not ev[0] > 0:
        raise ValueError("box_qp needs a positive definite H")
    step = 1.0 / float(ev[-1])
    x = torch.clamp(torch.zeros_like(b) if x0 is None else x0, lo, hi)
    for _ in range(max_iter):
        x_new = torch.clamp(x - step * (Hm @ x - b), lo, hi)
        if float(torch.linalg.vector_norm(x_new - x)) <= tol * (1.0 + float(torch.linalg.vector_norm(x))):
            return x_new
        x = x_new
    raise RuntimeError(f"box_qp did not converge in {max_iter} iterations")


@dataclass
class Stationarity:
    """The lecture's two measures for min_{x ∈ X} h(x), h(x) = ½xᵀHx − bᵀx + const, X a box:

    * ``mapping(x)`` = ‖L (x − P_X(x − ∇h(x)/L))‖², the squared gradient mapping (0 iff the
      variational inequality (36) holds; ε-stationary: ≤ ε),
    * ``moreau(x)`` = ρ²‖x̂(x) − x‖² = ‖∇M_{1/ρ}(x)‖² with x̂(x) = argmin_{X} h + (ρ/2)‖· − x‖²
      (ε-nearly stationary, Eq. 38: ‖x̂ − x‖² ≤ ε/ρ²).
    """

    Hm: torch.Tensor
    b: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    rho: float
    L: float = field(init=False)

    def __post_init__(self) -> None:
        self.L = float(torch.linalg.eigvalsh(self.Hm)[-1])
        self._eye = torch.eye(self.Hm.shape[0], dtype=self.Hm.dtype)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.Hm @ x - self.b

    def mapping(self, x: torch.Tensor) -> float:
        g = self.L * (x - torch.clamp(x - self.grad(x) / self.L, self.lo, self.hi))
        return float(g.pow(2).sum())

    def prox(self, x: torch.Tensor) -> torch.Tensor:
        return box_qp(self.Hm + self.rho * self._eye, self.b + self.rho * x, self.lo, self.hi, x0=x)

    def moreau(self, x: torch.Tensor) -> float:
        return self.rho ** 2 * float((self.prox(x) - x).pow(2).sum())


def quadratic_stationarity(prob, half_width: float, rho: float | None = None) -> tuple[Stationarity, float]:
    """The measures for the stochastic quadratic on the box [−w, w]^p, w = half_width·max|x*|
    (so the unconstrained minimizer x* lies outside it); ρ defaults to L_h."""
    info = prob.info
    A, B, cc, d, e, rh = (info[k] for k in ("A", "B", "c", "d", "e", "rho"))
    M = torch.linalg.solve(A, B)
    m = torch.linalg.solve(A, cc)
    Hm = M.T @ M + rh * torch.eye(M.shape[1], dtype=M.dtype)
    b = M.T @ (d - m) + rh * e
    w = half_width * float(prob.x_star.abs().max())
    lo, hi = torch.full_like(b, -w), torch.full_like(b, w)
    st = Stationarity(Hm, b, lo, hi, rho=float(rho or info["h_smoothness"]))
    return st, w


def constrained_ttsa(config: str | dict[str, Any] = "full", log: Callable[[str], None] = print
                     ) -> dict[str, Any]:
    """TTSA (non-convex schedule, claim ε^−5/2) with x projected onto the box; calls to reach each
    ε for both measures (relative to their value at x0) and for r(x) (which does not vanish)."""
    c = CONFIGS[config] if isinstance(config, str) else config
    prob, c = _build(c)
    st, w = quadratic_stationarity(prob, c["box"])
    x0 = prob.x0
    base = {"mapping": st.mapping(x0), "moreau": st.moreau(x0)}
    measures = {k: (lambda x, k=k: getattr(st, k)(x) / base[k]) for k in base}
    eps_list = _eps_grid(c)
    algo = ALGOS["TTSA"]
    per = {k: [] for k in measures}
    t0 = time.process_time()
    for s in range(int(c["seeds"])):
        hits, _ = _first_hits(prob, algo.make(None, c), eps_list, s, c, c["max_iters"], measures=measures,
                              x_projection=lambda t: torch.clamp(t, -w, w))
        for k in measures:
            per[k].append(hits[k])
    xc = box_qp(st.Hm, st.b, st.lo, st.hi)
    g_rel = float(st.grad(xc).pow(2).sum()) / float(st.grad(x0).pow(2).sum())
    out = {"eps": eps_list, "half_width": w, "rho": st.rho,
           "active": int(((xc.abs() - w).abs() < 1e-9).sum()), "grad_norm_sq_at_solution_rel": g_rel,
           "rows": {k: _aggregate(per[k], eps_list) for k in measures}, "cpu_s": time.process_time() - t0}
    for k, row in out["rows"].items():
        calls = [f"{v:.3g}" for v in row["median_total"]]
        log(f"TTSA box {k:8s} slope {row['slope_total']:.2f}  calls {calls}")
    return out


# --- part B: the survey's time / memory table ----------------------------------------------------
def survey_problem(d: int, m: int, *, smooth: bool = True, seed: int = 0) -> tuple[Problem, Any]:
    """g(x, y) = ½yᵀAy + Σ softplus(y) − yᵀBx (A dense SPD, eigenvalues in [0.2, 1]; ``smooth=False``
    drops the softplus, so y*(x) = A⁻¹Bx is closed form), f(x, y) = ½‖y − t‖² + 0.05‖x‖²."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    Qm, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=f64))
    A = Qm @ torch.diag(torch.linspace(0.2, 1.0, d, dtype=f64)) @ Qm.T
    B = torch.randn(d, m, generator=gen, dtype=f64) / math.sqrt(m)
    t = torch.randn(d, generator=gen, dtype=f64)

    def g(x, y):
        val = 0.5 * y @ (A @ y) - y @ (B @ x)
        return val + torch.nn.functional.softplus(y).sum() if smooth else val

    def f(x, y):
        return 0.5 * ((y - t) ** 2).sum() + 0.05 * (x ** 2).sum()

    return Problem(upper=f, lower=g), (A, B)


#: family -> (builder(T, K, trunc, A, B), survey time formula, survey memory formula); formulas in
#: (T, m, d, K) with c(d, m) = d² + d m. Truncated reverse is not in the table (Shaban et al. 2019).
FAMILIES: dict[str, tuple[Callable, Callable, Callable, str, str]] = {
    "Reverse": (lambda T, K, tr, A, B: H.Reverse(I.GD(lr=0.8, steps=T)),
                lambda T, m, d, K: T * (d * d + d * m), lambda T, m, d, K: T * d + m,
                "O(T c(d,m))", "O(T d + m)"),
    "Truncated reverse": (lambda T, K, tr, A, B: H.Reverse(I.GD(lr=0.8, steps=T), truncate=min(tr, T)),
                          lambda T, m, d, K: T * (d * d + d * m), lambda T, m, d, K: K * d + m,
                          "O(T c(d,m)) (not in the table)", "O(K d + m) (not in the table)"),
    "Forward": (lambda T, K, tr, A, B: H.Forward(I.GD(lr=0.8, steps=T)),
                lambda T, m, d, K: T * m * (d * d + d * m), lambda T, m, d, K: d + m,
                "O(T m c(d,m))", "O(d + m)"),
    "Forward, chunk=1": (lambda T, K, tr, A, B: H.Forward(I.GD(lr=0.8, steps=T), chunk=1),
                         lambda T, m, d, K: T * m * (d * d + d * m), lambda T, m, d, K: d + m,
                         "O(T m c(d,m))", "O(d + m)"),
    "Implicit CG": (lambda T, K, tr, A, B: H.CG(I.GD(lr=0.8, steps=T), iters=K, tol=0.0),
                    lambda T, m, d, K: (K * m + T) * (d * d + d * m), lambda T, m, d, K: d + m,
                    "O((K m + T) c(d,m))", "O(d + m)"),
    "Implicit Neumann": (lambda T, K, tr, A, B: H.Neumann(I.GD(lr=0.8, steps=T), iters=K),
                         lambda T, m, d, K: (K * m + T) * (d * d + d * m), lambda T, m, d, K: d + m,
                         "O((K m + T) c(d,m))", "O(d + m)"),
    "Closed form": (lambda T, K, tr, A, B: H.ClosedForm(lambda x: torch.linalg.solve(A, B @ x)),
                    lambda T, m, d, K: d ** 3, lambda T, m, d, K: d ** 2,
                    "O(N³), N = dim y here", "O(N²)"),
}


def survey_complexity(config: str | dict[str, Any] = "full", log: Callable[[str], None] = print
                      ) -> dict[str, Any]:
    """Part B: per family and swept variable (T, m, d), the measured time and memory with their
    log-log slopes beside the slopes of the survey's formulas on the same grid."""
    c = (CONFIGS[config] if isinstance(config, str) else config)["survey"]
    K, tr, reps = int(c["K"]), int(c["truncate"]), int(c["reps"])
    fams = {f: FAMILIES[f] for f in c.get("families") or FAMILIES}
    out: dict[str, Any] = {"config": c, "sweeps": {}}
    for var in ("T", "m", "d"):
        grid = list(c[var])
        pts = [{"T": c["T0"], "m": c["m0"], "d": c["d0"], var: v} for v in grid]
        times = {f: [[] for _ in grid] for f in fams}
        mem = {f: [0.0] * len(grid) for f in fams}
        cases = []
        for i, p in enumerate(pts):
            for fam, (make, *_rest) in fams.items():
                problem, (A, B) = survey_problem(p["d"], p["m"], smooth=fam != "Closed form")
                est = make(p["T"], K, tr, A, B)
                x = torch.full((p["m"],), 0.1, dtype=torch.float64)
                y = torch.zeros(p["d"], dtype=torch.float64)

                def call(est=est, problem=problem, x=x, y=y):
                    return est(problem, x, y)

                _, mem[fam][i] = allocated_bytes(call)
                if reps:
                    call()  # warm-up
                    cases.append((fam, i, call))
        for _ in range(reps):  # interleaved rounds: every case once per round
            for fam, i, call in cases:
                t0 = time.perf_counter()
                call()
                times[fam][i].append(time.perf_counter() - t0)
        rows = {}
        for fam, (_m, tform, mform, tclaim, mclaim) in fams.items():
            med = [statistics.median(v) if v else math.nan for v in times[fam]]
            rows[fam] = {
                "grid": grid, "time_s": med, "bytes": mem[fam],
                "slope_time": loglog_slope(grid, med), "slope_mem": loglog_slope(grid, mem[fam]),
                "claim_time": loglog_slope(grid, [tform(p["T"], p["m"], p["d"], K) for p in pts]),
                "claim_mem": loglog_slope(grid, [mform(p["T"], p["m"], p["d"], K) for p in pts]),
                "claim_time_formula": tclaim, "claim_mem_formula": mclaim,
            }
            log(f"{var}: {fam:18s} time slope {rows[fam]['slope_time']:.2f} (claim "
                f"{rows[fam]['claim_time']:.2f})  mem slope {rows[fam]['slope_mem']:.2f} "
                f"(claim {rows[fam]['claim_mem']:.2f})")
        out["sweeps"][var] = {"fixed": {k: c[f"{k}0"] for k in ("T", "m", "d") if k != var}, "rows": rows}
    return out


# --- report: tables and figures ------------------------------------------------------------------
def _f(v: float, nd: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


def sample_table(res: dict[str, Any]) -> str:
    head = ("| algorithm | claimed S(f_u), S(f_l) | source | schedule (ours) | measured slope: total "
            f"(upper / lower) | last 3 targets | iterations | ε reached (of {len(res['eps'])}) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, r in res["rows"].items():
        reached = sum(math.isfinite(v) for v in r["median_total"])
        lines.append(f"| {name} | ε^−{r['claim'][0]:g}, ε^−{r['claim'][1]:g} | {r['source']} | "
                     f"{r['schedule']}{' (one run per ε)' if r['per_eps'] else ''} | "
                     f"{_f(r['slope_total'])} ({_f(r['slope_upper'])} / {_f(r['slope_lower'])}) | "
                     f"{_f(r['slope_tail'])} | {_f(r['slope_iters'])} | {reached} |")
    return head + "\n".join(lines) + "\n"


def box_table(box: dict[str, Any]) -> str:
    lines = ["| measure (TTSA, x ∈ box) | claimed | measured slope | last 3 targets | ε reached |",
             "|---|---|---|---|---|"]
    names = {"mapping": "ε-stationary: ‖G_L(x)‖² (gradient mapping)",
             "moreau": "ε-nearly stationary: ρ²‖x̂(x) − x‖² = ‖∇M_{1/ρ}(x)‖²"}
    for k, r in box["rows"].items():
        reached = sum(math.isfinite(v) for v in r["median_total"])
        lines.append(f"| {names.get(k, k)} | ε^−2.5 | {_f(r['slope_total'])} | {_f(r['slope_tail'])} | "
                     f"{reached} of {len(r['eps'])} |")
    return "\n".join(lines) + "\n"


def survey_table(res: dict[str, Any]) -> str:
    head = ("| family | swept | fixed | time: survey | claimed slope | measured | memory: survey | "
            "claimed slope | measured |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for var, sw in res["sweeps"].items():
        fixed = ", ".join(f"{k}={v}" for k, v in sw["fixed"].items())
        for fam, r in sw["rows"].items():
            lines.append(f"| {fam} | {var} ∈ {r['grid'][0]}…{r['grid'][-1]} | {fixed} | "
                         f"{r['claim_time_formula']} | {_f(r['claim_time'])} | {_f(r['slope_time'])} | "
                         f"{r['claim_mem_formula']} | {_f(r['claim_mem'])} | {_f(r['slope_mem'])} |")
    return head + "\n".join(lines) + "\n"


def plot_sample(res: dict[str, Any], box: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    inv = [1.0 / e for e in res["eps"]]
    colors = plt.get_cmap("tab20").colors
    for j, (name, r) in enumerate(res["rows"].items()):
        pts = [(a, v) for a, v in zip(inv, r["median_total"]) if math.isfinite(v)]
        if pts:
            axes[0].loglog(*zip(*pts), "s--" if r["per_eps"] else "o-", color=colors[(2 * j) % 20],
                           label=f"{name}: {_f(r['slope_total'])} (claim {r['claim'][0]:g})")
    axes[0].set_xlabel("1/ε  (ε: target of ‖∇h(x)‖² / ‖∇h(x₀)‖²)")
    axes[0].set_ylabel("per-sample oracle calls (median over seeds)")
    axes[0].set_title("calls to ε-stationarity; legend: fitted slope (dashed: one run per ε)")
    axes[0].legend(fontsize=7)
    if box:
        for k, r in box["rows"].items():
            pts = [(a, v) for a, v in zip(inv, r["median_total"]) if math.isfinite(v)]
            if pts:
                axes[1].loglog(*zip(*pts), "o-", label=f"{k}: slope {_f(r['slope_total'])}")
        axes[1].set_title("TTSA, box-constrained x: the two stationarity measures (claim 2.5)")
        axes[1].set_xlabel("1/ε (relative to the value at x₀)")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_survey(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = res["sweeps"]
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5 * len(sweeps), 8))
    for j, (var, sw) in enumerate(sweeps.items()):
        for fam, r in sw["rows"].items():
            axes[0][j].loglog(r["grid"], r["time_s"], "o-", label=f"{fam} ({_f(r['slope_time'])})")
            axes[1][j].loglog(r["grid"], r["bytes"], "o-", label=f"{fam} ({_f(r['slope_mem'])})")
        fixed = ", ".join(f"{k}={v}" for k, v in sw["fixed"].items())
        axes[0][j].set_title(f"time vs {var} ({fixed})")
        axes[1][j].set_title(f"peak tensor bytes vs {var} ({fixed})")
        axes[1][j].set_xlabel(var)
        for ax in (axes[0][j], axes[1][j]):
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel("seconds (median, shared machine)")
    axes[1][0].set_ylabel("bytes (deterministic)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bilevel.experiments.repro_complexity",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("sample", "survey", "all"), default="all")
    ap.add_argument("--fast", action="store_true", help="the small configuration of the tests")
    ap.add_argument("--out", default="runs/repro_complexity", help="folder for JSON, tables, PNGs")
    ap.add_argument("--algos", nargs="*", default=None, help=f"subset of {', '.join(ALGOS)}")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--replot", action="store_true",
                    help="rewrite tables.md and the figures from OUT/result.json without running")
    args = ap.parse_args(argv)
    if args.replot:
        res = json.loads((Path(args.out) / "result.json").read_text())
        return _report(res, Path(args.out))
    cfg = json.loads(json.dumps(CONFIGS["fast" if args.fast else "full"]))
    if args.algos:
        unknown = set(args.algos) - set(ALGOS)
        if unknown:
            ap.error(f"unknown algorithms {sorted(unknown)}; choose from {', '.join(ALGOS)}")
        cfg["algos"] = args.algos
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {}
    if args.part in ("sample", "all"):
        res["sample"] = sample_complexity(cfg)
        res["box"] = constrained_ttsa(cfg)
    if args.part in ("survey", "all"):
        res["survey"] = survey_complexity(cfg)
    res["cpu_s"] = time.process_time() - cpu0
    (out / "result.json").write_text(json.dumps(res, indent=1, default=float))
    return _report(res, out)


def _report(res: dict[str, Any], out: Path) -> dict[str, Any]:
    """tables.md and the two figures from a result dict."""
    md = []
    if "sample" in res:
        plot_sample(res["sample"], res.get("box"), out / "repro_sample_complexity.png")
        md += ["## sample complexity\n", sample_table(res["sample"]), box_table(res["box"])]
    if "survey" in res:
        plot_survey(res["survey"], out / "repro_survey_complexity.png")
        md += ["## survey table\n", survey_table(res["survey"])]
    (out / "tables.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {out}/ ({res.get('cpu_s', math.nan):.0f} CPU-seconds)")
    return res


if __name__ == "__main__":
    main()
