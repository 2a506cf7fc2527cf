"""Whole-step compiled mode: one outer iteration of a solver as one ``torch.compile`` graph.

``bl.solve(..., compile="step")`` (``compile=True`` is the same) runs ``solver.step`` — every
oracle, linear-solver iteration, schedule and axpy of the iteration — as one graph compiled with
``fullgraph=True``, built on the ``torch.func`` form of the oracles (:mod:`bilevel.oracles`), so
every solver gets it without code of its own:

* **batches are arguments.** Before a compiled step the batches it needs are drawn eagerly from the
  real samplers, in the order the step draws them, and handed to the graph, where the solver's
  samplers replay them. The samplers keep their own random state and position, so a compiled run
  draws exactly the batches of an eager run and resumes exactly; new batches cause no recompile.
* **the first step of each pattern runs eagerly.** A pattern is the structure of the solver state
  (which entries exist, which are None, the values of its non-tensor entries) and
  :meth:`Solver.phase` (e.g. VRBO's large-batch restart every ``period`` steps). That eager step
  records how many batches each level draws, in which order, and the step's oracle counts, which
  every compiled step of the pattern then adds — so ``state["counts"]`` equals eager.
* **the step counter** is a Python int that dynamo treats as symbolic from a pattern's first
  graph: schedules t ↦ c/(t+t0)^e are computed inside the graph, and a new t causes no recompile.
* **checks** (non-finite values, linear-solver breakdowns with ``strict=True``) run in traced mode
  (:mod:`bilevel._trace`): the linear solvers run their full budget with masks, and the deferred
  checks are evaluated after the step (one host read). A failed check reruns the step eagerly from
  the state before it (the graph's updates are not applied yet), so the error is the eager step's
  own, with its exact step numbers. A check made with ``redo`` (``_trace.require(..., redo=True)``:
  the values left the path the graph covers, e.g. BDA's Armijo search needing more halvings than
  the graph tries) reruns the step eagerly the same way, and the run goes on.
* **a step whose path depends on values** takes the graph's path in the eager step that records
  its pattern too (``_trace.graph_path()``: IAPTT-GM's truncation, BDA's search), so the recorded
  draws and counts are those of the compiled steps.
* **a clear fallback.** If dynamo cannot capture the step (data-dependent Python control flow,
  ``.item()``, random numbers from a ``torch.Generator``, a data-parallel reducer ...), the run
  continues with per-oracle compiled kernels (:mod:`bilevel.compiled`) and a
  :class:`~bilevel.compiled.CompileFallbackWarning` gives the reason; errors of the user's own code
  are re-raised by the eager step unchanged.

Recompiles are counted in :func:`bilevel.compiled.stats` (``compiles``). Python floats held in
the state that change every step (rare) make every step a new pattern, run eagerly: after
``SCALAR_PATTERNS`` such values of one entry the run falls back with a warning naming the entry
(keep it as a 0-dim tensor).
"""

from __future__ import annotations

import builtins
import copy
import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

from . import _trace
from . import compiled as C
from . import oracles as O
from ._warnings import retry_quietly
from .sampling import Minibatches, gather

__all__ = ["CompiledStep", "BOOKKEEPING", "MAX_PATTERNS", "SCALAR_PATTERNS", "settings"]

#: more distinct patterns than this (one eager step and one graph each) fall back to per-oracle
#: kernels with a warning
MAX_PATTERNS = 32

#: a state entry that is a Python float and takes this many new values (each a new pattern: an
#: eager step) makes the run fall back with a warning naming it (rather than after MAX_PATTERNS)
SCALAR_PATTERNS = 3

#: ``dynamic``: torch.compile's ``dynamic`` (None: automatic — the step counter t is symbolic from
#: a pattern's first graph, shapes are static until they change; True: shapes symbolic too)
#: ``loops``: how a graph holds the inner SGD loop of the double-loop solvers
#: (:func:`bilevel.estimates.sgd_lower`) and the Neumann series of
#: :func:`bilevel.estimates.neumann_hypergradient`: ``"unroll"`` (T copies of the step: fastest
#: per call, compile time grows with T) or ``"while_loop"`` (one copy inside ``torch``'s
#: ``while_loop``, the batches stacked and indexed by the loop counter: compile time about
#: constant in T, each step 17–45 % slower; docs/performance.md, ``python -m bilevel.bench loops``)
#: ``guards``: ``"trim"`` drops dynamo's per-call guards on the identity of global code objects
#: (modules, functions, classes, builtins the step reaches through module globals: about half of
#: a step's guards; 18 µs of a SOBA graph call of 251) and checks them once per run instead
#: (:class:`_TrimGuards`); tensor, constant, aliasing and global-state guards stay per call.
#: ``"full"``: every dynamo guard before every call (also what a torch without ``guard_filter_fn``
#: gets).
settings: dict[str, Any] = {"dynamic": None, "loops": "unroll", "guards": "trim"}

#: state entries owned by :func:`bilevel.solve` (never passed to the compiled step)
BOOKKEEPING = ("t", "time", "counts", "solver", "data")

#: problem -> {solver class: {(repr(solver), pattern): (draws, counts, compiled step)}}: what the
#: eager probes recorded, reused by later runs of the same solver settings on the same problem
_CODE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Recorder:
    """A sampler seen by an eager probe step: records each draw (level and ``last_index``)."""

    def __init__(self, sampler: Any, level: str, log: list[tuple[str, Any]]):
        self._sampler, self._level, self._log = sampler, level, log

    def next(self) -> Any:
        batch = self._sampler.next()
        self._log.append((self._level, getattr(self._sampler, "last_index", None)))
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


class _Replay:
    """A sampler inside the compiled step: returns the batches drawn before the step, in order."""

    def __init__(self, sampler: Any):
        self._sampler = sampler
        self.queue: list[Any] = []
        self.indices: list[Any] = []
        self.last_index: Any = getattr(sampler, "last_index", None)

    def next(self) -> Any:
        self.last_index = self.indices.pop(0)
        return self.queue.pop(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


def stacked_draws(ctx: Any, n: int) -> tuple[Callable[[Any], Any], Any] | None:
    """Inside a compiled step with ``settings["loops"] == "while_loop"``: if the context ``ctx``
    replays at least ``n`` pre-drawn lower batches of one structure, take them: ``(make,
    stacked)`` with ``make(batch)`` the lower objective on a batch (``ctx.G``) and ``stacked`` the
    ``n`` batches stacked leaf by leaf (row k = the k-th draw). Else None (draw one by one)."""
    if settings["loops"] != "while_loop" or not torch.compiler.is_compiling() or n < 2:
        return None
    replay = getattr(ctx, "lower_data", None)
    if not isinstance(replay, _Replay):
        return None
    items = replay.queue[:n]
    if len(items) < n:
        return None
    flat = [torch.utils._pytree.tree_flatten(b) for b in items]
    spec = flat[0][1]
    if any(f[1] != spec or [t.shape for t in f[0]] != [t.shape for t in flat[0][0]] for f in flat) or \
            not all(isinstance(t, torch.Tensor) for t in flat[0][0]):
        return None
    del replay.queue[:n]
    replay.last_index = replay.indices[n - 1]
    del replay.indices[:n]
    stacked = torch.utils._pytree.tree_unflatten([torch.stack(ts) for ts in zip(*[f[0] for f in flat])],
                                                 spec)
    return ctx.G, stacked


def _patterns(problem: Any, solver_cls: type) -> dict[Hashable, tuple]:
    """The patterns recorded for (problem, solver class): key -> (draws, counts, step function)."""
    return _CODE.setdefault(problem, {}).setdefault(solver_cls, {})


#: does this torch take a ``guard_filter_fn`` (with the entries' ``is_global`` and ``value``)?
#: Without it every guard stays ("full").
_GUARD_FILTER = hasattr(torch.compiler, "skip_guard_on_globals_unsafe")

#: dynamo guard kinds that check *which* global code object a name refers to
_CODE_GUARDS = frozenset({"CLOSURE_MATCH", "FUNCTION_MATCH", "MODULE_MATCH", "BUILTIN_MATCH",
                          "CLASS_MATCH", "ID_MATCH", "DUPLICATE_INPUT"})
_CODE_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)


class _TrimGuards:
    """``guard_filter_fn`` of a step graph (``settings["guards"] == "trim"``): drops the guards on
    global code identity (``bilevel.oracles.hvp is <function>``, ``oracles.T is bilevel._tree``,
    ``builtins.len``, ...) — they only fail if a module attribute is rebound — and records each
    as (name, object). :meth:`valid`, called once per run before a pattern's graph is used,
    re-evaluates the names: a rebound one (a monkeypatched function) makes the pattern trace
    again. Everything else (tensor metadata, constants, aliasing, grad mode) stays a per-call
    guard."""

    def __init__(self, scope: dict[str, Any]):
        self.scope = scope  # the step function's globals: dynamo's ``G``
        self.dropped: list[tuple[str, Any]] = []
        self._check: Callable[..., Any] | None = None
        self._checked_n = 0
        self._values: list[Any] = []

    def __call__(self, entries: Any) -> list[bool]:
        keep = []
        for e in entries:
            drop = (e.is_global and e.guard_type in _CODE_GUARDS and e.has_value
                    and isinstance(e.value, _CODE_TYPES + (dict,)))
            if drop:
                self.dropped.append((e.name, e.value))
            keep.append(not drop)
        return keep

    def valid(self) -> bool:
        """Do all dropped names still refer to the objects the graph was traced with?"""
        if self._check is None or self._checked_n != len(self.dropped):  # (one expression)
            parts = " and ".join(f"({name}) is V[{i}]" for i, (name, _) in enumerate(self.dropped))
            # (dynamo's names use builtins, e.g. list(dict.keys(...))[0] for pytree's registry:
            # without them every check raised, so every run traced its patterns anew)
            self._check = eval(f"lambda G, V: {parts or 'True'}", {"__builtins__": builtins})  # noqa: S307
            self._checked_n = len(self.dropped)
            self._values = [v for _, v in self.dropped]
        try:
            return bool(self._check(self.scope, self._values))
        except Exception:  # (a name that no longer resolves)
            return False


#: the step counter's name in the compiled step function (a dynamo source: ``L['<name>']``)
_COUNTER = "bilevel_step_counter"


def _counter_is_dynamic() -> None:
    """Mark the step counter symbolic from a pattern's first graph (``torch.compiler.config.
    dynamic_sources``; the name is ours alone): automatic dynamism would specialise the first
    graph to its t and compile a second one, symbolic, at the next t."""
    cfg = getattr(torch.compiler, "config", None)
    if not isinstance(getattr(cfg, "dynamic_sources", None), str):  # (an older torch: automatic)
        return
    have = [e for e in cfg.dynamic_sources.split(",") if e]
    source = f"L['{_COUNTER}']"
    if source not in have:
        cfg.dynamic_sources = ",".join([*have, source])


def _step_code(solver_cls: type, problem: Any, n: int) -> Callable[..., Any]:
    """A compiled step function with a fresh code object (one per pattern: torch.compile's cache
    and recompile limit are per code object); its :class:`_TrimGuards` (or None) is its
    ``trim`` attribute."""
    src = (f"def step(solver, ctx, core, lower, upper, {_COUNTER}):\n"
           "    ctx.lower_data is None or load(ctx.lower_data, lower)\n"
           "    ctx.upper_data is None or load(ctx.upper_data, upper)\n"
           f"    metrics = solver.step(ctx, core, {_COUNTER})\n"
           "    return metrics, finite(*solver.output(core))\n")
    if settings["dynamic"] is None:
        _counter_is_dynamic()
    ns: dict[str, Any] = {"load": _load, "finite": _finite_code}
    name = f"<bilevel step: {solver_cls.__name__} on {problem!r}, pattern {n}>"
    exec(builtins.compile(src, name, "exec"), ns)
    trim = _TrimGuards(ns) if settings["guards"] == "trim" and _GUARD_FILTER else None
    fn = torch.compile(ns["step"], fullgraph=True, dynamic=settings["dynamic"],
                       backend=C._kernel_backend,
                       options=None if trim is None else {"guard_filter_fn": trim})
    fn.trim = trim
    return fn


def _finite_code(xs: Any, ys: Any) -> torch.Tensor:
    """``solve``'s finiteness summary of (x, y), [0 or NaN, 0 or NaN], computed inside the graph
    with ``isfinite`` (a compiler may fold the eager summary's 0·t to 0)."""
    def code(ts: Any) -> torch.Tensor:
        ok = torch.stack([torch.isfinite(t).all() for t in ts]).all()
        return torch.where(ok, ts[0].new_zeros(()), ts[0].new_full((), float("nan")))

    return torch.stack([code(xs), code(ys)])


def _load(replay: _Replay, draws: tuple[list[Any], list[Any], list[int | None]]) -> bool:
    """Queue the pre-drawn batches. ``draws`` = (entries, indices, sizes): an entry of size None is
    a drawn batch with its batch index; one of size k the data tensors of a
    :class:`~bilevel.sampling.Minibatches` with, as its index, the rows of k batches in a row
    (``next_rows``), gathered here, inside the graph: each batch is gathered where the step uses
    it (a small gather stays in cache for its product), and no eager call per batch."""
    queue: list[Any] = []
    indices: list[Any] = []
    for entry, index, k in zip(*draws):
        if k is None:
            queue.append(entry)
            indices.append(index)
            continue
        b = index.shape[0] // k
        queue.extend(gather(entry, index[j * b : (j + 1) * b]) for j in range(k))
        indices.extend([None] * k)
    replay.queue, replay.indices = queue, indices
    return True


def _signature(obj: Any) -> Hashable:
    """The structure of a state entry: containers recursively, tensors as one marker, Python
    scalars / strings / None by value, any other object by its type."""
    tp = type(obj)
    if tp is torch.Tensor:
        return _TENSOR
    if tp is tuple and all(type(v) is torch.Tensor for v in obj):  # (flat leaves: the common case)
        return (tuple, (_TENSOR,) * len(obj))
    if isinstance(obj, torch.Tensor):
        return _TENSOR
    if isinstance(obj, dict):
        return (type(obj), tuple((k, _signature(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj), tuple(_signature(v) for v in obj))
    if obj is None or isinstance(obj, (int, float, bool, str)):
        return (type(obj), obj)  # (1 and 1.0 and True are different patterns)
    return type(obj)


_TENSOR = object()


def _pattern(solver: Any, settings: Hashable, core: dict[str, Any], t: int) -> Hashable:
    return (settings, _signature(core), solver.phase(core, t))


def _changing_scalar(key: Hashable, patterns: dict[Hashable, Any]) -> str | None:
    """The state entry (a Python float) whose value alone distinguishes the new pattern ``key``
    from a known one (same settings, phase and other entries), or None. (Ints are left alone: a
    random truncation index takes a few values, one graph each, by design.)"""
    settings, (_, items), phase = key
    for known in patterns:
        k_settings, (_, k_items), k_phase = known
        if k_settings != settings or k_phase != phase or len(k_items) != len(items):
            continue
        diff = [(a, b) for a, b in zip(items, k_items) if a != b]
        if len(diff) == 1 and diff[0][0][0] == diff[0][1][0]:
            (name, sig), _ = diff[0]
            if type(sig) is tuple and len(sig) == 2 and sig[0] is float:
                return name
    return None


def _hook(solver: Any, name: str) -> Callable[..., Any] | None:
    """``solver``'s method ``name`` if its class overrides :class:`Solver`'s no-op default."""
    from .solvers.base import Solver

    own = getattr(type(solver), name, None)
    return None if own is None or own is getattr(Solver, name) else getattr(solver, name)


class CompiledStep:
    """``solver.step`` of one run as a compiled graph (see the module docstring)."""

    def __init__(self, solver: Any, ctx: Any):
        self.solver, self.ctx = solver, ctx
        self.rctx = copy.copy(ctx)  # the same problem, projections and per-run derived objects
        self.rctx.lower_data = None if ctx.lower_data is None else _Replay(ctx.lower_data)
        self.rctx.upper_data = None if ctx.upper_data is None else _Replay(ctx.upper_data)
        self.fallback: str | None = None
        reason = getattr(solver, "step_not_compilable", None)
        if O._REDUCER.get() is not None:
            reason = "data-parallel oracles (a process group is active) are reduced eagerly"
        if reason is not None:
            self._give_up(RuntimeError(reason))
        self.patterns = _patterns(ctx.problem, type(solver))
        C.check_settings()
        C.check_choices("bilevel.compiled_step", settings,
                        {"loops": ("unroll", "while_loop"), "guards": ("trim", "full")})
        # (a solver's settings do not change during a run; the loop form is part of the graph)
        self.settings = (repr(solver), settings["loops"], settings["guards"], C.settings["gemm"])
        self.plans: dict[Hashable, tuple] = {}  # pattern -> CompiledStep._plan (this run)
        # the solver's hooks around the graph, None where it keeps Solver's no-op default: the
        # state's form for the graph, and its deferred writes (one host read per step)
        self.graph_state, self.commit = _hook(solver, "graph_state"), _hook(solver, "commit")
        self.replays = [(lv, r) for lv, r in (("lower", self.rctx.lower_data),
                                              ("upper", self.rctx.upper_data)) if r is not None]
        self.last_compiled = False  # did the last step run as the compiled graph?
        self.last_finite: torch.Tensor | None = None  # its [x finite, y finite], from the graph
        self.compiles = 0  # graphs compiled by this run
        self.scalar_patterns: dict[str, int] = {}  # state entry -> new patterns it alone made

    def __call__(self, state: dict[str, Any], t: int) -> dict[str, Any]:
        """One outer step on ``state`` (updated in place, as ``solver.step`` does); oracle counts
        go to ``state["counts"]``."""
        self.last_compiled = False
        if self.fallback is not None:
            return self._oracles(state, t)
        core = {k: v for k, v in state.items() if k not in BOOKKEEPING}
        key = _pattern(self.solver, self.settings, core, t)
        if key not in self.patterns:
            if len(self.patterns) >= MAX_PATTERNS:
                self._give_up(RuntimeError(
                    f"more than {MAX_PATTERNS} patterns (structure or non-tensor values of the "
                    f"state, or {type(self.solver).__name__}.phase, keep changing)"))
                return self._oracles(state, t)
            name = _changing_scalar(key, self.patterns)
            if name is not None:
                self.scalar_patterns[name] = self.scalar_patterns.get(name, 0) + 1
                if self.scalar_patterns[name] >= SCALAR_PATTERNS:
                    self._give_up(RuntimeError(
                        f"the state entry {name!r} is a Python {type(core[name]).__name__} that "
                        f"changes from step to step (now {core[name]!r}): each value is a new "
                        "pattern, run eagerly; keep it in the state as a 0-dim tensor"))
                    return self._oracles(state, t)
            return self._probe(state, t, key)
        plan = self.plans.get(key)
        if plan is None:  # first use of the pattern in this run
            fn = self.patterns[key][2]
            if fn.trim is not None and not fn.trim.valid():  # a global was rebound: trace anew
                del self.patterns[key]
                return self._probe(state, t, key)
            plan = self.plans[key] = self._plan(key)
        samplers, counts, fn = plan
        saved = state.get("data") or {}  # the samplers' positions now (solve keeps them current)
        lower: tuple[list[Any], list[Any], list[int | None]] = ([], [], [])
        upper: tuple[list[Any], list[Any], list[int | None]] = ([], [], [])
        for sampler, is_lower, k in samplers:  # in the order the step draws them (paired samplers)
            out = lower if is_lower else upper
            out[2].append(k)
            if k is not None:  # k draws in a row from Minibatches: their rows, gathered in the graph
                out[0].append(sampler.tensors)
                out[1].append(sampler.next_rows(k))
                continue
            out[0].append(sampler.next())
            index = getattr(sampler, "last_index", None)
            out[1].append(self._index(index, out[0][-1]) if type(index) is int else index)
        if self.graph_state is not None:
            self.graph_state(core)
        checks = _trace.COMPILE_CHECKS
        checks.clear()
        compiles = C._STATS["compiles"]
        token = O._ACTIVE.set(O.OracleCounts())  # (= O.counting(): a frame dynamo runs eagerly
        try:  # would count its oracles; they go nowhere, the pattern's counts are added below)
            metrics, self.last_finite = retry_quietly(fn, self.solver, self.rctx, core, lower, upper, t)
        except Exception as exc:  # capture failed: per-oracle kernels from now on
            O._ACTIVE.reset(token)
            self._give_up(exc)
            self._restore(saved, {})
            return self._oracles(state, t)
        O._ACTIVE.reset(token)
        new = C._STATS["compiles"] - compiles
        if new:
            self.compiles += new
            if self.compiles > 2 * len(self.patterns) + 2:  # a graph per step: nothing gained
                self._give_up(RuntimeError(
                    f"{self.compiles} graphs for {len(self.patterns)} patterns: a Python value the "
                    "step reads changes from step to step (e.g. a batch index or a float in the "
                    "state), so it recompiles"))
        if any(r.queue for _, r in self.replays):  # the step drew fewer batches than its probe
            self._restore(saved, {lv: sum(k or 1 for k in (lower if lv == "lower" else upper)[2])
                                  - len(r.queue) for lv, r in self.replays})
        if checks:
            pending = list(checks)
            checks.clear()
            if not bool(torch.stack([c.ok for c in pending]).all()):
                if self.commit is not None:
                    self.commit(core, False)
                failed = [c for c in pending if not bool(c.ok)]
                self._restore(saved, {})  # the eager step from the state before the step (not
                if all(c.redo for c in failed):  # updated yet): values off the graph's path
                    C._STATS["eager_steps"] += 1
                    return self.solver.step(self.ctx, state, t)
                error = failed[0].error()
                self.solver.step(self.ctx, state, t)  # its exact error, if it fails
                raise error
        if self.commit is not None:  # deferred in-place writes, only if x and y are finite
            self.commit(core, self.last_finite.tolist() == [0.0, 0.0])
        state.update(core)
        for k in [k for k in state if k not in core and k not in BOOKKEEPING]:
            del state[k]  # (entries the step consumed, e.g. MetaTraining's prepared task batch)
        add = state["counts"].add
        for level, kind, n in counts:
            add(level, kind, n)
        C._STATS["compiled_steps"] += 1
        self.last_compiled = True
        return metrics

    @staticmethod
    def _index(i: int, batch: Any) -> torch.Tensor:
        """A drawn batch index as a 0-dim tensor on the batch's device (a graph input: a Python
        int would be a constant of the graph, one graph per index). A new tensor per draw: two
        draws sharing one would be an aliasing the graph is specialised to."""
        leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
        return torch.tensor(i, device=leaves[0].device if leaves else None)

    def _plan(self, key: Hashable) -> tuple[list[tuple[Any, bool, int | None]], list[tuple[str, str, int]],
                                            Any]:
        """What a compiled step of pattern ``key`` does in this run, resolved once: the samplers
        to draw from in order (whether each is the lower one, and for a
        :class:`~bilevel.sampling.Minibatches` how many draws in a row: their rows are drawn at
        once and gathered in the graph; None for other samplers), the pattern's oracle counts as
        (level, kind, n) and its compiled function."""
        draws, counts, fn = self.patterns[key]
        samplers: list[tuple[Any, bool, int | None]] = []
        for level, _ in draws:
            sampler = getattr(self.ctx, f"{level}_data")
            rows = isinstance(sampler, Minibatches)  # (its batches' rows: gathered in the graph)
            if rows and samplers and samplers[-1][0] is sampler:
                samplers[-1] = (sampler, samplers[-1][1], samplers[-1][2] + 1)
            else:
                samplers.append((sampler, level == "lower", 1 if rows else None))
        flat = [(level, kind, n) for level, d in counts.items() for kind, n in d.items()]
        return samplers, flat, fn

    def _restore(self, saved: dict[str, Any], used: dict[str, int]) -> None:
        """Put the samplers back where they were before the pre-draw, then advance each by the
        batches the step really used (so the run continues with the batches of an eager run)."""
        for level, pos in saved.items():
            sampler = getattr(self.ctx, f"{level}_data")  # ({}: a sampler without random state)
            sampler.load_state_dict(pos)
            for _ in range(used.get(level, 0)):
                sampler.next()

    # eager paths ---------------------------------------------------------------------------
    def _probe(self, state: dict[str, Any], t: int, key: Hashable) -> dict[str, Any]:
        """An eager step that records the pattern's draws and oracle counts."""
        log: list[tuple[str, Any]] = []
        rec = copy.copy(self.ctx)
        if self.ctx.lower_data is not None:
            rec.lower_data = _Recorder(self.ctx.lower_data, "lower", log)
        if self.ctx.upper_data is not None:
            rec.upper_data = _Recorder(self.ctx.upper_data, "upper", log)
        _trace.PROBING.append(True)
        try:
            with O.counting() as counts:
                metrics = self.solver.step(rec, state, t)
        finally:
            _trace.PROBING.pop()
        for level, d in counts.items():
            for kind, n in d.items():
                state["counts"].add(level, kind, n)
        self.patterns[key] = (log, counts, _step_code(type(self.solver), self.ctx.problem,
                                                       len(self.patterns)))
        C._STATS["eager_steps"] += 1
        return metrics

    def _oracles(self, state: dict[str, Any], t: int) -> dict[str, Any]:
        with O.backend("compiled"):
            return self.solver.step(self.ctx, state, t)

    def _give_up(self, exc: BaseException) -> None:
        self.fallback = reason = C.reason_of(exc)
        C.report_fallback(f"bilevel compiled mode: one step of {type(self.solver).__name__} could "
                          "not be captured as one graph by torch.compile; using per-oracle "
                          f"compiled kernels instead (reason: {reason})", stacklevel=4)
