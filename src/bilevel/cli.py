"""The ``bilevel`` command line.

    bilevel list                                   estimators, solvers, experiments, data sets
    bilevel run EXPERIMENT [--config F.toml] [--set key=value ...] [--out DIR] [--seed N]
                           [--resume DIR] [--stop-after N] [--no-progress] [--nproc N]
    bilevel plot RUN_DIR [RUN_DIR ...] [--out DIR] [--metrics a,b] [--x step,time,calls]
    bilevel bench NAME [ARGS ...]                  runs bilevel.bench.NAME.main(ARGS)
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from .errors import BilevelError, ConfigError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilevel", description="Gradient-based bilevel optimization on PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="list estimators, solvers, experiments and data sets")

    r = sub.add_parser("run", help="run an experiment (writes a run folder)")
    r.add_argument("experiment", help="experiment name (see `bilevel list`)")
    r.add_argument("--config", metavar="FILE.toml", help="TOML file overriding the defaults")
    r.add_argument("--set", dest="sets", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="override config values, e.g. --set steps=50 model.kind=mlp")
    r.add_argument("--out", metavar="DIR", help="run folder (default runs/<experiment>-<timestamp>)")
    r.add_argument("--seed", type=int, help="random seed (overrides the config's seed)")
    r.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    r.add_argument("--stop-after", type=int, metavar="N",
                   help="stop this session after N steps (checkpointed; continue with --resume)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel on N local processes (torchrun; see docs/distributed.md)")

    pl = sub.add_parser("plot", help="overlay the traces of several runs")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", metavar="DIR", default="plots", help="output folder (default ./plots)")
    pl.add_argument("--metrics", help="comma-separated metrics (default: those evaluated)")
    pl.add_argument("--x", default="step,time", help="x axes: step, time, calls (default step,time)")
    pl.add_argument("--labels", help="comma-separated legend labels, one per RUN_DIR")

    b = sub.add_parser("bench", help="run a benchmark: bilevel.bench.NAME.main(ARGS)")
    b.add_argument("name")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _cmd_list() -> int:
    from . import datasets
    from .experiments import available
    from .experiments.factory import (
        DYNAMICS_ALIASES,
        ESTIMATOR_ALIASES,
        SOLVER_ALIASES,
        estimator_classes,
        solver_classes,
    )

    def section(title: str, items: dict[str, str]) -> None:
        print(title)
        width = max((len(k) for k in items), default=0)
        for k, v in items.items():
            print(f"  {k.ljust(width)}  {v or '(no reference)'}")
        print()

    section("Estimators (bilevel.hypergrad):",
            {k: getattr(c, "reference", "") for k, c in estimator_classes().items()})
    section("Solvers (bilevel.solvers):",
            {k: getattr(c, "reference", "") for k, c in solver_classes().items()})
    section("Experiments (bilevel run NAME):",
            {k: f"{c.description} [{c.reference}]" if c.reference else c.description
             for k, c in available().items()})
    def aliases(table: dict) -> dict[str, str]:
        out: dict[str, list[str]] = {}
        for alias, target in table.items():
            name, fixed = (target, {}) if isinstance(target, str) else target
            label = name + "".join(f" {k}={v!r}" for k, v in fixed.items())
            out.setdefault(label, []).append(alias)
        return {k: ", ".join(v) for k, v in sorted(out.items())}

    section("Estimator aliases:", aliases(ESTIMATOR_ALIASES))
    section("Solver aliases:", aliases(SOLVER_ALIASES))
    section("Dynamics aliases:", aliases(DYNAMICS_ALIASES))
    section("Datasets (bilevel.datasets):", {k: d.reference + ("" if d.offline else " [download]")
                                             for k, d in datasets.DATASETS.items()})
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from . import launch
    from .experiments import run

    if launch.in_launch():  # one rank of a torchrun / --nproc launch
        run = launch.run_rank  # noqa: F811
    res = run(a.experiment, config_file=a.config, overrides=list(a.sets), out=a.out, seed=a.seed,
              resume=a.resume, stop_after=a.stop_after, progress=not a.no_progress)
    # (a rank of a launch exits 0 when stopped early: torchrun treats any other code as a crash)
    return 0 if res.completed or launch.in_launch() else 3


def _cmd_plot(a: argparse.Namespace) -> int:
    from .experiments.plots import plot_runs

    xs = [x.strip() for x in a.x.split(",") if x.strip()]
    bad = [x for x in xs if x not in ("step", "time", "calls")]
    if bad:
        raise ConfigError(f"--x: unknown axis {', '.join(bad)} (use step, time, calls)")
    labels = [s.strip() for s in a.labels.split(",")] if a.labels else None
    if labels is not None and len(labels) != len(a.runs):
        raise ConfigError(f"--labels has {len(labels)} entries for {len(a.runs)} run folders")
    metrics = [m.strip() for m in a.metrics.split(",")] if a.metrics else None
    try:
        files = plot_runs(a.runs, a.out, labels=labels, metrics=metrics, xs=xs)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    for f in files:
        print(f)
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    modname = a.name.replace("-", "_")
    try:
        mod = importlib.import_module(f"bilevel.bench.{modname}")
    except ModuleNotFoundError as e:
        if e.name not in ("bilevel.bench", f"bilevel.bench.{modname}"):
            raise
        try:
            pkg = importlib.import_module("bilevel.bench")
            names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
        except ModuleNotFoundError:
            names = []
        raise ConfigError(f"unknown benchmark {a.name!r}; available: {', '.join(names) or '(none)'}") from e
    if not hasattr(mod, "main"):
        raise ConfigError(f"bilevel.bench.{modname} has no main(argv)")
    rc = mod.main(list(a.args))
    return int(rc or 0)


def _in_launch() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run" and args.nproc != 1 and not _in_launch():
            from .launch import launch_cli, strip_nproc

            return launch_cli(strip_nproc(list(sys.argv[1:] if argv is None else argv))[0], args.nproc)
        if args.command == "list":
            return _cmd_list()
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "plot":
            return _cmd_plot(args)
        return _cmd_bench(args)
    except ConfigError as e:
        print(f"bilevel: config error: {e}", file=sys.stderr)
        return 2
    except BilevelError as e:
        print(f"bilevel: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bilevel: interrupted (resume a run from its last checkpoint with --resume DIR)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
