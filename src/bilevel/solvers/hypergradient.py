"""Hypergradient descent: any estimator + an upper-level update rule (+ lower warm start).

    y_t   = lower solution from the estimator, started at y_{t-1} (warm start) or y0
    x_{t+1} = P_X( U(x_t, ∇̂h(x_t)) )       U = an update rule from bilevel.inner (GD, Adam, ...)

With ``Reverse`` this is RHG (Franceschi et al. 2017), with ``Reverse(truncate=K)`` T-RHG
(Shaban et al. 2019), with ``CG``/``Neumann``/``FixedPoint`` AID (Ji, Yang & Liang 2021,
Alg. 1 with warm start).
"""

from __future__ import annotations

from typing import Any

from .. import _tree as T
from ..errors import ConfigError
from ..hypergrad.base import Estimator
from .base import Context, Solver, descend
from .upper import upper_rule


class HypergradientDescent(Solver):
    """Any estimator + an upper update rule.

    Args:
        estimator: a :mod:`bilevel.hypergrad` estimator (its state lives in ``state["est"]``).
        upper: the upper step (:mod:`bilevel.solvers.upper`): a step size, a Schedule, a
            :mod:`bilevel.inner` rule, or a ``torch.optim`` optimizer class / factory /
            ``(class, kwargs)`` / :class:`~bilevel.solvers.TorchOptimizer` (with an lr scheduler).
        warm_start: start each lower solve from the previous lower point (else from y0); with
            ``Problem(buffers=...)`` the carried buffers (running statistics) follow: continued
            from the previous outer step (``state["buffers"]``), else restarted.
    """

    reference = "generic hypergradient descent (Franceschi et al. 2017; Ji et al. 2021)"
    carries_buffers = True

    def __init__(self, estimator: Estimator, upper: Any = 0.1, warm_start: bool = True):
        if not (isinstance(estimator, Estimator) or (hasattr(estimator, "apply")
                                                     and hasattr(estimator, "init_state"))):
            raise ConfigError(f"{type(self).__name__}: estimator must be a bilevel.hypergrad "
                              f"estimator, got {type(estimator).__name__}")
        self.estimator = estimator
        self.upper = upper_rule(upper)
        self.warm_start = warm_start

    def init(self, ctx: Context, xs, ys) -> dict[str, Any]:
        # the estimator's own state (warm-start vector, generator state, ...) lives in "est"
        est = ctx.estimator(self.estimator)
        return {"x": xs, "y": ys, "y0": ys, "upper": self.upper.init(xs),
                "est": est.init_state(ctx.bound(xs, ys))}

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        ystart = state["y"] if self.warm_start else state["y0"]
        # carried buffers (running statistics) follow the lower iterate: continued with the warm
        # start, else restarted from the problem's initial ones with y0
        buffers = state.get("buffers") if self.warm_start else None
        bound = ctx.bound(state["x"], ystart, ctx.upper_batch(), ctx.lower_batch(), buffers)
        est = ctx.estimator(self.estimator)  # with the problem's y-projection attached
        x = state["x"]
        grad, ys, info, state["est"] = est.apply(bound, state["est"])
        state["x_lower"] = x  # y below solves the lower level at this x, not at the updated one
        if info.get("buffers") is not None:
            state["buffers"] = info["buffers"]
        state["x"], state["upper"] = descend(self.upper, state["upper"], grad, t, ctx.project_x)
        state["y"] = ctx.project_y(ys)
        out = {"hypergrad_norm": T.norm(grad)}  # (a tensor: solve reads it after the step)
        if "linear_solve" in info:
            sinfo = info["linear_solve"]
            out["linear_residual"] = sinfo["residual"]
            out["breakdown"] = sinfo["breakdown"]  # None, or why the solve broke down this step
            out["breakdowns"] = sinfo.get("breakdowns", 0)  # in this run so far
        out.update(self.metrics(x, grad, info))
        return out

    def lower_pair(self, state: dict[str, Any]) -> tuple[Any, Any]:
        return state.get("x_lower", state["x"]), state["y"]

    def metrics(self, x: Any, grad: Any, info: dict[str, Any]) -> dict[str, Any]:
        """Extra per-step record entries from the step's x_t, ∇̂h(x_t) and the estimator's info
        (none here; a subclass that scores the hypergradient overrides this, not :meth:`step`)."""
        return {}
