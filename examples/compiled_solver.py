"""Whole-step compiled mode: one outer iteration of a stochastic solver as one torch.compile graph.

Run:  .venv/bin/python examples/compiled_solver.py [steps] [backend] [loops] [solver]

stocBiO (or ``solver`` = "saba": SABA, whose SAGA memories a compiled step indexes with the drawn
batch index as a tensor) on a stochastic quadratic (float64), eager and with ``compile="step"``:
the same batches,
the same iterates (to rounding), the same oracle counts; the first step of each pattern runs
eagerly, the others as the compiled graph (``record["compiled"]``). ``backend`` is torch.compile's
("inductor" by default; "aot_eager" checks capture without generating code). ``loops``:
"unroll" (default: the inner SGD steps and Neumann terms written out in the graph) or
"while_loop" (each as one loop in the graph: faster to compile, a little slower per step).
"""

import sys
import time

import bilevel as bl
import bilevel.compiled_step as CS
from bilevel.problems import stochastic_quadratic

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
bl.compiled.settings["backend"] = sys.argv[2] if len(sys.argv) > 2 else "inductor"
CS.settings["loops"] = sys.argv[3] if len(sys.argv) > 3 else "unroll"
name = sys.argv[4] if len(sys.argv) > 4 else "stocbio"
P = stochastic_quadratic(dim_x=10, dim_y=20, kappa=3, batch_size=32, seed=0)
SOLVERS = {  # name -> (a fresh solver, the samplers it needs)
    "stocbio": (lambda: bl.solvers.StocBiO(lr_x=0.05, lr_y=0.3, inner_steps=3, Q=3, eta=0.3),
                "minibatch"),
    "saba": (lambda: bl.solvers.SABA(lr_x=0.01, lr_y=0.3, init_memory="full"), "fixed"),
}
make, kind = SOLVERS[name]


def run(compile):
    t0 = time.perf_counter()
    res = bl.solve(**P.solve_kwargs(batch_size=32, seed=0, kind=kind), solver=make(), steps=steps,
                   track=False, compile=compile)
    return res, time.perf_counter() - t0


eager, t_eager = run(False)
comp, t_first = run("step")  # compiles (cached per problem and solver settings)
run("step")  # (a pattern met once per run, the first step's, is probed eagerly, then compiled here)
comp, t_comp = run("step")
n = sum(r["compiled"] for r in comp.history)
print(f"eager {1e3 * eager.state['time'] / steps:.3f} ms/iter, compiled "
      f"{1e3 * comp.state['time'] / steps:.3f} ms/iter ({n} of {steps} steps compiled; "
      f"first run incl. compilation {t_first:.1f} s)")
print(f"max |x_compiled - x_eager| = {float((comp.x - eager.x).abs().max()):.1e}, "
      f"same oracle counts: {comp.state['counts'] == eager.state['counts']}")
print(f"||grad h|| {P.grad_norm(P.x0):.3e} -> {P.grad_norm(comp.x):.3e}")
