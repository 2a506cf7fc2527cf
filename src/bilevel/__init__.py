"""bilevel — gradient-based bilevel optimization on PyTorch.

    min_x f(x, y*(x))   s.t.   y*(x) ∈ argmin_y g(x, y)

Quick start::

    import bilevel as bl
    problem = bl.Problem(upper=f, lower=g)
    est = bl.hypergrad.CG(inner=bl.inner.GD(lr=0.1, steps=100), iters=50)
    res = est(problem, x, y0)       # res.grad, res.y, res.info
"""

from . import closed_form, data, distributed, hypergrad, inner, linalg, oracles, precision, solvers
from .errors import (
    BilevelError,
    ConfigError,
    LinearSolveError,
    NonFiniteError,
    NonScalarObjectiveError,
    StructureMismatchError,
)
from .problem import Problem, params
from .solvers import SolveResult, solve

__version__ = "0.1.0"

__all__ = [
    "Problem",
    "params",
    "solve",
    "SolveResult",
    "solvers",
    "data",
    "hypergrad",
    "inner",
    "linalg",
    "oracles",
    "distributed",
    "precision",
    "closed_form",
    "BilevelError",
    "ConfigError",
    "LinearSolveError",
    "NonFiniteError",
    "NonScalarObjectiveError",
    "StructureMismatchError",
]
