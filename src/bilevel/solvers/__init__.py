"""Bilevel solvers, all run through :func:`bilevel.solve`."""

from .base import Context, Solver, SolveResult, solve
from .hypergradient import HypergradientDescent

__all__ = ["Context", "SolveResult", "Solver", "solve", "HypergradientDescent"]

# stochastic solvers (auto-discovered, one file each in solvers/stochastic/)
from . import stochastic  # noqa: E402
from .stochastic import *  # noqa: E402, F403

__all__ += stochastic.__all__

# deterministic solvers (one file each; issue 4)
from .aid import AID  # noqa: E402
from .ba import BA  # noqa: E402
from .bda import BDA  # noqa: E402
from .ia import IAGM, IAGMA, IAPTTGM  # noqa: E402
from .rhg import RHG, TRHG  # noqa: E402

__all__ += ["RHG", "TRHG", "AID", "BA", "BDA", "IAGM", "IAPTTGM", "IAGMA"]

# value-function / penalty solvers (issue 13.11; one file each)
from .primal_dual_vf import PrimalDualVF  # noqa: E402
from .vpbgd import VPBGD  # noqa: E402

__all__ += ["PrimalDualVF", "VPBGD"]
