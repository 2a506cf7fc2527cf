"""Stochastic bilevel solvers, one module per algorithm (explicit exports: a new solver file adds
one import line here).

Every solver takes ``upper=`` for its x step (:mod:`bilevel.solvers.upper`: a step size, a Schedule,
a :mod:`bilevel.inner` rule or a ``torch.optim`` optimizer); its default is SGD with the published
step-size schedule ``lr_x``.
"""

from .alternating_sgd import AlternatingSGD
from .amigo import AmIGO
from .bome import BOME
from .bsa import BSA
from .f2sa import F2SA
from .fsla import FSLA
from .ma_soba import MASOBA
from .mrbo import MRBO
from .mrbo_zo import MRBOZO
from .mstsa import MSTSA
from .pzobo import PZOBO
from .saba import SABA
from .soba import SOBA
from .srba import SRBA
from .stable import STABLE
from .stocbio import StocBiO
from .sustain import SUSTAIN
from .ttsa import TTSA
from .vrbo import VRBO

__all__ = [
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
    "StocBiO",
    "SUSTAIN",
    "TTSA",
    "VRBO",
]
