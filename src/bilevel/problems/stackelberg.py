"""Stackelberg (leader–follower) duopoly with a closed-form equilibrium.

Survey: Liu et al. 2021, "Investigating bi-level optimization for learning and vision from a unified
perspective" (arXiv 2207.11719), Sec. 3.1.2 (Stackelberg games); von Stackelberg 1934.

Two firms sell quantities x (leader) and y (follower) of one good at the linear inverse demand
P(Q) = a − b Q, Q = x + y, with quadratic costs C_i(q) = c_i q + ½ d_i q². Profits:

    π_L(x, y) = x P(x + y) − C_L(x),        π_F(x, y) = y P(x + y) − C_F(y).

The leader commits first and anticipates the follower's best response, so

    min_x f(x, y*(x)) = −π_L(x, y*(x))   s.t.  y*(x) = argmin_y g(x, y) = −π_F(x, y).

g is strongly convex in y (∂²g/∂y² = 2b + d_F), with y*(x) = α − βx, α = (a − c_F)/(2b + d_F),
β = b/(2b + d_F). Substituting, −π_L(x, y*(x)) is a strongly convex quadratic in x with minimiser

    x* = (a − c_L − bα) / (2b(1 − β) + d_L),      y* = α − βx*.

(With d_L = d_F = 0 and c_L = c_F = c: x* = (a − c)/(2b), y* = (a − c)/(4b), the textbook
Stackelberg quantities.) The builder returns a :class:`~bilevel.problems.toys.Toy` whose boxes
keep quantities non-negative; the default parameters give an interior equilibrium.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..formulation import Problem
from .toys import Box, Toy

__all__ = ["stackelberg_duopoly", "stackelberg_equilibrium"]


def stackelberg_equilibrium(a: float, b: float, c_leader: float, c_follower: float, d_leader: float,
                            d_follower: float) -> dict[str, float]:
    """Closed-form leader–follower equilibrium (module docstring) and the Cournot (simultaneous)
    equilibrium for comparison: ``x_star``, ``y_star``, ``price``, ``profit_leader``,
    ``profit_follower``, ``cournot_x``, ``cournot_y``."""
    alpha = (a - c_follower) / (2 * b + d_follower)
    beta = b / (2 * b + d_follower)
    x = (a - c_leader - b * alpha) / (2 * b * (1 - beta) + d_leader)
    y = alpha - beta * x
    price = a - b * (x + y)
    # Cournot: both first-order conditions at once, (2b + d_L) x + b y = a − c_L, b x + (2b + d_F) y = a − c_F
    det = (2 * b + d_leader) * (2 * b + d_follower) - b * b
    cx = ((a - c_leader) * (2 * b + d_follower) - b * (a - c_follower)) / det
    cy = ((2 * b + d_leader) * (a - c_follower) - b * (a - c_leader)) / det
    return {
        "x_star": x, "y_star": y, "price": price,
        "profit_leader": x * price - c_leader * x - 0.5 * d_leader * x * x,
        "profit_follower": y * price - c_follower * y - 0.5 * d_follower * y * y,
        "cournot_x": cx, "cournot_y": cy,
    }


def stackelberg_duopoly(
    a: float = 10.0,
    b: float = 1.0,
    c_leader: float = 1.0,
    c_follower: float = 1.0,
    d_leader: float = 1.0,
    d_follower: float = 1.0,
    *,
    x0: float = 0.0,
    y0: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> Toy:
    """The leader–follower duopoly (module docstring) as a :class:`Toy` with 0-dim x and y.

    ``extra``: the parameters, ``y_star_fn`` (x -> α − βx), ``lower_curvature`` (2b + d_F),
    ``upper_curvature`` (2b(1 − β) + d_L, the curvature of x ↦ f(x, y*(x))) and the equilibrium
    numbers of :func:`stackelberg_equilibrium`.
    """
    if not b > 0:
        raise ConfigError(f"the demand slope b must be > 0, got {b}")
    if d_leader < 0 or d_follower < 0:
        raise ConfigError(f"cost curvatures must be >= 0, got d_leader={d_leader}, d_follower={d_follower}")
    eq = stackelberg_equilibrium(a, b, c_leader, c_follower, d_leader, d_follower)
    if not (eq["x_star"] > 0 and eq["y_star"] > 0):
        raise ConfigError(f"these parameters give a corner equilibrium (x*={eq['x_star']:.4g}, "
                          f"y*={eq['y_star']:.4g}); choose a > c_L, c_F with an interior solution")

    def upper(x: Tensor, y: Tensor) -> Tensor:  # −π_L
        return -(x * (a - b * (x + y)) - c_leader * x - 0.5 * d_leader * x * x)

    def lower(x: Tensor, y: Tensor) -> Tensor:  # −π_F
        return -(y * (a - b * (x + y)) - c_follower * y - 0.5 * d_follower * y * y)

    alpha = (a - c_follower) / (2 * b + d_follower)
    beta = b / (2 * b + d_follower)
    qmax = a / b  # the price is negative beyond this total quantity
    return Toy(
        name="stackelberg",
        problem=Problem(upper, lower, name="stackelberg-duopoly"),
        x0=torch.tensor(float(x0), dtype=dtype),
        y0=torch.tensor(float(y0), dtype=dtype),
        x_star=torch.tensor(eq["x_star"], dtype=dtype),
        y_star=torch.tensor(eq["y_star"], dtype=dtype),
        f_star=-eq["profit_leader"],
        x_bounds=Box(0.0, qmax),
        y_bounds=Box(0.0, qmax),
        reference="survey 2207.11719, Sec. 3.1.2; von Stackelberg 1934",
        g_star=lambda x: float(lower(x, torch.clamp(alpha - beta * x, 0.0, qmax))),  # g convex in y
        extra={"a": a, "b": b, "c_leader": c_leader, "c_follower": c_follower, "d_leader": d_leader,
               "d_follower": d_follower, "y_star_fn": lambda x: alpha - beta * x,
               "lower_curvature": 2 * b + d_follower, "upper_curvature": 2 * b * (1 - beta) + d_leader,
               **eq},
    )
