"""AID: approximate implicit differentiation with a warm-started lower level.

Ji, Yang & Liang 2021, "Bilevel optimization: convergence analysis and enhanced design"
(ICML), Alg. 1 (AID-BiO). Outer iteration t:

    y_t^D = D steps of the lower dynamics from y_{t−1}^D          (warm start)
    v_t   ≈ solution of  ∇²_yy g(x_t, y_t^D) v = ∇_y f(x_t, y_t^D)   (N steps of a linear solver)
    ∇̂h   = ∇_x f(x_t, y_t^D) − ∇²_xy g(x_t, y_t^D) v_t
    x_{t+1} = P_X(x_t − β ∇̂h)                                    (or any update rule, e.g. Adam)

The linear solver is chosen by ``linear_solver``, a name of the shared registry
:data:`bilevel.linalg.SOLVERS` (aliases :data:`bilevel.linalg.ALIASES`); the estimator is the one
of :mod:`bilevel.hypergrad.implicit` that uses that solver:

* ``"cg"`` (alias ``"ls"``) — conjugate gradient, AID-CG (Pedregosa 2016; "LS" in Liu et al. 2021);
* ``"neumann"`` (alias ``"ns"``) — truncated Neumann series α Σ_{q≤N} (I − αH)^q ∇_y f
  (Lorraine et al. 2020, Eq. 6; "NS" in Liu et al. 2021);
* ``"fixed_point"`` (alias ``"fp"``) — the adjoint fixed-point iteration, AID-FP (Grazzi et al. 2020);
* ``"minres"`` — MINRES (Paige & Saunders 1975), for an indefinite lower Hessian;
* ``"normal_cg"`` (aliases ``"normalcg"``, ``"cgls"``) — CG on the normal equations, for a singular one.

``alpha`` is the step α of Neumann and the fixed point (default: the lower learning rate).
``damping=λ`` solves (H + λI) v = ∇_y f instead (iMAML's proximal system); ``strict=True`` raises
on a linear-solve breakdown (see :mod:`bilevel.hypergrad.implicit` for the default safeguard).
``warm_start_v`` also starts CG / FP from the previous v (Ji et al. 2021, Sec. 3, "warm start").
"""

from __future__ import annotations

import inspect
from typing import Any

from .. import linalg
from ..errors import ConfigError
from ..hypergrad import Neumann
from ..hypergrad.implicit import estimator_for
from ..inner import Dynamics
from .hypergradient import HypergradientDescent

__all__ = ["AID"]


class AID(HypergradientDescent):
    """AID-BiO with a CG / Neumann / fixed-point linear solve (see module docstring)."""

    reference = "Ji, Yang & Liang 2021, Alg. 1 (AID-BiO; CG = LS, Neumann = NS, AID-FP)"

    def __init__(
        self,
        inner: Dynamics,
        upper_lr: float = 0.1,
        *,
        upper: Any = None,
        linear_solver: str = "cg",
        iters: int = 20,
        alpha: float | None = None,
        warm_start: bool = True,
        warm_start_v: bool = True,
        damping: float = 0.0,
        strict: bool = False,
    ):
        try:
            key, fn = linalg.solver(linear_solver)
        except ValueError as e:
            raise ConfigError(str(e).replace("linear solver", "linear_solver")) from None
        cls = estimator_for(fn)
        kw = {"damping": damping, "strict": strict}  # (H + damping I) v = ∇_y f; strict: raise
        if cls is Neumann:  # a truncated series has no starting point to warm-start
            est = cls(inner, iters=iters, alpha=alpha, **kw)
        elif "alpha" in inspect.signature(cls).parameters:  # the fixed point
            est = cls(inner, iters=iters, alpha=alpha, warm_start=warm_start_v, **kw)
        else:  # Krylov solvers: no step size
            if alpha is not None:
                raise ConfigError(f"alpha is the step of neumann / fixed_point; {key} takes none")
            est = cls(inner, iters=iters, warm_start=warm_start_v, **kw)
        self.linear_solver = key
        super().__init__(est, upper=upper if upper is not None else upper_lr, warm_start=warm_start)
