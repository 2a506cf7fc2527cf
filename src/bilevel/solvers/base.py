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
import inspect
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _tree as T
from .. import oracles as O
from ..errors import BilevelError, ConfigError, InexactResumeWarning, NonFiniteError
from ..formulation import Bound, Objective, Problem
from ..inner import Dynamics, with_projection
from ..sampling import Sampler, as_sampler
from ..validation import check_compatible, check_finite, check_variables

__all__ = ["Solver", "Context", "SolveResult", "solve", "descend", "copy_state", "solver_name"]


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
        device: torch.device | None = None,
    ):
        self.problem, self.xspec, self.yspec = problem, xspec, yspec
        self.x_projection, self.y_projection = x_projection, y_projection
        # samplers, or any iterable of batches / DataLoader (batches moved to `device`)
        self.lower_data = as_sampler(lower_data, "lower_data", device=device)
        self.upper_data = as_sampler(upper_data, "upper_data", device=device)
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
              lower_batch: Any = None, buffers: Any = None) -> Bound:
        """The problem bound to (x, y) and batches; ``buffers``: the carried buffers to start the
        lower dynamics from (``Problem(buffers=...)``; default its ``init``)."""
        return Bound.from_leaves(self.problem, xs, self.xspec, ys, self.yspec,
                                 upper_batch=upper_batch, lower_batch=lower_batch, y_fn=self.y_fn,
                                 buffers=buffers)

    def fresh_G(self):
        """The lower objective on a freshly drawn lower batch (full data without a sampler)."""
        return self.G(self.lower_batch())

    def fresh_F(self):
        """The upper objective on a freshly drawn upper batch (full data without a sampler)."""
        return self.F(self.upper_batch())

    def F(self, batch: Any = None, buffers: Any = None):
        if buffers is None and self.problem.buffers is None:  # what bound(...).F builds, directly
            return Objective(self.problem, "upper", batch, self.xspec, self.yspec)
        return self.bound((), (), upper_batch=batch, buffers=buffers).F

    def G(self, batch: Any = None):
        return Objective(self.problem, "lower", batch, self.xspec, self.yspec)  # = bound(...).G

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
    #: does the solver carry ``Problem(buffers=...)`` through its lower dynamics and from one
    #: outer step to the next (``state["buffers"]``)? Others reject such a problem.
    carries_buffers: bool = False
    #: why one step of this solver cannot be one compiled graph (None: it can); whole-step
    #: compiled mode then uses per-oracle kernels and says why
    step_not_compilable: str | None = None

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

    def prepare(self, state: dict[str, Any], t: int) -> None:
        """The random discrete choices of step ``t`` (e.g. a random truncation index), drawn from
        the solver's random state in ``state`` and stored there *before* the step (by
        :func:`solve`, outside any compiled region: Python / ``torch.Generator`` random numbers
        cannot be traced). Nothing by default."""

    def phase(self, state: dict[str, Any], t: int) -> Any:
        """What, besides the structure of ``state``, decides which code path step ``t`` takes and
        which batches it draws (e.g. a restart every ``period`` steps); whole-step compiled mode
        (:mod:`bilevel.compiled_step`) records one pattern per distinct value. None by default."""
        return None

    def graph_state(self, state: dict[str, Any]) -> None:
        """Put ``state`` into the form a compiled step takes, in place (whole-step compiled mode
        calls it at the start of a run and before each compiled step, outside the graph; e.g.
        SABA stacks its SAGA memories). Nothing by default."""

    def commit(self, state: dict[str, Any], ok: bool) -> None:
        """After a compiled step (outside the graph): apply (``ok``: the step's x and y are
        finite) or drop the writes the graph deferred, e.g. SABA's rows into its stacked SAGA
        memories, written in place — a copy per step of each whole table otherwise. Nothing by
        default."""

    def step_x(self, ctx: Context, state: dict[str, Any], grad: T.Leaves, t: int) -> T.Leaves:
        """The upper step  x ← P_X(U(x, d_t))  with this solver's rule ``self.upper`` (see
        :mod:`bilevel.solvers.upper`): updates ``state["x"]`` and the rule's state
        ``state["upper"]`` (created at the first step) and returns the new x."""
        rstate = state.get("upper")
        if rstate is None:
            rstate = self.upper.init(state["x"])
        state["x"], state["upper"] = descend(self.upper, rstate, grad, t, ctx.project_x)
        return state["x"]

    def output(self, state: dict[str, Any]) -> tuple[T.Leaves, T.Leaves]:
        """The (x, y) pair the solver reports (e.g. an average or the last iterate)."""
        return state["x"], state["y"]

    def lower_pair(self, state: dict[str, Any]) -> tuple[T.Leaves, T.Leaves]:
        """The (x, y) pair at which y was computed as the lower solution — where "is the lower level
        solved?" is asked. The reported pair by default; a solver that moves x after solving the
        lower level at it (hypergradient descent: y_t ≈ y*(x_t), then x_{t+1}) returns (x_t, y_t)."""
        return self.output(state)

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({keys})"


@dataclass
class SolveResult:
    """``x``, ``y``: the solver's output; ``history``: one record per outer step; ``state``: the
    solver state after the last step (pass it as ``bl.solve(..., state=...)`` to resume)."""

    x: Any
    y: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)


def solver_name(solver: Any) -> str:
    """The class name recorded in a solver state (wrappers holding ``.solver`` name both)."""
    inner = getattr(solver, "solver", None)
    name = type(solver).__qualname__
    return f"{name}[{solver_name(inner)}]" if isinstance(inner, Solver) else name


#: values a state copy shares as they are (immutable, or tensors, never written in place)
_SHARED = frozenset({Tensor, int, float, bool, str, complex, bytes, type(None)})


def copy_state(obj: Any, weak: bool = False) -> Any:
    """A structural copy of a state: containers (dict, list, tuple) and the small bilevel objects
    inside (oracle counts, SAGA tables) are copied, tensors are shared — the package never writes
    into a state tensor in place that a copy shares, so this is enough for the copy to be
    independent; a ``random.Random`` is copied with its generator state. An object with a
    ``_state_copy()`` method is copied by it (a SAGA table shares its memory: O(1); in its
    stacked form it copies on its next write). ``weak=True`` (the last
    good state of a step, used only if that step fails): ``_weak_copy()`` where an object has one
    (shares without copy-on-write: valid until the live object's next write, which happens only
    once the step has succeeded)."""
    tp = type(obj)
    if tp is dict:
        return {k: v if type(v) in _SHARED else copy_state(v, weak) for k, v in obj.items()}
    if tp is tuple:  # immutable: shared as is when it holds only tensors (flat leaves)
        for v in obj:
            if type(v) is not Tensor:
                return tuple([copy_state(v, weak) for v in obj])
        return obj
    if tp in _SHARED:
        return obj
    if tp is O.OracleCounts:  # {level: {kind: int}}: two levels (cheaper than deepcopy)
        return tp({k: dict(v) for k, v in obj.items()})
    if isinstance(obj, random.Random):  # (a user solver's; the package keeps generator states)
        return copy.copy(obj)  # (its __reduce__ carries the generator state: an independent copy)
    own = (weak and getattr(tp, "_weak_copy", None)) or getattr(tp, "_state_copy", None)
    if own is not None:
        return own(obj)
    if isinstance(obj, O.OracleCounts):
        return type(obj)({k: dict(v) for k, v in obj.items()})
    if isinstance(obj, dict):  # other small dict subclasses
        return copy.deepcopy(obj)
    if isinstance(obj, list):  # (tensors inline)
        return [v if type(v) in _SHARED else copy_state(v, weak) for v in obj]
    if (tp.__module__.startswith("bilevel.") and hasattr(obj, "__dict__")
            and not isinstance(obj, (Solver, Dynamics))):
        out = copy.copy(obj)
        out.__dict__.update({k: copy_state(v, weak) for k, v in vars(obj).items()})
        return out
    return obj


def _last_good(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`copy_state` (weak) of the state before a step of :func:`solve` (the partial result
    of an error in that step), sharing ``state["data"]``: solve puts a fresh dict of sampler
    positions there after every step (and copies a resumed state first), and nothing writes into
    it — a sampler's ``state_dict`` returns a snapshot (every sampler of the package builds a new
    dict)."""
    return {k: v if type(v) in _SHARED or k == "data" else copy_state(v, True)
            for k, v in state.items()}


def _leaf_shapes(leaves: Any) -> list[tuple[tuple[int, ...], torch.dtype]] | None:
    if not isinstance(leaves, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in leaves):
        return None
    return [(tuple(t.shape), t.dtype) for t in leaves]


def _check_resume(solver: Solver, state: Any, xs: T.Leaves, ys: T.Leaves) -> None:
    """A state passed to :func:`solve` must come from the same solver class and variables of the
    same shapes and dtypes as ``x0`` / ``y0``."""
    if not isinstance(state, dict) or "t" not in state or "x" not in state:
        raise ConfigError(
            "bl.solve(state=...) needs the .state of a previous SolveResult (a dict with 't', 'x', "
            f"'y', ...), got {type(state).__name__}"
        )
    want, got = solver_name(solver), state.get("solver")
    if got is not None and got != want:
        raise ConfigError(
            f"cannot resume: the state was made by solver {got}, not {want}; resume with the same "
            "solver class or start a fresh run (state=None)"
        )
    for name, key, leaves in (("x0", "x", xs), ("y0", "y", ys)):
        have = _leaf_shapes(state.get(key))
        want_shapes = _leaf_shapes(leaves)
        if have is not None and have != want_shapes:
            raise ConfigError(
                f"cannot resume: the state's {key} has leaves (shape, dtype) {have} but {name} has "
                f"{want_shapes}; pass the {name} of the run that produced the state"
            )


_LEVELS = ("lower", "upper")


def _data_state(ctx: Context) -> dict[str, Any]:
    """The position (and random state) of each level's sampler — for a DataLoader: epoch,
    batches consumed, the state of its generators at the start of the epoch — kept in the solver
    state as ``state["data"]`` so that ``bl.solve(state=...)`` resumes the data exactly."""
    return {level: fn() for level, fn in _data_fns(ctx)}


def _data_fns(ctx: Context) -> list[tuple[str, Callable[[], Any]]]:
    """The ``state_dict`` methods :func:`_data_state` calls, looked up once per run."""
    out = []
    for level in _LEVELS:
        fn = getattr(getattr(ctx, f"{level}_data"), "state_dict", None)
        if callable(fn):
            out.append((level, fn))
    return out


def _restore_data(ctx: Context, saved: Any) -> None:
    """Load the positions of ``state["data"]`` into this run's samplers (a fresh DataLoader
    adapter, or the sampler object of the interrupted run); warn once if a loader cannot
    reproduce its order (:class:`~bilevel.errors.InexactResumeWarning`)."""
    if not saved:
        return
    for level in _LEVELS:
        if level not in saved:
            continue
        s = getattr(ctx, f"{level}_data")
        if s is None:
            raise ConfigError(
                f"cannot resume: the state holds the position of {level}_data, but no {level}_data "
                "was given; pass the same data as the interrupted run"
            )
        if callable(getattr(s, "load_state_dict", None)):
            s.load_state_dict(saved[level])
    inexact = [f"{lv}_data" for lv in _LEVELS if lv in saved
               and getattr(getattr(ctx, f"{lv}_data"), "exact_resume", True) is False]
    if inexact:
        warnings.warn(
            f"resuming with {' and '.join(inexact)}: the DataLoader shuffles with the global RNG "
            "(no generator of its own), so the run continues at the right position but with "
            "other batches than the uninterrupted run (approximate resume); for an exact resume "
            "pass DataLoader(..., generator=torch.Generator().manual_seed(SEED))",
            InexactResumeWarning, stacklevel=3)


def _takes_state(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "state" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _fail(exc: BaseException, t: int, solver: Solver, partial: SolveResult) -> None:
    """Name the outer step in an error raised inside :func:`solve` and attach the partial result
    (``exc.partial``: history so far and the last good state; ``exc.outer_step``)."""
    where = f"outer step {t} of {solver_name(solver)}"
    try:
        exc.outer_step = t
        exc.partial = partial
    except AttributeError:  # exceptions with __slots__: nothing to attach to
        return
    if isinstance(exc, BilevelError) and exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} [{where}; partial result in .partial]", *exc.args[1:])
    else:
        exc.add_note(f"bilevel: raised at {where}; the partial result is attached as .partial")


def _failure(exc: Exception, t: int, good: dict[str, Any] | None, checks: _FiniteChecks, solver: Solver,
             history: list[dict[str, Any]], xspec: T.Spec, yspec: T.Spec) -> Exception:
    """The error to raise for a failure during outer step ``t`` of :func:`solve` (``good``: the
    state before it), the partial result attached (:func:`_fail`). Where earlier steps' checks
    were pending, the first non-finite iterate among them is the error (this one its cause); a
    failed check whose step's state was kept (:class:`_FiniteChecks`) carries that state and the
    history before it, else ``good`` (``None`` only where a kept state is certain) and the
    history so far."""
    err = exc
    if checks.failed is None and checks.pending:
        try:
            checks.check(t - 1)
        except NonFiniteError as nf:
            err = nf
    step, hist = t, list(history)
    if checks.failed is not None and checks.failed[1] is not None:
        step, good = checks.failed
        hist = [r for r in history if r["step"] < step]
    gx, gy = solver.output(good)
    _fail(err, step, solver, SolveResult(T.unflatten(gx, xspec), T.unflatten(gy, yspec), hist, good))
    return err


def _track(ctx: Context, xs: T.Leaves, ys: T.Leaves, buffers: Any = None) -> dict[str, float]:
    """Upper value and lower gradient norm on the full data (not timed, not counted); an upper
    objective that reads buffers gets the solver's carried ones (``state["buffers"]``)."""
    up, lo = ctx.full_batches()
    with O.counting():  # keep evaluation out of the caller's oracle counts
        F = ctx.F(up, buffers)
        G = ctx.G(lo)
        fval = float(O.value(F, xs, ys))
        gnorm = float(T.norm(O.grad_y(G, xs, ys)))
    return {"upper_loss": fval, "lower_grad_norm": gnorm}


def _unflattener(spec: T.Spec) -> Callable[[T.Leaves], Any]:
    """``leaves -> T.unflatten(leaves, spec)``, direct for a bare tensor."""
    if T.is_leaf_spec(spec):
        return lambda leaves: leaves[0]
    return lambda leaves: T.unflatten(leaves, spec)


def _host(metrics: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics for the record: one-element tensors (a step may return them, e.g. from
    a compiled graph) as Python numbers."""
    if not any(isinstance(v, torch.Tensor) for v in metrics.values()):
        return metrics
    return {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
            for k, v in metrics.items()}


#: leaves up to this many entries get a cached zero vector for their finiteness summary
_ZEROS_MAX = 1 << 20
#: CPU float leaves up to this many entries are summarised on the host (numpy's BLAS dot, a
#: fraction of a torch call's dispatch; OpenBLAS keeps dots of this size on one thread)
_HOST_MAX = 10_000
_HOST_DTYPES = frozenset({torch.float32, torch.float64})


def _host_leaf(t: Tensor) -> bool:
    """Does ``t`` qualify for :func:`_host_dot` (small contiguous CPU float32 / float64, no graph)?"""
    return (t.numel() <= _HOST_MAX and t.is_cpu and t.dtype in _HOST_DTYPES and not t.requires_grad
            and t.is_contiguous())


def _on_host(ts: T.Leaves) -> bool:
    """Do all leaves qualify for :func:`_host_dot`?"""
    return all(_host_leaf(t) for t in ts)


#: numpy warns "invalid value encountered in dot" when ⟨t, 0⟩ meets ±inf: the summary's job, not
#: a problem (the NonFiniteError says it; under ``-W error`` the warning would replace that error)
def _quiet_fp() -> Any:
    return np.errstate(invalid="ignore", over="ignore")


def _host_dot(ts: T.Leaves, zeros: dict) -> float | None:
    """Σ ⟨t, 0⟩ by numpy for small contiguous CPU float32 / float64 leaves (a Python float); None
    where one leaf does not qualify (the caller falls back to torch). Call it under
    ``_quiet_fp()``."""
    out = 0.0
    for t in ts:
        if not _host_leaf(t):
            return None
        n = t.numel()
        key = (n, t.dtype, None)
        z = zeros.get(key)
        if z is None:
            z = zeros[key] = np.zeros(n, dtype=np.float32 if t.dtype == torch.float32 else np.float64)
        out += float(np.dot(t.numpy().reshape(-1), z))
    return out


def _zero_dot(ts: T.Leaves, zeros: dict | None) -> Tensor | float:
    """Σ ⟨t, 0⟩ over the leaves: exactly 0 when all entries are finite (no overflow, unlike a
    sum), NaN as soon as one is ±inf or NaN — one BLAS dot per leaf against a zero vector cached
    in ``zeros`` (per run, keyed by size, dtype and device): on the host for small CPU leaves
    (:func:`_host_dot`, a float), else a device tensor (no host sync; leaves above ``_ZEROS_MAX``
    entries, or without a cache, fall back to Σ 0·t, two kernels)."""
    if zeros is not None:
        host = _host_dot(ts, zeros)
        if host is not None:
            return host
    out = None
    for t in ts:
        n = t.numel()
        z = None
        if zeros is not None and n <= _ZEROS_MAX:
            key = (n, t.dtype, t.device)
            z = zeros.get(key)
            if z is None:
                z = zeros[key] = torch.zeros(n, dtype=t.dtype, device=t.device)
        d = t.mul(0).sum() if z is None else torch.dot(t if t.ndim == 1 else t.reshape(-1), z)
        out = d if out is None else out + d
    return out


def _finite_summary(xs: T.Leaves, ys: T.Leaves, zeros: dict | None = None) -> tuple[Any, Any]:
    """(x all finite, y all finite) encoded as (0 or NaN, 0 or NaN): Python floats for small CPU
    leaves, else device tensors (no host sync; see :func:`_zero_dot`)."""
    return _zero_dot(xs, zeros), _zero_dot(ys, zeros)


def _codes(c: Any) -> Tensor:
    """One pending summary as a 2-element float64 tensor [x code, y code]."""
    if type(c) is not tuple:
        return c.reshape(2).to(torch.float64)
    dev = next((v.device for v in c if isinstance(v, Tensor)), None)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev) for v in c])


def _check_pending(pending: list[Any], last_step: int) -> None:
    """One host sync for the summaries of the last len(pending) steps (each a pair of
    :func:`_finite_summary`, host floats or device tensors, or a 2-element tensor [x code,
    y code]); raise at the first bad one."""
    if not pending:
        return
    k = len(pending)
    if k == 1:
        c = pending[0]
        if type(c) is tuple:
            ok = float(c[0] + c[1]) == 0.0  # (one host sync)
        elif c.dim() == 1:  # a compiled step's flags: read as a list, no reduction op dispatched
            ok = c.tolist() == [0.0, 0.0]
        else:
            ok = float(c.sum()) == 0.0
        if ok:
            pending.clear()
            return
    if all(type(c) is tuple and type(c[0]) is float and type(c[1]) is float for c in pending):
        bad = [(i, j) for i, c in enumerate(pending) for j in (0, 1) if c[j] != 0.0]  # (host)
        pending.clear()
        if not bad:
            return
        i, j = bad[0]
    else:
        codes = torch.stack([_codes(c) for c in pending])
        pending.clear()
        if k > 1 and float(codes.sum()) == 0.0:
            return
        ok = (codes == 0).reshape(k, 2)
        i, j = (int(v) for v in (~ok).nonzero()[0])
    check_finite([torch.tensor(float("nan"))], *(("upper", "the upper variable x") if j == 0
                 else ("lower", "the lower variable y")), step=last_step - k + 1 + i)


#: ``check_every=None``: iterates summarised on the host (:func:`_on_host`) are checked in batches of
#: this many steps, each step's last good state kept (the error still names its step and carries
#: the state before it); device iterates are checked every step
_HOST_BATCH = 16


class _FiniteChecks:
    """The finiteness checks of :func:`solve`'s iterates, batched by ``check_every``.

    A pending step is a summary (:func:`_finite_summary`, or a compiled step's flags) or, where
    the run's iterates are small CPU leaves, the iterates themselves as a list ``[x, y]``,
    summarised at the check (one tight loop: a summary right after a step costs ~4× as much, the
    step having evicted its code from the caches). Those runs keep the last good state of each
    pending step (references: small leaves), so a failure names the first bad step and carries
    the state before it; device runs keep only the checking step's."""

    def __init__(self, every: int | None, defer: bool = True):
        # defer: None = decided at the first step (:func:`_on_host`), False = never
        self.every, self.defer, self.limit = every, (None if defer else False), every or 1
        self.pending: list[Any] = []
        self.goods: list[Any] = []  # per pending step: the state before it (None: not kept)
        self.zeros: dict = {}  # the summaries' zero vectors (per run)
        self.failed: tuple[int, Any] | None = None  # (first bad step, the state before it or None)

    def add(self, xs: T.Leaves, ys: T.Leaves, good: Any, flags: Any = None) -> bool:
        """Queue one step's iterates (``flags``: a compiled step's summary); is a check due?"""
        if self.defer is None:
            self.defer = _on_host(xs) and _on_host(ys)
            self.limit = self.every or (_HOST_BATCH if self.defer else 1)
        if flags is not None:
            self.pending.append(flags)
        elif self.defer:
            self.pending.append([xs, ys])
        else:
            with _quiet_fp():
                self.pending.append(_finite_summary(xs, ys, self.zeros))
        self.goods.append(good if self.defer else None)
        return len(self.pending) >= self.limit

    def check(self, last_step: int) -> None:
        """:func:`_check_pending` for the steps up to ``last_step``; on a failure ``failed``."""
        if not self.pending:
            return
        zeros, goods = self.zeros, self.goods
        with _quiet_fp():  # (one context per batch)
            pending = [_finite_summary(e[0], e[1], zeros) if type(e) is list else e
                       for e in self.pending]
        self.pending, self.goods = [], []
        try:
            _check_pending(pending, last_step)
        except NonFiniteError as exc:
            self.failed = (exc.step, goods[exc.step - (last_step - len(pending) + 1)])
            raise


_COMPILE_MODES = {False: None, None: None, True: "step", "step": "step", "oracles": "oracles"}


def _compile_mode(compile: Any) -> str | None:
    try:
        return _COMPILE_MODES[compile]
    except (KeyError, TypeError):
        raise ConfigError(f"compile must be False, True, 'step' or 'oracles', got {compile!r}") from None


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
    compile: bool | str = False,
    check_every: int | None = None,
) -> SolveResult:
    """Run ``solver`` for ``steps`` outer iterations from (x0, y0).

    Non-finite x or y raise :class:`~bilevel.errors.NonFiniteError` naming the first bad step;
    the checks of ``check_every`` steps are batched into one host synchronisation (GPU: set it to
    e.g. 50). Tracking steps, the end and each step before a callback that takes ``state`` are
    always checked; a plain callback may see up to ``check_every - 1`` unchecked iterates. Where
    x and y are small CPU tensors (≤ 10k entries per leaf) the state before each pending step is
    kept, so the error's partial result is the last good state whatever ``check_every``; on a
    device it is the state before the checking step. ``None`` (default): batches of 16 steps for
    small CPU iterates, every step on a device.

    ``track`` (True or every-N) records f(x, y) and ‖∇_y g(x, y)‖ on the full data each
    (N-th) step, outside the clock. ``callback(t, x, y, record)`` runs after each step and may
    return True to stop; a callback with a ``state`` parameter also receives the live solver state
    (``state=``; read it, e.g. to write a checkpoint — do not modify it).

    ``state`` (from a previous :class:`SolveResult`) resumes a run: it is copied first (never
    mutated, so the same state can seed several resumes) and must come from the same solver class
    with x0 / y0 of the same shapes (:class:`~bilevel.errors.ConfigError` otherwise). The state
    holds the data position too (``state["data"]``: each sampler's ``state_dict``; for a
    DataLoader the epoch, the batches consumed and its generators' state), loaded into the
    samplers of the resumed call, so a run resumed with a freshly built, seeded DataLoader (or
    sampler) draws exactly the batches of the uninterrupted run; a loader that shuffles with the
    global RNG resumes approximately (:class:`~bilevel.errors.InexactResumeWarning`, once).
    ``y0`` may be a callable x -> y0 (solvers that learn the initialization use it).
    ``compile=True`` (or ``"step"``) compiles each outer iteration as one graph
    (:mod:`bilevel.compiled_step`: batches drawn eagerly and passed in, the first step of each
    pattern eager, a per-oracle fallback with a warning when a step cannot be captured);
    ``compile="oracles"`` compiles only the oracles, one kernel each (:mod:`bilevel.compiled`).

    An error raised during an outer step names that step and carries the partial result:
    ``exc.outer_step`` and ``exc.partial`` (a :class:`SolveResult` with the history so far and the
    last good state, from which the run can be resumed).
    """
    xs, xspec = T.flatten(x0)
    check_variables(xs, "x0")
    y_fn = y0 if callable(y0) and not isinstance(y0, torch.Tensor) else None
    ys, yspec = T.flatten(y_fn(x0) if y_fn is not None else y0)
    check_variables(ys, "y0")
    check_compatible(xs, ys)
    if getattr(problem, "buffers", None) is not None and not getattr(solver, "carries_buffers", False):
        raise ConfigError(
            f"the problem carries buffers (Problem(buffers=...)), but {solver_name(solver)} does not "
            "step them through its lower updates; use HypergradientDescent (or RHG / AID / BA / "
            "BDA) with an estimator, or carry the statistics yourself (Functional.update_buffers)")
    ctx = Context(problem, xspec, yspec, x_projection=x_projection, y_projection=y_projection,
                  lower_data=lower_data, upper_data=upper_data, y_fn=y_fn, device=xs[0].device)
    if state is None:
        state = solver.init(ctx, ctx.project_x(T.detach(xs)), ctx.project_y(T.detach(ys)))
        state.setdefault("t", 0)
        state.setdefault("time", 0.0)
        state.setdefault("counts", O.OracleCounts())
        state.setdefault("solver", solver_name(solver))
        state["data"] = _data_state(ctx)
    else:
        _check_resume(solver, state, xs, ys)
        state = copy_state(state)
        _restore_data(ctx, state.get("data"))
    solver.setup(ctx, state)
    history: list[dict[str, Any]] = []
    pass_state = callback is not None and _takes_state(callback)
    every = int(track) if not isinstance(track, bool) else (1 if track else 0)
    if check_every is not None:
        check_every = int(check_every)
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1 (or None: automatic), got {check_every}")
    mode = _compile_mode(compile)
    # (a compiled step writes SAGA tables in place: a kept weak last-good copy would not survive)
    checks = _FiniteChecks(check_every, defer=mode != "step")
    step, compiled_step = solver.step, None
    if mode == "step":
        from ..compiled_step import CompiledStep

        compiled_step = CompiledStep(solver, ctx)
        solver.graph_state(state)  # (once, outside the clock; each compiled step checks it too)
        step = lambda ctx, state, t: compiled_step(state, t)  # noqa: E731
    data_fns = _data_fns(ctx)
    counts_var, set_grad = O._ACTIVE, torch._C._set_grad_enabled
    x_tree, y_tree = _unflattener(xspec), _unflattener(yspec)
    flat_keys: dict[tuple[str, str], str] = {}
    with torch.no_grad(), O.backend("compiled" if mode == "oracles" else O.get_backend()):
        for t in range(int(state["t"]), steps):
            good = _last_good(state)  # attached to an error of this step
            try:
                t0 = time.perf_counter()
                solver.prepare(state, t)
                token = counts_var.set(state["counts"])  # (= O.counting(counts) and enable_grad, inline)
                set_grad(True)
                try:
                    metrics = step(ctx, state, t)
                finally:
                    set_grad(False)
                    counts_var.reset(token)
                state["time"] += time.perf_counter() - t0
                state["t"] = t + 1
                state["data"] = {lv: fn() for lv, fn in data_fns}  # the samplers' positions
                x_out, y_out = solver.output(state)
                due = checks.add(x_out, y_out, good, compiled_step.last_finite if compiled_step
                                 is not None and compiled_step.last_compiled else None)
                tracked = bool(every) and (t + 1) % every == 0
                if due or tracked or t + 1 == steps or pass_state:  # (a checkpoint sees checked state)
                    checks.check(t + 1)
            except Exception as exc:
                err = _failure(exc, t + 1, good, checks, solver, history, xspec, yspec)
                if err is exc:
                    raise
                raise err from exc
            record = {"step": t + 1, "time": state["time"]}
            if metrics:
                record.update(_host(metrics))
            for lv, kinds in state["counts"].items():  # (= counts.flat(), the keys built once per run)
                for kind, n in kinds.items():
                    key = flat_keys.get((lv, kind))
                    if key is None:
                        key = flat_keys[lv, kind] = f"{lv}_{kind}"
                    record[key] = n
            if compiled_step is not None:
                record["compiled"] = compiled_step.last_compiled
            if tracked:
                record.update(_track(ctx, x_out, y_out, state.get("buffers")))
            history.append(record)
            if callback is not None and (
                    callback(t + 1, x_tree(x_out), y_tree(y_out), record, state=state) if pass_state
                    else callback(t + 1, x_tree(x_out), y_tree(y_out), record)):
                break
        try:  # (a callback stopped the run with steps pending)
            checks.check(int(state["t"]))
        except NonFiniteError as exc:
            # the state before the bad step where it was kept; device iterates: none was, and the
            # live state holds the bad iterate, so no partial result is attached
            if checks.failed is not None and checks.failed[1] is not None:
                _failure(exc, int(state["t"]), None, checks, solver, history, xspec, yspec)
            raise
    x_out, y_out = solver.output(state)
    return SolveResult(T.unflatten(x_out, xspec), T.unflatten(y_out, yspec), history, state)
