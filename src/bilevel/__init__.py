"""bilevel — gradient-based bilevel optimization on PyTorch.

    min_x f(x, y*(x))   s.t.   y*(x) ∈ argmin_y g(x, y)

Quick start::

    import bilevel as bl
    problem = bl.Problem(upper=f, lower=g)
    est = bl.hypergrad.CG(inner=bl.inner.GD(lr=0.1, steps=100), iters=50)
    res = est(problem, x, y0)       # res.grad, res.y, res.info
"""

from . import (
    closed_form,
    compiled,
    datasets,
    distributed,
    estimates,
    hypergrad,
    inner,
    layers,
    linalg,
    meta,
    modules,
    oracles,
    precision,
    problems,
    sampling,
    solvers,
)
from .compiled import compile
from .errors import (
    BilevelError,
    BilevelWarning,
    ConfigError,
    EmptyDataError,
    LinearSolveError,
    LinearSolveWarning,
    NonFiniteError,
    NonScalarObjectiveError,
    StartIndependenceWarning,
    StructureMismatchError,
)
from .formulation import Problem, params
from .layers import argmin, fixed_point
from .modules import Functional, load_into
from .solvers import SolveResult, solve

__version__ = "0.1.0"

__all__ = [
    "Problem",
    "params",
    "argmin",
    "fixed_point",
    "Functional",
    "load_into",
    "modules",
    "layers",
    "meta",
    "solve",
    "SolveResult",
    "solvers",
    "sampling",
    "estimates",
    "problems",
    "datasets",
    "hypergrad",
    "inner",
    "linalg",
    "oracles",
    "distributed",
    "precision",
    "closed_form",
    "compile",
    "compiled",
    "BilevelError",
    "BilevelWarning",
    "ConfigError",
    "EmptyDataError",
    "LinearSolveError",
    "LinearSolveWarning",
    "NonFiniteError",
    "NonScalarObjectiveError",
    "StartIndependenceWarning",
    "StructureMismatchError",
]
