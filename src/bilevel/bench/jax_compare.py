"""bilevel (eager and compiled) vs plain jitted JAX, measured side by side in one run.

    python -m bilevel.bench.jax_compare --jax-python /path/to/jaxvenv/bin/python [--rounds 3]

JAX is an optional benchmark-only dependency: it runs in its own interpreter (``--jax-python``;
e.g. ``python -m venv jaxvenv && jaxvenv/bin/pip install jax jaxlib``) on arrays this script
writes to an ``.npz`` file, with the implementations of :mod:`bilevel.bench.jax_ref`. Without it
(or if that interpreter cannot import jax) the JAX rows are skipped with a note.

Rows (float32, one thread; the same mathematics on the same data for every library):

* hypergradient benchmark (:mod:`bilevel.bench.hypergrad` settings: λ, W 784×10 on the bundled
  5,000-image MNIST sample — 2500 train / 2500 validation, pixels in [0, 1] — T = 100 GD steps
  lr 0.5 from W = 0, CG with 30 iterations without early stop, classes-first logits Wᵀ Xᵀ):
  ``Reverse``, ``CG``, and ``Forward`` with one upper variable (a scalar λ) next to ``Reverse``;
* one outer iteration of SOBA, SABA, stocBiO, MRBO, VRBO, BSA, TTSA, AmIGO, FSLA and SUSTAIN on
  hyper-cleaning (mnist5k, batch 64, 10 inner SGD steps and 10 Neumann HVPs), eager, with
  per-oracle kernels (``compile="oracles"``) and, for the ``--step`` rows, as one compiled graph
  per iteration (``compile=True``); each cell the median of 3 runs of 20 iterations.

Each round times every row once, in the same order (bilevel eager, bilevel compiled, JAX): the
tables report the median over rounds, and ratios of medians. Compile time (first call) is
reported for the compiled and JAX rows; the break-even number of calls of compiled vs eager is
compile_s / (eager − compiled).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bilevel as bl
from bilevel import compiled as C

from ._timing import median_time
from .hypergrad import cross_entropy, make_lambda

JAX_REF = Path(__file__).with_name("jax_ref.py")
HG_STEPS, HG_LR, HG_ITERS = 100, 0.5, 30
ST = {"batch": 64, "reg": 0.2, "inner": 10, "Q": 10, "eta": 0.1, "lr_y": 0.1, "lr_x": 300.0}


def hypergrad_data(n_train: int = 2500, n_val: int = 2500, seed: int = 0) -> dict[str, np.ndarray]:
    from bilevel.datasets.mnist import mnist5k

    d = mnist5k()
    X = d.images.astype(np.float32).reshape(len(d.labels), -1) / 255.0
    y = d.labels.astype(np.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    X, y = X[perm], y[perm]
    lam = make_lambda("full", seed).numpy().astype(np.float32)
    return {"Xtr": X[:n_train], "ytr": y[:n_train], "Xva": X[n_train:n_train + n_val],
            "yva": y[n_train:n_train + n_val], "lam": lam, "steps": HG_STEPS, "lr": HG_LR,
            "iters": HG_ITERS}


def hypergrad_rows(d: dict[str, np.ndarray]) -> dict[str, Any]:
    """name -> (callable returning the hypergradient, needs compile)."""
    Xtr, ytr, Xva, yva = (torch.from_numpy(d[k]) for k in ("Xtr", "ytr", "Xva", "yva"))
    lam = torch.from_numpy(d["lam"])

    def g(lam, W):
        return cross_entropy(W, Xtr, ytr) + 0.5 * (torch.exp(lam) * W * W).sum()

    def f(lam, W):
        return cross_entropy(W, Xva, yva)

    problem = bl.Problem(f, g, name="logreg")
    W0 = torch.zeros(784, 10)
    inner = bl.inner.GD(lr=HG_LR, steps=HG_STEPS)
    rev = bl.hypergrad.Reverse(inner)
    cg = bl.hypergrad.CG(inner, iters=HG_ITERS, tol=0.0)
    lam1 = lam.mean().reshape(())  # one upper variable: a scalar λ

    def g1(lam, W):
        return cross_entropy(W, Xtr, ytr) + 0.5 * torch.exp(lam) * (W * W).sum()

    p1 = bl.Problem(f, g1, name="logreg-scalar")
    fwd = bl.hypergrad.Forward(inner)
    return {
        "reverse": lambda c: (bl.compile(rev) if c else rev)(problem, lam, W0).grad,
        "cg": lambda c: (bl.compile(cg) if c else cg)(problem, lam, W0).grad,
        "reverse-1": lambda c: rev(p1, lam1, W0).grad,
        "forward-1": lambda c: fwd(p1, lam1, W0).grad,
    }


def stochastic_data() -> tuple[Any, dict[str, np.ndarray]]:
    from bilevel.problems import hyperclean

    p = hyperclean(0.5, source="mnist5k", batch_size=ST["batch"], seed=0)
    A, lab, _ = p.lower_tensors
    Av, labv = p.upper_tensors
    return p, {"A": A.numpy(), "lab": lab.numpy(), "Av": Av.numpy(), "labv": labv.numpy(), **ST}


def stochastic_solvers() -> dict[str, Any]:
    """name -> a fresh solver with the benchmark's settings (also those of jax_ref.stochastic_cores
    and of bench.jax_check, which compares the two libraries' iterates)."""
    S = bl.solvers
    T, Q, eta, lr_y, lr_x = ST["inner"], ST["Q"], ST["eta"], ST["lr_y"], ST["lr_x"]
    return {
        "soba": lambda: S.SOBA(lr_x=lr_x, lr_y=lr_y),
        "stocbio": lambda: S.StocBiO(lr_x=lr_x, lr_y=lr_y, inner_steps=T, Q=Q, eta=eta),
        "mrbo": lambda: S.MRBO(lr_x=lr_x, lr_y=lr_y, Q=Q, eta=eta),
        "bsa": lambda: S.BSA(lr_x=lr_x, lr_y=lr_y, inner_steps=T, Q=Q, eta=eta),
        # period, momentum: also jax_ref.EXTRA
        "saba": lambda: S.SABA(lr_x=lr_x, lr_y=lr_y),
        "vrbo": lambda: S.VRBO(lr_x=lr_x, lr_y=lr_y, Q=Q, eta=eta, inner_steps=T, period=10),
        "ttsa": lambda: S.TTSA(lr_x=lr_x, lr_y=lr_y, Q=Q, eta=eta),
        "amigo": lambda: S.AmIGO(lr_x=lr_x, lr_y=lr_y, inner_steps=T, v_steps=Q),
        "fsla": lambda: S.FSLA(lr_x=lr_x, lr_y=lr_y, momentum=0.5),
        "sustain": lambda: S.SUSTAIN(lr_x=lr_x, lr_y=lr_y, momentum_x=0.5, Q=Q, eta=eta),
    }


def stochastic_rows(p: Any) -> dict[str, Any]:
    make = stochastic_solvers()

    def row(name: str):
        def run(compile: bool | str, steps: int = 20, result: bool = False) -> Any:
            kind = "fixed" if name == "saba" else "minibatch"  # SAGA memories: a fixed partition
            res = bl.solve(**p.solve_kwargs(batch_size=ST["batch"], seed=1, kind=kind),
                           solver=make[name](),
                           steps=steps, track=False, compile=compile)
            if result:
                return res
            return res.state["time"] / steps  # the solver's own clock, s per iteration

        return run

    return {k: row(k) for k in make}


def run_jax(py: str | None, data: str, task: str, reps: int) -> dict[str, Any] | None:
    if py is None:
        return None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([py, str(JAX_REF), data, task, "--reps", str(reps)], capture_output=True,
                         text=True, env=env, timeout=1800)
    if out.returncode != 0:
        print(f"JAX row {task} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jax-python", default=None, help="interpreter with jax installed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5, help="calls per row per round (hypergradients)")
    ap.add_argument("--only", default="", help="comma list of rows (default: all)")
    ap.add_argument("--step", default="soba,saba,stocbio,mrbo,bsa,ttsa,amigo,fsla,sustain,vrbo",
                    help="stochastic rows that also get the whole-step compiled column "
                         "(compile='step'; its compile time grows with the oracle calls per step)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    only = set(a.only.split(",")) if a.only else None
    tmp = tempfile.mkdtemp(prefix="bilevel-jax-")
    hd = hypergrad_data()
    np.savez(f"{tmp}/hg.npz", **hd)
    p, sd = stochastic_data()
    np.savez(f"{tmp}/st.npz", **sd)
    rows: dict[str, Any] = {**hypergrad_rows(hd), **stochastic_rows(p)}
    rows = {k: v for k, v in rows.items() if only is None or k in only}
    compiled_rows = {"reverse", "cg", "soba", "stocbio", "mrbo", "bsa",
                     "saba", "vrbo", "ttsa", "amigo", "fsla", "sustain"}
    step_rows = set(a.step.split(",")) if a.step else set()
    whole = C.stats()
    res: dict[str, dict[str, list]] = {k: {"eager": [], "compiled": [], "step": [], "jax": []}
                                       for k in rows}
    compile_s: dict[str, float] = {}
    jax_info: dict[str, Any] = {}
    hg_names = {"reverse", "cg", "reverse-1", "forward-1"}
    for k, fn in rows.items():  # warm-up: first calls (compile time of the compiled rows)
        if k in hg_names:
            fn(False)
            if k in compiled_rows:
                t0 = time.perf_counter()
                fn(True)
                compile_s[k] = time.perf_counter() - t0
        else:
            fn(False, 2)
            t0 = time.perf_counter()
            fn("oracles", 2)
            compile_s[k] = time.perf_counter() - t0
            if k not in step_rows:
                continue
            t0 = time.perf_counter()  # whole step: eager first steps, then one graph per pattern
            fn("step", 20)  # the first 20 steps' patterns (a run of the same seed draws the same)
            fn("step", 20)  # (a pattern met once, e.g. the first step's, runs compiled only now)
            compile_s[k + ":step"] = time.perf_counter() - t0
    before = C.stats()["compiles"]
    for r in range(a.rounds):
        for k, fn in rows.items():
            if k in hg_names:
                res[k]["eager"].append(median_time(lambda fn=fn: fn(False), a.reps, warmup=0)[0])
                if k in compiled_rows:
                    res[k]["compiled"].append(median_time(lambda fn=fn: fn(True), a.reps, warmup=0)[0])
            else:
                # the median of 3 runs of 20 iterations (as the JAX side: median of 3 calls)
                res[k]["eager"].append(statistics.median(fn(False) for _ in range(3)))
                res[k]["compiled"].append(statistics.median(fn("oracles") for _ in range(3)))
                if k in step_rows:
                    res[k]["step"].append(statistics.median(fn("step") for _ in range(3)))
            task = k if k in compiled_rows else None
            if task is not None:
                j = run_jax(a.jax_python, f"{tmp}/{'hg' if k in hg_names else 'st'}.npz", task,
                            a.reps if k in hg_names else 3)
                if j is not None:
                    res[k]["jax"].append(j["ms"] / 1e3)
                    jax_info[k] = j
            print(f"round {r + 1}: {k} done", file=sys.stderr, flush=True)
    recompiles = C.stats()["compiles"] - before
    # accuracy: the compiled and JAX results against eager
    check = {}
    for k in ("reverse", "cg"):
        if k in rows:
            e, c = rows[k](False), rows[k](True)
            check[k] = {"compiled_vs_eager_rel": float((c - e).norm() / e.norm())}
            if k in jax_info:
                check[k]["jax_norm"] = jax_info[k]["norm"]
                check[k]["eager_norm"] = float(e.norm())
    for k in rows:
        if k not in hg_names and k in step_rows:  # whole step vs eager after 20 iterations (float32)
            e, c = rows[k](False, result=True), rows[k]("step", result=True)
            steps_compiled = sum(bool(r.get("compiled")) for r in c.history)
            check[k] = {"step_vs_eager_rel": float((c.x - e.x).norm() / e.x.norm()),
                        "steps_compiled_of_20": steps_compiled}
    med = {k: {m: (statistics.median(v) if v else None) for m, v in d.items()} for k, d in res.items()}
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}, one thread",
              "load_avg_at_end": os.getloadavg(), "rounds": a.rounds, "median_s": med,
              "per_round_s": {k: {m: v for m, v in d.items() if v} for k, d in res.items()},
              "settings": {k: v for k, v in C.settings.items() if isinstance(v, (str, int, bool))
                           or v is None},
              "compile_s": compile_s, "recompiles_during_timed_rounds": recompiles,
              "jax": {k: {kk: v[kk] for kk in ("compile_s", "jax")} for k, v in jax_info.items()},
              "check": check}
    report["whole_step_stats"] = {k: C.stats()[k] - whole[k] for k in ("compiles", "compiled_steps",
                                                                       "eager_steps", "fallbacks")}
    print(f"{'row':12s} {'eager ms':>10s} {'compiled ms':>12s} {'JAX ms':>8s} {'comp/eager':>10s} "
          f"{'comp/JAX':>9s} {'eager/JAX':>9s} {'compile s':>9s} {'break-even':>10s} "
          f"{'step ms':>8s} {'step/JAX':>8s} {'step/eager':>10s} {'step compile s':>14s} "
          f"{'step break-even':>15s}")
    for k, m in med.items():
        e, c, j = m["eager"], m["compiled"], m["jax"]

        def fmt(v, scale=1e3, w=10, nd=2):
            return f"{v * scale:{w}.{nd}f}" if v is not None else f"{'-':>{w}s}"

        be = (compile_s.get(k, math.nan) / (e - c)) if (c is not None and e > c) else None
        print(f"{k:12s} {fmt(e)} {fmt(c, w=12)} {fmt(j, w=8)} "
              f"{fmt(c / e if c else None, 1, 10)} {fmt(c / j if c and j else None, 1, 9)} "
              f"{fmt(e / j if j else None, 1, 9)} {fmt(compile_s.get(k), 1, 9, 1)} "
              f"{(f'{be:10.0f}' if be is not None else '-'.rjust(10))}", end="")
        w = m.get("step")
        cs = compile_s.get(k + ":step")
        bw = cs / (e - w) if (w is not None and cs is not None and e > w) else None
        print(f" {fmt(w, w=8)} {fmt(w / j if w and j else None, 1, 8)} "
              f"{fmt(w / e if w else None, 1, 10)} {fmt(cs, 1, 14, 1)} "
              f"{(f'{bw:15.0f}' if bw is not None else '-'.rjust(15))}")
    if "forward-1" in med and "reverse-1" in med:
        print(f"Forward / Reverse with one upper variable: "
              f"{med['forward-1']['eager'] / med['reverse-1']['eager']:.2f}")
    print(json.dumps(report, indent=1, default=str))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
