"""Hypergradient estimators, all called as ``est(problem, x, y) -> HypergradResult``."""

from .analytic import ClosedForm
from .base import Estimator, HypergradResult, solve_lower
from .evograd import EvoGrad
from .finite_difference import FiniteDifference
from .first_order import FirstOrder
from .forward import Forward
from .implicit import CG, MINRES, Exact, FixedPoint, Implicit, Neumann, NormalCG
from .proxy import STN, Hypernetwork
from .reverse import Reverse
from .vmap import vmap
from .zeroth_order import ZerothOrder

__all__ = [
    "Estimator",
    "HypergradResult",
    "solve_lower",
    "Reverse",
    "Forward",
    "FirstOrder",
    "FiniteDifference",
    "CG",
    "MINRES",
    "NormalCG",
    "Neumann",
    "FixedPoint",
    "Exact",
    "Implicit",
    "ClosedForm",
    "ZerothOrder",
    "Hypernetwork",
    "STN",
    "EvoGrad",
    "vmap",
]
