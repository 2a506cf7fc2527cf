"""Stochastic benchmark, the measurements: evaluation outside the clock, one timed run
(:func:`run_one`), aggregation over seeds, per-iteration cost and the grid search.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import bilevel as bl
import bilevel.problems  # noqa: F401  (registers bl.problems)

from ...errors import BilevelError
from .problem import JAX_MS, _describe, _set_dotted, build_problem, solver_from_config


# --- evaluation ------------------------------------------------------------------------------------
class Evaluator:
    """Evaluation of a run point outside the clock. ``kinds``: subset of value, value_gap,
    grad_norm, test_error (value = h(x) by the problem's accurate inner solve)."""

    def __init__(self, prob: bl.problems.StochasticProblem, kinds: Sequence[str]):
        self.prob, self.kinds = prob, tuple(kinds)
        self.h_star = prob.value(prob.x_star) if "value_gap" in kinds and prob.x_star is not None else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, kinds: Sequence[str] | None = None
                 ) -> dict[str, float]:
        kinds = self.kinds if kinds is None else kinds
        out: dict[str, float] = {}
        ys = None
        if {"value", "value_gap", "grad_norm"} & set(kinds):
            ys = self.prob.y_star(x, y)
        if "value" in kinds or "value_gap" in kinds:
            with torch.no_grad():
                v = float(self.prob.problem.f(x, ys, self.prob.upper_tensors))
            if "value" in kinds:
                out["value"] = v
            if "value_gap" in kinds and self.h_star is not None:
                out["value_gap"] = max(v - self.h_star, 0.0)
        if "grad_norm" in kinds:
            out["grad_norm"] = self.prob.grad_norm(x, ys)
        if "test_error" in kinds:
            out["test_error"] = self.prob.test_error(x, y)
        return out


# --- one run ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    problem: str
    solver: str
    seed: int
    time: list[float] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def eval_times(budget: float, n_eval: int) -> list[float]:
    """``n_eval`` log-spaced clock times from budget/100 to the budget (the early phase matters)."""
    if n_eval < 2:
        return [budget]
    return [budget * 10 ** (-2 + 2 * i / (n_eval - 1)) for i in range(n_eval)]


def _samplers(prob: bl.problems.StochasticProblem, scfg: dict[str, Any], seed: int):
    kw: dict[str, Any] = {"seed": seed, "kind": scfg.get("sampler", "minibatch")}
    if "batch_size" in scfg:
        kw["batch_size"] = int(scfg["batch_size"])
    return prob.samplers(**kw)


def _total_calls(record: dict[str, Any]) -> float:
    return float(sum(v for k, v in record.items() if k.startswith(("lower_", "upper_"))
                     and isinstance(v, (int, float)) and not k.endswith(("_loss", "_norm"))))


def run_one(prob: bl.problems.StochasticProblem, name: str, scfg: dict[str, Any], seed: int, *,
            budget: float, n_eval: int, evaluator: Evaluator, final_kinds: Sequence[str] = (),
            warmup: int = 2, max_steps: int = 10**7) -> RunResult:
    """One seed of one solver: warm-up, then run until the solver clock reaches ``budget`` seconds,
    evaluating (untimed) at x0 and each time the clock crosses one of :func:`eval_times`."""
    res = RunResult(prob.name, name, seed)
    torch.manual_seed(seed)
    try:  # warm-up (untimed, separate samplers and solver instance)
        lo, up = _samplers(prob, scfg, seed + 10_000)
        bl.solve(prob.problem, prob.x0, prob.y0, solver=solver_from_config(name, scfg), steps=warmup,
                 lower_data=lo, upper_data=up, track=False)
    except (BilevelError, RuntimeError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    lo, up = _samplers(prob, scfg, seed)
    solver = solver_from_config(name, scfg)
    thresholds = eval_times(budget, n_eval)
    last: dict[str, Any] = {}

    def record(t: int, x: torch.Tensor, y: torch.Tensor, rec_time: float, calls: float) -> None:
        m = evaluator(x, y)
        res.time.append(rec_time)
        res.calls.append(calls)
        res.steps.append(t)
        for k, v in m.items():
            res.metrics.setdefault(k, []).append(v)

    record(0, prob.x0, prob.y0, 0.0, 0.0)

    def callback(t: int, x: Any, y: Any, rec: dict[str, Any]) -> bool:
        last.update(x=x, y=y, t=t, time=rec["time"], calls=_total_calls(rec))
        if thresholds and rec["time"] >= thresholds[0]:
            while thresholds and rec["time"] >= thresholds[0]:
                thresholds.pop(0)
            record(t, x, y, rec["time"], last["calls"])
        return rec["time"] >= budget

    try:
        out = bl.solve(prob.problem, prob.x0, prob.y0, solver=solver, steps=max_steps, lower_data=lo,
                       upper_data=up, track=False, callback=callback)
        x_fin, y_fin = out.x, out.y
        if final_kinds:
            res.final = evaluator(x_fin, y_fin, final_kinds)
        res.final.update(steps=float(last.get("t", 0)), time=float(last.get("time", 0.0)),
                         calls=float(last.get("calls", 0.0)))
    except (BilevelError, RuntimeError, ValueError) as e:  # divergence: the curve stops here
        res.error = f"{type(e).__name__}: {str(e)[:200]}"
    return res


# --- aggregation -----------------------------------------------------------------------------------
def _quantile(vals: list[float], q: float) -> float:
    s = sorted(vals)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    if s[hi] == s[lo] or math.isinf(s[hi]):
        return s[lo] if pos - lo < 0.5 or not math.isinf(s[hi]) else s[hi]
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _value_at(xs: list[float], ys: list[float], t: float) -> float:
    """Step interpolation: the last evaluated value at or before t (NaN before the first point or
    after a divergence-truncated curve ends)."""
    val = math.nan
    for xi, yi in zip(xs, ys):
        if xi <= t + 1e-12:
            val = yi
        else:
            break
    return val


def band(runs: list[RunResult], metric: str, axis: str, grid: list[float]) -> dict[str, list[float]]:
    """Median and 20/80 % quantiles over seeds of a step-interpolated metric on ``grid``."""
    med, q20, q80 = [], [], []
    for g in grid:
        vals = []
        for r in runs:
            xs = getattr(r, axis)
            if metric not in r.metrics or not xs or g > xs[-1] * (1 + 1e-9) and r.error is not None:
                vals.append(math.inf if r.error else math.nan)
                continue
            vals.append(_value_at(xs, r.metrics[metric], g))
        fin = [v for v in vals if not math.isnan(v)]
        med.append(_quantile(fin, 0.5) if fin else math.nan)
        q20.append(_quantile(fin, 0.2) if fin else math.nan)
        q80.append(_quantile(fin, 0.8) if fin else math.nan)
    return {"median": med, "q20": q20, "q80": q80}


def reach(run: RunResult, metric: str, target: float) -> tuple[float, float]:
    """(time, calls) of the first evaluation with metric ≤ target (inf if never)."""
    for t, c, v in zip(run.time, run.calls, run.metrics.get(metric, [])):
        if v <= target:
            return t, c
    return math.inf, math.inf


# --- per-iteration cost ----------------------------------------------------------------------------
def _bare_calls(prob: bl.problems.StochasticProblem, batch_size: int) -> dict[str, Callable[[], Any]]:
    """One bare ``torch.autograd`` call per oracle kind (no bilevel code), each on a freshly drawn
    batch as a solver's oracle calls are (a batch drawn from a sampler of its own: the draw is part
    of the price, and the batches are as cold in the cache as the solver's): the prices of
    :func:`per_iteration`."""
    lo, up = prob.samplers(batch_size=batch_size, seed=123)
    f, g = prob.problem.upper, prob.problem.lower
    x, y = prob.x0.clone(), prob.y0.clone()
    v = torch.randn_like(y)

    def grad_lower():
        yr = y.detach().requires_grad_(True)
        return torch.autograd.grad(g(x, yr, lo.next()), yr)

    def grad_upper():
        xr, yr = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        return torch.autograd.grad(f(xr, yr, up.next()), (xr, yr), allow_unused=True)

    def second(wrt: str):
        def fn():
            xr, yr = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
            (gy,) = torch.autograd.grad(g(xr, yr, lo.next()), yr, create_graph=True)
            return torch.autograd.grad(gy, yr if wrt == "y" else xr, v, allow_unused=True)
        return fn

    return {"grad_lower": grad_lower, "grad_upper": grad_upper, "hvp": second("y"), "cross": second("x")}


def _raw_costs(prob: bl.problems.StochasticProblem, batch_size: int, reps: int = 30) -> dict[str, float]:
    """Median CPU seconds of one bare ``torch.autograd`` call per oracle kind (:func:`_bare_calls`),
    measured on their own (:func:`per_iteration` measures them interleaved with the solvers)."""
    out = {}
    with torch.enable_grad():
        for k, fn in _bare_calls(prob, batch_size).items():
            for _ in range(3):
                fn()
            ts = []
            for _ in range(reps):
                t0 = time.process_time()
                fn()
                ts.append(time.process_time() - t0)
            out[k] = statistics.median(ts)
    return out


def _priced(per: dict[str, float], raw: dict[str, float]) -> float:
    """Seconds of the counted calls per iteration at bare prices (an HVP or cross product priced as
    its extra backward: the gradient it differentiates is counted as a lower gradient)."""
    return (per.get("lower_grad", 0) * raw["grad_lower"] + per.get("upper_grad", 0) * raw["grad_upper"]
            + per.get("lower_hvp", 0) * max(raw["hvp"] - raw["grad_lower"], 0.0)
            + per.get("lower_cross", 0) * max(raw["cross"] - raw["grad_lower"], 0.0))


def _with_steps(cls_name: str, scfg: dict[str, Any], steps: int) -> dict[str, Any]:
    """The config with every inner / Neumann step count the constructor has set to ``steps``."""
    cfg = copy.deepcopy(scfg)
    cls = getattr(bl.solvers, cfg.get("class", cls_name))
    params = inspect.signature(cls.__init__).parameters
    for key in ("Q", "inner_steps", "v_steps"):
        if key in params:
            cfg[key] = steps
    return cfg


class _CpuTimed(bl.solvers.Solver):
    """A solver whose ``step`` is also timed in CPU seconds of this process (``self.cpu``): on a
    loaded machine the wall clock counts the other processes' time slices, CPU time does not."""

    def __init__(self, solver: bl.solvers.Solver):
        self.solver, self.cpu = solver, []
        self.carries_buffers = getattr(solver, "carries_buffers", False)

    def init(self, ctx, xs, ys):
        return self.solver.init(ctx, xs, ys)

    def setup(self, ctx, state):
        self.solver.setup(ctx, state)

    def step(self, ctx, state, t):
        t0 = time.process_time()
        out = self.solver.step(ctx, state, t)
        self.cpu.append(time.process_time() - t0)
        return out

    def output(self, state):
        return self.solver.output(state)

    def lower_pair(self, state):
        return self.solver.lower_pair(state)


def per_iteration(prob: bl.problems.StochasticProblem, solvers: dict[str, dict[str, Any]], *,
                  steps: int, iters: int, max_seconds: float, batch_size: int, warmup: int = 3
                  ) -> list[dict[str, Any]]:
    """Per outer iteration (after ``warmup`` iterations): median wall time (``ms``, the solver's
    clock), mean CPU time (``cpu_ms``) and mean oracle calls (in units of one call on a batch of
    ``batch_size``), with Q / inner steps = ``steps``.

    Overhead ratio = CPU time per iteration / the same calls priced at bare-autograd cost
    (:func:`_priced`). The prices are measured *interleaved* with the solver: after every outer
    step (outside the solver's clock) one bare call of each kind (:func:`_bare_calls`) is timed,
    and the medians over the run price the calls — so both sides see the same machine state."""
    bare = _bare_calls(prob, batch_size)
    rows = []
    for name, scfg in solvers.items():
        cfg = _with_steps(name, scfg, steps)
        cfg.pop("batch_size", None)
        lo, up = prob.samplers(seed=0, kind=cfg.get("sampler", "minibatch"), batch_size=batch_size)
        prices: dict[str, list[float]] = {k: [] for k in bare}

        def stop(t: int, x: Any, y: Any, rec: dict[str, Any],
                 prices: dict[str, list[float]] = prices) -> bool:
            with torch.enable_grad():
                for k, fn in bare.items():
                    t0 = time.process_time()
                    fn()
                    prices[k].append(time.process_time() - t0)
            return t > warmup and rec["time"] > max_seconds

        timed = _CpuTimed(solver_from_config(name, cfg))
        gc.collect()
        gc.disable()  # as timeit does: no collector pauses inside either measurement
        try:
            res = bl.solve(prob.problem, prob.x0, prob.y0, solver=timed, steps=warmup + iters,
                           lower_data=lo, upper_data=up, track=False, callback=stop)
        except (BilevelError, RuntimeError, ValueError) as e:
            rows.append({"solver": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        finally:
            gc.enable()
        h = res.history
        k = len(h) - warmup
        if k < 1:
            rows.append({"solver": name, "error": "too slow for one timed iteration"})
            continue
        dts = [b["time"] - a["time"] for a, b in zip(h[warmup - 1:-1], h[warmup:])]
        a, b = h[warmup - 1], h[-1]
        keys = {kk for kk in b if kk.startswith(("lower_", "upper_"))}
        per = {kk: (b.get(kk, 0) - a.get(kk, 0)) / k / batch_size for kk in keys}
        raw = {kk: statistics.median(v[warmup:]) for kk, v in prices.items()}
        cpu = statistics.fmean(timed.cpu[warmup:])  # a mean, as the calls are (VRBO's restarts)
        pred = _priced(per, raw)
        rows.append({"solver": name, "ms": 1e3 * statistics.median(dts), "cpu_ms": 1e3 * cpu,
                     "iters": k, "calls": per, "raw_ms": 1e3 * pred,
                     "overhead": cpu / pred if pred > 0 else math.nan, "jax_ms": JAX_MS.get(name)})
    return rows


# --- grid search -----------------------------------------------------------------------------------
def grid_search(cfg: dict[str, Any], solvers: Sequence[str], *, seeds: Sequence[int], budget: float,
                n_eval: int, log: Callable[[str], None] = print, sweeps: int = 1
                ) -> dict[str, dict[str, Any]]:
    """Coordinate search over each solver's ``grid`` table: starting from the current config, each
    key in turn takes every candidate value with the others fixed at the best so far (``sweeps``
    passes; cost Σ|values| runs per pass instead of the product). A candidate runs ``seeds`` on
    ``budget`` seconds; its score is the median over seeds of the problem's metric at the end of the
    budget (a diverged run scores +inf). Returns the best config per solver (grid table kept)."""
    prob = build_problem(cfg)
    metric = cfg["bench"]["metric"]
    ev = Evaluator(prob, [metric])
    best: dict[str, dict[str, Any]] = {}
    for name in solvers:
        scfg = cfg["solvers"][name]
        grid = scfg.get("grid", {})
        cache: dict[str, float] = {}

        def score(cand: dict[str, Any], name: str = name, cache: dict[str, float] = cache) -> float:
            key = json.dumps(cand, sort_keys=True)
            if key not in cache:
                finals = []
                for s in seeds:
                    r = run_one(prob, name, cand, s, budget=budget, n_eval=n_eval, evaluator=ev)
                    ok = r.error is None and r.metrics.get(metric)
                    finals.append(r.metrics[metric][-1] if ok else math.inf)
                cache[key] = statistics.median(finals)
                log(f"  {name:16s} {cache[key]:11.4g}  {_describe(cand)}")
            return cache[key]

        cur = {k: v for k, v in scfg.items() if k != "grid"}
        cur_score = score(cur)
        for _ in range(sweeps):
            for key in sorted(grid):
                for value in grid[key]:
                    cand = copy.deepcopy(cur)
                    _set_dotted(cand, key, value)
                    sc = score(cand)
                    if sc < cur_score:
                        cur, cur_score = cand, sc
        out = dict(cur)
        if grid:
            out["grid"] = grid
        best[name] = out
        log(f"best {name}: {cur_score:.4g}  {_describe(out)}")
    return best


