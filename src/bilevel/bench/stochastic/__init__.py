"""Stochastic bilevel benchmark (issue 5): solvers × problems × seeds under a time budget.

    python -m bilevel.bench stochastic                 # = bilevel bench stochastic (full default run)
    python -m bilevel.bench stochastic --quick --out /tmp/q.md --img /tmp/img   (seconds; smoke test)
    python -m bilevel.bench stochastic --grid hyperclean --solvers MRBO,VRBO [--write]
    python -m bilevel.bench stochastic --whole-iteration [--solvers StocBiO,BSA] [--rounds 3]

For every problem (one TOML file per problem in ``bilevel/bench/configs/stochastic/``) and every
solver listed there, each seed runs :func:`bilevel.solve` until the solver's own clock (which
excludes evaluation, see :func:`bilevel.solve`) reaches the problem's budget, after an untimed
warm-up of a few steps on throw-away samplers. At ``n_eval`` points of the clock the run is
evaluated outside the clock: the value function h(x) = f(x, y*(x)) by an accurate inner solve,
‖∇h(x)‖, and the test error of the solver's y (which of them depends on the problem's cost, see
the config's ``eval``). The x-axes are the clock and the number of *sample-gradient calls*
(per-sample oracle calls of every kind — gradients, HVPs, cross products — counted by
:func:`bilevel.oracles.counting` and accumulated by :func:`bilevel.solve`).

Outputs: one PNG per problem (median and 20–80 % band over seeds vs time and vs calls),
``docs/stochastic.md`` (tables of the time and calls to reach each problem's target, final values,
per-iteration cost and overhead ratio on hyper-cleaning against benchopt's JAX numbers, and the
check of the reproduction report's claims), and the raw results as JSON next to the markdown.

Hyperparameters: ``[solvers.NAME]`` tables (constructor keyword arguments; ``class`` selects the
solver class when NAME is an alias, ``sampler = "fixed"`` gives :class:`bilevel.sampling.FixedBatches`
for SAGA-type memories, ``batch_size`` overrides the problem's). ``[solvers.NAME.grid]`` lists
candidate values (dotted keys reach into schedules, e.g. ``"lr_x.c" = [0.01, 0.1]``) for
``--grid``: a coordinate search (one key at a time) on short budgets that prints (``--write``:
stores) the best values.

``--whole-iteration`` times each solver's outer iteration against a hand-written loop of bare
``torch.autograd.grad`` calls doing the same iteration, alternately in one process
(:mod:`.whole`; its own options follow the flag).

Layout: :mod:`.problem` (the per-problem configurations and builders) → :mod:`.measure` (timed
runs, evaluation, aggregation, per-iteration cost, grid search) → :mod:`.report` (figures and the
markdown report); this module is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .._timing import one_thread
from .measure import Evaluator, RunResult, band, grid_search, per_iteration, reach, run_one
from .problem import (
    CONFIG_DIR,
    JAX_MS,
    LOOP,
    PROBLEMS,
    _problem_config,
    _select,
    build_problem,
    dump_config,
    load_config,
    solver_from_config,
)
from .report import NOTES, _fmt, plot_problem, summarize, write_report

__all__ = ["main", "load_config", "run_one", "RunResult", "CONFIG_DIR", "LOOP", "JAX_MS", "Evaluator", "band",
           "reach", "grid_search", "per_iteration", "build_problem", "dump_config", "solver_from_config",
           "summarize", "write_report", "plot_problem"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilevel bench stochastic", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated (default: all three)")
    p.add_argument("--solvers", help="comma-separated solver names (default: all in each config)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per solver (default 3)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every time budget")
    p.add_argument("--quick", action="store_true", help="tiny problems and budgets, 1 seed (smoke test)")
    p.add_argument("--out", default="docs/stochastic.md", help="markdown report (default docs/stochastic.md)")
    p.add_argument("--img", default="docs/img", help="folder of the PNGs (default docs/img)")
    p.add_argument("--no-timing", action="store_true", help="skip the per-iteration timing section")
    p.add_argument("--timing-only", action="store_true", help="only the per-iteration timing section")
    p.add_argument("--grid", metavar="PROBLEM", help="grid-search the hyperparameters on PROBLEM instead")
    p.add_argument("--grid-seeds", type=int, default=2)
    p.add_argument("--grid-budget", type=float, help="seconds per grid run (default: half the budget)")
    p.add_argument("--write", action="store_true", help="with --grid: store the best values in the config")
    p.add_argument("--config-dir", help="folder of <problem>.toml files (default: the packaged configs)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the figures and rewrite the report from the saved JSON results")
    p.add_argument("--whole-iteration", action="store_true",
                   help="time whole iterations against bare-autograd loops instead (bench.stochastic.whole)")
    p.add_argument("--fresh", action="store_true",
                   help="do not keep results of problems / solvers / timing from the previous JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--whole-iteration" in argv:
        from .whole import main as whole_main

        return whole_main([a for a in argv if a != "--whole-iteration"])
    args = build_parser().parse_args(argv)
    one_thread()
    config_dir = Path(args.config_dir) if args.config_dir else None
    only = args.solvers.split(",") if args.solvers else None
    seeds = 1 if args.quick else args.seeds

    if args.grid:
        cfg = _problem_config(args.grid, args.quick, config_dir)
        names = list(_select(cfg, only))
        budget = args.grid_budget or 0.5 * float(cfg["bench"]["budget"]) * args.budget_scale
        print(f"grid search on {args.grid}: {len(names)} solvers, {args.grid_seeds} seeds, {budget:g} s each")
        best = grid_search(cfg, names, seeds=range(args.grid_seeds), budget=budget,
                           n_eval=2)
        if args.write:
            path = (config_dir or CONFIG_DIR) / f"{args.grid}.toml"
            full = load_config(args.grid, path)
            full["solvers"].update(best)
            path.write_text(dump_config(full, header=CONFIG_HEADER.format(problem=args.grid)))
            print(f"wrote {path}")
        return 0

    problems = {p: _problem_config(p, args.quick, config_dir) for p in args.problems.split(",")}
    if args.replot:  # figures and report from the saved results only
        args.timing_only, args.no_timing, problems = True, True, {}
    img_dir, out_path = Path(args.img), Path(args.out)
    runs: dict[str, dict[str, list[RunResult]]] = {}
    timing = None
    t_start = time.perf_counter()
    for pname, cfg in problems.items():
        solvers = _select(cfg, only)
        if not solvers:
            continue
        b = cfg["bench"]
        need_problem = not args.timing_only or (b["builder"] == "hyperclean" and not args.no_timing)
        prob = build_problem(cfg) if need_problem else None
        if not args.timing_only:
            ev = Evaluator(prob, b.get("eval", [b["metric"]]))
            budget = float(b["budget"]) * args.budget_scale
            runs[pname] = {}
            for s, scfg in solvers.items():
                n_final = int(b.get("final_eval_seeds", seeds))  # the final h(x) may be costly
                runs[pname][s] = [run_one(prob, s, scfg, seed, budget=budget, n_eval=int(b.get("n_eval", 8)),
                                          evaluator=ev, final_kinds=b.get("final_eval", []) if seed < n_final
                                          else [k for k in b.get("final_eval", []) if k in ev.kinds])
                                  for seed in range(seeds)]
                d = summarize(runs[pname][s], b["metric"], float(b["target"]))
                print(f"[{time.perf_counter() - t_start:6.0f}s] {pname:10s} {s:22s} {b['metric']}="
                      f"{_fmt(d['final'])}  t2t={_fmt(d['t2t'])}  steps={_fmt(d['steps'])}"
                      + (f"  ERROR {d['errors'][0]}" if d["errors"] else ""), flush=True)
        if b["builder"] == "hyperclean" and not args.no_timing:
            tcfg = cfg.get("timing", {})
            timing = per_iteration(prob, solvers, steps=int(tcfg.get("steps", 10)),
                                   iters=int(tcfg.get("iters", 30)),
                                   max_seconds=float(tcfg.get("max_seconds", 3)),
                                   batch_size=int(cfg["problem"].get("batch_size", 64)))
            for r in timing:
                print(f"  timing {r['solver']:22s} " + (f"{r['ms']:.3g} ms/iter, overhead {r['overhead']:.2f}"
                                                        if "error" not in r else r["error"]), flush=True)
    command = "python -m bilevel.bench stochastic " + " ".join(argv)
    raw_path = out_path.with_suffix(".json")
    if raw_path.exists() and not args.quick and not args.fresh:  # keep what this call did not redo
        old = json.loads(raw_path.read_text())
        for pname, d in old.get("runs", {}).items():
            if pname not in runs:
                runs[pname] = {s: [RunResult(**r) for r in rs] for s, rs in d.items()}
            else:
                for s, rs in d.items():
                    runs[pname].setdefault(s, [RunResult(**r) for r in rs])
        if timing is None:
            timing = old.get("timing")
        for pname in runs:
            if pname not in problems and pname in PROBLEMS:
                problems[pname] = _problem_config(pname, False, config_dir)
        problems = {p: problems[p] for p in PROBLEMS if p in problems}
        if args.replot:
            command, seeds = old.get("command", command), int(old.get("seeds", seeds))
    for pname, d in runs.items():
        if pname in problems:
            b = problems[pname]["bench"]
            plot_problem(pname, d, b["metric"], img_dir / f"stochastic_{pname}.png",
                         bool(b.get("log_y", False)), b.get("title", pname))
    write_report(out_path, img_dir, problems, runs, timing, command.strip(), seeds, NOTES)
    raw = {p: {s: [asdict(r) for r in rs] for s, rs in d.items()} for p, d in runs.items()}
    meta = {"command": command.strip(), "seeds": seeds}
    raw_path.write_text(json.dumps({**meta, "runs": raw, "timing": timing}, default=str))
    print(f"wrote {out_path} ({time.perf_counter() - t_start:.0f} s)")
    return 0


CONFIG_HEADER = """\
Stochastic benchmark configuration for the {problem} problem (bilevel.bench.stochastic).
[bench]: builder, metric and target of the tables, budget (solver seconds per run), evaluation.
[problem]: keyword arguments of the problem builder. [quick]: overrides for --quick.
[solvers.NAME]: constructor keyword arguments (schedules as {{c, e, t0}} = c/(t+t0)^e);
  class = solver class for aliases, sampler = "fixed" for SAGA-type memories.
[solvers.NAME.grid]: candidates for `bilevel bench stochastic --grid {problem} [--write]`.
Written by --grid --write (the values above the grid tables are the tuned ones)."""
