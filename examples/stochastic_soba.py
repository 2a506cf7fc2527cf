"""Stochastic bilevel optimization: SOBA on a finite-sum quadratic with an exact hypergradient.

Run:  .venv/bin/python examples/stochastic_soba.py
"""

import bilevel as bl
from bilevel.problems import stochastic_quadratic

P = stochastic_quadratic(dim_x=10, dim_y=20, kappa=3, batch_size=32, seed=0)
lower, upper = P.samplers(batch_size=32, seed=0)            # bl.sampling.Minibatches over the finite sums
solver = bl.solvers.SOBA(lr_x={"c": 0.05, "e": 0.6}, lr_y={"c": 0.5, "e": 0.4})   # c / (t+1)^e
res = bl.solve(
    P.problem, P.x0, P.y0, solver=solver, steps=5000, lower_data=lower, upper_data=upper, track=500
)
print(P.grad_norm(P.x0), "->", P.grad_norm(res.x))          # exact ||grad h(x)|| before and after
print({k: v for k, v in res.history[-1].items() if k.startswith(("lower_", "upper_"))})  # sample-oracle calls
