"""The solver interface and the outer loop :func:`bilevel.solve`.

A solver is a small object with two methods, mirroring an algorithm box:

* ``init(ctx, xs, ys) -> state``: a dict of tensors / numbers (checkpointable with torch.save),
  holding at least ``"x"`` and ``"y"`` (flat leaves);
* ``step(ctx, state, t) -> metrics``: one outer iteration, updating ``state`` in place and
  returning a dict of per-step diagnostics;
* ``setup(ctx, state)`` (optional, kept for compatibility): per-run preparation, also called when
  resuming. It must not set attributes: everything that changes lives in ``state`` (an estimator's
  own state under ``state["est"]``), and per-run derived objects (dynamics or estimators with the
  problem's projection attached) come from :meth:`Context.inner` / :meth:`Context.estimator`.
  So the same solver object can run many times and a resumed run is exact.

:func:`solve` owns everything around it: flattening, projections, data samplers, timing (the
clock excludes tracking and callbacks), non-finite checks, history, resuming from a state.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import _tree as T
from .. import oracles as O
from ..formulation import Bound, Problem
from ..inner import Dynamics, with_projection
from ..sampling import Sampler
from ..validation import check_compatible, check_finite, check_variables

__all__ = ["Solver", "Context", "SolveResult", "solve", "descend"]


class Context:
    """What a solver may use: the problem, projections, data, and flat <-> pytree helpers."""

    def __init__(
        self,
        problem: Problem,
        xspec: T.Spec,
        yspec: T.Spec,
        *,
        x_projection: Callable | None = None,
        y_projection: Callable | None = None,
        lower_data: Sampler | None = None,
        upper_data: Sampler | None = None,
        y_fn: Callable | None = None,
    ):
        self.problem, self.xspec, self.yspec = problem, xspec, yspec
        self.x_projection, self.y_projection = x_projection, y_projection
        self.lower_data, self.upper_data = lower_data, upper_data
        self.y_fn = y_fn
        self._memo: dict[int, tuple[Any, Any]] = {}  # per-run derived objects (see _derived)

    # data ---------------------------------------------------------------------------------
    def lower_batch(self) -> Any:
        return None if self.lower_data is None else self.lower_data.next()

    def upper_batch(self) -> Any:
        return None if self.upper_data is None else self.upper_data.next()

    def full_batches(self) -> tuple[Any, Any]:
        up = None if self.upper_data is None else self.upper_data.full()
        lo = None if self.lower_data is None else self.lower_data.full()
        return up, lo

    # objectives ---------------------------------------------------------------------------
    def bound(self, xs: T.Leaves, ys: T.Leaves, upper_batch: Any = None,
              lower_batch: Any = None) -> Bound:
        return Bound.from_leaves(self.problem, xs, self.xspec, ys, self.yspec,
                                 upper_batch=upper_batch, lower_batch=lower_batch, y_fn=self.y_fn)

    def fresh_G(self):
        """The lower objective on a freshly drawn lower batch (full data without a sampler)."""
        return self.G(self.lower_batch())

    def fresh_F(self):
        """The upper objective on a freshly drawn upper batch (full data without a sampler)."""
        return self.F(self.upper_batch())

    def F(self, batch: Any = None):
        return self.bound((), (), upper_batch=batch).F

    def G(self, batch: Any = None):
        return self.bound((), (), lower_batch=batch).G

    # projections --------------------------------------------------------------------------
    def project_x(self, xs: T.Leaves) -> T.Leaves:
        return xs if self.x_projection is None else tuple(self.x_projection(t) for t in xs)

    def project_y(self, ys: T.Leaves) -> T.Leaves:
        return ys if self.y_projection is None else tuple(self.y_projection(t) for t in ys)

    def _derived(self, obj: Any, make: Callable[[Any], Any]) -> Any:
        """``make(obj)``, built once per run (the solver and its estimator stay untouched)."""
        hit = self._memo.get(id(obj))
        if hit is None or hit[0] is not obj:
            hit = (obj, make(obj))
            self._memo[id(obj)] = hit
        return hit[1]

    def inner(self, dyn: Dynamics) -> Dynamics:
        """The lower-level dynamics with the problem's y-projection attached."""
        if self.y_projection is None:
            return dyn
        return self._derived(dyn, lambda d: with_projection(d, self.y_projection))

    def estimator(self, est: Any) -> Any:
        """A hypergradient estimator whose inner dynamics carry the problem's y-projection (a copy
        made once per run; ``est`` itself is never modified)."""
        if self.y_projection is None or getattr(est, "inner", None) is None:
            return est

        def attach(e: Any) -> Any:
            out = copy.copy(e)
            out.inner = self.inner(e.inner)
            return out

        return self._derived(est, attach)


def descend(
    rule: Dynamics, rstate: T.Leaves, grad: T.Leaves, t: int, project: Callable[[T.Leaves], T.Leaves]
) -> tuple[T.Leaves, T.Leaves]:
    """One projected step of an update rule of :mod:`bilevel.inner` (the upper-level step of a
    solver): returns (new variable, new rule state), the projection applied to the variable and
    stored back into the rule's state."""
    new = rule.update(rstate, grad, t)
    v = project(rule.output(new))
    return v, v + tuple(new[len(v) :])


class Solver:
    """Base class of all bilevel solvers."""

    reference: str = ""

    def init(self, ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, Any]:
        """Fresh state (not called when resuming)."""
        return {"x": xs, "y": ys}

    def setup(self, ctx: Context, state: dict[str, Any]) -> None:
        """Per-run preparation, called before the first step of a fresh *or resumed* run.

        Must not change attributes of the solver (state is data: keep it in ``state``); the
        solvers of this package need no setup.
        """

    def step(self, ctx: Context, state: dict[str, Any], t: int) -> dict[str, Any]:
        raise NotImplementedError

    def output(self, state: dict[str, Any]) -> tuple[T.Leaves, T.Leaves]:
        """The (x, y) pair the solver reports (e.g. an average or the last iterate)."""
        return state["x"], state["y"]

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({keys})"


@dataclass
class SolveResult:
    x: Any
    y: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


def _track(ctx: Context, xs: T.Leaves, ys: T.Leaves) -> dict[str, float]:
    """Upper value and lower gradient norm on the full data (not timed, not counted)."""
    up, lo = ctx.full_batches()
    with O.counting():  # keep evaluation out of the caller's oracle counts
        F = ctx.F(up)
        G = ctx.G(lo)
        fval = float(O.value(F, xs, ys))
        gnorm = float(T.norm(O.grad_y(G, xs, ys)))
    return {"upper_loss": fval, "lower_grad_norm": gnorm}


def _finite_summary(xs: T.Leaves, ys: T.Leaves) -> Tensor:
    """[x all finite, y all finite] as a device tensor (no host sync)."""
    def fin(ts: T.Leaves) -> Tensor:
        return torch.stack([torch.isfinite(t).all() for t in ts]).all()

    return torch.stack([fin(xs), fin(ys)])


def _check_pending(pending: list[Tensor], last_step: int) -> None:
    """One host sync for the summaries of the last len(pending) steps; raise at the first bad one."""
    if not pending:
        return
    ok = torch.stack(pending)
    k = len(pending)
    pending.clear()
    if bool(ok.all()):
        return
    i, j = (int(v) for v in (~ok).nonzero()[0])
    check_finite([torch.tensor(float("nan"))], *(("upper", "the upper variable x") if j == 0
                 else ("lower", "the lower variable y")), step=last_step - k + 1 + i)


def solve(
    problem: Problem,
    x0: Any,
    y0: Any,
    *,
    solver: Solver,
    steps: int = 100,
    x_projection: Callable | None = None,
    y_projection: Callable | None = None,
    callback: Callable[[int, Any, Any, dict], bool | None] | None = None,
    lower_data: Sampler | None = None,
    upper_data: Sampler | None = None,
    track: bool | int = True,
    state: dict[str, Any] | None = None,
    compile: bool = False,
    check_every: int = 1,
) -> SolveResult:
    """Run ``solver`` for ``steps`` outer iterations from (x0, y0).

    Non-finite x or y raise :class:`~bilevel.errors.NonFiniteError` naming the step; the checks
    of ``check_every`` steps are batched into one host synchronisation (GPU: set it to e.g. 50;
    tracking steps and the end are always checked; a callback may then see up to
    ``check_every - 1`` unchecked iterates).

    ``track`` (True or every-N) records f(x, y) and ‖∇_y g(x, y)‖ on the full data each
    (N-th) step, outside the clock. ``callback(t, x, y, record)`` runs after each step and may
    return True to stop. ``state`` (from a previous :class:`SolveResult`) resumes a run.
    ``y0`` may be a callable x -> y0 (solvers that learn the initialization use it).
    ``compile=True`` runs every oracle as a compiled kernel (:mod:`bilevel.compiled`).
    """
    xs, xspec = T.flatten(x0)
    check_variables(xs, "x0")
    y_fn = y0 if callable(y0) and not isinstance(y0, torch.Tensor) else None
    ys, yspec = T.flatten(y_fn(x0) if y_fn is not None else y0)
    check_variables(ys, "y0")
    check_compatible(xs, ys)
    ctx = Context(problem, xspec, yspec, x_projection=x_projection, y_projection=y_projection,
                  lower_data=lower_data, upper_data=upper_data, y_fn=y_fn)
    if state is None:
        state = solver.init(ctx, ctx.project_x(T.detach(xs)), ctx.project_y(T.detach(ys)))
        state.setdefault("t", 0)
        state.setdefault("time", 0.0)
        state.setdefault("counts", O.OracleCounts())
    solver.setup(ctx, state)
    history: list[dict[str, Any]] = []
    every = int(track) if not isinstance(track, bool) else (1 if track else 0)
    if int(check_every) < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    pending: list[Tensor] = []  # per step: [x finite, y finite] (device flags)
    with torch.no_grad(), O.backend("compiled" if compile else O.get_backend()):
        for t in range(int(state["t"]), steps):
            t0 = time.perf_counter()
            with torch.enable_grad(), O.counting(state["counts"]):
                metrics = solver.step(ctx, state, t)
            state["time"] += time.perf_counter() - t0
            state["t"] = t + 1
            x_out, y_out = solver.output(state)
            pending.append(_finite_summary(x_out, y_out))
            tracked = bool(every) and (t + 1) % every == 0
            if len(pending) >= int(check_every) or tracked or t + 1 == steps:
                _check_pending(pending, t + 1)
            record = {"step": t + 1, "time": state["time"], **metrics,
                      **state["counts"].flat()}
            if tracked:
                record.update(_track(ctx, x_out, y_out))
            history.append(record)
            if callback is not None and callback(
                t + 1, T.unflatten(x_out, xspec), T.unflatten(y_out, yspec), record
            ):
                break
        _check_pending(pending, int(state["t"]))
    x_out, y_out = solver.output(state)
    return SolveResult(T.unflatten(x_out, xspec), T.unflatten(y_out, yspec), history, state)
