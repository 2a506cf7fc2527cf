"""Initialization-auxiliary methods: IA-GM, IAPTT-GM and IA-GM(A).

Liu, Liu, Yuan, Zeng & Zhang 2021, "Towards gradient-based bilevel optimization with non-convex
followers and beyond" (NeurIPS). The lower trajectory starts from an *initialization auxiliary*
Notation: the paper's F (upper) and f (lower) are our f and g.
z ∈ Y that is itself an upper-level variable (Sec. 2.1, Eq. 4):

    y_0 = z,   y_{k+1} = P_Y( y_k − s_l ∇_y g(x, y_k) ),   k = 0..K−1.

* IAPTT-GM (Alg. 1) adds the *pessimistic trajectory truncation* (Sec. 2.2): with the iterates
  computed without a graph, pick the worst one for the leader,

      k* = argmax_{1≤k≤K} f(x, y_k)      (the first maximiser on ties),

  and descend φ(x, z) = f(x, y_{k*}(x, z)) in both variables:
  x ← P_X(x − β_x ∇_x φ),  z ← P_Y(z − β_z ∇_z φ). Only k* ≤ K steps are differentiated: they are
  recomputed with a graph from z (memory O(k*), time K + k* forward steps). Inside a compiled step
  (``bl.solve(..., compile=True)``) k* is not read on the host: all K steps are recomputed, those
  after k* held (:class:`bilevel.inner.Stopped`) — the same φ and derivative, at 2K forward steps,
  counted so (also in the eager step that records the graph's pattern).
* IA-GM (the ablation of Fig. 1g–h) keeps k* = K.
* IA-GM(A) (Sec. 3.2, Eq. 9; for convex followers) is IA-GM with Nesterov-accelerated lower
  dynamics — the accelerated proximal gradient of Beck & Teboulle 2009 (FISTA) with the standard
  t_0 = 1, t_{k+1} = (1 + √(1 + 4 t_k²)) / 2 and extrapolation (t_k − 1)/t_{k+1}: the paper's proof of
  Thm. 3.4 invokes the FISTA rate theorem (Beck 2017, Thm. 10.34), which is stated for exactly this
  recursion. Implemented by :class:`bilevel.inner.Nesterov` (``momentum=None``).

∇_x φ and ∇_z φ come from one reverse sweep of :class:`bilevel.hypergrad.Reverse` (``wrt_init``).
The upper update rules are SGD with ``upper_lr`` (x) and ``init_lr`` (z, default: ``upper_lr``), or
any :mod:`bilevel.inner` dynamics passed as ``upper=`` / ``init_rule=`` (e.g. ``bl.inner.Adam(lr=1e-3)``;
``init_rule`` defaults to the rule of x). The reported lower point ``y`` is y_K from the current (x, z).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .. import _tree as T
from .. import oracles as O
from .._trace import graph_path
from ..errors import ConfigError
from ..formulation import Bound
from ..hypergrad import Reverse
from ..hypergrad.base import lower_grad_fn
from ..inner import GD, Dynamics, Nesterov, Stopped
from ..validation import check_finite
from .base import Context, Solver, descend
from .upper import upper_rule

__all__ = ["IAGM", "IAPTTGM", "IAGMA", "ptt_index"]


def ptt_index(values: Sequence[float] | torch.Tensor) -> int:
    """Pessimistic truncation index: 1-based position of the first maximum of f(x, y_1..y_K)."""
    vals = values.tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]
    if not vals:
        raise ValueError("ptt_index needs at least one value")
    return 1 + vals.index(max(vals))


class IAGM(Solver):
    """IA-GM: the lower start z is learned together with x (no truncation)."""

    reference = "Liu et al. 2021 (NeurIPS), IA-GM (Alg. 1 without PTT)"
    pessimistic = False

    def __init__(
        self,
        inner: Dynamics,
        upper_lr: float = 0.1,
        init_lr: float | None = None,
        *,
        upper: Any = None,
        init_rule: Any = None,
        checkpoint: bool | int = False,
    ):
        if inner.steps < 1:
            raise ConfigError(f"{type(self).__name__} needs inner.steps >= 1, got {inner.steps}")
        for name, v in (("upper_lr", upper_lr), ("init_lr", init_lr)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{name} must be a number (pass update rules such as Adam as "
                                  f"upper= / init_rule=), got {type(v).__name__}")
        self.inner = inner
        self.upper = upper_rule(upper if upper is not None else upper_lr)
        if init_rule is None:  # default: the rule of x, or SGD with init_lr if that is given
            init_rule = self.upper if init_lr is None else GD(lr=init_lr)
        self.init_rule = upper_rule(init_rule, "init_rule")
        self.checkpoint = checkpoint

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        if ctx.y_fn is not None:
            raise ConfigError(
                f"{type(self).__name__} learns the lower initialization itself; pass y0 as a tensor "
                "(the starting value of z), not a callable"
            )
        return {"x": xs, "y": ys, "z": ys, "upper": self.upper.init(xs), "init": self.init_rule.init(ys)}

    def truncation(self, bound: Bound, dyn: Dynamics) -> tuple[int | torch.Tensor, T.Leaves]:
        """(k*, y_K): run the K lower steps from z without a graph, recording f(x, y_k). Inside a
        compiled step, and in the eager step that records its pattern, k* stays a 0-dim tensor
        (``torch.argmax``: the first maximiser, as on the host)."""
        xs = bound.xs
        gfn = lower_grad_fn(bound, xs, create_graph=False)
        state = dyn.init(bound.ys0)
        values = []
        with torch.no_grad():  # the loop of inner.unroll, with F evaluated after every step
            for k in range(dyn.steps):
                state = dyn.update(state, gfn(dyn.point(state), k), k)
                values.append(O.value(bound.F, xs, dyn.output(state)))
        y_K = T.detach(dyn.output(state))
        vals = torch.stack(values)
        check_finite(y_K, "lower", "the last iterate of the truncation pass")
        check_finite([vals], "upper", "the upper objective along the lower trajectory")
        if graph_path():  # (a compiled step, or the eager step recording its draws and counts)
            return torch.argmax(vals) + 1, y_K
        return ptt_index(vals), y_K

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        bound = ctx.bound(state["x"], state["z"], ctx.upper_batch(), ctx.lower_batch())
        dyn = ctx.inner(self.inner)  # the lower dynamics with the problem's y-projection
        if self.pessimistic:
            k_star, y_last = self.truncation(bound, dyn)
        else:
            k_star, y_last = dyn.steps, None
        if isinstance(k_star, torch.Tensor):  # traced: all K steps, those after k* held
            dyn = Stopped(dyn, k_star)
        elif k_star != dyn.steps:
            dyn = copy.copy(dyn)
            dyn.steps = k_star
        gx, y_k, info, _ = Reverse(dyn, checkpoint=self.checkpoint, wrt_init=True).apply(bound)
        gz = info["grad_init"]
        state["x"], state["upper"] = descend(self.upper, state["upper"], gx, t, ctx.project_x)
        state["z"], state["init"] = descend(self.init_rule, state["init"], gz, t, ctx.project_y)
        state["y"] = y_k if y_last is None else y_last
        return {
            "hypergrad_norm": float(T.norm(gx)),
            "init_grad_norm": float(T.norm(gz)),
            "k_star": k_star,
        }


class IAPTTGM(IAGM):
    """IAPTT-GM: initialization auxiliary + pessimistic trajectory truncation (Alg. 1)."""

    reference = "Liu et al. 2021 (NeurIPS), Alg. 1 (IAPTT-GM)"
    pessimistic = True


class IAGMA(IAGM):
    """IA-GM(A): IA-GM with FISTA lower dynamics (Sec. 3.2, Eq. 9), for convex followers.

    ``inner`` may be a :class:`bilevel.inner.Nesterov`; any other dynamics is replaced by FISTA
    with the same step size, number of steps and projection.
    """

    reference = "Liu et al. 2021 (NeurIPS), IA-GM(A) (Sec. 3.2, Eq. 9; FISTA dynamics)"

    def __init__(self, inner: Dynamics, upper_lr: float = 0.1, init_lr: float | None = None, *,
                 upper: Any = None, init_rule: Any = None,
                 checkpoint: bool | int = False):
        if not isinstance(inner, Nesterov):
            inner = Nesterov(lr=inner.lr, steps=inner.steps, projection=inner.projection)
        super().__init__(inner, upper_lr, init_lr, upper=upper, init_rule=init_rule, checkpoint=checkpoint)
