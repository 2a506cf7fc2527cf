"""Differentiable optimization dynamics, as pure functions of a flat state.

A dynamics maps ``state_k -> state_{k+1}`` given a gradient evaluated at ``point(state_k)``.
The state is a flat tuple of tensors made of ``slots`` blocks, each shaped like the variable
(block 0 is always the iterate y_k). Nothing is updated in place, so the same code runs

* without a graph (implicit estimators, solving the lower level),
* with ``create_graph`` (reverse-mode unrolling: RHG / T-RHG),
* under ``torch.func.jvp`` / ``vmap`` (forward-mode unrolling),
* as the upper-level optimizer of the solvers (one step per outer iteration).

Each dynamics takes ``projection``: a callable applied to the new iterate (e.g. a box clamp),
leafwise on a tensor or on the whole flat tuple (``projection_on="tuple"``).

Hyperparameters (``lr``, ``weight_decay``, ``momentum``, Adam's ``betas``) may be

* a number or a tensor that does not require grad (a constant): 0-dim, or one tensor per leaf of y
  (a pytree shaped like y, or a bare tensor when y is a single tensor) for per-parameter rates;
* a callable of the upper variable, ``lambda x: ...`` (e.g. ``lr=lambda x: x["log_lr"].exp()``,
  learning-rate learning; ``lr=lambda x: x["alpha"]`` with per-leaf values, Meta-SGD), or a per-step
  callable ``lambda x, k: ...`` (e.g. ``lambda x, k: x["lrs"][k]``, a learned schedule);
* a fixed per-step schedule (not learned): :class:`PerStep` — ``PerStep([0.3, 0.2, 0.1])`` (one
  value per inner step k = 0 .. steps−1, a sequence or 1-D tensor of length ``steps``) or
  ``PerStep(lambda k: 0.5 / (k + 1))`` (a callable of the step index) — or a
  :class:`bilevel.estimates.Schedule` (c / (k + t0)^e). The step index restarts at 0 with each
  unroll (each hypergradient / lower solve).

These are one mechanism: every hyperparameter value is resolved per step by :meth:`Dynamics.hp`
(constants, per-step schedules and, after :meth:`Dynamics.bind`, callables of x and of (x, k)).

Estimators call ``dyn = dyn.bind(x, y)`` with their differentiable copy of x before unrolling, so
derivatives flow to x through the hyperparameters (a no-op returning ``dyn`` itself when nothing
depends on x). A tensor that requires grad is rejected at construction: the estimator
differentiates its own copy of x, so such a tensor would silently contribute a zero derivative —
write it as a callable of x instead.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import _tree as T
from ._trace import require, scalar, tracing
from .errors import ConfigError, NonFiniteError, StructureMismatchError
from .validation import first_nonfinite

__all__ = [
    "Dynamics", "GD", "Momentum", "Nesterov", "Adam", "PerStep", "unroll", "fista_momentum",
    "with_projection", "ISTA", "FISTA", "L1", "soft_threshold", "Stopped",
]

GradFn = Callable[[T.Leaves, int], T.Leaves]


Hyper = Any  # number | Tensor | pytree of tensors shaped like y | Callable[[x], ...] | Callable[[x, k], ...]


def _callable_arity(fn: Callable[..., Any], where: str) -> int:
    """1 for ``fn(x)``, 2 for ``fn(x, k)`` (required positional parameters)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins: assume fn(x)
        return 1
    ps = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in ps):
        return 1
    req = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
           and p.default is p.empty]
    if len(req) not in (1, 2):
        raise ConfigError(
            f"{where} must be a number, a tensor, or a callable of the upper variable "
            f"(x) or of (x, k) with k the inner step; got a callable with {len(req)} required "
            "positional parameters"
        )
    return len(req)


def _check_no_grad(value: Any, where: str) -> None:
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, Tensor) and leaf.requires_grad:
            raise ConfigError(
                f"{where} is a tensor that requires grad, but estimators differentiate their own "
                "copy of the upper variable x, so its derivative would silently be zero; pass a "
                f"callable of x instead (e.g. lr=lambda x: x['log_lr'].exp()) or detach it"
            )


def _align(value: Any, ref: Any, where: str) -> list[tuple[int, Any]]:
    """Match a per-leaf hyperparameter pytree to y's structure ``ref`` (leaves = leaf indices);
    dicts are matched by key, so their order does not matter."""
    if isinstance(ref, int):
        return [(ref, value)]
    if isinstance(ref, dict):
        if not isinstance(value, dict) or set(value) != set(ref):
            got = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
            raise StructureMismatchError(
                f"{where} must be a number, a 0-dim tensor or a pytree shaped like y "
                f"(keys {sorted(map(str, ref))}); got {got}"
            )
        return [p for k in ref for p in _align(value[k], ref[k], f"{where}[{k!r}]")]
    if isinstance(ref, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(ref):
            raise StructureMismatchError(
                f"{where} must be a number, a 0-dim tensor or a pytree shaped like y "
                f"({len(ref)} entries); got {type(value).__name__}"
            )
        return [p for i, (v, r) in enumerate(zip(value, ref)) for p in _align(v, r, f"{where}[{i}]")]
    leaves = pytree.tree_leaves(value)
    idx = pytree.tree_leaves(ref)
    if len(leaves) != len(idx):
        raise StructureMismatchError(f"{where} has {len(leaves)} leaves but y has {len(idx)}")
    return list(zip(idx, leaves))


def _normalize(value: Any, where: str, y: T.Leaves | None = None, yspec: Any = None) -> Any:
    """A hyperparameter value as a float, a 0-dim tensor, or a tuple with one entry per leaf of y
    (checked against y's structure and leaf shapes when y is given)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number or a tensor, got a bool")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Tensor) and value.dim() == 0:
        return value
    if isinstance(value, Tensor):
        if y is not None and len(y) != 1:
            raise StructureMismatchError(
                f"{where} is a tensor of shape {tuple(value.shape)} but y has {len(y)} leaves; "
                "give a 0-dim tensor or one tensor per leaf of y (a pytree shaped like y)"
            )
        leaves: list[Any] = [value]
    elif yspec is not None:
        ref = pytree.tree_unflatten(list(range(yspec.num_leaves)), yspec)
        pairs = sorted(_align(value, ref, where), key=lambda p: p[0])
        leaves = [v for _, v in pairs]
    else:
        leaves = pytree.tree_leaves(value)
    for i, v in enumerate(leaves):
        if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
            raise ConfigError(f"{where}: leaf {i} is a {type(v).__name__}, expected a number or tensor")
    out = tuple(float(v) if isinstance(v, (int, float)) else v for v in leaves)
    if y is not None:
        if len(out) != len(y):
            raise StructureMismatchError(f"{where} has {len(out)} leaves but y has {len(y)}")
        for i, (a, t) in enumerate(zip(out, y)):
            if isinstance(a, Tensor):
                try:
                    ok = torch.broadcast_shapes(a.shape, t.shape) == t.shape
                except RuntimeError:
                    ok = False
                if not ok:
                    raise StructureMismatchError(
                        f"{where}: entry for leaf {i} of y has shape {tuple(a.shape)}, which does "
                        f"not broadcast to the leaf's shape {tuple(t.shape)}"
                    )
    return out


class PerStep:
    """A fixed per-step hyperparameter: value k at inner step k (a learning-rate schedule).

    ``PerStep(values)``: a sequence of numbers or 0-dim tensors, or a 1-D tensor, with one entry
    per inner step (its length must equal the dynamics' ``steps``); ``PerStep(fn)``: ``fn(k)``
    returns the value (a number or 0-dim tensor) at step k. Tensors must not require grad (a
    learned schedule is a callable of the upper variable, ``lambda x, k: x["lrs"][k]``).
    """

    def __init__(self, values: Any):
        self.fn: Callable[[int], Any] | None = None
        self.values: list[Any] | None = None
        if callable(values) and not isinstance(values, Tensor):
            self.fn = values
            return
        if isinstance(values, Tensor):
            if values.dim() != 1:
                raise ConfigError(f"PerStep: a tensor of values must be 1-D (one per step), got "
                                  f"shape {tuple(values.shape)}")
            vals: list[Any] = list(values.unbind(0))
        elif isinstance(values, (list, tuple)):
            vals = list(values)
        else:
            raise ConfigError(f"PerStep takes a sequence / 1-D tensor of per-step values or a "
                              f"callable of the step index, got {type(values).__name__}")
        if not vals:
            raise ConfigError("PerStep: no values given")
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not (isinstance(v, (int, float))
                                           or (isinstance(v, Tensor) and v.dim() == 0)):
                raise ConfigError(f"PerStep: value {i} is {type(v).__name__}, expected a number or "
                                  "a 0-dim tensor")
        _check_no_grad(vals, "PerStep")
        self.values = [float(v) if isinstance(v, (int, float)) else v for v in vals]

    def __len__(self) -> int:
        if self.values is None:
            raise TypeError("PerStep(fn) has no length")
        return len(self.values)

    def __call__(self, k: int) -> Any:
        if self.fn is not None:
            return self.fn(k)
        assert self.values is not None
        if not 0 <= k < len(self.values):
            raise ConfigError(f"PerStep has {len(self.values)} values, but inner step {k} was "
                              "requested: give one value per step")
        return self.values[k]

    def __repr__(self) -> str:
        return f"PerStep({self.fn if self.fn is not None else self.values})"


def _leaf(value: Any, i: int) -> Any:
    return value[i] if isinstance(value, tuple) else value


def _axpy(alpha: Any, x: T.Leaves, y: T.Leaves) -> T.Leaves:
    """``y + alpha * x`` with alpha a float, a 0-dim tensor or one value per leaf."""
    if isinstance(alpha, (float, Tensor)):
        return T.axpy(alpha, x, y)
    return tuple(v + a * u for a, u, v in zip(alpha, x, y))


def _neg(alpha: Any) -> Any:
    return tuple(-a for a in alpha) if isinstance(alpha, tuple) else -alpha


def _is_zero(value: Any) -> bool:
    return isinstance(value, float) and value == 0.0


class Dynamics:
    """Base class. Subclasses set ``slots``, list their hyperparameters in ``hyper`` and implement
    :meth:`update`, reading hyperparameter values with :meth:`hp` (never the raw attributes).

    ``weight_decay`` λ adds λ y to the gradient (coupled L2 decay: the dynamics then minimize
    g + λ/2 ‖y‖²).
    """

    slots = 1
    hyper: tuple[str, ...] = ("lr", "weight_decay")
    #: lower bound checked for numeric values: (bound, inclusive)
    _ranges: dict[str, tuple[float, bool]] = {"lr": (0.0, False), "weight_decay": (0.0, True)}

    def __init__(
        self,
        lr: Hyper,
        steps: int = 100,
        projection: Callable[[Any], Any] | None = None,
        weight_decay: Hyper = 0.0,
    ):
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.steps = int(steps)
        self.projection = projection
        self._hp: dict[str, tuple[str, Any]] = {}
        self._raw: dict[str, Any] = {}
        self._declare("lr", lr)
        self._declare("weight_decay", weight_decay)

    # -- hyperparameters -----------------------------------------------------------------
    def _declare(self, name: str, value: Hyper) -> None:
        """Record a hyperparameter: constant (validated now) or a callable of x / (x, k)."""
        where = f"{type(self).__name__}.{name}"
        from .estimates import Schedule  # (estimates imports this module)

        if isinstance(value, (PerStep, Schedule)):  # a fixed function of the step index
            self._raw[name] = value
            self._hp[name] = ("sched", self._checked_schedule(name, value, where))
            return
        if callable(value) and not isinstance(value, Tensor):
            self._hp[name] = ("x" if _callable_arity(value, where) == 1 else "xk", value)
            return
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self._check_range(name, value, name)
        _check_no_grad(value, where)
        self._raw[name] = value
        self._hp[name] = ("const", _normalize(value, where))

    def _checked_schedule(self, name: str, value: Any, where: str) -> Callable[[int], Any]:
        """k -> the value at step k, range-checked (numbers); a PerStep of fixed values must
        have one value per step."""
        if isinstance(value, PerStep) and value.values is not None:
            if len(value) != self.steps:
                raise ConfigError(f"{where}: PerStep has {len(value)} values but steps={self.steps}; "
                                  "give one value per inner step")
            for i, v in enumerate(value.values):
                self._check_range(name, v, f"{where} at step {i}")

        def at(k: int) -> Any:
            v = value(k)
            if isinstance(v, bool) or not (isinstance(v, (int, float))
                                           or (isinstance(v, Tensor) and v.dim() == 0)):
                raise ConfigError(f"{where} at step {k} is {type(v).__name__}, expected a number "
                                  "or a 0-dim tensor")
            if isinstance(v, (int, float)):
                self._check_range(name, v, f"{where} at step {k}")
                return float(v)
            return v

        return at

    def _check_range(self, name: str, value: Any, where: str) -> None:
        # (inside a compiled whole step a schedule's value is symbolic; the eager first step of
        # the pattern checked the same expression)
        if not isinstance(value, (int, float)) or torch.compiler.is_compiling():
            return
        low, inclusive = self._ranges.get(name, (-math.inf, True))
        if not (value >= low if inclusive else value > low) or not math.isfinite(value):
            what = f">= {low:g}" if inclusive else ("positive" if low == 0 else f"> {low:g}")
            raise ValueError(f"{where} must be {what} (and finite), got {value}")

    def hp(self, name: str, k: int) -> Any:
        """Value of hyperparameter ``name`` at inner step ``k``: a float, a 0-dim tensor, or a
        tuple with one entry per leaf of y."""
        kind, v = self._hp[name]
        if kind == "const":
            return v
        if kind == "sched":  # a function of the step only (bound, or a fixed schedule)
            return v(k)
        raise ConfigError(
            f"{type(self).__name__}.{name} is a function of the upper variable; call "
            "dyn = dyn.bind(x) before running the dynamics (every estimator does this)"
        )

    @property
    def depends_on_x(self) -> bool:
        """True if some hyperparameter is a callable of the upper variable."""
        return any(kind in ("x", "xk") for kind, _ in self._hp.values())

    def bind(self, x: Any, y: Any = None) -> Dynamics:
        """These dynamics with every hyperparameter evaluated at the upper variable ``x`` (a pytree,
        typically the estimator's differentiable copy), so derivatives flow from the unrolled
        iterates to x through them. ``y`` (pytree or flat tuple of the lower variable) checks
        per-leaf values against y's structure and shapes (dict entries matched by key).

        Callables are evaluated at every step (so a checkpointed reverse sweep can recompute any
        segment). Returns ``self`` when every hyperparameter is a scalar constant.
        """
        if not self.depends_on_x and all(not isinstance(v, tuple) for _, v in self._hp.values()):
            return self
        ys, yspec = (None, None)
        if y is not None:
            ys, yspec = pytree.tree_flatten(y)
            ys = tuple(ys)
        out = copy.copy(self)
        out._hp = {}
        for name, (kind, v) in self._hp.items():
            where = f"{type(self).__name__}.{name}"
            if kind == "const":  # per-leaf constants: re-matched against y's structure
                out._hp[name] = ("const", v if ys is None or not isinstance(v, tuple) else
                                 _normalize(self._raw[name], where, ys, yspec))
            elif kind == "x":  # evaluated at every step: each step gets its own graph nodes
                out._hp[name] = ("sched", lambda k, v=v, where=where: _normalize(
                    v(x), where, ys, yspec))
            elif kind == "xk":
                out._hp[name] = ("sched", lambda k, v=v, where=where: _normalize(
                    v(x, k), f"{where} at step {k}", ys, yspec))
            else:
                out._hp[name] = (kind, v)
        return out

    def decayed(self, grad: T.Leaves, point: T.Leaves, k: int) -> T.Leaves:
        """∇g + λ y (the weight-decayed gradient at ``point``)."""
        wd = self.hp("weight_decay", k)
        return grad if _is_zero(wd) else _axpy(wd, point, grad)

    # -- state layout --------------------------------------------------------------------
    def init(self, y: T.Leaves) -> T.Leaves:
        """State at step 0: the iterate followed by zero-initialised auxiliary blocks."""
        return tuple(y) + tuple(torch.zeros_like(t) for _ in range(self.slots - 1) for t in y)

    def split(self, state: T.Leaves) -> list[T.Leaves]:
        n = len(state) // self.slots
        return [tuple(state[i * n : (i + 1) * n]) for i in range(self.slots)]

    def output(self, state: T.Leaves) -> T.Leaves:
        """The iterate y_k."""
        return tuple(state[: len(state) // self.slots])

    def point(self, state: T.Leaves) -> T.Leaves:
        """Where the next gradient is evaluated (y_k except for Nesterov)."""
        return self.output(state)

    def project(self, y: T.Leaves) -> T.Leaves:
        if self.projection is None:
            return y
        return tuple(self.projection(t) for t in y)

    def descend(self, point: T.Leaves, direction: T.Leaves, k: int) -> T.Leaves:
        """P(point − η_k direction): the step of GD and Nesterov (proximal dynamics add their prox)."""
        return self.project(_axpy(_neg(self.hp("lr", k)), direction, point))

    def update(self, state: T.Leaves, grad: T.Leaves, k: int) -> T.Leaves:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr}, steps={self.steps})"


class GD(Dynamics):
    """Projected gradient descent  y_{k+1} = P(y_k − η_k (∇_y g(x, y_k) + λ y_k))."""

    reference = "gradient descent (Cauchy 1847)"  # a concrete class, though ISTA subclasses it

    def update(self, state, grad, k):
        return self.descend(state, self.decayed(grad, state, k), k)


class Momentum(Dynamics):
    """Heavy ball (Polyak 1964):  m_{k+1} = β m_k + ∇g(y_k),  y_{k+1} = P(y_k − η m_{k+1})."""

    slots = 2
    hyper = ("lr", "weight_decay", "momentum")
    _ranges = {**Dynamics._ranges, "momentum": (0.0, True)}

    def __init__(self, lr, steps=100, momentum: Hyper = 0.9, projection=None, weight_decay=0.0):
        super().__init__(lr, steps, projection, weight_decay)
        self.momentum = momentum
        self._declare("momentum", momentum)

    def update(self, state, grad, k):
        y, m = self.split(state)
        grad = self.decayed(grad, y, k)
        m = _axpy(self.hp("momentum", k), m, grad)
        return self.project(_axpy(_neg(self.hp("lr", k)), m, y)) + m


def fista_momentum(k: int) -> float:
    """β_k = (t_k − 1) / t_{k+1} with t_0 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k²)) / 2 (Beck & Teboulle 2009)."""
    t = 1.0
    for _ in range(k):
        t = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
    t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
    return (t - 1.0) / t_next


class Nesterov(Dynamics):
    """Nesterov / FISTA (Beck & Teboulle 2009, Alg. FISTA with constant step):

        z_{k+1} = P(w_k − η ∇g(w_k)),   w_{k+1} = z_{k+1} + β_k (z_{k+1} − z_k),   w_0 = z_0 = y_0.

    ``momentum=None`` uses the FISTA schedule β_k = (t_k − 1)/t_{k+1}; a float uses a constant β
    (for μ-strongly convex g, β = (√κ − 1)/(√κ + 1) is the optimal choice). Output is z_k.
    """

    slots = 2
    hyper = ("lr", "weight_decay", "momentum")
    _ranges = {**Dynamics._ranges, "momentum": (0.0, True)}
    reference = "Nesterov 1983; Beck & Teboulle 2009"  # concrete, though FISTA subclasses it

    def __init__(self, lr, steps=100, momentum: Hyper | None = None, projection=None,
                 weight_decay=0.0):
        super().__init__(lr, steps, projection, weight_decay)
        self.momentum = momentum
        self._betas: list[float] = []
        if momentum is None:
            self._hp["momentum"] = ("sched", self._fista)
        else:
            self._declare("momentum", momentum)

    def _fista(self, k: int) -> float:
        while len(self._betas) <= k:  # a cache of a fixed sequence, never state
            self._betas.append(fista_momentum(len(self._betas)))
        return self._betas[k]

    def beta(self, k: int) -> Any:
        """β_k (a float unless the momentum is a tensor or depends on x)."""
        return self.hp("momentum", k)

    def init(self, y):
        return tuple(y) + tuple(y)

    def point(self, state):
        return self.split(state)[1]

    def update(self, state, grad, k):
        z, w = self.split(state)
        z_new = self.descend(w, self.decayed(grad, w, k), k)
        w_new = _axpy(self.beta(k), T.sub(z_new, z), z_new)
        return z_new + w_new


class Adam(Dynamics):
    """Adam (Kingma & Ba 2015, Alg. 1) with bias correction, differentiable end to end.

    Denominator sqrt(v̂ + eps_root) + eps: ``eps_root > 0`` keeps the derivative of sqrt finite
    where a gradient entry is exactly zero (needed when differentiating through Adam, as in optax).
    ``lr``, ``weight_decay`` and each of ``betas`` are hyperparameters (see the module docstring);
    ``eps`` and ``eps_root`` are numbers.
    """

    slots = 3
    hyper = ("lr", "weight_decay", "beta1", "beta2")
    _ranges = {**Dynamics._ranges, "beta1": (0.0, True), "beta2": (0.0, True)}

    def __init__(
        self,
        lr,
        steps=100,
        betas: tuple[Hyper, Hyper] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_root: float = 1e-16,
        projection=None,
        weight_decay: Hyper = 0.0,
    ):
        super().__init__(lr, steps, projection, weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"Adam betas must be a pair (beta1, beta2), got {betas!r}")
        for b in betas:
            if isinstance(b, (int, float)) and not 0 <= b < 1:
                raise ValueError(f"Adam betas must lie in [0, 1), got {betas}")
        self.betas, self.eps, self.eps_root = tuple(betas), eps, eps_root
        self._declare("beta1", betas[0])
        self._declare("beta2", betas[1])

    def update(self, state, grad, k):
        y, m, v = self.split(state)
        grad = self.decayed(grad, y, k)
        b1, b2 = self.hp("beta1", k), self.hp("beta2", k)
        if isinstance(b1, float) and isinstance(b2, float):  # the plain path, bit for bit
            m = tuple(b1 * mi + (1 - b1) * gi for mi, gi in zip(m, grad))
            v = tuple(b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, grad))
            c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
            step = tuple(
                (mi / c1) / (torch.sqrt(vi / c2 + self.eps_root) + self.eps) for mi, vi in zip(m, v)
            )
        else:
            m = tuple(_leaf(b1, i) * mi + (1 - _leaf(b1, i)) * gi
                      for i, (mi, gi) in enumerate(zip(m, grad)))
            v = tuple(_leaf(b2, i) * vi + (1 - _leaf(b2, i)) * gi * gi
                      for i, (vi, gi) in enumerate(zip(v, grad)))
            step = tuple(
                (mi / (1 - _leaf(b1, i) ** (k + 1)))
                / (torch.sqrt(vi / (1 - _leaf(b2, i) ** (k + 1)) + self.eps_root) + self.eps)
                for i, (mi, vi) in enumerate(zip(m, v))
            )
        return self.project(_axpy(_neg(self.hp("lr", k)), step, y)) + m + v


def _batched(t: Tensor) -> bool:
    """True for a tensor being vmapped (host synchronisation is impossible there)."""
    return bool(torch._C._functorch.is_batchedtensor(t))


#: the summation dtype of a finiteness summary, where it is not the leaf's own: a 16-bit iterate is
#: summed in float32 (float16's largest value is 65504: 1000 finite entries of 100 would sum to inf)
_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _summary(leaves: T.Leaves) -> Tensor:
    """Σ of every entry of the iterate (in float32 at least): finite iff no entry is NaN/inf,
    barring an overflow of the sum itself — which needs entries within a factor of the leaf's size
    of float32's (or float64's) largest value; one scalar per step for the batched check of
    :func:`unroll`."""
    t = leaves[0]
    out = (t.detach() if t.requires_grad else t).sum(dtype=_SUM_DTYPE.get(t.dtype))
    for t in leaves[1:]:
        out = out + (t.detach() if t.requires_grad else t).sum(dtype=_SUM_DTYPE.get(t.dtype))
    return out


class _Named:
    """What :func:`nonfinite_error` says of a dynamics: its class name and ``lr``."""

    def __init__(self, name: str, lr: Any):
        self.name, self.lr = name, lr


def nonfinite_error(dyn: Dynamics | _Named, level: str, step: int, last: int | None = None
                    ) -> NonFiniteError:
    """The error of :func:`unroll` for a first non-finite iterate at ``step`` (1-based), or, where
    the step is not known (traced mode), somewhere within steps ``step..last``."""
    where = f"at step {step} of" if last is None else "of"
    within = "" if last is None else f" within steps {step}..{last}"
    return NonFiniteError(
        f"non-finite values (NaN/inf) in the {level}-level iterate {where} "
        f"{dyn.name if isinstance(dyn, _Named) else type(dyn).__name__} (lr={dyn.lr}){within}; "
        "reduce the step size or check the objective",
        level=level,
        step=step if last is None else None,
    )


def unroll(
    dyn: Dynamics,
    grad_fn: GradFn,
    state: T.Leaves,
    steps: int,
    *,
    start: int = 0,
    level: str = "lower",
    track: bool = True,
    carry: Callable[[int, T.Leaves, Any], Any] | None = None,
    buffers: Any = None,
    grad_norm: bool = True,
) -> tuple[T.Leaves, dict[str, Any]]:
    """Run ``steps`` updates from ``state`` (step counter starting at ``start``).

    ``grad_fn(point, k)`` returns the direction at ``point``. Whether a graph is built is decided
    by ``grad_fn``. Non-finite iterates raise :class:`NonFiniteError` naming the first bad step
    (checked with a single synchronisation after the loop). ``track=False`` skips that check and
    every host synchronisation, so the loop runs under ``torch.func.vmap`` / ``grad``.

    ``carry(k, point, buffers) -> buffers`` (with the starting ``buffers``) carries state beside
    the iterate — BatchNorm running statistics, see :class:`bilevel.modules.Buffers` — updated at
    the same point as the gradient of step k, outside any graph; the final value is returned as
    ``info["buffers"]``. ``grad_norm=False``: no ``info["last_grad_norm"]`` (a norm and a host read
    a caller that discards ``info`` need not pay).
    """
    sums: list[Tensor] = []
    last_grad: T.Leaves | None = None
    for k in range(start, start + steps):
        point = dyn.point(state)
        last_grad = grad_fn(point, k)
        if carry is not None:
            buffers = carry(k, point, buffers)
        state = dyn.update(state, last_grad, k)
        if track:
            sums.append(_summary(state[: len(state) // dyn.slots]))
    if track and tracing() and sums:  # traced (vmap): no host read, the check runs afterwards
        ok = torch.isfinite(torch.stack([s.reshape(()) for s in sums])).all()
        # (the error names the dynamics without holding it: bound dynamics close over the
        # transform's x, and a check kept past the graph would make it an output — a tensor of
        # the transform's level, which a compiled graph cannot return)
        named = _Named(type(dyn).__name__, dyn.lr)
        require(ok, lambda: nonfinite_error(named, level, start + 1, start + steps))
    if track and any(_batched(t) for t in state):  # inside a plain vmap: the caller checks
        track = False
    bad = first_nonfinite(sums) if track and not tracing() else None
    if bad is not None:
        raise nonfinite_error(dyn, level, start + bad + 1)
    info: dict[str, Any] = {"steps": steps}
    if carry is not None:
        info["buffers"] = buffers
    # track=False or inside a plain vmap: no host synchronisation (traced: a tensor)
    if grad_norm and last_grad is not None and (tracing() or (track and not _batched(last_grad[0]))):
        info["last_grad_norm"] = scalar(T.norm(T.detach(last_grad)))
    return state, info


class Stopped(Dynamics):
    """``dyn`` run for its first ``n`` steps, then held:  s_{k+1} = Φ_k(s_k) for k < n, s_k after.

    ``n`` may be a 0-dim integer tensor: a number of steps chosen from data inside a compiled graph
    (IAPTT-GM's truncation k*), where Python cannot stop the loop at it. Unrolled over all
    ``dyn.steps`` steps, the iterate stays y_n from step n on, and its derivative is that of the
    first n steps (``torch.where`` hands the adjoint of a held step through unchanged): the numbers
    of ``dyn`` run for n steps, at the cost of ``dyn.steps``."""

    def __init__(self, dyn: Dynamics, n: int | Tensor):
        # (no Dynamics.__init__: the hyperparameters are dyn's, read through it)
        self.dyn, self.n = dyn, n
        self.slots, self.steps, self.lr, self.projection = dyn.slots, dyn.steps, dyn.lr, dyn.projection

    @property
    def depends_on_x(self) -> bool:
        return self.dyn.depends_on_x

    def bind(self, x: Any, y: Any = None) -> Dynamics:
        bound = self.dyn.bind(x, y)
        return self if bound is self.dyn else Stopped(bound, self.n)

    def hp(self, name: str, k: int) -> Any:
        return self.dyn.hp(name, k)

    def init(self, y: T.Leaves) -> T.Leaves:
        return self.dyn.init(y)

    def output(self, state: T.Leaves) -> T.Leaves:
        return self.dyn.output(state)

    def point(self, state: T.Leaves) -> T.Leaves:
        return self.dyn.point(state)

    def update(self, state: T.Leaves, grad: T.Leaves, k: int) -> T.Leaves:
        new = self.dyn.update(state, grad, k)
        if not isinstance(self.n, Tensor):
            return new if k < self.n else tuple(state)
        held = self.n <= k
        return tuple(torch.where(held, s, t) for s, t in zip(state, new))

    def __repr__(self) -> str:
        return f"Stopped({self.dyn!r}, n={self.n})"


def with_projection(dyn: Dynamics, projection: Callable[[Any], Any] | None) -> Dynamics:
    """A copy of ``dyn`` that also applies ``projection`` (after its own, if any)."""
    if projection is None:
        return dyn
    out = copy.copy(dyn)
    own = dyn.projection
    out.projection = projection if own is None else (lambda t: projection(own(t)))
    return out


# --- proximal dynamics: a smooth lower objective g plus a non-smooth h handled by its prox ------

Prox = Callable[..., Tensor]  # prox(v, step) -> prox_{step·h}(v), or prox(v, step, x) when h depends on x


def soft_threshold(v: Tensor, tau: float | Tensor) -> Tensor:
    """prox of τ‖·‖₁:  S_τ(v) = sign(v) · max(|v| − τ, 0) (elementwise; τ ≥ 0 a number or tensor).

    Differentiable almost everywhere (derivative 1 where |v| > τ, 0 inside), so reverse- and
    forward-mode unrolling go through it.
    """
    return torch.sign(v) * torch.relu(torch.abs(v) - tau)


class L1:
    """h(y) = λ‖y‖₁ and its prox, soft-thresholding:  prox_{ηh}(v) = S_{ηλ}(v).

    ``lam`` is a number ≥ 0, a tensor that does not require grad (broadcast against each leaf of y),
    or a callable of the upper variable ``lambda x: ...`` (then the dynamics must be bound to x,
    which every estimator does, and derivatives flow to x through the threshold).
    """

    def __init__(self, lam: float | Tensor | Callable[[Any], Any]):
        if isinstance(lam, bool):
            raise ConfigError("L1(lam): lam must be a number, a tensor or a callable of x, got a bool")
        if isinstance(lam, (int, float)) and not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"L1(lam): lam must be >= 0 and finite, got {lam}")
        if callable(lam) and not isinstance(lam, Tensor):
            if _callable_arity(lam, "L1.lam") != 1:
                raise ConfigError("L1(lam): a callable lam takes the upper variable only (lambda x: ...)")
        elif not isinstance(lam, (int, float, Tensor)):
            raise ConfigError(f"L1(lam): lam must be a number, a tensor or a callable of x, got "
                              f"{type(lam).__name__}")
        else:
            _check_no_grad(lam, "L1.lam")
        self.lam = lam
        self.depends_on_x = callable(lam) and not isinstance(lam, Tensor)

    def _lam(self, x: Any) -> Any:
        return self.lam(x) if self.depends_on_x else self.lam

    def __call__(self, v: Tensor, step: float | Tensor, x: Any = None) -> Tensor:
        return soft_threshold(v, step * self._lam(x))

    def value(self, y: Any, x: Any = None) -> Tensor:
        """h(y) = λ Σ_leaves ‖y_leaf‖₁ (y a tensor or a pytree)."""
        lam = self._lam(x)
        return sum((lam * t.abs()).sum() for t in pytree.tree_leaves(y))

    def __repr__(self) -> str:
        return f"L1(lam={'<callable>' if self.depends_on_x else self.lam})"


class _Proximal:
    """Mixin: the gradient step of the base dynamics followed by a proximal step,

        y⁺ = P(prox_{η h}(v − η ∇_y g(x, v))),

    so the dynamics minimize g + h for a smooth g (the problem's lower objective) and a convex,
    possibly non-smooth h known through its prox (forward–backward splitting). ``prox(v, step)``
    applies prox_{step·h} to one leaf of y; ``prox(v, step, x)`` (or an object with
    ``depends_on_x = True`` such as :class:`L1` with a callable λ) lets h depend on the upper
    variable, bound by :meth:`bind` like the hyperparameters.
    """

    def _set_prox(self, prox: Prox | None) -> None:
        if prox is None or not callable(prox):
            raise ConfigError(
                f"{type(self).__name__} needs prox=..., a callable (v, step) -> prox_(step·h)(v) "
                f"applied to each leaf of y (e.g. bilevel.inner.L1(lam)); got {prox!r}")
        dep = getattr(prox, "depends_on_x", None)
        if dep is None:
            try:
                req = [p for p in inspect.signature(prox).parameters.values()
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
            except (TypeError, ValueError):
                req = [None, None]
            if len(req) not in (2, 3):
                raise ConfigError(f"{type(self).__name__}: prox must take (v, step) or (v, step, x); "
                                  f"got a callable with {len(req)} required positional parameters")
            dep = len(req) == 3
        self.prox = prox
        self._prox_x = bool(dep)
        self._prox_at: Prox | None = None if dep else prox

    @property
    def depends_on_x(self) -> bool:
        return super().depends_on_x or self._prox_x  # type: ignore[misc]

    def bind(self, x: Any, y: Any = None) -> Dynamics:
        out = super().bind(x, y)  # type: ignore[misc]
        if self._prox_x:
            if out is self:
                out = copy.copy(self)
            out._prox_at = lambda v, step, p=self.prox: p(v, step, x)
        return out

    def descend(self, point: T.Leaves, direction: T.Leaves, k: int) -> T.Leaves:
        if self._prox_at is None:
            raise ConfigError(f"the prox of {type(self).__name__} depends on the upper variable; call "
                              "dyn = dyn.bind(x) before running the dynamics (every estimator does this)")
        lr = self.hp("lr", k)  # type: ignore[attr-defined]
        v = _axpy(_neg(lr), direction, point)
        return self.project(tuple(self._prox_at(t, _leaf(lr, i))  # type: ignore[attr-defined]
                                  for i, t in enumerate(v)))


class ISTA(_Proximal, GD):
    """Proximal gradient descent / ISTA (Daubechies, Defrise & De Mol 2004; Beck & Teboulle 2009, Eq. 1.4):

        y_{k+1} = P(prox_{η h}(y_k − η ∇_y g(x, y_k))),

    minimizing g + h (g the problem's smooth lower objective, h given by ``prox``, e.g.
    :class:`L1`: the lasso). Converges at rate O(1/k) in objective for η ≤ 1/L (L: Lipschitz
    constant of ∇_y g). Differentiable: ``Reverse`` and ``Forward`` unroll through the prox.
    """

    def __init__(self, lr: Hyper, steps: int = 100, *, prox: Prox, projection=None,
                 weight_decay: Hyper = 0.0):
        super().__init__(lr, steps, projection, weight_decay)
        self._set_prox(prox)

    def __repr__(self) -> str:
        return f"ISTA(lr={self.lr}, steps={self.steps}, prox={self.prox!r})"


class FISTA(_Proximal, Nesterov):
    """FISTA (Beck & Teboulle 2009, Alg. FISTA with constant step size):

        z_{k+1} = P(prox_{η h}(w_k − η ∇_y g(x, w_k))),   w_{k+1} = z_{k+1} + β_k (z_{k+1} − z_k),

    with β_k from :func:`fista_momentum` (``momentum=None``) or a constant; output z_k. O(1/k²)
    in objective for η ≤ 1/L. The :class:`Nesterov` dynamics plus a prox.
    """

    def __init__(self, lr: Hyper, steps: int = 100, *, prox: Prox, momentum: Hyper | None = None,
                 projection=None, weight_decay: Hyper = 0.0):
        super().__init__(lr, steps, momentum, projection, weight_decay)
        self._set_prox(prox)

    def __repr__(self) -> str:
        return f"FISTA(lr={self.lr}, steps={self.steps}, prox={self.prox!r})"
