"""Bilevel solvers, all run through :func:`bilevel.solve` (one file per algorithm)."""

from . import stochastic
from .aid import AID
from .ba import BA
from .base import Context, Solver, SolveResult, solve
from .bda import BDA
from .hypergradient import HypergradientDescent
from .ia import IAGM, IAGMA, IAPTTGM
from .primal_dual_vf import PrimalDualVF
from .rhg import RHG, TRHG
from .stochastic import (
    BOME,
    BSA,
    F2SA,
    FSLA,
    MASOBA,
    MRBO,
    MRBOZO,
    MSTSA,
    PZOBO,
    SABA,
    SOBA,
    SRBA,
    STABLE,
    SUSTAIN,
    TTSA,
    VRBO,
    AlternatingSGD,
    AmIGO,
    StocBiO,
)
from .upper import TorchOptimizer, upper_rule
from .vpbgd import VPBGD

__all__ = [
    "Context",
    "SolveResult",
    "Solver",
    "solve",
    "stochastic",
    "HypergradientDescent",
    "TorchOptimizer",
    "upper_rule",
    # deterministic
    "RHG",
    "TRHG",
    "AID",
    "BA",
    "BDA",
    "IAGM",
    "IAPTTGM",
    "IAGMA",
    # value-function / penalty (issue 13.11)
    "PrimalDualVF",
    "VPBGD",
    # stochastic
    "AlternatingSGD",
    "AmIGO",
    "BOME",
    "BSA",
    "F2SA",
    "FSLA",
    "MASOBA",
    "MRBO",
    "MRBOZO",
    "MSTSA",
    "PZOBO",
    "SABA",
    "SOBA",
    "SRBA",
    "STABLE",
    "SUSTAIN",
    "StocBiO",
    "TTSA",
    "VRBO",
]
