"""``bilevel bench metalearning``: the cost of one MAML meta-step on a meta-batch of tasks.

Sinusoid regression (Finn et al. 2017, Sec. 5.1), MLP 1-40-40-1, K inner GD steps, meta-batch B
(defaults 5 and 32), float32, one thread. Three ways to compute the same second-order
meta-gradient:

* ``vmapped`` — ``bl.meta.MAML.meta_grad(vmap=True)``: ``bl.hypergrad.Reverse`` under
  ``bl.hypergrad.vmap`` (the tasks batched by ``torch.func.vmap``);
* ``loop`` — ``meta_grad(vmap=False)``: a Python loop calling ``bl.hypergrad.Reverse`` per task;
* ``plain`` — MAML written the usual way in PyTorch: per task, K steps of
  ``torch.autograd.grad(create_graph=True)``, the query losses summed, one ``backward()``.

Time: medians of interleaved rounds (each round runs the three once, in rotating order), reported
as tasks per second. Memory: peak resident memory of one meta-step above the post-warm-up level,
each variant in a fresh process, divided by B. All three gradients are checked to agree first.

``--compiled``: whole meta-training steps instead — ``bl.solve`` of :class:`~bilevel.meta.
MetaTraining` (vmapped MAML, Adam outer step) eager against ``compile=True`` (each meta-step one
graph, :mod:`bilevel.compiled_step`), the solver's clock per step, interleaved rounds of
``--reps`` steps each from the same start and task seed; the compile time (first run), the
break-even step count and the compiled vs eager iterates are reported. ``--method metasgd``: the
same for Meta-SGD (learned per-parameter inner rates, ``lr0`` 0.01).

``--task-parallel``: meta-batch scaling of task-parallel meta-learning (issue 12) — the vmapped
MAML meta-step for B in ``--batches`` on one process vs sharded over 2 local gloo processes
(:func:`bilevel.meta.train.sharded_meta_grad`: each rank its block of tasks, one all-reduce per
step); rounds alternate between the two, medians of rank 0's per-step times.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .. import _tree as T
from ..meta import MAML, MetaSGD, MLPModel, SinusoidTasks
from ._timing import MB, median, one_thread, peak_rss, run_isolated

__all__ = ["main", "setup", "plain_maml_grad", "task_parallel_times"]


def setup(tasks: int, steps: int, hidden: int = 40, seed: int = 0, method: str = "maml"):
    model = MLPModel([1, hidden, hidden], 1)
    learner = (MAML(model, lr=0.01, steps=steps, loss="mse") if method == "maml"
               else MetaSGD(model, lr0=0.01, steps=steps, loss="mse"))
    x = learner.init(torch.Generator().manual_seed(seed))
    batch = SinusoidTasks(shots=10, queries=10, seed=seed).next(tasks)
    return model, learner, x, batch


def plain_maml_grad(model: MLPModel, x: dict, batch: dict, lr: float, steps: int) -> list[torch.Tensor]:
    """MAML the usual PyTorch way (autograd.grad with create_graph, summed query losses)."""
    leaves, spec = T.flatten(x)
    params = [t.detach().requires_grad_(True) for t in leaves]
    meta_loss = 0.0
    B = batch["support_x"].shape[0]
    for i in range(B):
        fast = params
        for _ in range(steps):
            out = model(T.unflatten(fast, spec), batch["support_x"][i])
            loss = ((out - batch["support_y"][i]) ** 2).mean()
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        out = model(T.unflatten(fast, spec), batch["query_x"][i])
        meta_loss = meta_loss + ((out - batch["query_y"][i]) ** 2).mean()
    (meta_loss / B).backward()
    return [p.grad for p in params]


def _variants(tasks: int, steps: int):
    model, learner, x, batch = setup(tasks, steps)
    return {
        "vmapped": lambda: T.flatten(learner.meta_grad(x, batch, vmap=True)[0])[0],
        "loop": lambda: T.flatten(learner.meta_grad(x, batch, vmap=False)[0])[0],
        "plain": lambda: plain_maml_grad(model, x, batch, 0.01, steps),
    }


def _memory_child(payload: dict[str, Any]) -> dict[str, Any]:
    one_thread()
    fns = _variants(int(payload["tasks"]), int(payload["steps"]))
    warm = _variants(1, int(payload["steps"]))[payload["variant"]]
    warm()  # one-task warm-up: allocator pools, functorch setup (not per-task memory)
    _, peak, how = peak_rss(fns[payload["variant"]])
    return {"peak": peak, "method": how}


def task_parallel_times(batches: list[int], steps: int, reps: int) -> dict[int, float]:
    """Median seconds per meta-step (``reps`` steps after one warm-up) of the vmapped MAML
    meta-gradient for each meta-batch size; sharded over the ranks when a process group is active."""
    import time

    from .. import distributed as D
    from ..meta.train import sharded_meta_grad

    one_thread()
    out = {}
    for B in batches:
        _, learner, x, batch = setup(B, steps)

        def step(learner=learner, x=x, batch=batch):
            if D.is_active():
                return sharded_meta_grad(learner, x, batch)
            return learner.meta_grad(x, batch)

        step()
        ts = []
        for _ in range(reps):
            D.barrier()
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        out[B] = median(ts)
    return out


def _task_parallel(a: argparse.Namespace) -> int:
    from .. import distributed as D

    single: dict[int, list[float]] = {B: [] for B in a.batches}
    two: dict[int, list[float]] = {B: [] for B in a.batches}
    for _ in range(a.rounds):
        for B, t in task_parallel_times(a.batches, a.steps, a.reps).items():
            single[B].append(t)
        ranks = D.spawn(task_parallel_times, 2, args=(a.batches, a.steps, a.reps), timeout=300)
        for B, t in ranks[0].items():
            two[B].append(t)
    print(f"Task-parallel MAML meta-step (sinusoid MLP 1-40-40-1, K = {a.steps}, float32, 1 thread "
          f"per process, gloo); medians over {a.rounds} alternating rounds of {a.reps} steps\n")
    print("| meta-batch B | 1 process (ms) | 2 processes (ms) | speed-up | efficiency |")
    print("|---|---|---|---|---|")
    for B in a.batches:
        t1, t2 = median(single[B]), median(two[B])
        print(f"| {B} | {1e3 * t1:.1f} | {1e3 * t2:.1f} | {t1 / t2:.2f}× | {t1 / t2 / 2:.0%} |")
    return 0


def compiled_steps(tasks: int, steps: int, rounds: int, reps: int, method: str = "maml") -> dict[str, Any]:
    """``--compiled``: ms per meta-training step, eager vs ``compile=True`` (see the module
    docstring); medians over ``rounds`` interleaved runs of ``reps`` steps."""
    import time

    import bilevel as bl

    from ..meta.train import MetaTraining, meta_problem

    _, learner, x, _ = setup(tasks, steps, method=method)
    problem = meta_problem(learner, SinusoidTasks(shots=10, queries=10, seed=99).next(tasks))

    def run(compile: bool, n: int):
        solver = MetaTraining(learner, SinusoidTasks(shots=10, queries=10, seed=1), tasks)
        return bl.solve(problem, x, torch.zeros(1), solver=solver, steps=n, compile=compile,
                        track=False)

    run(False, 1)
    t0 = time.perf_counter()
    run(True, 2)  # (the probe step, then the compile)
    compile_s = time.perf_counter() - t0
    per: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(rounds):
        for mode in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            res = run(mode == "compiled", reps)
            per[mode].append(res.state["time"] / reps)
    e, c = run(False, reps), run(True, reps)
    rel = max(float((u - v).norm() / u.norm()) for u, v in zip(T.flatten(e.x)[0], T.flatten(c.x)[0]))
    med = {k: median(v) for k, v in per.items()}
    return {"ms": {k: 1e3 * v for k, v in med.items()}, "compile_s": compile_s,
            "break_even_steps": compile_s / max(med["eager"] - med["compiled"], 1e-12),
            "x_rel_diff": rel, "all_compiled": all(r["compiled"] for r in c.history)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bilevel bench metalearning", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=32, help="meta-batch size B")
    p.add_argument("--steps", type=int, default=5, help="inner GD steps K")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process memory runs")
    p.add_argument("--task-parallel", action="store_true",
                   help="meta-batch scaling on 1 vs 2 processes (sharded tasks) instead")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128],
                   help="meta-batch sizes for --task-parallel")
    p.add_argument("--reps", type=int, default=5,
                   help="meta-steps per round for --task-parallel and --compiled")
    p.add_argument("--compiled", action="store_true",
                   help="meta-training steps eager vs bl.solve(..., compile=True) instead")
    p.add_argument("--method", choices=("maml", "metasgd"), default="maml",
                   help="--compiled: the learner (MAML, or Meta-SGD with its learned per-parameter rates)")
    a = p.parse_args(argv)
    if a.task_parallel:
        return _task_parallel(a)
    if a.compiled:
        one_thread()
        out = compiled_steps(a.tasks, a.steps, a.rounds, a.reps, a.method)
        name = "MAML" if a.method == "maml" else "Meta-SGD"
        print(f"{name} meta-training step (vmapped, Adam), sinusoid MLP 1-40-40-1, K = {a.steps}, "
              f"B = {a.tasks} tasks, float32, 1 thread; medians of {a.rounds} interleaved rounds of "
              f"{a.reps} steps\n")
        print("| eager (ms / step) | compiled (ms / step) | speed-up | compile (s) | break-even (steps) "
              "| x rel. diff | every step compiled |")
        print("|---|---|---|---|---|---|---|")
        ms = out["ms"]
        print(f"| {ms['eager']:.2f} | {ms['compiled']:.2f} | {ms['eager'] / ms['compiled']:.1f}× | "
              f"{out['compile_s']:.1f} | {out['break_even_steps']:.0f} | {out['x_rel_diff']:.1e} | "
              f"{out['all_compiled']} |")
        return 0
    one_thread()
    fns = _variants(a.tasks, a.steps)
    ref = fns["plain"]()
    for name in ("vmapped", "loop"):
        err = max(float((u - v).abs().max()) for u, v in zip(fns[name](), ref))
        scale = max(float(v.abs().max()) for v in ref)
        if not err <= 1e-4 * scale:
            raise SystemExit(f"{name} meta-gradient differs from the plain loop by {err:.3g}")
    order = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    import time

    for r in range(a.rounds):
        for name in order[r % 3:] + order[: r % 3]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: median(v) for k, v in times.items()}
    mem: dict[str, float | None] = {k: None for k in fns}
    if not a.no_memory:
        for name in fns:
            res = run_isolated("bilevel.bench.metalearning:_memory_child",
                               {"variant": name, "tasks": a.tasks, "steps": a.steps}, timeout=900)
            mem[name] = res["peak"]
    print(f"MAML meta-step, sinusoid MLP 1-40-40-1, K = {a.steps}, B = {a.tasks} tasks, float32, "
          f"1 thread; medians of {a.rounds} interleaved rounds\n")
    print("| variant | meta-step (ms) | tasks/s | vs loop | peak memory / task (MB) | vs plain |")
    print("|---|---|---|---|---|---|")
    for name, label in (("vmapped", "`MAML.meta_grad(vmap=True)` (torch.func vmap)"),
                        ("loop", "`MAML.meta_grad(vmap=False)` (Reverse per task)"),
                        ("plain", "plain PyTorch loop (autograd.grad, create_graph)")):
        tps = a.tasks / med[name]
        m = mem[name]
        mm = "—" if m is None else f"{m / MB / a.tasks:.3f}"
        rel = "—" if m is None or not mem["plain"] else f"{m / mem['plain']:.2f}×"
        print(f"| {label} | {1e3 * med[name]:.1f} | {tps:.0f} | {med['loop'] / med[name]:.2f}× | "
              f"{mm} | {rel} |")
    return 0
