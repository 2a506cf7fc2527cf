"""The experiment runner behind ``bilevel run``: run folder, trace, checkpoints, resume, summary.

Run folder layout::

    config.toml          resolved configuration (reads back to the same run)
    run.json             experiment name and kind
    trace.jsonl          one JSON record per evaluation: step, time (solver wall time, evaluation
                         excluded), oracle-call counts, upper_loss, lower_loss, metrics
    extras.json          baselines computed once at the start (e.g. noisy / oracle accuracy)
    checkpoints/last.pt  solver state + solver internals + samplers + RNG (torch.save)
    summary.md           markdown table (written when the run completes)
    result.json          final record, extras and timing (written when the run completes)
    plots/*.png          metrics vs steps and vs time

A table run holds one such folder per sub-run under ``runs/`` (their figures are left to
``bilevel plot``) and writes ``summary.md``, ``result.json`` and overlay ``plots/`` itself.

The loop is :func:`bilevel.solve` with a callback; its resumable ``state`` dict is checkpointed
together with every other source of randomness, so ``--resume`` continues a run and produces the
same trace as an uninterrupted run with the same seed (wall times excepted).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _tree as T
from .. import distributed as D
from .. import oracles as O
from ..errors import BilevelError, ConfigError
from ..formulation import Bound
from ..solvers.base import solve
from . import checkpoint as CK
from . import config as C
from .base import Experiment, Setup, SubResult, Table, fmt, get, run_compile
from .trace import Callback, load_trace, make_loggers

__all__ = ["run", "RunResult", "new_run_dir", "seed_everything", "load_trace"]

CHECKPOINTS = Path("checkpoints")
CHECKPOINT = CHECKPOINTS / CK.LAST
#: config keys that may change when resuming (extending a finished run)
RESUMABLE_KEYS = {"steps", "checkpoint_every", "compile"}


@dataclass
class RunResult:
    path: Path
    completed: bool
    final: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


# --- helpers ----------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


_SKIP = object()
_DATA = (type(None), bool, int, float, str)


def _snap(v: Any, seen: set[int]) -> Any:
    """A checkpointable copy of an attribute value, or _SKIP (functions, foreign objects)."""
    if isinstance(v, _DATA):
        return ("v", v)
    if isinstance(v, Tensor):
        return ("v", v.detach().clone())
    if isinstance(v, torch.Generator):
        return ("gen", v.get_state())
    if isinstance(v, (tuple, list)) and all(isinstance(u, (Tensor, *_DATA)) for u in v):
        return ("v", type(v)(u.detach().clone() if isinstance(u, Tensor) else u for u in v))
    if isinstance(v, dict) and all(isinstance(u, (Tensor, *_DATA)) for u in v.values()):
        return ("v", {k: (u.detach().clone() if isinstance(u, Tensor) else u) for k, u in v.items()})
    if hasattr(v, "state_dict") and hasattr(v, "load_state_dict") and not isinstance(v, torch.nn.Module):
        return ("sd", v.state_dict())
    if type(v).__module__.startswith("bilevel.") and hasattr(v, "__dict__") and id(v) not in seen:
        seen.add(id(v))
        return ("obj", _capture(v, seen))
    return _SKIP


def _capture(obj: Any, seen: set[int] | None = None) -> dict[str, Any]:
    """Internal state of a solver and the objects it owns (estimator warm starts, generators, ...)."""
    seen = {id(obj)} if seen is None else seen
    out = {}
    for k, v in vars(obj).items():
        s = _snap(v, seen)
        if s is not _SKIP:
            out[k] = s
    return out


def _restore(obj: Any, snap: Mapping[str, Any]) -> None:
    for k, (tag, val) in snap.items():
        if tag == "v":
            setattr(obj, k, val)
        elif tag == "gen":
            getattr(obj, k).set_state(val)
        elif tag == "sd":
            getattr(obj, k).load_state_dict(val)
        elif tag == "obj":
            _restore(getattr(obj, k), val)


def _to_device(v: Any, device: str) -> Any:
    """The solver state loaded on the CPU, moved to the run's device (RNG states stay on the CPU)."""
    if isinstance(v, Tensor):
        return v.to(device)
    if isinstance(v, dict) and type(v) is dict:
        return {k: _to_device(u, device) for k, u in v.items()}
    if isinstance(v, (list, tuple)) and type(v) in (list, tuple):
        return type(v)(_to_device(u, device) for u in v)
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    if isinstance(v, _DATA):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(u) for k, u in v.items()}
    return str(v)


def new_run_dir(name: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """``out`` (must not hold a run) or ``runs/<name>-<timestamp>`` (suffixed if taken)."""
    if out is not None:
        p = Path(out)
        if (p / "run.json").exists():
            raise ConfigError(f"{p} already holds a run; use --resume {p} or another --out")
        p.mkdir(parents=True, exist_ok=True)
        return p
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    p, i = base, 1
    while p.exists():
        i += 1
        p = base.with_name(f"{base.name}-{i}")
    p.mkdir(parents=True)
    return p


def _write_json(path: Path, obj: Any) -> None:
    CK.write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional extra
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


# --- public entry point ------------------------------------------------------------------------
def run(
    name: str,
    *,
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    seed: int | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    plots: bool = True,
    echo: Callable[[str], None] | None = print,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Run (or resume) experiment ``name``; see the module docstring for the folder layout.

    ``callbacks``: :class:`~bilevel.experiments.trace.Callback` objects that receive every trace
    record (besides the ``loggers`` of the config: ``csv``, ``tensorboard``).
    ``overrides``: ``["key=value", ...]`` (strings parsed like ``--set``) or ``{key: value}``.
    ``stop_after``: end this session after that many steps (a checkpoint is written first).
    ``plots=False`` skips the figures (tests).
    """
    exp = get(name)
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"stop_after must be >= 1, got {stop_after}")
    sets = C.parse_sets(overrides) if isinstance(overrides, (list, tuple)) else dict(overrides or {})
    if resume is not None:
        path = Path(resume)
        meta_file = path / "run.json"
        if not meta_file.is_file():
            raise ConfigError(f"{path} is not a run folder (no run.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("experiment") != name:
            raise ConfigError(f"{path} is a run of {meta.get('experiment')!r}, not {name!r}")
        if config_file is not None:
            raise ConfigError("--config cannot be combined with --resume (the run keeps its config)")
        bad = sorted(set(sets) - RESUMABLE_KEYS)
        if bad:
            raise ConfigError(f"cannot change {', '.join(bad)} when resuming (only "
                              f"{', '.join(sorted(RESUMABLE_KEYS))})")
        saved = C.read(path / "config.toml")
        if seed is not None and seed != saved.get("seed"):
            raise ConfigError(f"--seed {seed} differs from the run's seed {saved.get('seed')}")
        cfg = exp.resolve(file=saved, overrides=sets)
        explicit: set[str] = set()  # checked when the run started
    else:
        if seed is not None:
            sets["seed"] = seed
        file = C.read(config_file) if config_file else None
        cfg = exp.resolve(file=file, overrides=sets)
        explicit = set(C.flatten(file or {})) | set(sets)
        path = new_run_dir(name, out)
        _write_json(path / "run.json", {"experiment": name, "kind": exp.kind})
    CK.write_text(path / "config.toml", C.dumps(cfg))
    try:
        if isinstance(exp, Table):
            return _run_table(exp, cfg, path, stop_after=stop_after, progress=progress, plots=plots,
                              echo=echo, callbacks=callbacks)
        return _run_single(exp, cfg, path, resume=resume is not None, stop_after=stop_after,
                           progress=progress, plots=plots, echo=echo, explicit=explicit, callbacks=callbacks)
    except BilevelError:
        if resume is None:  # rejected while building (bad config, missing data): no half-made folder
            _remove_fresh_run(path)
        raise


def _remove_fresh_run(path: Path) -> None:
    if (path / CHECKPOINTS).exists() or (path / "runs").exists() or load_trace(path):
        return  # the run got going: keep its partial trace for inspection
    for name in ("config.toml", "run.json", "trace.jsonl", "extras.json"):
        (path / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the user's folder with other content: keep it
        path.rmdir()


# --- single run --------------------------------------------------------------------------------
def _losses(setup: Setup, x: Any, y: Any) -> dict[str, float]:
    up = None if setup.upper_data is None else setup.upper_data.full()
    lo = None if setup.lower_data is None else setup.lower_data.full()
    with torch.no_grad(), O.counting():
        return {"upper_loss": float(setup.problem.f(x, y, up)),
                "lower_loss": float(setup.problem.g(x, y, lo))}


def lower_optimality(setup: Setup, x: Any, y: Any, lower_star: bool = True) -> dict[str, float]:
    """``lower_grad_norm`` ‖∇_y g(x, y)‖ on the full lower data (with a y-projection P the norm of
    the projected-gradient step y − P(y − ∇_y g), zero exactly at a constrained stationary point)
    and, where the setup knows the best lower value g*(x), ``lower_gap`` = g(x, y) − g*(x)."""
    lo = None if setup.lower_data is None else setup.lower_data.full()
    b = Bound(setup.problem, x, y, lower_batch=lo)
    with O.counting():  # diagnostics: not part of the run's oracle counts
        gy = O.grad_y(b.G, b.xs, b.ys0)
        out: dict[str, float] = {}
        if setup.lower_prox is not None:  # proximal lower level: the prox-gradient mapping
            step = tuple(t - setup.lower_prox(t - g) for t, g in zip(b.ys0, gy))
        elif setup.y_projection is not None:
            step = tuple(t - setup.y_projection(t - g) for t, g in zip(b.ys0, gy))
        else:
            step = gy
        out["lower_grad_norm"] = float(torch.sqrt(sum((t.double() ** 2).sum() for t in step)))
        if lower_star and setup.lower_star is not None:
            with torch.no_grad():
                g_val = float(setup.problem.g(x, y, lo))
            out["lower_gap"] = g_val - float(setup.lower_star(x, y))
    return out


def lower_verdict(trace: Sequence[dict[str, Any]], final: dict[str, Any], tol: float,
                  g_star: float | None = None, by_design: str = "") -> dict[str, Any]:
    """Is the lower level solved at the end? By the gap to g* where known (gap ≤ tol·max(1, |g*|)),
    else by the stationarity measure relative to the start (‖∇_y g‖ ≤ tol·max(1, ‖∇_y g‖ at step 0)).
    ``by_design``: the lower level is not an argmin (the reason); ``solved`` is then None."""
    out: dict[str, Any] = {"tol": tol}
    if by_design:
        gn = final.get("lower_grad_norm")
        out.update(solved=None, criterion=f"not judged: {by_design}")
        if isinstance(gn, (int, float)):
            out["grad_norm"] = gn
        return out
    gn = final.get("lower_grad_norm")
    g0 = trace[0].get("lower_grad_norm") if trace else None
    if isinstance(gn, (int, float)):
        out["grad_norm"] = gn
        if isinstance(g0, (int, float)):
            out["grad_norm_start"] = g0
    gap = final.get("lower_gap")
    if isinstance(gap, (int, float)):
        out["gap"] = gap
        scale = max(1.0, abs(g_star)) if g_star is not None else 1.0
        out["criterion"] = f"gap to the best known lower value <= {tol:g} x {scale:.3g}"
        out["solved"] = bool(gap <= tol * scale)
    elif isinstance(gn, (int, float)):
        scale = max(1.0, g0) if isinstance(g0, (int, float)) else 1.0
        out["criterion"] = f"||grad_y g|| <= {tol:g} x max(1, ||grad_y g|| at step 0) = {tol * scale:.3g}"
        out["solved"] = bool(gn <= tol * scale)
    return out


def lower_line(v: Mapping[str, Any]) -> str:
    """One markdown line for the summary: the lower-level optimality and the verdict."""
    if "solved" not in v:
        return ""
    parts = [f"‖∇_y g‖ = {fmt(v.get('grad_norm'))}"]
    if "gap" in v:
        parts.append(f"g − g* = {fmt(v['gap'])}")
    if v["solved"] is None:
        return f"\nlower level at the end: {', '.join(parts)} — {v['criterion']}\n"
    flag = "solved" if v["solved"] else "**NOT SOLVED**"
    return f"\nlower level at the end: {', '.join(parts)} — {flag} ({v['criterion']})\n"


def _run_single(
    exp: Experiment,
    cfg: dict[str, Any],
    path: Path,
    *,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    plots: bool,
    echo: Callable[[str], None] | None,
    label: str | None = None,
    explicit: set[str] | frozenset[str] = frozenset(),
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    threads = int(cfg.get("threads", 0))
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _single(exp, cfg, path, resume=resume, stop_after=stop_after, progress=progress, plots=plots,
                       echo=echo, label=label, explicit=explicit, callbacks=callbacks)
    finally:
        torch.set_num_threads(before)


def check_unused(exp: Experiment, setup: Setup, explicit: set[str] | frozenset[str]) -> None:
    """Reject config keys set explicitly that the built configuration does not read."""
    bad = sorted(set(explicit) & set(setup.unused))
    if bad:
        what = setup.info.get("solver", "this configuration")
        raise ConfigError(
            f"{exp.name}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not used by {what}; "
            f"remove {'it' if len(bad) == 1 else 'them'} or choose a solver that takes "
            f"{'it' if len(bad) == 1 else 'them'} (unused keys here: {', '.join(sorted(setup.unused))})")


def check_placement(exp: Experiment, setup: Setup, cfg: dict[str, Any]) -> None:
    """The variables must live on the configured ``device`` (and ``dtype``, when one is given)."""
    from .base import run_device, run_dtype

    if "device" not in cfg:
        return
    dev = run_device(cfg)
    want = run_dtype(cfg, torch.float32) if cfg.get("dtype") else None
    leaves = [t for tree in (setup.x0, setup.y0) if not callable(tree) or isinstance(tree, Tensor)
              for t in T.flatten(tree)[0]]
    for t in leaves:
        if t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index):
            raise ConfigError(f"{exp.name}: device={cfg['device']} is not applied by this experiment (its "
                              f"variables are on {t.device}); it must build them with run_device(cfg)")
        if want is not None and t.is_floating_point() and t.dtype != want:
            raise ConfigError(f"{exp.name}: dtype={cfg['dtype']} is not applied by this experiment (its "
                              f"variables are {t.dtype}); it must build them with run_dtype(cfg, ...)")


def _single(exp, cfg, path, *, resume, stop_after, progress, plots, echo, label, explicit,
            callbacks) -> RunResult:
    cbs = make_loggers(cfg.get("loggers", "")) + list(callbacks)
    result = None
    try:
        result = _single_session(exp, cfg, path, resume=resume, stop_after=stop_after, progress=progress,
                                 plots=plots, echo=echo, label=label, explicit=explicit, cbs=cbs)
        return result
    finally:
        for cb in cbs:
            cb.on_end(result)


def _single_session(exp, cfg, path, *, resume, stop_after, progress, plots, echo, label, explicit,
                    cbs) -> RunResult:
    wall0 = time.perf_counter()
    steps, every, ck_every = int(cfg["steps"]), int(cfg["eval_every"]), int(cfg["checkpoint_every"])
    compile_mode = run_compile(cfg)
    seed_everything(int(cfg["seed"]))
    from ..launch import shard_setup

    setup = exp.build(cfg)
    check_unused(exp, setup, explicit)
    check_placement(exp, setup, cfg)
    setup = shard_setup(setup)  # data-parallel launch: this rank's shard (else as is)
    # steps=0 runs solver.init (and its side effects) and hands back the state dict we keep
    state = solve(setup.problem, setup.x0, setup.y0, solver=setup.solver, steps=0,
                  x_projection=setup.x_projection, y_projection=setup.y_projection,
                  lower_data=setup.lower_data, upper_data=setup.upper_data, track=False).state
    samplers = {"lower": setup.lower_data, "upper": setup.upper_data}
    ckpt_dir, trace_file = path / CHECKPOINTS, path / "trace.jsonl"
    session = {"eval_time": 0.0, "wall_time": 0.0, "baseline_time": 0.0}
    ck, ck_file, problems = CK.load_latest(ckpt_dir) if resume else (None, None, [])
    if echo:
        for msg in problems:
            echo(f"skipping a bad checkpoint: {msg}" + (f"; using {ck_file.name}" if ck_file else ""))
    if ck is not None:
        state.clear()
        state.update(_to_device(ck["state"], cfg.get("device", "cpu") or "cpu"))
        _restore(setup.solver, ck["solver"])
        for k, s in samplers.items():
            if s is not None and ck["samplers"].get(k) is not None:
                s.load_state_dict(ck["samplers"][k])
        for k, obj in setup.stateful.items():
            obj.load_state_dict(ck["stateful"][k])
        _set_rng_state(ck["rng"])
        extras, session = ck["extras"], ck["session"]
        t_ck = int(state["t"])
        kept = [r for r in load_trace(path) if r["step"] <= t_ck]
        CK.write_text(trace_file, "".join(json.dumps(r) + "\n" for r in kept))
        fresh = False
    else:
        if resume and echo:
            echo(f"{path}: no checkpoint yet, starting from step 0")
        CK.write_text(trace_file, "")
        t_b = time.perf_counter()
        extras = setup.baselines() if setup.baselines is not None else {}
        session["baseline_time"] = time.perf_counter() - t_b
        _write_json(path / "extras.json", extras)
        fresh = True
    plot_metrics: list[str] = list(setup.plot_metrics or [])
    start_t = int(state["t"])
    live = {"state": state}  # bl.solve never mutates the state passed in: the callback gets the live one
    for cb in cbs:
        cb.on_start(path, cfg, load_trace(path))

    tree = Bound(setup.problem, setup.x0, setup.y0)

    def evaluate(x: Any, y: Any, record: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = {**_losses(setup, x, y), **(setup.evaluate(x, y) if setup.evaluate else {})}
        star = record["step"] == steps or not setup.lower_star_final_only
        # the lower level is judged at the x it was solved for (hypergradient descent: (x_t, y_t),
        # not the reported (x_{t+1}, y_t))
        lx, ly = setup.solver.lower_pair(live["state"])
        metrics.update(lower_optimality(setup, tree.x_tree(lx), tree.y_tree(ly), lower_star=star))
        session["eval_time"] += time.perf_counter() - t0
        # data-parallel: every rank counts its shard's evaluations; the trace has the union's
        counts = D.sum_counts(dict(live["state"]["counts"].flat()))
        diag = {k: v for k, v in record.items()
                if k not in ("step", "time") and k not in counts and k not in metrics}
        rec = {"step": record["step"], "time": record["time"], **metrics, **diag, **counts,
               "calls": sum(counts.values())}
        rec = _jsonable(rec)
        if not plot_metrics:
            plot_metrics.extend(metrics)
        with open(trace_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        for cb in cbs:
            cb.on_record(rec)
        return rec

    def save_checkpoint() -> None:
        session_now = {**session, "wall_time": session["wall_time"] + time.perf_counter() - wall0}
        blob = {
            "experiment": exp.name, "step": int(live["state"]["t"]), "state": live["state"],
            "solver": _capture(setup.solver),
            "samplers": {k: (s.state_dict() if s is not None else None) for k, s in samplers.items()},
            "stateful": {k: obj.state_dict() for k, obj in setup.stateful.items()},
            "rng": _rng_state(), "extras": extras, "session": session_now,
        }
        CK.save(ckpt_dir, blob)


    if fresh:
        xs, ys = setup.solver.output(state)
        evaluate(tree.x_tree(xs), tree.y_tree(ys), {"step": 0, "time": 0.0})
    bar = _progress_bar(steps, start_t, label or exp.name, progress and start_t < steps)
    shown = list(setup.progress)
    last: dict[str, Any] = {}

    def callback(t: int, x: Any, y: Any, record: dict[str, Any], state: dict[str, Any]) -> bool:
        nonlocal last
        live["state"] = state
        if bar is not None:
            bar.update(1)
        if t % every == 0 or t == steps:
            last = evaluate(x, y, record)
            if bar is not None:
                post = {"UL": f"{last['upper_loss']:.4g}"}
                post.update({k: f"{last[k]:.4g}" for k in shown if isinstance(last.get(k), float)})
                bar.set_postfix(post, refresh=False)
        stop = stop_after is not None and t - start_t >= stop_after
        if (ck_every and t % ck_every == 0) or t == steps or stop:
            save_checkpoint()
        return stop

    try:
        if start_t < steps:
            live["state"] = solve(setup.problem, setup.x0, setup.y0, solver=setup.solver, steps=steps,
                  x_projection=setup.x_projection, y_projection=setup.y_projection,
                  lower_data=setup.lower_data, upper_data=setup.upper_data, track=False,
                  state=state, callback=callback, compile=compile_mode).state
    finally:
        if bar is not None:
            bar.close()
    session["wall_time"] += time.perf_counter() - wall0
    state = live["state"]
    done = int(state["t"])
    from .plots import plot_run

    if plots:
        refs = {m: {lab: extras[k] for lab, k in d.items() if isinstance(extras.get(k), (int, float))}
                for m, d in setup.plot_refs.items()}
        plot_run(path, plot_metrics, refs=refs)
    info = {"steps": done, "solver_time_s": float(state["time"]), "eval_time_s": session["eval_time"],
            "baseline_time_s": session["baseline_time"], "wall_time_s": session["wall_time"]}
    if done < steps:
        if echo:
            from ..launch import resume_command

            echo(f"stopped at step {done}/{steps}; continue with: {resume_command(exp.name, path)}")
        return RunResult(path, False, last, extras, info)
    trace = load_trace(path)
    final = trace[-1] if trace else {}
    g_star = None
    if setup.lower_star is not None and isinstance(final.get("lower_gap"), (int, float)):
        g_star = float(final["lower_loss"]) - float(final["lower_gap"])
    verdict = lower_verdict(trace, final, float(cfg.get("lower_tol", 1e-2)), g_star, setup.lower_by_design)
    info["lower"] = verdict
    if "solver" in setup.info:
        info["solver"] = setup.info["solver"]
    info["unused_keys"] = sorted(setup.unused)
    summary = exp.summarize(cfg, final, extras, info)
    if "solver" in setup.info and setup.info["solver"] not in summary:
        summary += f"\nsolver: {setup.info['solver']}\n"
    if setup.unused:
        summary += f"\nconfig keys not used by this solver: {', '.join(sorted(setup.unused))}\n"
    summary += lower_line(verdict)
    CK.write_text(path / "summary.md", summary)
    _write_json(path / "result.json", {"completed": True, "final": final, "extras": extras, "info": info,
                                       "setup": setup.info, "plot_metrics": plot_metrics})
    if echo and verdict.get("solved") is False:
        echo(f"warning: the lower level is not solved at the end ({verdict['criterion']})")
    if echo:
        echo(summary)
        echo(f"run folder: {path}")
    return RunResult(path, True, final, extras, info, summary)


# --- tables -------------------------------------------------------------------------------------
def _run_table(
    exp: Table,
    cfg: dict[str, Any],
    path: Path,
    *,
    stop_after: int | None,
    progress: bool,
    plots: bool,
    echo: Callable[[str], None] | None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    wall0 = time.perf_counter()
    subs = exp.runs(cfg)
    folders = [s.folder for s in subs]
    if len(set(folders)) != len(folders):
        raise ConfigError(f"{exp.name}: sub-runs must have distinct (label, seed) pairs")
    results: list[SubResult] = []
    failed: list[dict[str, Any]] = []  # sub-runs whose method failed numerically (NaN, breakdown)
    for i, sr in enumerate(subs):
        sub_exp = get(sr.experiment)
        if isinstance(sub_exp, Table):
            raise ConfigError(f"{exp.name}: sub-run {sr.label!r} is itself a table")
        sub_dir = path / "runs" / sr.folder
        done_file = sub_dir / "result.json"
        if done_file.is_file():
            res = json.loads(done_file.read_text())
            results.append(SubResult(sr, sub_dir, res["final"], res["extras"], res["info"]))
            continue
        if (sub_dir / "failed.json").is_file():  # deterministic: a resumed table does not rerun it
            failed.append(json.loads((sub_dir / "failed.json").read_text()))
            continue
        resuming = (sub_dir / "config.toml").is_file()
        if resuming:
            sub_cfg = sub_exp.resolve(file=C.read(sub_dir / "config.toml"))
        else:
            sub_cfg = sub_exp.resolve(overrides={**sr.overrides, "seed": sr.seed})
            sub_dir.mkdir(parents=True, exist_ok=True)
            _write_json(sub_dir / "run.json", {"experiment": sr.experiment, "kind": "single",
                                               "label": sr.label, "table": exp.name})
            CK.write_text(sub_dir / "config.toml", C.dumps(sub_cfg))
        try:
            r = _run_single(sub_exp, sub_cfg, sub_dir, resume=resuming, stop_after=stop_after,
                            progress=progress, plots=False, echo=None,
                            label=f"[{i + 1}/{len(subs)}] {sr.label} s{sr.seed}", callbacks=callbacks)
        except ConfigError:
            raise
        except BilevelError as exc:  # the method failed on this sub-run: record it, run the others
            fail = {"label": sr.label, "seed": sr.seed, "path": str(sub_dir),
                    "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            _write_json(sub_dir / "failed.json", fail)
            failed.append(fail)
            if echo:
                echo(f"  {sr.label} (seed {sr.seed}): FAILED — {fail['error']}")
            continue
        if not r.completed:
            if echo:
                from ..launch import resume_command

                echo(f"stopped in sub-run {sr.folder}; continue with: "
                     f"{resume_command(exp.name, path)}")
            return RunResult(path, False, info={"wall_time_s": time.perf_counter() - wall0})
        results.append(SubResult(sr, sub_dir, r.final, r.extras, r.info))
        if echo:
            shown = ", ".join(f"{c}={r.final[c]:.4g}" for c in exp.columns
                              if isinstance(r.final.get(c), float))
            echo(f"  {sr.label} (seed {sr.seed}): {shown}  [{r.info['wall_time_s']:.1f} s]")
    summary = exp.summarize_table(cfg, results) if results else ""
    if failed:  # the table above summarizes the completed sub-runs only
        summary += (f"\n**{len(failed)} of {len(subs)} sub-runs failed** (not in the table above):\n\n"
                    + "".join(f"* {f['label']} (seed {f['seed']}): {f['error']}\n" for f in failed))
    CK.write_text(path / "summary.md", summary)
    info = {"runs": len(results), "failed": len(failed), "wall_time_s": time.perf_counter() - wall0}
    _write_json(path / "result.json", {"completed": True, "info": info,
                                       "runs": [{"label": r.run.label, "seed": r.run.seed,
                                                 "path": str(r.path), "final": r.final} for r in results],
                                       "failed": failed})
    if plots and results:
        from .plots import plot_runs

        plot_runs([r.path for r in results], path / "plots", labels=[r.run.label for r in results],
                  metrics=list(exp.columns) or None)
    if echo:
        echo(summary)
        echo(f"run folder: {path}")
    return RunResult(path, True, {}, {}, info, summary)
