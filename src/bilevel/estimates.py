"""Shared building blocks of the stochastic bilevel algorithms (one place for each idea).

* :class:`Schedule` — step sizes / weights  c / (t + t0)^e.
* :func:`neumann_hypergradient` — the stochastic hypergradient of stocBiO (Ji, Yang & Liang 2021,
  Alg. 3, Eq. 4) also used by BSA, MRBO and VRBO:

      ∇̂h = ∇_x F(x, y; B_F) − ∇²_xy G(x, y; B_0) · v,
      v = η Σ_{q=0}^{Q} Π_{j=1}^{q} (I − η ∇²_yy G(x, y; B_j)) ∇_y F(x, y; B_F)

  with a fresh lower batch B_j for every Hessian-vector product (the paper's scaling η, not the
  original code's).
* Variance-reduced recursions: :func:`storm` (Cutkosky & Orabona 2019; MRBO, SUSTAIN, MSTSA),
  :func:`spider` (SARAH / SPIDER, Nguyen et al. 2017, Fang et al. 2018; VRBO, SRBA) and the SAGA
  memory :class:`SagaTable` (Defazio et al. 2014; SABA).
* Loops and oracle bundles of the SGD-type solvers: :func:`sgd_lower` (T lower SGD steps),
  :func:`sgd_linear_system` (SGD on ½vᵀHv − bᵀv, AmIGO), :func:`soba_oracles` (∇_y G, H v and the
  cross term from one linearization, ∇_x F and ∇_y F from one backward: SOBA, SABA, MA-SOBA,
  SRBA) and :func:`require_fixed_batches` (SAGA memories need a fixed partition).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import _tree as T
from . import linalg
from . import oracles as O
from ._rng import advancing
from ._trace import tracing
from .inner import GD, _batched, _summary, nonfinite_error, unroll
from .validation import first_nonfinite

__all__ = [
    "Schedule", "neumann_hypergradient", "storm", "spider", "SagaTable",
    "sampled_neumann_hypergradient", "replay", "momentum_weight", "at_two_points",
    "sgd_lower", "sgd_linear_system", "require_fixed_batches", "soba_oracles",
]


class Schedule:
    """t -> c / (t + t0)^e  (e = 0: constant c)."""

    def __init__(self, c: float, e: float = 0.0, t0: float = 1.0):
        if c < 0 or t0 <= 0:
            raise ValueError(f"Schedule needs c >= 0 and t0 > 0, got c={c}, t0={t0}")
        self.c, self.e, self.t0 = float(c), float(e), float(t0)

    def __call__(self, t: int) -> float:
        return self.c / (t + self.t0) ** self.e if self.e else self.c

    def __repr__(self) -> str:
        return f"Schedule({self.c}, e={self.e}, t0={self.t0})"

    @classmethod
    def of(cls, value: float | Schedule | dict) -> Schedule:
        """Accept a number (constant), a Schedule, or a dict {c, e, t0} from a config file."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(float(value))


def neumann_hypergradient(
    F: O.Fn,
    G_batch: Callable[[], O.Fn],
    xs: T.Leaves,
    ys: T.Leaves,
    *,
    Q: int,
    eta: float,
    G_cross: O.Fn | None = None,
    shared: bool = False,
    ctx: Any = None,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Stochastic Neumann hypergradient (stocBiO Alg. 3).

    ``F``: upper objective on its batch B_F; ``G_batch()``: returns the lower objective on a fresh
    batch (called once per Hessian-vector product); ``G_cross``: lower objective on B_0 for the
    cross term (a fresh batch if None). Returns (∇̂h, info) with ``info["v"]`` the Neumann vector.

    ``shared=True`` is a *different estimator*: ONE lower batch B (one call of ``G_batch``) for
    all Q products and, unless ``G_cross`` is given, the cross term —

        v = η Σ_{q=0}^{Q} (I − η ∇²_yy G(x, y; B))^q ∇_y F,   ∇̂h = ∇_x F − ∇²_xy G(x, y; B) v,

    from one linearization of G on B (:class:`bilevel.oracles.Linearization`): one gradient with
    graph, then one backward per product instead of a gradient and a backward each (about 3×
    cheaper per HVP). Its expectation is not that of the fresh-batch estimator: E[(I − ηH_B)^q]
    ≠ (I − ηH)^q for q ≥ 2 (the powers of one random matrix), so it is biased even as Q → ∞
    (towards E[H_B⁻¹] rather than H⁻¹), the bias shrinking with the batch size.

    ``ctx``: the solver context when ``G_batch`` is its ``fresh_G`` (a whole-step compiled graph
    may then run the Q products as one ``while_loop``, see :func:`sgd_lower`).

    The series' residual norms are read once, after the Q products (``check_every=Q`` of
    :func:`bilevel.linalg.neumann`: no host read per product); the returned v is the same as with a
    read per product, but a series that breaks down has then drawn its remaining batches.
    """
    _, gx, gy = O.grads(F, xs, ys)
    if shared:
        lin = O.Linearization(G_batch(), xs, ys)
        v, info = linalg.neumann(lin.hvp, gy, iters=Q, alpha=eta, check_every=max(Q, 1))
        jv = lin.cross(v) if G_cross is None else O.cross(G_cross, xs, ys, v)
    else:
        from .compiled_step import stacked_draws  # (compiled_step imports this module's users)

        drawn = None if ctx is None else stacked_draws(ctx, Q)
        if drawn is not None:  # inside a compiled step: the Q products as one loop
            from ._loops import row

            make, stacked = drawn
            matvec: Any = linalg.IndexedMatVec(lambda k, p: O.hvp(make(row(stacked, k)), xs, ys, p))
        else:
            def matvec(p: T.Leaves) -> T.Leaves:
                return O.hvp(G_batch(), xs, ys, p)

        v, info = linalg.neumann(matvec, gy, iters=Q, alpha=eta, check_every=max(Q, 1))
        jv = O.cross(G_batch() if G_cross is None else G_cross, xs, ys, v)
    info["v"] = v
    return T.sub(gx, jv), info


def storm(d_prev: T.Leaves, g_new: T.Leaves, g_prev: T.Leaves, a: float) -> T.Leaves:
    """STORM momentum:  d_t = g(z_t; ξ_t) + (1 − a)(d_{t−1} − g(z_{t−1}; ξ_t))  (same sample ξ_t)."""
    return T.axpy(1.0 - a, T.sub(d_prev, g_prev), g_new)


def spider(d_prev: T.Leaves, g_new: T.Leaves, g_prev: T.Leaves) -> T.Leaves:
    """SARAH / SPIDER recursion:  d_t = d_{t−1} + g(z_t; ξ_t) − g(z_{t−1}; ξ_t)."""
    return T.add(d_prev, T.sub(g_new, g_prev))


class SagaTable:
    """SAGA memory over a fixed partition into ``n`` batches.

    ``update(i, g)`` returns the variance-reduced direction  g − m_i + (1/n) Σ_j m_j  and stores
    g as m_i. Memories start at ``init`` (zeros by default). Two forms:

    * rows (eager, ``i`` a Python int): an immutable tuple (``memory[i]``: the leaves stored for
      batch i), replaced by a new tuple at each update, so a copy of the table
      (:meth:`_state_copy`, what :func:`bilevel.solvers.base.copy_state` uses for the last good
      state of every outer step) shares it: O(1) instead of a copy of n entries;
    * stacked (``i`` a 0-dim tensor: whole-step compiled mode, one graph for every batch): one
      ``[n, *shape]`` tensor per leaf. The graph reads row i and leaves the new row pending;
      :meth:`commit`, after the graph, writes it in place (O(row); a functional update would copy
      the table every step). Copy-on-write keeps copies independent: a copy (:meth:`_state_copy`)
      marks both tables, and a marked table clones its memories before its next write. The last
      good state of a step takes a :meth:`_weak_copy` (no mark): the live table writes only after
      the step succeeded, when that copy is no longer needed.

    :meth:`stack` switches to the stacked form; an update with an int switches back.
    """

    def __init__(self, n: int, like: T.Leaves, init: T.Leaves | None = None):
        self.n = int(n)
        base = T.zeros_like(like) if init is None else T.detach(init)
        self._rows: tuple[T.Leaves, ...] | None = (base,) * self.n
        self._stacked: T.Leaves | None = None
        self._pending: tuple[torch.Tensor, T.Leaves] | None = None  # (index, row) to write
        self._cow = False  # does a copy share the stacked memories?
        self.mean: T.Leaves = base

    @property
    def memory(self) -> tuple[T.Leaves, ...]:
        """m_1 … m_n, one tuple of leaves per batch (copies of the stacked rows there)."""
        if self._rows is None:
            return tuple(zip(*(M.clone().unbind(0) for M in self._stacked)))
        return self._rows

    def stack(self) -> None:
        """Switch to the stacked form (a no-op if it is already)."""
        if self._stacked is None:
            self._stacked = tuple(torch.stack(leaf) for leaf in zip(*self._rows))
            self._rows, self._cow = None, False

    def update(self, i: int | torch.Tensor, g: T.Leaves) -> T.Leaves:
        if isinstance(i, torch.Tensor):
            if self._pending is not None:
                raise RuntimeError("a SAGA table takes one update per compiled step (the row of "
                                   "the first is written after the step)")
            self.stack()
            idx = i.reshape(1)  # (out of range: index_select raises, compiled code checks too)
            direction, g = self._saga(tuple(M.index_select(0, idx)[0] for M in self._stacked), g)
            self._pending = (idx, g)
            return direction
        if not 0 <= i < self.n:
            raise IndexError(f"SAGA batch index {i} out of range for {self.n} batches")
        mem = self.memory
        direction, g = self._saga(mem[i], g)
        self._rows, self._stacked = tuple(mem[:i]) + (tuple(g),) + tuple(mem[i + 1:]), None
        return direction

    def commit(self, ok: bool = True) -> None:
        """Write the pending row of a tensor-index update into the stacked memories in place
        (``ok=False``: drop it — the step failed, and its last good state, a weak copy taken
        before it, still holds the memories as they were)."""
        pending, self._pending = self._pending, None
        if pending is None or not ok:
            return
        if self._cow:  # a copy shares the memories: copy them before writing
            self._stacked, self._cow = tuple(M.clone() for M in self._stacked), False
        idx, row = pending
        for M, v in zip(self._stacked, row):
            M.index_copy_(0, idx, v.unsqueeze(0))

    def _saga(self, old: T.Leaves, g: T.Leaves) -> tuple[T.Leaves, T.Leaves]:
        """The direction g − m_i + mean for the stored m_i = ``old``; updates the mean and
        returns (direction, g detached)."""
        if len(g) == 1 == len(old):  # (the common one-leaf variable, without the leafwise helpers)
            diff = g[0] - old[0]
            mean = self.mean[0]
            direction: T.Leaves = (diff + mean,)
            self.mean = (torch.add(mean, diff, alpha=1.0 / self.n),)
            return direction, ((g[0].detach(),) if g[0].requires_grad else g)
        diff_l = T.sub(g, old)
        direction = T.add(diff_l, self.mean)
        self.mean = T.axpy(1.0 / self.n, diff_l, self.mean)
        return direction, (T.detach(g) if any(t.requires_grad for t in g) else g)

    def _state_copy(self) -> SagaTable:
        """An independent copy sharing the memories and mean (copy-on-write in the stacked
        form: both tables are marked)."""
        out = self._weak_copy()
        if self._stacked is not None:
            self._cow = out._cow = True
        return out

    def _weak_copy(self) -> SagaTable:
        """A copy sharing the memories without marking them (valid until this table's next
        write)."""
        if self._pending is not None:
            raise RuntimeError("a SAGA table with an uncommitted compiled update cannot be copied")
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "memory" in state:  # (tables pickled before the stacked form: a tuple or list memory)
            state["_rows"], state["_stacked"] = tuple(state.pop("memory")), None
        state.setdefault("_pending", None)
        state.setdefault("_cow", False)
        self.__dict__.update(state)

    def __getstate__(self) -> dict[str, Any]:
        return {"n": self.n, "memory": self.memory, "mean": self.mean}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory, "mean": self.mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rows, self._stacked, self.mean = tuple(state["memory"]), None, state["mean"]
        self._pending, self._cow = None, False


# --- added for the momentum / variance-reduced solvers (MSTSA, SUSTAIN, MRBO, VRBO, ...) ----------


def sampled_neumann_hypergradient(
    F: O.Fn,
    G_batch: Callable[[], O.Fn],
    xs: T.Leaves,
    ys: T.Leaves,
    *,
    Q: int,
    eta: float,
    p: int,
    G_cross: O.Fn | None = None,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Randomly truncated Neumann hypergradient (Ghadimi & Wang 2018, Eq. 3.5; used by TTSA,
    MSTSA, SUSTAIN):

        v = η Q Π_{i=1}^{p} (I − η ∇²_yy G(x, y; B_i)) ∇_y F(x, y; B_F),   p ~ U{0, …, Q−1},
        ∇̂h = ∇_x F − ∇²_xy G(x, y; B_0) · v,

    whose expectation over p is η Σ_{q=0}^{Q−1} (I − ηH)^q ∇_y F. The caller draws ``p`` (so the
    same draw can be replayed at a second point); ``G_batch`` gives one lower objective per HVP.
    """
    if not 0 <= p < max(Q, 1):
        raise ValueError(f"the truncation index p must be in [0, Q), got p={p}, Q={Q}")
    _, gx, gy = O.grads(F, xs, ys)
    v = gy
    for _ in range(p):
        v = T.axpy(-eta, O.hvp(G_batch(), xs, ys, v), v)
    v = T.scale(v, eta * Q)
    Gc = G_batch() if G_cross is None else G_cross
    return T.sub(gx, O.cross(Gc, xs, ys, v)), {"v": v, "p": p}


def truncation_index(state: dict[str, Any], Q: int) -> int:
    """p ~ U{0, …, Q−1} from the generator state ``state["rng"]`` (advanced): the random
    truncation of :func:`sampled_neumann_hypergradient`, drawn in a solver's ``prepare``."""
    with advancing(state) as gen:
        return int(torch.randint(Q, (1,), generator=gen))


def replay(objectives: list) -> Callable[[], Any]:
    """A ``G_batch`` callable returning the given objectives in order (to evaluate an estimator
    twice on the same samples, e.g. at the current and the previous point of a STORM/SPIDER
    recursion)."""
    it = iter(objectives)
    return lambda: next(it)


class _AtTwoPoints:
    """One objective at two points as ONE function of the stacked leaves ((x, x'), (y, y')):
    fn(x, y) + fn(x', y'). The sum is separable, so its gradient, Hessian-vector and cross
    products with stacked vectors are the two points' products side by side — computed by one
    graph and one backward each instead of two. ``level`` / ``n`` make the oracle layer count it
    as the two evaluations it replaces."""

    __slots__ = ("fn", "nx", "ny", "level", "n")

    def __init__(self, fn: O.Fn, nx: int, ny: int):
        self.fn, self.nx, self.ny = fn, nx, ny
        self.level, self.n = getattr(fn, "level", "objective"), 2 * getattr(fn, "n", 1)

    def __call__(self, xs: T.Leaves, ys: T.Leaves) -> Any:
        nx, ny = self.nx, self.ny
        return self.fn(xs[:nx], ys[:ny]) + self.fn(xs[nx:], ys[ny:])


def at_two_points(
    estimate: Callable[..., T.Leaves], samples: Any, p: tuple[T.Leaves, T.Leaves],
    q: tuple[T.Leaves, T.Leaves], *, out: str, batched: bool = True,
) -> tuple[T.Leaves, T.Leaves]:
    """``(estimate(*p, samples), estimate(*q, samples))``: one estimator at two points on the SAME
    samples — the two terms of a STORM / SPIDER recursion (MRBO, VRBO).

    ``samples``: the objectives the estimator uses (an objective, or a tuple / list of them, nested;
    numbers such as a truncation index pass through);
    ``out``: ``"x"`` or ``"y"``, the space of the estimate (how to split the stacked result). With
    the default ``"autograd"`` oracle backend and no data-parallel reduction the two evaluations are
    batched: the estimator runs once at the stacked point ((x_p, x_q), (y_p, y_q)) with every
    objective replaced by its sum at the two points (:class:`_AtTwoPoints`) — one graph and one
    backward per oracle call instead of two, bitwise the same numbers (every linear-algebra step is
    leafwise; only the host-side tests of :func:`bilevel.linalg.neumann` see the joint residual
    norm, which changes nothing unless a series diverges). Elsewhere, or with ``batched=False``
    (an estimator whose samples are not all objectives, e.g. zeroth-order directions): two calls.
    """
    if out not in ("x", "y"):
        raise ValueError(f"out must be 'x' or 'y', got {out!r}")
    (xp, yp), (xq, yq) = p, q
    if not batched or O.get_backend() != "autograd" or O._REDUCER.get() is not None:
        return estimate(xp, yp, samples), estimate(xq, yq, samples)
    nx, ny = len(xp), len(yp)

    def pair(obj: Any) -> Any:
        if isinstance(obj, (tuple, list)):
            return type(obj)(pair(o) for o in obj)
        if obj is None or isinstance(obj, (int, float, str)):  # e.g. a truncation index
            return obj
        return _AtTwoPoints(obj, nx, ny)

    both = tuple(estimate(tuple(xp) + tuple(xq), tuple(yp) + tuple(yq), pair(samples)))
    k = nx if out == "x" else ny
    return both[:k], both[k:]


def momentum_weight(schedule: Schedule, t: int) -> float:
    """A STORM weight a_t from a schedule, clipped to [0, 1] (a = 1: plain stochastic gradient)."""
    return min(1.0, max(0.0, schedule(t)))


# --- added for the SGD-type solvers (stocBiO, BSA, AmIGO, alternating SGD, ...) ----------------------


_GD_CACHE: dict[tuple, GD] = {}


def _gd(lr: float, steps: int, projection: Callable[[Any], Any] | None) -> GD:
    """``GD(lr, steps, projection)``, built once per value (a constant step builds one per run, not
    one per outer iteration: the constructor validates its hyperparameters, ~25 µs)."""
    if type(lr) is not float or torch.compiler.is_compiling():  # (a graph reading the memo
        return GD(lr=lr, steps=steps, projection=projection)  # would recompile once it is cleared)
    key = (lr, steps, projection)
    dyn = _GD_CACHE.get(key)
    if dyn is None:
        if len(_GD_CACHE) >= 64:  # schedules make a new value every step
            _GD_CACHE.clear()
        dyn = _GD_CACHE[key] = GD(lr=lr, steps=steps, projection=projection)
    return dyn


def sgd_lower(
    G_batch: Callable[[], O.Fn], xs: T.Leaves, ys: T.Leaves, *, steps: int, lr: float,
    projection: Callable[[Any], Any] | None = None, ctx: Any = None,
) -> T.Leaves:
    """``steps`` SGD steps on the lower level at fixed x, a fresh batch each:
    y ← P(y − lr ∇_y G(x, y; B_t)) (the inner loop of BSA, stocBiO, AmIGO) — :class:`bilevel.inner.GD`
    run by :func:`bilevel.inner.unroll`, so a blow-up is reported with its inner step.

    ``ctx``: the solver context when ``G_batch`` is its ``fresh_G``; then a whole-step compiled
    graph may run the loop as one ``while_loop`` (:data:`bilevel.compiled_step.settings`)."""
    dyn = _gd(lr, steps, projection)
    from .compiled_step import stacked_draws  # (compiled_step imports this module's users)

    drawn = None if ctx is None else stacked_draws(ctx, steps)
    if drawn is not None:
        return _sgd_while_loop(dyn, *drawn, xs, ys, steps, lr, projection)
    if type(lr) is float and O._eager() and not tracing() and not _batched(ys[0]):
        # unroll(GD) written out (the same operations, a few Python calls per step fewer — a
        # loop of small oracle calls pays each one): y ← P(y − lr ∇_y G), one finiteness
        # summary per step, one read at the end
        y, sums = tuple(ys), []
        for _ in range(steps):
            y = T.axpy(-lr, O.grad_y(G_batch(), xs, y), y)
            if projection is not None:
                y = tuple(projection(t) for t in y)
            sums.append(_summary(y))
        bad = first_nonfinite(sums)
        if bad is not None:
            raise nonfinite_error(dyn, "lower", bad + 1)
        return y
    state, _ = unroll(dyn, lambda y, k: O.grad_y(G_batch(), xs, y), dyn.init(ys), steps, grad_norm=False)
    return dyn.output(state)


def _sgd_while_loop(dyn: Any, make: Callable[[Any], O.Fn], stacked: Any, xs: T.Leaves, ys: T.Leaves,
                    steps: int, lr: Any, projection: Callable[[Any], Any] | None) -> T.Leaves:
    """:func:`sgd_lower`'s loop as one ``while_loop`` (inside a compiled step): batch k is row k of
    ``stacked``; the finiteness of every iterate is carried and checked after the loop."""
    from ._loops import fori_loop, row
    from ._trace import require

    # (a loop body takes tensors, not the symbolic float of a schedule of the step counter)
    lr = torch.scalar_tensor(lr, dtype=ys[0].dtype, device=ys[0].device)

    def body(k: torch.Tensor, carry: tuple[torch.Tensor, T.Leaves]) -> tuple[torch.Tensor, T.Leaves]:
        ok, y = carry
        y = T.axpy(-lr, O.grad_y(make(row(stacked, k)), xs, y), y)
        if projection is not None:
            y = tuple(projection(t) for t in y)
        return ok & torch.isfinite(_summary(y)), y

    ok, y = fori_loop(steps, body, (torch.ones((), dtype=torch.bool), tuple(ys)))
    require(ok, lambda: nonfinite_error(dyn, "lower", 1, steps))
    return tuple(y)


def sgd_linear_system(
    G_batch: Callable[[], O.Fn], xs: T.Leaves, ys: T.Leaves, v: T.Leaves, b: T.Leaves, *,
    steps: int, lr: float,
) -> T.Leaves:
    """``steps`` SGD steps on the quadratic ½ vᵀHv − bᵀv (H = ∇²_yy g), warm-started at ``v``:
    v ← v − lr (∇²_yy G(x, y; B_t) v − b), a fresh batch per HVP (AmIGO, Arbel & Mairal 2022,
    Alg. 2). Its fixed point is v = H⁻¹ b."""
    for _ in range(steps):
        v = T.axpy(-lr, T.sub(O.hvp(G_batch(), xs, ys, v), b), v)
    return v


def require_fixed_batches(sampler: Any, solver: str, level: str) -> Any:
    """SAGA-type memories index a fixed partition: the sampler must be a
    :class:`bilevel.sampling.FixedBatches` (it reports the drawn batch in ``last_index``)."""
    from .errors import ConfigError
    from .sampling import FixedBatches

    if not isinstance(sampler, FixedBatches):
        got = "no sampler" if sampler is None else type(sampler).__name__
        raise ConfigError(
            f"{solver} keeps one memory per batch and needs {level}_data=bl.sampling.FixedBatches(...) "
            f"(a fixed partition into batches), got {got}"
        )
    return sampler


def soba_oracles(
    G: O.Fn, F: O.Fn, xs: T.Leaves, ys: T.Leaves, v: T.Leaves
) -> tuple[T.Leaves, T.Leaves, T.Leaves, T.Leaves, T.Leaves]:
    """All first/second-order pieces of the SOBA-family directions at one point (x, y, v):
    (∇_y G, ∇²_yy G v, ∇²_xy G v) from one linearization of G (∇_y G with its graph, then H v and
    the cross term from a single backward) and (∇_x F, ∇_y F) from one backward of F.

    With v ≈ H⁻¹ ∇_y F (the sign convention of this package; SOBA's paper uses −v):
    D_y = ∇_y G,  D_v = H v − ∇_y F,  D_x = ∇_x F − ∇²_xy G v.
    """
    gyG, hv, jv = O.grad_y_hvp_cross(G, xs, ys, v)
    _, gx, gy = O.grads(F, xs, ys)
    return gyG, hv, jv, gx, gy

