"""BDA: bi-level descent aggregation (lower level beyond the singleton assumption).

Liu, Mu, Yuan, Zeng & Zhang 2020, "A generic first-order algorithmic framework for bi-level
programming beyond lower-level singleton" (ICML), Alg. 1 with the gradient modules of Sec. 3.1.
Notation: the paper's F (upper) and f (lower) are our f and g.
The lower trajectory descends a convex combination of the upper and lower objectives:

    u_{k+1} = y_k − s_u ∇_y f(x, y_k),          v_{k+1} = y_k − s_l ∇_y g(x, y_k),
    y_{k+1} = P_Y( α_k u_{k+1} + (1 − α_k) v_{k+1} )
            = P_Y( y_k − (α_k s_u ∇_y f(x, y_k) + (1 − α_k) s_l ∇_y g(x, y_k)) ),   k = 0..K−1,

with the aggregation weight α_k = μ / (k + 1), μ ∈ (0, 1] — the schedule of the paper's
convergence analysis (α_k ↓ 0 with Σ α_k = ∞, so the lower objective dominates in the end while the
upper one is seen long enough to select among lower solutions). The authors' released code decays α
geometrically instead; ``schedule=callable`` (k -> α_k) covers such variants. Among the lower
solutions the UL term selects the optimistic one (min f), which is what makes BDA converge without a
unique lower solution. The upper variable descends x ↦ f(x, y_K(x)), differentiated in reverse mode
through the aggregated steps — the same :class:`bilevel.hypergrad.Reverse` as RHG, with the direction
hook ``grad_fn``.

Here s_l is the step of the ``inner`` dynamics (``inner.lr``) and the direction handed to it is
(1 − α_k) ∇_y g + α_k (s_u / s_l) ∇_y f, so the update above is reproduced exactly for GD (other
dynamics — momentum, Adam — receive the aggregated direction in place of ∇_y g).

The upper step s_u (``adaptive=True``, the default). The paper takes a fixed s_u; where
∇_y f is steep away from the solution (the quartic LLC toy) no fixed s_u is both stable at the start
and large enough later. Our safeguard — not part of the paper — is Armijo backtracking (Armijo
1966; Nocedal & Wright 2006, Alg. 3.1) on the upper term's own displacement t = α_k s: at lower step
k the first s of s_k, s_k/2, s_k/4, ... with

    f(x, y_k − α_k s ∇_y f) ≤ f(x, y_k) − ½ α_k s ‖∇_y f(x, y_k)‖²

is used in the aggregated step above. σ = ½ never accepts a step past the minimiser of f along
−∇_y f when f is quadratic along that line (the step stays ≤ ‖∇f‖² / ∇fᵀ∇²f ∇f). The trial s_k of
the next outer step is 2s if the first trial was accepted, else s, never above the user's s_u (the
cap, and the first trial). The trials, one per lower step, are the estimator's state
(``state["est"]["s_u"]``): a resumed run is exact and one solver object can run many times. The
accepted s is a constant of the step (piecewise constant in x), so the hypergradient — reverse mode
through the steps actually taken — is the exact derivative of the K-step map that was run wherever
no test switches (almost everywhere). ``adaptive=False`` keeps the fixed s_u of the paper. The
tests read floats on the host, so the backtracked BDA does not run under ``torch.func.vmap``.

References: L. Armijo 1966, "Minimization of functions having Lipschitz continuous first partial
derivatives", Pacific J. Math. 16(1); J. Nocedal & S. J. Wright 2006, Numerical Optimization, 2nd
ed., Alg. 3.1 (backtracking line search).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from .. import _tree as T
from .. import oracles as O
from .._trace import graph_path, require, tracing
from ..errors import ConfigError, NonFiniteError
from ..formulation import Bound
from ..hypergrad import Reverse
from ..inner import Dynamics, GradFn
from .hypergradient import HypergradientDescent

__all__ = ["BDA", "bda_schedule", "Aggregation", "AggregatedReverse"]

#: Armijo constant σ, shrink and regrow factors, and the most halvings of one backtracking search
ARMIJO_SIGMA, SHRINK, GROW, MAX_HALVINGS = 0.5, 0.5, 2.0, 60
#: trials s, s/2, ... of one search inside a compiled step (a search that accepts none of them
#: reruns that step eagerly, where the search goes on up to MAX_HALVINGS)
GRAPH_TRIALS = 3


def bda_schedule(mu: float) -> Callable[[int], float]:
    """The published aggregation weights α_k = μ / (k + 1), k = 0, 1, ..."""
    if not 0.0 <= mu <= 1.0:
        raise ConfigError(f"BDA needs mu in [0, 1] (alpha_k = mu/(k+1) must lie in [0, 1]), got {mu}")

    def alpha(k: int) -> float:
        return mu / (k + 1)

    return alpha


class Aggregation:
    """BDA's lower direction: ``(bound, xs, create_graph) -> (k -> (1 − α_k) ∇_y g + α_k (s_k/s_l) ∇_y f)``.

    Plugged into :class:`bilevel.hypergrad.Reverse` as its ``grad_fn``. Without ``trials`` the upper
    step is the fixed ``s_u``; with ``trials`` (one trial step per lower step k) s_k is found by the
    Armijo backtracking of the module docstring, and ``used[k] = (s_k, accepted at the first trial,
    halvings)`` is recorded for the caller.
    """

    def __init__(self, alpha: Callable[[int], float], s_l: float, s_u: float):
        self.alpha, self.s_l, self.s_u = alpha, float(s_l), float(s_u)

    @property
    def ratio(self) -> float:
        return self.s_u / self.s_l

    def __call__(self, bound: Bound, xs: T.Leaves, *, create_graph: bool,
                 trials: list[float] | None = None, used: dict[int, tuple] | None = None) -> GradFn:
        G, F, alpha, s_l = bound.G, bound.F, self.alpha, self.s_l

        def grad_fn(ys: T.Leaves, k: int) -> T.Leaves:
            a = float(alpha(k))
            gl = O.grad_y(G, xs, ys, create_graph=create_graph)
            if a == 0.0:
                return gl
            gu = O.grad_y(F, xs, ys, create_graph=create_graph)
            if trials is None:
                s = self.s_u
            else:
                search = backtrack_in_graph if isinstance(trials, torch.Tensor) else backtrack
                s, first, halvings = search(F, xs, ys, gu, a, trials[k], k)
                if used is not None:
                    used[k] = (s, first, halvings)
            # a (s/s_l): the same float operations as the fixed rule when no test backtracks
            return T.axpy(a * (s / s_l), gu, T.scale(gl, 1.0 - a))

        return grad_fn

    def __repr__(self) -> str:
        return f"Aggregation(s_u/s_l={self.ratio:g})"


def backtrack(F: Any, xs: T.Leaves, ys: T.Leaves, gu: T.Leaves, a: float, s: float,
              k: int) -> tuple[float, bool, int]:
    """Armijo backtracking for the upper term at lower step k (module docstring): the first s of
    s, s/2, ... with f(x, y − a s ∇f) ≤ f(x, y) − σ a s ‖∇f‖²; returns (s, first trial?, halvings).
    Evaluated without a graph: s is a constant of the differentiated step."""
    with torch.no_grad():
        xd, yd, gd = T.detach(xs), T.detach(ys), T.detach(gu)
        f0 = float(O.value(F, xd, yd))
        n2 = float(sum((g * g).sum() for g in gd))
        if not (math.isfinite(f0) and math.isfinite(n2)):
            raise NonFiniteError(f"BDA: non-finite upper objective or gradient at lower step {k + 1} "
                                 f"(f = {f0}, |grad_y f|^2 = {n2})", level="upper")
        if n2 == 0.0:
            return s, True, 0
        for h in range(MAX_HALVINGS + 1):
            t = a * s
            f1 = float(O.value(F, xd, T.axpy(-t, gd, yd)))
            if math.isfinite(f1) and f1 <= f0 - ARMIJO_SIGMA * t * n2:
                return s, h == 0, h
            s *= SHRINK
    raise NonFiniteError(
        f"BDA: no upper step s >= {s / SHRINK:.3g} decreases f at lower step {k + 1} (Armijo "
        f"backtracking, {MAX_HALVINGS} halvings): is the upper objective differentiable in y?",
        level="upper")


def backtrack_in_graph(F: Any, xs: T.Leaves, ys: T.Leaves, gu: T.Leaves, a: float, s: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`backtrack` as tensors, for a compiled step (and the eager step recording its pattern):
    the first :data:`GRAPH_TRIALS` trials s, s/2, ... evaluated, the first accepted one taken. If
    none is, a ``redo`` check fails and the step runs again eagerly (in the recording step: the
    search goes on here, by :func:`backtrack`)."""
    with torch.no_grad():
        xd, yd, gd = T.detach(xs), T.detach(ys), T.detach(gu)
        # f at y as at the trials, y − 0·∇f (a graph keeps 0·t: it is NaN for t = inf): the same
        # kernel, so rounding cannot pass for a decrease (a kernel shared with ∇f's own forward
        # sums in another order, and the tests of small steps then failed)
        f0 = O.value(F, xd, T.axpy(-(s * 0.0), gd, yd))
        n2 = sum((g * g).sum() for g in gd)
        require(torch.isfinite(f0) & torch.isfinite(n2), lambda: NonFiniteError(
            f"BDA: non-finite upper objective or gradient at lower step {k + 1}", level="upper"))
        oks = []
        for h in range(GRAPH_TRIALS):
            t = a * (s * SHRINK**h)
            f1 = O.value(F, xd, T.axpy(-t, gd, yd))
            oks.append(torch.isfinite(f1) & (f1 <= f0 - ARMIJO_SIGMA * t * n2))
        oks[0] = oks[0] | (n2 == 0)
        ok = torch.stack(oks)
        if not tracing() and not bool(ok.any()):
            s1, first, halvings = backtrack(F, xs, ys, gu, a, float(s), k)
            return s.new_tensor(s1), torch.tensor(first), torch.tensor(halvings)
        require(ok.any(), lambda: ConfigError(
            f"BDA: the Armijo search at lower step {k + 1} needs more than {GRAPH_TRIALS} trials "
            "(a compiled step reruns eagerly)"), redo=True)
        halvings = torch.argmax(ok.to(torch.int8))  # (the first accepted trial)
        return s * torch.pow(SHRINK, halvings.to(s.dtype)), halvings == 0, halvings


class AggregatedReverse(Reverse):
    """:class:`~bilevel.hypergrad.Reverse` through BDA's aggregated steps with the backtracked upper
    step: ``state["s_u"]`` holds the trial step of every lower step k (module docstring).

    ``info["s_u"]`` lists the steps used at this call, ``info["backtracks"]`` the halvings.
    """

    reference = "Liu et al. 2020 (ICML), Alg. 1; Armijo backtracking on the upper term (ours)"
    state_keys = ("s_u",)

    def __init__(self, inner: Dynamics, direction: Aggregation, *, truncate: int | None = None,
                 checkpoint: bool | int = False):
        super().__init__(inner, truncate=truncate, checkpoint=checkpoint, grad_fn=direction)
        self.direction = direction

    def init_state(self, bound: Bound) -> dict[str, Any]:
        return {"s_u": [self.direction.s_u] * self.inner.steps}

    def check_state(self, state: Any) -> dict[str, Any]:
        state = super().check_state(state)
        trials = state["s_u"]
        if isinstance(trials, torch.Tensor):  # (the form of a compiled run: BDA.graph_state)
            ok = trials.shape == (self.inner.steps,) and trials.is_floating_point() and (
                torch.compiler.is_compiling() or bool((trials > 0).all()))
        else:
            ok = (isinstance(trials, (list, tuple)) and len(trials) == self.inner.steps
                  and all(isinstance(s, float) and s > 0 for s in trials))
        if not ok:
            raise ConfigError(f"BDA: state['s_u'] must hold {self.inner.steps} positive trial steps "
                              f"(one per lower step), got {trials!r}")
        return state

    def compute(self, bound: Bound, state: dict):
        trials = state["s_u"]
        if isinstance(trials, torch.Tensor) and graph_path():
            return self._compute_in_graph(bound, state, trials)
        held = trials if isinstance(trials, torch.Tensor) else None
        trials = trials.tolist() if held is not None else list(trials)
        used: dict[int, tuple] = {}
        est = copy.copy(self)  # this call's direction; the estimator itself is never modified
        est.grad_fn = partial(self.direction, trials=trials, used=used)
        gx, ys, info, _ = Reverse.compute(est, bound, state)
        new = list(trials)
        for k, (s, first, _) in used.items():
            new[k] = min(self.direction.s_u, GROW * s) if first else s
        info["s_u"] = [used[k][0] for k in sorted(used)]
        info["backtracks"] = sum(h for _, _, h in used.values())
        return gx, ys, info, {**state, "s_u": new if held is None else held.new_tensor(new)}

    def _compute_in_graph(self, bound: Bound, state: dict, trials: torch.Tensor):
        """:meth:`compute` with the trial steps a tensor (a compiled step, or the eager step that
        records its pattern): the searches of :func:`backtrack_in_graph`, the regrowth as tensors."""
        used: dict[int, tuple] = {}
        est = copy.copy(self)
        est.grad_fn = partial(self.direction, trials=trials, used=used)
        gx, ys, info, _ = Reverse.compute(est, bound, state)
        cap = self.direction.s_u
        new = [torch.where(used[k][1], torch.clamp(GROW * used[k][0], max=cap), used[k][0])
               if k in used else trials[k] for k in range(len(trials))]
        keys = sorted(used)
        info["s_u"] = torch.stack([used[k][0] for k in keys]) if keys else trials[:0]
        info["backtracks"] = sum(used[k][2] for k in keys) if keys else 0
        return gx, ys, info, {**state, "s_u": torch.stack(new)}


class BDA(HypergradientDescent):
    """Bi-level descent aggregation (see module docstring).

    ``mu``: aggregation strength (α_0 = μ, default 0.5); ``schedule``: k -> α_k replacing μ/(k+1)
    (give one of the two); ``s_u``: upper step inside the lower loop (default: the lower step
    s_l = ``inner.lr``) — with ``adaptive=True`` (default) the cap and first trial of the Armijo
    backtracking of the module docstring (our safeguard, not the paper's), with ``adaptive=False``
    the fixed step of the paper. History records: ``s_u_min`` / ``s_u_max`` (steps used this outer
    step) and ``backtracks`` (halvings) when adaptive.
    """

    reference = "Liu et al. 2020 (ICML), Alg. 1 (BDA), alpha_k = mu/(k+1)"

    def __init__(
        self,
        inner: Dynamics,
        upper_lr: float = 0.1,
        *,
        upper: Any = None,
        mu: float | None = None,
        s_u: float | None = None,
        adaptive: bool = True,
        schedule: Callable[[int], float] | None = None,
        warm_start: bool = False,
        truncate: int | None = None,
        checkpoint: bool | int = False,
    ):
        if not isinstance(inner.lr, (int, float)):
            raise ConfigError("BDA needs a numeric inner.lr (the lower step s_l)")
        if schedule is not None and mu is not None:
            raise ConfigError("BDA: give mu (alpha_k = mu/(k+1)) or schedule (k -> alpha_k), not both: "
                              "the schedule would silently replace mu")
        if not isinstance(adaptive, bool):
            raise ConfigError(f"BDA: adaptive must be True or False, got {adaptive!r}")
        self.mu = 0.5 if mu is None else float(mu)
        alpha = schedule if schedule is not None else bda_schedule(self.mu)
        self.s_u = float(inner.lr if s_u is None else s_u)
        if not (self.s_u > 0 and math.isfinite(self.s_u)):
            raise ConfigError(f"BDA needs a finite s_u > 0, got {self.s_u}")
        self.adaptive = adaptive
        self.direction = Aggregation(alpha, float(inner.lr), self.s_u)
        if adaptive:
            est: Reverse = AggregatedReverse(inner, self.direction, truncate=truncate, checkpoint=checkpoint)
        else:
            est = Reverse(inner, truncate=truncate, checkpoint=checkpoint, grad_fn=self.direction)
        super().__init__(est, upper=upper if upper is not None else upper_lr, warm_start=warm_start)

    def alpha(self, k: int) -> float:
        """The aggregation weight α_k of lower step k."""
        return float(self.direction.alpha(k))

    def metrics(self, x: Any, grad: Any, info: dict[str, Any]) -> dict[str, Any]:
        used = info.get("s_u")
        if used is None or len(used) == 0:
            return {}
        if isinstance(used, torch.Tensor):  # (a compiled step)
            return {"s_u_min": used.min(), "s_u_max": used.max(), "backtracks": info["backtracks"]}
        return {"s_u_min": min(used), "s_u_max": max(used), "backtracks": info["backtracks"]}

    def graph_state(self, state: dict[str, Any]) -> None:
        """A compiled run keeps the Armijo trial steps as a tensor (float64; float32 on Apple's
        GPUs), so that their changes are values of one graph, not new patterns."""
        est = state.get("est")
        if self.adaptive and isinstance(est, dict) and isinstance(est.get("s_u"), (list, tuple)):
            dev = state["x"][0].device
            est["s_u"] = torch.tensor(est["s_u"], dtype=torch.float32 if dev.type == "mps"
                                      else torch.float64, device=dev)
